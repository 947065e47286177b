"""theta: the free elements of the relative covariance factor Lambda, G = sigma^2 Lambda Lambda'.

As in lme4, theta lists the lower triangle of Lambda column by column ("unstructured", lme4's
``(1 + x | g)``), or only its diagonal ("diagonal", lme4's ``(1 + x || g)``); diagonal elements are
bounded below by 0 and everything else is free.

The fit works in the centred, scaled basis of `streamlme.estimate.crossprod` (random effects b_c
with b = T_Z b_c, T_Z = shift @ diag(s)). An unstructured G stays unstructured under that change
of basis, so theta is the centred factor itself. A diagonal G does not stay diagonal under the
shift, so there theta is the user-basis diagonal in scaled units, theta_user = s * theta, and the
centred factor is T_Z^-1 diag(s theta).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from streamlme.estimate.linalg import psd_factor

Array = NDArray[np.float64]


class Parametrisation:
    """Maps theta to the centred-basis factor Lambda_c, and gradients back."""

    def __init__(self, q: int, covariance: str, T_Z: Array, z_scale: Array | None = None) -> None:
        self.q = q
        self.covariance = covariance
        self.T_Z = T_Z
        self.T_Z_inv = np.linalg.inv(T_Z)
        self.z_scale = np.ones(q) if z_scale is None else np.asarray(z_scale, float)
        if covariance == "diagonal":
            self.rows, self.cols = np.arange(q), np.arange(q)
            self.base = self.T_Z_inv @ np.diag(self.z_scale)
        else:
            # lme4's order: the lower triangle column by column
            cols, rows = np.triu_indices(q)
            self.rows, self.cols = rows, cols
            self.base = np.eye(q)
        self.lower = np.where(self.rows == self.cols, 0.0, -np.inf)

    @property
    def n_theta(self) -> int:
        return len(self.rows)

    @property
    def bounds(self) -> list[tuple[float | None, float | None]]:
        return [(0.0, None) if lo == 0.0 else (None, None) for lo in self.lower]

    def start(self) -> Array:
        """Identity Lambda: lme4's default start, taken in the centred basis where the
        likelihood is the same but a covariate with mean 1e5 does not distort the start."""
        if self.covariance == "diagonal":
            return np.ones(self.q)
        return np.eye(self.q)[self.rows, self.cols]

    def placed(self, theta: Array) -> Array:
        M = np.zeros((self.q, self.q))
        M[self.rows, self.cols] = theta
        return M

    def lam(self, theta: Array) -> Array:
        """Lambda_c, the centred-basis relative factor."""
        return self.base @ self.placed(theta)

    def grad(self, grad_lam: Array) -> Array:
        """d/dtheta from d/dLambda_c (chain rule through Lambda_c = base @ placed(theta))."""
        return (self.base.T @ grad_lam)[self.rows, self.cols]

    def user_factor(self, theta: Array) -> Array:
        """lme4's Lambda in the user's basis: lower triangular, non-negative diagonal."""
        if self.covariance == "diagonal":
            return np.diag(np.abs(theta) * self.z_scale)
        Lam = self.T_Z @ self.lam(theta)
        return _sign_fixed(psd_factor(Lam @ Lam.T))

    def from_user_factor(self, Lam_user: Array) -> Array:
        """theta whose user-basis factor is Lam_user (for warm starts from a stored model)."""
        if self.covariance == "diagonal":
            return np.abs(np.diag(Lam_user)) / self.z_scale
        D_c = self.T_Z_inv @ Lam_user @ Lam_user.T @ self.T_Z_inv.T
        return _sign_fixed(psd_factor(D_c))[self.rows, self.cols]


def _sign_fixed(F: Array) -> Array:
    s = np.where(np.diag(F) < 0, -1.0, 1.0)
    return F * s[None, :]
