"""The scheduler: one thread advances every live session with one batched forward per step.

A step, over the sessions' public interface only (the vllm v1 shape):

    drain commands -> prepare (forced events, stops, overflow) -> admit -> pack rows -> forward
    -> mask + policy -> sample -> update (accept / reject) -> publish

Sessions have a priority: "live" (a musician plays along) or "batch" (an offline job, an HTTP
generation). Live sessions' work always runs in the step; while any live session is busy,
batch sessions share what is left of `batch_tokens` tokens per step (least recently served
first), so an HTTP prompt's prefill or a crowd of file requests never lengthens a live step by
more than that.

The scheduler thread owns the decoder (model + KV cache), every `SessionState` and the shadow
slot (`ContextSlider`). Callers hold `LiveSession` handles, which only queue commands.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from ..constraint_set import ConstraintSet
from ..constraints import Constraint
from ..decoder import Decoder
from ..sampling import apply_mask, logits_to_probs, pool_chords, sample, temper_span
from ..tokenizer.vocab import Vocab
from . import policy
from .handle import LiveSession
from .history import History
from .shadow import ContextSlider
from .state import SessionState
from .timing import Timing
from .types import ClockFn, Command, EventCallback, Open, SamplingParams, SchedulerFull, Status

T = TypeVar("T")
logger = logging.getLogger(__name__)

REPORT_EVERY_S = 10.0  # the scheduler's load line in the log, while it works

Priority = Literal["live", "batch"]  # a musician's session first; offline jobs fill the rest


class EngineLike(Protocol):
    vocab: Vocab

    def new_decoder(self, max_batch: int, max_seq: int | None = None) -> Decoder: ...


def contiguous_runs(slots: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted slots -> [(start index, end index)) of runs of consecutive slot numbers."""
    runs, start = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((start, i))
            start = i
    return runs


