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


def test_combined_line_follows_ris_and_ie() -> None:
    gpio = Pl061("gpio0", 0x0903_0000)
    (spec,) = gpio.lines()
    assert (spec.index, spec.name) == (0, "gpiointr")
    changes: list[bool] = []
    gpio.irq_lines[0].connect(lambda _line, level: changes.append(level))
    assert gpio.write(0x408, 4, 0x08).ok  # IBE: pin 3 interrupts on both edges
    gpio.set_input(3, True)
    assert gpio.read(0x414, 4).value == 0x08 and changes == []  # RIS set, masked
    assert gpio.write(0x410, 4, 0x08).ok  # IE unmasks it inside the access
    assert changes == [True]
    assert gpio.read(0x020, 4).value == 0x08  # the input pin reads its level
    assert gpio.write(0x41C, 4, 0x08).ok
    assert changes == [True, False]


def test_edge_and_level_sensitivity() -> None:
    gpio = Pl061("gpio0", 0x0903_0000)
    assert gpio.write(0x410, 4, 0x03).ok  # IE pins 0, 1
    assert gpio.write(0x40C, 4, 0x01).ok  # IEV pin 0: rising edge / high level
    gpio.set_input(0, False)
    gpio.set_input(1, True)  # pin 1 edge, IEV 0: falling only
    assert not gpio.irq_lines[0].level
    gpio.set_input(1, False)
    assert gpio.irq_lines[0].level
    assert gpio.write(0x41C, 4, 0x02).ok
    assert gpio.write(0x404, 4, 0x01).ok  # IS pin 0: level-sensitive, high
    assert not gpio.irq_lines[0].level
    gpio.set_input(0, True)
    assert gpio.irq_lines[0].level
    assert gpio.write(0x41C, 4, 0x01).ok  # clearing does not stick while the level holds
    assert gpio.irq_lines[0].level
    gpio.set_input(0, False)
    assert not gpio.irq_lines[0].level
