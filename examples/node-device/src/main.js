#!/usr/bin/env node
// mmiosplit device service in Node.js: `npm start -- --listen ADDR --device SPEC...`, the command line of
// `mmiosplit serve-devices` for the two models it hosts (pl011, scratch). It prints the same ready line once it
// listens, answers grpc.health.v1 like the Python service, and drains on SIGTERM/SIGINT the same way.

import fs from 'node:fs';
import { parseArgs } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { ConfigError, parseDeviceSpecs } from './config.js';
import { Bus, DeviceHost, SessionTable } from './host.js';
import { DEVICE_TYPES } from './models.js';
import { DeviceServer, loadServices } from './service.js';

const PROG = 'mmiosplit-node-device';
const USAGE = `usage: npm start -- --listen ADDR --device SPEC [--device SPEC...] [options]

  --listen ADDR        unix:PATH or HOST:PORT (port 0: any free port)
  --device SPEC        TYPE@ADDR[,key=value...]: pl011@0x09000000,name=uart0 or
                       scratch@0x0a000000,size=0x1000,posted=on,name=scratch0 (repeatable)
  --name NAME          service name reported to vcpu services (default mmiosplit-devices)
  --console-log FILE   append every byte UARTs transmit to FILE
  --console-stdout     also write every byte UARTs transmit to stdout
  --no-shadows         declare no shadow registers: every device read exits (for comparisons)
  --grace-s SECONDS    on SIGTERM or SIGINT: report NOT_SERVING, complete what was received, tell every
                       watching VM it is going away, and exit within this many seconds (default 10)
  --tls-cert FILE      serve TLS with this certificate (PEM) ...
  --tls-key FILE       ... and its private key
  --tls-ca FILE        with --tls-cert: require client certificates signed by this CA (mutual TLS)
  --token-file FILE    require 'authorization: Bearer <token>' on every call but health
  --insecure           allow listening in the clear on an address other than a UNIX socket or loopback
  -v, --verbose        log streams as they open`;

function fail(message) {
  process.stderr.write(`${PROG}: ${message}\n`);
  process.exit(2);
}

/** unix:PATH (also unix://PATH) or HOST:PORT, as the Python services parse it; {target, unix, host, port}. */
function parseListen(text) {
  if (text.startsWith('unix:')) {
    let socketPath = text.slice('unix:'.length);
    if (socketPath.startsWith('//')) socketPath = socketPath.slice(2);
    if (!socketPath) fail(`--listen: malformed address '${text}': unix: needs a socket path, e.g. unix:/tmp/dev.sock`);
    return { target: `unix:${socketPath}`, unix: true };
  }
  const match = /^(?<host>\[[0-9A-Fa-f:.]+\]|[^:\s]+):(?<port>[0-9]+)$/.exec(text.trim());
  if (!match || Number(match.groups.port) > 65535) {
    fail(`--listen: malformed address '${text}': expected unix:PATH or HOST:PORT (e.g. unix:/tmp/dev.sock, 127.0.0.1:7000)`);
  }
  return { target: text.trim(), unix: false, host: match.groups.host, port: Number(match.groups.port) };
}

function isLocal(address) {
  if (address.unix) return true;
  const host = address.host.replace(/^\[|\]$/g, '').toLowerCase();
  return host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host);
}

/** A file a security flag names, read once at start; a missing, empty or non-PEM one is refused by name. */
function readSecurityFile(flag, file, what) {
  let data;
  try {
    data = fs.readFileSync(file);
  } catch (err) {
    fail(err.code === 'ENOENT' ? `${flag} ${file}: no such file` : `${flag} ${file}: cannot read it (${err.message})`);
  }
  if (!data.toString('latin1').trim()) fail(`${flag} ${file}: the file is empty`);
  if (what && !data.includes('-----BEGIN')) fail(`${flag} ${file}: not a PEM file (expected a ${what})`);
  return data;
}

/** The flags of mmiosplit.security: TLS (mutual with --tls-ca) and a bearer token, with the same checks. */
function loadSecurity(args) {
  if ((args['tls-cert'] === undefined) !== (args['tls-key'] === undefined)) {
    fail('--tls-cert and --tls-key go together: give both (the certificate and its private key)');
  }
  if (args['tls-ca'] !== undefined && args['tls-cert'] === undefined) {
    fail('--tls-ca checks client certificates of a TLS server: give --tls-cert and --tls-key too');
  }
  let token = null;
  if (args['token-file'] !== undefined) {
    token = readSecurityFile('--token-file', args['token-file'], '').toString('latin1').trim();
    if (!/^[\x21-\x7e]+$/.test(token)) {
      fail(`--token-file ${args['token-file']}: the token must be one line of printable ASCII without spaces`);
    }
  }
  const read = (flag, what) => (args[flag] === undefined ? null : readSecurityFile(`--${flag}`, args[flag], what));
  return { cert: read('tls-cert', 'certificate'), key: read('tls-key', 'private key'), ca: read('tls-ca', 'CA certificate'),
    token };
}

