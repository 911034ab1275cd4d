"""Server settings: command-line flags and IMPROV_* environment variables (pydantic-settings)."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMPROV_", extra="ignore")

    host: str = "127.0.0.1"  # a non-loopback address requires a token
    port: int = Field(8000, ge=1, le=65535)
    checkpoint: str = "models/default"  # checkpoint folder (model.safetensors + config.json)
    device: str = "auto"  # auto: CUDA when present, else CPU
    backend: Literal["auto", "torch", "onnx", "onnx-int8"] = (
        "auto"  # auto: onnx-int8 on the CPU, torch on CUDA
    )
    # torch CPU threads for the scheduler's forward. 1: on a shared or small machine, OpenMP
    # barriers waiting on descheduled threads made each step 4-6x slower (see BENCHMARKS.md).
    threads: int = Field(1, ge=1, le=256)
    # GIL switch interval: how long the event loop (sending, receiving) may wait for the
    # scheduler thread's Python code, and the other way round (Python's default is 5 ms).
    switch_interval_ms: float = Field(0.5, gt=0, le=100)
    max_sessions: int = Field(32, ge=1, le=256)  # live WebSocket sessions at once
    http_sessions: int = Field(4, ge=1, le=64)  # offline generations at once (--max-generations)
    # Where HTTP generations run: "process", a worker process of their own (live sessions keep
    # this process's GIL and, niced by http_nice, the cores: BENCHMARKS.md, capacity), or
    # "thread", the live sessions' decode workers (batched with them, live ones first).
    http_worker: Literal["process", "thread"] = "process"
    # Where live sessions decode: "process", a worker process of their own (this one keeps its
    # GIL for the event loop and the send clock: server/live_process.py), or "thread", decode
    # threads in this process.
    live_worker: Literal["process", "thread"] = "process"
    # The event loop and the send clock at real-time priority where the OS allows it (they
    # wake on time on a busy machine: server/realtime.py).
    realtime: bool = True
    http_nice: int = Field(10, ge=0, le=19)  # added to the worker process's nice value
    # Generations beyond those wait, at most this many and this long, then 503 with Retry-After.
    generation_queue: int = Field(16, ge=0, le=1024)
    generation_wait_s: float = Field(30.0, ge=0, le=600)
    max_upload_notes: int = Field(100_000, ge=1)  # notes in an uploaded file (memory per request)
    # Decode workers: scheduler threads, each batching its own sessions (None: one per core,
    # but one on more than 2 cores, at least 8 sessions each; docs/engine-live.md, "Decode
    # workers").
    decode_workers: int | None = Field(None, ge=1, le=64)
    # Tokens a decode step gives HTTP generations while live sessions play (live ones first).
    http_step_tokens: int = Field(16, ge=1, le=4096)
    # A rejected note (another part's) drawn again masked after one rejection (engine policy;
    # off: the measured figures and open question in docs/engine-live.md, "Fewer wasted steps").
    note_share: bool = False
    # Nice value added to the decode workers' threads: they yield a core to the event loop and
    # the send clock when those wake (docs/engine-live.md, "Decode workers").
    decode_nice: int = Field(5, ge=0, le=19)
    # Context each session keeps (None: the model's). Attention over it is most of a batched
    # step at long contexts (BENCHMARKS.md, engine): fewer tokens serve more live sessions in
    # real time, each hearing less of the past. Sessions slide at it (to half of it).
    context_tokens: int | None = Field(None, ge=256, le=1 << 20)
    token: SecretStr | None = None  # Bearer token for HTTP, ?token= for the WebSocket
    # Serve a non-loopback address without a token anyway (only for a container whose port
    # publishing is decided outside it, e.g. the Docker image; logged as a warning).
    allow_open: bool = False
    max_upload_bytes: int = Field(4 * 1024 * 1024, ge=1024)  # MIDI uploads larger: 413
    max_generate_seconds: float = Field(120.0, gt=0)  # longest continuation / accompaniment
    max_infill_seconds: float = Field(60.0, gt=0)  # longest infill gap
    max_accompany_seconds: float = Field(600.0, gt=0)  # longest melody to accompany
    # no generated note sounds longer (a guard against notes the model never ends)
    max_note_seconds: float = Field(8.0, gt=0, le=60)
    log_level: str = "info"

    @field_validator("token")
    @classmethod
    def _token_not_blank(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().strip():
            raise ValueError("token must not be empty (or blank): leave it unset for no token")
        return v

    def check_bind(self) -> None:
        """Refuse to serve beyond this machine without a token."""
        if self.token is None and not is_loopback(self.host) and not self.allow_open:
            raise ValueError(
                f"refusing to bind {self.host} without a token: anyone on the network could use "
                "the server. Set --token SECRET (or IMPROV_TOKEN), or bind 127.0.0.1."
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: could resolve anywhere
        return False
