"""REML and ML for several random-effect terms, exactly, from per-cell statistics.

The model is lme4's (Bates, Maechler, Bolker and Walker 2015, JSS 67(1), section 3),

    y = X beta + Z b + e,   b = Lambda u,   u ~ N(0, sigma^2 I),   e ~ N(0, sigma^2 I),

with Z = [Z_1 ... Z_K] and Lambda = blockdiag_k(I_{n_k} (x) Lambda_k): term k has n_k levels and
q_k random effects, and theta lists the free elements of the relative factors Lambda_k (the lower
triangle column by column for an unstructured term, the diagonal for a diagonal one). With
A = Z'Z, L the lower Cholesky factor of P = Lambda'Z'Z Lambda + I, and

    L [R_ZX  c_u] = Lambda'Z'[X  y],     R_X'R_X = X'X - R_ZX'R_ZX,     R_X' c_b = X'y - R_ZX'c_u,
    r^2 = y'y - |c_u|^2 - |c_b|^2,

the profiled deviances are those of `streamlme.estimate.pls`:

    ML:   d(theta)   = log|L|^2 + N (1 + log(2 pi r^2 / N))
    REML: d_R(theta) = log|L|^2 + log|R_X|^2 + (N - p)(1 + log(2 pi r^2 / (N - p))).

**Blocked factorisation** (MixedModels.jl; Bates, Alday and Kokandakar 2025, arXiv 2505.11674).
The terms are ordered by number of levels, most first. Term 1's diagonal block A_11 = Z_1'Z_1 is
block diagonal (one q_1 x q_1 block per level, as every row has one level), and the remaining
terms 2..K form one dense block of order Q_2 = sum_{k>=2} n_k q_k:

    L_11 L_11' = Lambda_1' A_11 Lambda_1 + I                      (one q_1 x q_1 factor per level)
    L_21       = Lambda_2' A_21 Lambda_1 L_11^-T                   (sparse: the pattern of A_21)
    L_22 L_22' = Lambda_2' A_22 Lambda_2 + I - L_21 L_21'          (dense, order Q_2)

Writing W = Lambda_1 P_11^-1 Lambda_1' (block diagonal, one q_1 x q_1 block W_l per level l),
L_21 L_21' = Lambda_2' (A_21 W A_21') Lambda_2, and A_21 W A_21' is linear in the entries of W
with a sparsity pattern fixed by the data; so is everything in term 1's part of [X y]:

    R_ZX,1'R_ZX,1 = sum_l A_1[Xy],l' W_l A_1[Xy],l,    L_21 R_ZX,1 = Lambda_2' A_21 W A_1[Xy],
    [R_ZX,2  c_u,2] = L_22^-1 Lambda_2' (A_2[Xy] - A_21 W A_1[Xy]).

The Cholesky factor of the Schur complement [X y]'[X y] - R_ZXy,1'R_ZXy,1 - R_ZXy,2'R_ZXy,2 holds
R_X, c_b and r in one triangle, as in `pls`. Everything that does not depend on theta (the blocks
of A, Z'[X y], and the map from W to the entries of A_21 W A_21') is formed once, in `BlockedPLS`;
an evaluation is a stacked q_1 x q_1 pass over term 1's levels, one sparse product, one dense
Cholesky of order Q_2 and a triangular solve. Scalar terms (q = 1) and diagonal factors reduce
the Lambda products to diagonal scalings.

**Cost.** An evaluation costs Q_2^3 / 3 flops for the dense Cholesky plus one pass over the
fill map, which has one entry per pair of dense-block levels that share a level of term 1
(sum_l m_l (m_l + 1) / 2, m_l the entries of A_21's column block l) and takes 12 bytes each.
At InstEval's shape ((1|s) 2972, (1|d) 1128, (1|dept) 14 levels; 73k cells; Q_2 = 1142; 1.8e6
pairs) that is about 17 ms on one core, 10 of them the Cholesky. Memory is a few Q_2 x Q_2
arrays (A_22, the evaluation's factor, the best one kept) plus the fill map: a users x items
model with 20k items, or with users who each rated thousands of items, does not fit this layout.

**Cells.** A cell is one combination of the levels of all the grouping factors. Within a cell
every row has the same columns of Z up to the values of the random covariates, so every block of
[Z X y]'[Z X y] is a sum over cells of the cell's cross-products, which follow exactly from its
(n, m, C) about any reference point r (`streamlme.estimate.crossprod`):
sum u u' = [[n, n e'], [n e, C + n e e']], u = (1, w - r), e = m - r. The response and the
covariates that only the fixed part uses are taken about their pooled means when the fixed part
has an intercept (a reparametrisation that only moves the intercept, mapped back exactly), so
y ~ 1e7 + noise keeps its digits. Random covariates stay in the user's units: centring them would
change the model of a diagonal term, and keeping them raw makes theta lme4's theta directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray
from scipy.linalg import lapack
from scipy.optimize import Bounds, minimize

from streamlme.estimate.crossprod import DataError, alike_rows, check_residual, check_response
from streamlme.estimate.fit import fit_report, note_confounded, objective_scale
from streamlme.estimate.linalg import chol, solve_lower
from streamlme.estimate.pls import NumericalError, ProfiledDeviance
from streamlme.estimate.result import FitResult, TermFit

Array = NDArray[np.float64]
IntArray = NDArray[np.intp]

COVARIANCES = ("unstructured", "diagonal")

#: Diagonal elements of theta below this after the optimiser stops are tried at exactly 0.
BOUNDARY_TRY = 1e-3

#: Doubles per chunk when conditional variances need a dense slice of L_22^-1 L_21.
CHUNK = 1 << 22


@dataclass
class TermDesign:
    """One random-effect term ``(random | group)`` over the cells."""

    group: str              # factor as written in the formula, e.g. "plate", "batch:cask"
    random: list[str]       # names of the term's random effects, e.g. ["(Intercept)", "Days"]
    columns: list[int]      # per random effect: index into the cells' columns w, or -1 (intercept)
    covariance: str         # "unstructured" (lme4 (x | g)) or "diagonal" (lme4 (x || g))
    levels: list[str]       # level names, in the order codes index them
    codes: np.ndarray       # (n_cells,) int: the level of this term's factor in each cell


@dataclass
class CellDesign:
    """Per-cell sufficient statistics and the model's design over them."""

    n: np.ndarray           # (n_cells,) weight mass of each cell
    mean: np.ndarray        # (n_cells, d) mean of the columns w in each cell; w's LAST column is y
    C: np.ndarray           # (n_cells, d, d) centred co-moments sum v (w - m)(w - m)'
    fixed: list[int]        # per fixed effect: index into w, or -1 for the intercept
    fixed_names: list[str]
    terms: list[TermDesign]  # in the formula's order (results are reported in this order)
    response: str = "the response"  # y's name, for errors


