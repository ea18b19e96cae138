// What a device service does for the vCPUs that reach it, without gRPC: the bus that routes an access to its
// device (with the checks and statuses of the Python service's device_service/dispatch.py and bus.py), the
// interrupt lines and their generations (lines.py), the consoles (host.py's ConsoleHub) and exit-stream sessions
// (sessions.py). Node runs it all on one thread, so "the host's lock" of the Python service is a queue of turns
// (HostTurns): it only matters while a slow access (scratch delay=) holds the service.

import fs from 'node:fs';
import { ConfigError, hex, pyRepr } from './config.js';

export const STATUS = {
  OK: 'COMPLETION_STATUS_OK',
  DEVICE_ERROR: 'COMPLETION_STATUS_DEVICE_ERROR',
  NO_DEVICE: 'COMPLETION_STATUS_NO_DEVICE',
  BAD_REQUEST: 'COMPLETION_STATUS_BAD_REQUEST',
  CANCELLED: 'COMPLETION_STATUS_CANCELLED',
};
const BUS_SIZES = [1, 2, 4, 8];
/** Console output kept while nobody listens, for the first listener. */
const CONSOLE_BACKLOG = 1 << 20;

/** CLOCK_MONOTONIC in ns: libuv's hrtime reads it on Linux, so raised_ns means what the Python service's does. */
const monotonicNs = () => process.hrtime.bigint();

/** The kernel's boot id names this host's CLOCK_MONOTONIC (Describe's clock_id); empty where there is none. */
export function clockId() {
  try {
    return fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return '';
  }
}

// ----- the bus ----------------------------------------------------------------------------------------------------

class BusRegion {
  constructor(device, spec) {
    Object.assign(this, { device, spec, base: device.base + spec.offset, size: spec.size });
    this.end = this.base + this.size;
  }

  toString() { return `${this.device.name}.${this.spec.name} [${hex(this.base)}-${hex(this.end - 1n)}]`; }
}

export class Bus {
  /** Devices in the order given; overlaps and duplicate names are refused here, never found at run time. */
  constructor(devices) {
    this.devices = devices;
    const names = new Map();
    for (const device of devices) {
      const other = names.get(device.name);
      if (other) {
        throw new ConfigError(`two devices are named ${pyRepr(device.name)}: ${other.constructor.type} at `
          + `${hex(other.base)} and ${device.constructor.type} at ${hex(device.base)}`);
      }
      names.set(device.name, device);
    }
    this.regions = devices.flatMap((d) => d.regions().map((spec) => new BusRegion(d, spec)))
      .sort((a, b) => (a.base < b.base ? -1 : a.base > b.base ? 1 : 0));
    for (const [i, region] of this.regions.entries()) {
      if (region.end > 1n << 64n) throw new ConfigError(`${region} runs past the end of the 64-bit address space`);
      const before = this.regions[i - 1];
      if (before && region.base < before.end) throw new ConfigError(`${before} overlaps ${region}`);
    }
  }

  find(address) {
    // A handful of regions: a linear scan is as fast as a binary search would be.
    for (const region of this.regions) {
      if (region.base <= address && address < region.end) return region;
    }
    return null;
  }

