// The page at / in a real browser (Debian's chromium via playwright-core)
// against a real `easel serve` on the tiny fixture models. Run by
// tools/ui-e2e.sh; every test fails (none skips) when chromium or the
// server cannot start. Requests leave the browser only for the server's
// loopback address (anything else is aborted and fails the test).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { startServer, startChatServer, REPO } from './server.mjs';

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const SHOTS = process.env.UI_SCREENSHOT_DIR || null;
const T = 60_000;

let server;
let browser;
const offLoopback = [];
const pageErrors = [];

async function newPage({ width = 1280, height = 900, key = server.key, target = server, colorScheme = 'light' } = {}) {
  const context = await browser.newContext({ viewport: { width, height }, colorScheme });
  await context.route('**/*', (route) => {
    const u = new URL(route.request().url());
    if (u.hostname === '127.0.0.1' || u.protocol === 'data:' || u.protocol === 'blob:') return route.continue();
    offLoopback.push(u.href);
    return route.abort();
  });
  if (key) await context.addInitScript((k) => localStorage.setItem('easel.apiKey', k), key);
  const page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('dialog', (d) => d.accept());
  await page.goto(target.url + '/');
  return page;
}

/** Controls on the page without a label (or aria-label): their ids. */
async function unlabeled(page) {
  return page.evaluate(() => [...document.querySelectorAll('input, select, textarea, button')]
    .filter((el) => !(el.labels?.length) && !el.getAttribute('aria-label')
      && !(el.tagName === 'BUTTON' && el.textContent.trim()))
    .map((el) => el.id || el.outerHTML.slice(0, 60)));
}

async function ready(page) {
  await page.locator('body[data-ready="true"]').waitFor({ timeout: T });
}

async function jobStatus(page, id, status) {
  await page.locator(`li.job[data-job="${id}"][data-status="${status}"]`).waitFor({ timeout: T });
}

/** Fill the form with `v` (ids of the page's controls). */
async function fillForm(page, v) {
  await page.selectOption('#f-model', v.model);
  await page.fill('#f-prompt', v.prompt);
  if (v.negative !== undefined) await page.fill('#f-negative', v.negative);
  await page.fill('#f-width', String(v.width));
  await page.fill('#f-height', String(v.height));
  await page.fill('#f-steps', String(v.steps));
  if (v.guidance !== undefined) await page.fill('#f-guidance', String(v.guidance));
  if (v.scheduler !== undefined) await page.selectOption('#f-scheduler', v.scheduler);
  if (v.seed !== undefined) {
    await page.selectOption('#f-seed-mode', 'fixed');
    await page.fill('#f-seed', String(v.seed));
  }
  if (v.format !== undefined) await page.selectOption('#f-format', v.format);
}

/** Submit with Ctrl+Enter and return the new job's id (from the API answer). */
async function submit(page) {
  const answer = page.waitForResponse((r) => r.url().endsWith('/v1/generations') && r.request().method() === 'POST');
  await page.locator('#f-prompt').press('Control+Enter');
  const r = await answer;
  const body = await r.json();
  assert.equal(r.status(), 202, JSON.stringify(body));
  return body.id;
}

async function shot(page, name, fullPage = false) {
  if (!SHOTS) return;
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage });
}

before(async () => {
  server = await startServer();
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
});

after(async () => {
  await browser?.close();
  await server?.stop();
  assert.deepEqual(offLoopback, [], 'the page requested something off loopback');
  assert.deepEqual(pageErrors, [], 'uncaught errors in the page');
});

