"""PL061 GPIO: the masked data window, direction, interrupt clear, ID registers."""

from __future__ import annotations

from device_service.models.pl061 import Pl061


def test_data_window_masks_by_address_bits() -> None:
    gpio = Pl061("gpio0", 0x0903_0000)
    assert gpio.write(0x400, 4, 0x0F).ok  # pins 0-3 are outputs
    assert gpio.write(0x3FC, 4, 0xFF).ok  # all-pins window: only outputs change
    assert gpio.read(0x3FC, 4).value == 0x0F
    assert gpio.read(0x004, 4).value == 0x01  # address bit 2 selects pin 0 only
    assert gpio.write(0x008, 4, 0x00).ok  # clears pin 1 only
    assert gpio.read(0x3FC, 4).value == 0x0D
    assert not gpio.read(0x002, 4).ok  # not a word boundary


def test_interrupt_clear_and_ids() -> None:
    gpio = Pl061("gpio0", 0x0903_0000)
    gpio.regs["RIS"] = 0x05
    assert gpio.write(0x410, 4, 0x04).ok
    assert gpio.read(0x418, 4).value == 0x04  # MIS = RIS & IE
    assert gpio.write(0x41C, 4, 0x04).ok
    assert gpio.read(0x414, 4).value == 0x01
    assert [gpio.read(0xFE0 + 4 * i, 4).value for i in range(8)] == [0x61, 0x10, 0x04, 0x00, 0x0D, 0xF0, 0x05, 0xB1]
    gpio.reset()
    assert gpio.read(0x400, 4).value == 0 and gpio.read(0x3FC, 4).value == 0
