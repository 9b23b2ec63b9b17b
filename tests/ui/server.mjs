// Start `easel serve` on the tiny fixture models for the browser tests:
// a fresh data dir, an API key from `easel keys create`, a free loopback
// port; throws (never skips) when the binary or the server cannot start.

import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository's root folder. */
export const REPO = fileURLToPath(new URL('../..', import.meta.url));

function bin() {
  const b = process.env.EASEL_BIN;
  if (!b) throw new Error('EASEL_BIN is not set: the path of the built `easel` binary (tools/ui-e2e.sh sets it)');
  return b;
}

function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once('error', fail);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

/** `easel keys create` in `dataDir`: the secret. */
function createKey(dataDir) {
  const r = spawnSync(bin(), ['keys', 'create', '--name', 'ui-e2e', '--data-dir', dataDir], { encoding: 'utf8' });
  const secret = `${r.stdout}${r.stderr}`.match(/esk_\w+/)?.[0];
  if (r.status !== 0 || !secret) throw new Error(`easel keys create failed (${r.status}): ${r.stderr}${r.stdout}`);
  return secret;
}

/**
 * A running server: `{url, key, dataDir, api(), stop()}`. `noAuth`:
 * `--no-auth` (then no key); `config`: TOML text given as `--config`.
 */
export async function startServer({ noAuth = false, config = null } = {}) {
  const dataDir = mkdtempSync(join(tmpdir(), 'easel-ui-e2e-'));
  const key = noAuth ? null : createKey(dataDir);
  const port = await freePort();
  const logPath = join(dataDir, 'serve.log');
  // An A1111-style model root with one LoRA file (`detail`) for the LoRA picker.
  const loras = join(dataDir, 'webui/models/Lora');
  mkdirSync(loras, { recursive: true });
  copyFileSync(join(REPO, 'tests/fixtures/loras/tiny-sd15-lora.safetensors'), join(loras, 'detail.safetensors'));
  const args = ['serve', '--offline', '--bind', `127.0.0.1:${port}`, '--data-dir', dataDir,
    '--models-dir', join(REPO, 'tests/fixtures/models'), '--models-dir', join(dataDir, 'webui')];
  if (noAuth) args.push('--no-auth');
  if (config) {
    writeFileSync(join(dataDir, 'config.toml'), config);
    args.push('--config', join(dataDir, 'config.toml'));
  }
  const log = openSync(logPath, 'w');
  const child = spawn(bin(), args, { stdio: ['ignore', log, log] });
  let exited = null;
  child.on('exit', (code, signal) => { exited = `exit ${code ?? signal}`; });
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (exited) throw new Error(`easel serve stopped (${exited}):\n${readFileSync(logPath, 'utf8')}`);
    try {
      if ((await fetch(`${url}/readyz`)).ok) break;
    } catch { /* not listening yet */ }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`easel serve did not become ready in 60 s:\n${readFileSync(logPath, 'utf8')}`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  return {
    url,
    key,
    dataDir,
    /** The API with this server's key. */
    async api(method, path, body) {
      const headers = { 'Content-Type': 'application/json' };
      if (key) headers.Authorization = `Bearer ${key}`;
      const r = await fetch(url + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
      const text = await r.text();
      return { status: r.status, json: text ? JSON.parse(text) : null };
    },
    async stop() {
      if (!exited) {
        const gone = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await Promise.race([gone, new Promise((r) => setTimeout(r, 10_000))]);
        if (!exited) child.kill('SIGKILL');
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/**
 * A chat-completions server on 127.0.0.1 for flows' ObjectGenerator steps:
 * answers every request with `{prompts: answer(userMessage)}` as the
 * message content. `{url (ending in /v1), requests, close()}`.
 */
export async function startChatServer(answer) {
  const { createServer: createHttp } = await import('node:http');
  const requests = [];
  const server = createHttp((req, res) => {
    let body = '';
    req.on('data', (c) => { body += c; });
    req.on('end', () => {
      const json = JSON.parse(body || '{}');
      requests.push(json);
      const user = (json.messages ?? []).filter((m) => m.role === 'user').map((m) => m.content).join('\n');
      const content = JSON.stringify({ prompts: answer(user) });
      res.writeHead(200, { 'Content-Type': 'application/json' });
      res.end(JSON.stringify({
        id: 'chatcmpl-test', object: 'chat.completion', model: 'test-model',
        choices: [{ index: 0, finish_reason: 'stop', message: { role: 'assistant', content } }],
      }));
    });
  });
  await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
  return {
    url: `http://127.0.0.1:${server.address().port}/v1`,
    requests,
    close: () => new Promise((ok) => server.close(ok)),
  };
}
