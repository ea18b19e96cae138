// The DeviceService over gRPC: Describe, ExitStream (handshake, sessions, resume, Cancel), Watch, Console, Reset
// and ReadMirror, plus grpc.health.v1. The protocol is the one in proto/mmiosplit/v1/device.proto, loaded from the
// repository at start (no generated code); every answer and refusal is the Python service's, word for word where
// a client or a person reads it.

import { randomUUID, timingSafeEqual } from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { pyRepr } from './config.js';
import { clockId, LookupError, unpackPosted } from './host.js';

export const PROTOCOL_VERSION = 1;
/** The optional parts of the protocol this service implements (docs/protocol.md, "Versions and features"). */
export const FEATURES = ['sessions', 'cancel', 'watch', 'vm-scoped-control'];
export const SERVICE_NAME = 'mmiosplit.v1.DeviceService';
const PROTO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../proto');
const LOADER_OPTIONS = {
  keepCase: true, // field names as in the .proto, like the Python service's messages
  longs: String, // uint64 addresses and generations do not fit a double: they travel as decimal strings, BigInt inside
  enums: String,
  defaults: true,
  oneofs: true, // `req.body` names the field of the oneof that is set
  includeDirs: [PROTO_ROOT],
};

// grpc.health.v1 as a small inline definition (the protocol is four fields; no .proto file is needed for it).
const HEALTH_JSON = {
  nested: { grpc: { nested: { health: { nested: { v1: { nested: {
    HealthCheckRequest: { fields: { service: { type: 'string', id: 1 } } },
    HealthCheckResponse: {
      fields: { status: { type: 'ServingStatus', id: 1 } },
      nested: { ServingStatus: { values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 } } },
    },
    Health: { methods: {
      Check: { requestType: 'HealthCheckRequest', responseType: 'HealthCheckResponse' },
      Watch: { requestType: 'HealthCheckRequest', responseType: 'HealthCheckResponse', responseStream: true },
    } },
  } } } } } } },
};

/** Marks a request that did not decode: the handler refuses it with INVALID_ARGUMENT (grpc-js would say INTERNAL). */
const MALFORMED = Symbol('malformed');

/** A service definition whose requests never fail to decode: one that does becomes `{[MALFORMED]: why}`. */
function tolerant(service) {
  return Object.fromEntries(Object.entries(service).map(([name, method]) => [name, {
    ...method,
    requestDeserialize: (buffer) => {
      try {
        return method.requestDeserialize(buffer);
      } catch (err) {
        return { [MALFORMED]: String(err?.message ?? err) };
      }
    },
  }]));
}

const malformed = (method, request) => `malformed request to /${SERVICE_NAME}/${method}: it is not the message the `
  + `method takes (${request[MALFORMED]})`;

export function loadServices() {
  const device = protoLoader.loadSync('mmiosplit/v1/device.proto', LOADER_OPTIONS);
  const health = protoLoader.fromJSON(HEALTH_JSON, LOADER_OPTIONS);
  return {
    DeviceService: tolerant(grpc.loadPackageDefinition(device).mmiosplit.v1.DeviceService.service),
    Health: grpc.loadPackageDefinition(health).grpc.health.v1.Health.service,
  };
}

/** `VM 'a'` or `VMs 'a', 'b'`, for a refusal. */
const vms = (ids) => `VM${ids.length > 1 ? 's' : ''} ${ids.map((v) => (v ? pyRepr(v) : '(no id)')).join(', ')}`;
const abort = (call, code, details) => call.emit('error', { code, details });

/**
 * A stream's message handler that cannot take the service down: a bug some input reaches ends that call with
 * INTERNAL, naming it, and every other stream goes on.
 */
function guarded(call, log, handler) {
  return (req) => {
    try {
      handler(req);
    } catch (err) {
      log(`internal error on ${call.getPath?.() ?? 'a call'}: ${err?.stack ?? err}`);
      abort(call, grpc.status.INTERNAL, `internal error in the Node device service: ${err?.message ?? err}`);
    }
  };
}

