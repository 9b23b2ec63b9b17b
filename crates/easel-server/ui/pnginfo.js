// AUTOMATIC1111's `parameters` text, as easel and the web UI write it into
// PNG tEXt / iTXt chunks, read back into form values.

/** The `parameters` text of a PNG's bytes (ArrayBuffer), or null. */
export function pngParameters(buffer) {
  const b = new Uint8Array(buffer);
  const sig = [137, 80, 78, 71, 13, 10, 26, 10];
  if (b.length < 8 || sig.some((v, i) => b[i] !== v)) return null;
  const view = new DataView(buffer);
  let at = 8;
  while (at + 8 <= b.length) {
    const len = view.getUint32(at);
    const type = String.fromCharCode(...b.subarray(at + 4, at + 8));
    const data = b.subarray(at + 8, at + 8 + len);
    if (type === 'tEXt' || type === 'iTXt') {
      const zero = data.indexOf(0);
      const keyword = new TextDecoder('latin1').decode(data.subarray(0, zero));
      if (keyword === 'parameters') {
        if (type === 'tEXt') return new TextDecoder('latin1').decode(data.subarray(zero + 1));
        // iTXt: keyword \0 compression flag, method, language \0 translated \0 text
        if (data[zero + 1] !== 0) return null; // compressed: not written by easel or A1111
        let p = zero + 3;
        p = data.indexOf(0, p) + 1;
        p = data.indexOf(0, p) + 1;
        return new TextDecoder('utf-8').decode(data.subarray(p));
      }
    }
    if (type === 'IEND') break;
    at += 12 + len;
  }
  return null;
}

// The web UI's sampler names and easel's scheduler short names.
const SAMPLERS = {
  'Euler': 'euler', 'Euler a': 'euler_a', 'DDIM': 'ddim', 'PLMS': 'pndm', 'PNDM': 'pndm',
  'LMS': 'lms', 'Heun': 'heun', 'DPM++ 2M': 'dpmpp_2m', 'DPM++ 2M Karras': 'dpmpp_2m_karras',
  'UniPC': 'unipc', 'LCM': 'lcm',
};

/**
 * Form values from a `parameters` text:
 * `PROMPT\nNegative prompt: NEG\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Model: m`.
 */
export function parseParameters(text) {
  const lines = text.replace(/\r\n/g, '\n').split('\n');
  let settingsAt = lines.length - 1;
  while (settingsAt > 0 && !/^Steps: /.test(lines[settingsAt])) settingsAt--;
  const head = lines.slice(0, settingsAt >= 0 && /^Steps: /.test(lines[settingsAt]) ? settingsAt : lines.length);
  const out = {};
  const negAt = head.findIndex((l) => l.startsWith('Negative prompt:'));
  if (negAt >= 0) {
    out.prompt = head.slice(0, negAt).join('\n').trim();
    out.negativePrompt = [head[negAt].slice('Negative prompt:'.length), ...head.slice(negAt + 1)].join('\n').trim();
  } else {
    out.prompt = head.join('\n').trim();
  }
  if (/^Steps: /.test(lines[settingsAt] ?? '')) {
    // "key: value" pairs, commas inside double quotes kept.
    const re = /\s*([\w ()\-/.]+?):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)/g;
    const kv = {};
    for (const m of lines[settingsAt].matchAll(re)) kv[m[1].trim()] = m[2].trim().replace(/^"(.*)"$/, '$1');
    if (kv.Steps) out.steps = Number(kv.Steps);
    if (kv['CFG scale']) out.guidanceScale = Number(kv['CFG scale']);
    if (kv.Seed) out.seed = kv.Seed;
    if (kv.Size) {
      const [w, hgt] = kv.Size.split('x').map(Number);
      out.width = w;
      out.height = hgt;
    }
    if (kv.Sampler) {
      let name = SAMPLERS[kv.Sampler];
      if (kv['Schedule type'] === 'Karras' && SAMPLERS[kv.Sampler + ' Karras']) name = SAMPLERS[kv.Sampler + ' Karras'];
      // FLUX's `Euler` + `Simple` is its flow-matching Euler.
      if (kv['Schedule type'] === 'Simple' && kv.Sampler === 'Euler') name = 'flow_match_euler';
      if (name) out.scheduler = name;
    }
    if (kv['Denoising strength']) out.strength = Number(kv['Denoising strength']);
    if (kv.Model) out.baseModel = kv.Model;
  }
  return out;
}
