"""`GET /metrics`: what an operator watches, in Prometheus' text format (version 0.0.4).

Sessions (live, HTTP), the decode workers' tokens (a counter, and per second since the last
scrape), late events, queue lengths, the scheduler's wasted work (notes rejected, forwards per
step). Public like `/health` (no token): counts only, nothing of anyone's music. Served on the
event loop (a few dozen lines of text, no lock held).

More figures (the HTTP request queue, for one): `Runtime.extra_metrics[name] = (type, help,
fn)`; `fn()` is called on the event loop at each scrape and returns a number.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from .live_process import ProcessScheduler
from .runtime import Runtime

router = APIRouter()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class TokenRate:
    """Tokens per second between two scrapes (at least `min_s` apart; the last value between)."""

    def __init__(self, min_s: float = 1.0) -> None:
        self.min_s = min_s
        self._mark: tuple[float, float] | None = None
        self.value = 0.0

    def update(self, tokens: float) -> float:
        now = time.monotonic()
        if self._mark is None:
            self._mark = (now, tokens)
        elif now - self._mark[0] >= self.min_s:
            self.value = (tokens - self._mark[1]) / (now - self._mark[0])
            self._mark = (now, tokens)
        return self.value


def samples(rt: Runtime, rate: TokenRate) -> list[tuple[str, str, str, float]]:
    """(name, type, help, value) of every figure, in order."""
    st = rt.scheduler.stats
    sent, late, retracts = rt.connections.totals()
    busy = st["forward_s"] + st["mask_s"] + st["sample_s"]
    out: list[tuple[str, str, str, float]] = [
        ("improv_live_sessions", "gauge", "Live WebSocket sessions open.", rt.sessions_open()),
        ("improv_live_sessions_max", "gauge", "Live sessions accepted at most.", rt.max_sessions),
        ("improv_http_generations", "gauge", "HTTP generations running.", rt.jobs.running()),
        (
            "improv_http_generations_max",
            "gauge",
            "HTTP generations running at most.",
            rt.settings.http_sessions,
        ),
        (
            "improv_decode_workers",
            "gauge",
            "Scheduler threads decoding.",
            rt.scheduler.n_workers,
        ),
        (
            "improv_scheduler_queue_length",
            "gauge",
            "Session commands queued for the decode workers.",
            rt.scheduler.queue_length(),
        ),
        ("improv_tokens_total", "counter", "Tokens sampled.", st["tokens"]),
        (
            "improv_tokens_per_second",
            "gauge",
            "Tokens sampled per second since the previous scrape.",
            rate.update(st["tokens"]),
        ),
        (
            "improv_batch_tokens_total",
            "counter",
            "Tokens sampled for HTTP generations (in the generation worker process, or with "
            "IMPROV_HTTP_WORKER=thread of improv_tokens_total).",
            rt.jobs.tokens(),
        ),
        (
            "improv_batch_deferred_total",
            "counter",
            "HTTP generations' turns left to a later step (live sessions first).",
            st["batch_deferred"],
        ),
        ("improv_steps_total", "counter", "Decode steps run.", rt.scheduler.steps),
        ("improv_forwards_total", "counter", "Decoder calls (one or more a step).", st["forwards"]),
        (
            "improv_prefill_forwards_total",
            "counter",
            "Of the decoder calls, long appends' chunks (prompts, slides).",
            st["prefill_forwards"],
        ),
        (
            "improv_shadow_forwards_total",
            "counter",
            "Of the decoder calls, chunks of a context slide prefilled ahead.",
            st["shadow_forwards"],
        ),
        (
            "improv_notes_rejected_total",
            "counter",
            "Sampled notes the constraints rejected (drawn again).",
            st["notes_rejected"],
        ),
        ("improv_backoffs_total", "counter", "Waits drawn again, longer.", st["backoffs"]),
        (
            "improv_tokens_cut_total",
            "counter",
            "Tokens removed by rollbacks (a player's event before the model's time): work "
            "thrown away.",
            st["tokens_cut"],
        ),
        (
            "improv_forward_seconds_total",
            "counter",
            "Seconds the decode workers spent in forwards.",
            st["forward_s"],
        ),
        (
            "improv_busy_seconds_total",
            "counter",
            "Seconds the decode workers spent working (forward, masks, sampling).",
            busy,
        ),
        (
            "improv_decode_cpu_seconds_total",
            "counter",
            "CPU seconds of the decode workers' threads in steps (does not count time others "
            "took the core).",
            st["cpu_s"],
        ),
        (
            "improv_forward_cpu_seconds_total",
            "counter",
            "Of those, CPU seconds in forwards.",
            st["forward_cpu_s"],
        ),
        (
            "improv_process_cpu_seconds_total",
            "counter",
            "CPU seconds of the server's process (event loop, send clock; with "
            "--live-worker thread, the decode workers too).",
            time.process_time(),
        ),
        (
            "improv_live_process_cpu_seconds_total",
            "counter",
            "CPU seconds of the live worker process (its decode workers; 0 with --live-worker "
            "thread; restarts from 0 with a new one).",
            getattr(rt.scheduler, "cpu_s", 0.0),
        ),
        (
            "improv_live_events_sent_total",
            "counter",
            "Generated MIDI events sent to live sessions.",
            sent,
        ),
        (
            "improv_live_late_events_total",
            "counter",
            "Generated events sent after their time.",
            late,
        ),
        ("improv_live_retracts_total", "counter", "Generated events retracted.", retracts),
        (
            "improv_event_lead_seconds",
            "gauge",
            "The clock floor's lead: time from drawing an event to sending it (p95).",
            rt.scheduler.event_lead_s,
        ),
    ]
    for name, (kind, help_, fn) in rt.extra_metrics.items():
        out.append((name, kind, help_, float(fn())))
    return out


def render(items: list[tuple[str, str, str, float]]) -> str:
    lines = []
    for name, kind, help_, value in items:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {_num(value)}"]
    return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> PlainTextResponse:
    rt: Runtime = request.app.state.runtime
    rate: TokenRate = _rate(request)
    if isinstance(rt.scheduler, ProcessScheduler):
        await rt.scheduler.refresh()  # its counters now, from the live worker process
    return PlainTextResponse(render(samples(rt, rate)), media_type=CONTENT_TYPE)


def _rate(request: Request) -> TokenRate:
    state = request.app.state
    if not hasattr(state, "token_rate"):
        state.token_rate = TokenRate()
    return state.token_rate