test('a wrong key is refused with a clear message, the right one signs in and can be forgotten', async () => {
  const page = await newPage({ key: null });
  await page.locator('#signin').waitFor({ timeout: T });
  assert.equal(await page.locator('#page-generate').isHidden(), true);
  await page.fill('#api-key', 'esk_wrongwrongwrong');
  await page.click('#signin-form button[type=submit]');
  await page.locator('#signin-error', { hasText: 'refused' }).waitFor({ timeout: T });
  assert.match(await page.textContent('#signin-error'), /This key was refused: invalid or revoked API key/);
  assert.equal(await page.evaluate(() => localStorage.getItem('easel.apiKey')), null);

  await page.fill('#api-key', server.key);
  await page.click('#signin-form button[type=submit]');
  await ready(page);
  assert.equal(await page.locator('#page-generate').isVisible(), true);
  assert.equal(await page.evaluate(() => localStorage.getItem('easel.apiKey')), server.key);
  // The models came from the API with the key.
  const options = await page.locator('#f-model option').allTextContents();
  assert.ok(options.some((o) => o.startsWith('tiny-sd15')), options.join(', '));

  await page.reload();
  await ready(page);
  await page.click('#sign-out');
  await page.locator('#signin').waitFor({ timeout: T });
  assert.equal(await page.evaluate(() => localStorage.getItem('easel.apiKey')), null);
  await page.context().close();
});

test('with --no-auth the page asks for no key', async () => {
  const open = await startServer({ noAuth: true });
  try {
    const page = await newPage({ key: null, target: open });
    await ready(page);
    assert.equal(await page.locator('#signin').isHidden(), true);
    assert.equal(await page.locator('#sign-out').isHidden(), true);
    await page.context().close();
  } finally {
    await open.stop();
  }
});

test('each family fills its defaults and hides what does not apply', async () => {
  const page = await newPage();
  await ready(page);
  await page.selectOption('#f-model', 'tiny-sd15');
  assert.equal(await page.inputValue('#f-steps'), '25');
  assert.equal(await page.inputValue('#f-guidance'), '7.5');
  assert.equal(await page.locator('#f-negative').isVisible(), true);
  assert.ok((await page.locator('#f-scheduler option').allTextContents()).includes('euler'));
  await page.selectOption('#f-model', 'tiny-flux-dev');
  assert.equal(await page.locator('#f-negative').isVisible(), false);
  assert.equal(await page.inputValue('#f-steps'), '');
  const flux = await page.locator('#f-scheduler option').allTextContents();
  assert.ok(flux.includes('flow_match_euler') && !flux.includes('euler'), flux.join(', '));
  // Every control of every page has a label, and Tab reaches the form.
  await page.click('#loras-card summary');
  await page.click('#lora-add');
  await page.click('#init-card summary');
  await page.setInputFiles('#f-init-file', join(REPO, 'tests/fixtures/generated/init_image.png'));
  await page.locator('#init-panel').waitFor({ state: 'visible', timeout: T });
  assert.deepEqual(await unlabeled(page), []);
  await page.focus('#f-model');
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'f-prompt');
  await page.context().close();
});

const GEN = {
  model: 'tiny-sd15', prompt: 'a lighthouse at dusk, e2e', negative: 'blurry', width: 64, height: 48,
  steps: 4, guidance: 6.5, scheduler: 'euler', seed: 1234, format: 'png',
};
let firstJob;

test('generate an image and see it in the gallery with its parameters', async () => {
  const page = await newPage();
  await ready(page);
  await fillForm(page, GEN);
  firstJob = await submit(page);
  await jobStatus(page, firstJob, 'succeeded');
  await page.locator(`li.job[data-job="${firstJob}"] .thumbs img`).waitFor({ timeout: T });

  const { json: record } = await server.api('GET', `/v1/generations/${firstJob}`);
  const requested = record.images[0].requested;
  assert.equal(requested.prompt, GEN.prompt);
  assert.equal(requested.negativePrompt, GEN.negative);
  assert.equal(requested.width, GEN.width);
  assert.equal(requested.steps, GEN.steps);
  assert.equal(requested.scheduler, GEN.scheduler);
  assert.equal(requested.seed, GEN.seed);

  await page.click('nav a[data-page=gallery]');
  const tile = page.locator('#gallery-grid li button').first();
  await tile.waitFor({ timeout: T });
  await tile.click();
  await page.locator('#detail[open]').waitFor({ timeout: T });
  const param = async (name) => page.textContent(`#detail-params td[data-param="${name}"]`);
  assert.equal(await param('prompt'), GEN.prompt);
  assert.equal(await param('negativePrompt'), GEN.negative);
  assert.equal(await param('steps'), '4');
  assert.equal(await param('guidanceScale'), '6.5');
  assert.equal(await param('width'), '64');
  assert.equal(await param('height'), '48');
  assert.equal(await param('seed'), '1234');
  assert.equal(await param('scheduler'), 'EulerDiscreteScheduler');
  assert.equal(await param('baseModel'), 'tiny-sd15');
  assert.equal(await param('outputFormat'), 'png');
  assert.match(await param('file_url'), /\/v1\/files\/[0-9a-f]{64}\.png$/);
  await page.context().close();
});

