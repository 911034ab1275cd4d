// The scrolling piano roll: time flows right to left past a playhead at 72% of the width, so
// the model's lookahead (events received before they sound) is drawn to the right of it.
// Notes: {pitch, start, end (null while sounding), part, source: "player" | "model"}, session ms.

export const COLORS = {
  player: "#ffb547", lead: "#4cc9f0", counter: "#b28dff", harmony: "#3ddc97", bass: "#ff8c42", drums: "#ff5d9e",
};

export class Roll {
  constructor(canvas, now) {
    this.canvas = canvas;
    this.g = canvas.getContext("2d");
    this.now = now; // () -> session ms
    this.notes = [];
    this.chords = []; // {time, label}: the session's chords, drawn along the top
    this.pxPerMs = 0.12;
    this.low = 40; this.high = 88; // pitch range shown (widened by what is played)
    this.open = new Map(); // source:ch:pitch -> note
    new ResizeObserver(() => this.resize()).observe(canvas);
    this.resize();
  }

  resize() {
    const r = this.canvas.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.max(1, Math.round(r.width * dpr));
    this.canvas.height = Math.max(1, Math.round(r.height * dpr));
    this.w = r.width; this.h = r.height; this.dpr = dpr;
  }

  noteOn(source, ch, pitch, vel, time, part) {
    const key = `${source}:${ch}:${pitch}`;
    const prev = this.open.get(key);
    if (prev) prev.end = time;
    const n = { pitch, start: time, end: null, part: source === "player" ? "player" : part || "lead", source, vel, ch };
    this.notes.push(n);
    this.open.set(key, n);
    if (part === "drums" || ch === 9) { n.end = time + 80; this.open.delete(key); }

  }

  noteOff(source, ch, pitch, time) {
    const key = `${source}:${ch}:${pitch}`;
    const n = this.open.get(key);
    if (n) { n.end = Math.max(time, n.start); this.open.delete(key); }
  }

  // retract: the model's notes starting after `after` vanish; those cut short sound on until
  // the server's replacement note-off.
  retract(after) {
    this.notes = this.notes.filter((n) => n.source !== "model" || n.start <= after);
    for (const [k, n] of [...this.open]) if (n.source === "model" && n.start > after) this.open.delete(k);
    for (const n of this.notes) {
      if (n.source === "model" && n.end !== null && n.end > after && n.part !== "drums" && n.ch !== 9) {
        n.end = null;
        this.open.set(`model:${n.ch}:${n.pitch}`, n);
      }
    }
  }

  // A chord from `time` on (a later one at the same time replaces it).
  chord(time, label) {
    this.chords = this.chords.filter((c) => c.time !== time);
    this.chords.push({ time, label });
    this.chords.sort((a, b) => a.time - b.time);
  }

  retractChords(after) { this.chords = this.chords.filter((c) => c.time <= after); }

  closeAll(source, time) {
    for (const [k, n] of [...this.open]) if (n.source === source) { n.end = time; this.open.delete(k); }
  }

