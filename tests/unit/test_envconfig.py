"""Service flags from MMIOSPLIT_<FLAG> variables: names, conversions, precedence and errors."""

from __future__ import annotations

import pytest

from mmiosplit_cli.cli import build_parser
from mmiosplit_cli.envconfig import environment_table, parse_with_environment, service_parsers


def parse(argv: list[str], env: dict[str, str]):  # type: ignore[no-untyped-def]
    return parse_with_environment(build_parser(), argv, env)


def test_every_service_flag_from_the_environment() -> None:
    env = {"MMIOSPLIT_LISTEN": "0.0.0.0:50052", "MMIOSPLIT_DEVICE": "pl011@0x09000000\n scratch@0x0a000000,size=0x1000",
           "MMIOSPLIT_CONFIG": "/etc/a.toml /etc/b.toml", "MMIOSPLIT_NAME": "scratch", "MMIOSPLIT_NO_SHADOWS": "yes",
           "MMIOSPLIT_CPU_AFFINITY": "1", "MMIOSPLIT_GRACE_S": "2.5", "MMIOSPLIT_METRICS_PORT": "9100",
           "MMIOSPLIT_METRICS_HOST": "0.0.0.0", "MMIOSPLIT_VERBOSE": "1", "MMIOSPLIT_CONSOLE_LOG": "/tmp/c.log"}
    args = parse(["serve-devices"], env)
    assert args.listen == "0.0.0.0:50052"
    assert args.device == ["pl011@0x09000000", "scratch@0x0a000000,size=0x1000"]
    assert args.config == ["/etc/a.toml", "/etc/b.toml"]
    assert (args.name, args.no_shadows, args.cpu_affinity, args.grace_s) == ("scratch", True, 1, 2.5)
    assert (args.metrics_port, args.metrics_host, args.verbose, args.console_log) == (9100, "0.0.0.0", True,
                                                                                       "/tmp/c.log")
    vcpu = parse(["serve-vcpu"], {"MMIOSPLIT_LISTEN": "unix:/run/v.sock", "MMIOSPLIT_MAX_RAM": "1G"})
    assert (vcpu.listen, vcpu.max_ram) == ("unix:/run/v.sock", 2**30)


def test_flags_win_and_a_list_flag_replaces_the_whole_list() -> None:
    env = {"MMIOSPLIT_LISTEN": "127.0.0.1:1", "MMIOSPLIT_DEVICE": "pl011@0x09000000 pl031@0x09010000",
           "MMIOSPLIT_VERBOSE": "0"}
    args = parse(["serve-devices", "--listen", "127.0.0.1:2", "--device", "scratch@0x0a000000", "-v"], env)
    assert args.listen == "127.0.0.1:2"
    assert args.device == ["scratch@0x0a000000"]
    assert args.verbose is True


def test_unset_variables_leave_the_defaults() -> None:
    args = parse(["serve-devices", "--listen", "127.0.0.1:2"], {})
    assert (args.device, args.grace_s, args.verbose, args.name) == (None, 10.0, False, "mmiosplit-devices")
    assert parse(["serve-devices"], {"MMIOSPLIT_VERBOSE": "off", "MMIOSPLIT_LISTEN": "a:1"}).verbose is False


@pytest.mark.parametrize(("name", "value", "says"), [
    ("MMIOSPLIT_LISTEN", "nowhere", "MMIOSPLIT_LISTEN='nowhere': malformed address"),
    ("MMIOSPLIT_METRICS_PORT", "http", "MMIOSPLIT_METRICS_PORT='http': 'http' is not a port number"),
    ("MMIOSPLIT_GRACE_S", "-1", "MMIOSPLIT_GRACE_S='-1': -1 s is out of range"),
    ("MMIOSPLIT_VERBOSE", "maybe", "MMIOSPLIT_VERBOSE='maybe': expected 1/0"),
    ("MMIOSPLIT_DEVICE", "  ", "MMIOSPLIT_DEVICE='  ': empty"),
    ("MMIOSPLIT_CPU_AFFINITY", "one", "MMIOSPLIT_CPU_AFFINITY='one'"),
])
def test_a_bad_value_is_an_error_naming_the_variable(name: str, value: str, says: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    env = {"MMIOSPLIT_LISTEN": "127.0.0.1:1", name: value}
    with pytest.raises(SystemExit) as exc:
        parse(["serve-devices"], env)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_listen_is_still_required_without_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["serve-vcpu"], {})
    assert "--listen" in capsys.readouterr().err


def test_an_unknown_variable_is_reported_not_ignored_silently(capsys: pytest.CaptureFixture[str]) -> None:
    parse(["serve-vcpu"], {"MMIOSPLIT_LISTN": "x", "MMIOSPLIT_LISTEN": "127.0.0.1:1"})
    assert "MMIOSPLIT_LISTN is set, but serve-vcpu has no flag --listn" in capsys.readouterr().err


def test_client_commands_do_not_read_the_environment() -> None:
    args = parse(["run", "x.bin"], {"MMIOSPLIT_DEVICE": "pl011@0x09000000", "MMIOSPLIT_TIMEOUT": "3"})
    assert args.device is None and args.timeout is None


def test_the_readme_table_is_the_parsers_table() -> None:
    """The README documents every variable in one table, generated from the parsers (so it cannot drift)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = environment_table(service_parsers(build_parser()))
    assert table in readme, "README's environment table is stale: paste this in its place:\n" + table


def test_services_that_run_starts_do_not_take_the_users_variables(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`mmiosplit run` passes its services every setting as a flag; MMIOSPLIT_CONFIG in the user's shell must not add
    devices to the embedded device service behind them."""
    from mmiosplit_cli.launcher import LocalServices

    seen: dict[str, object] = {}

    class FakePopen:
        def __init__(self, cmd: list[str], **kw: object) -> None:
            seen.update(kw)

    monkeypatch.setenv("MMIOSPLIT_CONFIG", "/etc/elsewhere.toml")
    monkeypatch.setattr("subprocess.Popen", FakePopen)
    LocalServices(tmp_path).start("device service", ["serve-devices"], "unix:/nowhere.sock")
    env = seen["env"]
    assert isinstance(env, dict) and "MMIOSPLIT_CONFIG" not in env and env["PYTHONUNBUFFERED"] == "1"
