// The session as it sounded: the player's notes and the model's answer (retracted events left
// out), saved as a standard MIDI file. Times are session ms; the file starts at the first note.
// Tracks: "you (melody)" on channel 16, then one per generated part on the server's channels
// (lead 1, counter 2, harmony 3, bass 4, drums 10), each with the program the server chose.

const PART_OF_CHANNEL = { 0: "lead", 1: "counter", 2: "harmony", 3: "bass", 9: "drums" };
const PLAYER_CHANNEL = 15;
const TPQ = 480, TEMPO = 500000; // 120 bpm: 0.96 ticks per ms

export class Recorder {
  constructor() {
    this.notes = []; // {source, ch, pitch, vel, start, end (null while sounding)}
    this.open = new Map(); // source:ch:pitch -> note
    this.programs = []; // {ch, program, time}
  }

  on(source, ch, pitch, vel, time) {
    this.off(source, ch, pitch, time); // a key struck again ends its earlier note there
    const n = { source, ch, pitch, vel, start: time, end: null };
    this.notes.push(n);
    this.open.set(`${source}:${ch}:${pitch}`, n);
  }

  off(source, ch, pitch, time) {
    const key = `${source}:${ch}:${pitch}`, n = this.open.get(key);
    if (n) { n.end = Math.max(time, n.start); this.open.delete(key); }
  }

  program(ch, program, time) { this.programs.push({ ch, program, time }); }

  // The server took back its events after `after`: they never sound. Notes cut short by it
  // sound on until the replacement note-off.
  retract(after) {
    this.notes = this.notes.filter((n) => n.source !== "model" || n.start <= after);
    this.programs = this.programs.filter((p) => p.time <= after);
    for (const [k, n] of [...this.open]) if (n.source === "model" && n.start > after) this.open.delete(k);
    for (const n of this.notes) {
      if (n.source === "model" && n.end !== null && n.end > after) { n.end = null; this.open.set(`model:${n.ch}:${n.pitch}`, n); }
    }
  }

  // What sounded up to `now`: notes not started yet are dropped, those sounding end at `now`.
  cut(source, now) {
    this.retract(source === "model" ? now : Infinity);
    for (const [k, n] of [...this.open]) if (n.source === source) { n.end = Math.max(now, n.start); this.open.delete(k); }
  }

  get length() { return this.notes.length; }

  // A type-1 MIDI file (Uint8Array) of everything that sounded before `now`.
  toMidi(now) {
    const notes = this.notes.filter((n) => n.start <= now);
    const t0 = notes.length ? Math.min(...notes.map((n) => n.start)) : 0;
    const tick = (ms) => Math.max(0, Math.round((ms - t0) * TPQ * 1000 / TEMPO));
    const tempo = [[0, [0xff, 0x51, 3, (TEMPO >> 16) & 255, (TEMPO >> 8) & 255, TEMPO & 255]]];
    const tracks = [track("improv session", tempo)];
    const groups = new Map();
    for (const n of notes) {
      const key = n.source === "player" ? "player" : `model:${n.ch}`;
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(n);
    }
    for (const [key, group] of groups) {
      const ch = key === "player" ? PLAYER_CHANNEL : group[0].ch;
      const name = key === "player" ? "you (melody)" : `model ${PART_OF_CHANNEL[ch] || "ch " + (ch + 1)}`;
      const events = []; // [tick, order (offs first at a tick), bytes]
      for (const p of this.programs) if (key !== "player" && p.ch === ch && p.time <= now) events.push([tick(p.time), 1, [0xc0 | ch, p.program & 127]]);
      for (const n of group) {
        const end = n.end === null || n.end > now ? Math.max(now, n.start) : n.end;
        const a = tick(n.start), b = Math.max(tick(end), a + 1);
        events.push([a, 2, [0x90 | ch, n.pitch & 127, Math.max(1, n.vel & 127)]]);
        events.push([b, 0, [0x80 | ch, n.pitch & 127, 0]]);
      }
      events.sort((x, y) => x[0] - y[0] || x[1] - y[1]);
      tracks.push(track(name, events.map((e) => [e[0], e[2]])));
    }
    const head = [...ascii("MThd"), ...u32(6), 0, 1, ...u16(tracks.length), ...u16(TPQ)];
    return new Uint8Array([...head, ...tracks.flat()]);
  }
}

function track(name, events) {
  const body = [0, 0xff, 0x03, ...vlq(name.length), ...ascii(name)];
  let last = 0;
  for (const [t, bytes] of events) { body.push(...vlq(t - last), ...bytes); last = t; }
  body.push(0, 0xff, 0x2f, 0);
  return [...ascii("MTrk"), ...u32(body.length), ...body];
}
function vlq(n) {
  const out = [n & 0x7f];
  while ((n >>= 7) > 0) out.unshift((n & 0x7f) | 0x80);
  return out;
}
const u32 = (n) => [(n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255];
const u16 = (n) => [(n >> 8) & 255, n & 255];
const ascii = (s) => [...s].map((c) => c.charCodeAt(0) & 127);

// Offer `bytes` as a download named `name`.
export function download(bytes, name, type = "audio/midi") {
  const url = URL.createObjectURL(new Blob([bytes], { type }));
  const a = document.createElement("a");
  a.href = url; a.download = name; document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