/** Health: SERVING for the whole server and for DeviceService until the service drains. */
class Health {
  constructor() {
    this.statuses = new Map([['', 'SERVING'], [SERVICE_NAME, 'SERVING']]);
    this.watchers = new Set();
  }

  drain() {
    for (const name of this.statuses.keys()) this.statuses.set(name, 'NOT_SERVING');
    for (const [name, call] of this.watchers) call.write({ status: this.statuses.get(name) ?? 'SERVICE_UNKNOWN' });
  }

  handlers() {
    return {
      Check: (call, callback) => {
        const status = this.statuses.get(call.request.service);
        if (status === undefined) callback({ code: grpc.status.NOT_FOUND, details: 'unknown service' });
        else callback(null, { status });
      },
      Watch: (call) => {
        const entry = [call.request.service, call];
        call.write({ status: this.statuses.get(call.request.service) ?? 'SERVICE_UNKNOWN' });
        this.watchers.add(entry);
        call.on('cancelled', () => this.watchers.delete(entry));
      },
    };
  }
}

/** Why a call's metadata does not carry `token` (null when it does); never contains the token. */
function tokenRefusal(metadata, token) {
  const [value] = metadata.get('authorization');
  if (value === undefined) {
    return "missing token: this service requires 'authorization: Bearer <token>' metadata (--token-file)";
  }
  const text = String(value);
  if (!text.startsWith('Bearer ')) return "malformed authorization metadata: expected 'Bearer <token>'";
  const given = Buffer.from(text.slice('Bearer '.length).trim());
  const expected = Buffer.from(token);
  return given.length === expected.length && timingSafeEqual(given, expected) ? null : 'wrong token';
}

export class DeviceServer {
  constructor(host, sessions, { log = () => {}, token = null, warn = log } = {}) {
    this.host = host;
    this.sessions = sessions;
    this.log = log;
    this.warn = warn;
    this.token = token;
    /** Random per start: a client that sees another one knows this service restarted and its state is gone. */
    this.instanceId = randomUUID().replaceAll('-', '');
    this.clockId = clockId();
    /** Open exit and watch streams per VM id: the VMs attached now, to whom Reset, Console, ReadMirror are scoped. */
    this.attached = new Map();
    /** Every open watch, told when the service goes away. */
    this.watchers = new Set();
    this.health = new Health();
  }

  attach(vmId) { this.attached.set(vmId, (this.attached.get(vmId) ?? 0) + 1); }

  detach(vmId) {
    const left = (this.attached.get(vmId) ?? 0) - 1;
    if (left > 0) this.attached.set(vmId, left);
    else this.attached.delete(vmId);
  }

  /**
   * Why a control RPC naming `vmId` is refused, or null: the devices' state is shared by every VM attached, so
   * Reset, Console and ReadMirror are allowed only when no other VM is attached; naming none, when at most one is.
   */
  refusal(rpc, vmId, call) {
    const names = [...this.attached.keys()].sort();
    const others = vmId ? names.filter((v) => v !== vmId) : names;
    const service = this.host.serviceName;
    let reason = null;
    if (vmId && others.length) {
      reason = `${rpc} for VM ${pyRepr(vmId)} refused: the devices of ${service} are attached to ${vms(others)} too, `
        + 'whose state it would touch';
    } else if (!vmId && others.length > 1) {
      reason = `${rpc} names no VM (vm_id) and ${vms(others)} are attached to ${service}: name the VM it acts for`;
    }
    if (reason !== null) this.log(`${reason} (from ${call.getPeer()})`);
    return reason;
  }

  /** Start draining: every watch hears it once and ends; later responses carry it too. */
  goAway(reason, graceSeconds) {
    this.host.goingAway ??= { reason, grace_seconds: graceSeconds };
    this.health.drain();
    for (const watcher of this.watchers) watcher(this.host.goingAway);
    this.watchers.clear();
    return this.host.goingAway;
  }