  /**
   * Perform one access (data in guest-memory order for a write): {status, data?, error?} and the region it
   * reached. The same checks, order and messages as the Python service's dispatch() and DeviceBus.
   */
  dispatch(address, length, isWrite, data) {
    const region = this.find(address);
    const verb = isWrite ? 'write' : 'read';
    if (!BUS_SIZES.includes(length)) {
      return [{ status: STATUS.BAD_REQUEST, error: `access length ${length} at ${hex(address)} is not 1, 2, 4 or 8` }, null];
    }
    if (isWrite && data.length !== length) {
      return [{ status: STATUS.BAD_REQUEST, error: `write of length ${length} at ${hex(address)} carries ${data.length} data bytes` }, null];
    }
    if (region === null) {
      return [{ status: STATUS.NO_DEVICE, error: `${length}-byte ${verb} at ${hex(address)}: no device there` }, null];
    }
    if (!region.spec.accessSizes.includes(length)) {
      return [{ status: STATUS.DEVICE_ERROR, error: `${length}-byte ${verb} at ${hex(address)}: ${region} takes `
        + `${region.spec.accessSizes.join(', ')}-byte accesses` }, region];
    }
    if (address + BigInt(length) > region.end) {
      return [{ status: STATUS.DEVICE_ERROR, error: `${length}-byte ${verb} at ${hex(address)} straddles the end of ${region}` }, region];
    }
    const device = region.device;
    const offset = Number(address - device.base);
    let result;
    try {
      result = isWrite ? device.write(offset, length, data) : device.read(offset, length);
    } catch (err) { // a model that throws is a bug in the model: the guest gets a fault, not a dead service
      return [{ status: STATUS.DEVICE_ERROR, error: `${device.name}: ${length}-byte ${verb} at ${hex(address)} raised ${err}` }, region];
    }
    if (result.error) { // a region was found, so whatever the device says it is its error, never NO_DEVICE
      return [{ status: STATUS.DEVICE_ERROR, error: `${device.name} at ${hex(address)}: ${result.message}` }, region];
    }
    if (isWrite) return [{ status: STATUS.OK }, region];
    let bytes = result.bytes;
    if (bytes === undefined) {
      bytes = Buffer.alloc(length);
      bytes.writeUIntLE(result.value, 0, Math.min(length, 6));
    }
    return [{ status: STATUS.OK, data: bytes }, region];
  }
}

// ----- interrupt lines --------------------------------------------------------------------------------------------

/**
 * The lines of every device, their levels and one generation counter for all of them. A change made while an
 * access is being answered (between begin and end) rides on that access's Completion; any other change (console
 * input, reset) goes to the watchers at once. Both say "levels as of generation G", so the vCPU side keeps per
 * line the level of the highest generation it saw.
 */
export class LineTracker {
  constructor(bus) {
    this.generation = 0n;
    this.lines = bus.devices.flatMap((d) => d.lines).sort((a, b) => (a.device < b.device ? -1 : a.device > b.device ? 1
      : a.index - b.index));
    this.times = new Map();
    this.collecting = null; // lines changed by the access being answered, or null
    this.subscribers = new Set();
    for (const line of this.lines) line.sink = (l) => this.onChange(l);
  }

  onChange(line) {
    const now = monotonicNs();
    this.generation += 1n;
    this.times.set(line, now);
    if (this.collecting !== null) {
      this.collecting.add(line);
      return;
    }
    const change = { generation: String(this.generation), raised_ns: String(now),
      levels: [{ device: line.device, index: line.index, level: line.level }] };
    for (const callback of this.subscribers) callback(change);
  }

  begin() { this.collecting = new Set(); }

  /** The levels of the lines changed since begin(), as of the current generation, or null when none changed. */
  end() {
    const changed = this.collecting;
    this.collecting = null;
    if (!changed || changed.size === 0) return null;
    const lines = this.lines.filter((l) => changed.has(l));
    const raised = lines.map((l) => this.times.get(l)).reduce((a, b) => (a > b ? a : b));
    return { generation: String(this.generation), raised_ns: String(raised),
      levels: lines.map((l) => ({ device: l.device, index: l.index, level: l.level })) };
  }

  /** Every level now (when there are lines), then each change no access made; returns the unsubscriber. */
  subscribe(callback) {
    if (this.lines.length) {
      callback({ generation: String(this.generation), raised_ns: '0',
        levels: this.lines.map((l) => ({ device: l.device, index: l.index, level: l.level })) });
    }
    this.subscribers.add(callback);
    return () => this.subscribers.delete(callback);
  }
}

// ----- shadow registers -------------------------------------------------------------------------------------------

/**
 * The last value sent of every shadow register (a register whose read has no side effect, which the vcpu service
 * answers from a copy without an exit), as the Python service's ShadowTracker keeps them. Every change gets a new
 * generation and goes to the watchers; since(g) gives an exit stream's completion everything that changed after the
 * generation its session was last sent, so a vCPU never reads a copy older than its own last completion.
 */