class CommandQueue:
    """The one ordered queue from every handle to the scheduler thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._items: deque[tuple[int, Command]] = deque()

    def put(self, sid: int, cmd: Command) -> None:
        with self._wake:
            self._items.append((sid, cmd))
            self._wake.notify()

    def put_many(self, sid: int, cmds: Sequence[Command]) -> None:
        """Commands the scheduler takes together (none of them is drained without the rest)."""
        with self._wake:
            self._items.extend((sid, c) for c in cmds)
            self._wake.notify()

    def drain(self) -> list[tuple[int, Command]]:
        with self._lock:
            out = list(self._items)
            self._items.clear()
            return out

    def wait(self, timeout: float, stop: threading.Event) -> None:
        with self._wake:
            if not self._items and not stop.is_set():
                self._wake.wait(timeout)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def __len__(self) -> int:
        return len(self._items)


def check_tokens(vocab: Vocab, tokens: Iterable[int]) -> list[int]:
    """`tokens` as ints, each a token id of `vocab` (ValueError, with the range, if not)."""
    toks = [int(t) for t in tokens]
    bad = [t for t in toks if not 0 <= t < vocab.size]
    if bad:
        raise ValueError(f"token ids must be in 0..{vocab.size - 1}, got {bad[0]}")
    return toks


def check_open(vocab: Vocab, prompt: Iterable[int], priority: str) -> list[int]:
    """`open_session`'s arguments checked: the prompt's tokens (at least one)."""
    if priority not in ("live", "batch"):
        raise ValueError(f"priority must be 'live' or 'batch', got {priority!r}")
    toks = check_tokens(vocab, prompt)
    if not toks:
        raise ValueError("the prompt needs at least one token, e.g. [BOS, TASK_CONTINUE]")
    return toks


def lower_thread_priority(nice: int) -> None:
    """Add `nice` to the calling thread's nice value (this thread only, Linux; elsewhere, or
    where not allowed, a warning)."""
    try:
        tid = threading.get_native_id()  # (setpriority sets, not adds)
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + nice, 19))
    except (AttributeError, OSError):
        logger.warning("could not lower the priority of %s", threading.current_thread().name)


class Scheduler:
    """Advances many live sessions with one batched forward per step, on one thread."""

    def __init__(
        self,
        engine: EngineLike,
        max_sessions: int = 16,
        max_len: int | None = None,
        keep_len: int | None = None,
        prefill_chunk: int = 256,
        shadow_chunk: int = 32,
        max_batch_pad: int = 8,
        idle_wait_s: float = 0.05,
        batch_tokens: int = 16,
        name: str = "improv-scheduler",
        ids: Iterator[int] | None = None,
        note_share: bool = False,
        nice: int = 0,
        after_step: Callable[[], None] | None = None,
    ) -> None:
        """batch_tokens: tokens fed per step to batch-priority sessions while a live one is busy
        (each batch row's token counts one, a prefill chunk its length). note_share: a note the
        constraints reject, where no wait leads to it, is drawn again masked, its VELs scaled
        by the share of the rejected ON's draw the constraints allowed (`policy`; one rejection
        instead of up to MAX_NOTE_RETRIES). nice: added to the scheduler thread's nice value
        (lower CPU priority), so that on a machine whose cores it keeps busy, the threads that
        send on time still get a core when they wake. after_step: called on the scheduler
        thread after each step it runs (a host that hands a step's events on together: the
        server's live worker process sends them in one message)."""
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        self.batch_tokens, self.name, self.note_share = batch_tokens, name, note_share
        self.nice, self.after_step = nice, after_step
        self.vocab: Vocab = engine.vocab
        # One spare slot: the shadow, where a session's slid context is prefilled while it
        # plays on. Sessions keep the slot they open on: the forward runs once per contiguous
        # run of busy slots. (Packing busy sessions into the lowest slots, swapping an idle one
        # out through a scratch slot, cost three copies of both caches, 1.8 ms of CPU at 500
        # tokens and growing with the context, against ~0.45 ms per extra run; in accompany,
        # where sessions go idle between requests, ~30 swaps/s at 16 sessions: without them
        # 4-5% more tokens per CPU second in the capacity benchmark.)
        self.decoder: Decoder = engine.new_decoder(max_sessions + 1, max_len)
        self.device = self.decoder.device
        self.max_sessions = max_sessions
        self.max_len = self.decoder.max_seq
        self.keep_len = keep_len or self.max_len // 2
        if not 8 <= self.keep_len < self.max_len:
            raise ValueError(f"keep_len must be in 8..{self.max_len - 1}, got {self.keep_len}")
        self.prefill_chunk, self.max_batch_pad = prefill_chunk, max_batch_pad
        self.idle_wait_s = idle_wait_s
        self.slider = ContextSlider(
            self.decoder, max_sessions, self.max_len, self.keep_len, shadow_chunk
        )
        self.shadow_len = self.slider.start_len
        self.timing = Timing()
        self._vel_ids = slice(self.vocab.vel_base, self.vocab.on_base)  # the VEL tokens
        self._chord_ids = slice(self.vocab.chord_base, self.vocab.HEADER)  # CHORD(index) tokens
        self._shift_span = (self.vocab.shift_base, self.vocab.long_base)  # the SHIFT tokens
        self._queue = CommandQueue()
        # Slots are taken at open_session (it raises SchedulerFull at once) and given back by
        # the scheduler thread: the one table both sides change, under `_lock`.
        self._lock = threading.Lock()
        self._free = list(range(max_sessions - 1, -1, -1))  # pop() gives the lowest slot
        self._states: dict[int, SessionState] = {}  # open, as the scheduler thread sees them
        self._ids = ids if ids is not None else itertools.count()  # (shared by a pool's workers)
        self._rids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.steps = 0  # steps that ran a forward
        # Cumulative seconds in the step's phases and tokens sampled (benchmarks, server metrics).
        self.stats = {
            "forward_s": 0.0,
            "mask_s": 0.0,
            # CPU seconds of the scheduler thread in steps, and in forwards (onnxruntime runs on
            # the calling thread with one intra-op thread): unlike the wall times above, they do
            # not grow when other processes take the core, so they compare runs on a shared CPU.
            "cpu_s": 0.0,
            "forward_cpu_s": 0.0,
            "sample_s": 0.0,
            "tokens": 0,
            "notes_rejected": 0,
            "backoffs": 0,
            "forwards": 0,  # decoder calls (a step runs one per contiguous run of slots)
            "prefill_forwards": 0,  # of those, a long append's chunk alone (prompts, slides)
            "shadow_forwards": 0,  # of those, a chunk of the shadow slot's prefill
            "batch_tokens": 0,  # of `tokens`, sampled for batch-priority sessions
            "batch_deferred": 0,  # batch sessions' turns left to a later step (live ones busy)
            "tokens_cut": 0,  # tokens removed by rollbacks (SessionState.tokens_cut, summed)
            "slides": 0,  # slid contexts swapped in from the shadow slot
            "blocking_slides": 0,  # overflows before one was ready (the session waited)
        }

    # --- timings (the clock floor's) ----------------------------------------------------------------
    @property
    def now(self) -> Callable[[], float]:
        return self.timing.now

    @now.setter
    def now(self, fn: Callable[[], float]) -> None:
        self.timing.now = fn

    @property
    def step_s_ema(self) -> float:
        return self.timing.step_s_ema

    @property
    def event_lead_s(self) -> float:
        return self.timing.event_lead_s

    def reset_timing(self) -> None:
        self.timing.reset()

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> Scheduler:
        if self._thread is not None:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._queue.wake()
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        if self.nice:  # the event loop and the send clock preempt it
            lower_thread_priority(self.nice)
        last_t, last = time.monotonic(), dict(self.stats, steps=self.steps)
        while not self._stop.is_set():
            if (now := time.monotonic()) - last_t >= REPORT_EVERY_S and self.steps > last["steps"]:
                self._report(now - last_t, last)
                last_t, last = now, dict(self.stats, steps=self.steps)
            try:
                busy = self.step()
            except Exception:
                logger.exception("scheduler step failed; ending every running request")
                for s in list(self._states.values()):
                    s.finish("error")
                busy = False
            if self.after_step is not None:
                self.after_step()
            if not busy:
                self._queue.wait(self.idle_wait_s, self._stop)

    def _report(self, seconds: float, last: dict[str, float]) -> None:
        """One log line on the scheduler's load since `last` (operators; the benchmarks)."""
        st = self.stats
        steps = self.steps - last["steps"]
        tokens = st["tokens"] - last["tokens"]
        logger.info(
            "scheduler: %d sessions, %.0f steps/s, %.0f tokens/s, %.1f rows/step, "
            "%.1f forwards/step, forward %.2f ms/step (CPU %.2f), %.0f%% busy (CPU %.0f%%), "
            "%d notes rejected, %.0f%% of the tokens cut by rollbacks, event lead %.1f ms, "
            "context %.0f tokens (mean)",
            len(self._states),
            steps / seconds,
            tokens / seconds,
            tokens / max(steps, 1),
            (st["forwards"] - last["forwards"]) / max(steps, 1),
            1000 * (st["forward_s"] - last["forward_s"]) / max(steps, 1),
            1000 * (st["forward_cpu_s"] - last["forward_cpu_s"]) / max(steps, 1),
            100 * sum(st[k] - last[k] for k in ("forward_s", "mask_s", "sample_s")) / seconds,
            100 * (st["cpu_s"] - last["cpu_s"]) / seconds,
            st["notes_rejected"] - last["notes_rejected"],
            100 * (st["tokens_cut"] - last["tokens_cut"]) / max(tokens, 1),
            1000 * self.timing.event_lead_s,
            np.mean([s.ctx_len() for s in self._states.values()] or [0]),  # attention's cost
        )

    # --- sessions (any thread) ----------------------------------------------------------------------
    def open_session(
        self,
        prompt: Iterable[int],
        constraints: Sequence[Constraint] = (),
        sampling: SamplingParams | None = None,
        on_event: EventCallback | None = None,
        allow_end: bool = False,
        clock: ClockFn | None = None,
        priority: Priority = "live",
    ) -> LiveSession:
        """A new session on a free cache slot; its prompt is prefilled at the next steps.

        allow_end: let the model sample EOS (it then ends the request and is not appended).
        clock: the token time it is now (see `LiveSession.set_clock`).
        priority: "live" runs in every step; "batch" (offline jobs) fills what live ones leave.
        """
        toks = check_open(self.vocab, prompt, priority)
        sampling = sampling or SamplingParams()
        # clip_time: a shift past the next forced event / the request's end is shortened to
        # land on it instead of being masked (masking would push the model into playing notes).
        cs = ConstraintSet(self.vocab, constraints, allow_end=allow_end, clip_time=True)
        with self._lock:
            if not self._free:
                raise SchedulerFull(f"all {self.max_sessions} session slots are in use")
            slot = self._free.pop()
            sid = next(self._ids)
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(62)
        history = History(self.vocab, cs)
        s = LiveSession(
            sid,
            Status(slot),
            self._queue,
            self.check_tokens,
            self._next_request_id,
            list(constraints),
            history,
            on_event,
        )
        st = SessionState(
            sid, slot, self.vocab, history, toks, sampling, seed, clock, s.fence, s._emit,
            s._publish, self.timing, batch=priority == "batch",
        )  # fmt: skip
        self._queue.put(sid, Open(st))  # the state is handed over whole
        return s

    @property
    def n_open(self) -> int:
        """Sessions holding a slot (closed ones free theirs at the next step)."""
        with self._lock:
            return self.max_sessions - len(self._free)

    def queue_length(self) -> int:
        """Commands queued, not yet applied (a step drains them all)."""
        return len(self._queue)

    def check_tokens(self, tokens: Iterable[int]) -> list[int]:
        return check_tokens(self.vocab, tokens)

    def _next_request_id(self) -> int:
        with self._lock:
            return next(self._rids)

    def state(self, session: LiveSession) -> SessionState | None:
        """A session's state (scheduler thread only: tests and tools that step by hand)."""
        return self._states.get(session.id)

    # --- the step (scheduler thread) --------------------------------------------------------------
    def step(self) -> bool:
        """Apply queued commands, advance every session by one forward; True if work was done."""
        t_step, cpu_step = self.timing.now(), time.thread_time()
        cmds = self._queue.drain()
        for sid, cmd in cmds:
            self._apply(sid, cmd)
        states = list(self._states.values())
        for s in states:
            if self._guarded(s, s.prepare, self.max_len, self.keep_len):
                self.stats["blocking_slides"] += 1
        self._sync_caches(states)
        caps = self._admit(states)
        t0, cpu0 = time.perf_counter(), time.thread_time()
        logits, n_forwards, prefilled = self._forward(states, caps)
        shadow, swapped = self.slider.step(states, any(s.req is not None for s in states))
        self.stats["slides"] += swapped
        n_forwards += shadow
        self.stats["shadow_forwards"] += shadow
        self.stats["forwards"] += n_forwards
        self.stats["forward_s"] += time.perf_counter() - t0
        self.stats["forward_cpu_s"] += time.thread_time() - cpu0
        rows = [s for s in states if s.req is not None and s.id in logits]
        t0 = time.perf_counter()
        masks = {s.id: m for s in rows if (m := self._guarded(s, s.mask)) is not None}
        self.stats["mask_s"] += time.perf_counter() - t0
        rows = [s for s in rows if s.id in masks]
        if rows:
            self._sample(
                rows, torch.stack([logits[s.id] for s in rows]), [masks[s.id] for s in rows]
            )
        for s in states:
            s.publish()
        for s in states:
            self._count_cut(s)
        if n_forwards:
            self.steps += 1
        if n_forwards and not prefilled and not shadow:
            self.timing.decode_step(self.timing.now() - t_step)
        self.stats["cpu_s"] += time.thread_time() - cpu_step
        return bool(cmds) or n_forwards > 0 or bool(rows)

    def _apply(self, sid: int, cmd: Command) -> None:
        if isinstance(cmd, Open):
            st = self._states[sid] = cmd.state
        elif (st := self._states.get(sid)) is None:
            logger.debug("session %d: %s after close, ignored", sid, type(cmd).__name__)
            return
        self._guarded(st, st.apply, cmd)
        if st.closed:
            self._release(st)
        st.publish()

    def _guarded(self, s: SessionState, fn: Callable[..., T], *args: Any) -> T | None:
        """fn(*args) for one session; if it raises, that session's request ends with "error"
        (logged) and the other sessions go on. None if it raised."""
        try:
            return fn(*args)
        except Exception:
            logger.exception("session %d: step failed; its request ends", s.id)
            s.finish("error")
            return None

    def run_until_idle(self, max_steps: int = 100_000) -> int:
        """Step until nothing is left to do (tests, offline use); returns the steps taken."""
        for i in range(max_steps):
            if not self.step():
                return i
        raise RuntimeError(f"still busy after {max_steps} steps")

    def _count_cut(self, s: SessionState) -> None:
        self.stats["tokens_cut"] += s.tokens_cut
        s.tokens_cut = 0

    def _release(self, s: SessionState) -> None:
        self._count_cut(s)
        self.decoder.reset(s.slot)
        del self._states[s.id]
        with self._lock:
            self._free.append(s.slot)
            self._free.sort(reverse=True)

    def _sync_caches(self, states: list[SessionState]) -> None:
        """Crop each session's cache to what its state still counts (rollbacks, resets)."""
        for s in states:
            if self.decoder.length(s.slot) > s.cached:
                self.decoder.crop(s.slot, s.cached)

    def _admit(self, states: list[SessionState]) -> dict[int, int]:
        """The batch sessions' share of this step: {session id: tokens it may feed} (0: its
        turn waits; a kept-logits draw counts one). Live sessions are not limited, nor batch
        ones while no live session has work."""
        live_busy = any(not s.batch and (s.req is not None or s.pending()) for s in states)
        if not live_busy:
            return {}
        caps: dict[int, int] = {}
        left = self.batch_tokens
        waiting = [s for s in states if s.batch and (s.req is not None or s.pending())]
        for s in sorted(waiting, key=lambda s: s.served_step):  # least recently served first
            need = s.pending() or 1
            give = min(need, max(left, 0), self.prefill_chunk)
            if need <= self.max_batch_pad and give < need:
                # A decode row goes whole (a partial one would be a prefill); the first in line
                # always does, over the budget if it must, so that none waits forever.
                give = need if left == self.batch_tokens else 0
            caps[s.id] = give
            left -= give
            if give:
                s.served_step = self.steps
            else:
                self.stats["batch_deferred"] += 1
        return caps

    def _forward(
        self, states: list[SessionState], caps: dict[int, int]
    ) -> tuple[dict[int, Tensor], int, bool]:
        """Feed every session's pending tokens (at most `caps[id]` for the sessions named):
        logits (V,) of sessions now fully fed, the number of forwards run, and whether one was
        a long append's prefill chunk."""
        out: dict[int, Tensor] = {}
        n = 0
        big = self.prefill_chunk
        for s in states:  # logits kept: the pending tokens are fed with the next ones
            if s.req is not None and caps.get(s.id, 1) and (kept := s.kept_logits()) is not None:
                out[s.id] = kept
        small = sorted(
            (
                s
                for s in states
                if 0 < s.pending() <= self.max_batch_pad
                and s.id not in out
                and caps.get(s.id, big) >= s.pending()
            ),
            key=lambda s: s.slot,
        )
        slots = [s.slot for s in small]
        for a, b in contiguous_runs(slots):
            run = small[a:b]
            toks = [s.pending_tokens() for s in run]
            logits = self.decoder.extend(slots[a:b], toks)  # (B, V)
            n += 1
            for s, t, row in zip(run, toks, logits, strict=True):
                s.fed(len(t))
                out[s.id] = s.keep_logits(row)
        prefilled = False
        for s in states:
            if s.pending() > self.max_batch_pad and s.id not in out and caps.get(s.id, big):
                chunk = s.pending_tokens()[: min(big, caps.get(s.id, big))]
                logits = self.decoder.extend([s.slot], [chunk])  # (1, V)
                s.fed(len(chunk))
                n, prefilled = n + 1, True
                self.stats["prefill_forwards"] += 1
                if s.pending() == 0:
                    out[s.id] = s.keep_logits(logits[0])
        return out, n, prefilled

    def _sample(self, rows: list[SessionState], logits: Tensor, masks: list[np.ndarray]) -> None:
        """logits (B, V) of sessions with a running request and their masks (V,): the policy
        sets each row's draw, one `sample` for all, then each state takes its token."""
        t0 = time.perf_counter()
        draws = [policy.draw(s, m) for s, m in zip(rows, masks, strict=True)]
        allowed = torch.from_numpy(np.stack([d.mask for d in draws]))  # (B, V) bool
        t1 = time.perf_counter()
        logits = apply_mask(logits, allowed)
        for i, d in enumerate(draws):  # a note drawn again: its VELs scaled by the allowed share
            if d.vel_log_share:
                temp = rows[i].sampling.temperature
                logits[i, self._vel_ids] += temp * d.vel_log_share
            if d.chord_pool is not None:
                pool_chords(logits[i, self._chord_ids], d.chord_pool, rows[i].sampling.temperature)
        groups: dict[tuple, list[int]] = {}
        waits: dict[float, list[int]] = {}  # rows whose waits are tempered, by how much
        for i, s in enumerate(rows):  # rows sharing sampling settings share one call
            p = s.sampling
            groups.setdefault((p.temperature, p.top_k, p.top_p, p.min_p), []).append(i)
            if p.wait_temperature not in (None, 1.0) and p.temperature > 0:
                waits.setdefault(p.wait_temperature, []).append(i)
        for wt, idx in waits.items():
            logits[idx] = temper_span(logits[idx], *self._shift_span, wt)
        probs = torch.empty_like(logits)  # (B, V)
        for (temp, top_k, top_p, min_p), idx in groups.items():
            probs[idx] = logits_to_probs(logits[idx], temp, top_k, top_p, min_p)
        # Counter-based draws from (seed, position): one vectorized call for every row, no
        # per-row generator to reseed (that was ~66 us/row), still batch-invariant.
        seeds, positions = [s.draw_seed() for s in rows], [s.position for s in rows]
        toks = sample(probs, seeds=seeds, positions=positions).tolist()  # the one host sync
        t2 = time.perf_counter()
        for i, (s, d, t) in enumerate(zip(rows, draws, toks, strict=True)):
            if policy.rejected(d, t):
                self.stats["notes_rejected"] += 1
                back = policy.backs_off(s, t)
                share = None
                if (
                    self.note_share and not back and policy.masks_after(s)
                ):  # the share the constraints allowed
                    share = float(probs[i][d.strict].sum())
                if self._guarded(s, s.reject, t, back) and back:
                    self.stats["backoffs"] += 1
                elif share is not None:
                    policy.remember_share(s, share)
            else:
                self._guarded(s, s.accept, t)
        st = self.stats
        st["mask_s"] += t1 - t0 + time.perf_counter() - t2  # masks + state updates
        st["sample_s"] += t2 - t1
        st["tokens"] += len(rows)
        st["batch_tokens"] += sum(1 for s in rows if s.batch)
