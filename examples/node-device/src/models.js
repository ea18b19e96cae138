// The two device models this service hosts, behaving as the Python service's models do (device_service/models/
// pl011.py and scratch.py): same registers, reset values, FIFO and interrupt rules, same error messages. A model
// answers read(offset, size) -> {value} | {error, message} and write(offset, size, bytes) -> {} | {error, message},
// with offsets relative to its base; the bus (host.js) routes and checks addresses first.

import { ConfigError, hex, intInRange, parseBool, parseSize } from './config.js';

// Why a device refused an access, as the Python model layer names it (AccessError). The bus turns any of them
// into DEVICE_ERROR with the device and address in front of the message.
const INVALID_REGISTER = 'invalid register';
const INVALID_ACCESS_SIZE = 'invalid access size';
const UNALIGNED_ACCESS = 'unaligned access';
const OUT_OF_RANGE = 'out of range';

const fail = (error, message) => ({ error, message });
/** Python's f"{n:#05x}": at least three hex digits after 0x. */
const hex05 = (n) => `0x${n.toString(16).padStart(3, '0')}`;

/** One interrupt output of a device: the host connects a sink; only changes reach it. */
export class IrqLine {
  constructor(device, index, name, trigger = 'level') {
    Object.assign(this, { device, index, name, trigger, level: false, sink: null });
  }

  set(level) {
    if (level === this.level) return;
    this.level = level;
    this.sink?.(this, level);
  }
}

// ----- registers: the rules of device_service/registers.py -----------------------------------------------------

/**
 * A table of 32-bit registers. An access must start at a register's offset (inside one: UNALIGNED_ACCESS,
 * elsewhere: INVALID_REGISTER) and be 1, 2 or 4 bytes; a narrow read returns the low bytes, a narrow write is
 * zero-extended; writes to read-only registers are ignored, reads of write-only ones return 0.
 */
class RegisterBank {
  constructor(registers) {
    this.registers = [...registers].sort((a, b) => a.offset - b.offset);
    this.byOffset = new Map(this.registers.map((r) => [r.offset, r]));
    this.reset();
  }

  reset() {
    this.values = Object.fromEntries(this.registers.map((r) => [r.name, r.reset ?? 0]));
  }

  registerAt(offset) {
    return this.registers.find((r) => r.offset <= offset && offset < r.offset + 4);
  }

  read(offset, size) {
    const reg = this.byOffset.get(offset);
    if (reg === undefined) return this.miss(offset, size, 'read');
    if (![1, 2, 4].includes(size)) return this.badSize(reg, size, 'read');
    if (reg.access === 'wo') return { value: 0 };
    const value = reg.onRead ? reg.onRead() : this.values[reg.name];
    return { value: value & sizeMask(size) };
  }

  write(offset, size, value) {
    const reg = this.byOffset.get(offset);
    if (reg === undefined) return this.miss(offset, size, 'write');
    if (![1, 2, 4].includes(size)) return this.badSize(reg, size, 'write');
    if (reg.access === 'ro') return {};
    const mask = reg.mask ?? 0xffffffff;
    const old = this.values[reg.name];
    const next = ((old & ~mask) | (value & sizeMask(size) & mask)) >>> 0;
    this.values[reg.name] = next;
    reg.onWrite?.(old, next);
    return {};
  }

  miss(offset, size, verb) {
    const inside = this.registerAt(offset);
    if (inside !== undefined) {
      return fail(UNALIGNED_ACCESS, `${size}-byte ${verb} at offset ${hex05(offset)} is inside ${inside.name} `
        + `(${hex05(inside.offset)}); access it at its own offset`);
    }
    return fail(INVALID_REGISTER, `${size}-byte ${verb} at offset ${hex05(offset)}: no register there`);
  }

  badSize(reg, size, verb) {
    return fail(INVALID_ACCESS_SIZE, `${reg.name} (${hex05(reg.offset)}) does not accept ${size}-byte ${verb}s; `
      + 'it accepts 1, 2, 4-byte accesses');
  }
}

const sizeMask = (size) => (size >= 4 ? 0xffffffff : (1 << (8 * size)) - 1);
const littleEndian = (bytes) => bytes.reduce((value, byte, i) => value + byte * 2 ** (8 * i), 0);

// ----- PL011 ------------------------------------------------------------------------------------------------------

const FR_TXFE = 1 << 7;
const FR_RXFF = 1 << 6;
const FR_RXFE = 1 << 4;
const LCR_H_FEN = 1 << 4;
const CR_TXE = 1 << 8;
const CR_RXE = 1 << 9;
const INT_RX = 1 << 4;
const INT_TX = 1 << 5;
const INT_RT = 1 << 6; // receive timeout
const INT_ALL = (1 << 11) - 1;
const FIFO_DEPTH = 32;
// UARTIFLS.RXIFLSEL trigger levels in eighths of the FIFO; reserved encodings behave as 1/2, the reset level.
const RX_TRIGGER_EIGHTHS = [1, 2, 4, 6, 7];
// The PrimeCell ID bytes QEMU's pl011_id_arm returns, so firmware that prints them matches QEMU.
const PRIMECELL_ID = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];
// The shadow registers (4-byte reads only): RSR, FR, ILPR, IBRD, FBRD, LCR_H, CR, IFLS, IMSC, RIS, MIS, DMACR and
// the IDs, as the Python model declares them.
const SHADOWED = [0x004, 0x018, 0x020, 0x024, 0x028, 0x02c, 0x030, 0x034, 0x038, 0x03c, 0x040, 0x048,
  0xfe0, 0xfe4, 0xfe8, 0xfec, 0xff0, 0xff4, 0xff8, 0xffc];