test('the gallery filters by prompt text and model', async () => {
  const page = await newPage();
  await ready(page);
  await page.goto(server.url + '/#gallery');
  await page.locator('#gallery-grid li').first().waitFor({ timeout: T });
  const count = () => page.locator('#gallery-grid li').count();
  await page.fill('#g-prompt', 'LIGHTHOUSE');
  await page.click('#gallery-filter button[type=submit]');
  await page.locator('#gallery-grid li').first().waitFor({ timeout: T });
  assert.equal(await count(), 1);
  await page.fill('#g-prompt', 'no such prompt');
  await page.click('#gallery-filter button[type=submit]');
  await page.locator('#gallery-empty').waitFor({ state: 'visible', timeout: T });
  assert.equal(await count(), 0);
  await page.fill('#g-prompt', '');
  await page.selectOption('#g-model', 'tiny-sdxl');
  await page.click('#gallery-filter button[type=submit]');
  await page.locator('#gallery-empty').waitFor({ state: 'visible', timeout: T });
  await page.selectOption('#g-model', 'tiny-sd15');
  await page.click('#gallery-filter button[type=submit]');
  await page.locator('#gallery-grid li').first().waitFor({ timeout: T });
  assert.equal(await count(), 1);
  await page.context().close();
});

test('reuse parameters gives the same form values', async () => {
  const page = await newPage();
  await ready(page);
  await page.goto(server.url + '/#gallery');
  await page.locator('#gallery-grid li button').first().click();
  await page.locator('#detail[open]').waitFor({ timeout: T });
  await page.click('#d-reuse');
  await page.locator('#page-generate').waitFor({ timeout: T });
  assert.equal(await page.inputValue('#f-model'), GEN.model);
  assert.equal(await page.inputValue('#f-prompt'), GEN.prompt);
  assert.equal(await page.inputValue('#f-negative'), GEN.negative);
  assert.equal(await page.inputValue('#f-width'), String(GEN.width));
  assert.equal(await page.inputValue('#f-height'), String(GEN.height));
  assert.equal(await page.inputValue('#f-steps'), String(GEN.steps));
  assert.equal(await page.inputValue('#f-guidance'), String(GEN.guidance));
  assert.equal(await page.inputValue('#f-scheduler'), GEN.scheduler);
  assert.equal(await page.inputValue('#f-seed-mode'), 'fixed');
  assert.equal(await page.inputValue('#f-seed'), String(GEN.seed));
  assert.equal(await page.inputValue('#f-format'), GEN.format);
  await page.context().close();
});

test('a seed beyond 2^53 keeps every digit through the record, the detail view and reuse', async () => {
  const seed = '18446744073709551614';
  const page = await newPage();
  await ready(page);
  await fillForm(page, { ...GEN, prompt: 'big seed e2e', seed });
  const sent = page.waitForRequest((r) => r.url().endsWith('/v1/generations') && r.method() === 'POST');
  const id = await submit(page);
  assert.match((await sent).postData(), /"seed":18446744073709551614[,}]/);
  await jobStatus(page, id, 'succeeded');
  await page.goto(server.url + '/#gallery');
  await page.fill('#g-prompt', 'big seed');
  await page.click('#gallery-filter button[type=submit]');
  await page.locator('#gallery-grid li button').first().click();
  await page.locator('#detail[open]').waitFor({ timeout: T });
  assert.equal(await page.textContent('#detail-params td[data-param="seed"]'), seed);
  await page.click('#d-reuse');
  await page.locator('#page-generate').waitFor({ timeout: T });
  assert.equal(await page.inputValue('#f-seed'), seed);
  await page.context().close();
});

