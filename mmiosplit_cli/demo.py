"""``mmiosplit demo``: the three bundled guests through the split, with exit latency per run."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from mmiosplit.v1 import common_pb2, vcpu_pb2
from mmiosplit.wire import event_kind_name as kind_name
from mmiosplit_cli.launcher import LaunchError, local_services
from mmiosplit_cli.runner import RunError, format_latency, run_vm

GUEST_DIR = Path(__file__).resolve().parent.parent / "guests" / "bin"
DEMO_DEVICES = ["pl011@0x09000000", "pl031@0x09010000", "scratch@0x0a000000,size=0x1000"]
RAM_BASE = 0x4000_0000
LOAD = 0x4008_0000


@dataclass(frozen=True)
class Guest:
    """A bundled guest binary and how to start it."""

    name: str
    file: str
    architecture: common_pb2.Architecture.ValueType
    cpu_model: str
    entry: int

    def config(self, device_service: str, vcpus: int) -> vcpu_pb2.VmConfig:
        path = GUEST_DIR / self.file
        return vcpu_pb2.VmConfig(
            name=self.name, architecture=self.architecture, cpu_model=self.cpu_model, vcpu_count=vcpus,
            ram=[vcpu_pb2.MemoryRegion(base=RAM_BASE, size=128 * 2**20)], device_services=[device_service],
            images=[vcpu_pb2.Image(name=self.file, data=path.read_bytes(), load_address=LOAD)],
            entry_point=self.entry, limits=vcpu_pb2.RunLimits(wall_clock_seconds=120),
        )


GUESTS = [
    Guest("a64", "hello-a64.bin", common_pb2.ARCHITECTURE_AARCH64, "cortex-a57", LOAD),
    Guest("a32", "hello-a32.bin", common_pb2.ARCHITECTURE_ARM, "cortex-a15", LOAD),
    Guest("t32", "hello-t32.bin", common_pb2.ARCHITECTURE_ARM, "cortex-a15", LOAD | 1),
]


def run_demo(vcpus: int = 2, cpu: int | None = 0, transport: str = "unix") -> int:
    """Start both services as subprocesses, run each guest, print its console and a latency line."""
    missing = [g.file for g in GUESTS if not (GUEST_DIR / g.file).exists()]
    if missing:
        print(f"mmiosplit demo: guest binaries {missing} not found in {GUEST_DIR}; run guests/build.sh "
              "from a source checkout", file=sys.stderr)
        return 2
    placement = f"both services pinned to CPU {cpu}" if cpu is not None else "services not pinned"
    print(f"mmiosplit demo: vcpu service and device service as separate processes over {transport} "
          f"sockets, {placement}, {vcpus} vCPUs per guest\n", flush=True)
    status = 0
    lines = []
    try:
        device_args = [a for d in DEMO_DEVICES for a in ("--device", d)]
        with local_services(device_args, cpu=cpu, transport=transport) as (vaddr, daddr, _):
            assert vaddr is not None and daddr is not None
            for guest in GUESTS:
                print(f"--- {guest.name}: {guest.file} ---", flush=True)

                def out(data: bytes) -> None:
                    sys.stdout.buffer.write(data)
                    sys.stdout.buffer.flush()

                result = run_vm(vaddr, guest.config(daddr, vcpus), console_out=out)
                ok = result.final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF
                status |= 0 if ok else 1
                line = (f"{guest.name}: {kind_name(result.final.kind)}, {format_latency(result.stats)} "
                        f"(exit round trip on the vCPU, {placement})")
                if not ok:
                    line += f" -- {result.final.reason}"
                print(line + "\n", flush=True)
                lines.append(line)
    except (LaunchError, RunError) as exc:
        print(f"mmiosplit demo: {exc}", file=sys.stderr)
        return 2
    print("summary:")
    for line in lines:
        print("  " + line)
    return status
