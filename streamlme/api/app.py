"""The HTTP API: group effects, predictions and models over `streamlme.client.Client`.

``streamlme serve --config FILE`` runs `serve` (one uvicorn process); `create_app` builds the
ASGI app for tests or another server setup.

Routes (all JSON; errors are `streamlme.api.schemas.Error` bodies, see `streamlme.api.errors`):

=========================================  ================================================
``GET  /v1/groups/{group}/effect``         one group's effect (the ``streamlme effect`` line)
``POST /v1/groups/effects``                many: ``{"groups": [...]}``, one round trip
``GET  /v1/terms/{term}/levels/{level}/    one level of a named term (several-term models;
effect``                                   ``streamlme effect LEVEL --term T``)
``POST /v1/predict``                       ``{"group", "row", "level"}``: prediction, interval
``GET  /v1/model[?version=V]``             the current (or a stored) model version
``GET  /v1/model/versions``                stored versions, oldest first
``GET  /healthz``, ``GET /readyz``         alive; ready = store answers and a model exists
``GET  /metrics``                          Prometheus text (`streamlme.metrics`)
``GET  /openapi.json``, ``GET /docs``      the schema and its browsable form
``GET  /``, ``GET /v1/status``, plots      the dashboard (`streamlme.api.dashboard`)
=========================================  ================================================

Before any route runs, `streamlme.api.guard.RequestGuard` answers a request without the token
401 and a body over ``[api] max_request_bytes`` 413, without reading the body.

A group id may hold any characters: percent-encode it in the path (``/`` as ``%2F``); the
route takes the rest of the path up to ``/effect``, and so does a term's level. A term is named
by its grouping factor as the formula writes it (``doctor`` also finds ``hospital:doctor`` when
no term is on ``doctor`` alone); an unknown one is a 404 whose ``detail`` lists the model's
terms. The group routes answer one-term models on one grouping column; for other models they
are a 422 ``term_required``. With a token (``[api] token`` or
``STREAMLME_API_TOKEN``), every route but the two health checks needs the header
``Authorization: Bearer <token>``. The dashboard page ``GET /`` loads without it; its data
calls send it.

Handlers are coroutines that call the synchronous Client directly on the event loop. A query
is one Redis round trip of about 0.1 ms; handing it to a worker thread (FastAPI's default for
plain functions) or going through redis.asyncio was measured here at half the throughput and a
longer tail. The price: while Redis stalls, the loop waits too, so the API's Redis timeout is
kept short (`REDIS_TIMEOUT`) and a stalled store turns into quick 503s.

`serve` starts whether Redis answers or not: ``/healthz`` answers at once, ``/readyz`` is 503
"waiting for Redis at HOST:PORT" until it does, and a namespace holding statistics of other
columns than the model's is refused (at start-up, or when Redis first answers) with the same
line as ``consume``. ``/readyz`` is also 503 while the namespace is flagged (rebuilding, or
state lost: `streamlme.store.health`), with the flag's reason.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime,
# and those of closures name local objects (the security scheme) that string annotations lose.
import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Security
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.convertors import Convertor, register_url_convertor

from streamlme import __version__
from streamlme.api import dashboard, errors, schemas
from streamlme.api.guard import TOKEN_ENV, RequestGuard
from streamlme.client import BadStatisticsError, Client, ModelNotReady, NamespaceNotReady
from streamlme.config import ApiConfig, Config
from streamlme.metrics import CONTENT_TYPE, MODEL_AGE, MODEL_VERSION, QUERY_LATENCY, metrics_text
from streamlme.spec import ModelSpec
from streamlme.store.errors import StoreError
from streamlme.store.health import iso_time
from streamlme.store.redis import RedisStore

log = logging.getLogger(__name__)

#: Seconds the API waits for Redis (connect, each reply) before answering 503.
REDIS_TIMEOUT = 1.0
#: Largest request body by default (``[api] max_request_bytes``).
MAX_REQUEST_BYTES = ApiConfig().max_request_bytes
#: Longest pause between two tries while Redis does not answer at start-up.
WAIT_MAX = 5.0

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": schemas.Error, "description": "A body that cannot be parsed."},
    401: {"model": schemas.Error, "description": "Missing or wrong bearer token."},
    413: {"model": schemas.Error, "description": "Body over the server's max_request_bytes."},
    422: {"model": schemas.Error, "description": "Invalid request, or a group whose "
                                                 "statistics are not finite (bad_statistics)."},
    503: {"model": schemas.Error, "description": "No model yet, the store cannot answer, or "
                                                 "the namespace is flagged."},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": schemas.Error, "description": "No such model version."}}
_NO_TERM: dict[int | str, dict[str, Any]] = {
    404: {"model": schemas.Error, "description": "No random-effect term on that factor; "
                                                 "``detail`` lists the model's terms."}}


class _GroupConvertor(Convertor[str]):
    """Like Starlette's ``path`` (slashes allowed), and newlines too: any group id routes."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("group", _GroupConvertor())


