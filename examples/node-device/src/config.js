// `--device` specs, in the syntax of `mmiosplit serve-devices --device`: TYPE@ADDRESS[,KEY=VALUE...], e.g.
// pl011@0x09000000,name=uart0 or scratch@0x0a000000,size=0x1000,posted=on. Errors are ConfigErrors whose
// messages match the Python service's word for word, so a user sees the same complaint from either.

export class ConfigError extends Error {}

export const SPEC_SYNTAX = 'TYPE@ADDRESS[,KEY=VALUE...], e.g. pl011@0x09000000';
const NAME_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]*$/;
const NUMBER = String.raw`0[xX](?:_?[0-9a-fA-F])+|[0-9](?:_?[0-9])*`;
const ADDRESS_RE = new RegExp(`^(?:${NUMBER})$`);
const SIZE_RE = new RegExp(`^(?<number>${NUMBER})\\s*(?<unit>[A-Za-z]*)$`);
const SIZE_UNITS = { '': 1n, b: 1n };
for (const [units, shift] of [[['k', 'kb', 'kib'], 10n], [['m', 'mb', 'mib'], 20n], [['g', 'gb', 'gib'], 30n],
  [['t', 'tb', 'tib'], 40n]]) {
  for (const unit of units) SIZE_UNITS[unit] = 1n << shift;
}
const TRUE = new Set(['on', 'true', 'yes', '1']);
const FALSE = new Set(['off', 'false', 'no', '0']);

/** A string as Python's repr() prints it, so messages read exactly like the Python service's. */
export function pyRepr(text) {
  const s = String(text);
  if (s.includes("'") && !s.includes('"')) return `"${s.replaceAll('\\', '\\\\')}"`;
  return `'${s.replaceAll('\\', '\\\\').replaceAll("'", "\\'")}'`;
}

/** Python's f"{n:#x}" for a BigInt or a number. */
export const hex = (n) => `0x${n.toString(16)}`;

function parseNumber(text) {
  // A decimal with a leading zero is refused as ambiguous (is 010 eight or ten?).
  if (text.length > 1 && text[0] === '0' && !'xX'.includes(text[1])) {
    const digits = text.replace(/^[0_]+/, '') || '0';
    throw new ConfigError(`${pyRepr(text)} has a leading zero; write hex as 0x${digits}`);
  }
  return BigInt(text.replaceAll('_', ''));
}

export function parseAddress(text) {
  const stripped = text.trim();
  if (!ADDRESS_RE.test(stripped)) {
    throw new ConfigError(`not an address: ${pyRepr(text)} (expected hex like 0x09000000 or decimal)`);
  }
  const value = parseNumber(stripped);
  if (value >= 1n << 64n) throw new ConfigError(`address ${pyRepr(text)} does not fit in 64 bits`);
  return value;
}

export function parseSize(text) {
  const match = SIZE_RE.exec(text.trim());
  const unit = match ? match.groups.unit.toLowerCase() : '';
  if (match === null || !(unit in SIZE_UNITS)) {
    throw new ConfigError(`not a size: ${pyRepr(text)} (expected something like 0x1000, 4096, 4k or 128M)`);
  }
  return parseNumber(match.groups.number) * SIZE_UNITS[unit];
}

export function parseBool(text) {
  const word = text.trim().toLowerCase();
  if (TRUE.has(word)) return true;
  if (FALSE.has(word)) return false;
  throw new ConfigError(`not a boolean: ${pyRepr(text)} (expected on/off, true/false, yes/no or 1/0)`);
}

/** A parser for a decimal count between low and high (the Python model layer's int_in_range). */
export function intInRange(low, high) {
  return (text) => {
    if (!/^\s*[+-]?[0-9](?:_?[0-9])*\s*$/.test(text)) throw new ConfigError('not a decimal number');
    const count = Number(text.trim().replaceAll('_', ''));
    if (!(low <= count && count <= high)) throw new ConfigError('out of range');
    return count;
  };
}

/**
 * Turn option text into values with a model's option table ({name: {parse, expects}}), or throw ConfigError
 * naming the device and the option.
 */
export function parseOptions(type, name, table, options) {
  const parsed = {};
  for (const [key, text] of Object.entries(options)) {
    const option = table[key];
    if (option === undefined) {
      const valid = Object.keys(table).map(pyRepr).join(', ') || 'none';
      throw new ConfigError(`${name}: unknown option ${pyRepr(key)} for ${type}; valid options: ${valid}`);
    }
    try {
      parsed[key] = option.parse(text);
    } catch (err) {
      if (!(err instanceof ConfigError)) throw err;
      throw new ConfigError(`${name}: option ${pyRepr(key)} must be ${option.expects}, got ${pyRepr(text)}`);
    }
  }
  return parsed;
}

/**
 * Parse one spec: {type, base, name, options}. `types` maps a type name to its model class (with static
 * `options`); without name=, the device is called `${type}-${index}`.
 */
export function parseDeviceSpec(text, types, index = 0) {
  const where = `device spec ${pyRepr(text)}`;
  const [head, ...items] = text.trim().split(',');
  const at = head.indexOf('@');
  const type = (at < 0 ? head : head.slice(0, at)).trim();
  const address = at < 0 ? '' : head.slice(at + 1).trim();
  if (at < 0 || !type || !address) throw new ConfigError(`${where}: expected ${SPEC_SYNTAX}`);
  const cls = types[type];
  if (cls === undefined) {
    throw new ConfigError(`${where}: unknown device type ${pyRepr(type)}; known types: ${Object.keys(types).sort().join(', ')}`);
  }
  let base;
  try {
    base = parseAddress(address);
  } catch (err) {
    throw new ConfigError(`${where}: ${err.message}`);
  }
  let name = null;
  const options = {};
  for (const item of items) {
    const eq = item.indexOf('=');
    const key = (eq < 0 ? item : item.slice(0, eq)).trim();
    const value = eq < 0 ? '' : item.slice(eq + 1).trim();
    if (eq < 0 || !key || !value) throw new ConfigError(`${where}: option ${pyRepr(item.trim())} is not KEY=VALUE`);
    if (key in options || (key === 'name' && name !== null)) {
      throw new ConfigError(`${where}: option ${pyRepr(key)} is given twice`);
    }
    if (key === 'name') name = value;
    else options[key] = value;
  }
  name ??= `${type}-${index}`;
  if (!NAME_RE.test(name)) {
    throw new ConfigError(`${where}: device name ${pyRepr(name)} must be letters, digits, '_', '.' or '-', and not start with '.' or '-'`);
  }
  let parsed;
  try {
    parsed = parseOptions(type, name, cls.options, options);
  } catch (err) {
    throw new ConfigError(`${where}: ${err.message}`);
  }
  return { type, base, name, options: parsed, cls };
}

/** Several specs; unnamed devices are numbered per type (pl011-0, scratch-0, scratch-1, ...). */
export function parseDeviceSpecs(texts, types) {
  const specs = [];
  const seen = new Map();
  for (const text of texts) {
    const type = text.trim().split('@')[0].trim();
    const spec = parseDeviceSpec(text, types, specs.filter((s) => s.type === type).length);
    const where = `device spec ${pyRepr(text)}`;
    if (seen.has(spec.name)) {
      throw new ConfigError(`${where}: device name ${pyRepr(spec.name)} is already used by ${seen.get(spec.name)}`);
    }
    seen.set(spec.name, where);
    specs.push(spec);
  }
  return specs;
}
