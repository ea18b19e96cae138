"""The differential campaign: generate, cross-check, run both ways, compare; and its command-line script.

    python -m tests.differential.campaign --instances 10000 --seed 1
    python -m tests.differential.campaign --instances 300 --seed 1 --grpc
    python -m tests.differential.campaign --instances 2000 --seed 7 --isa t32 --show 3

For every batch the same program runs in plain Unicorn (RAM at the window) and through mmiosplit (a scratch device
at the window); every instance's register and flag dump, the window's bytes, the final registers and PC, and how
each run ended must be identical. Every instance is also checked against capstone (`crosscheck`). The script prints
per-ISA counts and the first mismatches in full, and exits 1 on any mismatch or cross-check failure.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from tests.differential.crosscheck import check_instance, disassemble
from tests.differential.generate import SLOT, Batch, Instance, batch_configuration, generate_batch
from tests.differential.program import Program, build_program
from tests.differential.runners import GrpcTarget, RunResult, run_local, run_reference
from vcpu_service.decode import Isa, decode

DEFAULT_BATCH = 100
DEFAULT_GRPC_BATCH = 6  # 17 batches per ISA in a 300-instance run: every configuration
GRPC_WINDOWS = {False: 0x0A00_0000, True: 0x0A10_0000}  # the non-posted and the posted scratch device
GRPC_WINDOW_SIZE = 0x1_0000
ISA_NAMES = {"a64": Isa.A64, "a32": Isa.A32, "t32": Isa.T32}


@dataclass
class Finding:
    """A mismatch or a cross-check failure, with what is needed to show it in full."""

    batch: Batch
    instance: Instance | None
    problems: list[str]
    program: Program | None = None


@dataclass
class IsaTally:
    """Counts for one ISA."""

    instances: int = 0
    accesses: int = 0  # device accesses whose condition passed (one per instance, a few T32 IT blocks have two)
    batches: int = 0
    exits: int = 0
    posted_writes: int = 0
    hand_decoded: int = 0
    mismatched: int = 0
    crosscheck_failed: int = 0
    divergences: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)
    reference_s: float = 0.0
    mmiosplit_s: float = 0.0


@dataclass
class Coverage:
    """What the generated instances exercised, per ISA (for the CI assertions and the summary)."""

    rt: dict[Isa, set[int]] = field(default_factory=dict)
    rn: dict[Isa, set[int]] = field(default_factory=dict)
    rm: dict[Isa, set[int]] = field(default_factory=dict)
    reserved: dict[Isa, set[int]] = field(default_factory=dict)
    # (CPU model, big-endian, unprivileged, posted)
    configurations: dict[Isa, set[tuple[str, bool, bool, bool]]] = field(default_factory=dict)
    ops: dict[Isa, set[str]] = field(default_factory=dict)
    details: dict[Isa, Counter[str]] = field(default_factory=dict)

    def add(self, batch: Batch) -> None:
        isa = batch.isa
        self.reserved.setdefault(isa, set()).add(batch.reserved)
        self.configurations.setdefault(isa, set()).add((batch.cpu_model, batch.big_endian, batch.unprivileged,
                                                         batch.posted))
        for i in batch.instances:
            self.rt.setdefault(isa, set()).add(i.rt)
            self.rn.setdefault(isa, set()).add(i.rn)
            if i.rm is not None:
                self.rm.setdefault(isa, set()).add(i.rm)
            self.ops.setdefault(isa, set()).add(i.op)
            details = self.details.setdefault(isa, Counter())
            details.update(_detail_tags(i))


def _detail_tags(i: Instance) -> list[str]:
    """Coarse tags of what an instance exercised beyond its class: shifts, extends, IT blocks, conditions."""
    tags = [f"size {i.size}", "store" if i.is_store else ("signed load" if i.signed else "load")]
    words = i.detail.split()
    for kind in ("lsl", "lsr", "asr", "ror", "rrx", "uxtw", "sxtw", "sxtx"):
        if kind in words or f"{kind}," in words:
            tags.append(kind)
    if "rm=rn" in words:
        tags.append("rm=rn")
    if any(w.startswith("it") and w != "it" for w in words):
        tags.append("IT block")
    if "second" in words:
        tags.append("second access in the IT block")
    if "cond" in words:
        tags.append("condition")
    if not i.executes:
        tags.append("condition failed")
    if i.writeback:
        tags.append(f"writeback {i.writeback}")
    return tags


@dataclass
class CampaignResult:
    seed: int
    transport: str
    tallies: dict[Isa, IsaTally]
    coverage: Coverage
    mismatches: list[Finding]
    crosscheck_failures: list[Finding]
    seconds: float

    @property
    def instances(self) -> int:
        return sum(t.instances for t in self.tallies.values())

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.crosscheck_failures


# --------------------------------------------------------------------------------------------- comparison


def _hex(data: bytes) -> str:
    return data.hex(" ") if data else "(none)"


def compare(program: Program, reference: RunResult, split: RunResult) -> list[Finding]:
    """Everything that differs between the two runs of a program, attributed to instances where possible."""
    batch = program.batch
    findings: list[Finding] = []

    def add(instance: Instance | None, problems: list[str]) -> None:
        findings.append(Finding(batch, instance, problems, program))

    if not reference.ok:
        add(program.instance_at(reference.pc), [f"the reference run ended with {reference.status!r} "
                                                f"({reference.detail}), not {program.expected_ending!r}: a harness "
                                                "problem"])
        return findings
    reached = len(batch.instances)
    if not split.ok:
        failing = program.instance_at(split.pc)
        reached = failing.index if failing is not None else 0
        add(failing, [f"the mmiosplit run ended with {split.status!r} ({split.detail}), not "
                      f"{program.expected_ending!r}"]
            + ([f"{len(batch.instances) - reached - 1} later instances of the batch were not reached"]
               if failing is not None else []))
    names = program.layout.names
    for instance in batch.instances[:reached]:
        problems = []
        want, got = program.dump(reference.records, instance.index), program.dump(split.records, instance.index)
        for name, w, g in zip(names, want, got, strict=True):
            if w != g:
                problems.append(f"{name}: reference 0x{w:x}, mmiosplit 0x{g:x}")
        lo = instance.index * SLOT
        if reference.window[lo:lo + SLOT] != split.window[lo:lo + SLOT]:
            problems.append(f"slot bytes: reference {_hex(reference.window[lo:lo + SLOT])}, "
                            f"mmiosplit {_hex(split.window[lo:lo + SLOT])}")
        if problems:
            add(instance, problems)
    if split.ok:
        rest = slice(batch.used, None)
        if not program.self_seeded and reference.window[rest] != split.window[rest]:
            add(None, ["window bytes outside every slot differ"])
        regs = [f"final {name}: reference 0x{value:x}, mmiosplit 0x{split.registers.get(name, -1):x}"
                for name, value in reference.registers.items() if split.registers.get(name) != value]
        if reference.pc != split.pc:
            regs.append(f"final pc: reference 0x{reference.pc:x}, mmiosplit 0x{split.pc:x}")
        if regs:
            add(None, regs)
    return findings


def describe(finding: Finding) -> str:
    """A mismatch in full: the batch, the instance (encoding, capstone, decode, registers, slot) and the diff."""
    b = finding.batch
    reg = ("x" if b.isa is Isa.A64 else "r") + str(b.reserved)
    level = ("EL0" if b.isa is Isa.A64 else "User") if b.unprivileged else ("EL1" if b.isa is Isa.A64 else "SVC")
    lines = [f"{b.isa.value} batch {b.seed} ({b.cpu_model}, {'big' if b.big_endian else 'little'}-endian, {level}, "
             f"{'posted' if b.posted else 'non-posted'} writes, reserved {reg}, "
             f"window 0x{b.window_base:x}+0x{b.window_size:x})"]
    i = finding.instance
    if i is None:
        lines.append("  (not attributable to one instance)")
    else:
        code = " ".join(f"{w:0{4 if i.isa is Isa.T32 else 8}x}" for w in i.code)
        lines += [
            f"  instance {i.index}: {i.klass}, {i.op}{', ' + i.detail if i.detail else ''}",
            f"  encoding 0x{i.encoding:x}   capstone: {disassemble(i.isa, i.encoding)}   code: {code}",
            f"  decode(): {decode(i.isa, i.encoding)}",
            f"  access: {i.size}-byte {'store' if i.is_store else 'load'} at 0x{i.address:x}"
            + (f", pc 0x{finding.program.access_pcs[i.index]:x}" if finding.program is not None else "")
            + ("" if i.executes else " (condition fails: no access)"),
            f"  flags 0x{i.flags:08x}" + (f"  sp 0x{i.sp:x}" if i.isa is Isa.A64 else ""),
            "  registers " + " ".join(f"{'x' if i.isa is Isa.A64 else 'r'}{n}=0x{v:x}" for n, v in enumerate(i.regs)),
            f"  slot before: {_hex(i.slot)}",
        ]
    lines += [f"  {p}" for p in finding.problems]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- the campaign


def _split_counts(total: int, isas: Sequence[Isa]) -> dict[Isa, int]:
    base, extra = divmod(total, len(isas))
    return {isa: base + (k < extra) for k, isa in enumerate(isas)}


def _batches(isa: Isa, count: int, seed: int, batch_size: int, grpc: bool) -> Iterator[Batch]:
    number = 0
    while count > 0:
        n = min(batch_size, count)
        yield generate_batch(isa, seed, number, n, GRPC_WINDOWS[batch_configuration(number)[3]] if grpc else None)
        count -= n
        number += 1


def run_campaign(
    instances: int,
    seed: int,
    isas: Sequence[Isa] = (Isa.A64, Isa.A32, Isa.T32),
    *,
    batch_size: int = DEFAULT_BATCH,
    grpc: GrpcTarget | None = None,
    progress: Callable[[str], None] | None = None,
) -> CampaignResult:
    """Run `instances` instances split evenly over `isas`, in-process or (with `grpc`) over the real services."""
    if grpc is not None and batch_size * SLOT > grpc.window_size:
        raise ValueError(f"batches of {batch_size} do not fit the device service's window")
    t0 = time.perf_counter()
    tallies = {isa: IsaTally() for isa in isas}
    coverage = Coverage()
    mismatches: list[Finding] = []
    crosscheck_failures: list[Finding] = []
    for isa, count in _split_counts(instances, isas).items():
        tally = tallies[isa]
        for batch in _batches(isa, count, seed, batch_size, grpc is not None):
            coverage.add(batch)
            tally.batches += 1
            tally.instances += len(batch.instances)
            tally.accesses += sum(int(i.executes) + i.extra_accesses for i in batch.instances)
            tally.classes.update(i.klass for i in batch.instances)
            for instance in batch.instances:
                check = check_instance(instance)
                if check.divergence:
                    tally.divergences[check.divergence] += 1
                if check.problems:
                    tally.crosscheck_failed += 1
                    crosscheck_failures.append(Finding(batch, instance, list(check.problems)))
            program = build_program(batch, self_seeded=grpc is not None)
            reference = run_reference(program)
            split = grpc.run(program) if grpc is not None else run_local(program)
            tally.reference_s += reference.seconds
            tally.mmiosplit_s += split.seconds
            tally.exits += split.exits
            tally.posted_writes += split.posted_writes
            tally.hand_decoded += split.hand_decoded
            found = compare(program, reference, split)
            tally.mismatched += len({id(f.instance) for f in found})
            mismatches += found
            if progress is not None:
                progress(f"{isa.value} batch {batch.number}: {len(batch.instances)} instances, "
                         f"{len(found)} mismatches")
    return CampaignResult(seed, "grpc" if grpc is not None else "in-process", tallies, coverage, mismatches,
                          crosscheck_failures, time.perf_counter() - t0)


def summary(result: CampaignResult, show: int = 5) -> str:
    """The report the script prints: per-ISA counts, then the first `show` mismatches and cross-check failures."""
    lines = [f"differential campaign, seed {result.seed}, {result.transport}: {result.instances} instances in "
             f"{result.seconds:.1f} s"]
    for isa, t in result.tallies.items():
        lines.append(
            f"  {isa.value}: {t.instances} instances ({t.accesses} device accesses, {len(t.classes)} classes) in "
            f"{t.batches} batches; {t.exits} exits + {t.posted_writes} posted writes, {t.hand_decoded} hand-decoded "
            f"writeback; reference {t.reference_s:.1f} s, mmiosplit {t.mmiosplit_s:.1f} s; {t.mismatched} mismatched, "
            f"{t.crosscheck_failed} capstone/decode disagreements"
        )
        for reason, n in sorted(t.divergences.items()):
            lines.append(f"      known capstone divergence skipped {n}x: {reason}")
    for title, findings in (("MISMATCH", result.mismatches), ("CROSS-CHECK FAILURE", result.crosscheck_failures)):
        for finding in findings[:show]:
            lines += ["", f"{title}:", describe(finding)]
        if len(findings) > show:
            lines.append(f"... {len(findings) - show} more not shown ({title.lower()})")
    verdict = "PASS" if result.ok else "FAIL"
    lines += ["", f"{verdict}: {result.instances} instances "
              f"({', '.join(f'{isa.value} {t.instances}' for isa, t in result.tallies.items())}), "
              f"{len(result.mismatches)} mismatches, {len(result.crosscheck_failures)} cross-check failures"]
    return "\n".join(lines)


@contextlib.contextmanager
def grpc_services(transport: str = "unix") -> Iterator[GrpcTarget]:
    """A device service with a scratch device at each gRPC window (one posted), and a vcpu service, as subprocesses."""
    from mmiosplit_cli.launcher import local_services

    devices = [f"scratch@0x{base:x},size=0x{GRPC_WINDOW_SIZE:x},name=scratch{int(posted)},"
               f"posted={'on' if posted else 'off'}" for posted, base in GRPC_WINDOWS.items()]
    args = [arg for device in devices for arg in ("--device", device)]
    with local_services(args, transport=transport) as (vcpu_address, device_address, _):
        assert vcpu_address is not None and device_address is not None
        target = GrpcTarget(vcpu_address, device_address, GRPC_WINDOWS, GRPC_WINDOW_SIZE)
        try:
            yield target
        finally:
            target.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.differential.campaign", description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=10_000, help="instances in total, split over the ISAs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--isa", default="a64,a32,t32", help="comma-separated: a64, a32, t32")
    parser.add_argument("--grpc", action="store_true", help="run through the real gRPC services (subprocesses)")
    parser.add_argument("--transport", choices=("unix", "tcp"), default="unix", help="with --grpc")
    parser.add_argument("--batch-size", type=int, default=0,
                        help=f"instances per guest program (default {DEFAULT_BATCH}, {DEFAULT_GRPC_BATCH} with --grpc)")
    parser.add_argument("--show", type=int, default=5, help="mismatches to print in full")
    parser.add_argument("--progress", action="store_true", help="a line per batch on stderr")
    args = parser.parse_args(argv)
    try:
        isas = [ISA_NAMES[name.strip().lower()] for name in args.isa.split(",") if name.strip()]
    except KeyError as exc:
        parser.error(f"unknown ISA {exc}; use a64, a32, t32")
    if args.instances < len(isas):
        parser.error("at least one instance per ISA")
    if not 0 <= args.batch_size <= 1024:
        parser.error("--batch-size must be 1..1024")

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = progress if args.progress else None
    if args.grpc:
        with grpc_services(args.transport) as target:
            result = run_campaign(args.instances, args.seed, isas, batch_size=args.batch_size or DEFAULT_GRPC_BATCH,
                                  grpc=target, progress=report)
    else:
        result = run_campaign(args.instances, args.seed, isas, batch_size=args.batch_size or DEFAULT_BATCH,
                              progress=report)
    print(summary(result, args.show))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
