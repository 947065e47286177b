"""The profiled deviance of lme4's penalised least squares, and its gradient, from cross-products.

Bates, Maechler, Bolker and Walker (2015), "Fitting Linear Mixed-Effects Models Using lme4",
JSS 67(1), section 3. With G = sigma^2 Lambda Lambda' and per group j

    L_j L_j' = Lambda' Z_j'Z_j Lambda + I
    R_ZX,j = L_j^-1 Lambda' Z_j'X_j,    c_u,j = L_j^-1 Lambda' Z_j'y_j
    R_X'R_X = X'X - sum_j R_ZX,j' R_ZX,j,     R_X' c_b = X'y - sum_j R_ZX,j' c_u,j
    r^2 = y'y - sum_j |c_u,j|^2 - |c_b|^2

    ML:   d(theta)   = sum_j log|L_j|^2 + N (1 + log(2 pi r^2 / N))
    REML: d_R(theta) = sum_j log|L_j|^2 + log|R_X|^2 + (N-p)(1 + log(2 pi r^2 / (N-p)))

Here [X y] is factored as one block: the Cholesky factor of the Schur complement
[X y]'[X y] - sum_j RZXy_j' RZXy_j holds R_X, c_b and r in one triangle.

The gradient with respect to Lambda (so any parametrisation theta -> Lambda gets its gradient by
the chain rule) is, with P_j = L_j L_j', u_j the spherical random effects, b_j = Lambda u_j,
Z_j'e_j = Z_j'y_j - Z_j'X_j beta - Z_j'Z_j b_j and Q_j = Z_j'V_j^-1 X_j = Z_j'X_j - Z_j'Z_j Lambda P_j^-1 R,

    d log|P| / dLambda   =  2 sum_j Z_j'Z_j Lambda P_j^-1
    d r^2 / dLambda      = -2 sum_j Z_j'e_j u_j'                    (envelope theorem)
    d log|R_X|^2/dLambda = -2 sum_j Q_j (R_X'R_X)^-1 Q_j' Lambda     (REML only)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from streamlme.estimate import kernels
from streamlme.estimate.crossprod import CrossProducts
from streamlme.estimate.linalg import solve_lower, solve_lower_t

Array = NDArray[np.float64]
LOG_2PI = float(np.log(2.0 * np.pi))


class NumericalError(ArithmeticError):
    """The deviance could not be evaluated (a factor lost positive definiteness)."""


class ProfiledDeviance:
    """What the factor R of the [X y] Schur complement gives, whatever factored Z: R_X, c_b, r,
    beta, sigma^2 and the profiled (RE)ML deviance. Needs ``R``, ``logdet_L``, ``reml``, ``N``."""

    R: Array
    logdet_L: float
    reml: bool
    N: float

    @property
    def p(self) -> int:
        return self.R.shape[0] - 1

    @property
    def R_X(self) -> Array:
        return self.R[:-1, :-1]

    @property
    def c_b(self) -> Array:
        return self.R[:-1, -1]

    @property
    def r2(self) -> float:
        return float(self.R[-1, -1] ** 2)

    @property
    def dof(self) -> float:
        return self.N - self.p if self.reml else self.N

    @property
    def beta(self) -> Array:
        return np.linalg.solve(self.R_X, self.c_b)

    @property
    def sigma2(self) -> float:
        return self.r2 / self.dof

    @property
    def deviance(self) -> float:
        d = self.logdet_L + self.dof * (1.0 + LOG_2PI + np.log(self.r2 / self.dof))
        if self.reml:
            d += 2.0 * float(np.sum(np.log(np.abs(np.diag(self.R_X)))))
        return float(d)


@dataclass
class PLSState(ProfiledDeviance):
    """Everything one evaluation of the profiled deviance produces at a given Lambda."""

    Lam: Array
    L: Array | None     # (G, q, q) lower factors of P_j (None: not kept, see `evaluate`)
    RZXy: Array | None  # (G, q, p + 1): R_ZX,j and c_u,j side by side (idem)
    R: Array          # (p + 1, p + 1) upper factor of the Schur complement
    logdet_L: float   # sum_j log|L_j|^2
    reml: bool
    N: float

    def factors(self) -> tuple[Array, Array]:
        """(L, RZXy), which per-group results need."""
        if self.L is None or self.RZXy is None:
            raise ValueError("this state was evaluated with factors=False; "
                             "call evaluate(cp, Lam, reml) to keep the per-group factors")
        return self.L, self.RZXy

    def spherical_effects(self) -> Array:
        """u_j = L_j^-T (c_u,j - R_ZX,j beta), shape (G, q)."""
        L, RZXy = self.factors()
        rhs = RZXy[:, :, -1] - RZXy[:, :, :-1] @ self.beta
        return solve_lower_t(L, rhs[:, :, None])[:, :, 0]

    def conditional_modes(self) -> Array:
        """b_j = Lambda u_j, shape (G, q)."""
        return self.spherical_effects() @ self.Lam.T

    def conditional_variances(self) -> Array:
        """sigma^2 Lambda P_j^-1 Lambda' (lme4's condVar), shape (G, q, q)."""
        q = self.Lam.shape[0]
        L, _ = self.factors()
        LinvLamT = solve_lower(L, np.broadcast_to(self.Lam.T, (L.shape[0], q, q)))
        return self.sigma2 * np.einsum("gki,gkj->gij", LinvLamT, LinvLamT)


def evaluate(cp: CrossProducts, Lam: Array, reml: bool, factors: bool = True) -> PLSState:
    """The penalised least squares solution and profiled deviance at relative factor Lambda.

    ``factors=False`` may leave the per-group L_j and RZXy_j out of the state (None): the
    deviance, beta, sigma^2 and `gradient` do not need them, conditional modes do.
    """
    L, RZXy, SS, logdet = kernels.deviance_pass(cp.ZtZ, cp.ZtXy, Lam, store=factors)
    S = cp.XyXy - SS
    S = 0.5 * (S + S.T)
    try:
        R = np.linalg.cholesky(S).T
    except np.linalg.LinAlgError as exc:
        raise NumericalError("the fixed-effects Schur complement is not positive definite") from exc
    if not np.isfinite(logdet) or R[-1, -1] <= 0:
        raise NumericalError("penalised residual sum of squares is not positive")
    return PLSState(Lam, L, RZXy, R, logdet, reml, cp.N)


def gradient(cp: CrossProducts, st: PLSState) -> Array:
    """d deviance / d Lambda (q x q) at the state `st` (see the module docstring)."""
    ZtZ_LamPinv, Zte_u, KK = kernels.gradient_pass(
        cp.ZtZ, cp.ZtXy, st.L, st.RZXy, st.Lam, st.beta, st.R_X if st.reml else None
    )
    # d log|P| + (dof / r^2) d r^2, and for REML d log|R_X|^2
    return 2.0 * ZtZ_LamPinv - 2.0 * (st.dof / st.r2) * Zte_u - 2.0 * KK @ st.Lam
