"""PL011 UART: reset values, FIFO and flags, transmit path, interrupts, IDs."""

from __future__ import annotations

import pytest

from device_service.model import AccessError
from device_service.models import pl011
from device_service.models.pl011 import (
    CR_RXE,
    CR_TXE,
    FR_RXFE,
    FR_RXFF,
    FR_TXFE,
    FR_TXFF,
    INT_RT,
    INT_RX,
    INT_TX,
    LCR_H_FEN,
    TX_KEEP_BYTES,
    Pl011,
)

DR, RSR, FR, ILPR, IBRD, FBRD, LCR_H, CR, IFLS, IMSC, RIS, MIS, ICR, DMACR = (
    0x000, 0x004, 0x018, 0x020, 0x024, 0x028, 0x02C, 0x030, 0x034, 0x038, 0x03C, 0x040, 0x044, 0x048,
)  # fmt: skip


def read(uart: Pl011, offset: int, size: int = 4) -> int:
    result = uart.read(offset, size)
    assert result.ok, result.message
    return result.value


def write(uart: Pl011, offset: int, value: int, size: int = 4) -> None:
    result = uart.write(offset, size, value)
    assert result.ok, result.message


@pytest.fixture
def uart() -> Pl011:
    return Pl011("uart0", 0x0900_0000)


def enable_fifo(uart: Pl011) -> None:
    write(uart, LCR_H, LCR_H_FEN | 0x60)  # 8N1 with FIFOs, as U-Boot and Linux set it


# --- reset state ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "value"),
    [(DR, 0), (RSR, 0), (FR, 0x90), (ILPR, 0), (IBRD, 0), (FBRD, 0), (LCR_H, 0), (CR, 0x0300),
     (IFLS, 0x12), (IMSC, 0), (RIS, 0), (MIS, 0), (DMACR, 0)],
)  # fmt: skip
def test_reset_values(uart: Pl011, offset: int, value: int) -> None:
    assert read(uart, offset) == value


def test_fr_reset_is_txfe_and_rxfe(uart: Pl011) -> None:
    assert read(uart, FR) == FR_TXFE | FR_RXFE
    assert read(uart, CR) == CR_RXE | CR_TXE


def test_primecell_ids_match_qemu(uart: Pl011) -> None:
    ids = [read(uart, 0xFE0 + 4 * i) for i in range(8)]
    assert ids == [0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1]


def test_reset_restores_registers_and_empties_rx(uart: Pl011) -> None:
    enable_fifo(uart)
    write(uart, IBRD, 0x27)
    write(uart, IMSC, 0x50)
    uart.receive(b"abc")
    uart.reset()
    assert read(uart, IBRD) == 0
    assert read(uart, IMSC) == 0
    assert read(uart, LCR_H) == 0
    assert read(uart, FR) == 0x90
    assert read(uart, RIS) == 0
    assert uart.rx_space() == 1


def test_config_registers_keep_only_their_bits(uart: Pl011) -> None:
    write(uart, IBRD, 0xFFFF_FFFF)
    write(uart, FBRD, 0xFFFF_FFFF)
    write(uart, IFLS, 0xFFFF_FFFF)
    write(uart, DMACR, 0xFFFF_FFFF)
    values = (read(uart, IBRD), read(uart, FBRD), read(uart, IFLS), read(uart, DMACR))
    assert values == (0xFFFF, 0x3F, 0x3F, 0x7)


# --- access sizes --------------------------------------------------------------------------


def test_byte_and_halfword_access_at_register_offset(uart: Pl011) -> None:
    write(uart, DR, 0x41, size=1)
    write(uart, DR, 0x42, size=2)
    assert bytes(uart.tx_log) == b"AB"
    assert read(uart, FR, size=1) == 0x90
    assert read(uart, CR, size=2) == 0x0300
    assert read(uart, CR, size=1) == 0x00


def test_bad_offsets_and_sizes(uart: Pl011) -> None:
    assert uart.read(0x008, 4).error is AccessError.INVALID_REGISTER
    assert uart.read(0x019, 1).error is AccessError.UNALIGNED_ACCESS
    assert uart.read(FR, 8).error is AccessError.INVALID_ACCESS_SIZE
    assert uart.regions()[0].access_sizes == (1, 2, 4)


def test_writes_to_flag_register_are_ignored(uart: Pl011) -> None:
    write(uart, FR, 0)
    assert read(uart, FR) == 0x90


# --- transmit ------------------------------------------------------------------------------


def test_tx_goes_to_sink_in_order_without_enabling_the_uart(uart: Pl011) -> None:
    out: list[bytes] = []
    uart.set_output(out.append)
    write(uart, CR, 0)  # UARTEN and TXE clear: QEMU transmits anyway
    for character in b"hello\n":
        write(uart, DR, character)
    assert b"".join(out) == b"hello\n"
    assert bytes(uart.tx_log) == b"hello\n"
    assert read(uart, FR) & (FR_TXFE | FR_TXFF) == FR_TXFE


