"""Record a guest's exchanges with its device service (``run --record``), replay them against a live device service
(``replay --device-service``: 0 divergences, or the first one, where it is), serve them as a device double
(``replay --serve``), and refuse a damaged recording with the file and offset."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmiosplit.v1 import device_pb2
from mmiosplit_cli.recording.format import (
    FROM_SERVICE,
    TO_SERVICE,
    RecordedService,
    Recorder,
    RecordingError,
    iter_messages,
    read_recording,
)
from tests.record.changed_pl011 import CHANGED_CR
from tests.record.helpers import DEFAULT_DEVICES, GUESTS, device_double, device_service, mmiosplit, started

pytestmark = pytest.mark.integration

HELLO = GUESTS / "bin" / "hello-a64.bin"
EXPECTED = (GUESTS / "expected" / "hello-a64-1cpu.txt").read_text()
UART = 0x0900_0000


def _record(path: Path, *extra: str) -> Path:
    proc = mmiosplit("run", str(HELLO), "--record", str(path), *extra)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == EXPECTED  # recording changes nothing the guest sees
    assert re.search(rf"recorded \d+ records \(\d+ bytes\) to {re.escape(str(path))}", proc.stderr)
    return path


@pytest.fixture(scope="module")
def hello_recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _record(tmp_path_factory.mktemp("record") / "hello.rec")


@pytest.fixture(scope="module")
def hello_recording_no_shadows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every device read exits (FR polls included), so a changed FR shows in a completion."""
    return _record(tmp_path_factory.mktemp("record") / "hello-no-shadows.rec", "--no-shadows")


def test_the_recording_holds_every_exchange_in_order(hello_recording: Path) -> None:
    recording = read_recording(hello_recording)
    assert [s.describe.service_name for s in recording.services] == ["mmiosplit-devices"]
    assert {d.type for d in recording.services[0].describe.devices} == {"pl011", "pl031", "scratch"}
    methods = {s.method for s in recording.streams.values()}
    assert {"Describe", "ExitStream", "Watch", "Console"} <= methods
    exits = completions = 0
    seqs: list[int] = []
    for record, stream, message in iter_messages(recording):
        if stream.method != "ExitStream":
            continue
        if record.direction == TO_SERVICE and message.HasField("exit"):  # type: ignore[attr-defined]
            exits += 1
            seqs.append(message.seq)  # type: ignore[attr-defined]
        elif record.direction == FROM_SERVICE and message.HasField("completion"):  # type: ignore[attr-defined]
            completions += 1
    assert exits == completions > 6000
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # one session, in order
    console = b"".join(m.output for r, s, m in iter_messages(recording)  # type: ignore[attr-defined]
                       if s.method == "Console" and r.direction == FROM_SERVICE)
    assert console.decode() == EXPECTED


def test_replay_against_the_same_model_finds_no_divergence(hello_recording: Path, tmp_path: Path) -> None:
    with device_service(tmp_path, DEFAULT_DEVICES) as address:
        proc = mmiosplit("replay", str(hello_recording), "--device-service", address)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.fullmatch(r"0 divergences, (\d+) exchanges \(\d+ records, [\d.]+ s\)\n", proc.stdout)
    assert found, proc.stdout
    assert int(found.group(1)) > 6000


def test_a_changed_reset_value_diverges_at_that_register(hello_recording: Path, tmp_path: Path) -> None:
    """UARTCR resets to 0x301: the first place that shows is the initial shadow values on the Watch stream."""
    with device_service(tmp_path, DEFAULT_DEVICES, changed="cr") as address:
        proc = mmiosplit("replay", str(hello_recording), "--device-service", address)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"device:   pl011-0 at 0x{UART + 0x30:x}" in proc.stdout, proc.stdout
    assert "Watch of VM" in proc.stdout and "watch event" in proc.stdout
    assert "expected: shadow register pl011-0/regs+0x30 = 0x00000300" in proc.stdout
    assert f"got:      shadow register pl011-0/regs+0x30 = 0x{CHANGED_CR:08x}" in proc.stdout
    assert "1 divergence" in proc.stderr