const PRIMECELL_NAMES = ['PeriphID0', 'PeriphID1', 'PeriphID2', 'PeriphID3', 'PCellID0', 'PCellID1', 'PCellID2', 'PCellID3'];

/**
 * An ARM PL011 UART whose transmitter drains at once (FR.TXFE always set, TX interrupt on every DR write, as
 * QEMU) and whose receiver is fed by receive(). UARTINTR (line 0) is RIS & IMSC, driven after every register
 * access and on receive. The RX interrupt fires at the UARTIFLS trigger level; the receive-timeout status is
 * set while received data waits. No loopback, break or modem lines.
 */
export class Pl011 {
  static type = 'pl011';
  static compatible = ['arm,pl011', 'arm,primecell'];
  static options = {};

  constructor(name, base) {
    this.name = name;
    this.base = base;
    this.rxFifo = [];
    this.output = null; // where transmitted bytes go (the console hub)
    this.lines = [new IrqLine(name, 0, 'uartintr')];
    this.regs = new RegisterBank([
      { name: 'DR', offset: 0x000, mask: 0xff, onRead: () => this.readDr(), onWrite: (o, n) => this.writeDr(n) },
      { name: 'RSR', offset: 0x004, mask: 0xf, onWrite: () => { this.regs.values.RSR = 0; } }, // ECR on write
      { name: 'FR', offset: 0x018, reset: FR_TXFE | FR_RXFE, access: 'ro', onRead: () => this.readFr() },
      { name: 'ILPR', offset: 0x020, mask: 0xff },
      { name: 'IBRD', offset: 0x024, mask: 0xffff },
      { name: 'FBRD', offset: 0x028, mask: 0x3f },
      { name: 'LCR_H', offset: 0x02c, mask: 0xff, onWrite: (o, n) => this.writeLcrH(o, n) },
      { name: 'CR', offset: 0x030, reset: CR_RXE | CR_TXE, mask: 0xffff },
      { name: 'IFLS', offset: 0x034, reset: 0x12, mask: 0x3f },
      { name: 'IMSC', offset: 0x038, mask: INT_ALL },
      { name: 'RIS', offset: 0x03c, access: 'ro' },
      { name: 'MIS', offset: 0x040, access: 'ro', onRead: () => this.ris & this.regs.values.IMSC },
      { name: 'ICR', offset: 0x044, access: 'wo', mask: INT_ALL, onWrite: (o, n) => { this.ris &= ~n; } },
      { name: 'DMACR', offset: 0x048, mask: 0x7 },
      ...PRIMECELL_ID.map((value, i) => ({ name: PRIMECELL_NAMES[i], offset: 0xfe0 + 4 * i, reset: value, access: 'ro' })),
    ]);
  }

  get ris() { return this.regs.values.RIS; }
  set ris(value) { this.regs.values.RIS = value & 0xffffffff; }

  regions() {
    return [{ name: 'regs', offset: 0n, size: 0x1000n, accessSizes: [1, 2, 4], posted: false, deadlineMs: 0,
      shadows: SHADOWED.map((offset) => [offset, 4]) }];
  }

  describe() { return { 'fifo-depth': String(FIFO_DEPTH) }; }

  /**
   * A shadow register's value now, as a 4-byte read returns it, changing nothing. Shadowed: every register whose
   * read has no side effect (not DR, which pops the FIFO) and that can be read (not the write-only ICR).
   */
  peek(region, offset, size) {
    const reg = region === 'regs' && size === 4 && SHADOWED.includes(offset) ? this.regs.byOffset.get(offset) : undefined;
    if (reg === undefined) throw new Error(`${this.name}: no shadow register of ${size} bytes at ${region}+${hex(offset)}`);
    const bytes = Buffer.alloc(4);
    bytes.writeUInt32LE((reg.onRead ? reg.onRead() : this.regs.values[reg.name]) >>> 0);
    return bytes;
  }

  read(offset, size) {
    const result = this.regs.read(offset, size);
    this.update();
    return result;
  }

  write(offset, size, bytes) {
    const result = this.regs.write(offset, size, littleEndian(bytes));
    this.update();
    return result;
  }

  /** Registers back to reset, RX FIFO emptied; what was transmitted stays transmitted. */
  reset() {
    this.regs.reset();
    this.rxFifo = [];
    this.update();
  }

