// The job list beside the form: each job's status, its place in the queue
// (the record's `queue_position`, re-read while queued), live denoising
// progress from GET /v1/generations/{id}/events, a cancel button, and the
// finished images.

import { call, events } from './api.js';
import { $, h } from './dom.js';

const FINISHED = new Set(['succeeded', 'failed', 'canceled']);
const shown = new Map(); // job id -> {li, record}
let openAsset = () => {};
let finished = () => {};

function describe(record, progress) {
  if (record.status === 'queued') {
    return record.queue_position ? `queued: place ${record.queue_position} in the queue` : 'queued';
  }
  if (record.status === 'running') {
    const p = progress ?? record.progress;
    if (!p) return 'starting';
    const images = `image ${Math.min(p.images_done + 1, p.images_total)} of ${p.images_total}`;
    return p.stage === 'denoising' ? `${images}: step ${p.step} of ${p.steps}` : `${images}: ${p.stage}`;
  }
  if (record.status === 'failed') return record.error?.message ?? 'failed';
  if (record.status === 'canceled') return 'canceled';
  return `${record.images_done} image${record.images_done === 1 ? '' : 's'}`;
}

function render(id, progress = null) {
  const entry = shown.get(id);
  const r = entry.record;
  const prompt = r.images?.[0]?.requested?.prompt ?? '';
  const bar = h('progress', { max: '1', 'aria-label': 'Progress' });
  const p = progress ?? r.progress;
  if (r.status === 'running' && p && p.steps) {
    const perImage = 1 / Math.max(1, p.images_total);
    bar.value = Math.min(1, p.images_done * perImage + (p.step / p.steps) * perImage * p.batch_images);
  } else if (FINISHED.has(r.status)) {
    bar.hidden = true;
  } else {
    bar.removeAttribute('value');
  }
  const cancel = FINISHED.has(r.status) ? null : h('button', {
    type: 'button', class: 'danger', 'aria-label': `Cancel job ${id}`,
    onclick: async (e) => {
      e.currentTarget.disabled = true;
      try { update(await call('POST', `/v1/generations/${id}/cancel`)); } catch (err) { entry.note = err.message; render(id); }
    },
  }, 'Cancel');
  entry.li.replaceChildren(
    h('header', {},
      h('span', { class: `badge ${r.status}` }, r.status),
      h('span', { class: 'hint status-text' }, entry.note ?? describe(r, progress)),
      cancel),
    h('p', { class: 'prompt' }, prompt),
    bar,
    h('div', { class: 'thumbs' }, ...r.assets.map((a) => h('button', {
      type: 'button', class: 'link', 'aria-label': `Open image ${a.batch_index + 1}`,
      onclick: () => openAsset(a),
    }, h('img', { src: a.file_url, alt: prompt, loading: 'lazy' })))),
  );
  entry.li.dataset.status = r.status;
}

function update(record) {
  const entry = shown.get(record.id);
  if (!entry) return;
  const wasFinished = FINISHED.has(entry.record.status);
  entry.record = record;
  entry.note = null;
  render(record.id);
  if (!wasFinished && FINISHED.has(record.status)) {
    const seed = record.assets.at(-1)?.seed;
    finished(record, seed);
  }
}

async function follow(id) {
  // While queued the stream has nothing to say about the queue: re-read
  // the record for its place.
  const poll = setInterval(async () => {
    const entry = shown.get(id);
    if (!entry || entry.record.status !== 'queued') return;
    try { update(await call('GET', `/v1/generations/${id}`)); } catch { /* next time */ }
  }, 1500);
  try {
    await events(`/v1/generations/${id}/events`, (name, data) => {
      if (name === 'status' && data?.id) update(data);
      else if (name === 'progress') render(id, data);
    });
  } catch { /* the stream broke: read the record below */ }
  clearInterval(poll);
  try { update(await call('GET', `/v1/generations/${id}`)); } catch { /* gone */ }
}

/** Show job `record` at the top of the list and follow it until it ends. */
export function track(record) {
  if (shown.has(record.id)) return;
  const li = h('li', { class: 'job', dataset: { job: record.id } });
  $('job-list').prepend(li);
  shown.set(record.id, { li, record, note: null });
  render(record.id);
  if (!FINISHED.has(record.status)) follow(record.id);
}

/**
 * Set the list up: `open(asset)` opens an image, `done(record, seed)` hears
 * of each job that finishes. Shows the key's latest jobs.
 */
export async function initJobs(open, done) {
  openAsset = open;
  finished = done;
  const list = await call('GET', '/v1/generations?limit=8');
  for (const record of list.data.reverse()) track(record);
}
