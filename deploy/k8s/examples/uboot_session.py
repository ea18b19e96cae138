"""Drive U-Boot's console with no terminal, for a Job: `mmiosplit run ARGS...`, one command per prompt.

Commands typed ahead are lost (U-Boot drops pending input while it counts down and while a command
polls for Ctrl-C), so each line of $UBOOT_COMMANDS is typed only when a new "=> " prompt shows. The
exit status is run's (0 when the guest powers off), or 1 when $UBOOT_EXPECT is missing from the console.
A copy of this file is embedded in client-job.yaml; tests/deploy checks that the two are the same.
"""

import os
import subprocess
import sys

PROMPT = b"=> "


def main(run_args: list[str]) -> int:
    commands = [line for line in os.environ.get("UBOOT_COMMANDS", "version\npoweroff").splitlines() if line.strip()]
    expect = os.environ.get("UBOOT_EXPECT", "").encode()
    run = subprocess.Popen(["mmiosplit", "run", *run_args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert run.stdin is not None and run.stdout is not None
    console = bytearray()
    typed = 0
    while chunk := os.read(run.stdout.fileno(), 4096):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        console += chunk
        if typed < len(commands) and console.count(PROMPT) > typed:
            run.stdin.write(commands[typed].encode() + b"\n")
            run.stdin.flush()
            typed += 1
    status = run.wait()
    if status == 0 and expect not in console:
        print(f"uboot_session: {expect.decode()!r} is not on the console", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