def test_a_changed_register_diverges_at_the_first_read_of_it(hello_recording_no_shadows: Path,
                                                             tmp_path: Path) -> None:
    """UARTFR reads with BUSY set: the divergence is the first FR read, with its seq, device and address."""
    recording = read_recording(hello_recording_no_shadows)
    first_fr = next(m for r, s, m in iter_messages(recording) if s.method == "ExitStream"
                    and r.direction == TO_SERVICE and m.HasField("exit")  # type: ignore[attr-defined]
                    and m.exit.address == UART + 0x18)  # type: ignore[attr-defined]
    assert isinstance(first_fr, device_pb2.ExitStreamRequest)
    with device_service(tmp_path, DEFAULT_DEVICES, changed="fr", extra=["--no-shadows"]) as address:
        proc = mmiosplit("replay", str(hello_recording_no_shadows), "--device-service", address)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"  seq:      {first_fr.seq}\n" in proc.stdout, proc.stdout
    assert f"device:   pl011-0 at 0x{UART + 0x18:x}" in proc.stdout
    assert "4-byte read at pl011-0/regs+0x18" in proc.stdout
    assert "expected: OK, data 0x00000090" in proc.stdout  # TXFE | RXFE
    assert "got:      OK, data 0x00000098" in proc.stdout  # and BUSY


def test_a_guest_runs_against_the_device_double(hello_recording: Path, tmp_path: Path) -> None:
    with device_double(tmp_path, hello_recording) as (address, proc, log):
        run = mmiosplit("run", str(HELLO), "--device-service", address)
    assert run.returncode == 0, run.stderr
    assert run.stdout == EXPECTED
    assert proc.returncode == 0, log.read_text()
    assert re.search(r"0 divergences, \d+ requests matched, (\d+) of \1 recorded messages served", log.read_text())


def test_the_double_fails_loudly_when_the_guest_diverges(hello_recording: Path, tmp_path: Path) -> None:
    """Another guest: its first access is not the recorded one; it completes with an error naming both."""
    other = tmp_path / "other.bin"
    # movz x0, #0x0900, lsl #16; movz w1, #'X'; str w1, [x0]; b .
    other.write_bytes(bytes.fromhex("0020a1d2 010b8052 010000b9 00000014"))
    with device_double(tmp_path, hello_recording) as (address, proc, log):
        run = mmiosplit("run", str(other), "--device-service", address, "--on-device-error", "stop",
                        "--timeout", "60")
    assert run.returncode == 1, run.stderr
    assert "replay double: the guest diverged from the recording" in run.stderr
    assert "expected" in run.stderr and "got" in run.stderr
    assert proc.returncode == 1
    text = log.read_text()
    assert "1 divergence" in text and "data: \"X\\000\\000\\000\"" in text