test('a bad width shows the API\'s message at the width field', async () => {
  const page = await newPage();
  await ready(page);
  await fillForm(page, { ...GEN, width: 1001 });
  const answer = page.waitForResponse((r) => r.url().endsWith('/v1/generations'));
  await page.click('#generate-btn');
  const r = await answer;
  assert.equal(r.status(), 422);
  const error = (await r.json()).error;
  assert.equal(error.field, 'images[0].width');
  const shown = page.locator('[data-field="width"] .field-error');
  await shown.waitFor({ timeout: T });
  assert.equal(await shown.textContent(), error.message);
  assert.match(error.message, /1001/);
  assert.equal(await page.getAttribute('#f-width', 'aria-invalid'), 'true');
  // Fixing it clears the message on the next submit.
  await page.fill('#f-width', '64');
  const id = await submit(page);
  assert.equal(await page.locator('[data-field="width"] .field-error').count(), 0);
  await jobStatus(page, id, 'succeeded');
  await page.context().close();
});

test('a running slow job shows progress, the next its queue place, and both cancel', async () => {
  const page = await newPage();
  await ready(page);
  const slow = { ...GEN, width: 512, height: 512, steps: 60, format: 'webp' };
  await fillForm(page, slow);
  const running = await submit(page);
  const queued = await submit(page);
  const runLi = page.locator(`li.job[data-job="${running}"]`);
  await runLi.locator('.status-text', { hasText: /step \d+ of 60/ }).waitFor({ timeout: T });
  const queuedLi = page.locator(`li.job[data-job="${queued}"]`);
  await queuedLi.locator('.status-text', { hasText: 'place 1 in the queue' }).waitFor({ timeout: T });

  await queuedLi.getByRole('button', { name: /Cancel/ }).click();
  await jobStatus(page, queued, 'canceled');
  await runLi.getByRole('button', { name: /Cancel/ }).click();
  await jobStatus(page, running, 'canceled');
  for (const id of [running, queued]) {
    const { json } = await server.api('GET', `/v1/generations/${id}`);
    assert.equal(json.status, 'canceled');
  }
  await page.context().close();
});

test('an uploaded init image and a painted mask are submitted with the job', async () => {
  const page = await newPage();
  await ready(page);
  await fillForm(page, { ...GEN, prompt: 'inpaint e2e', width: 64, height: 64 });
  await page.click('#init-card summary');
  await page.setInputFiles('#f-init-file', join(REPO, 'tests/fixtures/generated/init_image.png'));
  await page.locator('#init-panel').waitFor({ state: 'visible', timeout: T });
  await page.check('#mask-on');
  await page.fill('#f-strength', '0.75');
  const canvas = page.locator('#painter canvas');
  await canvas.scrollIntoViewIfNeeded();
  const box = await canvas.boundingBox();
  await page.mouse.move(box.x + box.width * 0.2, box.y + box.height * 0.3);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width * 0.5, box.y + box.height * 0.3, { steps: 5 });
  await page.mouse.up();
  const id = await submit(page);
  await jobStatus(page, id, 'succeeded');

  const { json: record } = await server.api('GET', `/v1/generations/${id}`);
  const requested = record.images[0].requested;
  assert.equal(requested.strength, 0.75);
  assert.ok(requested.image && requested.mask, JSON.stringify(requested));
  assert.equal(record.images[0].parameters.task ?? 'inpaint', 'inpaint');
  const { json: mask } = await server.api('GET', `/v1/assets/${requested.mask}`);
  assert.equal(mask.kind, 'input');
  assert.equal(mask.width, 64);
  // The stored mask is white where the stroke went, black elsewhere.
  const [white, black] = await page.evaluate(async (url) => {
    const img = new Image();
    img.src = url;
    await img.decode();
    const c = new OffscreenCanvas(img.width, img.height);
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const d = ctx.getImageData(0, 0, img.width, img.height).data;
    const at = (x, y) => d[(y * img.width + x) * 4];
    return [at(Math.round(img.width * 0.35), Math.round(img.height * 0.3)), at(5, img.height - 5)];
  }, mask.file_url);
  assert.equal(white, 255);
  assert.equal(black, 0);
  await page.context().close();
});