  draw() {
    const g = this.g, w = this.w, h = this.h, now = this.now();
    g.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const head = w * 0.72;
    this._fit(now, head);
    const span = this.high - this.low + 1, rowH = h / span; // fractional while easing
    const y = (p) => h - (p - this.low + 1) * rowH;
    // Lanes: black keys darker, C rows labelled.
    for (let p = Math.floor(this.low); p <= Math.ceil(this.high); p++) {
      const black = [1, 3, 6, 8, 10].includes(p % 12);
      g.fillStyle = black ? "rgba(255,255,255,0.018)" : "rgba(255,255,255,0.04)";
      g.fillRect(0, y(p), w, rowH - 0.5);
      if (p % 12 === 0) {
        g.fillStyle = "rgba(255,255,255,0.10)"; g.fillRect(0, y(p) + rowH - 1, w, 1);
        g.fillStyle = "rgba(200,210,230,0.45)"; g.font = "10px system-ui"; g.fillText("C" + (p / 12 - 1), 6, y(p) + rowH - 3);
      }
    }
    // Second grid lines, moving with time.
    g.fillStyle = "rgba(255,255,255,0.05)";
    for (let t = Math.floor((now - head / this.pxPerMs) / 1000) * 1000; t < now + (w - head) / this.pxPerMs; t += 1000) {
      g.fillRect(head + (t - now) * this.pxPerMs, 0, 1, h);
    }
    // Chord labels along the top, at their changes.
    g.font = "600 12px system-ui";
    for (const c of this.chords) {
      const x = head + (c.time - now) * this.pxPerMs;
      if (x < -60 || x > w) continue;
      g.fillStyle = "rgba(61,220,151,0.35)"; g.fillRect(x, 0, 1, h);
      g.fillStyle = c.time > now ? "rgba(61,220,151,0.6)" : "rgba(61,220,151,0.95)";
      g.fillText(c.label, x + 4, 14);
    }
    // forget chords long gone (the one sounding at the left edge stays)
    const seen = this.chords.findIndex((c) => c.time > now - head / this.pxPerMs - 500);
    if (seen > 1) this.chords = this.chords.slice(seen - 1);
    // Lookahead zone.
    const grad = g.createLinearGradient(head, 0, w, 0);
    grad.addColorStop(0, "rgba(76,201,240,0.08)"); grad.addColorStop(1, "rgba(76,201,240,0)");
    g.fillStyle = grad; g.fillRect(head, 0, w - head, h);
    // Notes.
    const minT = now - head / this.pxPerMs - 500;
    this.notes = this.notes.filter((n) => n.end === null || n.end > minT || this.notes.length < 200);
    for (const n of this.notes) {
      const x0 = head + (n.start - now) * this.pxPerMs;
      const end = n.end === null ? Math.max(now, n.start) : n.end;
      const x1 = Math.max(x0 + 3, head + (end - now) * this.pxPerMs);
      if (x1 < 0 || x0 > w) continue;
      const future = n.start > now;
      const c = COLORS[n.part] || COLORS.lead;
      g.globalAlpha = future ? 0.45 : 0.95;
      g.fillStyle = c;
      g.shadowColor = c; g.shadowBlur = n.end === null && !future ? 12 : 0;
      roundRect(g, x0, y(n.pitch) + 1, x1 - x0, Math.max(2, rowH - 2), Math.min(3, rowH / 2));
      g.fill();
      if (future) { g.globalAlpha = 0.9; g.strokeStyle = c; g.lineWidth = 1; g.stroke(); }
    }
    g.globalAlpha = 1; g.shadowBlur = 0;
    // Playhead.
    g.fillStyle = "rgba(255,181,71,0.85)"; g.fillRect(head - 1, 0, 2, h);
    g.fillStyle = "rgba(200,210,230,0.55)"; g.font = "11px system-ui"; g.fillText("now", head + 6, h - 8);
    g.fillText("model lookahead →", Math.min(w - 110, head + 40), h - 8);
  }
}

// The pitch range follows what is on screen (at least C3..C6), eased so it does not jump.
Roll.prototype._fit = function (now, head) {
  let lo = 48, hi = 84;
  const t0 = now - head / this.pxPerMs;
  for (const n of this.notes) {
    if (n.part === "drums" || n.ch === 9 || (n.end !== null && n.end < t0)) continue;
    lo = Math.min(lo, n.pitch - 2); hi = Math.max(hi, n.pitch + 2);
  }
  this.low += (lo - this.low) * 0.1; this.high += (hi - this.high) * 0.1;
  this.low = Math.round(this.low * 100) / 100; this.high = Math.round(this.high * 100) / 100;
};

function roundRect(g, x, y, w, h, r) {
  g.beginPath();
  g.moveTo(x + r, y); g.lineTo(x + w - r, y); g.quadraticCurveTo(x + w, y, x + w, y + r);
  g.lineTo(x + w, y + h - r); g.quadraticCurveTo(x + w, y + h, x + w - r, y + h);
  g.lineTo(x + r, y + h); g.quadraticCurveTo(x, y + h, x, y + h - r);
  g.lineTo(x, y + r); g.quadraticCurveTo(x, y, x + r, y); g.closePath();
}
