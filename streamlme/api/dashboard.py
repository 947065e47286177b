"""The dashboard: a page at ``GET /`` and the two routes it draws from besides the API's own.

=====================================  =========================================================
``GET  /``                             the page (no token needed to load it; its calls need one)
``GET  /static/{file}``                its script and style sheet
``GET  /v1/status``                    ingest totals, rate and lag, live consumers, model age,
                                       the namespace's health (flag, gaps) and the pin
``GET  /v1/plots/{kind}.png``          shrinkage, caterpillar or trace plot of the store now
=====================================  =========================================================

The page is plain HTML with one script and no outside assets (it works offline). It asks for
``/v1/status`` every few seconds, ``/v1/model`` when the version changes, the plots when the
version changes or they are a minute old, and a group's effect on search. With a token
configured, open ``/?token=<token>`` once (the page keeps it in the browser's localStorage and
drops it from the address bar) or paste it into the page's token box.

A plot is drawn server-side (`streamlme.plots.store_figure`) from every group's statistics,
which costs time in proportion to the number of groups, so each PNG is kept per model version
for `PLOT_TTL` seconds and drawn off the event loop, one drawing at a time. Groups whose
statistics are not finite are left out of a plot, and its title says which.

Times in ``/v1/status`` are unix seconds (the contract's ``time``, ``started_at``,
``updated_at``) with an ISO 8601 twin (``time_iso``, ``started_at_iso``, ...); the namespace's
own times are ISO 8601.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.
import asyncio
import enum
import io
import json
import threading
import time
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.params import Depends
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from streamlme.api import errors
from streamlme.api.schemas import Error, OffsetGap
from streamlme.client import Client, ModelNotReady
from streamlme.status import read_status
from streamlme.store.health import ModelKey, iso_time

#: Seconds a drawn plot is served again before it is redrawn (within one model version).
PLOT_TTL = 30.0
STATIC = files("streamlme.api").joinpath("static")
# The page runs only its own script and talks only to this server.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class PlotKind(str, enum.Enum):
    shrinkage = "shrinkage"
    caterpillar = "caterpillar"
    trace = "trace"


class ConsumerInfo(BaseModel):
    consumer: str = Field(description="The consumer's id (host-pid unless configured).")
    events_read: int
    events_applied: int
    events_rejected: int
    batches: int
    lag: int | None = Field(description="Messages behind the partitions' ends; null if unknown.")
    rate: float = Field(description="Events applied per second lately (0 once it is quiet).")
    interval: float = Field(description="Seconds between its last two reports (batches, or "
                                        "heartbeats while idle).")
    started_at: float
    updated_at: float
    started_at_iso: str
    updated_at_iso: str = Field(description="Its last report (a batch, or a heartbeat while "
                                            "idle), ISO 8601.")
    age_s: float = Field(description="Seconds since its last report.")


class NamespaceHealth(BaseModel):
    epoch: str | None = Field(description="Drawn when the namespace was created; a reset "
                                          "namespace has a new one.")
    created_at: str | None
    flag: str | None = Field(description='"rebuilding" or "lost" while its statistics must '
                                         "not be served; null when healthy.")
    reason: str | None = Field(description="Why it is flagged, and what to do.")
    since: str | None = Field(description="When it was flagged (ISO 8601).")
    gaps: list[OffsetGap] = Field(description="Offsets the statistics lack: the model does "
                                              "not cover them.")


class Status(BaseModel):
    events_total: int = Field(description="Events applied by every consumer, all time.")
    events_rejected_total: int = Field(description="Events dead-lettered, all time.")
    ingest_rate: float = Field(description="Events applied per second, all live consumers.")
    lag: int | None = Field(description="Sum of the live consumers' lag; null if none knows.")
    consumers: list[ConsumerInfo] = Field(description="Consumers seen in the last minute.")
    model_version: int | None
    model_age_s: float | None = Field(description="Seconds since the current model was fit.")
    model_created_at_iso: str | None
    pinned_version: int | None = Field(description="The model version pinned by `streamlme "
                                                   "model --rollback`; null if none.")
    groups: int = Field(description="Groups with statistics in the store now.")
    ready: bool = Field(description="False while the namespace is flagged (see namespace).")
    namespace: NamespaceHealth
    time: float = Field(description="The server's clock (unix seconds).")
    time_iso: str


class _PlotCache:
    """PNG bytes per kind, valid for one model version and `PLOT_TTL` seconds."""

    def __init__(self) -> None:
        self.entries: dict[PlotKind, tuple[ModelKey | None, float, bytes]] = {}
        self.locks = {k: asyncio.Lock() for k in PlotKind}
        # matplotlib's Agg renderer is not meant for concurrent use of shared state.
        self.draw_lock = threading.Lock()

    def fresh(self, kind: PlotKind, key: ModelKey | None) -> bytes | None:
        entry = self.entries.get(kind)
        if entry is None or entry[0] != key or time.monotonic() - entry[1] > PLOT_TTL:
            return None
        return entry[2]

    def draw(self, kind: PlotKind, store: Any) -> bytes:
        from streamlme.plots import store_figure

        with self.draw_lock:
            fig = store_figure(kind.value, store)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()


def _json_response(obj: Any) -> Response:
    body = json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    return Response(body.encode(), media_type="application/json")


def _png(data: bytes, version: int | None) -> Response:
    return Response(data, media_type="image/png", headers={
        "Cache-Control": f"private, max-age={int(PLOT_TTL)}",
        "X-Model-Version": str(version or 0)})


def _consumer(record: dict[str, Any]) -> dict[str, Any]:
    """A consumer's record with its times in ISO 8601 beside the unix seconds."""
    return {**record, "started_at_iso": iso_time(record["started_at"]),
            "updated_at_iso": iso_time(record["updated_at"])}


