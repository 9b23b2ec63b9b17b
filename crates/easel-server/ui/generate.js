// The Generate form: models from GET /v1/models with their family's
// defaults, the request fields, LoRAs, init image + mask painter, and
// POST /v1/generations with the API's validation errors shown at the field
// they name.

import { call, ApiError } from './api.js';
import { $, h, toast, dataUrl } from './dom.js';
import { MaskPainter } from './mask.js';
import { pngParameters, parseParameters } from './pnginfo.js';

const ASPECTS = [[1, 1], [3, 2], [2, 3], [4, 3], [3, 4], [16, 9], [9, 16]];

let models = [];
let defaults = null; // the selected model's `defaults` (family facts)
let init = null; // {value: asset id or data URI, url, img, painter}
let lastSeed = null;
let onSubmitted = () => {};

/** The models the server lists (for the gallery's filter too). */
export const listedModels = () => models;

/** Remember the seed of the last finished image ("reuse last"). */
export function setLastSeed(seed) {
  lastSeed = seed;
  if ($('f-seed-mode').value === 'last') $('f-seed').value = String(seed);
}

function control(name) {
  return $('gen-form').elements.namedItem(name);
}

function applyModel() {
  const m = models.find((x) => x.id === control('baseModel').value);
  defaults = m?.defaults ?? null;
  const d = defaults;
  $('neg-field').hidden = d ? !d.negative_prompt : false;
  for (const name of ['width', 'height']) {
    const el = control(name);
    el.step = d?.size_multiple ?? 8;
    el.min = d?.size_multiple ?? 8;
  }
  const steps = control('steps');
  steps.value = d?.steps ?? '';
  steps.placeholder = d?.steps == null ? "model's" : '';
  const guidance = control('guidanceScale');
  guidance.value = d?.guidance_scale ?? '';
  guidance.placeholder = d?.guidance_scale == null ? "model's" : '';
  const sched = control('scheduler');
  sched.replaceChildren(h('option', { value: '' }, "model's default"),
    ...(d?.schedulers ?? []).map((s) => h('option', { value: s }, s)));
  if (init) control('strength').value = d?.strength ?? 0.8;
  $('strength-out').textContent = control('strength').value;
  const maskRule = d?.mask ?? 'optional';
  $('mask-tools').hidden = maskRule === 'refused';
  if (maskRule === 'refused' && init?.painter) {
    $('mask-on').checked = false;
    init.painter.setEnabled(false);
  }
}

async function loadModels() {
  const list = await call('GET', '/v1/models');
  models = list.data.filter((m) => m.format !== 'pickle');
  const select = control('baseModel');
  const keep = select.value;
  select.replaceChildren(...models.map((m) => h('option', { value: m.id },
    m.family && !m.family.startsWith('unknown') ? `${m.id} (${m.family})` : m.id)));
  if (keep && models.some((m) => m.id === keep)) select.value = keep;
  applyModel();
}

function aspectChips() {
  $('aspect-chips').replaceChildren(...ASPECTS.map(([a, b]) => h('button', {
    type: 'button', 'aria-pressed': 'false',
    onclick: (e) => {
      const mult = defaults?.size_multiple ?? 8;
      const w0 = Number(control('width').value), h0 = Number(control('height').value);
      const fallback = defaults?.family === 'stable_diffusion' ? 512 : 1024;
      const area = w0 && h0 ? w0 * h0 : fallback * fallback;
      const round = (v) => Math.max(mult, Math.round(v / mult) * mult);
      control('width').value = round(Math.sqrt(area * a / b));
      control('height').value = round(Math.sqrt(area * b / a));
      for (const c of $('aspect-chips').children) c.setAttribute('aria-pressed', String(c === e.currentTarget));
    },
  }, `${a}:${b}`)));
}

// ---- LoRAs ----

let trainings = [];
function addLora(value = '', scale = 0.9) {
  const n = $('lora-list').children.length;
  const row = h('div', { class: 'lora', dataset: { field: `loras[${n}]` } },
    h('div', { class: 'field' },
      h('label', { for: `lora-ref-${n}` }, 'LoRA: training id, file name or path'),
      h('input', { id: `lora-ref-${n}`, class: 'lora-ref', list: 'lora-options', value })),
    h('div', { class: 'field scale' },
      h('label', { for: `lora-scale-${n}` }, 'Scale'),
      h('input', { id: `lora-scale-${n}`, class: 'lora-scale', type: 'number', step: '0.05', min: '-3', max: '3', value: String(scale) })),
    h('button', { type: 'button', class: 'secondary', onclick: () => row.remove() }, 'Remove'));
  $('lora-list').append(row);
  $('loras-card').open = true;
  return row;
}

