// Flows: the key's flows (GET /v1/flows), a JSON5 editor that stores a
// document (POST /v1/flows, whose 422 lists every problem by step and
// parameter), runs with an input (POST /v1/flows/{id}/runs), each step's
// status live (GET /v1/flow-runs/{id}/events), and image steps' outputs.

import { call, events, ApiError } from './api.js';
import { $, h, toast } from './dom.js';

const TEMPLATE = `{
  name: 'my flow',
  steps: [
    {
      id: 'gen',
      type: 'ImageGenerator',
      parameters: {
        baseModel: 'MODEL',
        images: [{ prompt: '$.input.prompt' }],
      },
    },
  ],
}`;

let flows = [];
let selected = null; // the flow record shown
let openAsset = () => {};
let watching = null; // AbortController of the followed run

function showProblems(error) {
  const lines = error.message.split('\n').map((l) => l.trim()).filter(Boolean);
  const items = lines.length > 1 ? lines.slice(1) : lines;
  $('flow-errors').replaceChildren(
    h('p', {}, lines.length > 1 ? lines[0] : 'The flow is not valid:'),
    h('ul', {}, ...items.map((line) => {
      const at = line.indexOf(': ');
      return at > 0
        ? h('li', {}, h('code', {}, line.slice(0, at)), ': ', line.slice(at + 2))
        : h('li', {}, line);
    })));
}

function renderList() {
  $('flow-list').replaceChildren(...flows.map((f) => h('li', {},
    h('button', {
      type: 'button', class: 'secondary', 'aria-pressed': String(selected?.id === f.id),
      onclick: () => select(f),
    }, f.name || f.id.slice(0, 8), h('span', { class: 'hint' }, ` ${f.steps.length} steps`)))));
}

async function loadList(selectId) {
  flows = (await call('GET', '/v1/flows')).data;
  renderList();
  if (selectId) {
    const f = flows.find((x) => x.id === selectId);
    if (f) select(f);
  }
}

function select(flow) {
  selected = flow;
  $('flow-doc').value = flow ? flow.document : TEMPLATE;
  $('flow-title').textContent = flow ? (flow.name || flow.id) : 'New flow';
  $('flow-errors').replaceChildren();
  $('flow-run-card').hidden = !flow;
  $('flow-delete').hidden = !flow;
  renderList();
}

async function save() {
  $('flow-errors').replaceChildren();
  try {
    const flow = await call('POST', '/v1/flows', { document: $('flow-doc').value });
    toast(selected ? 'Saved as a new flow' : 'Flow saved');
    selected = flow;
    await loadList(flow.id);
  } catch (e) {
    if (e instanceof ApiError) showProblems(e);
    else toast(String(e.message ?? e));
  }
}

function renderRun(run, progress = {}) {
  $('flow-run-status').textContent = `Run ${run.id.slice(0, 8)}: ${run.status}${run.error ? ` (${run.error.message})` : ''}`;
  $('flow-run-status').dataset.status = run.status;
  $('flow-steps').replaceChildren(...run.steps.map((s) => h('li', { dataset: { step: s.id, status: s.status } },
    h('span', { class: `badge ${s.status}` }, s.status), ' ',
    h('strong', {}, s.id), h('span', { class: 'hint' }, ` ${s.type}`),
    s.status === 'running' && progress[s.id] ? h('span', { class: 'hint' }, ` · ${progress[s.id]}`) : null,
    s.error ? h('p', { class: 'error' }, s.error.message) : null)));
  const images = run.steps.flatMap((s) => (Array.isArray(s.result) ? s.result : [])
    .filter((a) => a && a.object === 'asset' && a.file_url));
  $('flow-outputs').replaceChildren(...images.map((a) => h('li', {},
    h('button', { type: 'button', 'aria-label': `Open image ${a.id}`, onclick: () => openAsset(a) },
      h('img', { src: a.file_url, alt: `Output of the flow, seed ${a.seed}`, loading: 'lazy' })))));
}

async function run() {
  let input;
  try {
    input = JSON.parse($('flow-input').value || '{}');
  } catch (e) {
    $('flow-run-error').textContent = `The input is not JSON: ${e.message}`;
    return;
  }
  $('flow-run-error').textContent = '';
  let record;
  try {
    record = await call('POST', `/v1/flows/${selected.id}/runs`, { input });
  } catch (e) {
    $('flow-run-error').textContent = e.message;
    return;
  }
  follow(record);
}

async function follow(record) {
  watching?.abort();
  const controller = new AbortController();
  watching = controller;
  const progress = {};
  let current = record;
  renderRun(current);
  $('flow-cancel').hidden = false;
  $('flow-cancel').onclick = async () => {
    try { renderRun(await call('POST', `/v1/flow-runs/${record.id}/cancel`)); } catch (e) { toast(e.message); }
  };
  try {
    await events(`/v1/flow-runs/${record.id}/events`, async (name, data) => {
      if (name === 'status' && data?.steps) {
        current = data;
        renderRun(current, progress);
      } else if (name === 'step_progress') {
        progress[data.stepId] = data.message ?? `${data.done} of ${data.total}`;
        renderRun(current, progress);
      } else if (name === 'step_started' || name === 'step_finished') {
        current = await call('GET', `/v1/flow-runs/${record.id}`);
        renderRun(current, progress);
      }
    }, controller.signal);
  } catch { /* aborted or broken: read the record below */ }
  if (controller.signal.aborted) return;
  renderRun(await call('GET', `/v1/flow-runs/${record.id}`), progress);
  $('flow-cancel').hidden = true;
}

/** Set the page up; `open(asset)` opens an output image. */
export function initFlows(open) {
  openAsset = open;
  $('flow-new').addEventListener('click', () => select(null));
  $('flow-save').addEventListener('click', save);
  $('flow-delete').addEventListener('click', async () => {
    if (!selected || !window.confirm('Delete this flow? Its runs stay readable.')) return;
    await call('DELETE', `/v1/flows/${selected.id}`);
    select(null);
    loadList();
  });
  $('flow-run').addEventListener('click', run);
  $('flow-doc').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); save(); }
  });
}

/** Show the flows page. */
export function showFlows() {
  if (!$('flow-doc').value) select(null);
  loadList().catch((e) => toast(e.message));
}
