"""ModelSpec: which columns make the response, the fixed part, the random part and the groups.

A spec is the lme4 formula ``response ~ fixed + (random | group)`` written as data:

>>> spec = ModelSpec(response="Reaction", fixed=["1", "Days"], random=["1", "Days"],
...                  group="Subject")
>>> spec.formula
'Reaction ~ 1 + Days + (1 + Days | Subject)'
>>> spec.columns                 # the statistics' columns: covariates, then the response
('Days', 'Reaction')
>>> ModelSpec(response="y", fixed=[], random=["1"], group="g")
Traceback (most recent call last):
...
streamlme.spec.SpecError: fixed: the fixed part is empty; give at least "1" for an intercept
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

INTERCEPT = "1"
INTERCEPT_NAME = "(Intercept)"
COVARIANCES = ("unstructured", "diagonal")
METHODS = ("REML", "ML", "EM")


class SpecError(ValueError):
    """A model specification that cannot describe a linear mixed model."""


def term_name(term: str) -> str:
    """The name a term has in results: ``"1"`` is lme4's ``(Intercept)``."""
    return INTERCEPT_NAME if term == INTERCEPT else term


@dataclass(frozen=True)
class ModelSpec:
    """A linear mixed model with one grouping factor.

    Parameters
    ----------
    response
        Column holding y.
    fixed
        Fixed-effect terms: ``"1"`` for the intercept, otherwise column names.
    random
        Random-effect terms per group, same notation.
    group
        Column holding the group id.
    covariance
        ``"unstructured"`` (lme4 ``(1 + x | g)``) or ``"diagonal"`` (lme4 ``(1 + x || g)``).
    method
        Default estimation method: ``"REML"``, ``"ML"`` or ``"EM"``.
    """

    response: str
    fixed: tuple[str, ...]
    random: tuple[str, ...]
    group: str
    covariance: str = "unstructured"
    method: str = "REML"
    columns: tuple[str, ...] = field(init=False)

    def __init__(
        self,
        response: str,
        fixed: Sequence[str],
        random: Sequence[str],
        group: str,
        covariance: str = "unstructured",
        method: str = "REML",
    ) -> None:
        set_ = object.__setattr__
        set_(self, "response", _name("response", response))
        set_(self, "fixed", _terms("fixed", fixed))
        set_(self, "random", _terms("random", random))
        set_(self, "group", _name("group", group))
        set_(self, "covariance", covariance)
        set_(self, "method", method.upper() if isinstance(method, str) else method)
        self._validate()
        covariates: list[str] = []
        for term in (*self.fixed, *self.random):
            if term != INTERCEPT and term not in covariates:
                covariates.append(term)
        set_(self, "columns", (*covariates, self.response))

    def _validate(self) -> None:
        if not self.fixed:
            raise SpecError('fixed: the fixed part is empty; give at least "1" for an intercept')
        if not self.random:
            raise SpecError('random: no random terms; give at least "1" for a random intercept')
        if self.covariance not in COVARIANCES:
            raise SpecError(
                f"covariance: {self.covariance!r} is not one of {', '.join(COVARIANCES)}"
            )
        if self.method not in METHODS:
            raise SpecError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        for part in ("fixed", "random"):
            terms = getattr(self, part)
            for term in terms:
                if term in (self.response, self.group):
                    raise SpecError(
                        f"{part}: {term!r} is the {'response' if term == self.response else 'group'}"
                        " column and cannot also be a term"
                    )
        if self.response == self.group:
            raise SpecError(f"group: {self.group!r} is also the response column")

    @property
    def covariates(self) -> tuple[str, ...]:
        """Columns other than the response that the statistics keep."""
        return self.columns[:-1]

    @property
    def fixed_names(self) -> list[str]:
        return [term_name(t) for t in self.fixed]

    @property
    def random_names(self) -> list[str]:
        return [term_name(t) for t in self.random]

    @property
    def formula(self) -> str:
        bar = "|" if self.covariance == "unstructured" else "||"
        return (
            f"{self.response} ~ {' + '.join(self.fixed)} "
            f"+ ({' + '.join(self.random)} {bar} {self.group})"
        )

    def check_columns(self, available: Iterable[str]) -> None:
        """Raise SpecError naming every column the data lacks."""
        have = set(available)
        missing = [c for c in (*self.columns, self.group) if c not in have]
        if missing:
            raise SpecError(
                f"unknown column(s) {', '.join(map(repr, missing))}; "
                f"the data has {', '.join(map(repr, sorted(have)))}"
            )

    def to_dict(self) -> dict[str, object]:
        return {
            "response": self.response,
            "fixed": list(self.fixed),
            "random": list(self.random),
            "group": self.group,
            "covariance": self.covariance,
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelSpec:
        known = {"response", "fixed", "random", "group", "covariance", "method"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown model key(s): {', '.join(unknown)}")
        for key in ("response", "fixed", "random", "group"):
            if key not in data:
                raise SpecError(f"{key}: missing")
        return cls(**data)  # type: ignore[arg-type]


def _name(what: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{what}: expected a non-empty column name, got {value!r}")
    return value.strip()


def _terms(what: str, terms: object) -> tuple[str, ...]:
    if isinstance(terms, str):
        terms = [t for t in terms.split(",") if t.strip()]
    if not isinstance(terms, Sequence):
        raise SpecError(f"{what}: expected a list of terms, got {terms!r}")
    out: list[str] = []
    for term in terms:
        name = _name(what, term)
        if name == "0":
            raise SpecError(f'{what}: "0" (no intercept) is written by leaving "1" out')
        if name in out:
            raise SpecError(f"{what}: term {name!r} appears twice")
        out.append(name)
    return tuple(out)