def test_only_low_eight_bits_are_sent(uart: Pl011) -> None:
    write(uart, DR, 0x1234_5641)
    assert bytes(uart.tx_log) == b"A"


def test_backlog_is_delivered_when_a_sink_attaches(uart: Pl011) -> None:
    for character in b"early ":
        write(uart, DR, character)
    out: list[bytes] = []
    uart.set_output(out.append)
    write(uart, DR, ord("x"))
    assert out == [b"early ", b"x"]
    assert uart.tx_backlog == b""
    uart.set_output(None)
    write(uart, DR, ord("y"))
    assert uart.tx_backlog == b"y"
    uart.set_output(out.append)
    assert out[-1] == b"y"


def test_backlog_and_log_are_bounded(uart: Pl011, monkeypatch: pytest.MonkeyPatch) -> None:
    keep = 64
    monkeypatch.setattr(pl011, "TX_KEEP_BYTES", keep)
    total = 5 * keep + 7
    for index in range(total):
        write(uart, DR, index & 0xFF)
    assert keep <= len(uart.tx_log) < 2 * keep
    assert keep <= len(uart.tx_backlog) < 2 * keep
    assert len(uart.tx_backlog) + uart.tx_dropped == total
    expected_tail = bytes(i & 0xFF for i in range(total - keep, total))
    assert bytes(uart.tx_backlog[-keep:]) == expected_tail
    assert bytes(uart.tx_log[-keep:]) == expected_tail


def test_default_keep_is_64_kib() -> None:
    assert TX_KEEP_BYTES == 64 * 1024


def test_reset_keeps_transmitted_output(uart: Pl011) -> None:
    write(uart, DR, ord("z"))
    uart.reset()
    assert uart.tx_log == b"z" and uart.tx_backlog == b"z"


# --- receive -------------------------------------------------------------------------------


def test_fifo_disabled_holds_one_character(uart: Pl011) -> None:
    assert uart.rx_space() == 1
    assert uart.receive(b"xy") == 1
    assert read(uart, FR) & (FR_RXFF | FR_RXFE) == FR_RXFF
    assert uart.receive(b"y") == 0
    assert read(uart, DR) == ord("x")
    assert read(uart, FR) & (FR_RXFF | FR_RXFE) == FR_RXFE


def test_fifo_enabled_holds_thirty_two(uart: Pl011) -> None:
    enable_fifo(uart)
    assert uart.rx_space() == 32
    data = bytes(range(0x40, 0x40 + 40))
    taken = uart.receive(data)
    assert taken == 32
    assert uart.rx_space() == 0
    assert uart.receive(data[taken:]) == 0
    assert [read(uart, DR) for _ in range(32)] == list(data[:32])
    assert uart.receive(data[taken:]) == 8


def test_flags_follow_the_fifo_level(uart: Pl011) -> None:
    enable_fifo(uart)
    assert read(uart, FR) & (FR_RXFE | FR_RXFF) == FR_RXFE
    uart.receive(b"a")
    assert read(uart, FR) & (FR_RXFE | FR_RXFF) == 0
    uart.receive(b"b" * 31)
    assert read(uart, FR) & (FR_RXFE | FR_RXFF) == FR_RXFF
    read(uart, DR)
    assert read(uart, FR) & (FR_RXFE | FR_RXFF) == 0
    for _ in range(31):
        read(uart, DR)
    assert read(uart, FR) & (FR_RXFE | FR_RXFF) == FR_RXFE
    assert read(uart, FR) & FR_TXFE


def test_dr_pops_in_order_with_clear_error_bits(uart: Pl011) -> None:
    enable_fifo(uart)
    uart.receive(b"\x00\xffU")
    assert [read(uart, DR) for _ in range(3)] == [0x00, 0xFF, 0x55]
    assert read(uart, RSR) == 0


def test_empty_dr_reads_zero(uart: Pl011) -> None:
    assert read(uart, DR) == 0
    assert read(uart, FR) == 0x90


def test_changing_fen_empties_rx_fifo(uart: Pl011) -> None:
    enable_fifo(uart)
    uart.receive(b"abc")
    write(uart, LCR_H, 0x60)
    assert read(uart, FR) & FR_RXFE
    assert read(uart, RIS) & (INT_RX | INT_RT) == 0
    assert uart.rx_space() == 1


def test_rewriting_lcr_h_with_same_fen_keeps_rx(uart: Pl011) -> None:
    enable_fifo(uart)
    uart.receive(b"abc")
    enable_fifo(uart)
    assert read(uart, DR) == ord("a")


# --- interrupts ----------------------------------------------------------------------------


def test_tx_interrupt_on_dr_write_and_icr_clears(uart: Pl011) -> None:
    write(uart, DR, ord("a"))
    assert read(uart, RIS) == INT_TX
    assert read(uart, MIS) == 0
    assert not uart.irq_lines[0].level
    write(uart, IMSC, INT_TX)
    assert read(uart, MIS) == INT_TX
    assert uart.irq_lines[0].level
    write(uart, ICR, INT_TX)
    assert read(uart, RIS) == 0
    assert not uart.irq_lines[0].level


