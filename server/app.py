"""The FastAPI application: `create_app(settings)`; the engine loads once in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from . import realtime
from .admission import IntakeLimit
from .auth import redact_server_logs
from .memory import tune_malloc
from .runtime import Runtime
from .settings import Settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    """The app. `runtime`: an already loaded one (tests, benchmarks); else loaded from
    `settings.checkpoint` at startup and closed at shutdown."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redact_server_logs()  # uvicorn's loggers are configured by now: no token in them
        tune_malloc()  # large requests' memory goes back (server/memory.py)
        rt = runtime or Runtime.load(settings)
        app.state.runtime = rt
        # This thread runs the event loop: every live message goes out from it.
        loop_priority = realtime.promote("the event loop") if settings.realtime else None
        try:
            yield
        finally:
            await rt.close_connections("shutdown")
            realtime.restore(loop_priority)
            if runtime is None:
                rt.close()

    from .http import api, public, ws_router
    from .metrics import router as metrics_router

    app = FastAPI(
        title="improv",
        summary="Realtime MIDI improvisation: continue, infill, accompany, live sessions.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_middleware(IntakeLimit)  # a few generation requests read and planned at once
    app.include_router(public)
    app.include_router(metrics_router)
    app.include_router(api)
    app.include_router(ws_router)
    _mount_page(app)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default body, plus one readable line with the valid range.
        errors = exc.errors()
        lines = [f"{'.'.join(str(x) for x in e['loc'][1:])}: {e['msg']}" for e in errors[:5]]
        return JSONResponse(
            {"detail": "; ".join(lines), "errors": _jsonable(errors)}, status_code=422
        )

    return app


def _jsonable(errors: list) -> list:
    return [
        {k: (v if k in ("loc", "msg", "type") else str(v)) for k, v in e.items()} for e in errors
    ]


def _mount_page(app: FastAPI) -> None:
    """The browser page (server/static, no build step) at `/`, its files under /static."""
    from pathlib import Path

    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    static = Path(__file__).parent / "static"
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(static / "index.html", headers={"Cache-Control": "no-cache"})
