"""Run the conformance checks against one device service and report them (``mmiosplit conformance``).

Each check runs on a thread of its own and is given ``timeout`` seconds per wait and a few times that in all:
a check that overruns is reported FAIL and its streams are cancelled, so a hung service ends the run with
reasons, never hangs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TextIO

import grpc

from mmiosplit.v1 import device_pb2
from mmiosplit_cli.conformance import checks
from mmiosplit_cli.conformance.client import CheckFailed, CheckSkipped, Target
from mmiosplit_cli.conformance.defaults import CHECK_BUDGET, DEFAULT_MAX_MESSAGE

EXIT_FAILED = 1
EXIT_UNUSABLE = 2


@dataclass(frozen=True, slots=True)
class Result:
    """One check's outcome, as printed and as written to --json."""

    name: str
    status: str  # PASS, FAIL or SKIP
    reason: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        return f"{self.status} {self.name}" + (f": {self.reason}" if self.reason else "")


class Unusable(Exception):
    """The address does not lead to a device service this suite can test (the message says why)."""


def _probe(target: Target) -> None:
    """Reach the service and read its description, or say clearly why not."""
    try:
        grpc.channel_ready_future(target.channel).result(timeout=target.timeout)
    except grpc.FutureTimeoutError:
        raise Unusable(f"cannot reach {target.address} within {target.timeout:g} s (nothing listening, or not "
                       "gRPC, or TLS/token flags that do not match the service)") from None
    try:
        target.describe()
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise Unusable(f"{target.address} is a gRPC server but not a device service (Describe of "
                           "mmiosplit.v1.DeviceService is unimplemented)") from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise Unusable(f"{target.address} did not answer Describe within {target.timeout:g} s") from None
        raise Unusable(f"Describe on {target.address} failed: {code.name} ({exc.details()})") from None


def _run_one(target: Target, check: checks.Check) -> Result:
    """Run ``check`` on a thread of its own, give it ``CHECK_BUDGET`` timeouts, then cancel whatever it left open."""
    outcome: list[Result] = []
    t0 = time.monotonic()

    def body() -> None:
        try:
            check.run(target)
        except CheckSkipped as exc:
            outcome.append(Result(check.name, "SKIP", str(exc)))
        except CheckFailed as exc:
            outcome.append(Result(check.name, "FAIL", str(exc)))
        except grpc.RpcError as exc:
            outcome.append(Result(check.name, "FAIL", f"{exc.code().name}: {exc.details()}"))
        except Exception as exc:  # a bug in the suite or an answer it cannot read: still a reason, not a crash
            outcome.append(Result(check.name, "FAIL", f"unexpected {type(exc).__name__}: {exc}"))
        else:
            outcome.append(Result(check.name, "PASS"))

    worker = threading.Thread(target=body, name=f"check-{check.name}", daemon=True)
    worker.start()
    worker.join(target.timeout * CHECK_BUDGET)
    target.cancel_streams()
    if worker.is_alive() or not outcome:
        worker.join(1.0)
    took = time.monotonic() - t0
    if not outcome:
        return Result(check.name, "FAIL", f"did not finish within {target.timeout * CHECK_BUDGET:g} s", took)
    r = outcome[0]
    return Result(r.name, r.status, r.reason, took)


def run_suite(address: str, only: Sequence[str] = (), timeout: float = 5.0,
              vm_id: str = "mmiosplit-conformance", max_message: int = DEFAULT_MAX_MESSAGE,
              report: Callable[[Result], None] | None = None) -> list[Result]:
    """Run the checks named in ``only`` (all when empty) against the device service at ``address``, over a
    channel with this process's credentials; ``report`` hears each result as it comes. Raises Unusable when
    the service cannot be tested at all."""
    unknown = [name for name in only if not any(_matches(name, c.name) for c in checks.CHECKS)]
    if unknown:
        raise ValueError(f"unknown check {', '.join(unknown)}; checks: {', '.join(checks.names())}")
    checks.MAX_MESSAGE[0] = max_message
    target = Target(address, timeout, vm_id)
    results = []
    try:
        _probe(target)
        for check in checks.CHECKS:
            if only and not any(_matches(name, check.name) for name in only):
                continue
            result = _run_one(target, check)
            results.append(result)
            if report is not None:
                report(result)
        _leave_reset(target)
    finally:
        target.close()
    return results


def _matches(pattern: str, name: str) -> bool:
    """A check's full name, or a group prefix such as ``seq`` or ``seq.``."""
    return name == pattern or name.startswith(pattern.rstrip(".") + ".")


def _leave_reset(target: Target) -> None:
    """Leave the devices in their reset state (best effort: the checks changed them)."""
    with contextlib.suppress(grpc.RpcError):
        target.stub.Reset(device_pb2.ResetRequest(vm_id=target.vm_id), timeout=target.timeout)


def write_json(path: str, address: str, results: Sequence[Result], error: str = "") -> None:
    doc = {"address": address, "error": error,
           "passed": sum(r.status == "PASS" for r in results), "failed": sum(r.status == "FAIL" for r in results),
           "skipped": sum(r.status == "SKIP" for r in results),
           "checks": [asdict(r) | {"doc": _doc(r.name)} for r in results]}
    with open(path, "w", encoding="utf-8") as out:
        json.dump(doc, out, indent=2)
        out.write("\n")


def _doc(name: str) -> str:
    return next((c.doc for c in checks.CHECKS if c.name == name), "")


def cmd_conformance(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print a line per check as it finishes, then a summary; exit 1 on any FAIL, 2 when nothing could run."""
    out = sys.stdout if out is None else out
    if args.list:
        for check in checks.CHECKS:
            print(f"{check.name}\n    {check.doc}", file=out)
        return 0
    if args.address is None:
        print("mmiosplit conformance: give the ADDR of a device service (unix:PATH or HOST:PORT), or --list",
              file=sys.stderr)
        return EXIT_UNUSABLE

    results: list[Result] = []

    def report(result: Result) -> None:
        results.append(result)  # kept as they come, for --json even if the run is interrupted
        print(result.line(), file=out, flush=True)

    try:
        run_suite(str(args.address), args.only, args.timeout, args.vm_id, args.max_message, report=report)
    except ValueError as exc:
        print(f"mmiosplit conformance: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except Unusable as exc:
        print(f"mmiosplit conformance: {exc}", file=sys.stderr)
        if args.json:
            write_json(args.json, str(args.address), [], str(exc))
        return EXIT_UNUSABLE
    failed = sum(r.status == "FAIL" for r in results)
    skipped = sum(r.status == "SKIP" for r in results)
    print(f"{len(results) - failed - skipped} passed, {failed} failed, {skipped} skipped", file=out)
    if args.json:
        write_json(args.json, str(args.address), results)
    return EXIT_FAILED if failed else 0
