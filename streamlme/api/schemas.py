"""Request and response bodies of the HTTP API (they make its OpenAPI schema).

Response shapes are public contracts, like the CLI's JSON: an effect is exactly the line of
``streamlme effect --json``; add fields, never rename them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from streamlme.store.keys import MAX_GROUP_BYTES

#: Most groups one ``POST /v1/groups/effects`` may ask for.
MAX_BATCH = 1000

GroupId = Annotated[str, Field(min_length=1, max_length=MAX_GROUP_BYTES,
                               description=f"Any string of 1 to {MAX_GROUP_BYTES} UTF-8 bytes.",
                               examples=["A17"])]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class Effect(BaseModel):
    """A group's random effects under the current model (the `streamlme effect --json` line)."""

    group: str
    n: float = Field(description="Weight mass seen (events, after any forgetting).")
    effect: dict[str, float] = Field(description="Conditional mode of each random term.")
    cov: list[list[float]] = Field(description="Conditional covariance Var(b_j - b).")
    shrinkage: float = Field(description="Reliability of the first random term, 0 to 1.")
    model_version: int
    known: bool = Field(description="False for a group never seen: zeros and the prior G.")


class TermEffect(Effect):
    """One level's effect for a named term (the `streamlme effect --term T --json` line):
    the fields of a group's effect (``group`` holds the level) and what identifies the term."""

    term: str = Field(description="The grouping factor as the formula writes it, e.g. "
                                  "'hospital:doctor'; every term on it answers together.")
    level: str = Field(description="The level; an interaction's parts joined with ':'.")
    cells: int = Field(description="Cells (combinations of grouping levels) carrying the level.")
    solution: str = Field(description='"exact": the BLUP from current statistics (one term, '
                                      'nested terms); "gauss_seidel": crossed terms, updated from '
                                      "the level's own statistics given the other factors' "
                                      "effects of the last refresh.")


class EffectsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    groups: list[GroupId] = Field(min_length=1, max_length=MAX_BATCH)


class GroupError(BaseModel):
    """A group of a many-groups request that has no answer, in its place in the list."""

    group: str
    error: str = Field(description='A stable code: "bad_statistics" (the group\'s statistics '
                                   "are not finite).")
    message: str = Field(description="What is wrong and what to do.")


class Effects(BaseModel):
    effects: list[Effect | GroupError] = Field(
        description="One per group asked, in the order asked: an effect, or that group's "
                    "error (the others are answered).")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group: GroupId
    row: dict[str, Finite] = Field(
        description="Covariate values of the new row; every fixed and random covariate is needed.",
        examples=[{"age": 61.0}])
    level: float = Field(0.95, gt=0.0, lt=1.0, description="Coverage of the interval.")


def predict_request_for(covariates: Sequence[str]) -> type[PredictRequest]:
    """A `PredictRequest` whose ``row`` names the model's covariates, each required and finite.

    The schema then tells clients (and schemathesis) what a row needs; other keys are allowed
    and ignored, so a stored event can be sent as it is.
    """
    fields: dict[str, Any] = {
        f"c{i}": (Finite, Field(alias=name)) for i, name in enumerate(covariates)}
    row = create_model("Row", __config__=ConfigDict(extra="allow"), **fields)
    return create_model("PredictRequest", __base__=PredictRequest,
                        row=(row, Field(description="The new row's covariates.")))


class Prediction(BaseModel):
    group: str
    prediction: float = Field(description="x'beta + z'b_j.")
    fixed: float = Field(description="The fixed part x'beta.")
    random: float = Field(description="The group part z'b_j.")
    se: float = Field(description="Standard error of a new observation.")
    lower: float
    upper: float
    level: float
    model_version: int
    known: bool


class OffsetGap(BaseModel):
    """Offsets ``from`` up to (not including) ``to`` of a partition that the statistics lack."""

    topic: str
    partition: int
    from_: int = Field(alias="from")
    to: int
    events: int = Field(description="Offsets in the gap (an upper bound of the events lost).")
    recorded_at: str | None = Field(description="When it was recorded (ISO 8601).")


class Model(BaseModel):
    """A model version: the fields of `streamlme fit --json` plus version and created_at."""

    model_config = ConfigDict(extra="allow")

    version: int
    created_at: float
    method: str
    converged: bool
    fixed: list[str]
    random: list[str]
    beta: dict[str, float]
    G: list[list[float]]
    sigma2: float
    created_at_iso: str = Field(description="created_at in ISO 8601 (UTC).")
    gaps: list[OffsetGap] = Field(
        description="Offset ranges the statistics lacked when this model was fitted (accepted "
                    'as lost under [kafka] on_gap = "record"): the model does not cover those '
                    "events.")
    complete: bool = Field(description="True when this model's statistics lacked no offsets.")
    namespace_gaps: list[OffsetGap] = Field(
        description="The offset gaps the namespace records now (what a fit made now lacks).")
    pinned: bool = Field(description="True when this version is pinned by "
                                     "`streamlme model --rollback`.")
    pinned_version: int | None = Field(description="The pinned version, null if none.")


class ModelVersion(BaseModel):
    version: int
    created_at: float
    created_at_iso: str
    method: str
    converged: bool
    criterion: float | None
    n_obs: float
    n_groups: int


class ModelVersions(BaseModel):
    current: int | None = Field(description="The version queries use; null before any refresh.")
    pinned: int | None = Field(description="The version `streamlme model --rollback` pinned "
                                           "(the refresher writes no new one); null if none.")
    versions: list[ModelVersion] = Field(description="Stored versions, oldest first.")


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str = Field(description='"ready" or "not_ready".')
    model_version: int | None = None
    reason: str | None = None
    flag: str | None = Field(None, description='While the namespace is flagged: "rebuilding" '
                                               'or "lost".')
    since: str | None = Field(None, description="When it was flagged (ISO 8601).")


class Error(BaseModel):
    error: str = Field(description="A stable code, e.g. invalid_request, model_not_ready.")
    message: str = Field(description="What is wrong and what to do.")
    detail: list[dict[str, Any]] | None = Field(None, description="Per-field validation errors.")
