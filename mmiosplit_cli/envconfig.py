"""Service flags from the environment: every flag of ``serve-vcpu`` and ``serve-devices`` as ``MMIOSPLIT_<FLAG>``.

Containers and Kubernetes configure a process by its environment, so a compose file or a Deployment can
say ``MMIOSPLIT_LISTEN=0.0.0.0:50051`` instead of rewriting the command. The rules, one table in the README
(``environment_table`` writes it):

- the name is the long flag upper-cased, dashes as underscores: ``--metrics-port`` is ``MMIOSPLIT_METRICS_PORT``;
- a flag given on the command line wins over its variable (a repeatable flag replaces the whole list);
- a repeatable flag (``--device``, ``--config``) takes a whitespace-separated list;
- an on/off flag (``--verbose``) takes 1/0, true/false, yes/no or on/off;
- a value is checked exactly as the flag's would be, and a bad one is an error naming the variable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import NoReturn

from device_service.model import ConfigError, parse_bool

PREFIX = "MMIOSPLIT_"
# MMIOSPLIT_ variables that are not service flags (CI, and deploy/compose.yaml on the host), not reported as unknown.
OTHER_VARIABLES = frozenset({"MMIOSPLIT_REQUIRE_DOCKER", "MMIOSPLIT_REQUIRE_NODE", "MMIOSPLIT_IMAGE",
                             "MMIOSPLIT_SUBNET", "MMIOSPLIT_VCPU_PORT"})
SERVICE_COMMANDS = ("serve-vcpu", "serve-devices")


class _FromEnvironment(list[object]):
    """The default of a flag whose variable is set: argparse leaves this very object in place when the flag is
    absent (and copies it before appending when present), so identity tells the two apart."""


def variable(action: argparse.Action) -> str | None:
    """The variable of a flag, or None for positionals and --help."""
    longs = [o for o in action.option_strings if o.startswith("--")]
    if not longs or isinstance(action, argparse._HelpAction):
        return None
    return PREFIX + longs[0][2:].upper().replace("-", "_")


def _flag_actions(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    return [(name, a) for a in parser._actions if (name := variable(a)) is not None]


def bind_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> list[tuple[str, argparse.Action]]:
    """Mark the flags whose variable is set, before parsing (a required flag is then satisfied by its variable).

    Returns what ``resolve_environment`` needs after parsing.
    """
    bound = []
    for name, action in _flag_actions(parser):
        if name in environ:
            action.required = False
            action.default = _FromEnvironment()
            bound.append((name, action))
    return bound


def _convert(parser: argparse.ArgumentParser, name: str, action: argparse.Action, text: str) -> object:
    def fail(why: str) -> NoReturn:
        parser.error(f"{name}={text!r}: {why}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        word = text.strip()
        try:
            on = parse_bool(word) if word else False  # set but empty: off
        except ConfigError:
            fail("expected 1/0, true/false, yes/no or on/off")
        return on if isinstance(action, argparse._StoreTrueAction) else not on

    def one(item: str) -> object:
        try:
            value = action.type(item) if callable(action.type) else item
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            fail(str(exc) or f"not a valid value for {action.option_strings[-1]}")
        if action.choices is not None and value not in action.choices:
            fail(f"expected one of {', '.join(map(str, action.choices))}")
        return value

    if isinstance(action, argparse._AppendAction):
        items = text.split()
        if not items:
            fail(f"empty; give a whitespace-separated list for {action.option_strings[-1]}")
        return [one(item) for item in items]
    return one(text.strip())


def resolve_environment(parser: argparse.ArgumentParser, args: argparse.Namespace,
                        bound: list[tuple[str, argparse.Action]], environ: Mapping[str, str]) -> None:
    """Fill in, from the environment, every bound flag the command line did not give."""
    for name, action in bound:
        if getattr(args, action.dest) is action.default:
            setattr(args, action.dest, _convert(parser, name, action, environ[name]))


def unknown_variables(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> list[str]:
    """MMIOSPLIT_ variables that name no flag of this command (a typo would otherwise be ignored silently)."""
    known = {name for name, _ in _flag_actions(parser)} | OTHER_VARIABLES
    return sorted(k for k in environ if k.startswith(PREFIX) and k not in known)


def service_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers whose flags the environment may set: the two services."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {name: sub for name, sub in action.choices.items() if name in SERVICE_COMMANDS}
    return {}


def parse_with_environment(parser: argparse.ArgumentParser, argv: list[str] | None,
                           environ: Mapping[str, str]) -> argparse.Namespace:
    """Parse the whole command line, taking the flags of a service command that it does not give from ``environ``."""
    services = service_parsers(parser)
    bound = {command: bind_environment(sub, environ) for command, sub in services.items()}
    args = parser.parse_args(argv)
    command = getattr(args, "command", None)
    if command in services:
        sub = services[command]
        for name in unknown_variables(sub, environ):
            print(f"mmiosplit {command}: warning: {name} is set, but {command} has no flag "
                  f"--{name[len(PREFIX):].lower().replace('_', '-')}; ignored", file=sys.stderr)
        resolve_environment(sub, args, bound[command], environ)
    return args


def environment_table(parsers: Mapping[str, argparse.ArgumentParser]) -> str:
    """A Markdown table of every variable, the commands that read it and the flag's help (for the README)."""
    rows: dict[str, tuple[list[str], str, str]] = {}
    for command, parser in parsers.items():
        for name, action in _flag_actions(parser):
            kind = ("on/off" if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
                    else "list" if isinstance(action, argparse._AppendAction) else "value")
            help_text = " ".join((action.help or "").split()).replace("|", "\\|")
            if name in rows:
                rows[name][0].append(command)
            else:
                rows[name] = ([command], kind, help_text)
    lines = ["| variable | flag | commands | kind | what it sets |", "|---|---|---|---|---|"]
    for name, (commands, kind, help_text) in sorted(rows.items()):
        flag = "--" + name[len(PREFIX):].lower().replace("_", "-")
        lines.append(f"| `{name}` | `{flag}` | {', '.join(commands)} | {kind} | {help_text} |")
    return "\n".join(lines)
