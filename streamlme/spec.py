"""ModelSpec: the response, the fixed part and the random-effect terms of a linear mixed model.

A spec is an lme4 formula written as data. The one-term shorthand names the columns directly:

>>> spec = ModelSpec(response="Reaction", fixed=["1", "Days"], random=["1", "Days"],
...                  group="Subject")
>>> spec.formula
'Reaction ~ 1 + Days + (1 + Days | Subject)'
>>> spec.columns                 # the statistics' columns: covariates, then the response
('Days', 'Reaction')

Several terms, nested or crossed, come from a formula (see `streamlme.formula`):

>>> spec = ModelSpec.from_formula("strength ~ 1 + (1 | batch/cask)")
>>> [t.group for t in spec.terms], spec.grouping_columns
(['batch', 'batch:cask'], ('batch', 'cask'))
>>> ModelSpec(response="y", fixed=[], random=["1"], group="g")
Traceback (most recent call last):
...
streamlme.spec.SpecError: fixed: the fixed part is empty; give at least "1" for an intercept

The unit of state is the **cell**: the combination of the levels of every grouping column an
event carries. A model with one grouping column keys its cells by the level itself (so state
written before several terms existed reads unchanged); otherwise a cell key is the JSON array of
the levels, which no level string can forge:

>>> spec.cell_key(["A", "a"]), spec.cell_levels(['["A","a"]'])
('["A","a"]', [('A', 'a')])

Design columns are what the statistics hold: a numeric column as it is, or for a categorical
covariate one indicator per level coded as lme4 codes it (treatment contrasts, the first level the
reference); an interaction is the product of its parts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

INTERCEPT = "1"
INTERCEPT_NAME = "(Intercept)"
COVARIANCES = ("unstructured", "diagonal")
METHODS = ("REML", "ML", "EM")

#: One factor of a design column: a numeric column (level None) or the indicator column == level.
Atom = tuple[str, "str | None"]


class SpecError(ValueError):
    """A model specification that cannot describe a linear mixed model."""


def term_name(term: str) -> str:
    """The name a term has in results: ``"1"`` is lme4's ``(Intercept)``."""
    return INTERCEPT_NAME if term == INTERCEPT else term


@dataclass(frozen=True)
class RandomTerm:
    """One random-effect term ``(random | factors)``: lme4's ``(1 + x | g)`` or ``(1 | g:h)``.

    ``random`` lists design-column names (``"1"`` for the intercept), ``factors`` the grouping
    columns whose interaction is the term's factor, ``covariance`` ``"unstructured"`` (``|``) or
    ``"diagonal"`` (``||``).
    """

    random: tuple[str, ...]
    factors: tuple[str, ...]
    covariance: str = "unstructured"

    def __post_init__(self) -> None:
        object.__setattr__(self, "random", _terms("random", self.random))
        factors = self.factors if not isinstance(self.factors, str) else (self.factors,)
        object.__setattr__(self, "factors", tuple(_name("group", f) for f in factors))
        if not self.random:
            raise SpecError('random: no random terms; give at least "1" for a random intercept')
        if not self.factors:
            raise SpecError("group: a random term needs a grouping factor")
        if self.covariance not in COVARIANCES:
            raise SpecError(
                f"covariance: {self.covariance!r} is not one of {', '.join(COVARIANCES)}"
            )

    @property
    def group(self) -> str:
        """The factor as lme4 writes it: ``g`` or ``g:h``."""
        return ":".join(self.factors)

    @property
    def names(self) -> list[str]:
        return [term_name(t) for t in self.random]

    @property
    def q(self) -> int:
        return len(self.random)

    def formula(self) -> str:
        """The term in lme4's notation; a term without an intercept says ``0 +``."""
        bar = "|" if self.covariance == "unstructured" else "||"
        return f"({_sum(self.random)} {bar} {self.group})"


