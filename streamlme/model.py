"""ModelRecord: one stored model version, as the refresh job writes it and queries read it.

A record holds what a query needs to compute any group's effect from that group's running
statistics (beta, G, sigma^2 and the spec; for a model with several random-effect terms, each
term's G in ``terms`` and its conditional modes from this fit, which the between-refresh effects
of crossed terms start from, see `streamlme.blup`), what an operator needs to judge the fit (criterion,
convergence, fit time, events and groups covered) and what the next refresh needs to warm-start
(theta). Its JSON uses the field names of ``streamlme fit --json`` plus ``version`` and
``created_at``; that JSON is a public contract (add fields, never rename).

A record also says what it was fitted from: ``epoch``, the namespace's epoch at fit time (a
namespace that came back empty has another), ``gaps``, the offset ranges the statistics lacked
(`streamlme.store.health.Gap`; ``complete`` is False when there are any: the model does not
cover those events), and ``excluded``, the cells left out because their statistics were not
finite or not valid (named in ``warnings`` too). Times are unix seconds (``created_at``, part of
the contract) with ISO 8601 beside them (``created_at_iso``, a gap's ``recorded_at``).

>>> import numpy as np
>>> from streamlme import GroupStats, ModelSpec
>>> from streamlme.estimate import fit
>>> spec = ModelSpec("y", ["1"], ["1"], "g")
>>> rng = np.random.default_rng(0)
>>> stats = GroupStats.from_rows(np.repeat(np.arange(5), 4), rng.normal(size=(20, 1)))
>>> rec = ModelRecord.from_fit(fit(stats, spec), spec)
>>> ModelRecord.from_json(rec.to_json()).to_dict()["fixed"]
['(Intercept)']
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from streamlme.blup import Effects, Kernel, TermsModel, group_effects
from streamlme.estimate.result import FitResult, OptSummary, TermFit
from streamlme.spec import ModelSpec
from streamlme.stats import GroupStats

Array = NDArray[np.float64]


#: Cells a record names among those left out of its fit (the count is always kept).
MAX_EXCLUDED = 100
#: JSON fields computed from the record's own fields, not part of the fit
_DERIVED = frozenset({"created_at_iso", "complete", "excluded"})


class ModelRecordError(ValueError):
    """A stored model record that cannot be read."""


@dataclass
class ModelRecord:
    """A model version. ``version`` is 0 until the store assigns one."""

    spec: ModelSpec
    fit: dict[str, Any]
    version: int = 0
    created_at: float = field(default_factory=time.time)
    fit_seconds: float = 0.0
    events_seen: float = 0.0
    #: the namespace's epoch when the statistics were read (None: not recorded)
    epoch: str | None = None
    #: offset gaps the statistics lacked at fit time, as `Gap.to_dict` gives them
    gaps: list[dict[str, Any]] = field(default_factory=list)
    #: keys of cells left out of the fit (unreadable statistics), at most `MAX_EXCLUDED` named
    excluded: list[str] = field(default_factory=list)
    n_excluded: int = 0

    @classmethod
    def from_fit(cls, result: FitResult, spec: ModelSpec, fit_seconds: float | None = None,
                 created_at: float | None = None) -> ModelRecord:
        fit = result.to_dict(ranef=False)
        if len(spec.terms) > 1 and result.terms:
            # several terms: keep every level's conditional modes (not their covariances), the
            # other factors' effects a crossed term's on-demand effect is conditioned on
            for out, term in zip(fit["terms"], result.terms):
                if term.ranef is not None:
                    out["ranef"] = {k: v.tolist() for k, v in zip(term.levels, term.ranef)}
        return cls(
            spec=spec,
            fit=fit,
            created_at=time.time() if created_at is None else created_at,
            fit_seconds=result.optsummary.seconds if fit_seconds is None else fit_seconds,
            events_seen=float(result.n_obs),
        )

    # -- what queries use -----------------------------------------------------------------

    @property
    def beta(self) -> Array:
        return np.array([self.fit["beta"][name] for name in self.fit["fixed"]], dtype=float)

    @property
    def beta_cov(self) -> Array:
        return np.asarray(self.fit["beta_cov"], dtype=float)

    @property
    def G(self) -> Array:
        return np.asarray(self.fit["G"], dtype=float)

    @property
    def sigma2(self) -> float:
        return float(self.fit["sigma2"])

    @property
    def z_centre(self) -> Array:
        """Per random term, where the fit centred its covariate (zeros in older records)."""
        return np.asarray(self.fit.get("z_centre", [0.0] * len(self.fit["random"])), dtype=float)

    @property
    def G_centred(self) -> Array:
        """G in the centred basis z - z_centre (G itself in older records)."""
        return np.asarray(self.fit.get("G_centred", self.fit["G"]), dtype=float)

    def effects(self, stats: GroupStats) -> Effects:
        """Every group's effect under this model, from the groups' current statistics."""
        return group_effects(stats, self.spec, self.beta, self.G, self.sigma2,
                             z_centre=self.z_centre, G_centred=self.G_centred)

    def kernel(self) -> Kernel:
        """The one-term BLUP kernel of this model (its first term, in its centred basis)."""
        return Kernel.for_spec(self.spec, self.beta, self.G, self.sigma2,
                               z_centre=self.z_centre, G_centred=self.G_centred)

    def terms_model(self) -> TermsModel:
        """This model for effects of any term's levels (`streamlme.blup.TermsModel`)."""
        return TermsModel.from_fit(self.spec, self.fit)

    @property
    def converged(self) -> bool:
        return bool(self.fit["converged"])

    def fit_result(self) -> FitResult:
        """The stored fit as a `FitResult` without per-level effects, so that its lme4-style
        `FitResult.summary` can print it (levels are not stored: only their count)."""
        f = self.fit
        opt = f.get("optsummary") or {}
        optsummary = OptSummary(
            optimizer=str(opt.get("optimizer", "?")), theta_start=list(opt.get("theta_start", [])),
            theta=list(opt.get("theta", f["theta"])), n_evals=int(opt.get("n_evals", 0)),
            iterations=int(opt.get("iterations", f.get("iterations", 0))),
            converged=bool(opt.get("converged", f["converged"])),
            message=str(opt.get("message", "")),
            gradient_norm=float(opt.get("gradient_norm", float("nan"))),
            seconds=float(opt.get("seconds", self.fit_seconds)),
            warm_start=bool(opt.get("warm_start", False)))
        terms = [TermFit(t["group"], list(t["random"]), t.get("covariance", f["covariance"]),
                         np.asarray(t["G"], dtype=float), np.asarray(t["theta"], dtype=float),
                         levels=[""] * int(t.get("n_levels") or 0))
                 for t in f.get("terms") or []]
        return FitResult(
            method=f["method"], converged=bool(f["converged"]), n_obs=float(f["n_obs"]),
            n_groups=int(f["n_groups"]), fixed=list(f["fixed"]), random=list(f["random"]),
            beta=self.beta, beta_cov=self.beta_cov, G=self.G, sigma2=self.sigma2,
            theta=np.asarray(f["theta"], dtype=float), criterion=float(f["criterion"]),
            covariance=f["covariance"], optsummary=optsummary,
            singular=bool(f.get("singular", False)), warnings=list(f.get("warnings", [])),
            z_centre=self.z_centre, G_centred=self.G_centred, terms=terms)

    # -- JSON -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """``streamlme fit --json`` fields, plus version, created_at, spec and fit bookkeeping."""
        return {
            **self.fit,
            "version": self.version,
            "created_at": self.created_at,
            "created_at_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_at)),
            "fit_seconds": self.fit_seconds,
            "events_seen": self.events_seen,
            "spec": self.spec.to_dict(),
            "epoch": self.epoch,
            "gaps": list(self.gaps),
            "complete": not self.gaps,
            "excluded": {"cells": self.n_excluded, "keys": list(self.excluded)},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes, version: int | None = None) -> ModelRecord:
        try:
            doc = json.loads(data)
            spec = ModelSpec.from_dict(doc.pop("spec"))
            stored_version = int(doc.pop("version"))
            rec = cls(
                spec=spec,
                version=stored_version if version is None else version,
                created_at=float(doc.pop("created_at")),
                fit_seconds=float(doc.pop("fit_seconds")),
                events_seen=float(doc.pop("events_seen")),
                epoch=doc.pop("epoch", None),
                gaps=list(doc.pop("gaps", [])),
                fit={k: v for k, v in doc.items() if k not in _DERIVED},
            )
            excluded = doc.get("excluded") or {}
            rec.excluded = list(excluded.get("keys", []))
            rec.n_excluded = int(excluded.get("cells", len(rec.excluded)))
            for key in ("beta", "fixed", "G", "sigma2", "beta_cov", "random", "converged"):
                if key not in rec.fit:
                    raise KeyError(key)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelRecordError(f"unreadable model record: {exc!r}") from exc
        return rec