test('a LoRA of the model folders, picked with a scale, reaches the job', async () => {
  const page = await newPage();
  await ready(page);
  await fillForm(page, { ...GEN, prompt: 'lora e2e', width: 64, height: 64 });
  await page.click('#loras-card summary');
  await page.click('#lora-add');
  const options = await page.locator('#lora-options option').evaluateAll((els) => els.map((e) => e.value));
  assert.deepEqual(options, ['detail']);
  await page.fill('#lora-ref-0', 'detail');
  await page.fill('#lora-scale-0', '0.5');
  const id = await submit(page);
  await jobStatus(page, id, 'succeeded');
  const { json: record } = await server.api('GET', `/v1/generations/${id}`);
  assert.deepEqual(record.images[0].requested.loras, [{ path: 'detail', scale: 0.5 }]);
  assert.equal(record.images[0].parameters.loras.length, 1);
  assert.equal(record.images[0].parameters.loras[0].scale, 0.5);
  await page.context().close();
});

test('gallery actions: download link, copy URL, inpaint puts the image and the painter in the form', async () => {
  const page = await newPage();
  await page.context().grantPermissions(['clipboard-read', 'clipboard-write'], { origin: server.url });
  await ready(page);
  await page.goto(server.url + '/#gallery');
  await page.locator('#gallery-grid li button').first().click();
  await page.locator('#detail[open]').waitFor({ timeout: T });
  const url = (await page.textContent('#detail-params td[data-param="file_url"]')).trim();
  const assetId = (await page.textContent('#detail-params td[data-param="asset id"]')).trim();
  assert.equal(await page.getAttribute('#d-download', 'href'), url);
  assert.match(await page.getAttribute('#d-download', 'download'), /^easel-.*\.(png|webp)$/);
  await page.click('#d-copy');
  await page.locator('#d-status', { hasText: 'URL copied' }).waitFor({ timeout: T });
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), url);
  // The close button closes the view (a method=dialog form under the page's CSP).
  await page.getByRole('button', { name: 'Close' }).click();
  await page.locator('#detail:not([open])').waitFor({ state: 'attached', timeout: T });
  await page.locator('#gallery-grid li button').first().click();
  await page.locator('#detail[open]').waitFor({ timeout: T });

  await page.click('#d-inpaint');
  await page.locator('#init-panel').waitFor({ state: 'visible', timeout: T });
  assert.equal(await page.inputValue('#f-model'), 'tiny-sd15', 'the image\'s own model');
  assert.equal(await page.isChecked('#mask-on'), true);
  assert.equal(await page.locator('#painter canvas').isVisible(), true);
  assert.equal(await page.getAttribute('#painter img', 'src'), url);
  await page.fill('#f-prompt', 'inpaint from the gallery');
  await page.fill('#f-steps', '4');
  await page.locator('#painter canvas').scrollIntoViewIfNeeded();
  const box = await page.locator('#painter canvas').boundingBox();
  await page.mouse.move(box.x + 5, box.y + 5);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2, { steps: 4 });
  await page.mouse.up();
  const sent = page.waitForRequest((r) => r.url().endsWith('/v1/generations') && r.method() === 'POST');
  const id = await submit(page);
  const body = (await sent).postDataJSON();
  assert.equal(body.images[0].image, assetId, 'the asset id is sent as the init image');
  assert.match(body.images[0].mask, /^data:image\/png;base64,/);
  await jobStatus(page, id, 'succeeded');
  const { json: record } = await server.api('GET', `/v1/generations/${id}`);
  // The init image was sent as the asset's id; the job stores it as its
  // own input asset of the same content.
  const { json: input } = await server.api('GET', `/v1/assets/${record.images[0].requested.image}`);
  const { json: source } = await server.api('GET', `/v1/assets/${assetId}`);
  assert.equal(input.kind, 'input');
  assert.equal(input.content_hash, source.content_hash);
  assert.ok(record.images[0].requested.mask);
  await page.context().close();
});

