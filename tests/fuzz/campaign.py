"""Run one fuzz target for a number of inputs and report what it found.

    python -m tests.fuzz.campaign --target decode --inputs 100000 [--seed S] [--corpus DIR] [--mode M]

Two engines. ``atheris`` (the default for the targets it suits: decode, models, device-service, vcpu-api):
libFuzzer, coverage-guided over the instrumented ``vcpu_service``/``device_service``/``mmiosplit`` code, in a
child process (libFuzzer exits the process on a crash, and at the end of ``-runs``), whose output this process
reads for the figures; crashing inputs are saved as ``crash-*`` in the artifacts folder. ``loop`` (the default
for ``exitpath``, whose every input starts a guest with its own vCPU and watch threads, which libFuzzer's
in-process, fork-free model and its exit-on-crash do not suit): the same ``TestOneInput`` on seeded random
inputs and mutations of the corpus, in this process; a finding is recorded and the loop goes on.

Prints the inputs tried, the time, and the findings; exits 1 when there are findings.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.fuzz.common import Finding, corpus_inputs, random_loop

#: Target name -> (module, default engine, libFuzzer -max_len / loop input length).
TARGETS: dict[str, tuple[str, str, int]] = {
    "decode": ("tests.fuzz.fuzz_decode", "atheris", 64),
    "models": ("tests.fuzz.fuzz_models", "atheris", 2048),
    "device-service": ("tests.fuzz.fuzz_device_service", "atheris", 2048),
    "vcpu-api": ("tests.fuzz.fuzz_vcpu_api", "atheris", 1024),
    "exitpath": ("tests.fuzz.fuzz_exitpath", "loop", 512),
}
#: Packages whose code atheris instruments for coverage.
INSTRUMENTED = ["vcpu_service", "device_service", "mmiosplit"]

_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_CRASH = re.compile(r"Test unit written to (\S+)")


def _child(target: str, argv: list[str]) -> None:
    """The libFuzzer process: instrument, import the target, fuzz (never returns)."""
    import atheris

    with atheris.instrument_imports(include=INSTRUMENTED):
        for package in INSTRUMENTED:  # imported under the instrumentation before the target pulls them in
            importlib.import_module(package)
        module = importlib.import_module(TARGETS[target][0])
    target_fn = module.TestOneInput
    if os.environ.get("MMIOSPLIT_FUZZ_SELFTEST"):  # tests: a target that fails on its 50th input
        calls = [0]
        real_fn = target_fn

        def target_fn(data: bytes) -> None:
            calls[0] += 1
            if calls[0] == 50:
                raise Finding("self-test: the 50th input fails")
            real_fn(data)

    def test_one_input(data: bytes) -> None:
        try:
            target_fn(data)
        except Exception:
            raise
        except BaseException as exc:  # SystemExit, GeneratorExit...: libFuzzer would only say "exited"
            raise Finding(f"{type(exc).__name__} escaped: {exc!r}") from exc

    atheris.Setup([sys.argv[0], *argv], test_one_input)
    atheris.Fuzz()


def run_atheris(target: str, inputs: int, seed: int, corpus: Path | None, artifacts: Path,
                timeout_s: int = 60) -> tuple[int, float, list[str], str]:
    """(inputs tried, seconds, crash files, libFuzzer's output) of one libFuzzer run in a child process."""
    artifacts.mkdir(parents=True, exist_ok=True)
    args = [f"-runs={inputs}", f"-seed={seed}", f"-max_len={TARGETS[target][2]}", f"-timeout={timeout_s}",
            f"-artifact_prefix={artifacts}/", "-print_final_stats=1", "-rss_limit_mb=4096"]
    if corpus is not None:
        corpus.mkdir(parents=True, exist_ok=True)
        args.append(str(corpus))
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    # libFuzzer ends the child without Python's atexit: what the targets put in TMPDIR goes with this folder.
    with tempfile.TemporaryDirectory(prefix="mmiosplit-fuzz-") as tmp:
        proc = subprocess.run([sys.executable, "-m", "tests.fuzz.campaign", "--child", target, "--", *args],
                              capture_output=True, text=True, env=dict(env, TMPDIR=tmp), check=False)
    seconds = time.monotonic() - t0
    output = proc.stdout + proc.stderr
    done = _DONE.findall(output)
    tried = int(done[-1][0]) if done else 0
    if not done:  # a crash ends the run early: libFuzzer's stat line has the count
        stats = re.findall(r"stat::number_of_executed_units:\s*(\d+)", output)
        tried = int(stats[-1]) if stats else 0
    crashes = _CRASH.findall(output)
    if proc.returncode != 0 and not crashes:
        crashes = [f"(exit status {proc.returncode}, no test unit written)"]
    return tried, seconds, crashes, output


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.campaign", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, choices=sorted(TARGETS))
    parser.add_argument("--inputs", type=int, required=True, help="inputs to try")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--corpus", type=Path, help="corpus folder (read, and grown by libFuzzer)")
    parser.add_argument("--mode", choices=("atheris", "loop"), help="engine (default: the target's)")
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"),
                        help="where crashing inputs go (default ./fuzz-artifacts)")
    parser.add_argument("--verbose", action="store_true", help="print libFuzzer's output")
    args = parser.parse_args(argv)
    module_name, engine, max_len = TARGETS[args.target]
    engine = args.mode or engine
    print(f"target {args.target} ({module_name}), engine {engine}, {args.inputs} inputs, seed {args.seed}",
          flush=True)
    if engine == "atheris":
        tried, seconds, findings, output = run_atheris(args.target, args.inputs, args.seed, args.corpus,
                                                       args.artifacts)
        if args.verbose or findings:
            print(output[-20000:])
    else:
        module = importlib.import_module(module_name)
        args.artifacts.mkdir(parents=True, exist_ok=True)
        saved: list[str] = []

        def keep(data: bytes, text: str) -> None:
            path = args.artifacts / f"{args.target}-finding-{len(saved)}"
            path.write_bytes(data)
            saved.append(str(path))
            print(f"finding {len(saved)} (input saved to {path}):\n{text}", flush=True)

        report = random_loop(module.TestOneInput, args.inputs, args.seed, max_len, corpus_inputs(args.corpus),
                             on_finding=keep)
        tried, seconds, findings = report.inputs, report.seconds, saved
    rate = tried / seconds if seconds else 0.0
    print(f"inputs tried: {tried}  time: {seconds:.1f} s  ({rate:.0f}/s)  findings: {len(findings)}")
    for f in findings:
        print(f"  {f}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
