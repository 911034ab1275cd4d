// A small WebAudio synth: piano, bass, pad, organ, lead and drum voices, all synthesized
// (nothing is downloaded). One voice per sounding (channel, note); programs per channel.
// Times are AudioContext seconds; a time in the past starts now.

const FAMILY = (program, channel) => {
  if (channel === 9) return "drums";
  if (program >= 32 && program <= 39) return "bass";
  if ((program >= 40 && program <= 55) || (program >= 88 && program <= 95)) return "pad";
  if (program >= 16 && program <= 23) return "organ";
  if ((program >= 56 && program <= 87) || (program >= 104 && program <= 111)) return "lead";
  return "piano";
};

const mtof = (n) => 440 * Math.pow(2, (n - 69) / 12);

export class Synth {
  constructor() {
    this.ctx = null;
    this.voices = new Map(); // "ch:note" -> voice
    this.programs = new Array(16).fill(0);
    this.volume = 0.8;
  }

  // Created on the first user gesture (browsers keep audio suspended until then).
  ensure() {
    if (!this.ctx) {
      const ctx = new (window.AudioContext || window.webkitAudioContext)({ latencyHint: "interactive" });
      this.ctx = ctx;
      this.master = ctx.createGain();
      this.master.gain.value = this.volume;
      const comp = ctx.createDynamicsCompressor();
      comp.threshold.value = -14; comp.ratio.value = 4; comp.attack.value = 0.004; comp.release.value = 0.2;
      this.dry = ctx.createGain();
      this.wet = ctx.createGain(); this.wet.gain.value = 0.22;
      const verb = ctx.createConvolver();
      verb.buffer = this._impulse(2.2);
      this.dry.connect(comp); this.wet.connect(verb); verb.connect(comp);
      comp.connect(this.master); this.master.connect(ctx.destination);
      this.noise = this._noiseBuffer();
    }
    if (this.ctx.state === "suspended") this.ctx.resume();
    return this.ctx;
  }

  get running() { return !!this.ctx && this.ctx.state === "running"; }
  now() { return this.ctx ? this.ctx.currentTime : 0; }
  setVolume(v) { this.volume = v; if (this.master) this.master.gain.setTargetAtTime(v, this.ctx.currentTime, 0.02); }
  program(channel, program) { this.programs[channel] = program; }

  // Raw MIDI in: note on/off, program change, CC 120/123 (all off).
  midi(data, when) {
    const st = data[0] & 0xf0, ch = data[0] & 0x0f;
    if (st === 0x90 && data[2] > 0) this.noteOn(ch, data[1], data[2], when);
    else if (st === 0x80 || st === 0x90) this.noteOff(ch, data[1], when);
    else if (st === 0xc0) this.program(ch, data[1]);
    else if (st === 0xb0 && (data[1] === 120 || data[1] === 123)) this.allOff(ch);
  }

  noteOn(ch, note, vel, when) {
    const ctx = this.ensure();
    const t = Math.max(ctx.currentTime, when ?? 0);
    const key = ch + ":" + note;
    const old = this.voices.get(key);
    if (old) old.stop(t);
    const family = FAMILY(this.programs[ch], ch);
    const v = family === "drums" ? this._drum(note, vel / 127, t) : this._tone(family, note, vel / 127, t);
    if (family !== "drums") this.voices.set(key, v);
    return v;
  }

  noteOff(ch, note, when) {
    const key = ch + ":" + note;
    const v = this.voices.get(key);
    if (!v || !this.ctx) return;
    this.voices.delete(key);
    v.stop(Math.max(this.ctx.currentTime, when ?? 0));
  }

  allOff(channel = null) {
    for (const [key, v] of this.voices) {
      if (channel === null || key.startsWith(channel + ":")) { v.stop(this.now(), true); this.voices.delete(key); }
    }
  }

  sounding() { return this.voices.size; }

  // A metronome click at `when` (audio time): a short blip, higher on a downbeat.
  click(when, accent = false) {
    if (!this.ctx) return;
    const ctx = this.ctx, t = Math.max(ctx.currentTime, when ?? 0);
    const o = ctx.createOscillator(), g = ctx.createGain();
    o.frequency.setValueAtTime(accent ? 1760 : 1175, t);
    g.gain.setValueAtTime(accent ? 0.5 : 0.32, t); g.gain.exponentialRampToValueAtTime(0.0001, t + 0.05);
    o.connect(g); g.connect(this.dry); o.start(t); o.stop(t + 0.06);
  }