def router(client: Client, auth: Depends) -> APIRouter:
    """The dashboard's routes over ``client``; ``auth`` guards its data routes, not the page."""
    cache = _PlotCache()
    page = STATIC.joinpath("index.html").read_bytes()
    routes = APIRouter()
    guarded = APIRouter(dependencies=[auth], responses={
        401: {"model": Error, "description": "Missing or wrong bearer token."},
        503: {"model": Error, "description": "The store cannot answer, or the namespace is "
                                             "flagged (namespace_not_ready)."}})

    @routes.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": _CSP,
                                           "X-Content-Type-Options": "nosniff",
                                           "Cache-Control": "no-cache"})

    @guarded.get("/v1/status", response_model=Status,
                 summary="Ingest totals, rate and lag, live consumers, model version and age")
    async def status() -> Response:
        now = time.time()
        ingest = read_status(client.store, now)
        health = client.store.health()
        try:
            model = client.model()
        except ModelNotReady:
            version, age, created = None, None, None
        else:
            version, age, created = model.version, max(now - model.created_at, 0.0), \
                model.created_at
        return _json_response({
            "events_total": ingest.events_total,
            "events_rejected_total": ingest.events_rejected_total,
            "ingest_rate": ingest.ingest_rate,
            "lag": ingest.lag,
            "consumers": [_consumer(c.to_dict(now)) for c in ingest.consumers],
            "model_version": version,
            "model_age_s": age,
            "model_created_at_iso": iso_time(created),
            "pinned_version": client.store.pinned_model(),
            "groups": client.store.n_groups(),
            "ready": health.ready,
            "namespace": health.to_dict(),
            "time": now,
            "time_iso": iso_time(now),
        })

    @guarded.get("/v1/plots/{kind}.png", response_class=Response,
                 summary="A plot of the current model and every group's statistics (PNG)",
                 responses={200: {"content": {"image/png": {}}},
                            404: {"model": Error, "description": "No such route."},
                            409: {"model": Error,
                                  "description": "Nothing to plot yet (no model or no groups)."}})
    async def plot(kind: PlotKind) -> Response:
        from streamlme.plots import PlotError

        client.check_ready()  # a flagged namespace's statistics are not drawn either
        key = client.model_key()  # by epoch too: a reset store repeats versions
        version = key.version if key is not None else None
        data = cache.fresh(kind, key)
        if data is not None:
            return _png(data, version)
        async with cache.locks[kind]:  # one drawing per kind; the waiters take its result
            data = cache.fresh(kind, key)
            if data is None:
                try:
                    data = await run_in_threadpool(cache.draw, kind, client.store)
                except PlotError as exc:
                    raise errors.ApiError(409, "nothing_to_plot", str(exc)) from None
                cache.entries[kind] = (key, time.monotonic(), data)
        return _png(data, version)

    routes.include_router(guarded)
    return routes


def install(app: FastAPI, client: Client, auth: Depends) -> None:
    """Add the page, its static files and its data routes to ``app``."""
    app.include_router(router(client, auth))
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