class _Term:
    """A term as the fit sees it: its place in theta, in Z and in the dense block."""

    def __init__(self, design: TermDesign, theta_at: int, n_levels: int) -> None:
        self.design = design
        self.q = len(design.random)
        self.n = n_levels
        self.diagonal = design.covariance == "diagonal"
        if self.diagonal:
            self.rows, self.cols = np.arange(self.q), np.arange(self.q)
        else:
            # lme4's order: the lower triangle column by column
            self.cols, self.rows = np.triu_indices(self.q)
        self.theta = slice(theta_at, theta_at + len(self.rows))
        self.aug = [0 if c < 0 else 1 + c for c in design.columns]  # index into u = (1, w - r)
        self.offset = 0               # first row in the dense block (terms 2..K)

    def lam(self, theta: Array) -> Array:
        Lam = np.zeros((self.q, self.q))
        Lam[self.rows, self.cols] = theta[self.theta]
        return Lam

    def rows_of(self, codes: IntArray, a: int) -> IntArray:
        """Row of random effect a of each cell's level within the dense block."""
        return self.offset + codes * self.q + a


@dataclass
class BlockedState(ProfiledDeviance):
    """One evaluation of the profiled deviance: what results and conditional modes need."""

    theta: Array
    lams: list[Array]     # Lambda_k in fit order
    W: Array              # (n_1, q_1, q_1) Lambda_1 P_11,l^-1 Lambda_1'
    L22: Array            # (Q_2, Q_2) lower factor (upper triangle not referenced)
    RZXy2: Array          # (Q_2, p + 1): [R_ZX,2  c_u,2]
    R: Array              # (p + 1, p + 1) upper factor of the Schur complement
    logdet_L: float
    reml: bool
    N: float