@dataclass(frozen=True)
class ModelSpec:
    """A linear mixed model: response, fixed part and one or more random-effect terms.

    Parameters
    ----------
    response
        Column holding y.
    fixed
        Fixed-effect design columns: ``"1"`` for the intercept, otherwise column names.
    random, group, covariance
        The one-term shorthand: random terms, the grouping column, and ``"unstructured"``
        (lme4 ``(1 + x | g)``) or ``"diagonal"`` (lme4 ``(1 + x || g)``). Give these or ``terms``.
    method
        Default estimation method: ``"REML"``, ``"ML"`` or ``"EM"``.
    terms
        The random-effect terms, for models with several (see `RandomTerm`).
    levels
        Categorical covariates and their levels, first level the reference.
    design
        Design columns that are not a numeric column of that name: name -> atoms, e.g.
        ``{"sexM": (("sex", "M"),)}``; `streamlme.formula` fills it in.
    formula
        The formula the spec was read from, kept so that it prints as written.
    """

    response: str
    fixed: tuple[str, ...]
    terms: tuple[RandomTerm, ...]
    method: str = "REML"
    levels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    design: Mapping[str, tuple[Atom, ...]] = field(default_factory=dict)
    columns: tuple[str, ...] = field(init=False)
    source: str | None = field(default=None)

    def __init__(
        self,
        response: str,
        fixed: Sequence[str],
        random: Sequence[str] | None = None,
        group: str | None = None,
        covariance: str = "unstructured",
        method: str = "REML",
        *,
        terms: Sequence[RandomTerm] | None = None,
        levels: Mapping[str, Sequence[str]] | None = None,
        design: Mapping[str, Sequence[Atom]] | None = None,
        formula: str | None = None,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "response", _name("response", response))
        set_(self, "fixed", _terms("fixed", fixed))
        if terms is None:
            if random is None or group is None:
                raise SpecError("give random and group (one term), or terms")
            terms = [RandomTerm(tuple(_terms("random", random)), (_name("group", group),),
                                covariance)]
        elif random is not None or group is not None:
            raise SpecError("give random and group (one term), or terms, not both")
        set_(self, "terms", tuple(terms))
        set_(self, "method", method.upper() if isinstance(method, str) else method)
        set_(self, "levels", {str(k): _levels(k, v) for k, v in (levels or {}).items()})
        set_(self, "design", {k: tuple((c, lv) for c, lv in v) for k, v in (design or {}).items()})
        set_(self, "source", formula)
        covariates: list[str] = []
        for term in (*self.fixed, *(r for t in self.terms for r in t.random)):
            if term != INTERCEPT and term not in covariates:
                covariates.append(term)
        set_(self, "columns", (*covariates, self.response))
        self._validate()

    def _validate(self) -> None:
        if not self.fixed:
            raise SpecError('fixed: the fixed part is empty; give at least "1" for an intercept')
        if not self.terms:
            raise SpecError("random: a mixed model needs at least one random-effect term")
        if self.method not in METHODS:
            raise SpecError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method == "EM" and len(self.terms) > 1:
            raise SpecError("method: EM fits one random-effect term; use REML or ML")
        groups = set(self.grouping_columns)
        if self.response in groups:
            raise SpecError(f"group: {self.response!r} is also the response column")
        seen: set[tuple[str, tuple[str, ...]]] = set()
        for t in self.terms:
            key = (t.group, t.random)
            if key in seen:
                raise SpecError(f"random: the term {t.formula()} appears twice")
            seen.add(key)
        for part, names in (("fixed", self.fixed),
                            ("random", [r for t in self.terms for r in t.random])):
            for term in names:
                for col in self.inputs_of(term):
                    if col == self.response:
                        raise SpecError(f"{part}: {term!r} is the response column and cannot "
                                        "also be a term")
                    if col in groups:
                        raise SpecError(f"{part}: {term!r} is a grouping column and cannot "
                                        "also be a term")
        for name, atoms in self.design.items():
            for col, level in atoms:
                if level is not None and level not in self.levels.get(col, ()):
                    raise SpecError(f"design column {name!r}: {col!r} has no level {level!r}")

    def __hash__(self) -> int:
        return hash((self.response, self.fixed, self.terms, self.method,
                     tuple(self.levels.items()), tuple(self.design.items())))

    # -- the one-term view ----------------------------------------------------------------

    @property
    def random(self) -> tuple[str, ...]:
        """The first term's random effects (the whole random part of a one-term model)."""
        return self.terms[0].random

    @property
    def group(self) -> str:
        """The first term's grouping factor."""
        return self.terms[0].group

    @property
    def covariance(self) -> str:
        return self.terms[0].covariance

    @property
    def is_simple(self) -> bool:
        """One term on one grouping column, every covariate a numeric column: the model the
        one-term engine, queries and river estimator were written for."""
        return (len(self.terms) == 1 and len(self.terms[0].factors) == 1
                and not self.levels and not self.design)

    # -- columns --------------------------------------------------------------------------

    @property
    def covariates(self) -> tuple[str, ...]:
        """Design columns other than the response that the statistics keep."""
        return self.columns[:-1]

    @property
    def fixed_names(self) -> list[str]:
        return [term_name(t) for t in self.fixed]

    @property
    def random_names(self) -> list[str]:
        return [term_name(t) for t in self.random]

    @property
    def grouping_columns(self) -> tuple[str, ...]:
        """Every column that names a level, in order of first appearance."""
        out: list[str] = []
        for t in self.terms:
            out += [f for f in t.factors if f not in out]
        return tuple(out)

    def atoms(self, name: str) -> tuple[Atom, ...]:
        """What design column ``name`` multiplies together."""
        return self.design.get(name, ((name, None),))

    def inputs_of(self, name: str) -> list[str]:
        """The event columns design column ``name`` is computed from."""
        return [] if name == INTERCEPT else [c for c, _ in self.atoms(name)]

    @property
    def numeric_inputs(self) -> tuple[str, ...]:
        """Numeric event columns: the response and every column a design column multiplies."""
        out: list[str] = []
        for name in self.covariates:
            out += [c for c, lv in self.atoms(name) if lv is None and c not in out]
        return (*out, self.response)

    @property
    def categorical_inputs(self) -> tuple[str, ...]:
        out: list[str] = []
        for name in self.covariates:
            out += [c for c, lv in self.atoms(name) if lv is not None and c not in out]
        return tuple(out)

    @property
    def input_columns(self) -> tuple[str, ...]:
        """Every column an event or a data row must carry."""
        return (*self.grouping_columns, *self.categorical_inputs, *self.numeric_inputs)

    def level_codes(self, column: str, values: Sequence[object]) -> NDArray[np.intp]:
        """Index of each value among the declared levels of ``column``; -1 where undeclared."""
        where = {lv: i for i, lv in enumerate(self.levels[column])}
        return np.fromiter((where.get(str(v), -1) for v in values), dtype=np.intp,
                           count=len(values))

    def design_matrix(
        self, numeric: Mapping[str, NDArray[np.float64]],
        codes: Mapping[str, NDArray[np.intp]],
    ) -> NDArray[np.float64]:
        """The statistics' rows W (N, d) from numeric columns and categorical level codes.

        Each design column is the product of its atoms: a numeric column, or the indicator that
        a categorical column holds a level. The response is the last column.
        """
        y = np.asarray(numeric[self.response], dtype=float)
        W = np.empty((y.shape[0], len(self.columns)))
        for k, name in enumerate(self.covariates):
            col = np.ones(y.shape[0])
            for column, level in self.atoms(name):
                if level is None:
                    col = col * np.asarray(numeric[column], dtype=float)
                else:
                    col = col * (codes[column] == self.levels[column].index(level))
            W[:, k] = col
        W[:, -1] = y
        return W

    # -- cells ----------------------------------------------------------------------------

    def cell_key(self, levels: Sequence[str]) -> str:
        """The key of the cell with these levels of `grouping_columns`."""
        if len(self.grouping_columns) == 1:
            return levels[0]
        return json.dumps(list(levels), ensure_ascii=False, separators=(",", ":"))

    def cell_levels(self, keys: Iterable[str]) -> list[tuple[str, ...]]:
        """The levels of `grouping_columns` in each cell key (inverse of `cell_key`)."""
        if len(self.grouping_columns) == 1:
            return [(k,) for k in keys]
        return [tuple(json.loads(k)) for k in keys]

    def term_levels(self, term: RandomTerm, cells: Sequence[tuple[str, ...]]) -> list[str]:
        """Each cell's level of ``term``'s factor, named as lme4 names them (``A:a``)."""
        at = [self.grouping_columns.index(f) for f in term.factors]
        if len(at) == 1:
            return [c[at[0]] for c in cells]
        return [":".join(c[i] for i in at) for c in cells]

    def term(self, name: str) -> RandomTerm:
        """The first term whose factor is ``name`` (``doctor`` also finds ``hospital:doctor``
        when no term is on ``doctor`` alone and the interaction ends in it)."""
        for t in self.terms:
            if t.group == name:
                return t
        ends = [t for t in self.terms if t.factors[-1] == name]
        if len(ends) == 1:
            return ends[0]
        raise SpecError(f"no random-effect term on {name!r}; the terms are on "
                        f"{', '.join(repr(t.group) for t in self.terms)}")

    # -- text -----------------------------------------------------------------------------

    @property
    def formula(self) -> str:
        """The formula as written, or in lme4's notation for a spec built from lists."""
        if self.source is not None:
            return self.source
        return f"{self.response} ~ {_sum(self.fixed)} + " + " + ".join(
            t.formula() for t in self.terms)

    def check_columns(self, available: Iterable[str]) -> None:
        """Raise SpecError naming every column the data lacks (with a close match, if any)."""
        import difflib

        have = list(available)
        missing = [c for c in dict.fromkeys(self.input_columns) if c not in have]
        if missing:
            hints = []
            for c in missing:
                close = difflib.get_close_matches(c, [str(h) for h in have], n=1)
                hints.append(f"{c!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise SpecError(
                f"unknown column(s) {', '.join(hints)}; "
                f"the data has {', '.join(map(repr, sorted(map(str, have))))}"
            )

    # -- serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        """The spec as JSON-able data: today's keys for a simple spec, the formula otherwise."""
        if self.is_simple and self.source is None:
            return {
                "response": self.response,
                "fixed": list(self.fixed),
                "random": list(self.random),
                "group": self.group,
                "covariance": self.covariance,
                "method": self.method,
            }
        out: dict[str, object] = {"formula": self.formula, "method": self.method}
        if self.levels:
            out["levels"] = {k: list(v) for k, v in self.levels.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelSpec:
        if "formula" in data:
            unknown = sorted(set(data) - {"formula", "method", "levels"})
            if unknown:
                raise SpecError(f"unknown model key(s): {', '.join(unknown)}")
            return cls.from_formula(str(data["formula"]), method=str(data.get("method", "REML")),
                                    levels=data.get("levels"))  # type: ignore[arg-type]
        known = {"response", "fixed", "random", "group", "covariance", "method"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown model key(s): {', '.join(unknown)}")
        for key in ("response", "fixed", "random", "group"):
            if key not in data:
                raise SpecError(f"{key}: missing")
        return cls(**data)  # type: ignore[arg-type]

    @classmethod
    def from_formula(
        cls, formula: str, *, levels: Mapping[str, Sequence[str]] | None = None,
        method: str = "REML",
    ) -> ModelSpec:
        """Read an lme4 formula; ``levels`` declares categorical covariates (see
        `streamlme.formula.parse`)."""
        from streamlme.formula import parse

        return parse(formula, levels=levels, method=method)


def _sum(terms: Sequence[str]) -> str:
    """Terms joined by ``+``, with lme4's ``0 +`` where there is no intercept."""
    if INTERCEPT in terms:
        return " + ".join(terms)
    return " + ".join(("0", *terms))


def _name(what: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{what}: expected a non-empty column name, got {value!r}")
    return value.strip()


def _levels(column: object, values: object) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise SpecError(f"levels of {column!r}: expected a list of level names, got {values!r}")
    out = tuple(str(v) for v in values)
    if len(out) < 1 or len(set(out)) != len(out):
        raise SpecError(f"levels of {column!r}: give distinct level names, got {list(out)}")
    return out


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
