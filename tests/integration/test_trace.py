"""`mmiosplit run --trace-exits / --kvm-report` and the policy flags, through the real split.

The guests are literal instruction words (assembled with aarch64-linux-gnu-as and
arm-none-eabi-as -mcpu=cortex-a15 -mthumb; the source is in the comments).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mmiosplit.v1 import vcpu_pb2
from mmiosplit_cli.cli import build_config, build_parser
from mmiosplit_cli.runner import run_vm
from mmiosplit_cli.trace import TracePrinter
from tests.integration.client import LOAD, Services, a64, a64_with_vectors
from tests.integration.rogue_device import RogueServer

pytestmark = pytest.mark.integration

SYSTEM_OFF = [0xD2800100, 0xF2B08000, 0xD4000002]  # mov x0,#8; movk x0,#0x8400,lsl#16; hvc #0
SCRATCH = "scratch@0x0a000000,size=0x1000,name=scratch0"
DEVICES = ["--device", SCRATCH, "--device", "pl011@0x09000000,name=uart0"]

TRACE_A64 = a64(
    0xD2A14000,  # +0x00 mov x0, #0x0a000000 (scratch0)
    0x52801001,  # +0x04 mov w1, #0x80
    0x39000001,  # +0x08 strb w1, [x0]
    0x39C00002,  # +0x0c ldrsb w2, [x0]
    0x39800003,  # +0x10 ldrsb x3, [x0]
    0xD2800065,  # +0x14 mov x5, #3
    0xB8404401,  # +0x18 1: ldr w1, [x0], #4   (post-index writeback, ISV=0)
    0xF10004A5,  # +0x1c subs x5, x5, #1
    0x54FFFFC1,  # +0x20 b.ne 1b
    *SYSTEM_OFF, 0x14000000,
)
WRITEBACK_PC = LOAD + 0x18

TRACE_T32 = struct.pack(
    "<18H",
    0xF240, 0x0000,  # +0x00 movw r0, #0
    0xF6C0, 0x2000,  # +0x04 movt r0, #0x0a00 (scratch0)
    0x2180,  # +0x08 movs r1, #0x80
    0x7001,  # +0x0a strb r1, [r0]
    0x6802,  # +0x0c ldr r2, [r0]
    0x2300,  # +0x0e movs r3, #0
    0x56C4,  # +0x10 ldrsb r4, [r0, r3]
    0xF850, 0x5B04,  # +0x12 ldr.w r5, [r0], #4   (post-index writeback, ISV=0)
    0xF240, 0x0008,  # +0x16 movw r0, #8
    0xF2C8, 0x4000,  # +0x1a movt r0, #0x8400
    0xF7E0, 0x8000,  # +0x1e hvc #0 (PSCI SYSTEM_OFF)
    0xE7FE,  # +0x22 b .
)

LDP_A64 = a64(
    0xD2A14000,  # +0x00 mov x0, #0x0a000000
    0xB8404401,  # +0x04 ldr w1, [x0], #4   (writeback: decoded by mmiosplit unless --strict-kvm)
    0x29400801,  # +0x08 ldp w1, w2, [x0]   (pair: no syndrome, split into two exits unless --strict-kvm)
    0xD2A00609,  # +0x0c mov x9, #0x300000
    0xD5181049,  # +0x10 msr cpacr_el1, x9  (FPEN)
    0xD5033FDF,  # +0x14 isb
    0x4C407000,  # +0x18 ld1 {v0.16b}, [x0] (multiple structures: no syndrome, refused)
    0x14000000,  # +0x1c b .
)


def mmiosplit_run(tmp_path: Path, image: bytes, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "guest.bin"
    path.write_bytes(image)
    return subprocess.run([sys.executable, "-m", "mmiosplit_cli", "run", str(path), *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def trace_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#")]


def report_rows(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("KVM report:"))
    return [line for line in lines[start + 2:] if line.startswith("0x")]


def test_trace_shows_each_exit_on_stderr_and_as_json_lines(tmp_path: Path) -> None:
    jsonl = tmp_path / "trace.jsonl"
    proc = mmiosplit_run(tmp_path, TRACE_A64, *DEVICES, "--trace-exits", "--trace-json", str(jsonl))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # stdout is the guest console only
    lines = trace_lines(proc.stderr)
    assert len(lines) == 6, proc.stderr
    strb, ldrsb_w, ldrsb_x, *post = lines
    assert strb.startswith("#1 vcpu0 pc=0x40080008 A64 39000001 strb w1, [x0]")
    assert "W 1 @0x0a000000 scratch0 <- 0x80 rt=w1" in strb
    assert "ldrsb w2, [x0]" in ldrsb_w and "R 1 @0x0a000000 scratch0 -> 0xffffff80 rt=w2 sign-ext" in ldrsb_w
    assert "ldrsb x3, [x0]" in ldrsb_x and "-> 0xffffffffffffff80 rt=x3 sign-ext" in ldrsb_x
    for n, line in enumerate(post):
        assert f"#{4 + n} vcpu0 pc=0x{WRITEBACK_PC:08x} A64 b8404401 ldr w1, [x0], #4" in line
        assert f"R 4 @0x{0x0A00_0000 + 4 * n:08x} scratch0 -> " in line and "rt=w1 zero-ext wb=post ISV=0" in line
    assert "-> 0x00000080" in post[0]  # the byte stored by strb, read back as a word
    assert all(line.endswith(" us)") for line in lines)

    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert set(vcpu_pb2.ExitTrace.DESCRIPTOR.fields_by_name) | {"disasm"} <= set(records[0])
    assert records[0] | {"latency_us": 0, "syndrome": 0} == {
        "seq": 1, "vcpu_id": 0, "pc": LOAD + 8, "isa": "A64", "instruction": 0x39000001, "instruction_length": 4,
        "address": 0x0A00_0000, "size": 1, "is_write": True, "rt": 1, "sign_extend": False, "sixty_four": False,
        "writeback": "", "value": 0x80, "device": "scratch0", "outcome": "ok", "latency_us": 0, "syndrome": 0,
        "instruction_hex": "39000001", "disasm": "strb w1, [x0]", "register": "w1",
    }
    assert records[0]["syndrome"] & (1 << 24) and records[0]["latency_us"] > 0  # ISV=1
    assert records[2]["sign_extend"] and records[2]["sixty_four"] and records[2]["value"] == 2**64 - 0x80
    wb = records[3]
    assert (wb["pc"], wb["instruction"], wb["writeback"], wb["disasm"]) == (
        WRITEBACK_PC, 0xB8404401, "post", "ldr w1, [x0], #4")
    assert not wb["syndrome"] & (1 << 24)  # what KVM would see: no instruction syndrome
    assert [r["address"] for r in records[3:]] == [0x0A00_0000, 0x0A00_0004, 0x0A00_0008]


def test_thumb_trace_goes_to_the_trace_file(tmp_path: Path) -> None:
    trace = tmp_path / "trace.txt"
    proc = mmiosplit_run(tmp_path, TRACE_T32, *DEVICES, "--arch", "arm", "--entry", f"0x{LOAD | 1:x}",
                         "--trace-file", str(trace))
    assert proc.returncode == 0, proc.stderr
    assert trace_lines(proc.stderr) == []
    strb, ldr, ldrsb, post = trace_lines(trace.read_text())
    assert strb.startswith("#1 vcpu0 pc=0x4008000a T32 7001      strb r1, [r0]")
    assert "W 1 @0x0a000000 scratch0 <- 0x80 rt=r1" in strb
    assert ldr.startswith("#2 vcpu0 pc=0x4008000c T32 6802      ldr r2, [r0]")
    assert "R 4 @0x0a000000 scratch0 -> 0x00000080 rt=r2 zero-ext" in ldr
    assert "T32 56c4      ldrsb r4, [r0, r3]" in ldrsb
    assert "R 1 @0x0a000000 scratch0 -> 0xffffff80 rt=r4 sign-ext" in ldrsb
    assert "pc=0x40080012 T32 f850 5b04 ldr r5, [r0], #4" in post and "rt=r5 zero-ext wb=post ISV=0" in post


def test_kvm_report_counts_the_hand_decoded_writeback(tmp_path: Path) -> None:
    report = tmp_path / "kvm.json"
    proc = mmiosplit_run(tmp_path, TRACE_A64, *DEVICES, "--kvm-report", "--kvm-report-json", str(report))
    assert proc.returncode == 0, proc.stderr
    assert "KVM report: 1 PC (3 accesses) that upstream KVM/ARM cannot handle" in proc.stderr
    (row,) = report_rows(proc.stderr)
    assert row.split()[:7] == [f"0x{WRITEBACK_PC:08x}", "A64", "b8404401", "ldr", "w1,", "[x0],", "#4"]
    assert " 3  load/store with base writeback (ISV=0)" in row and row.endswith("decoded by mmiosplit")
    assert json.loads(report.read_text()) == [{
        "pc": WRITEBACK_PC, "isa": "A64", "instruction": 0xB8404401, "instruction_hex": "b8404401",
        "disasm": "ldr w1, [x0], #4", "count": 3, "reason": "load/store with base writeback (ISV=0)",
        "handled": True, "status": "decoded by mmiosplit",
    }]


def test_kvm_report_lists_a_split_pair_and_a_refused_ld1(tmp_path: Path) -> None:
    proc = mmiosplit_run(tmp_path, LDP_A64, *DEVICES, "--kvm-report", "--on-nisv", "stop")
    assert proc.returncode == 1, proc.stderr
    assert "NISV" in proc.stderr and "0x4c407000" in proc.stderr
    assert "KVM report: 3 PCs (3 accesses)" in proc.stderr
    rows = {row.split()[0]: row for row in report_rows(proc.stderr)}
    assert rows[f"0x{LOAD + 4:08x}"].endswith("decoded by mmiosplit")
    ldp = rows[f"0x{LOAD + 8:08x}"]
    assert "29400801     ldp w1, w2, [x0]" in ldp and " 1  load/store pair" in ldp
    assert ldp.endswith("decoded by mmiosplit")
    ld1 = rows[f"0x{LOAD + 0x18:08x}"]
    assert "4c407000" in ld1 and "SIMD" in ld1 and ld1.endswith("refused")


def test_kvm_report_lists_a_pair_refused_in_strict_kvm_mode(tmp_path: Path) -> None:
    pair = a64(0xD2A14000, 0xA9400801, 0x14000000)  # mov x0, #0x0a000000; ldp x1, x2, [x0]; b .
    proc = mmiosplit_run(tmp_path, pair, *DEVICES, "--kvm-report", "--on-nisv", "stop", "--strict-kvm")
    assert proc.returncode == 1, proc.stderr
    assert "NISV" in proc.stderr and "0xa9400801" in proc.stderr
    (ldp,) = report_rows(proc.stderr)
    assert ldp.startswith(f"0x{LOAD + 4:08x}")
    assert "a9400801     ldp x1, x2, [x0]" in ldp and " 1  load/store pair" in ldp and ldp.endswith("refused")


def test_strict_kvm_refuses_the_writeback_form(tmp_path: Path) -> None:
    proc = mmiosplit_run(tmp_path, TRACE_A64, *DEVICES, "--strict-kvm", "--on-nisv", "stop", "--kvm-report",
                         "--trace-exits")
    assert proc.returncode == 1, proc.stderr
    assert f"at pc 0x{WRITEBACK_PC:x}" in proc.stderr and "refused in strict KVM mode" in proc.stderr
    assert len(trace_lines(proc.stderr)) == 3  # strb and the two ldrsb; the writeback form never completed
    (row,) = report_rows(proc.stderr)
    assert "b8404401" in row and " 1  " in row and row.endswith("refused")


def test_no_kvm_report_entries_for_syndrome_loads(unix_services: Services, tmp_path: Path) -> None:
    proc = mmiosplit_run(tmp_path, a64(0xD2A14000, 0xB9400001, *SYSTEM_OFF), "--kvm-report",
                         "--vcpu-service", unix_services.vcpu, "--device-service", unix_services.devices)
    assert proc.returncode == 0, proc.stderr
    assert "every device access had an instruction syndrome (ISV=1)" in proc.stderr


# ----- the policy flags ---------------------------------------------------------------------------------------
UNMAPPED_LOAD = [0xD2A40000, 0xB9400001]  # mov x0, #0x20000000 (nothing there); ldr w1, [x0]
# FPEN; mov x0, #0x0a000000; ld1 {v0.16b}, [x0] (no syndrome, and not split: multiple structures)
NISV_LOAD = [0xD2A00609, 0xD5181049, 0xD5033FDF, 0xD2A14000, 0x4C407000]
# The PL011 refuses a byte read inside its data register (an unaligned access would now be an alignment fault).
REFUSED = [0xD2A12000, 0x39400401]  # mov x0, #0x09000000; ldrb w1, [x0, #1]
SEA = "synchronous external abort injected"


@pytest.mark.parametrize(
    ("flags", "body", "status", "needle"),
    [
        (["--unmapped", "stop"], UNMAPPED_LOAD, 1, "no device or RAM at that address"),
        (["--unmapped", "abort"], UNMAPPED_LOAD, 0, SEA),
        (["--on-nisv", "stop"], NISV_LOAD, 1, "NISV"),
        (["--on-nisv", "abort"], NISV_LOAD, 0, SEA),
        (["--on-device-error", "stop"], REFUSED, 1, "uart0 refused the 1-byte read"),
        (["--on-device-error", "abort"], REFUSED, 0, SEA),
    ],
)
def test_policy_flags_reach_the_vm(unix_services: Services, tmp_path: Path, flags: list[str], body: list[int],
                                   status: int, needle: str) -> None:
    # With an abort the guest's vector powers off (status 0); with a stop the run ends in an error (status 1).
    proc = mmiosplit_run(tmp_path, a64_with_vectors(*body), *flags, "--events", "--timeout", "30",
                         "--vcpu-service", unix_services.vcpu, "--device-service", unix_services.devices)
    assert proc.returncode == status, proc.stderr
    assert needle in proc.stderr
    assert (SEA in proc.stderr) == (status == 0)


@pytest.mark.parametrize(("policy", "status", "needle"), [("stop", 1, "no completion"), ("abort", 0, SEA)])
def test_deadline_flag_reaches_the_vm(unix_services: Services, tmp_path: Path, policy: str, status: int,
                                      needle: str) -> None:
    rogue = RogueServer("hang", tmp_path)
    try:
        proc = mmiosplit_run(tmp_path, a64_with_vectors(0xD2A14000, 0xB9400001), "--on-deadline", policy,
                             "--deadline-ms", "300", "--events", "--timeout", "30",
                             "--vcpu-service", unix_services.vcpu, "--device-service", rogue.address)
    finally:
        rogue.stop()
    assert proc.returncode == status, proc.stderr
    assert needle in proc.stderr


def test_build_config_maps_every_flag() -> None:
    args = build_parser().parse_args(["run", "x.bin", "--unmapped", "abort", "--on-nisv", "stop",
                                      "--on-device-error", "stop", "--on-deadline", "stop", "--strict-kvm",
                                      "--trace-json", "t.jsonl"])
    cfg = build_config(args, b"\0" * 4, "x.bin", [])
    assert isinstance(cfg, vcpu_pb2.VmConfig)
    assert cfg.policies == vcpu_pb2.Policies(
        unmapped_access=vcpu_pb2.UNMAPPED_ACCESS_POLICY_ABORT, nisv=vcpu_pb2.FAULT_POLICY_STOP,
        device_error=vcpu_pb2.FAULT_POLICY_STOP, deadline=vcpu_pb2.FAULT_POLICY_STOP)
    assert cfg.strict_kvm and cfg.trace_exits
    default = build_config(build_parser().parse_args(["run", "x.bin"]), b"\0" * 4, "x.bin", [])
    assert isinstance(default, vcpu_pb2.VmConfig)
    assert default.policies.unmapped_access == vcpu_pb2.UNMAPPED_ACCESS_POLICY_RAZ_WI
    assert default.policies.nisv == vcpu_pb2.FAULT_POLICY_ABORT
    assert not default.strict_kvm and not default.trace_exits
    assert default.policies.device_restart == vcpu_pb2.DEVICE_RESTART_POLICY_UNSPECIFIED  # fail
    more = build_config(build_parser().parse_args(["run", "x.bin", "--on-device-restart", "continue",
                                                   "--region-deadline", "flash0=2000",
                                                   "--region-deadline", "uart0/regs=50"]), b"\0" * 4, "x.bin", [])
    assert isinstance(more, vcpu_pb2.VmConfig)
    assert more.policies.device_restart == vcpu_pb2.DEVICE_RESTART_POLICY_CONTINUE
    assert [(d.device, d.region, d.deadline_ms) for d in more.region_deadlines] == [("flash0", "", 2000),
                                                                                     ("uart0", "regs", 50)]


# ----- run_vm with a trace callback -------------------------------------------------------------------------------
def test_run_vm_feeds_the_trace_callback_in_order(unix_services: Services) -> None:
    code = a64(
        0xD2A14200,  # mov x0, #0x0a100000 (posted0)
        0x52800021, 0xB9000001,  # mov w1, #1; str w1, [x0]   (posted)
        0xB9400002,  # ldr w2, [x0]
        *SYSTEM_OFF,
    )
    cfg = unix_services.config(code)
    seen: list[vcpu_pb2.ExitTrace] = []
    printed: list[str] = []

    class Lines:
        def write(self, text: str) -> None:
            printed.append(text)

        def flush(self) -> None:
            pass

    printer = TracePrinter(Lines())  # type: ignore[arg-type]

    def on_trace(e: vcpu_pb2.ExitTrace) -> None:
        seen.append(e)
        printer(e)

    result = run_vm(unix_services.vcpu, cfg, on_trace=on_trace)
    assert result.final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF
    assert not cfg.trace_exits  # the caller's config is left as it was
    assert result.traced == 2 and result.trace_error == ""
    assert [(e.seq, e.is_write, e.outcome, e.device) for e in seen] == [
        (1, True, "posted", "posted0"), (2, False, "ok", "posted0")]
    assert seen[1].value == 1
    assert "[posted]" in printed[0] and "ldr w2, [x0]" in printed[1] and "-> 0x00000001 rt=w2" in printed[1]
    assert list(result.stats.kvm_report) == []