  /** Put input into the RX FIFO while it has room; returns how many bytes were taken. */
  receive(data) {
    const taken = data.subarray(0, this.rxSpace());
    if (taken.length === 0) return 0;
    const before = this.rxFifo.length;
    this.rxFifo.push(...taken);
    const trigger = this.rxTriggerLevel();
    if (before < trigger && trigger <= this.rxFifo.length) this.ris |= INT_RX;
    this.ris |= INT_RT;
    this.update();
    this.shadowsChanged?.(); // FR, RIS and MIS changed without a guest access
    return taken.length;
  }

  rxSpace() { return this.fifoDepth() - this.rxFifo.length; }

  fifoDepth() { return this.regs.values.LCR_H & LCR_H_FEN ? FIFO_DEPTH : 1; }

  rxTriggerLevel() {
    if (!(this.regs.values.LCR_H & LCR_H_FEN)) return 1;
    const select = (this.regs.values.IFLS >> 3) & 0x7;
    return (FIFO_DEPTH * (RX_TRIGGER_EIGHTHS[select] ?? 4)) / 8;
  }

  /** Drive UARTINTR: any raw status bit that is unmasked (QEMU's pl011_update). */
  update() { this.lines[0].set(Boolean(this.ris & this.regs.values.IMSC)); }

  readDr() {
    if (this.rxFifo.length === 0) return 0;
    const character = this.rxFifo.shift();
    if (this.rxFifo.length < this.rxTriggerLevel()) this.ris &= ~INT_RX;
    if (this.rxFifo.length === 0) this.ris &= ~INT_RT;
    return character;
  }

  writeDr(value) {
    this.output?.(Buffer.of(value & 0xff));
    this.ris |= INT_TX;
  }

  readFr() {
    const level = this.rxFifo.length;
    let flags = FR_TXFE;
    if (level === 0) flags |= FR_RXFE;
    if (level >= this.fifoDepth()) flags |= FR_RXFF;
    return flags;
  }

  writeLcrH(old, next) {
    if ((old ^ next) & LCR_H_FEN) { // changing FEN empties the receive FIFO (as QEMU)
      this.rxFifo = [];
      this.ris &= ~(INT_RX | INT_RT);
    }
  }
}

// ----- scratch ----------------------------------------------------------------------------------------------------

const MAX_SCRATCH = 64n * 1024n * 1024n;

function scratchSize(text) {
  const size = parseSize(text);
  if (!(size > 0n && size <= MAX_SCRATCH)) throw new ConfigError(`size: size must be between 1 byte and 64 MiB, got ${hex(size)}`);
  return size;
}

/**
 * Memory behind an MMIO region: any bus size at any offset, little-endian, reads back what was written, zero at
 * reset. delay=US makes every access take that long, holding the service (as the Python model holds its lock);
 * deadline=MS declares the region's exit deadline.
 */
export class Scratch {
  static type = 'scratch';
  static compatible = ['mmiosplit,scratch'];
  static options = {
    size: { parse: scratchSize, expects: 'a size between 1 byte and 64 MiB, like 0x1000 or 4k' },
    posted: { parse: parseBool, expects: 'on or off' },
    delay: { parse: intInRange(0, 10_000_000), expects: 'microseconds each access takes, 0 to 10000000' },
    deadline: { parse: intInRange(1, 3_600_000), expects: "the region's exit deadline in milliseconds, 1 to 3600000" },
  };

  constructor(name, base, { size = 0x1000n, posted = false, delay = 0, deadline = 0 } = {}) {
    Object.assign(this, { name, base, size, posted, delayUs: delay, deadlineMs: deadline, lines: [] });
    this.memory = Buffer.alloc(Number(size));
  }

  regions() {
    return [{ name: 'mem', offset: 0n, size: this.size, accessSizes: [1, 2, 4, 8], posted: this.posted,
      deadlineMs: this.deadlineMs }];
  }

  describe() {
    const out = { size: hex(this.size), posted: this.posted ? 'on' : 'off' };
    if (this.delayUs) out.delay = String(this.delayUs);
    if (this.deadlineMs) out.deadline = String(this.deadlineMs);
    return out;
  }

  /** How long each access takes, in ms (0: none); the host waits for it with the service held. */
  get delayMs() { return this.delayUs / 1000; }

  check(offset, size, verb) {
    if (offset + size > this.memory.length) {
      return fail(OUT_OF_RANGE, `${size}-byte ${verb} at offset ${hex(offset)} is past the end of ${hex(this.size)} bytes`);
    }
    return null;
  }

  read(offset, size) {
    return this.check(offset, size, 'read') ?? { bytes: Buffer.from(this.memory.subarray(offset, offset + size)) };
  }

  write(offset, size, bytes) {
    const error = this.check(offset, size, 'write');
    if (error) return error;
    bytes.copy(this.memory, offset, 0, size);
    return {};
  }

  reset() { this.memory.fill(0); }
}

export const DEVICE_TYPES = { pl011: Pl011, scratch: Scratch };