def _copy(source: Path, target: Path, size: int | None = None, flip: int | None = None) -> Path:
    data = bytearray(source.read_bytes()[:size])
    if flip is not None:
        data[flip] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def test_a_truncated_or_corrupt_recording_is_refused_with_file_and_offset(hello_recording: Path,
                                                                          tmp_path: Path) -> None:
    size = hello_recording.stat().st_size
    cut = _copy(hello_recording, tmp_path / "cut.rec", size=size // 2)
    with pytest.raises(RecordingError, match=rf"^{re.escape(str(cut))}: offset \d+ \(0x[0-9a-f]+\): truncated"):
        read_recording(cut)
    proc = mmiosplit("replay", str(cut), "--device-service", "unix:/nonexistent.sock")
    assert proc.returncode == 2
    assert re.search(rf"{re.escape(str(cut))}: offset \d+ .*truncated", proc.stderr), proc.stderr
    partial = read_recording(cut, partial=True)  # what a recorder that died had written, up to the damage
    assert "truncated" in partial.error and 0 < len(partial.records) < len(read_recording(hello_recording).records)
    listed = mmiosplit("replay", str(cut), "--list")
    assert listed.returncode == 1 and "truncated" in listed.stderr
    assert len(listed.stdout.splitlines()) == 2 + len(partial.records)
    flipped = _copy(hello_recording, tmp_path / "flipped.rec", flip=size // 2)
    with pytest.raises(RecordingError, match=rf"^{re.escape(str(flipped))}: offset \d+ .*corrupt"):
        read_recording(flipped)
    header = _copy(hello_recording, tmp_path / "header.rec", flip=20)
    with pytest.raises(RecordingError, match=r"offset 0 \(0x0\): corrupt: the header checksum"):
        read_recording(header)
    not_one = tmp_path / "not.rec"
    not_one.write_bytes(b"hello, world\n")
    with pytest.raises(RecordingError, match=r"not.rec: offset 0 \(0x0\): not an mmiosplit recording"):
        read_recording(not_one)


def _small_recording(path: Path) -> Iterator[int]:
    recorder = Recorder(path, [RecordedService("unix:x", device_pb2.DescribeResponse(service_name="x"))], 1)
    stream = recorder.open_stream(0, "ExitStream")
    recorder.message(stream, TO_SERVICE, device_pb2.ExitStreamRequest(seq=0).SerializeToString())
    recorder.close()
    yield recorder.size


def test_every_cut_of_a_recording_is_refused(tmp_path: Path) -> None:
    """Cut anywhere, a recording never reads as a shorter valid one: it has an end record."""
    whole = tmp_path / "whole.rec"
    size = next(_small_recording(whole))
    assert read_recording(whole).records
    for n in range(size):
        with pytest.raises(RecordingError, match=r"offset \d+"):
            read_recording(_copy(whole, tmp_path / "cut.rec", size=n))


def _dma_guest(path: Path, word: int = 0x1122_3344) -> Path:
    """Puts a word in RAM, has dma-probe copy it into its buffer and back to RAM elsewhere (DMA inside two register
    writes), and writes what arrived back into the buffer, so the recording shows the DMA landed."""
    from tests.integration.client import RAM_BASE, a64
    from tests.integration.test_irq_dma import OFF, PROBE, ldr_w, mov32, movz, str_w

    src, dst = RAM_BASE + 0x30_0000, RAM_BASE + 0x30_0800
    path.write_bytes(a64(
        *mov32(1, src), *mov32(2, word), str_w(2, 1, 0), *mov32(3, PROBE),
        str_w(1, 3, 0x0), movz(4, 0), str_w(4, 3, 0x4), movz(4, 16), str_w(4, 3, 0x8),
        movz(4, 1), str_w(4, 3, 0xC),  # guest memory -> buffer
        ldr_w(5, 3, 0x100),
        *mov32(6, dst), str_w(6, 3, 0x0), movz(4, 2), str_w(4, 3, 0xC),  # buffer -> guest memory
        ldr_w(7, 6, 0), str_w(7, 3, 0x104), *OFF))
    return path


DMA_DEVICES = ["pl011@0x09000000", "dma-probe@0x0a200000,name=dma0"]


def test_dma_on_the_watch_stream_is_recorded_replayed_and_served(tmp_path: Path) -> None:
    guest = _dma_guest(tmp_path / "dma.bin")
    recording = tmp_path / "dma.rec"
    window = "ram:0x40000000:16M"
    proc = mmiosplit("run", str(guest), "--record", str(recording), "--dma-window", f"embedded={window}",
                     *[a for d in DMA_DEVICES for a in ("--device", d)])
    assert proc.returncode == 0, proc.stderr
    loaded = read_recording(recording)
    dma = [m.dma for r, s, m in iter_messages(loaded) if s.method == "Watch"  # type: ignore[attr-defined]
           and r.direction == FROM_SERVICE and m.HasField("dma")]  # type: ignore[attr-defined]
    results = [m.dma_result for r, s, m in iter_messages(loaded) if s.method == "Watch"  # type: ignore[attr-defined]
               and r.direction == TO_SERVICE and m.HasField("dma_result")]  # type: ignore[attr-defined]
    assert [d.direction for d in dma] == [device_pb2.DMA_DIRECTION_READ, device_pb2.DMA_DIRECTION_WRITE]
    assert [r.id for r in results] == [d.id for d in dma] and not any(r.error for r in results)
    assert results[0].data[:4] == (0x1122_3344).to_bytes(4, "little")
    last_write = [m.exit for r, s, m in iter_messages(loaded) if s.method == "ExitStream"  # type: ignore[attr-defined]
                  and r.direction == TO_SERVICE and m.HasField("exit")][-1]  # type: ignore[attr-defined]
    assert (last_write.region_offset, last_write.data) == (0x104, (0x1122_3344).to_bytes(4, "little"))
    with device_service(tmp_path, DMA_DEVICES) as address:
        replay = mmiosplit("replay", str(recording), "--device-service", address)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert replay.stdout.startswith("0 divergences")
    with device_double(tmp_path, recording) as (address, double, log):
        run = mmiosplit("run", str(guest), "--device-service", address, "--dma-window", f"{address}={window}")
    assert run.returncode == 0, run.stderr
    assert double.returncode == 0, log.read_text()
    # Another word in RAM: the DMA read's answer differs from the recorded one, and the write waiting for it fails.
    other = _dma_guest(tmp_path / "other.bin", 0x5566_7788)
    with device_double(tmp_path, recording, name="double2") as (address, double, log):
        run = mmiosplit("run", str(other), "--device-service", address, "--dma-window", f"{address}={window}",
                        "--on-device-error", "stop")
    assert run.returncode == 1, run.stderr
    assert "replay double: the guest diverged" in run.stderr and "Watch" in run.stderr, run.stderr
    assert double.returncode == 1, log.read_text()


def test_resumed_sessions_pass_through_the_recorder_and_replay(tmp_path: Path) -> None:
    """Connections between the recorder and the device service reset every 30 ms: the vcpu service resumes its
    session through the proxy (every byte lands once), the recording holds the broken and resumed streams, and
    the replay (sending a request the broken stream left unanswered only where it was sent again) finds none."""
    import threading

    from mmiosplit.v1 import vcpu_pb2, vcpu_pb2_grpc
    from mmiosplit_cli.launcher import free_tcp_port, local_services
    from mmiosplit_cli.recording.proxy import RecordingProxy
    from mmiosplit_cli.runner import channel
    from tests.chaos.campaign import DeviceProcess, countdown, run_countdown
    from tests.chaos.proxy import ChaosProxy

    port, log, n = free_tcp_port(), tmp_path / "uart.log", 600
    recording = tmp_path / "resume.rec"
    devices = DeviceProcess(port, log)
    stop = threading.Event()
    try:
        with ChaosProxy(f"127.0.0.1:{port}") as chaos, local_services(None, transport="tcp") as (vaddr, _, _h):
            recorder = RecordingProxy(recording, [chaos.address])
            try:
                def cut() -> None:
                    while not stop.wait(0.03):
                        chaos.cut()

                cutter = threading.Thread(target=cut, daemon=True)
                assert vaddr
                with channel(vaddr) as ch:
                    final, _, _ = run_countdown(vcpu_pb2_grpc.VcpuServiceStub(ch), recorder.addresses[chaos.address],
                                                n, deadline_ms=5000, during=cutter.start)
                stop.set()
                cutter.join()
            finally:
                recorder.close()
    finally:
        stop.set()
        devices.kill()
    assert final.kind == vcpu_pb2.VM_EVENT_KIND_POWERED_OFF, final
    assert log.read_bytes() == countdown(n)
    loaded = read_recording(recording)
    hellos = [m.hello for r, s, m in iter_messages(loaded) if s.method == "ExitStream"  # type: ignore[attr-defined]
              and r.direction == TO_SERVICE and m.HasField("hello")]  # type: ignore[attr-defined]
    assert len(hellos) >= 3 and len({h.session_id for h in hellos}) == 1, len(hellos)  # one session, resumed
    port2, log2 = free_tcp_port(), tmp_path / "uart2.log"
    again = DeviceProcess(port2, log2)
    try:
        proc = mmiosplit("replay", str(recording), "--device-service", f"127.0.0.1:{port2}")
    finally:
        again.kill()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert log2.read_bytes() == countdown(n)  # the replay, too, applied every write once


def test_recording_with_a_token_and_a_vcpu_service_reached_over_tcp(tmp_path: Path) -> None:
    """The proxy serves and connects with the process's credentials (a token here, never recorded); a vcpu service
    reached over TCP needs --record-listen, an address it can reach."""
    from mmiosplit_cli.launcher import local_services

    token = tmp_path / "token"
    token.write_text("a-token-nobody-guesses\n")
    secret = ["--token-file", str(token)]
    recording = tmp_path / "tcp.rec"
    with local_services(None, transport="tcp") as (vaddr, _, _handle):
        assert vaddr
        refused = mmiosplit("run", str(HELLO), "--vcpu-service", vaddr, "--record", str(recording))
        assert refused.returncode == 2
        assert "--record-listen" in refused.stderr
        proc = mmiosplit("run", str(HELLO), "--vcpu-service", vaddr, "--record", str(recording),
                         "--record-listen", "127.0.0.1")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == EXPECTED
    tokened = tmp_path / "token.rec"
    proc = mmiosplit("run", str(HELLO), "--record", str(tokened), *secret)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == EXPECTED
    assert b"a-token-nobody-guesses" not in tokened.read_bytes()
    with device_service(tmp_path, DEFAULT_DEVICES) as address:
        assert mmiosplit("replay", str(recording), "--device-service", address).returncode == 0


def test_list_prints_one_line_per_record(hello_recording: Path) -> None:
    proc = mmiosplit("replay", str(hello_recording), "--list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    recording = read_recording(hello_recording)
    assert len(lines) == 2 + len(recording.records)
    assert lines[1].startswith("service 0: mmiosplit-devices at unix:")
    written = r"ExitStream -> seq \d+ 4-byte write of 0x00000068 at pl011-0/regs\+0x0$"
    assert any(re.search(written, line) for line in lines)
    assert any(re.search(r"ExitStream <- seq \d+ OK$", line) for line in lines)


def test_two_device_services_are_recorded_replayed_and_served_by_name(tmp_path: Path) -> None:
    uarts, mem = DEFAULT_DEVICES[:2], DEFAULT_DEVICES[2:]
    recording = tmp_path / "two.rec"
    with device_service(tmp_path, uarts, name="uarts", extra=["--name", "uarts"]) as a, \
            device_service(tmp_path, mem, name="mem", extra=["--name", "mem"]) as b:
        proc = mmiosplit("run", str(HELLO), "--device-service", a, "--device-service", b, "--record", str(recording))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == EXPECTED
    assert [s.describe.service_name for s in read_recording(recording).services] == ["uarts", "mem"]
    unnamed = mmiosplit("replay", str(recording), "--device-service", "unix:/nowhere.sock")
    assert unnamed.returncode == 2 and "name each: NAME=ADDR" in unnamed.stderr
    with device_service(tmp_path, uarts, name="uarts2") as a, device_service(tmp_path, mem, name="mem2") as b:
        proc = mmiosplit("replay", str(recording), "--device-service", f"uarts={a}", "--device-service", f"1={b}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    da, db = f"unix:{tmp_path / 'da.sock'}", f"unix:{tmp_path / 'db.sock'}"
    log = tmp_path / "doubles.log"
    with started("mmiosplit_cli", ["replay", str(recording), "--serve", f"uarts={da}", "--serve", f"mem={db}"], db,
                 log) as doubles:
        run = mmiosplit("run", str(HELLO), "--device-service", da, "--device-service", db)
    assert run.returncode == 0, run.stderr
    assert run.stdout == EXPECTED
    assert doubles.returncode == 0, log.read_text()
    assert "replay double uarts: 0 divergences" in log.read_text()
    assert "replay double mem: 0 divergences" in log.read_text()


def test_two_vcpus_replay_in_the_recorded_order_and_run_against_the_double(tmp_path: Path) -> None:
    expected = (GUESTS / "expected" / "hello-a64-2cpu.txt").read_text()
    recording = tmp_path / "two-vcpus.rec"
    proc = mmiosplit("run", str(HELLO), "--vcpus", "2", "--record", str(recording))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected
    hellos = [m.hello.vcpu_id for r, s, m in iter_messages(read_recording(recording))  # type: ignore[attr-defined]
              if s.method == "ExitStream" and r.direction == TO_SERVICE and m.HasField("hello")]  # type: ignore[attr-defined]
    assert sorted(hellos) == [0, 1]
    with device_service(tmp_path, DEFAULT_DEVICES) as address:
        replay = mmiosplit("replay", str(recording), "--device-service", address)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    with device_double(tmp_path, recording) as (address, double, log):
        run = mmiosplit("run", str(HELLO), "--vcpus", "2", "--device-service", address)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected
    assert double.returncode == 0, log.read_text()


def test_posted_batches_are_recorded_and_replayed(tmp_path: Path) -> None:
    """3000 writes to a posted scratch region, then a read: full batches of 1024 on their own (flush requests, two in
    flight at most), the rest riding on the read."""
    from tests.integration.client import a64
    from tests.integration.test_irq_dma import OFF, ldr_w, mov32, movz, str_w

    guest = tmp_path / "posted.bin"
    add_w2_1, cmp_w2_3000, bne_back_3 = 0x11000442, 0x712EE05F, 0x54FFFFA1
    guest.write_bytes(a64(*mov32(1, 0x0A00_0000), movz(2, 0), str_w(2, 1, 0), add_w2_1, cmp_w2_3000, bne_back_3,
                          ldr_w(3, 1, 0), *OFF))
    devices = ["pl011@0x09000000", "scratch@0x0a000000,size=0x1000,posted=on"]
    recording = tmp_path / "posted.rec"
    proc = mmiosplit("run", str(guest), "--record", str(recording), *[a for d in devices for a in ("--device", d)])
    assert proc.returncode == 0, proc.stderr
    requests = [m for r, s, m in iter_messages(read_recording(recording))
                if s.method == "ExitStream" and r.direction == TO_SERVICE]
    flushed = sum(len(m.flush.address) for m in requests if m.HasField("flush"))  # type: ignore[attr-defined]
    riding = sum(len(m.exit.posted.address) for m in requests if m.HasField("exit"))  # type: ignore[attr-defined]
    assert (flushed, riding) == (2048, 3000 - 2048)
    with device_service(tmp_path, devices) as address:
        replay = mmiosplit("replay", str(recording), "--device-service", address)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    with device_double(tmp_path, recording) as (address, double, log):
        run = mmiosplit("run", str(guest), "--device-service", address)
    assert run.returncode == 0, run.stderr
    assert double.returncode == 0, log.read_text()


def test_a_cancel_is_recorded_and_replayed_with_its_access(tmp_path: Path) -> None:
    """An access to a device that takes 300 ms, with a 50 ms deadline: the vCPU sends a Cancel, the access completes
    late; the replay sends the Cancel right after the access, as recorded, and gets the same late completion."""
    from tests.integration.client import a64
    from tests.integration.test_irq_dma import OFF, ldr_w, mov32

    guest = tmp_path / "slow.bin"
    guest.write_bytes(a64(*mov32(1, 0x0A00_0000), ldr_w(3, 1, 0), *OFF))
    devices = ["pl011@0x09000000", "scratch@0x0a000000,size=0x1000,delay=300000,deadline=50"]
    recording = tmp_path / "cancel.rec"
    proc = mmiosplit("run", str(guest), "--record", str(recording), "--on-deadline", "stop", "--events",
                     *[a for d in devices for a in ("--device", d)])
    assert proc.returncode == 1, proc.stderr
    assert "performed late" in proc.stderr, proc.stderr
    requests = [m for r, s, m in iter_messages(read_recording(recording))
                if s.method == "ExitStream" and r.direction == TO_SERVICE]
    cancels = [m.seq for m in requests if m.HasField("cancel")]  # type: ignore[attr-defined]
    reads = [m.seq for m in requests if m.HasField("exit")]  # type: ignore[attr-defined]
    assert cancels == reads == [1], (cancels, reads)
    with device_service(tmp_path, devices) as address:
        replay = mmiosplit("replay", str(recording), "--device-service", address)
    assert replay.returncode == 0, replay.stdout + replay.stderr


def test_the_double_fails_loudly_when_the_guest_goes_past_the_recording(tmp_path: Path) -> None:
    """A recording of a run stopped after 5000 instructions: the whole guest, run against it, goes on after the
    recording's last exchange, and that access fails naming it."""
    recording = tmp_path / "short.rec"
    proc = mmiosplit("run", str(HELLO), "--budget", "5000", "--record", str(recording))
    assert proc.returncode == 4, proc.stderr  # budget exhausted
    with device_double(tmp_path, recording) as (address, double, log):
        run = mmiosplit("run", str(HELLO), "--device-service", address, "--on-device-error", "stop")
    assert run.returncode == 1, run.stderr
    assert run.stdout == EXPECTED[:len(run.stdout)] and len(run.stdout) < len(EXPECTED)
    assert "the guest went on after the end of the recording" in run.stderr, run.stderr
    assert double.returncode == 1, log.read_text()