def test_icr_reads_zero_and_only_clears_written_bits(uart: Pl011) -> None:
    write(uart, DR, ord("a"))
    uart.receive(b"b")
    write(uart, ICR, INT_RX)
    assert read(uart, RIS) == INT_TX | INT_RT
    assert read(uart, ICR) == 0


def test_rx_interrupt_at_one_character_without_fifo(uart: Pl011) -> None:
    uart.receive(b"x")
    assert read(uart, RIS) & (INT_RX | INT_RT) == INT_RX | INT_RT
    read(uart, DR)
    assert read(uart, RIS) & (INT_RX | INT_RT) == 0


def test_rx_interrupt_at_ifls_trigger_level(uart: Pl011) -> None:
    enable_fifo(uart)  # IFLS reset 0x12: RX trigger at 1/2 full = 16 characters
    assert uart.rx_trigger_level() == 16
    uart.receive(b"a" * 15)
    assert read(uart, RIS) & (INT_RX | INT_RT) == INT_RT  # data waiting, below the trigger
    uart.receive(b"a")
    assert read(uart, RIS) & INT_RX
    read(uart, DR)  # 15 left: below the trigger again
    assert read(uart, RIS) & (INT_RX | INT_RT) == INT_RT
    for _ in range(15):
        read(uart, DR)
    assert read(uart, RIS) & (INT_RX | INT_RT) == 0


@pytest.mark.parametrize(("rxiflsel", "level"), [(0, 4), (1, 8), (2, 16), (3, 24), (4, 28), (7, 16)])
def test_rx_trigger_levels(uart: Pl011, rxiflsel: int, level: int) -> None:
    enable_fifo(uart)
    write(uart, IFLS, rxiflsel << 3)
    assert uart.rx_trigger_level() == level
    uart.receive(b"z" * (level - 1))
    assert not read(uart, RIS) & INT_RX
    uart.receive(b"z")
    assert read(uart, RIS) & INT_RX


def test_masked_rx_interrupt_raises_the_line(uart: Pl011) -> None:
    write(uart, IMSC, INT_RX)
    uart.receive(b"q")
    assert read(uart, MIS) == INT_RX
    assert uart.irq_lines[0].level


# --- register table ------------------------------------------------------------------------


def test_side_effect_free_registers(uart: Pl011) -> None:
    names = {r.name for r in uart.regs.side_effect_free_reads}
    assert "DR" not in names
    assert {"FR", "IBRD", "FBRD", "LCR_H", "CR", "IFLS", "IMSC", "PeriphID0", "PCellID3"} <= names


def test_describe_and_region(uart: Pl011) -> None:
    (region,) = uart.regions()
    assert (region.offset, region.size, region.posted) == (0, 0x1000, False)
    assert uart.describe() == {"fifo-depth": "32"}


# --- the interrupt line (UARTINTR) ------------------------------------------------------------


def _record(uart: Pl011) -> list[bool]:
    changes: list[bool] = []
    uart.irq_lines[0].connect(lambda _line, level: changes.append(level))
    return changes


def test_one_level_line_named_uartintr(uart: Pl011) -> None:
    (spec,) = uart.lines()
    assert (spec.index, spec.name, spec.trigger.value) == (0, "uartintr", "level")
    assert uart.irq_lines[0].device == "uart0"


def test_line_follows_ris_and_imsc_on_every_access(uart: Pl011) -> None:
    changes = _record(uart)
    write(uart, DR, ord("a"))  # TX raised in RIS, masked
    assert changes == []
    write(uart, IMSC, INT_TX)  # unmasking raises the line inside that access
    assert changes == [True]
    write(uart, DR, ord("b"))  # still high: no change reported
    assert changes == [True]
    write(uart, ICR, INT_TX)
    assert changes == [True, False]


def test_receive_raises_the_line_without_an_access(uart: Pl011) -> None:
    write(uart, IMSC, INT_RX | INT_RT)
    changes = _record(uart)
    uart.receive(b"k")
    assert changes == [True]
    assert read(uart, DR) == ord("k")  # draining the FIFO clears RX and RT
    assert changes == [True, False]


def test_receive_timeout_alone_raises_the_line(uart: Pl011) -> None:
    enable_fifo(uart)  # RX needs 16 characters now; RT is set while any wait
    write(uart, IMSC, INT_RT)
    changes = _record(uart)
    uart.receive(b"ab")
    assert changes == [True] and read(uart, RIS) & (INT_RX | INT_RT) == INT_RT


def test_reset_lowers_the_line(uart: Pl011) -> None:
    write(uart, IMSC, INT_TX)
    write(uart, DR, ord("a"))
    assert uart.irq_lines[0].level
    uart.reset()
    assert not uart.irq_lines[0].level