async function loadLoras() {
  const [t, files] = await Promise.all([
    call('GET', '/v1/trainings').catch(() => ({ data: [] })),
    call('GET', '/v1/loras').catch(() => ({ data: [] })),
  ]);
  trainings = t.data;
  const list = h('datalist', { id: 'lora-options' },
    ...trainings.map((x) => h('option', { value: x.id }, `${x.name} (uploaded, ${x.base_model})`)),
    ...files.data.map((x) => h('option', { value: x.id }, `${x.family ?? 'LoRA file'}`)));
  document.getElementById('lora-options')?.remove();
  document.body.append(list);
}

// ---- init image and mask ----

/** Use an image as the init image: `value` is what the API gets (an asset id or a data URI). */
export async function setInit(value, url, { inpaint = false, maskUrl = null } = {}) {
  clearInit();
  const img = new Image();
  img.alt = 'Init image';
  img.src = url;
  await img.decode();
  $('painter').replaceChildren(img);
  const painter = new MaskPainter($('painter'), img);
  painter.brush = Number($('brush-size').value);
  painter.eraser = $('eraser').checked;
  init = { value, url, img, painter };
  if (maskUrl) {
    const m = new Image();
    m.src = maskUrl;
    await m.decode();
    painter.ctx.drawImage(m, 0, 0, painter.canvas.width, painter.canvas.height);
    painter.painted = true;
    inpaint = true;
  }
  $('mask-on').checked = inpaint && defaults?.mask !== 'refused';
  painter.setEnabled($('mask-on').checked);
  $('init-info').textContent = `${img.naturalWidth}×${img.naturalHeight} init image`;
  $('init-panel').hidden = false;
  $('init-card').open = true;
  control('strength').value = defaults?.strength ?? 0.8;
  $('strength-out').textContent = control('strength').value;
}

function clearInit() {
  init?.painter.remove();
  init = null;
  $('painter').replaceChildren();
  $('init-panel').hidden = true;
  $('mask-on').checked = false;
}

async function takeFile(file, { fillOnly = false } = {}) {
  if (!file || !file.type.startsWith('image/')) return;
  if (file.type === 'image/png') {
    const text = pngParameters(await file.arrayBuffer());
    if (text && fillOnly) {
      fill(parseParameters(text));
      toast('Form filled from the PNG\'s parameters');
      return;
    }
  }
  const uri = await dataUrl(file);
  await setInit(uri, uri);
}

function initDropAndPaste() {
  const zone = $('dropzone');
  const form = $('gen-form');
  for (const target of [zone, form]) {
    target.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('over'); });
    target.addEventListener('dragleave', () => zone.classList.remove('over'));
  }
  zone.addEventListener('drop', (e) => {
    e.preventDefault();
    e.stopPropagation();
    zone.classList.remove('over');
    takeFile(e.dataTransfer.files[0]);
  });
  // Dropped elsewhere on the form: an easel / A1111 PNG fills the form.
  form.addEventListener('drop', (e) => {
    e.preventDefault();
    zone.classList.remove('over');
    takeFile(e.dataTransfer.files[0], { fillOnly: true });
  });
  document.addEventListener('paste', (e) => {
    if ($('page-generate').hidden) return;
    const file = [...(e.clipboardData?.files ?? [])].find((f) => f.type.startsWith('image/'));
    if (file) { e.preventDefault(); takeFile(file); }
  });
  $('f-init-file').addEventListener('change', (e) => takeFile(e.target.files[0]));
  $('mask-on').addEventListener('change', (e) => init?.painter.setEnabled(e.target.checked));
  $('brush-size').addEventListener('input', (e) => { if (init) init.painter.brush = Number(e.target.value); });
  $('eraser').addEventListener('change', (e) => { if (init) init.painter.eraser = e.target.checked; });
  $('mask-clear').addEventListener('click', () => init?.painter.clear());
  $('mask-invert').addEventListener('click', () => init?.painter.invert());
  $('init-remove').addEventListener('click', clearInit);
  control('strength').addEventListener('input', (e) => { $('strength-out').textContent = e.target.value; });
}

// ---- values in and out ----

/** Set the form from request-shaped values (a record's parameters, a PNG's text). */
export function fill(v) {
  if (v.baseModel !== undefined) {
    const select = control('baseModel');
    if (!models.some((m) => m.id === v.baseModel)) select.append(h('option', { value: v.baseModel }, v.baseModel));
    select.value = v.baseModel;
    applyModel();
  }
  for (const name of ['prompt', 'negativePrompt', 'width', 'height', 'steps', 'guidanceScale', 'batchSize', 'outputQuality']) {
    if (v[name] !== undefined) control(name).value = v[name] ?? '';
  }
  if (v.outputFormat !== undefined) control('outputFormat').value = v.outputFormat ?? '';
  if (v.scheduler !== undefined) {
    const sched = control('scheduler');
    const s = v.scheduler ?? '';
    if (s && ![...sched.options].some((o) => o.value === s)) sched.append(h('option', { value: s }, s));
    sched.value = s;
  }
  if (v.seed !== undefined && v.seed !== null) {
    control('seedMode').value = 'fixed';
    control('seed').disabled = false;
    control('seed').value = String(v.seed);
  }
  if (v.strength !== undefined && v.strength !== null) {
    control('strength').value = v.strength;
    $('strength-out').textContent = v.strength;
  }
  if (v.loras) {
    $('lora-list').replaceChildren();
    for (const l of v.loras) addLora(l.source?.replace(/^training:/, '') ?? l.id ?? l.path ?? '', l.scale);
  }
}

