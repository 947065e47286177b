"""ModelRecord: one stored model version, as the refresh job writes it and queries read it.

A record holds what a query needs to compute any group's effect from that group's running
statistics (beta, G, sigma^2 and the spec; for a model with several random-effect terms, each
term's G in ``terms`` and its conditional modes from this fit, which the between-refresh effects
of crossed terms start from, see `streamlme.blup`), what an operator needs to judge the fit (criterion,
convergence, fit time, events and groups covered) and what the next refresh needs to warm-start
(theta). Its JSON uses the field names of ``streamlme fit --json`` plus ``version`` and
``created_at``; that JSON is a public contract (add fields, never rename).

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
from streamlme.estimate.result import FitResult
from streamlme.spec import ModelSpec
from streamlme.stats import GroupStats

Array = NDArray[np.float64]


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
                fit={k: v for k, v in doc.items() if k != "created_at_iso"},
            )
            for key in ("beta", "fixed", "G", "sigma2", "beta_cov", "random", "converged"):
                if key not in rec.fit:
                    raise KeyError(key)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelRecordError(f"unreadable model record: {exc!r}") from exc
        return rec