test('dropping an easel PNG on the form fills it from its parameters text', async () => {
  const { json: record } = await server.api('GET', `/v1/generations/${firstJob}`);
  const bytes = Buffer.from(await (await fetch(record.assets[0].file_url)).arrayBuffer());
  const page = await newPage();
  await ready(page);
  await page.fill('#f-prompt', '');
  const dt = await page.evaluateHandle((b64) => {
    const raw = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const t = new DataTransfer();
    t.items.add(new File([raw], 'easel.png', { type: 'image/png' }));
    return t;
  }, bytes.toString('base64'));
  await page.dispatchEvent('#f-prompt', 'drop', { dataTransfer: dt });
  await page.waitForFunction(() => document.getElementById('f-prompt').value !== '', null, { timeout: T });
  assert.equal(await page.inputValue('#f-prompt'), GEN.prompt);
  assert.equal(await page.inputValue('#f-negative'), GEN.negative);
  assert.equal(await page.inputValue('#f-steps'), '4');
  assert.equal(await page.inputValue('#f-guidance'), '6.5');
  assert.equal(await page.inputValue('#f-seed'), '1234');
  assert.equal(await page.inputValue('#f-width'), '64');
  assert.equal(await page.inputValue('#f-height'), '48');
  assert.equal(await page.inputValue('#f-scheduler'), 'euler');
  await page.context().close();
});

test('screenshots at phone and desktop width; delete from the gallery', async () => {
  for (const [name, width, height] of [['phone', 390, 844], ['desktop', 1280, 900]]) {
    const page = await newPage({ width, height });
    await ready(page);
    await fillForm(page, { ...GEN, width: 64, height: 64 });
    await page.locator('li.job .thumbs img').first().waitFor({ timeout: T });
    await shot(page, `generate-${name}`);
    if (name === 'desktop') {
      const dark = await newPage({ width, height, colorScheme: 'dark' });
      await ready(dark);
      await fillForm(dark, { ...GEN, width: 64, height: 64 });
      await dark.locator('li.job .thumbs img').first().waitFor({ timeout: T });
      assert.equal(await dark.evaluate(() => getComputedStyle(document.body).backgroundColor), 'rgb(20, 20, 22)');
      await shot(dark, 'generate-desktop-dark');
      await dark.context().close();
    }
    await page.goto(server.url + '/#gallery');
    await page.locator('#gallery-grid li img').first().waitFor({ timeout: T });
    await page.waitForFunction(() => [...document.querySelectorAll('#gallery-grid img')].every((i) => i.complete));
    await shot(page, `gallery-${name}`);
    if (name === 'desktop') {
      await page.locator('#gallery-grid li button').first().click();
      await page.locator('#detail[open]').waitFor({ timeout: T });
      await page.waitForFunction(() => document.getElementById('detail-img').complete);
      await shot(page, 'detail-desktop');
      await page.keyboard.press('Escape');
    }
    await page.context().close();
  }
  const page = await newPage();
  await ready(page);
  await page.goto(server.url + '/#gallery');
  const before = await server.api('GET', '/v1/assets?limit=100');
  await page.locator('#gallery-grid li button').first().click();
  await page.locator('#detail[open]').waitFor({ timeout: T });
  const id = (await page.textContent('#detail-params td[data-param="asset id"]')).trim();
  await page.click('#d-delete');
  await page.locator('#detail:not([open])').waitFor({ state: 'attached', timeout: T });
  const { status } = await server.api('GET', `/v1/assets/${id}`);
  assert.equal(status, 404);
  const afterList = await server.api('GET', '/v1/assets?limit=100');
  assert.equal(afterList.json.data.length, before.json.data.length - 1);
  await page.context().close();
});