def _json(obj: Any, status: int = 200) -> Response:
    # Bodies are built here, not re-validated by FastAPI: the shapes are the schemas' by
    # construction, and skipping pydantic keeps a query's cost near the store round trip.
    body = json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    return Response(body.encode(), status_code=status, media_type="application/json")


def _bearer() -> Any:
    """A dependency that declares the bearer scheme in the OpenAPI schema; `RequestGuard`
    has already answered 401 to a request without the token, before its body was read."""
    scheme = HTTPBearer(auto_error=False, description="Required when the server has a token.")

    async def declared(credentials: Annotated[HTTPAuthorizationCredentials | None,
                                              Security(scheme)]) -> None:
        return None

    return declared


class Readiness:
    """Whether the store has answered yet, and what stops the app for good.

    ``where`` names the store in messages ("Redis at host:port"); ``check`` (run when Redis
    first answers) raises StoreError for a namespace the model cannot use.
    """

    def __init__(self, where: str = "the store",
                 check: Callable[[], None] | None = None) -> None:
        self.where = where
        self.check = check
        self.checked = check is None
        self.fatal: str | None = None
        self.on_fatal: Callable[[], None] = lambda: None

    def try_check(self) -> bool:
        """Run the check once: True when it passed, False while the store does not answer;
        a refused namespace raises StoreError (and is remembered as ``fatal``)."""
        if self.checked or self.check is None:
            return True
        try:
            self.check()
        except StoreError as exc:
            self.fatal = str(exc)
            raise
        except errors.STORE_ERRORS:
            return False
        self.checked = True
        return True

    async def wait(self) -> None:
        """Try the check with backoff until Redis answers; log while it does not."""
        delay = 0.25
        while True:
            try:
                if await asyncio.to_thread(self.try_check):
                    log.info("%s answers; serving", self.where)
                    return
            except StoreError as exc:
                log.error("%s", exc)
                self.on_fatal()
                return
            log.warning("waiting for %s (next try in %.1f s)", self.where, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, WAIT_MAX)


def _pinned(client: Client) -> int | None:
    """The model version ``streamlme model --rollback`` pinned, None if none is."""
    return client.store.pinned_model()


