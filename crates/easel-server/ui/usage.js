// Usage: the key's ledger sums and credit (GET /v1/usage) and its ledger
// entries, newest first, in pages (GET /v1/usage/ledger).

import { call } from './api.js';
import { $, h } from './dom.js';

const PAGE = 50;
const usd = (v) => (v === null || v === undefined ? 'no limit' : `$${v.toFixed(2)}`);
let offset = 0;

async function ledger() {
  const list = await call('GET', `/v1/usage/ledger?limit=${PAGE + 1}&offset=${offset}`);
  const rows = list.data.slice(0, PAGE);
  const table = h('table', { class: 'params ledger' },
    h('thead', {}, h('tr', {}, ...['When', 'Entry', 'Inferences', 'Amount', 'Job'].map((c) => h('th', { scope: 'col' }, c)))),
    h('tbody', {}, ...rows.map((r) => h('tr', { dataset: { kind: r.kind } },
      h('td', {}, new Date(r.created_at).toLocaleString()),
      h('td', {}, r.kind),
      h('td', {}, String(r.inferences)),
      h('td', {}, `${r.kind === 'refund' ? '−' : ''}${usd(r.amount_usd)}`),
      h('td', {}, h('code', {}, r.generation_id.slice(0, 8)))))));
  const pager = h('div', { class: 'row pager' },
    h('button', { type: 'button', class: 'secondary', disabled: offset === 0, onclick: () => { offset = Math.max(0, offset - PAGE); ledger(); } }, 'Newer'),
    h('button', { type: 'button', class: 'secondary', disabled: list.data.length <= PAGE, onclick: () => { offset += PAGE; ledger(); } }, 'Older'));
  $('ledger').replaceChildren(h('h2', {}, 'Ledger'),
    rows.length ? table : h('p', { class: 'hint' }, 'No entries yet.'), pager);
}

/** Show the key's usage and the first page of its ledger. */
export async function showUsage() {
  const u = await call('GET', '/v1/usage');
  const rows = [
    ['Key', u.key_id],
    ['Price per inference', usd(u.price_per_inference_usd)],
    ['Inferences billed', `${u.inferences_billed} (${u.inferences_charged} charged, ${u.inferences_refunded} refunded)`],
    ['Images stored', u.images_generated],
    ['Used', usd(u.used_usd)],
    ['Credit limit', usd(u.credit_limit_usd)],
    ['Credit left', usd(u.credit_remaining_usd)],
  ];
  $('usage').replaceChildren(h('h1', {}, 'Usage'),
    h('dl', {}, ...rows.flatMap(([k, v]) => [h('dt', {}, k), h('dd', { dataset: { usage: k } }, String(v))])));
  offset = 0;
  await ledger();
}
