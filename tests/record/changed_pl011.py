"""``python -m tests.record.changed_pl011 VARIANT serve-devices ...``: the device service with a deliberately changed
PL011, for the replay tests to find.

VARIANT ``cr``: UARTCR resets to 0x301 instead of 0x300 (UARTEN set); ``fr``: UARTFR reads with BUSY set.
"""

from __future__ import annotations

import sys

from device_service.models import DEVICE_TYPES
from device_service.models.pl011 import FR_BUSY, Pl011
from mmiosplit_cli.cli import main

CHANGED_CR = 0x301


class ResetCrPl011(Pl011):
    """UARTCR resets to ``CHANGED_CR``."""

    def reset(self) -> None:
        super().reset()
        self.regs.values["CR"] = CHANGED_CR

    def __init__(self, name: str, base: int) -> None:
        super().__init__(name, base)
        self.regs.values["CR"] = CHANGED_CR


class BusyFrPl011(Pl011):
    """UARTFR reads with BUSY set."""

    def _read_fr(self) -> int:
        return super()._read_fr() | FR_BUSY


if __name__ == "__main__":
    variant, *rest = sys.argv[1:]
    DEVICE_TYPES["pl011"] = {"cr": ResetCrPl011, "fr": BusyFrPl011}[variant]
    raise SystemExit(main(rest))