  handlers() {
    const handlers = {
      Describe: (call, callback) => callback(null, this.describe()),
      ExitStream: (call) => this.exitStream(call),
      Watch: (call) => this.watch(call),
      Console: (call) => this.console(call),
      Reset: (call, callback) => this.reset(call, callback),
      ReadMirror: (call) => this.readMirror(call),
    };
    // A request that did not decode (see `tolerant`): INVALID_ARGUMENT naming the method. A unary or server-stream
    // call is refused before its handler runs; a client stream's messages are checked as they arrive.
    for (const [method, handler] of Object.entries(handlers)) {
      handlers[method] = (call, callback) => {
        if (call.request?.[MALFORMED] !== undefined) {
          const why = malformed(method, call.request);
          this.warn(`${why} (from ${call.getPeer()})`);
          if (callback) callback({ code: grpc.status.INVALID_ARGUMENT, details: why });
          else abort(call, grpc.status.INVALID_ARGUMENT, why);
          return undefined;
        }
        if (call.request === undefined) { // a stream of requests: refuse the first one that did not decode
          const on = call.on.bind(call);
          call.on = (event, listener) => on(event, event !== 'data' ? listener : (request) => {
            if (request?.[MALFORMED] === undefined) return listener(request);
            const why = malformed(method, request);
            this.warn(`${why} (from ${call.getPeer()})`);
            abort(call, grpc.status.INVALID_ARGUMENT, why);
            return undefined;
          });
        }
        return handler(call, callback);
      };
    }
    if (this.token === null) return handlers;
    // With a token, every call but health (a service of its own) must carry it: refused before it is served.
    return Object.fromEntries(Object.entries(handlers).map(([method, handler]) => [method, (call, callback) => {
      const why = tokenRefusal(call.metadata, this.token);
      if (why === null) return handler(call, callback);
      this.warn(`refused /${SERVICE_NAME}/${method} from ${call.getPeer()}: UNAUTHENTICATED: ${why}`);
      if (callback) callback({ code: grpc.status.UNAUTHENTICATED, details: why });
      else abort(call, grpc.status.UNAUTHENTICATED, why);
      return undefined;
    }]));
  }

  describe() {
    const host = this.host;
    return {
      service_name: host.serviceName,
      protocol_version: PROTOCOL_VERSION,
      features: FEATURES,
      instance_id: this.instanceId,
      clock_id: this.clockId,
      devices: host.bus.devices.map((d) => ({
        name: d.name,
        type: d.constructor.type,
        compatible: d.constructor.compatible,
        has_console: host.consoles.has(d.name),
        properties: d.describe(),
        regions: d.regions().map((r) => ({
          name: r.name, base: String(d.base + r.offset), size: String(r.size), kind: 'REGION_KIND_MMIO',
          posted: r.posted, access_sizes: r.accessSizes, deadline_ms: r.deadlineMs,
          shadows: host.shadows.windowsOf(d.name, r.name).map(([offset, size]) => ({ offset: String(offset), size })),
        })),
        lines: d.lines.map((l) => ({ index: l.index, name: l.name, trigger: 'LINE_TRIGGER_LEVEL' })),
      })),
    };
  }

  async reset(call, callback) {
    const reason = this.refusal('Reset', call.request.vm_id, call);
    if (reason !== null) {
      callback({ code: grpc.status.FAILED_PRECONDITION, details: reason });
      return;
    }
    try {
      await this.host.exclusive(() => this.host.reset());
    } catch (err) {
      this.log(`internal error in Reset: ${err?.stack ?? err}`);
      callback({ code: grpc.status.INTERNAL, details: `internal error in the Node device service: ${err?.message ?? err}` });
      return;
    }
    callback(null, { mirror_updates: [] }); // no ROMD devices here: no mirror ever changes
  }

