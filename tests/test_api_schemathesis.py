"""Schemathesis over the published OpenAPI schema: no request makes the server fail.

The app runs in process (ASGI) over a real Redis holding a model, with auth on; every
operation gets a bounded number of generated requests (25 valid and 25 invalid ones) and each
response must be a non-5xx whose status, content type and body the schema declares.
"""

from __future__ import annotations

import itertools

import schemathesis
from hypothesis import HealthCheck, given, settings
from query_helpers import ODD_GROUPS, make_rows, seed_store, write_config
from schemathesis import GenerationMode, checks
from schemathesis.specs.openapi import checks as openapi_checks

from streamlme.api import create_app
from streamlme.config import load_config
from streamlme.store import RedisStore

TOKEN = "schema-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [checks.not_a_server_error, openapi_checks.status_code_conformance,
          openapi_checks.content_type_conformance, openapi_checks.response_schema_conformance]


def test_no_server_errors(redis_url, namespace, tmp_path):
    store = RedisStore(redis_url, namespace)
    seed_store(store, *make_rows(31, groups=[*ODD_GROUPS, "0", "A", "g1"]))
    path = write_config(tmp_path / "c.toml", redis_url, namespace, token=TOKEN)
    app = create_app(load_config(path, env={}))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)
    # One Hypothesis run per operation, through schemathesis' strategies (its pytest plugin's
    # lazy fixture loader does not run under pytest 9).
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "GET /v1/groups/{group}/effect", "POST /v1/groups/effects", "POST /v1/predict",
        "GET /v1/model", "GET /v1/model/versions", "GET /healthz", "GET /readyz"}
    for operation, mode in itertools.product(operations, GenerationMode):
        has_input = operation.path_parameters or operation.query or operation.body
        if mode is GenerationMode.NEGATIVE and not has_input:
            continue  # nothing to make invalid

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            case.call_and_validate(headers=AUTH, checks=CHECKS)

        run()