const num = (name) => {
  const raw = control(name).value.trim();
  return raw === '' ? undefined : Number(raw);
};

/** The image definition the form describes. */
function collect() {
  const d = { baseModel: control('baseModel').value, prompt: control('prompt').value };
  if (!$('neg-field').hidden && control('negativePrompt').value.trim()) d.negativePrompt = control('negativePrompt').value;
  for (const name of ['width', 'height', 'steps', 'guidanceScale', 'batchSize', 'outputQuality']) {
    const v = num(name);
    if (v !== undefined) d[name] = v;
  }
  if (control('scheduler').value) d.scheduler = control('scheduler').value;
  if (control('outputFormat').value) d.outputFormat = control('outputFormat').value;
  const mode = control('seedMode').value;
  const seedText = control('seed').value.trim();
  if (mode !== 'random' && seedText !== '') {
    // Seeds go up to 2^64-1: keep digits exact by sending a JSON number literal.
    d.seed = /^\d+$/.test(seedText) ? seedValue(seedText) : seedText;
  }
  const loras = [...$('lora-list').children].map((row) => {
    const ref = row.querySelector('.lora-ref').value.trim();
    const scale = Number(row.querySelector('.lora-scale').value);
    return trainings.some((t) => t.id === ref) ? { id: ref, scale } : { path: ref, scale };
  });
  if (loras.length) d.loras = loras;
  if (init) {
    d.image = init.value;
    d.strength = Number(control('strength').value);
    const mask = init.painter.dataUrl();
    if (mask) d.mask = mask;
  }
  return d;
}

// A seed above 2^53 is sent as written: `stringify` unquotes the marker.
function seedValue(text) {
  return Number.isSafeInteger(Number(text)) ? Number(text) : { __raw: text };
}

function stringify(body) {
  return JSON.stringify(body, (k, v) => (v && v.__raw ? `__RAW${v.__raw}__` : v))
    .replace(/"__RAW(\d+)__"/g, '$1');
}

// ---- errors at fields ----

function clearErrors() {
  $('form-error').textContent = '';
  for (const el of document.querySelectorAll('#gen-form .field-error')) el.remove();
  for (const el of document.querySelectorAll('#gen-form .invalid')) el.classList.remove('invalid');
  for (const el of document.querySelectorAll('#gen-form [aria-invalid]')) {
    el.removeAttribute('aria-invalid');
    el.removeAttribute('aria-describedby');
  }
}

/** Show `error` (ApiError) next to the field its `field` names, else above the button. */
export function showError(error) {
  clearErrors();
  const path = (error.field ?? '').replace(/^images\[0\]\.?/, '');
  const candidates = [path, path.replace(/\.[^.]*$/, ''), path.replace(/\[\d+\].*$/, '')];
  const box = candidates.map((p) => p && document.querySelector(`#gen-form [data-field="${CSS.escape(p)}"]`)).find(Boolean);
  if (!box) {
    $('form-error').textContent = error.message;
    return;
  }
  box.classList.add('invalid');
  const id = `err-${path.replace(/[^\w]/g, '-')}`;
  box.append(h('p', { class: 'error field-error', id, role: 'alert' }, error.message));
  const input = box.querySelector('input, select, textarea');
  if (input) {
    input.setAttribute('aria-invalid', 'true');
    input.setAttribute('aria-describedby', id);
  }
  box.closest('details')?.setAttribute('open', '');
  box.scrollIntoView({ block: 'center', behavior: 'smooth' });
}

async function submit() {
  clearErrors();
  const button = $('generate-btn');
  button.disabled = true;
  try {
    const json = await call('POST', '/v1/generations', undefined, { raw: stringify({ images: [collect()] }) });
    onSubmitted(json);
  } catch (e) {
    if (e instanceof ApiError) showError(e);
    else $('form-error').textContent = String(e.message ?? e);
  } finally {
    button.disabled = false;
  }
}

/** Set the form up; `submitted(record)` gets each accepted job. */
export async function initGenerate(submitted) {
  onSubmitted = submitted;
  aspectChips();
  initDropAndPaste();
  control('baseModel').addEventListener('change', applyModel);
  control('seedMode').addEventListener('change', (e) => {
    const seed = control('seed');
    seed.disabled = e.target.value === 'random';
    seed.placeholder = e.target.value === 'random' ? 'random' : '';
    if (e.target.value === 'last') seed.value = lastSeed ?? '';
  });
  $('lora-add').addEventListener('click', () => addLora());
  $('gen-form').addEventListener('submit', (e) => { e.preventDefault(); submit(); });
  $('gen-form').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submit(); }
  });
  await Promise.all([loadModels(), loadLoras()]);
}