  // --- voices ------------------------------------------------------------------------------
  _tone(family, note, vel, t) {
    const ctx = this.ctx, f = mtof(note);
    const out = ctx.createGain(); out.gain.value = 0;
    const filt = ctx.createBiquadFilter(); filt.type = "lowpass";
    filt.connect(out); out.connect(this.dry); out.connect(this.wet);
    const oscs = [];
    const osc = (type, freq, gain, detune = 0) => {
      const o = ctx.createOscillator(); o.type = type; o.frequency.value = freq; o.detune.value = detune;
      const g = ctx.createGain(); g.gain.value = gain; o.connect(g); g.connect(filt); o.start(t); oscs.push(o);
    };
    const peak = 0.18 * (0.35 + 0.65 * vel);
    let release = 0.25;
    const g = out.gain;
    g.setValueAtTime(0, t);
    if (family === "piano") {
      osc("triangle", f, 0.8); osc("sine", f * 2, 0.25 * vel); osc("sawtooth", f, 0.06, 4);
      filt.frequency.setValueAtTime(Math.min(12000, f * (3 + 9 * vel)), t);
      filt.frequency.exponentialRampToValueAtTime(Math.max(300, f * 1.5), t + 1.8);
      g.linearRampToValueAtTime(peak, t + 0.004);
      g.setTargetAtTime(peak * 0.35, t + 0.01, 0.25);
      g.setTargetAtTime(0.0001, t + 0.6, 1.6 - Math.min(1.2, (note - 40) / 60));
      release = 0.18;
    } else if (family === "bass") {
      osc("sawtooth", f, 0.55); osc("sine", f / 2, 0.6); osc("square", f, 0.15, -5);
      filt.Q.value = 6;
      filt.frequency.setValueAtTime(f * 10 * (0.4 + vel), t);
      filt.frequency.exponentialRampToValueAtTime(f * 2.2, t + 0.25);
      g.linearRampToValueAtTime(peak * 1.2, t + 0.006);
      g.setTargetAtTime(peak * 0.8, t + 0.02, 0.3);
      release = 0.09;
    } else if (family === "pad") {
      osc("sawtooth", f, 0.3, -9); osc("sawtooth", f, 0.3, 9); osc("triangle", f / 2, 0.25);
      filt.frequency.value = Math.min(6000, f * 4); filt.Q.value = 1;
      g.linearRampToValueAtTime(peak * 0.7, t + 0.35);
      release = 0.9;
    } else if (family === "organ") {
      osc("sine", f, 0.5); osc("sine", f * 2, 0.3); osc("sine", f * 3, 0.18); osc("sine", f * 4, 0.1);
      filt.frequency.value = 9000;
      g.linearRampToValueAtTime(peak * 0.8, t + 0.01);
      release = 0.06;
    } else { // lead
      osc("square", f, 0.35, -6); osc("sawtooth", f, 0.3, 6);
      filt.frequency.setValueAtTime(f * 6, t); filt.Q.value = 3;
      g.linearRampToValueAtTime(peak * 0.8, t + 0.02);
      g.setTargetAtTime(peak * 0.6, t + 0.05, 0.2);
      release = 0.12;
    }
    let stopped = false;
    return {
      start: t,
      stop: (at, hard = false) => {
        if (stopped) return; stopped = true;
        const when = Math.max(at, t);
        g.cancelScheduledValues(when);
        g.setValueAtTime(g.value, when);
        const rel = hard ? 0.03 : release;
        g.setTargetAtTime(0, when, rel / 3);
        for (const o of oscs) o.stop(when + rel * 2 + 0.05);
        setTimeout(() => out.disconnect(), (when - ctx.currentTime + rel * 2 + 0.2) * 1000);
      },
    };
  }

  _drum(note, vel, t) {
    const ctx = this.ctx;
    const out = ctx.createGain(); out.connect(this.dry);
    const amp = 0.5 * (0.3 + 0.7 * vel);
    const noise = (hp, lp, dur, gain) => {
      const s = ctx.createBufferSource(); s.buffer = this.noise;
      const f1 = ctx.createBiquadFilter(); f1.type = "highpass"; f1.frequency.value = hp;
      const f2 = ctx.createBiquadFilter(); f2.type = "lowpass"; f2.frequency.value = lp;
      const g = ctx.createGain(); g.gain.setValueAtTime(gain, t); g.gain.exponentialRampToValueAtTime(0.0001, t + dur);
      s.connect(f1); f1.connect(f2); f2.connect(g); g.connect(out); s.start(t); s.stop(t + dur + 0.05);
    };
    const tone = (f0, f1, dur, gain, type = "sine") => {
      const o = ctx.createOscillator(); o.type = type;
      o.frequency.setValueAtTime(f0, t); o.frequency.exponentialRampToValueAtTime(f1, t + dur * 0.6);
      const g = ctx.createGain(); g.gain.setValueAtTime(gain, t); g.gain.exponentialRampToValueAtTime(0.0001, t + dur);
      o.connect(g); g.connect(out); o.start(t); o.stop(t + dur + 0.05);
    };
    if (note === 35 || note === 36) tone(150, 45, 0.35, amp * 1.6);
    else if (note === 38 || note === 40 || note === 37 || note === 39) { tone(220, 160, 0.12, amp * 0.6, "triangle"); noise(1200, 9000, 0.18, amp * 0.9); }
    else if (note === 42 || note === 44) noise(7000, 16000, 0.05, amp * 0.5);
    else if (note === 46) noise(6500, 16000, 0.3, amp * 0.45);
    else if (note === 49 || note === 57 || note === 52 || note === 55) noise(4000, 15000, 1.4, amp * 0.4);
    else if (note === 51 || note === 53 || note === 59) noise(5000, 14000, 0.6, amp * 0.25);
    else if (note >= 41 && note <= 50) tone(60 + (note - 41) * 18, 50 + (note - 41) * 12, 0.3, amp);
    else noise(2000, 9000, 0.08, amp * 0.5);
    this.wet && out.connect(this.wet);
    setTimeout(() => out.disconnect(), (t - ctx.currentTime + 2) * 1000);
    return { start: t, stop: () => {} };
  }

  _noiseBuffer() {
    const b = this.ctx.createBuffer(1, this.ctx.sampleRate, this.ctx.sampleRate);
    const d = b.getChannelData(0);
    for (let i = 0; i < d.length; i++) d[i] = Math.random() * 2 - 1;
    return b;
  }

  _impulse(seconds) {
    const rate = this.ctx.sampleRate, n = Math.floor(rate * seconds);
    const b = this.ctx.createBuffer(2, n, rate);
    for (let c = 0; c < 2; c++) {
      const d = b.getChannelData(c);
      for (let i = 0; i < n; i++) d[i] = (Math.random() * 2 - 1) * Math.pow(1 - i / n, 3);
    }
    return b;
  }
}