  readMirror(call) {
    const { device, region, vm_id: vmId } = call.request;
    const reason = this.refusal('ReadMirror', vmId, call);
    if (reason !== null) abort(call, grpc.status.FAILED_PRECONDITION, reason);
    else abort(call, grpc.status.NOT_FOUND, `no ROMD region ${pyRepr(region)} on a device named ${pyRepr(device)}`);
  }

  /** Every line level now, then each change no access made, in order; ends after telling the VM the service leaves. */
  watch(call) {
    let first = null;
    let cleanup = () => {};
    call.on('data', guarded(call, this.log, (req) => {
      if (first !== null) return; // later requests answer DMA requests; these devices make none
      first = req;
      this.attach(req.vm_id);
      this.log(`watched by VM ${req.vm_id} (${req.dma_windows.length} DMA window(s))`);
      const tell = (going) => {
        call.write({ going_away: going });
        call.end();
      };
      if (this.host.goingAway) {
        tell(this.host.goingAway);
        cleanup = () => this.detach(req.vm_id);
        return;
      }
      this.watchers.add(tell);
      // Shadow values first (when any register is shadowed), then line levels, then each change as it happens.
      const unsubscribeShadows = this.host.shadows.subscribe((update) => call.write({ shadow: update }));
      const unsubscribe = this.host.lines.subscribe((change) => call.write({ lines: change }));
      cleanup = () => {
        unsubscribeShadows();
        unsubscribe();
        this.watchers.delete(tell);
        this.detach(req.vm_id);
      };
    }));
    call.on('end', () => { // the client half-closed: without a first request there is nobody to watch for
      if (first === null) call.end();
    });
    once(call, () => cleanup());
  }

