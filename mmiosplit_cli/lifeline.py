"""Child processes that die with their parent, however the parent dies (a lifeline pipe).

``mmiosplit run``, ``demo`` and ``loadtest`` start the services as children. A parent killed by a signal
it does not handle (SIGKILL always; SIGTERM or SIGHUP before it can clean up) used to leave them running,
the vcpu service spinning its guest forever. So every child gets the read end of a pipe whose only write
end this process holds (``O_CLOEXEC``, never passed to a child, closed in a forked child): when this
process ends, however it ends, the kernel closes the write end and the child reads EOF. The child runs as
``python -m mmiosplit_cli.lifeline --fd N MODULE ARGS...``: a thread waits on the pipe, and on EOF sends the
process its own SIGTERM (the service's graceful stop: VMs deleted, server stopped), then exits hard if it
is still there after a grace period.

Why a pipe and not ``prctl(PR_SET_PDEATHSIG)``: the parent-death signal fires when the *thread* that forked
the child ends, not the process, so a service started from a worker thread (a thread pool, a test helper)
would be killed while still in use; it needs ``preexec_fn`` (unsafe with threads) or a race check on
``getppid`` at start; and it delivers a signal with no chance to log why. A pipe's EOF belongs to the
process, cannot be missed (it is still there when the child gets round to reading it), and is portable.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

# How long a child whose parent is gone gets for its graceful stop before it exits hard. Above the
# services' own shutdown grace, so the backstop only fires when that stop hangs.
GRACE_S = 15.0

_lock = threading.Lock()
_pipe: tuple[int, int] | None = None  # (read end, write end) of this process's lifeline


def _drop_in_fork_child() -> None:
    """A forked (not exec'd) child must not hold the write end: it would keep the services alive."""
    global _pipe
    if _pipe is not None:
        for fd in _pipe:
            with contextlib.suppress(OSError):
                os.close(fd)
        _pipe = None


os.register_at_fork(after_in_child=_drop_in_fork_child)


def _read_end() -> int:
    """The read end of this process's lifeline, created on first use; the write end stays here."""
    global _pipe
    with _lock:
        if _pipe is None:
            _pipe = os.pipe()  # both ends non-inheritable: only pass_fds hands the read end to a child
        return _pipe[0]


def command(module: str, args: Sequence[str], grace_s: float = GRACE_S) -> tuple[list[str], tuple[int, ...]]:
    """The command line that runs ``python -m module args`` tied to this process, and the fds to pass it.

    Give both to ``subprocess.Popen(cmd, pass_fds=fds, ...)``; :func:`popen` does.
    """
    fd = _read_end()
    cmd = [sys.executable, "-m", __name__, "--fd", str(fd), "--parent", str(os.getpid()), "--grace-s", f"{grace_s:g}",
           module, *args]
    return cmd, (fd,)


def popen(module: str, args: Sequence[str], grace_s: float = GRACE_S, **kwargs: object) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` of ``python -m module args`` that exits when this process does (see the module doc)."""
    cmd, fds = command(module, args, grace_s)
    return subprocess.Popen(cmd, pass_fds=fds, **kwargs)  # type: ignore[call-overload]


def stop_main_thread() -> None:
    """SIGTERM to the main thread itself: the service's own graceful stop (its handler), or death by default.

    Not ``os.kill(os.getpid())``: a signal a thread sends its own process may be taken by another thread (it
    was, about one time in twelve, on this machine's Linux 6.18, with a vCPU thread busy), and then a main
    thread blocked in ``Event.wait()`` never runs the Python handler. A signal aimed at the main thread
    interrupts its wait. (A SIGTERM from another process reached the vcpu service's main thread 30 times
    out of 30.)
    """
    try:
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)
    except (ProcessLookupError, OSError):  # the main thread is gone already: the whole process, then
        os.kill(os.getpid(), signal.SIGTERM)


def watch(fd: int, grace_s: float = GRACE_S, parent: int | None = None) -> threading.Thread:
    """In the child: on EOF on fd (the parent is gone), SIGTERM this process; exit hard after grace_s.

    parent is only named in the messages (by the time the child runs, its parent may be gone already).
    """
    parent = os.getppid() if parent is None else parent

    def run() -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError as exc:
                print(f"mmiosplit: lifeline fd {fd} cannot be read ({exc}); not watching the parent process",
                      file=sys.stderr, flush=True)
                return
            if not data:
                break
        print(f"mmiosplit: parent process {parent} is gone (lifeline closed); stopping", file=sys.stderr, flush=True)
        stop_main_thread()
        time.sleep(grace_s)
        print(f"mmiosplit: still running {grace_s:g} s after parent process {parent} went away; exiting now. "
              "Where every thread was:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        os._exit(1)

    thread = threading.Thread(target=run, name="lifeline", daemon=True)
    thread.start()
    return thread


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mmiosplit_cli.lifeline --fd N [--grace-s S] MODULE ARGS...``: watch fd N, run MODULE."""
    p = argparse.ArgumentParser(prog="python -m mmiosplit_cli.lifeline",
                                description="run a module as __main__, ending it when the lifeline fd reads EOF")
    p.add_argument("--fd", type=int, required=True, help="read end of the parent's lifeline pipe")
    p.add_argument("--parent", type=int, help="the parent's PID, for the messages")
    p.add_argument("--grace-s", type=float, default=GRACE_S, help="how long the graceful stop may take")
    p.add_argument("module", help="module to run, as python -m does")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    ns = p.parse_args(argv)
    watch(ns.fd, ns.grace_s, ns.parent)
    sys.argv = [ns.module, *ns.args]
    runpy.run_module(ns.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