test('flows: validation errors by step, then the seed genre flow runs and shows its images', async () => {
  const chat = await startChatServer((genre) => [0, 1, 2].map((i) => `${genre} scene ${i}`));
  const tiny = join(REPO, 'tests/fixtures/models/tiny-sd15');
  const flowServer = await startServer({
    config: `llm_url = "${chat.url}"\nllm_model = "test-model"\n\n[models]\n`
      + `"stable-diffusion-v1-5/stable-diffusion-v1-5" = "${tiny}"\n`,
  });
  try {
    const page = await newPage({ key: flowServer.key, target: flowServer });
    await ready(page);
    await page.click('nav a[data-page=flows]');
    await page.locator('#flow-doc').waitFor({ timeout: T });
    await page.fill('#flow-doc', `{ steps: [{ id: 'gen', type: 'ImageGenerator',
      parameters: { baseModel: 'tiny-sd15', images: [{ prompt: 'a', width: 1001 }] } }] }`);
    await page.click('#flow-save');
    const problem = page.locator('#flow-errors li');
    await problem.first().waitFor({ timeout: T });
    assert.equal(await problem.locator('code').first().textContent(), 'steps[0] (gen).parameters.images[0].width');
    assert.match(await problem.first().textContent(), /1001/);

    const genre = readFileSync(join(REPO, 'crates/easel-flow/tests/seed_flows/genre.json5'), 'utf8');
    await page.fill('#flow-doc', genre);
    await page.locator('#flow-doc').press('Control+Enter');
    await page.locator('#flow-list button[aria-pressed="true"]').waitFor({ timeout: T });
    assert.equal(await page.locator('#flow-errors li').count(), 0);
    await page.fill('#flow-input', '{"promptType": "film noir"}');
    await page.click('#flow-run');
    await page.locator('#flow-run-status[data-status="succeeded"]').waitFor({ timeout: 240_000 });
    assert.deepEqual(await page.locator('#flow-steps li').evaluateAll((els) => els.map((e) => [e.dataset.step, e.dataset.status])),
      [['promptsGenerator', 'succeeded'], ['dynamicImageGenerator', 'succeeded']]);
    const outputs = page.locator('#flow-outputs img');
    assert.equal(await outputs.count(), 3);
    await page.waitForFunction(() => [...document.querySelectorAll('#flow-outputs img')].every((i) => i.complete && i.naturalWidth > 0));
    assert.match(chat.requests[0].messages.map((m) => m.content).join(' '), /film noir/);
    await page.evaluate(() => { document.activeElement?.blur(); window.scrollTo(0, 0); });
    await shot(page, 'flows-desktop', true);
    // An output opens in the detail view with its flow-made prompt.
    await outputs.first().click();
    await page.locator('#detail[open]').waitFor({ timeout: T });
    assert.match(await page.textContent('#detail-params td[data-param="prompt"]'), /^film noir scene \d$/);
    await page.keyboard.press('Escape');
    await page.context().close();
  } finally {
    await flowServer.stop();
    await chat.close();
  }
});

test('usage shows the key\'s ledger sums and entries', async () => {
  const page = await newPage();
  await ready(page);
  await page.goto(server.url + '/#usage');
  const used = page.locator('#usage dd[data-usage="Inferences billed"]');
  await used.waitFor({ timeout: T });
  const { json } = await server.api('GET', '/v1/usage');
  assert.match(await used.textContent(), new RegExp(`^${json.inferences_billed} `));
  // The ledger: one row per entry, newest first, refunds of the canceled jobs included.
  const { json: ledger } = await server.api('GET', '/v1/usage/ledger?limit=51');
  await page.locator('#ledger tbody tr').first().waitFor({ timeout: T });
  const kinds = await page.locator('#ledger tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.kind));
  assert.deepEqual(kinds, ledger.data.slice(0, 50).map((e) => e.kind));
  assert.ok(kinds.includes('refund') && kinds.includes('charge'), kinds.join(','));
  await page.context().close();
});