export class ShadowTracker {
  constructor(bus, enabled = true) {
    this.generation = 0n;
    this.windows = [];
    this.byDevice = new Map();
    this.subscribers = new Set();
    if (!enabled) return;
    for (const device of bus.devices) {
      const windows = device.regions().flatMap((r) => (r.shadows ?? []).map(([offset, size]) => ({
        device, region: r.name, offset, size, data: null, changed: 0n })));
      if (windows.length) {
        this.byDevice.set(device.name, windows);
        this.windows.push(...windows);
      }
    }
    if (this.windows.length) {
      this.generation = 1n;
      for (const w of this.windows) {
        w.data = w.device.peek(w.region, w.offset, w.size);
        w.changed = 1n;
      }
    }
  }

  /** The (offset, size) of the shadow registers of one region, as Describe lists them. */
  windowsOf(device, region) {
    return (this.byDevice.get(device) ?? []).filter((w) => w.region === region).map((w) => [w.offset, w.size])
      .sort((a, b) => a[0] - b[0]);
  }

  static value(w) {
    return { device: w.device.name, region: w.region, offset: String(w.offset), data: w.data };
  }

  /** Peek the shadow registers of `devices`: what changed gets a new generation and goes to every watcher. */
  refresh(devices) {
    if (!this.byDevice.size) return;
    const changed = [];
    for (const device of devices) {
      for (const w of this.byDevice.get(device.name) ?? []) {
        const data = device.peek(w.region, w.offset, w.size);
        if (!data.equals(w.data)) changed.push([w, data]);
      }
    }
    if (!changed.length) return;
    this.generation += 1n;
    for (const [w, data] of changed) {
      w.data = data;
      w.changed = this.generation;
    }
    const update = { generation: String(this.generation), values: changed.map(([w]) => ShadowTracker.value(w)) };
    for (const callback of this.subscribers) callback(update);
  }

  refreshAll() { this.refresh([...this.byDevice.values()].map((windows) => windows[0].device)); }

  /** Every value that changed after `generation` (null when none did), current as of the newest generation. */
  since(generation) {
    if (generation >= this.generation) return null;
    return { generation: String(this.generation),
      values: this.windows.filter((w) => w.changed > generation).map((w) => ShadowTracker.value(w)) };
  }

  /** Every value now (when any register is shadowed), then each change; returns the unsubscriber. */
  subscribe(callback) {
    if (this.windows.length) {
      callback({ generation: String(this.generation), values: this.windows.map((w) => ShadowTracker.value(w)) });
    }
    this.subscribers.add(callback);
    return () => this.subscribers.delete(callback);
  }
}

// ----- consoles ---------------------------------------------------------------------------------------------------

/**
 * Fans a UART's output out to its listeners and feeds their input into its RX FIFO. Output produced while nobody
 * listens is kept (up to CONSOLE_BACKLOG) for the first listener; input the FIFO cannot take yet waits and is
 * pumped in as the guest drains the FIFO (after every access to the UART).
 */
export class ConsoleHub {
  constructor(device, logFile, echo) {
    this.device = device;
    this.listeners = new Set();
    this.backlog = [];
    this.backlogBytes = 0;
    this.pending = Buffer.alloc(0);
    this.log = logFile ? fs.openSync(logFile, 'a') : null;
    this.echo = echo;
    device.output = (data) => this.onOutput(data);
  }

  onOutput(data) {
    if (this.log !== null) fs.writeSync(this.log, data);
    if (this.echo) process.stdout.write(data);
    if (this.listeners.size) {
      for (const listener of this.listeners) listener(data);
      return;
    }
    this.backlog.push(data);
    this.backlogBytes += data.length;
    if (this.backlogBytes > 2 * CONSOLE_BACKLOG) { // trimmed in chunks: keeps at least the last CONSOLE_BACKLOG
      const all = Buffer.concat(this.backlog).subarray(-CONSOLE_BACKLOG);
      this.backlog = [all];
      this.backlogBytes = all.length;
    }
  }

  attach(listener) {
    if (this.backlog.length) {
      listener(Buffer.concat(this.backlog).subarray(-CONSOLE_BACKLOG));
      this.backlog = [];
      this.backlogBytes = 0;
    }
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  feed(data) {
    this.pending = Buffer.concat([this.pending, data]);
    this.pump();
  }

  pump() {
    if (this.pending.length) this.pending = this.pending.subarray(this.device.receive(this.pending));
  }
}

// ----- the host ---------------------------------------------------------------------------------------------------

/**
 * Turns at the devices: one request at a time across every stream, as the Python host's lock. Taking a free
 * turn is synchronous (the usual case); a request arriving while a slow access holds the service waits, and a
 * Cancel read meanwhile means it is never performed.
 */
class HostTurns {
  constructor() {
    this.busy = false;
    this.waiting = [];
  }