def build_app(client: Client, token: str | None = None, spec: ModelSpec | None = None,
              *, max_request_bytes: int = MAX_REQUEST_BYTES,
              readiness: Readiness | None = None) -> FastAPI:
    """The app over an existing Client; ``token`` None means no authentication.

    With the model's ``spec``, the schema of ``POST /v1/predict`` names the covariates a row
    needs; without it a row is any map of names to numbers. Bodies over ``max_request_bytes``
    are answered 413. ``readiness`` says where the store is and what to check when it first
    answers (`create_app` gives one for a configuration's Redis).
    """
    predict_request = (schemas.predict_request_for(spec.covariates) if spec is not None
                       else schemas.PredictRequest)
    ready = readiness or Readiness()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None if ready.checked else asyncio.create_task(ready.wait())
        yield
        if task is not None:
            task.cancel()

    app = FastAPI(
        title="streamlme", version=__version__, openapi_url=None, docs_url=None, redoc_url=None,
        description="Group effects on demand from a linear mixed model kept live over an "
                    "event stream.", lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(RequestGuard, token=token, max_bytes=max_request_bytes)
    app.state.client = client
    app.state.readiness = ready
    guarded = APIRouter(dependencies=[Depends(_bearer())], responses=_ERRORS)

    @guarded.get("/v1/groups/{group:group}/effect", response_model=schemas.Effect,
                 summary="One group's current effect")
    async def group_effect(
        group: Annotated[str, Path(description="The group id, percent-encoded.", min_length=1)],
    ) -> Response:
        start = time.perf_counter()
        eff = client.effect(group)
        QUERY_LATENCY.labels("effect").observe(time.perf_counter() - start)
        return _json(eff.to_dict())

    @guarded.get("/v1/terms/{term}/levels/{level:group}/effect",
                 response_model=schemas.TermEffect, responses=_NO_TERM,
                 summary="One level's current effect for a named term")
    async def term_effect(
        term: Annotated[str, Path(description="The grouping factor, as the formula writes it "
                                              "(e.g. doctor or hospital:doctor).",
                                  min_length=1)],
        level: Annotated[str, Path(description="The level, percent-encoded; an interaction's "
                                               "parts joined with ':'.", min_length=1)],
    ) -> Response:
        start = time.perf_counter()
        eff = client.term_effect(term, level)
        QUERY_LATENCY.labels("term_effect").observe(time.perf_counter() - start)
        return _json(eff.to_dict())

    @guarded.post("/v1/groups/effects", response_model=schemas.Effects,
                  summary="Many groups' effects, in the order asked; a group that cannot be "
                          "answered gets its own error in its place")
    async def group_effects(body: schemas.EffectsRequest) -> Response:
        start = time.perf_counter()
        effects = client.effects(body.groups, errors="report")
        QUERY_LATENCY.labels("effects").observe(time.perf_counter() - start)
        return _json({"effects": [e.to_dict() for e in effects]})

    @guarded.post("/v1/predict", response_model=schemas.Prediction,
                  summary="Predict a new row of a group, with an interval")
    async def predict(body: predict_request) -> Response:  # type: ignore[valid-type]
        start = time.perf_counter()
        row = body.row if isinstance(body.row, dict) else body.row.model_dump(by_alias=True)
        try:
            pred = client.predict(body.group, row, body.level)
        except ValueError as exc:
            if isinstance(exc, (errors.KeyNameError, BadStatisticsError)):
                raise
            raise errors.ApiError(422, "invalid_row", str(exc)) from None
        QUERY_LATENCY.labels("predict").observe(time.perf_counter() - start)
        return _json(pred.to_dict())

    @guarded.get("/v1/model", response_model=schemas.Model, responses=_NOT_FOUND,
                 summary="The current model version, or a stored one")
    async def model(version: Annotated[int | None, Query(ge=1, le=2**62)] = None) -> Response:
        rec = client.model(version)
        health = client.store.health()
        pinned = _pinned(client)
        # the record's own gaps say what this model lacks; the namespace's, what the next fit will
        return _json({**rec.to_dict(), "namespace_gaps": [g.to_dict() for g in health.gaps],
                      "pinned": pinned == rec.version, "pinned_version": pinned})

    @guarded.get("/v1/model/versions", response_model=schemas.ModelVersions,
                 summary="Stored model versions, oldest first")
    async def model_versions() -> Response:
        versions = []
        for v in client.model_versions():
            try:
                rec = client.model(v)
            except errors.ModelVersionNotFoundError:
                continue  # trimmed from the history between the two reads
            fit = rec.fit
            versions.append({
                "version": v, "created_at": rec.created_at,
                "created_at_iso": iso_time(rec.created_at), "method": fit["method"],
                "converged": rec.converged, "criterion": fit.get("criterion"),
                "n_obs": fit.get("n_obs", 0), "n_groups": fit.get("n_groups", 0)})
        return _json({"current": client.current_version(), "pinned": _pinned(client),
                      "versions": versions})

    @guarded.get("/metrics", response_class=Response, summary="Prometheus metrics",
                 responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        try:
            rec = client.model()
        except (ModelNotReady, *errors.STORE_ERRORS):
            MODEL_VERSION.set(0)
        else:
            MODEL_VERSION.set(rec.version)
            MODEL_AGE.set(max(time.time() - rec.created_at, 0.0))
        return Response(metrics_text(), media_type=CONTENT_TYPE)

    @guarded.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @guarded.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="streamlme API")

    @app.get("/healthz", response_model=schemas.Health, summary="The process is alive")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz", response_model=schemas.Ready, summary="Store answers and a model exists",
             responses={503: {"model": schemas.Ready, "description": "Not ready, with why."}})
    async def readyz() -> Response:
        if ready.fatal is not None:
            return _json({"status": "not_ready", "reason": ready.fatal}, 503)
        try:
            client.ping()
            version = client.current_version()
            health = client.store.health()
        except errors.STORE_ERRORS as exc:
            return _json({"status": "not_ready",
                          "reason": f"waiting for {ready.where}: unreachable ({exc})"}, 503)
        if not health.ready:
            return _json({"status": "not_ready", "reason": str(NamespaceNotReady(health)),
                          "flag": health.flag, "since": iso_time(health.since)}, 503)
        if version is None:
            return _json({"status": "not_ready",
                          "reason": "no model yet; run `streamlme refresh`"}, 503)
        return _json({"status": "ready", "model_version": version})

    app.include_router(guarded)
    dashboard.install(app, client, Depends(_bearer()))
    return app