/** The words of the ready line for what protects the port, as the Python services print them. */
function describeSecurity(security, insecure) {
  const parts = [];
  if (security.cert && security.ca) parts.push('mutual TLS');
  else if (security.cert) parts.push('TLS');
  if (security.token !== null) parts.push('token');
  return parts.join(' + ') || (insecure ? 'plaintext (--insecure)' : 'plaintext');
}

function main() {
  let args;
  try {
    args = parseArgs({
      options: {
        listen: { type: 'string' },
        device: { type: 'string', multiple: true, default: [] },
        name: { type: 'string', default: 'mmiosplit-devices' },
        'console-log': { type: 'string' },
        'console-stdout': { type: 'boolean', default: false },
        'no-shadows': { type: 'boolean', default: false },
        'grace-s': { type: 'string', default: '10' },
        insecure: { type: 'boolean', default: false },
        'tls-cert': { type: 'string' },
        'tls-key': { type: 'string' },
        'tls-ca': { type: 'string' },
        'token-file': { type: 'string' },
        verbose: { type: 'boolean', short: 'v', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
    }).values;
  } catch (err) {
    fail(`${err.message}\n${USAGE}`);
  }
  if (args.help) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  if (!args.listen) fail(`--listen is required\n${USAGE}`);
  const grace = Number(args['grace-s']);
  if (!(grace >= 0 && grace <= 3600)) fail(`--grace-s: ${JSON.stringify(args['grace-s'])} is not a number of seconds from 0 to 3600`);
  const address = parseListen(args.listen);
  const security = loadSecurity(args);
  if (!isLocal(address) && !security.cert && security.token === null && !args.insecure) {
    fail(`refusing to listen on ${args.listen}: it is not a UNIX socket or a loopback address, and neither TLS `
      + '(--tls-cert/--tls-key) nor a token (--token-file) protects it; give one, or --insecure to serve it in the '
      + 'clear on purpose (e.g. on a private container network)');
  }

  let host;
  try {
    const specs = parseDeviceSpecs(args.device, DEVICE_TYPES);
    if (!specs.length) throw new ConfigError('no devices: give --device TYPE@ADDR[,key=value...]');
    const bus = new Bus(specs.map((s) => new s.cls(s.name, s.base, s.options)));
    host = new DeviceHost(bus, { serviceName: args.name, consoleLog: args['console-log'] ?? null,
      echo: args['console-stdout'], shadows: !args['no-shadows'] });
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    fail(`--device: ${err.message}`);
  }

  const log = (message) => process.stderr.write(`${new Date().toISOString()} ${PROG} ${message}\n`);
  const device = new DeviceServer(host, new SessionTable(), { log: args.verbose ? log : () => {},
    token: security.token, warn: log });
  const { DeviceService, Health } = loadServices();
  // The protocol's limit (docs/protocol.md, "Sizes and limits"); grpc-js would take 4 MiB by default.
  const server = new grpc.Server({ 'grpc.max_receive_message_length': 256 << 20,
    'grpc.max_send_message_length': 256 << 20 });
  server.addService(DeviceService, device.handlers());
  server.addService(Health, device.health.handlers());
  const credentials = security.cert
    ? grpc.ServerCredentials.createSsl(security.ca, [{ private_key: security.key, cert_chain: security.cert }],
      security.ca !== null)
    : grpc.ServerCredentials.createInsecure();
  server.bindAsync(address.target, credentials, (err, port) => {
    if (err) fail(`cannot listen on ${args.listen}: ${err.message}`);
    const bound = address.unix ? address.target : `${address.host}:${port}`;
    // The ready line of `mmiosplit serve-devices`, for launchers that wait for it.
    process.stdout.write(`mmiosplit device service listening on ${bound} (${describeSecurity(security, args.insecure)})\n`);
  });

  let stopping = false;
  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    const reason = `device service ${host.serviceName} is shutting down (${signal})`;
    device.goAway(reason, grace);
    log(`${reason}: draining for up to ${grace} s`);
    // Streams still open when the grace period ends (a console nobody closed) are cancelled.
    const force = setTimeout(() => {
      server.forceShutdown();
      log(`device service ${host.serviceName} stopped: streams still open were cancelled at the end of the grace period`);
      process.exit(0);
    }, grace * 1000);
    server.tryShutdown(() => {
      clearTimeout(force);
      log(`device service ${host.serviceName} stopped`);
      process.exit(0);
    });
  };
  // A bug reached by some input must not take every VM's devices down with it: say so and go on.
  process.on('unhandledRejection', (err) => log(`internal error (the service goes on): ${err?.stack ?? err}`));
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

main();
