// The gallery: the key's output images newest first (GET /v1/assets with
// limit/offset/prompt/model), and a detail view with every parameter of
// the image's record (GET /v1/generations/{id}) and its actions.

import { call } from './api.js';
import { $, h, toast, copyText } from './dom.js';

const PAGE = 24;
let offset = 0;
let filter = { prompt: '', model: '' };
let actions = {};
let current = null; // {asset, image (the record's images[i]), record}

async function load() {
  const q = new URLSearchParams({ limit: String(PAGE + 1), offset: String(offset) });
  if (filter.prompt) q.set('prompt', filter.prompt);
  if (filter.model) q.set('model', filter.model);
  const list = await call('GET', `/v1/assets?${q}`);
  const items = list.data.slice(0, PAGE);
  $('gallery-grid').replaceChildren(...items.map((a) => h('li', {},
    h('button', { type: 'button', 'aria-label': `Open image ${a.id}`, onclick: () => open(a) },
      h('img', { src: a.file_url, alt: `Image ${a.width}×${a.height}, seed ${a.seed}`, loading: 'lazy' })),
    h('p', { class: 'caption' }, `${a.width}×${a.height} · seed ${a.seed}`))));
  $('gallery-empty').hidden = items.length > 0;
  $('g-prev').disabled = offset === 0;
  $('g-next').disabled = list.data.length <= PAGE;
  $('g-page').textContent = items.length ? `${offset + 1}–${offset + items.length}` : '';
}

/** Reload the current page (after a new image or a delete). */
export function refresh() {
  if (!$('page-gallery').hidden) load().catch((e) => toast(e.message));
}

function row(name, value) {
  if (value === null || value === undefined || value === '') return null;
  const text = typeof value === 'object' ? JSON.stringify(value) : String(value);
  return h('tr', {}, h('th', { scope: 'row' }, name), h('td', { dataset: { param: name } }, text));
}

/** Open the detail view of `asset` (an asset record). */
export async function open(asset) {
  const record = await call('GET', `/v1/generations/${asset.generation_id}`);
  const image = record.images.find((i) => i.index === asset.image_index) ?? record.images[0];
  current = { asset, image, record };
  const p = image.parameters ?? {};
  $('detail-img').src = asset.file_url;
  $('detail-img').alt = p.prompt ?? 'Generated image';
  $('detail-title').textContent = p.prompt ? p.prompt.slice(0, 80) : 'Image';
  $('d-download').href = asset.file_url;
  $('d-download').setAttribute('download', asset.file_name);
  $('d-status').textContent = '';
  $('d-inpaint').hidden = false;
  const rows = [
    ...Object.entries(p).map(([k, v]) => row(k, k === 'seed' ? asset.seed : v)),
    row('image seed', asset.seed),
    row('size', `${asset.width}×${asset.height}`),
    row('file', `${asset.file_name} (${asset.file_type}, ${asset.file_size} bytes)`),
    row('file_url', asset.file_url),
    row('asset id', asset.id),
    row('job', record.id),
    row('created_at', asset.created_at),
    row('init image', image.requested?.image),
    row('mask', image.requested?.mask),
  ];
  $('detail-params').replaceChildren(...rows.filter(Boolean));
  if (!$('detail').open) $('detail').showModal();
}

async function del() {
  const { asset } = current;
  if (!window.confirm('Delete this image? Its record and file go.')) return;
  try {
    await call('DELETE', `/v1/assets/${asset.id}`);
    $('detail').close();
    toast('Deleted');
    load();
  } catch (e) {
    $('d-status').textContent = e.message;
  }
}

/**
 * Set the gallery up; `handlers.reuse(values)`, `handlers.init(asset,
 * {inpaint})` put an image into the form.
 */
export function initGallery(handlers, models) {
  actions = handlers;
  $('g-model').replaceChildren(h('option', { value: '' }, 'any'),
    ...models.map((m) => h('option', { value: m.id }, m.id)));
  $('gallery-filter').addEventListener('submit', (e) => {
    e.preventDefault();
    filter = { prompt: $('g-prompt').value.trim(), model: $('g-model').value };
    offset = 0;
    load().catch((err) => toast(err.message));
  });
  $('g-prev').addEventListener('click', () => { offset = Math.max(0, offset - PAGE); load(); });
  $('g-next').addEventListener('click', () => { offset += PAGE; load(); });
  $('d-reuse').addEventListener('click', () => {
    const { asset, image } = current;
    const p = image.parameters ?? {};
    $('detail').close();
    actions.reuse({
      baseModel: p.baseModel, prompt: p.prompt, negativePrompt: p.negativePrompt ?? '',
      width: p.width, height: p.height, steps: p.steps, guidanceScale: p.guidanceScale,
      scheduler: image.requested?.scheduler ?? '', seed: asset.seed, batchSize: 1,
      outputFormat: p.outputFormat, outputQuality: p.outputQuality,
      strength: p.strength, loras: p.loras ?? [],
    }, image.requested);
  });
  $('d-init').addEventListener('click', () => { $('detail').close(); actions.init(current.asset, { inpaint: false }); });
  // Inpaint with the image's own model (the form's may refuse masks).
  $('d-inpaint').addEventListener('click', () => {
    $('detail').close();
    actions.init(current.asset, { inpaint: true, baseModel: current.image.parameters?.baseModel });
  });
  $('d-copy').addEventListener('click', async () => {
    const ok = await copyText(current.asset.file_url);
    $('d-status').textContent = ok ? 'URL copied' : current.asset.file_url;
  });
  $('d-delete').addEventListener('click', del);
}

/** Show the gallery page's first page of images. */
export function showGallery() {
  load().catch((e) => toast(e.message));
}
