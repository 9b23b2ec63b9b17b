// The inpainting mask painter: a canvas of the init image's pixel size laid
// over it; white strokes mark what to repaint (the API's mask: white =
// repaint, black = keep), the eraser paints black. Pointer events, so mouse,
// pen and touch all paint.

export class MaskPainter {
  /** A painter over `img` (loaded), inside `container`. */
  constructor(container, img) {
    this.canvas = document.createElement('canvas');
    this.canvas.width = img.naturalWidth;
    this.canvas.height = img.naturalHeight;
    this.canvas.setAttribute('aria-label', 'Mask: paint with the pointer');
    this.canvas.setAttribute('role', 'img');
    this.ctx = this.canvas.getContext('2d', { willReadFrequently: true });
    this.brush = 24;
    this.eraser = false;
    this.enabled = false;
    this.painted = false;
    this.clear();
    container.append(this.canvas);
    let last = null;
    const at = (e) => {
      const r = this.canvas.getBoundingClientRect();
      return [(e.clientX - r.left) * this.canvas.width / r.width,
        (e.clientY - r.top) * this.canvas.height / r.height];
    };
    this.canvas.addEventListener('pointerdown', (e) => {
      if (!this.enabled) return;
      this.canvas.setPointerCapture(e.pointerId);
      last = at(e);
      this.stroke(last, last);
    });
    this.canvas.addEventListener('pointermove', (e) => {
      if (!last) return;
      const p = at(e);
      this.stroke(last, p);
      last = p;
    });
    const stop = () => { last = null; };
    this.canvas.addEventListener('pointerup', stop);
    this.canvas.addEventListener('pointercancel', stop);
    this.setEnabled(false);
  }

  /** Show the mask and let the pointer paint, or hide it. */
  setEnabled(on) {
    this.enabled = on;
    this.canvas.hidden = !on;
  }

  /** One round-capped line in image pixels (brush diameter `this.brush`). */
  stroke([x0, y0], [x1, y1]) {
    const c = this.ctx;
    c.strokeStyle = this.eraser ? '#000' : '#fff';
    c.lineWidth = this.brush;
    c.lineCap = 'round';
    c.beginPath();
    c.moveTo(x0, y0);
    c.lineTo(x1 + 0.01, y1);
    c.stroke();
    this.painted = true;
  }

  /** All black: nothing to repaint. */
  clear() {
    this.ctx.fillStyle = '#000';
    this.ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    this.painted = false;
  }

  /** Swap repaint and keep. */
  invert() {
    const d = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height);
    for (let i = 0; i < d.data.length; i += 4) {
      d.data[i] = 255 - d.data[i];
      d.data[i + 1] = 255 - d.data[i + 1];
      d.data[i + 2] = 255 - d.data[i + 2];
      d.data[i + 3] = 255;
    }
    this.ctx.putImageData(d, 0, 0);
    this.painted = true;
  }

  /** The mask as a PNG `data:` URI, or null when nothing was painted. */
  dataUrl() {
    return this.enabled && this.painted ? this.canvas.toDataURL('image/png') : null;
  }

  remove() {
    this.canvas.remove();
  }
}
