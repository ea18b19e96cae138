"""`mmiosplit run --irq` and `--dma-window`: parsed into VmConfig irq_routes and dma_grants, or refused by name."""

from __future__ import annotations

import pytest

from mmiosplit_cli.cli import build_config, build_parser


def _args(*extra: str) -> object:
    return build_parser().parse_args(["run", "x.bin", *extra])


def test_irq_routes_go_into_the_vm_config() -> None:
    cfg = build_config(_args("--irq", "dma0=20", "--irq", "uart1.uartintr=9", "--irq", "gpio1.0=0x21"),
                       b"\0" * 4, "x.bin", [])
    routes = [(r.device, r.line, r.spi, r.device_service) for r in cfg.irq_routes]  # type: ignore[attr-defined]
    assert routes == [("dma0", "", 20, ""), ("uart1", "uartintr", 9, ""), ("gpio1", "0", 0x21, "")]


@pytest.mark.parametrize("text", ["dma0", "=3", "dma0=x", "dma0=-1"])
def test_bad_irq_routes_are_refused(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _args("--irq", text)
    assert "expected DEVICE[.LINE]=SPI" in capsys.readouterr().err


def test_dma_windows_name_a_given_service_or_the_embedded_one() -> None:
    args = _args("--dma-window", "embedded=buf:0x48000000:1M", "--dma-window", "unix:/d.sock=ring:0x40000000:4k")
    cfg = build_config(args, b"\0" * 4, "x.bin", ["unix:/d.sock", "unix:/e.sock"], embedded="unix:/e.sock")
    grants = [(g.device_service, g.name, g.base, g.size) for g in cfg.dma_grants]  # type: ignore[attr-defined]
    assert grants == [("unix:/e.sock", "buf", 0x4800_0000, 1 << 20), ("unix:/d.sock", "ring", 0x4000_0000, 4096)]
    with pytest.raises(ValueError, match=r"'unix:/x\.sock' is not a device service of this run"):
        build_config(_args("--dma-window", "unix:/x.sock=a:0x40000000:4k"), b"", "x.bin", ["unix:/d.sock"])
    with pytest.raises(ValueError, match="no embedded device service is started"):
        build_config(_args("--dma-window", "embedded=a:0x40000000:4k"), b"", "x.bin", ["unix:/d.sock"])


@pytest.mark.parametrize("text", ["embedded", "embedded=a:0x1000", "embedded=:0x1000:4k", "embedded=a:zz:4k"])
def test_bad_dma_windows_are_refused(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _args("--dma-window", text)
    assert "expected SERVICE=NAME:BASE:SIZE" in capsys.readouterr().err