class BlockedPLS:
    """The theta-independent part of the blocked system, formed once from the cells.

    ``theta`` everywhere is lme4's: every term's elements concatenated in the formula's order.
    """

    def __init__(self, design: CellDesign) -> None:
        n, mean, C, live = _checked_cells(design)
        d = mean.shape[1]
        self.fixed_names = list(design.fixed_names)
        self.p = len(design.fixed)
        self.N = float(n.sum())
        if self.p >= self.N:
            raise DataError(f"{self.N:g} observations cannot estimate {self.p} fixed effects")

        # Reference point: see the module docstring. Columns any random term uses stay raw.
        random_cols = {c for t in design.terms for c in t.columns if c >= 0}
        r = np.zeros(d)
        self.intercept = design.fixed.index(-1) if -1 in design.fixed else None
        pooled = (n @ mean) / self.N
        if self.intercept is not None:
            for c in {*design.fixed, d - 1} - random_cols - {-1}:
                r[c] = pooled[c]
        self.r_y = float(r[-1])
        # beta_user = T_X beta_centred (+ r_y on the intercept): x_c = x - r moves the intercept
        self.T_X = np.eye(self.p)
        if self.intercept is not None:
            for j, c in enumerate(design.fixed):
                if c >= 0:
                    self.T_X[self.intercept, j] = -r[c]
        e = np.concatenate([np.ones((len(n), 1)), mean - r], axis=1)

        def cross(a: int, b: int) -> Array:
            """Per-cell sum u_a u_b about r (augmented indices, 0 is the intercept)."""
            out = n * e[:, a] * e[:, b]
            return out + C[:, a - 1, b - 1] if a > 0 and b > 0 else out

        self.ixy = [0 if c < 0 else 1 + c for c in design.fixed] + [d]
        self.XyXy = np.array([[cross(a, b).sum() for b in self.ixy] for a in self.ixy])
        for j, c in enumerate(design.fixed):
            # a centred column that is zero was constant: the intercept spans it
            if c >= 0 and r[c] != 0.0 and not self.XyXy[j, j] > 1e-24 * self.N * r[c] ** 2:
                raise DataError(
                    f"fixed-effect columns ['{self.fixed_names[self.intercept]}', "
                    f"'{self.fixed_names[j]}'] are linearly dependent: '{self.fixed_names[j]}' "
                    f"is {r[c]:g} in every row, which the intercept already spans; drop one of them")
        _check_rank(self.XyXy[: self.p, : self.p], self.fixed_names)
        y_off = mean[:, -1] - mean[0, -1]
        y_dev = y_off - (n @ y_off) / self.N
        check_response(design.response, float(pooled[-1]),
                       float(C[:, -1, -1].sum() + n @ (y_dev * y_dev)), self.N)
        check_residual(self.XyXy, self.fixed_names, design.response)

        # Terms in fit order: most levels first (a stable sort keeps the formula's order on ties)
        terms, at = [], 0
        for t in design.terms:
            terms.append(_Term(t, at, len(t.levels)))
            at += len(terms[-1].rows)
        self.n_theta = at
        self.terms = sorted(terms, key=lambda t: -t.n)
        self.by_formula = terms
        first, rest = self.terms[0], self.terms[1:]
        Q2 = 0
        for t in rest:
            t.offset = Q2
            Q2 += t.n * t.q
        self.Q2 = Q2
        codes = [np.asarray(t.design.codes, dtype=np.intp)[live] for t in self.terms]
        c1, q1, n1 = codes[0], first.q, first.n

        # Term 1: stacked blocks per level
        self.A11 = np.zeros((n1, q1, q1))
        self.A1Xy = np.zeros((n1, q1, self.p + 1))
        for a, ia in enumerate(first.aug):
            for b, ib in enumerate(first.aug):
                self.A11[:, a, b] = np.bincount(c1, cross(ia, ib), minlength=n1)
            for j, ij in enumerate(self.ixy):
                self.A1Xy[:, a, j] = np.bincount(c1, cross(ia, ij), minlength=n1)

        # Terms 2..K: A_2[Xy] (Q_2, p + 1), A_22 dense (kept flat in Fortran order, as LAPACK
        # reads it) and A_21 sparse (Q_2, n_1 q_1)
        self.A2Xy = np.zeros((Q2, self.p + 1))
        A22 = np.zeros(Q2 * Q2)
        r21, c21, v21 = [], [], []
        for t, ct in zip(rest, codes[1:]):
            for a, ia in enumerate(t.aug):
                rows = t.rows_of(ct, a)
                for j, ij in enumerate(self.ixy):
                    self.A2Xy[:, j] += np.bincount(rows, cross(ia, ij), minlength=Q2)
                for s, cs in zip(rest, codes[1:]):
                    for b, ib in enumerate(s.aug):
                        A22 += np.bincount(rows + Q2 * s.rows_of(cs, b), cross(ia, ib),
                                           minlength=Q2 * Q2)
                for b, ib in enumerate(first.aug):
                    r21.append(rows)
                    c21.append(c1 * q1 + b)
                    v21.append(cross(ia, ib))
        self.A22 = A22
        if Q2:
            self.A21 = sp.csr_matrix(
                (np.concatenate(v21), (np.concatenate(r21), np.concatenate(c21))),
                shape=(Q2, n1 * q1))
        else:
            self.A21 = sp.csr_matrix((0, n1 * q1))
        self.A21.sum_duplicates()
        self.order, self.M = _fill_map(self.A21.tocsc(), n1, q1, Q2)
        # Lambda_2 is diagonal (a diagonal scaling) unless a term 2..K is unstructured with q > 1
        self.diagonal2 = all(t.diagonal or t.q == 1 for t in rest)

    # -- one evaluation ----------------------------------------------------------------------

    def lam2(self, lams: list[Array]) -> Array | sp.csr_matrix:
        """Lambda_2: its diagonal (Q_2,) when it is diagonal, else a sparse block diagonal."""
        if self.diagonal2:
            return np.concatenate([np.tile(np.diag(L), t.n) for t, L in zip(self.terms[1:], lams[1:])])
        return sp.block_diag([sp.kron(sp.eye(t.n), L) for t, L in zip(self.terms[1:], lams[1:])],
                             format="csr")

    def evaluate(self, theta: Array, reml: bool) -> BlockedState:
        """Penalised least squares at theta (see the module docstring)."""
        theta = np.asarray(theta, dtype=float)
        lams = [t.lam(theta) for t in self.terms]
        Lam1 = lams[0]
        q1 = Lam1.shape[0]
        # P_11,l = Lambda_1' A_11,l Lambda_1 + I and W_l = Lambda_1 P_11,l^-1 Lambda_1'
        if q1 == 1:
            lam = Lam1[0, 0]
            P = lam * lam * self.A11[:, 0, 0] + 1.0
            logdet = float(np.sum(np.log(P)))
            W = (lam * lam / P)[:, None, None]
        else:
            L11 = chol(Lam1.T @ self.A11 @ Lam1 + np.eye(q1))
            diag = np.diagonal(L11, axis1=1, axis2=2)
            if not np.all(diag > 0):
                raise NumericalError("a level's block of term 1 is not positive definite")
            logdet = 2.0 * float(np.sum(np.log(diag)))
            X1 = solve_lower(L11, np.broadcast_to(Lam1.T, L11.shape))   # L_11^-1 Lambda_1'
            W = np.einsum("lka,lkb->lab", X1, X1)
        V = W @ self.A1Xy                                  # W A_1[Xy], (n_1, q_1, p + 1)
        S = self.XyXy - np.einsum("lap,laq->pq", self.A1Xy, V)
        Q2 = self.Q2
        L22, RZXy2 = np.zeros((0, 0), order="F"), np.zeros((0, self.p + 1))
        if Q2:
            # A_22 - A_21 W A_21' on the lower triangle, then Lambda_2' (.) Lambda_2 + I
            T = (self.A22 - self.M @ W.reshape(-1)[self.order]).reshape((Q2, Q2), order="F")
            lam2 = self.lam2(lams)
            B = self.A2Xy - self.A21 @ V.reshape(-1, self.p + 1)
            if isinstance(lam2, np.ndarray):
                T *= lam2[:, None]
                T *= lam2[None, :]
                B *= lam2[:, None]
            else:
                T = np.tril(T) + np.tril(T, -1).T
                T = np.asfortranarray(lam2.T @ (lam2.T @ T).T)
                B = lam2.T @ B
            T.reshape(-1, order="F")[:: Q2 + 1] += 1.0
            L22, info = lapack.dpotrf(T, lower=1, overwrite_a=1, clean=0)
            if info != 0:
                raise NumericalError("the dense block of L is not positive definite")
            logdet += 2.0 * float(np.sum(np.log(np.diagonal(L22))))
            RZXy2, _ = lapack.dtrtrs(L22, B, lower=1)
            S -= RZXy2.T @ RZXy2
        S = 0.5 * (S + S.T)
        try:
            R = np.linalg.cholesky(S).T
        except np.linalg.LinAlgError as exc:
            raise NumericalError("the fixed-effects Schur complement is not positive definite") from exc
        if not (np.isfinite(logdet) and R[-1, -1] > 0):
            raise NumericalError("penalised residual sum of squares is not positive")
        return BlockedState(theta, lams, W, L22, RZXy2, R, logdet, reml, self.N)

    def deviance(self, theta: Array, reml: bool) -> float:
        """The REML criterion (``reml``) or the ML deviance at lme4's theta."""
        return self.evaluate(theta, reml).deviance

    # -- after the fit -----------------------------------------------------------------------

    def conditional_modes(self, st: BlockedState) -> list[Array]:
        """b_k = Lambda_k u_k per term in fit order, (n_k, q_k); u solves P u = Lambda'Z'(y - X b)."""
        beta = st.beta
        first = self.terms[0]
        r1 = self.A1Xy[:, :, -1] - self.A1Xy[:, :, :-1] @ beta       # Z_1'(y - X beta)
        out: list[Array] = []
        if self.Q2:
            rhs = st.RZXy2[:, -1] - st.RZXy2[:, :-1] @ beta
            u2, _ = lapack.dtrtrs(st.L22, rhs, lower=1, trans=1)
            lam2 = self.lam2(st.lams)
            b2 = lam2 * u2 if isinstance(lam2, np.ndarray) else lam2 @ u2
            r1 = r1 - (self.A21.T @ b2).reshape(first.n, first.q)
            out = [b2[t.offset: t.offset + t.n * t.q].reshape(t.n, t.q) for t in self.terms[1:]]
        # b_1 = Lambda_1 P_11^-1 Lambda_1' (Z_1'(y - X beta) - A_12 b_2) = W r_1
        return [np.einsum("lab,lb->la", st.W, r1), *out]

    def conditional_variances(self, st: BlockedState) -> list[Array]:
        """sigma^2 Lambda_k [P^-1]_kk,l Lambda_k' per term in fit order, (n_k, q_k, q_k).

        With Y = L_22^-1 Lambda_2' A_21 W, term 1's is sigma^2 (W_l + Y_l'Y_l); the dense block's
        are the diagonal blocks of L_22^-T L_22^-1.
        """
        first = self.terms[0]
        V1 = st.W.copy()
        out: list[Array] = []
        if self.Q2:
            Linv, _ = lapack.dtrtri(st.L22, lower=1)
            Linv = np.tril(Linv)
            lam2 = self.lam2(st.lams)
            Wbd = sp.bsr_matrix((st.W, np.arange(first.n), np.arange(first.n + 1)),
                                shape=(first.n * first.q, first.n * first.q))
            A = (self.A21 @ Wbd).tocsc()
            A = (sp.diags(lam2) @ A if isinstance(lam2, np.ndarray) else lam2.T @ A).tocsc()
            step = max(1, CHUNK // max(self.Q2 * first.q, 1))
            for lo in range(0, first.n, step):
                hi = min(first.n, lo + step)
                Yt = (A[:, lo * first.q: hi * first.q].T @ Linv.T).reshape(hi - lo, first.q, -1)
                V1[lo:hi] += np.einsum("lam,lbm->lab", Yt, Yt)
            for t, Lam in zip(self.terms[1:], st.lams[1:]):
                idx = t.offset + np.arange(t.n)[:, None] * t.q + np.arange(t.q)[None, :]
                Pinv = np.einsum("mla,mlb->lab", Linv[:, idx], Linv[:, idx])
                out.append(Lam @ Pinv @ Lam.T)
        return [st.sigma2 * V for V in [V1, *out]]


def fit_cells(
    design: CellDesign,
    method: str = "REML",
    *,
    start: FitResult | Mapping[str, Any] | None = None,
    tol: float = 1e-10,
    max_iter: int = 500,
    ranef: bool = True,
) -> FitResult:
    """Fit a linear mixed model with one or more random-effect terms from per-cell statistics.

    ``method`` is "REML" or "ML"; ``start`` warm-starts from a previous fit (a FitResult or its
    ``to_dict()``, whose "theta" lists every term's theta in the formula's order); ``tol`` is the
    relative tolerance on the deviance and ``max_iter`` bounds the optimiser's iterations.
    """
    method = method.upper()
    if method not in ("REML", "ML"):
        raise ValueError(f"method {method!r} is not one of REML, ML")
    reml = method == "REML"
    t0 = time.perf_counter()
    pls = BlockedPLS(design)
    theta0 = _start_theta(pls, start)
    st, info = _minimise(pls, theta0, reml, tol, max_iter, warm=start is not None)
    res = _result(pls, st, method, info, ranef)
    res.optsummary.theta_start = theta0.tolist()
    res.optsummary.warm_start = start is not None
    res.optsummary.seconds = time.perf_counter() - t0
    return note_confounded(res, _confounded_terms(design))


def _confounded_terms(design: CellDesign) -> list[str]:
    """The terms each of whose levels holds a single row: one cell, whose rows are alike."""
    n, mean, C, live = _checked_cells(design)
    off = mean - mean[0]
    dev = off - (n @ off) / n.sum()
    pooled_var = (np.diagonal(C, axis1=1, axis2=2).sum(axis=0)
                  + np.einsum("c,ca,ca->a", n, dev, dev)) / n.sum()
    alike = alike_rows(n, C, pooled_var)
    out = []
    for t in design.terms:
        codes = np.asarray(t.codes, dtype=np.intp)[live]
        cells = np.bincount(codes, minlength=len(t.levels))
        single = np.bincount(codes, weights=alike, minlength=len(t.levels))
        used = cells > 0
        if ((cells[used] == 1) & (single[used] == 1)).all():
            out.append(t.group)
    return out


def _minimise(
    pls: BlockedPLS, theta0: Array, reml: bool, tol: float, max_iter: int, warm: bool
) -> tuple[BlockedState, dict[str, Any]]:
    """The state at the theta minimising the profiled deviance within lme4's bounds, and what
    the optimiser said.

    COBYQA (Powell's successor to BOBYQA, lme4's optimiser) on the deviance shifted by its value
    at the start and divided by the number of levels (`fit.objective_scale`); from a warm start
    its first steps are short.
    A derivative-free method stops near, not on, a bound that the optimum sits on, so each small
    diagonal element is then tried at exactly 0 and kept there if the deviance is no worse;
    `_polish` then checks the answer by finite differences and refines it.
    """
    lower = np.full(pls.n_theta, -np.inf)
    for t in pls.terms:
        lower[t.theta.start + np.flatnonzero(t.rows == t.cols)] = 0.0
    n_evals = [0]
    # An evaluation factors the whole system, so keep the best state rather than redo it.
    best: list[Any] = [np.inf, None]

    def dev(theta: Array, keep: bool = False) -> float:
        n_evals[0] += 1
        try:
            st = pls.evaluate(np.maximum(theta, lower), reml)
        except NumericalError:
            return np.inf
        d = st.deviance
        if keep and d <= best[0]:
            best[:] = [d, st]
        return d

    d0 = dev(theta0, keep=True)
    if not np.isfinite(d0):
        raise NumericalError("the deviance cannot be evaluated at the starting theta")
    shift, scale = objective_scale(d0, sum(t.n for t in pls.terms))
    opt = minimize(
        lambda th: ((d0 if np.array_equal(th, theta0) else dev(th, keep=True)) - shift) / scale,
        theta0, method="COBYQA", bounds=Bounds(lower, np.full(pls.n_theta, np.inf)),
        options={"maxiter": max_iter, "maxfev": max_iter + 2 * pls.n_theta + 1,
                 "initial_tr_radius": 0.02 if warm else 0.25,
                 "final_tr_radius": min(100.0 * np.sqrt(tol), 0.002 if warm else 0.025)},
    )
    theta = best[1].theta
    for i in np.flatnonzero((lower == 0.0) & (theta > 0) & (theta < BOUNDARY_TRY)):
        trial = best[1].theta.copy()
        trial[i] = 0.0
        dev(trial, keep=True)
    grad = _polish(dev, best[1].theta.copy(), lower, best[0])
    info = {"n_evals": n_evals[0], "iterations": int(getattr(opt, "nit", 0)),
            "converged": bool(opt.success), "message": str(opt.message), "gradient_norm": grad}
    return best[1], info


def _polish(dev: Callable[..., float], theta: Array, lower: Array, f0: float) -> float:
    """Check the optimum by finite differences, as lme4 does, and take the Newton step they give.

    A derivative-free method stops once its trust region is small, which pins the deviance down
    far better than theta along a flat direction (a term with few levels). Central differences
    give the gradient and Hessian in the elements that are a step away from their bound; the
    Newton step within those is kept if the deviance does not rise (``dev`` keeps the best
    state). Returns the largest |d deviance / d theta_i| at ``theta``, counting an element
    within a step of its bound only if the deviance falls inside.
    """
    n = len(theta)
    h = 1e-4 * np.maximum(1.0, np.abs(theta))
    free = theta - h >= lower
    g, H, f_up = np.zeros(n), np.zeros((n, n)), np.zeros(n)
    for i in range(n):
        up = theta.copy()
        up[i] += h[i]
        f_up[i] = dev(up)
        if not free[i]:
            g[i] = min((f_up[i] - f0) / h[i], 0.0)
            continue
        down = theta.copy()
        down[i] -= h[i]
        f_down = dev(down)
        g[i] = (f_up[i] - f_down) / (2.0 * h[i])
        H[i, i] = (f_up[i] + f_down - 2.0 * f0) / h[i] ** 2
    idx = np.flatnonzero(free)
    for a, i in enumerate(idx):
        for j in idx[a + 1:]:
            both = theta.copy()
            both[i] += h[i]
            both[j] += h[j]
            H[i, j] = H[j, i] = (dev(both) - f_up[i] - f_up[j] + f0) / (h[i] * h[j])
    Hf, gf = H[np.ix_(idx, idx)], g[idx]
    if len(idx) and np.isfinite(Hf).all() and np.isfinite(gf).all():
        try:
            C = np.linalg.cholesky(Hf)
        except np.linalg.LinAlgError:   # not convex there: leave the optimiser's answer
            C = None
        if C is not None:
            trial = theta.copy()
            trial[idx] -= np.linalg.solve(C.T, np.linalg.solve(C, gf))
            dev(np.maximum(trial, lower), keep=True)
    finite = g[np.isfinite(g)]
    return float(np.max(np.abs(finite))) if len(finite) else 0.0


def _start_theta(pls: BlockedPLS, start: FitResult | Mapping[str, Any] | None) -> Array:
    """lme4's default start (identity Lambda_k), or a previous fit's theta nudged off its bounds."""
    theta0 = np.zeros(pls.n_theta)
    for t in pls.terms:
        theta0[t.theta] = (t.rows == t.cols).astype(float)
    if start is None:
        return theta0
    prev = np.asarray(start.theta if isinstance(start, FitResult) else start["theta"], dtype=float)
    if prev.shape != theta0.shape or not np.isfinite(prev).all():
        return theta0
    for t in pls.terms:
        diag = t.theta.start + np.flatnonzero(t.rows == t.cols)
        prev[diag] = np.maximum(np.abs(prev[diag]), 1e-4)
    return prev


def _result(
    pls: BlockedPLS, st: BlockedState, method: str, info: dict[str, Any], ranef: bool
) -> FitResult:
    sigma2 = st.sigma2
    theta = st.theta
    Rinv = np.linalg.inv(st.R_X)
    beta = pls.T_X @ st.beta
    if pls.intercept is not None:
        beta[pls.intercept] += pls.r_y
    beta_cov = pls.T_X @ (sigma2 * Rinv @ Rinv.T) @ pls.T_X.T
    modes = pls.conditional_modes(st) if ranef else None
    cvars = pls.conditional_variances(st) if ranef else None
    fits: list[TermFit] = []
    for t in pls.by_formula:
        k = pls.terms.index(t)
        Lam = st.lams[k]
        fits.append(TermFit(
            group=t.design.group, random=list(t.design.random), covariance=t.design.covariance,
            G=sigma2 * Lam @ Lam.T, theta=theta[t.theta].copy(), levels=list(t.design.levels),
            ranef=None if modes is None else modes[k],
            ranef_var=None if cvars is None else cvars[k],
        ))
    diag_theta = np.concatenate([theta[t.theta][t.rows == t.cols] for t in pls.terms])
    singular, notes, opt = fit_report("COBYQA (derivative-free, bounded)", theta, diag_theta, info)
    head = fits[0]
    return FitResult(
        method=method, converged=info["converged"], n_obs=pls.N, n_groups=head.n_levels,
        fixed=list(pls.fixed_names), random=list(head.random), beta=beta, beta_cov=beta_cov,
        G=head.G, sigma2=sigma2, theta=theta.copy(), criterion=st.deviance,
        covariance=head.covariance, optsummary=opt, group_keys=list(head.levels),
        ranef=head.ranef, ranef_var=head.ranef_var, singular=singular, warnings=notes,
        z_centre=np.zeros(len(head.random)), G_centred=head.G.copy(), terms=fits,
    )


# -- set-up helpers ---------------------------------------------------------------------------


def _checked_cells(design: CellDesign) -> tuple[Array, Array, Array, NDArray[np.bool_]]:
    """The (n, mean, C) of the cells with mass, and which cells those are, after checking that
    the statistics are well formed and every term has at least 2 levels with data."""
    n = np.asarray(design.n, dtype=float)
    mean = np.asarray(design.mean, dtype=float)
    C = np.asarray(design.C, dtype=float)
    if n.ndim != 1 or mean.ndim != 2 or mean.shape[0] != n.shape[0] \
            or C.shape != (n.shape[0], mean.shape[1], mean.shape[1]):
        raise DataError(f"cell statistics have inconsistent shapes: n {n.shape}, mean "
                        f"{mean.shape}, C {C.shape}; expected (c,), (c, d), (c, d, d)")
    for name, arr in (("n", n), ("mean", mean), ("C", C)):
        bad = ~np.isfinite(arr.reshape(len(n), -1)).all(axis=1) if len(n) else np.zeros(0, bool)
        if bad.any():
            raise DataError(f"cell statistics {name} are not finite in {int(bad.sum())} cell(s) "
                            f"(first: cell {int(np.flatnonzero(bad)[0])})")
    if (n < 0).any():
        raise DataError(f"cell masses n are negative in {int((n < 0).sum())} cell(s)")
    d = mean.shape[1]
    if len(design.fixed) != len(design.fixed_names):
        raise DataError(f"{len(design.fixed)} fixed effects but {len(design.fixed_names)} names")
    for c in design.fixed:
        if not -1 <= c < d - 1:
            raise DataError(f"fixed-effect column index {c} is not -1 or a covariate of 0..{d - 2}")
    if not design.terms:
        raise DataError("a mixed model needs at least one random-effect term")
    live = n > 0
    for t in design.terms:
        name = f"({' + '.join(t.random)} | {t.group})"
        if t.covariance not in COVARIANCES:
            raise DataError(f"{name}: covariance {t.covariance!r} is not one of "
                            f"{', '.join(COVARIANCES)}")
        if len(t.columns) != len(t.random) or not t.random:
            raise DataError(f"{name}: {len(t.columns)} columns for {len(t.random)} random effects")
        for c in t.columns:
            if not -1 <= c < d - 1:
                raise DataError(f"{name}: column index {c} is not -1 or a covariate of 0..{d - 2}")
        codes = np.asarray(t.codes)
        if codes.shape != n.shape or not np.issubdtype(codes.dtype, np.integer) \
                or (len(codes) and (codes.min() < 0 or codes.max() >= len(t.levels))):
            raise DataError(f"{name}: codes must be one integer per cell in 0..{len(t.levels) - 1}")
        used = np.unique(codes[live]).size
        if used < 2:
            raise DataError(f"{name}: {used} level(s) with data; a random-effect term needs at "
                            "least 2")
    return n[live], mean[live], C[live], live


def _fill_map(A21: sp.csc_matrix, n1: int, q1: int, Q2: int) -> tuple[IntArray, sp.csc_matrix]:
    """The linear map from W to A_21 W A_21' on its lower triangle, flat in Fortran order (A_22's
    layout): (A_21 W A_21')_flat = M @ W.reshape(-1)[order], zero above the diagonal.

    Entry (i, j) sums A_21[i, (l, a)] W_l[a, b] A_21[j, (l, b)] over term 1's levels l, so each
    level adds the products of its column block's entries in pairs. Each unordered pair of a
    level's entries is taken once, at (max row, min row); W_l is symmetric, so a pair of two
    different entries on one row stands for both of its orders there (hence the factor 2).
    Levels with the same number of entries m are done together, on the m x m lower triangle.

    For q_1 = 1 a level's entries lie on distinct rows, sorted (CSC), so the pairs come out on
    the lower triangle already and column by column: M is assembled as CSC directly, its columns
    in the order the levels were visited (``order``), without sorting its millions of entries.
    """
    A21.sort_indices()
    row = A21.indices.astype(np.int64)
    val = A21.data
    counts = np.diff(A21.indptr[::q1]).astype(np.intp)     # entries per level (contiguous)
    starts = A21.indptr[:-1:q1].astype(np.intp)
    col_of = np.repeat(np.arange(n1 * q1) % q1, np.diff(A21.indptr))
    flats, cols, vals, order, per_level = [], [], [], [], []
    for m in np.unique(counts):
        levels = np.flatnonzero(counts == m)
        k1, k2 = np.tril_indices(m)
        e1 = (starts[levels][:, None] + k1[None, :]).ravel()
        e2 = (starts[levels][:, None] + k2[None, :]).ravel()
        order.append(levels)
        per_level.append(np.full(len(levels), len(k1)))
        if q1 == 1:
            flats.append(row[e1] + Q2 * row[e2])
            vals.append(val[e1] * val[e2])
            continue
        r1, r2 = row[e1], row[e2]
        flats.append(np.maximum(r1, r2) + Q2 * np.minimum(r1, r2))
        cols.append(np.repeat(levels, len(k1)) * (q1 * q1) + col_of[e1] * q1 + col_of[e2])
        vals.append(val[e1] * val[e2] * np.where((r1 == r2) & (e1 != e2), 2.0, 1.0))
    flat, v = np.concatenate(flats), np.concatenate(vals)
    if q1 == 1:
        indptr = np.concatenate([[0], np.cumsum(np.concatenate(per_level))])
        return np.concatenate(order), sp.csc_matrix((v, flat, indptr), shape=(Q2 * Q2, n1))
    M = sp.csc_matrix((v, (flat, np.concatenate(cols))), shape=(Q2 * Q2, n1 * q1 * q1))
    return np.arange(n1 * q1 * q1), M


def _check_rank(XtX: Array, names: list[str]) -> None:
    s = np.sqrt(np.maximum(np.diag(XtX), 0.0))
    zero = [names[i] for i in np.flatnonzero(s == 0)]
    if zero:
        raise DataError(f"fixed-effect column(s) {zero} are zero in every row")
    w, V = np.linalg.eigh(XtX / np.outer(s, s))
    if w[0] < 1e-10 * w[-1]:
        involved = [names[i] for i in np.flatnonzero(np.abs(V[:, 0]) > 1e-3)]
        raise DataError(
            f"fixed-effect columns {involved} are linearly dependent (X is rank deficient); "
            "drop one of them"
        )
