// The public HTTP API, as the page uses it: the key kept in localStorage,
// JSON calls with `Authorization: Bearer`, the API's error shape
// ({error: {code, message, field}}) as ApiError, and Server-Sent Events read
// through fetch (EventSource cannot send the Authorization header).

const KEY_ITEM = 'easel.apiKey';

/** An error answer of the API: HTTP status, stable code, message, field path. */
export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field ?? null;
  }
}

export function storedKey() {
  return localStorage.getItem(KEY_ITEM);
}

export function storeKey(key) {
  localStorage.setItem(KEY_ITEM, key);
}

export function forgetKey() {
  localStorage.removeItem(KEY_ITEM);
}

function headers(extra = {}, key = storedKey()) {
  const h = { ...extra };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/**
 * JSON text parsed with integers beyond 2^53 (seeds go up to 2^64 - 1)
 * kept as their exact digits (strings) instead of rounded numbers.
 */
export function parseJson(text) {
  return JSON.parse(text, (key, value, context) => (
    typeof value === 'number' && Number.isInteger(value) && !Number.isSafeInteger(value)
      && context?.source && /^-?\d+$/.test(context.source) ? context.source : value));
}

async function errorOf(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const e = body?.error;
  return new ApiError(response.status, e?.code ?? 'http_' + response.status,
    e?.message ?? `${response.status} ${response.statusText}`, e?.field);
}

/**
 * Call the API: `method` on `path` with an optional JSON `body`. Resolves to
 * the parsed JSON (null for 204); rejects with ApiError. `raw`: a body
 * already serialised as JSON text.
 */
export async function call(method, path, body, { key, raw } = {}) {
  const json = body !== undefined || raw !== undefined;
  const init = { method, headers: headers(json ? { 'Content-Type': 'application/json' } : {}, key) };
  if (raw !== undefined) init.body = raw;
  else if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  if (response.status === 204) return null;
  return parseJson(await response.text());
}

/**
 * Whether the server asks for a key: `GET /v1/usage` without one answers
 * 401 when keys are on (`--no-auth` answers 200).
 */
export async function authRequired() {
  const response = await fetch('/v1/usage');
  return response.status === 401;
}

/**
 * Read an SSE stream at `path`, calling `onEvent(name, data)` with each
 * event's parsed JSON data, until it ends or `signal` aborts.
 */
export async function events(path, onEvent, signal) {
  const response = await fetch(path, { headers: headers({ Accept: 'text/event-stream' }), signal });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) name = line.slice(6).trim();
        else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      }
      if (!data.length) continue;
      let parsed;
      try { parsed = parseJson(data.join('\n')); } catch { parsed = data.join('\n'); }
      onEvent(name, parsed);
    }
  }
}