  take() {
    if (!this.busy) {
      this.busy = true;
      return null;
    }
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  give() {
    const next = this.waiting.shift();
    if (next) next();
    else this.busy = false;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Unpack a posted batch into [address, bytes] pairs, or throw with the Python service's words. */
export function unpackPosted(batch) {
  const addresses = batch.address ?? [];
  const lengths = batch.length ?? [];
  const data = batch.data ?? Buffer.alloc(0);
  if (addresses.length !== lengths.length) {
    throw new Error(`posted batch has ${addresses.length} addresses but ${lengths.length} lengths`);
  }
  const total = lengths.reduce((a, b) => a + b, 0);
  if (total !== data.length) throw new Error(`posted batch lengths add up to ${total} bytes but carry ${data.length}`);
  let offset = 0;
  return addresses.map((address, i) => {
    const pair = [BigInt(address), data.subarray(offset, offset + lengths[i])];
    offset += lengths[i];
    return pair;
  });
}

export class DeviceHost {
  constructor(bus, { serviceName = 'mmiosplit-devices', consoleLog = null, echo = false, shadows = true } = {}) {
    this.bus = bus;
    this.serviceName = serviceName;
    this.lines = new LineTracker(bus);
    this.shadows = new ShadowTracker(bus, shadows);
    for (const device of bus.devices) {
      // State behind a shadow register changed without an access (input arrived): the watchers hear it at once.
      device.shadowsChanged = () => this.shadows.refresh([device]);
    }
    this.turns = new HostTurns();
    this.consoles = new Map();
    for (const device of bus.devices) {
      if (typeof device.receive === 'function') this.consoles.set(device.name, new ConsoleHub(device, consoleLog, echo));
    }
    this.goingAway = null;
  }

  /** Run fn with the service to itself (awaiting a turn only while another request holds it). */
  async exclusive(fn) {
    const wait = this.turns.take();
    if (wait !== null) await wait;
    try {
      return await fn();
    } finally {
      this.turns.give();
    }
  }

  console(name) {
    const hub = this.consoles.get(name);
    if (hub === undefined) {
      const known = [...this.consoles.keys()].join(', ') || 'none';
      throw new LookupError(`no UART named ${pyRepr(name)}; consoles: ${known}`);
    }
    return hub;
  }

  reset() {
    for (const device of this.bus.devices) device.reset();
    for (const hub of this.consoles.values()) hub.pump(); // input typed meanwhile goes into the emptied FIFO
    this.shadows.refreshAll(); // watchers hear the reset values
  }

  /** Type `data` on a UART's console (with the service to itself): what the RX FIFO cannot take now waits. */
  consoleInput(hub, data) {
    hub.feed(data);
    this.shadows.refresh([hub.device]);
  }

  /**
   * Apply the posted writes queued before an exit, then the access, unless isCancelled() says, once the service is
   * free for it, that its client gave up on it. `session` is the exit session: what its vCPU was sent of the shadow
   * registers.
   */
  async access(session, address, length, isWrite, data, posted, isCancelled) {
    return this.exclusive(async () => {
      this.lines.begin();
      const touched = new Set();
      let errors = [];
      let done;
      try {
        if (posted !== null) errors = await this.applyPosted(posted, touched);
        if (isCancelled()) { // its client gave up on it before it started: never performed
          done = { status: STATUS.CANCELLED, error: `the ${length}-byte ${isWrite ? 'write' : 'read'} at `
            + `${hex(address)} was cancelled before it started: never performed` };
        } else {
          done = await this.one(address, length, isWrite, data, touched);
        }
      } catch (err) {
        done = { status: STATUS.DEVICE_ERROR, error: `internal error: ${err}` };
      }
      return this.finish(session, done, errors, touched, this.lines.end());
    });
  }

  /** Apply a batch of posted writes, in order; the completion names the ones that failed. */
  async flush(session, writes) {
    return this.exclusive(async () => {
      this.lines.begin();
      const touched = new Set();
      const errors = await this.applyPosted(writes, touched); // one() never throws: a failing write is a posted error
      return this.finish(session, { status: STATUS.OK }, errors, touched, this.lines.end());
    });
  }

  /** Refuse a request that makes no sense; what the vCPU was not sent of the shadow registers still goes with it. */
  async badRequest(session, error) {
    return this.exclusive(() => this.finish(session, { status: STATUS.BAD_REQUEST, error }, [], new Set(), null));
  }

  async one(address, length, isWrite, data, touched) {
    const [done, region] = this.bus.dispatch(address, length, isWrite, data);
    if (region !== null) {
      touched.add(region.device);
      if (region.device.delayMs) await sleep(region.device.delayMs);
      this.consoles.get(region.device.name)?.pump(); // the guest may have drained the FIFO
    }
    return done;
  }

  async applyPosted(writes, touched) {
    const errors = [];
    for (const [index, [address, data]] of writes.entries()) {
      const done = await this.one(address, data.length, true, data, touched);
      if (done.status !== STATUS.OK) errors.push({ index, address: String(address), error: done.error });
    }
    return errors;
  }

  /** `done` with what the request changed besides the access: shadow values its vCPU was not sent, line levels. */
  finish(session, done, postedErrors, touched, lines) {
    this.shadows.refresh(touched);
    const shadow = this.shadows.since(session.shadowsSeen);
    const out = { ...done };
    if (postedErrors.length) out.posted_errors = postedErrors;
    if (shadow !== null) {
      session.shadowsSeen = this.shadows.generation;
      out.shadow = shadow;
    }
    if (lines !== null) out.lines = lines;
    return out;
  }
}

export class LookupError extends Error {}

// ----- sessions ---------------------------------------------------------------------------------------------------

/** A session with no stream for this long is forgotten (its vCPU can no longer resume it). */
const IDLE_MS = 120_000;
const MAX_SESSIONS = 4096;
/** More unacknowledged responses than this means the client does not acknowledge: the oldest are dropped. */
const MAX_UNACKED = 4096;

/** One vCPU's session: applied up to `applied`; the responses not yet acknowledged, by seq. */
export class ExitSession {
  constructor(id) {
    this.id = id;
    this.applied = 0n;
    this.shadowsSeen = 0n; // the shadow generation this session's vCPU has been sent up to
    this.responses = new Map();
    this.cancelled = new Set();
    this.streams = 0;
    this.idleSince = Date.now();
    // A resumed stream's repeat of a request the old stream is still applying waits for it, then is answered
    // from memory: requests of one session are handled one at a time.
    this.tail = Promise.resolve();
  }

  /** Run fn after every earlier request of this session has been handled. */
  serial(fn) {
    const run = this.tail.then(fn);
    this.tail = run.catch(() => {});
    return run;
  }

  acknowledge(ack) {
    if (this.responses.size && ack) {
      for (const seq of this.responses.keys()) if (seq <= ack) this.responses.delete(seq);
    }
  }

  record(seq, response, keep) {
    if (seq > this.applied) this.applied = seq;
    this.cancelled.delete(seq);
    if (keep) {
      this.responses.set(seq, response);
      if (this.responses.size > MAX_UNACKED) this.responses.delete(this.responses.keys().next().value);
    }
  }
}

export class SessionTable {
  constructor() { this.sessions = new Map(); }

  /** The session `id` with one more stream on it, and whether it was known; an empty id gets a private one. */
  attach(id) {
    this.expire();
    let session = id ? this.sessions.get(id) : undefined;
    const resumed = session !== undefined;
    if (!session) {
      session = new ExitSession(id);
      if (id) this.sessions.set(id, session);
    }
    session.streams += 1;
    return [session, resumed];
  }

  detach(session) {
    session.streams -= 1;
    if (session.streams <= 0) session.idleSince = Date.now();
  }

  expire() {
    const now = Date.now();
    for (const [id, s] of this.sessions) if (s.streams <= 0 && now - s.idleSince > IDLE_MS) this.sessions.delete(id);
    while (this.sessions.size >= MAX_SESSIONS) {
      const idle = [...this.sessions.values()].filter((s) => s.streams <= 0);
      if (!idle.length) break;
      this.sessions.delete(idle.reduce((a, b) => (a.idleSince <= b.idleSince ? a : b)).id);
    }
  }
}
