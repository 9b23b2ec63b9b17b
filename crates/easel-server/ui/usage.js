// Usage: the key's ledger sums and credit (GET /v1/usage).

import { call } from './api.js';
import { $, h } from './dom.js';

const usd = (v) => (v === null || v === undefined ? 'no limit' : `$${v.toFixed(2)}`);

/** Show the key's usage. */
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
}