  exitStream(call) {
    const host = this.host;
    let session = null;
    let vmId = '';
    let keep = false;
    let peer = '';
    let ended = false; // the client half-closed: answer what came, then end
    let closed = false;
    let received = 0n; // the highest seq read on this stream: a Cancel must name one of them
    let busy = false;
    const pending = [];

    const answer = async (req, seq) => {
      const expected = session.applied + 1n;
      let done = null;
      if (seq !== expected) {
        done = await host.badRequest(session, `sequence number ${seq} from ${peer}, expected ${expected}`);
      } else if (req.body === 'exit') {
        const ex = req.exit;
        let posted = null;
        try {
          if (ex.posted) posted = unpackPosted(ex.posted);
        } catch (err) {
          done = await host.badRequest(session, `malformed posted batch: ${err.message}`);
        }
        done ??= await host.access(session, BigInt(ex.address), ex.length, ex.direction === 'ACCESS_DIRECTION_WRITE', ex.data,
          posted, () => session.cancelled.has(seq));
      } else if (req.body === 'flush') {
        let writes = null;
        try {
          writes = unpackPosted(req.flush);
        } catch (err) {
          done = await host.badRequest(session, `malformed posted batch: ${err.message}`);
        }
        done ??= await host.flush(session, writes);
      } else {
        done = await host.badRequest(session, `unexpected ${req.body ? pyRepr(req.body) : 'None'} from ${peer} after the handshake`);
      }
      const response = { seq: String(seq), completion: done };
      if (host.goingAway) response.going_away = host.goingAway; // completed all the same; send no more
      return response;
    };

    // Requests are answered one at a time, in order; Cancels are read ahead of them (in 'data'), so one for a
    // request still waiting for its turn at the devices is seen in time and the request is never performed.
    const drain = async () => {
      if (busy) return;
      busy = true;
      try {
        while (pending.length && !closed) {
          const req = pending.shift();
          const seq = BigInt(req.seq);
          session.acknowledge(BigInt(req.ack));
          const response = await session.serial(async () => {
            if (seq <= session.applied) { // a repeat after a resume: answered from memory, never applied twice
              return session.responses.get(seq) ?? { seq: String(seq), completion: await host.badRequest(session,
                `sequence number ${seq} from ${peer}, expected ${session.applied + 1n}: ${seq} was applied already`
                + (keep ? ' and its response acknowledged' : '')) };
            }
            const r = await answer(req, seq);
            session.record(seq, r, keep);
            return r;
          });
          if (!closed) call.write(response);
        }
      } finally {
        busy = false;
      }
      if (ended && !pending.length && !closed) {
        finish();
        call.end();
      }
    };

    const finish = () => {
      if (closed) return;
      closed = true;
      if (session !== null) {
        this.sessions.detach(session);
        this.detach(vmId);
      }
    };

    call.on('data', guarded(call, this.log, (req) => {
      if (closed) return;
      if (session === null) {
        if (req.body !== 'hello') {
          finish();
          abort(call, grpc.status.INVALID_ARGUMENT,
            `the first message on ExitStream must be a hello, got ${req.body ?? 'None'}`);
          return;
        }
        const hello = req.hello;
        if (hello.protocol_version !== PROTOCOL_VERSION) {
          finish();
          abort(call, grpc.status.FAILED_PRECONDITION, `protocol version ${hello.protocol_version} is not `
            + `supported; this device service speaks ${PROTOCOL_VERSION}`);
          return;
        }
        peer = `VM ${hello.vm_id} vCPU ${hello.vcpu_id}`;
        let resumed;
        [session, resumed] = this.sessions.attach(hello.session_id);
        vmId = hello.vm_id;
        this.attach(vmId);
        keep = Boolean(hello.session_id);
        session.acknowledge(BigInt(hello.last_acked));
        this.log(`exit stream opened by ${peer} (session ${hello.session_id || 'none'}${resumed ? ', resumed' : ''})`);
        call.write({ seq: req.seq, welcome: { protocol_version: PROTOCOL_VERSION, service_name: host.serviceName,
          instance_id: this.instanceId, resumed, applied: String(session.applied), features: FEATURES } });
        return;
      }
      if (req.body === 'cancel') { // no number and no response of its own; ignored unless it names one read here
        const seq = BigInt(req.seq);
        if (seq > session.applied && seq <= received) session.cancelled.add(seq);
        return;
      }
      if (BigInt(req.seq) > received) received = BigInt(req.seq);
      pending.push(req);
      drain();
    }));
    call.on('end', () => {
      ended = true;
      if (session === null) {
        finish();
        call.end();
      } else {
        drain();
      }
    });
    once(call, finish);
  }

  /** The console of one UART: output as the guest transmits it (what nobody heard yet first); input typed in. */
  console(call) {
    const host = this.host;
    let hub = null;
    let detach = () => {};
    call.on('data', guarded(call, this.log, (req) => {
      if (hub === null) {
        const reason = this.refusal('Console', req.vm_id, call);
        if (reason !== null) {
          abort(call, grpc.status.FAILED_PRECONDITION, reason);
          return;
        }
        try {
          hub = host.console(req.device);
        } catch (err) {
          if (!(err instanceof LookupError)) throw err;
          abort(call, grpc.status.NOT_FOUND, err.message);
          return;
        }
        if (req.input.length) host.exclusive(() => host.consoleInput(hub, req.input));
        detach = hub.attach((output) => call.write({ output }));
        return;
      }
      if (req.input.length) host.exclusive(() => host.consoleInput(hub, req.input));
    }));
    call.on('end', () => { // no more input; the output goes on, unless no UART was ever named
      if (hub === null) call.end();
    });
    once(call, () => detach());
  }
}

/** Call fn once when the call is over, however it ends (cancelled, failed, finished). */
function once(call, fn) {
  let done = false;
  const run = () => {
    if (!done) {
      done = true;
      fn();
    }
  };
  for (const event of ['cancelled', 'error', 'close', 'finish']) call.on(event, run);
}

