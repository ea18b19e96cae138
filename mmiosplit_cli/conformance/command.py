"""The ``mmiosplit conformance`` subcommand's arguments; the suite itself is imported only when it runs (every
``mmiosplit`` command line builds this parser, and start-up time counts)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from mmiosplit import security
from mmiosplit_cli.conformance.defaults import CHECK_BUDGET, DEFAULT_MAX_MESSAGE


def _size(text: str) -> int:
    try:
        value = int(text.replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 600 seconds")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               address_type: Callable[[str], object]) -> None:
    """The ``conformance`` subcommand."""
    c = sub.add_parser("conformance", help="check a running device service against the device protocol over gRPC "
                       "(no guest, no vcpu service); see docs/conformance.md")
    c.add_argument("address", type=address_type, nargs="?", help="unix:PATH or HOST:PORT of the device service")
    c.add_argument("--json", metavar="FILE", help="also write every check's status and reason to FILE")
    c.add_argument("--only", nargs="+", metavar="CHECK", default=[],
                   help="run only these checks (a name, or a group such as seq or irq)")
    c.add_argument("--timeout", type=_timeout, default=5.0, metavar="S",
                   help=f"how long each wait may take (default 5); a check may take {CHECK_BUDGET} times that")
    c.add_argument("--vm-id", default="mmiosplit-conformance",
                   help="the VM the suite acts as (vm.scoping also plays VM-ID-other)")
    c.add_argument("--max-message", type=_size, default=DEFAULT_MAX_MESSAGE, metavar="BYTES",
                   help="the service's receive limit: limits.oversized_message sends one byte more (default 256 MiB)")
    c.add_argument("--list", action="store_true", help="list the checks and what each asserts, and exit")
    security.add_arguments(c, serving=False)
    c.set_defaults(func=_run)



def _run(args: argparse.Namespace) -> int:
    from mmiosplit_cli.conformance.runner import cmd_conformance  # lazy: start-up time

    return cmd_conformance(args)
