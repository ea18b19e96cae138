"""What the fuzz targets share: a finding type, and a plain seeded loop over random inputs.

A target's ``TestOneInput`` raises on a finding (an exception that escaped the code under test, or a broken
invariant, as ``Finding``). Under atheris the raise is a crash (libFuzzer saves the input and exits); under
``random_loop`` (the quick tests, and the targets libFuzzer's in-process model does not suit) it is recorded
with its input and the loop goes on.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path


class Finding(AssertionError):
    """An invariant a target checks does not hold; the message says which and with what."""


def check(condition: bool, message: str) -> None:
    """Raise ``Finding(message)`` unless ``condition``."""
    if not condition:
        raise Finding(message)


_NOWHERE = logging.NullHandler()


def quiet_logs(capture: logging.Handler | None = None) -> None:
    """Send the services' log (the ``mmiosplit`` logger) only to ``capture``, warnings and worse, or nowhere: a
    campaign makes thousands of refusals the services log. Cheap and idempotent: targets call it per input."""
    logger = logging.getLogger("mmiosplit")
    handlers = [capture or _NOWHERE]
    if logger.handlers != handlers or logger.propagate:
        logger.handlers[:] = handlers
        logger.propagate = False
    logger.setLevel(logging.WARNING if capture is not None else logging.CRITICAL)


_thread_errors: list[str] = []


def _record(args: threading.ExceptHookArgs) -> None:
    name = args.thread.name if args.thread is not None else "?"
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    _thread_errors.append(f"thread {name}: {text}")
    threading.__excepthook__(args)


def watch_threads() -> None:
    """Record exceptions that end any thread (``threading.excepthook``), for ``check_threads``; idempotent, and
    again after someone restored the previous hook."""
    if threading.excepthook is not _record:
        threading.excepthook = _record


def check_threads() -> None:
    """Raise ``Finding`` for the exceptions that ended threads since the last call."""
    if _thread_errors:
        errors = list(_thread_errors)
        _thread_errors.clear()
        raise Finding("an exception ended a thread:\n" + "\n".join(errors))


@dataclass
class LoopReport:
    """What a ``random_loop`` did: inputs tried, seconds, and each finding as (input, traceback text)."""

    inputs: int = 0
    seconds: float = 0.0
    findings: list[tuple[bytes, str]] = field(default_factory=list)


def _mutate(rng: random.Random, seed: bytes, max_len: int) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 8)):
        choice = rng.randrange(4)
        if choice == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice == 1 and len(data) < max_len:
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        elif choice == 2 and data:
            del data[rng.randrange(len(data))]
        elif data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data[:max_len])


def corpus_inputs(corpus: Path | None) -> list[bytes]:
    """The files of a corpus folder (libFuzzer's format: one input per file), sorted by name."""
    if corpus is None or not corpus.is_dir():
        return []
    return [p.read_bytes() for p in sorted(corpus.iterdir()) if p.is_file()]


def random_loop(test_one_input: Callable[[bytes], None], inputs: int, seed: int = 0, max_len: int = 512,
                corpus: Iterable[bytes] = (), stop_after: int | None = None,
                on_finding: Callable[[bytes, str], None] | None = None) -> LoopReport:
    """Call ``test_one_input`` on ``inputs`` inputs: the corpus first, then random bytes of random length or
    mutations of corpus inputs, all from ``random.Random(seed)`` (the same seed gives the same inputs).
    Stops early after ``stop_after`` findings."""
    rng = random.Random(seed)
    seeds = list(corpus)
    report = LoopReport()
    t0 = time.monotonic()
    for n in range(inputs):
        if n < len(seeds):
            data = seeds[n]
        elif seeds and rng.random() < 0.5:
            data = _mutate(rng, rng.choice(seeds), max_len)
        else:
            data = rng.randbytes(rng.randint(0, max_len))
        report.inputs += 1
        try:
            test_one_input(data)
        except Exception:
            text = traceback.format_exc()
            report.findings.append((data, text))
            if on_finding is not None:
                on_finding(data, text)
            if stop_after is not None and len(report.findings) >= stop_after:
                break
    report.seconds = time.monotonic() - t0
    return report
