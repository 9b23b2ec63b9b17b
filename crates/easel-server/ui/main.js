// The page's start: sign-in (an API key kept in localStorage; none asked
// when the server runs --no-auth), the pages by URL hash, and the wiring
// between the form, the job list and the gallery.

import { call, storedKey, storeKey, forgetKey, authRequired, ApiError } from './api.js';
import { $ } from './dom.js';
import { initGenerate, fill, setInit, setLastSeed, listedModels } from './generate.js';
import { initJobs, track } from './jobs.js';
import { initGallery, open as openAsset, refresh, showGallery } from './gallery.js';
import { showUsage } from './usage.js';
import { initFlows, showFlows } from './flows.js';

const PAGES = ['generate', 'gallery', 'flows', 'usage'];
let started = false;

function route() {
  if (!started) return;
  const page = PAGES.includes(location.hash.slice(1)) ? location.hash.slice(1) : 'generate';
  for (const p of PAGES) $(`page-${p}`).hidden = p !== page;
  for (const a of document.querySelectorAll('nav a[data-page]')) {
    if (a.dataset.page === page) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (page === 'gallery') showGallery();
  if (page === 'flows') showFlows();
  if (page === 'usage') showUsage().catch(() => {});
}

async function assetFormInput(asset, { baseModel, ...options }) {
  if (baseModel) fill({ baseModel });
  await setInit(asset.id, asset.file_url, options);
  location.hash = '#generate';
}

async function start() {
  $('signin').hidden = true;
  await initGenerate((record) => { track(record); });
  await initJobs(openAsset, (record, seed) => {
    if (seed !== undefined) setLastSeed(seed);
    refresh();
  });
  initGallery({
    reuse: async (values, requested) => {
      fill(values);
      location.hash = '#generate';
      if (requested?.image) {
        const image = await call('GET', `/v1/assets/${requested.image}`);
        const mask = requested.mask ? await call('GET', `/v1/assets/${requested.mask}`) : null;
        await setInit(image.id, image.file_url, { maskUrl: mask?.file_url });
        fill({ strength: values.strength });
      }
    },
    init: assetFormInput,
  }, listedModels());
  initFlows(openAsset);
  started = true;
  document.body.dataset.ready = 'true';
  route();
}

function askForKey(message = '') {
  for (const p of PAGES) $(`page-${p}`).hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = message;
  $('api-key').focus();
}

$('signin-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const key = $('api-key').value.trim();
  if (!key) {
    $('signin-error').textContent = 'Paste an API key first.';
    return;
  }
  try {
    await call('GET', '/v1/usage', undefined, { key });
  } catch (err) {
    $('signin-error').textContent = err instanceof ApiError && err.status === 401
      ? `This key was refused: ${err.message}.`
      : `Cannot reach the server: ${err.message}`;
    return;
  }
  storeKey(key);
  $('api-key').value = '';
  $('sign-out').hidden = false;
  start();
});

$('sign-out').addEventListener('click', () => {
  forgetKey();
  location.hash = '';
  location.reload();
});

window.addEventListener('hashchange', route);

(async () => {
  try {
    if (storedKey()) {
      try {
        await call('GET', '/v1/usage');
        $('sign-out').hidden = false;
      } catch (err) {
        if (err instanceof ApiError && err.status === 401) {
          forgetKey();
          askForKey(`The stored key was refused: ${err.message}.`);
          return;
        }
        throw err;
      }
    } else if (await authRequired()) {
      askForKey();
      return;
    }
    await start();
  } catch (err) {
    askForKey(`Cannot reach the server: ${err.message}`);
  }
})();
