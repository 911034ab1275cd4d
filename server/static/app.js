// improv in the browser: play (Web MIDI, computer keyboard, on-screen keys), hear yourself and
// the model (synth.js), watch the roll (roll.js). Protocol: docs/protocol.md (WebSocket /v1/live).
import { Synth } from "./synth.js";
import { Roll, COLORS } from "./roll.js";
import { Recorder, download } from "./record.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const TOKEN = params.get("token");
const LOOKAHEAD_MS = 120;      // the server sends events this early: jitter below it is hidden
const DISPATCH_MS = 40;        // events within this horizon are handed to WebAudio
const PARTS_DEFAULT = { lead: 0, counter: 0, harmony: 0, bass: 33 };
const HEDGE = 0.5;             // "Sure tones only": the server's default chord_hedge
const FALLBACK_PROGRAMS = { 0: "Acoustic Grand Piano", 4: "Electric Piano 1", 11: "Vibraphone", 16: "Drawbar Organ",
  24: "Acoustic Guitar (nylon)", 32: "Acoustic Bass", 33: "Electric Bass (finger)", 38: "Synth Bass 1", 40: "Violin",
  48: "String Ensemble 1", 56: "Trumpet", 65: "Alto Sax", 73: "Flute", 80: "Lead 1 (square)", 88: "Pad 1 (new age)" };

const synth = new Synth();
const state = {
  status: "connecting", ws: null, offset: null, samples: [], started: false, session: null,
  mode: "respond", queue: [], dispatched: [], retries: 0, sent: 0, received: 0, held: new Map(),
  octave: 4, programs: { ...PARTS_DEFAULT }, reconnectTimer: null,
  // harmony and meter (accompany): the session's chords and beats, retracts applied
  chords: [], beats: [], clicked: new Set(), harmony: null, tempo: null,
};
const localNow = () => performance.now();
const serverNow = () => (state.offset === null ? 0 : localNow() + state.offset);
const roll = new Roll($("roll"), serverNow);
const rec = new Recorder(); // what was played and answered: "Save MIDI"

// --- status ---------------------------------------------------------------------------------
function setStatus(kind, text) {
  state.status = kind;
  $("status").className = "status " + kind;
  $("status-text").textContent = text;
}

