"""Drive a firmware console the way a person would: wait for a string, then type (pexpect).

The same script runs against ``mmiosplit run --machine virt`` and against Debian's QEMU, so the two
transcripts can be compared line by line.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pexpect

PROMPT = "=> "
AUTOBOOT = "Hit any key to stop autoboot"
BANNER = "U-Boot 20"
CTRL_A_X = "\x01x"


@dataclass
class Transcript:
    """What a console printed, with the time each milestone was reached."""

    text: str = ""
    marks: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Lines without carriage returns, trailing blanks or terminal escape sequences."""
        clean = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.text.replace("\r", ""))
        return [line.rstrip() for line in clean.split("\n")]


def _spawn(command: Sequence[str], timeout: float) -> tuple[pexpect.spawn, io.StringIO]:
    """The program on a pseudo-terminal, everything it prints kept in the returned buffer."""
    child = pexpect.spawn(command[0], list(command[1:]), timeout=timeout, encoding="utf-8",
                          codec_errors="replace", dimensions=(50, 200))
    log = io.StringIO()
    child.logfile_read = log
    return child, log


def run_uboot_script(command: Sequence[str], script: Sequence[str], timeout: float = 300,
                     reboots: int = 0) -> Transcript:
    """Boot to the prompt (a key stops autoboot), type each command at the prompt, then quit with Ctrl-A X.

    A command that reboots (``reset``, ``bootefi selftest``'s key press) reaches the next prompt the same way.
    """
    t0 = time.monotonic()
    out = Transcript()
    child, log = _spawn(command, timeout)
    try:
        child.expect_exact(BANNER)
        out.marks["banner"] = time.monotonic() - t0
        child.expect_exact(AUTOBOOT)
        out.marks.setdefault("autoboot", time.monotonic() - t0)
        child.send(" ")
        child.expect_exact(PROMPT)
        out.marks.setdefault("prompt", time.monotonic() - t0)
        for line in script:
            child.sendline(line)
            # Reboots (reset, or the key press `bootefi selftest` asks for) come back through autoboot.
            while child.expect_exact([PROMPT, "Press any key...", AUTOBOOT]) != 0:
                child.send(" ")
        out.marks["done"] = time.monotonic() - t0
        child.send(CTRL_A_X)
        child.expect(pexpect.EOF, timeout=60)
    finally:
        out.text = log.getvalue()
        child.close(force=True)
    return out


def run_shell_script(command: Sequence[str], prompt: str, script: Sequence[str], timeout: float = 300) -> Transcript:
    """Wait for ``prompt`` (EDK2's ``Shell>``), type each command (with CR, as a terminal sends Enter) and wait for
    the prompt again, then quit with Ctrl-A X. ``marks["prompt"]`` is the time the first prompt appeared."""
    t0 = time.monotonic()
    out = Transcript()
    child, log = _spawn(command, timeout)
    try:
        child.expect_exact(prompt)
        out.marks["prompt"] = time.monotonic() - t0
        for line in script:
            child.send(line + "\r")
            child.expect_exact(prompt)
        out.marks["done"] = time.monotonic() - t0
        child.send(CTRL_A_X)
        child.expect(pexpect.EOF, timeout=60)
    finally:
        out.text = log.getvalue()
        child.close(force=True)
    return out