def api_token(config: Config) -> str | None:
    """The configured token: ``[api] token``, else ``STREAMLME_API_TOKEN``; None if neither."""
    return config.api.token or os.environ.get(TOKEN_ENV) or None


def namespace_check(client: Client, spec: ModelSpec) -> Callable[[], None]:
    """What `serve` checks when Redis answers: the namespace holds statistics of the model's
    columns (the StoreError of `RedisStore` otherwise, the line ``consume`` prints)."""
    def check() -> None:
        store = client.store
        if isinstance(store, RedisStore):
            RedisStore(store.client, store.namespace, d=len(spec.columns), columns=spec.columns,
                       retry_seconds=REDIS_TIMEOUT)
    return check


def create_app(config: Config) -> FastAPI:
    """The app for a configuration (its store, its token, its request size limit)."""
    client = Client(config, timeout=REDIS_TIMEOUT)
    r = config.redis
    readiness = (Readiness(f"Redis at {r.safe_url}", namespace_check(client, config.spec))
                 if r is not None else Readiness())
    return build_app(client, api_token(config), config.spec,
                     max_request_bytes=config.api.max_request_bytes, readiness=readiness)


def serve(config: Config, access_log: bool = False) -> None:
    """Run the API with uvicorn on ``[api] host`` and ``port`` until interrupted.

    Raises StoreError (nothing served) for a namespace of other columns than the model's,
    found at start-up or when Redis first answers; while Redis does not answer it serves
    ``/healthz`` and a 503 ``/readyz`` and logs "waiting for Redis at ...".
    """
    import uvicorn

    app = create_app(config)
    ready: Readiness = app.state.readiness
    if not ready.try_check():  # StoreError: refused before the port is bound
        log.warning("waiting for %s; serving /healthz meanwhile", ready.where)
    server = uvicorn.Server(uvicorn.Config(app, host=config.api.host, port=config.api.port,
                                           access_log=access_log, log_level="info"))
    ready.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    if ready.fatal is not None:
        raise StoreError(ready.fatal)