// --- connection -----------------------------------------------------------------------------
function wsUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}/v1/live`;
}
// The token travels as a subprotocol (a browser can set no header, and URLs end up in logs).
const b64url = (s) => btoa(String.fromCharCode(...new TextEncoder().encode(s))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
const wsProtocols = () => (TOKEN ? ["improv", "improv.bearer." + b64url(TOKEN)] : []);

function connect() {
  clearTimeout(state.reconnectTimer);
  setStatus("connecting", state.retries ? `reconnecting… (attempt ${state.retries + 1})` : "connecting…");
  let ws;
  try { ws = new WebSocket(wsUrl(), wsProtocols()); } catch (e) { return scheduleReconnect("cannot connect"); }
  state.ws = ws;
  ws.onopen = async () => {
    state.samples = []; state.offset = null;
    for (let i = 0; i < 5; i++) send({ type: "ping", time: localNow() });
    sendStart();
  };
  ws.onmessage = (ev) => onMessage(JSON.parse(ev.data));
  ws.onclose = (ev) => {
    if (state.ws !== ws) return;
    state.ws = null; state.started = false;
    silenceModel();
    const why = ev.code === 1008 ? "wrong or missing token (add ?token=…)"
      : ev.code === 1013 ? "server full — retrying" : "server unreachable";
    scheduleReconnect(why);
  };
}

function scheduleReconnect(why) {
  state.retries++;
  const wait = Math.min(10, 0.5 * 2 ** Math.min(state.retries, 5));
  setStatus("disconnected", `${why} · retrying in ${wait.toFixed(wait < 1 ? 1 : 0)} s`);
  state.reconnectTimer = setTimeout(connect, wait * 1000);
}

function send(msg) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) { state.ws.send(JSON.stringify(msg)); state.sent++; return true; }
  return false;
}

function startParams() {
  const p = {
    temperature: +$("temperature").value, lookahead_ms: LOOKAHEAD_MS,
    programs: {}, player_program: 0,
  };
  if (state.mode === "respond") {
    p.response_seconds = +$("length").value; p.gap_ms = +$("gap").value;
    p.programs.lead = state.programs.lead;
  } else {
    const split = $("split").checked, leftHand = $("chord-source").value === "left_hand";
    // with the player's bass (bass_split; the left hand's chords) the model plays none: the
    // server refuses both
    const parts = ["counter", "harmony", "bass", "drums"].filter((x) => $("p-" + x).checked && !((split || leftHand) && x === "bass"));
    p.parts = parts.length ? parts : ["harmony"];
    p.rest_ms = restMs();
    p.bass_split = split ? SPLIT_KEY : null;
    for (const x of p.parts) if (x !== "drums") p.programs[x] = state.programs[x];
    Object.assign(p, harmonyParams());
  }
  return p;
}

// The harmony controls: the chord source, the chart, its tempo and meter (without a count-in,
// a chart starts with the player's first note at this tempo). left_hand: the server reads the
// keys below bass_split (C4 unless "Left hand" sets C3) as chords.
function harmonyParams() {
  const source = $("chord-source").value;
  const p = { chord_source: source, tempo_bpm: +$("bpm").value || 100, beats_per_bar: +$("per-bar").value };
  if (source === "chart") p.chords = $("chart").value.trim() || "C";
  if (source === "model") p.chord_hedge = $("hedge").checked ? HEDGE : 0;
  return p;
}

function sendStart() { silenceModel(); send({ type: "start", mode: state.mode, ...startParams() }); }

function onMessage(m) {
  state.received++;
  switch (m.type) {
    case "pong": {
      const t1 = localNow(), rtt = t1 - m.time;
      state.samples.push([rtt, m.server_time - (m.time + t1) / 2]);
      state.samples = state.samples.slice(-16);
      const best = [...state.samples].sort((a, b) => a[0] - b[0]).slice(0, Math.max(1, state.samples.length >> 2));
      state.offset = best.reduce((s, x) => s + x[1], 0) / best.length;
      state.rtt = rtt;
      break;
    }
    case "started":
      state.started = true; state.session = m.session; state.retries = 0; state.harmony = m.harmony;
      state.chords = []; state.beats = []; roll.retractChords(-Infinity);
      setStatus("live", `live · ${m.mode === "respond" ? "call & response" : "accompany"}`);
      if (m.mode === "accompany" && !m.harmony && m.params.chord_source !== "model")
        flash("this model has no chord tokens: it plays without hearing the chords");
      break;
    case "midi": onModelMidi(m); break;
    case "retract": onRetract(m.after); break;
    case "chord": onChord(m); break;
    case "beat": onBeat(m); break;
    case "error": console.warn("server:", m.code, m.message); flash(`server: ${m.message}`); break;
    case "stopped": state.started = false; break;
  }
}

// --- the model's events: a queue by session time, handed to WebAudio just before they sound ----
function onModelMidi(m) {
  const ev = { data: m.data, time: m.time, part: m.part };
  const st = m.data[0] & 0xf0, ch = m.data[0] & 0x0f;
  if (st === 0x90 && m.data[2] > 0) roll.noteOn("model", ch, m.data[1], m.data[2], m.time, m.part);
  else if (st === 0x80 || st === 0x90) roll.noteOff("model", ch, m.data[1], m.time);
  if (st === 0x90 && m.data[2] > 0) rec.on("model", ch, m.data[1], m.data[2], m.time);
  else if (st === 0x80 || st === 0x90) rec.off("model", ch, m.data[1], m.time);
  else if (st === 0xc0) rec.program(ch, m.data[1], m.time);
  let i = state.queue.length;
  while (i > 0 && state.queue[i - 1].time > ev.time) i--;
  state.queue.splice(i, 0, ev);
  pump();
}

// Chords and beats: kept by time (a later chord at the same time replaces it), shown as the
// current and next chord, the beat dots, the roll's labels; the click is scheduled like a note.
function onChord(m) {
  state.chords = state.chords.filter((c) => c.time !== m.time);
  let i = state.chords.length;
  while (i > 0 && state.chords[i - 1].time > m.time) i--;
  state.chords.splice(i, 0, { time: m.time, label: m.label, source: m.source });
  roll.chord(m.time, chordName(m.label));
}

function onBeat(m) {
  state.beats = state.beats.filter((b) => b.time !== m.time);
  state.beats.push({ time: m.time, bar: m.bar, source: m.source });
  state.beats.sort((a, b) => a.time - b.time);
  if (m.tempo_bpm) state.tempo = m.tempo_bpm;
  pump();
}

// Harte label -> lead-sheet name: "A:min" -> "Am", "G:7" -> "G7", "N" -> "N.C.".
const QUALITY_NAMES = { maj: "", min: "m", 7: "7", maj7: "maj7", min7: "m7", dim: "dim", dim7: "dim7", hdim7: "m7b5",
  aug: "aug", sus2: "sus2", sus4: "sus4", "7sus4": "7sus4", maj6: "6", min6: "m6", minmaj7: "m(maj7)" };
function chordName(label) {
  if (!label || label === "N") return "N.C.";
  const [root, q] = label.split(":");
  return root + (QUALITY_NAMES[q] ?? q ?? "");
}

function showHarmony() {
  const now = serverNow();
  const i = state.chords.findIndex((c) => c.time > now);
  const cur = i === -1 ? state.chords[state.chords.length - 1] : state.chords[i - 1];
  const next = i === -1 ? null : state.chords[i];
  $("chord-now").textContent = cur ? chordName(cur.label) : "–";
  $("chord-next").textContent = next ? chordName(next.label) : "–";
  // the beat dots: the bar's beats, the one sounding lit
  let k = -1;
  for (let j = 0; j < state.beats.length && state.beats[j].time <= now; j++) k = j;
  const perBar = +$("per-bar").value || 4;
  let pos = -1;
  if (k >= 0 && now - state.beats[k].time < 2000) { pos = 0; for (let j = k; j > 0 && !state.beats[j].bar; j--) pos++; }
  const dots = $("beats");
  const n = Math.max(perBar, pos + 1);
  if (dots.childElementCount !== n) dots.innerHTML = "<span></span>".repeat(n);
  [...dots.children].forEach((el, j) => { el.className = (j === 0 ? "bar" : "") + (j === pos ? " on" : ""); });
  $("tempo-now").textContent = state.tempo ? `${Math.round(state.tempo)} bpm` : "";
  state.beats = state.beats.filter((b) => b.time > now - 4000);
  const seen = state.chords.findIndex((c) => c.time > now - 20000);
  if (seen > 1) state.chords = state.chords.slice(seen - 1);
}

function onRetract(after) {
  state.chords = state.chords.filter((c) => c.time <= after);
  state.beats = state.beats.filter((b) => b.time <= after);
  roll.retractChords(after);
  state.queue = state.queue.filter((e) => e.time <= after);
  // Handed to WebAudio but not started yet: cancel those voices.
  for (const d of state.dispatched) if (d.time > after && d.voice) d.voice.stop(synth.now(), true);
  state.dispatched = state.dispatched.filter((d) => d.time <= after);
  roll.retract(after);
  rec.retract(after);
}

function audioTimeOf(sessionMs) {
  return synth.now() + (sessionMs - serverNow()) / 1000;
}

function pump() {
  if (state.offset === null) return;
  const horizon = serverNow() + DISPATCH_MS;
  while (state.queue.length && state.queue[0].time <= horizon) {
    const e = state.queue.shift();
    const st = e.data[0] & 0xf0;
    if (!synth.ctx) continue; // no audio yet (no gesture): the roll still shows it
    const voice = (st === 0x90 && e.data[2] > 0)
      ? synth.noteOn(e.data[0] & 15, e.data[1], e.data[2], audioTimeOf(e.time))
      : (synth.midi(e.data, audioTimeOf(e.time)), null);
    state.dispatched.push({ time: e.time, voice });
  }
  // the metronome: each beat's click handed to WebAudio as its time comes near
  if ($("click").checked && synth.ctx) {
    for (const b of state.beats) {
      if (b.time > horizon || state.clicked.has(b.time) || b.time < serverNow() - 50) continue;
      state.clicked.add(b.time);
      synth.click(audioTimeOf(b.time), b.bar);
    }
    if (state.clicked.size > 64) state.clicked = new Set([...state.clicked].slice(-32));
  }
  const now = serverNow();
  state.dispatched = state.dispatched.filter((d) => d.time > now);
}

function silenceModel() {
  state.queue = []; state.dispatched = [];
  for (let ch = 0; ch < 16; ch++) if (ch !== 15) synth.allOff(ch);
  roll.closeAll("model", serverNow());
  rec.cut("model", serverNow());
}

// --- the player ------------------------------------------------------------------------------
// The player sounds on channel 15 of the synth (a piano) and is sent as channel 1 (the lead).
function playerOn(note, vel = 96, from = "kb") {
  if (note < 0 || note > 127 || state.held.has(from + ":" + note)) return;
  synth.ensure(); $("audio-hint").classList.add("hidden");
  state.held.set(from + ":" + note, true);
  synth.noteOn(15, note, vel);
  const t = serverNow();
  roll.noteOn("player", 0, note, vel, t);
  rec.on("player", 15, note, vel, t);
  send({ type: "midi", data: [0x90, note, vel], time: state.offset === null ? undefined : Math.max(0, t) });
  keyEl(note)?.classList.add("down");
}

function playerOff(note, from = "kb") {
  if (!state.held.delete(from + ":" + note)) return;
  synth.noteOff(15, note);
  const t = serverNow();
  roll.noteOff("player", 0, note, t);
  rec.off("player", 15, note, t);
  send({ type: "midi", data: [0x80, note, 0], time: state.offset === null ? undefined : Math.max(0, t) });
  if (![...state.held.keys()].some((k) => k.endsWith(":" + note))) keyEl(note)?.classList.remove("down");
}

function releaseAll() { for (const k of [...state.held.keys()]) { const [from, n] = k.split(":"); playerOff(+n, from); } }

// Computer keyboard: A W S E D F T G Y H U J K = C..C, Z/X octave down/up.
const KEYMAP = { a: 0, w: 1, s: 2, e: 3, d: 4, f: 5, t: 6, g: 7, y: 8, h: 9, u: 10, j: 11, k: 12, o: 13, l: 14, p: 15, ";": 16 };
const kbDown = new Map();
addEventListener("keydown", (ev) => {
  // Only a focused select keeps the letters (its type-ahead); sliders and checkboxes don't use
  // them, so after ticking "drums" the keys still play.
  if (ev.target.closest && ev.target.closest("select")) return;
  const k = ev.key.toLowerCase();
  if (ev.repeat || ev.metaKey || ev.ctrlKey) return;
  if (k in KEYMAP) { const n = 12 * (state.octave + 1) + KEYMAP[k]; kbDown.set(k, n); playerOn(n, 96, "kb"); ev.preventDefault(); }
  else if (k === "z") setOctave(state.octave - 1);
  else if (k === "x") setOctave(state.octave + 1);
  else if (k === " ") { send({ type: "trigger" }); ev.preventDefault(); }
  else if (k === "escape") panic();
});
addEventListener("keyup", (ev) => {
  const k = ev.key.toLowerCase();
  if (kbDown.has(k)) { playerOff(kbDown.get(k), "kb"); kbDown.delete(k); }
});
addEventListener("blur", () => { kbDown.clear(); releaseAll(); });

function setOctave(o) {
  state.octave = Math.max(1, Math.min(7, o));
  $("octave").textContent = "C" + state.octave;
  buildKeyboard();
}

// On-screen keys: two octaves from the keyboard octave; mouse and touch (pointer events).
const NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"];
const LETTERS = Object.fromEntries(Object.entries(KEYMAP).map(([k, v]) => [v, k.toUpperCase()]));
function buildKeyboard() {
  const kb = $("keyboard"); kb.innerHTML = "";
  const first = 12 * (state.octave + 1), last = first + 24;
  const whites = []; for (let n = first; n <= last; n++) if (![1, 3, 6, 8, 10].includes(n % 12)) whites.push(n);
  kb.style.setProperty("--whites", whites.length);
  for (let n = first; n <= last; n++) {
    const black = [1, 3, 6, 8, 10].includes(n % 12);
    const el = document.createElement("div");
    el.className = "key " + (black ? "black" : "white");
    el.dataset.note = n;
    const letter = LETTERS[n - first];
    el.innerHTML = (n % 12 === 0 ? `<span class="c-label">C${n / 12 - 1}</span>` : "") + (letter ? `<span>${letter}</span>` : "");
    if (black) el.style.left = `calc(${(whites.filter((w) => w < n).length) / whites.length * 100}% - ${(100 / whites.length) * 0.31}%)`;
    kb.appendChild(el);
  }
}
function keyEl(note) { return document.querySelector(`.key[data-note="${note}"]`); }
const pointers = new Map();
$("keyboard").addEventListener("pointerdown", (ev) => {
  const el = ev.target.closest(".key"); if (!el) return;
  ev.preventDefault(); $("keyboard").setPointerCapture(ev.pointerId);
  const n = +el.dataset.note; pointers.set(ev.pointerId, n);
  const r = el.getBoundingClientRect();
  playerOn(n, Math.round(60 + 60 * Math.min(1, (ev.clientY - r.top) / r.height)), "p" + ev.pointerId);
});
$("keyboard").addEventListener("pointermove", (ev) => {
  if (!pointers.has(ev.pointerId)) return;
  const el = document.elementFromPoint(ev.clientX, ev.clientY)?.closest(".key");
  const n = el ? +el.dataset.note : null, old = pointers.get(ev.pointerId);
  if (n !== null && n !== old) { playerOff(old, "p" + ev.pointerId); pointers.set(ev.pointerId, n); playerOn(n, 90, "p" + ev.pointerId); }
});
for (const t of ["pointerup", "pointercancel", "lostpointercapture"]) {
  $("keyboard").addEventListener(t, (ev) => {
    if (!pointers.has(ev.pointerId)) return;
    playerOff(pointers.get(ev.pointerId), "p" + ev.pointerId); pointers.delete(ev.pointerId);
  });
}

// Web MIDI keyboards.
async function initMidi() {
  if (!navigator.requestMIDIAccess) return;
  try {
    const access = await navigator.requestMIDIAccess();
    const attach = () => {
      const names = [];
      for (const input of access.inputs.values()) {
        names.push(input.name);
        input.onmidimessage = (ev) => {
          const [st, d1, d2] = ev.data; const type = st & 0xf0;
          if (type === 0x90 && d2 > 0) playerOn(d1, d2, "midi");
          else if (type === 0x80 || type === 0x90) playerOff(d1, "midi");
          else if (type === 0xb0) send({ type: "midi", data: [0xb0, d1, d2] });
        };
      }
      $("midi-in").textContent = names.length ? "MIDI: " + names.join(", ") : "no MIDI keyboard";
    };
    attach(); access.onstatechange = attach;
  } catch (e) { /* no permission: keyboard and mouse still work */ }
}

// --- controls --------------------------------------------------------------------------------
function setChordSource() {
  document.body.classList.toggle("chords-chart", $("chord-source").value === "chart");
  document.body.classList.toggle("chords-model", $("chord-source").value === "model");
}
$("chord-source").onchange = () => {
  setChordSource();
  const p = startParams();
  sendParams({ ...harmonyParams(), parts: p.parts, programs: p.programs });
  $("chord-source").blur();
};
// the chart goes out when it is complete (Enter, or leaving the box), not at every letter
$("chart").addEventListener("keydown", (ev) => { ev.stopPropagation(); if (ev.key === "Enter") $("chart").blur(); });
$("chart").addEventListener("keyup", (ev) => ev.stopPropagation());
$("chart").onchange = () => sendParams(harmonyParams());
$("bpm").onchange = () => sendParams(harmonyParams());
$("hedge").onchange = () => { sendParams(harmonyParams()); $("hedge").blur(); };
$("per-bar").onchange = () => { sendParams(harmonyParams()); $("per-bar").blur(); };
// Count in: a bar of clicks; the session's clock starts on the next downbeat (beat_time), where
// a chart's first bar begins.
$("count-in").onclick = () => {
  synth.ensure(); $("click").checked = true;
  const p = harmonyParams(), bar = 60000 / p.tempo_bpm * p.beats_per_bar;
  sendParams({ ...p, beat_time: serverNow() + bar });
};

function setMode(mode) {
  state.mode = mode;
  document.body.classList.toggle("mode-respond", mode === "respond");
  document.body.classList.toggle("mode-accompany", mode === "accompany");
  for (const b of document.querySelectorAll("#mode button")) b.classList.toggle("on", b.dataset.mode === mode);
  sendStart();
}
for (const b of document.querySelectorAll("#mode button")) b.onclick = () => setMode(b.dataset.mode);
$("temperature").oninput = () => { $("temperature-v").textContent = (+$("temperature").value).toFixed(2); sendParams({ temperature: +$("temperature").value }); };
$("length").oninput = () => { $("length-v").textContent = $("length").value + " s"; sendParams({ response_seconds: +$("length").value }); };
$("gap").oninput = () => { $("gap-v").textContent = $("gap").value + " ms"; sendParams({ gap_ms: +$("gap").value }); };
const SPLIT_KEY = 48; // C3: keys below it are the player's bass line when "Left hand" is on
$("split").onchange = () => {
  $("p-bass").disabled = $("split").checked;
  const p = startParams();
  sendParams({ bass_split: p.bass_split, parts: p.parts, programs: p.programs });
};
// the rest slider's top stop means "never": the accompaniment plays on through silence
const REST_NEVER = 31;
function restMs() { const s = +$("rest").value; return s >= REST_NEVER ? null : s * 1000; }
$("rest").oninput = () => {
  $("rest-v").textContent = +$("rest").value >= REST_NEVER ? "never" : $("rest").value + " s";
  sendParams({ rest_ms: restMs() });
};
// Changes within 150 ms go out as one params frame, merged (a slider drag sends its last value;
// a checkbox changed in the same breath is not lost).
const sendParams = (() => {
  let timer, pending = {};
  return (p) => {
    Object.assign(pending, p);
    clearTimeout(timer);
    timer = setTimeout(() => { send({ type: "params", ...pending }); pending = {}; }, 150);
  };
})();
for (const x of ["counter", "harmony", "bass", "drums"]) $("p-" + x).onchange = () => sendParams({ parts: startParams().parts, programs: startParams().programs });
$("trigger").onclick = () => { synth.ensure(); send({ type: "trigger" }); };
$("panic").onclick = panic;
$("save").onclick = () => {
  if (!rec.length) return flash("nothing played yet: play something first");
  const stamp = new Date().toISOString().slice(0, 16).replace(/[-:]/g, "").replace("T", "-");
  download(rec.toMidi(serverNow()), `improv-${stamp}.mid`);
};
$("volume").oninput = () => synth.setVolume(+$("volume").value);
function panic() { releaseAll(); synth.allOff(); state.queue = []; state.dispatched = []; }

async function loadPrograms() {
  let names = FALLBACK_PROGRAMS;
  try {
    const r = await fetch("/v1/model", { headers: TOKEN ? { Authorization: "Bearer " + TOKEN } : {} });
    if (r.ok) names = (await r.json()).instruments || names;
  } catch (e) { /* offline: the short list */ }
  for (const sel of document.querySelectorAll("select[data-program]")) {
    const part = sel.dataset.program;
    sel.innerHTML = Object.entries(names).map(([k, v]) => `<option value="${k}">${k} · ${v}</option>`).join("");
    sel.value = String(state.programs[part] ?? 0);
    // blur: the computer keyboard plays again once an instrument is chosen
    sel.onchange = () => { state.programs[part] = +sel.value; sendParams({ programs: startParams().programs }); sel.blur(); };
  }
}

function flash(text) {
  const hint = $("audio-hint"); hint.textContent = text; hint.classList.remove("hidden");
  clearTimeout(flash.t); flash.t = setTimeout(() => hint.classList.add("hidden"), 4000);
}

// Legend and the frame loop.
$("legend").innerHTML = Object.entries({ player: "you", lead: "model", counter: "counter", harmony: "harmony", bass: "bass", drums: "drums" })
  .map(([k, v]) => `<span style="--c:${COLORS[k]}">${v}</span>`).join("");
function frame() { pump(); roll.draw(); showHarmony(); requestAnimationFrame(frame); }
setInterval(pump, 10); // keeps scheduling when the tab is in the background (rAF pauses)
setInterval(() => { if (state.started) send({ type: "ping", time: localNow() }); }, 2000);

// A small read-only window for tests and curious players.
window.improv = Object.freeze({
  rollNotes: () => roll.notes.map((n) => ({ pitch: n.pitch, start: n.start, end: n.end, part: n.part, source: n.source })),
  status: () => state.status,
  chords: () => state.chords.map((c) => ({ ...c })),
  beats: () => state.beats.map((b) => ({ ...b })),
  rollChords: () => roll.chords.map((c) => ({ ...c })),
  state: () => ({ status: state.status, started: state.started, mode: state.mode, offset: state.offset, rtt: state.rtt,
    sent: state.sent, received: state.received, queued: state.queue.length, session: state.session, sounding: synth.sounding() }),
});

setChordSource();
setMode("respond"); // also sends start once connected
buildKeyboard(); loadPrograms(); initMidi(); connect(); frame();
