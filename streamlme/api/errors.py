"""Every failure as a JSON `Error` body with a 4xx or 503 status, never a bare 500.

=======================================  ======  ===================
raised                                   status  ``error``
=======================================  ======  ===================
body that is not JSON at all             400     bad_request
request that fails validation            422     invalid_request (unknown names get
                                                 "did you mean")
group id that cannot name a key          422     invalid_group
row the model cannot use (predict)       422     invalid_row
group whose statistics are not finite    422     bad_statistics (in a many-groups
                                                 request: that group's item only)
missing or wrong bearer token            401     unauthorized
body over [api] max_request_bytes        413     too_large (`streamlme.api.guard`)
model version not stored                 404     not_found
no random-effect term on the factor      404     unknown_term (``detail`` lists the terms)
group route on a several-term model      422     term_required
unknown route                            404     not_found
no model yet                             503     model_not_ready
namespace flagged (rebuilding, lost)     503     namespace_not_ready
Redis down, unreadable record            503     store_unavailable
anything else (a bug)                    500     internal_error, logged with its traceback
=======================================  ======  ===================
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from streamlme.client import (
    BadStatisticsError,
    ModelNotReady,
    ModelVersionNotFoundError,
    NamespaceNotReady,
    TermRequired,
    UnknownTermError,
    closest,
)
from streamlme.model import ModelRecordError
from streamlme.stats import StatsError
from streamlme.store.errors import KeyNameError, StoreError

log = logging.getLogger(__name__)

#: What the store raises when it cannot answer (down, timed out, holding unreadable records).
STORE_ERRORS = (redis.RedisError, StoreError, StatsError, ModelRecordError, OSError)

_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          422: "invalid_request"}


class ApiError(Exception):
    """An error with its status and code, raised by route handlers."""

    def __init__(self, status: int, error: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.headers = status, error, message, headers


def error_response(status: int, error: str, message: str, detail: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": error, "message": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(ApiError)
    def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.message, headers=exc.headers)

    @app.exception_handler(HTTPException)
    def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = _CODES.get(exc.status_code, HTTPStatus(exc.status_code).phrase.lower()
                          .replace(" ", "_"))
        return error_response(exc.status_code, code, str(exc.detail),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type")}
                  for e in exc.errors()]
        _hint_names(detail, exc.errors())
        first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        if any(e["type"] == "json_invalid" for e in detail):
            # not a body that fails a schema: no JSON at all
            return error_response(400, "bad_request", f"{where}: {first['msg']}",
                                  jsonable_encoder(detail))
        return error_response(422, "invalid_request", f"{where}: {first['msg']}",
                              jsonable_encoder(detail))

    @app.exception_handler(KeyNameError)
    def _group(request: Request, exc: KeyNameError) -> JSONResponse:
        return error_response(422, "invalid_group", str(exc))

    @app.exception_handler(BadStatisticsError)
    def _bad_stats(request: Request, exc: BadStatisticsError) -> JSONResponse:
        return error_response(422, "bad_statistics", str(exc))

    @app.exception_handler(Exception)
    def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error",
                              f"the server failed on this request ({type(exc).__name__}); "
                              "it is logged; please report it")

    @app.exception_handler(NamespaceNotReady)
    def _flagged(request: Request, exc: NamespaceNotReady) -> JSONResponse:
        return error_response(503, "namespace_not_ready", str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(ModelNotReady)
    def _not_ready(request: Request, exc: ModelNotReady) -> JSONResponse:
        return error_response(503, "model_not_ready", str(exc))

    @app.exception_handler(UnknownTermError)
    def _no_term(request: Request, exc: UnknownTermError) -> JSONResponse:
        return error_response(404, "unknown_term", str(exc), [
            {"loc": ["path", "term"], "msg": str(exc), "type": "unknown_term",
             "terms": exc.terms}])

    @app.exception_handler(TermRequired)
    def _term_required(request: Request, exc: TermRequired) -> JSONResponse:
        return error_response(422, "term_required", str(exc), [
            {"loc": ["path", "group"], "msg": str(exc), "type": "term_required",
             "terms": exc.terms}])

    @app.exception_handler(ModelVersionNotFoundError)
    def _no_version(request: Request, exc: ModelVersionNotFoundError) -> JSONResponse:
        return error_response(404, "not_found", str(exc))

    for kind in STORE_ERRORS:
        app.add_exception_handler(kind, _store_unavailable)


def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("store error on %s: %r", request.url.path, exc)
    return error_response(503, "store_unavailable",
                          f"the state store cannot answer: {exc}; check Redis and retry",
                          headers={"Retry-After": "1"})


def _hint_names(detail: list[dict[str, Any]], raw: Sequence[Any]) -> None:
    """Add "did you mean" to missing and unknown names: an unknown field is matched with the
    missing ones beside it, a missing row covariate with the row's other keys."""
    for item, e in zip(detail, raw):
        loc = tuple(e.get("loc", ()))
        if not loc or not isinstance(loc[-1], str):
            continue
        parent, name = loc[:-1], loc[-1]
        if e.get("type") == "extra_forbidden":
            missing = [str(o["loc"][-1]) for o in raw if o.get("type") == "missing"
                       and tuple(o.get("loc", ()))[:-1] == parent]
            near = closest(name, missing)
            if near is not None:
                item["msg"] += f"; did you mean {near!r}?"
        elif e.get("type") == "missing" and isinstance(e.get("input"), dict):
            near = closest(name, [k for k in e["input"] if isinstance(k, str)])
            if near is not None:
                item["msg"] += f"; did you mean {name!r} instead of {near!r}?"
