"""On-demand effects of several random-effect terms (streamlme.blup.TermsModel), through the
Client, the CLI and the HTTP API.

What they must be (the blup module docstring): for nested terms the exact joint BLUP of the
level's block from its current statistics; for crossed terms the joint BLUP right after a
refresh, and between refreshes one block Gauss-Seidel step from it. The references here are
dense solves over the raw rows: (Z'Z + sigma^2 G^-1)^-1 Z'(y - X beta) and
sigma^2 (Z'Z + sigma^2 G^-1)^-1.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Sequence
from urllib.parse import quote

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from streamlme import blup
from streamlme.blup import TermsModel, group_effects
from streamlme.cli import main
from streamlme.client import Client, TermEffect, TermRequired, UnknownTermError
from streamlme.data import frame_stats
from streamlme.estimate import fit
from streamlme.model import ModelRecord
from streamlme.spec import INTERCEPT, ModelSpec
from streamlme.stats import GroupStats
from streamlme.store import MemoryStore, RedisStore

CROSSED = "y ~ x + (1 + x | s) + (1 | d)"
NESTED = "y ~ x + (1 + x | h) + (1 | h:doc)"
ONE_FACTOR = "y ~ x + (1 | g) + (0 + x | g)"


# -- data and references ------------------------------------------------------------------------


def crossed_rows(n: int = 600, n_s: int = 25, n_d: int = 12, seed: int = 0,
                 s_levels: Sequence[str] | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    s_levels = list(s_levels) if s_levels is not None else [f"s{i}" for i in range(n_s)]
    s = rng.integers(0, len(s_levels), n)
    d = rng.integers(0, n_d, n)
    x = rng.normal(size=n)
    bs = rng.normal(size=(len(s_levels), 2)) * [1.0, 0.4]
    bd = rng.normal(size=n_d) * 0.8
    y = 2.0 + 0.5 * x + bs[s, 0] + bs[s, 1] * x + bd[d] + rng.normal(size=n) * 0.7
    return pd.DataFrame({"s": [s_levels[i] for i in s], "d": [f"d{i}" for i in d], "x": x,
                         "y": y})


def nested_rows(n: int = 500, n_h: int = 8, per_h: int = 5, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, n_h, n)
    doc = rng.integers(0, per_h, n)
    x = rng.normal(size=n)
    bh = rng.normal(size=(n_h, 2)) * [1.0, 0.3]
    bd = rng.normal(size=(n_h, per_h)) * 0.6
    y = 1.0 - 0.3 * x + bh[h, 0] + bh[h, 1] * x + bd[h, doc] + rng.normal(size=n) * 0.5
    return pd.DataFrame({"h": [f"H{i}" for i in h], "doc": [f"d{i}" for i in doc], "x": x,
                         "y": y})


def params(spec: ModelSpec) -> tuple[np.ndarray, float, list[np.ndarray]]:
    """A model to query with (positive definite G, so that the dense reference exists)."""
    beta = np.array([1.5 if t == INTERCEPT else 0.4 for t in spec.fixed])
    G = []
    for k, term in enumerate(spec.terms):
        q = term.q
        A = np.eye(q) * (0.8 + 0.3 * k) + 0.1
        G.append(A @ A.T / q)
    return beta, 0.6, G


def dense_design(df: pd.DataFrame, spec: ModelSpec) -> tuple[np.ndarray, list[list[str]]]:
    """Z of the raw rows, term by term, level by level (sorted), and each term's levels."""
    cells = list(zip(*(df[c].astype(str) for c in spec.grouping_columns)))
    blocks, levels = [], []
    for term in spec.terms:
        lv = spec.term_levels(term, cells)
        uniq = sorted(set(lv))
        where = {u: i for i, u in enumerate(uniq)}
        z = np.column_stack([np.ones(len(df)) if t == INTERCEPT else df[t].to_numpy(float)
                             for t in term.random])
        Z = np.zeros((len(df), term.q * len(uniq)))
        for r, u in enumerate(lv):
            Z[r, term.q * where[u]: term.q * (where[u] + 1)] = z[r]
        blocks.append(Z)
        levels.append(uniq)
    return np.hstack(blocks), levels


def dense_blup(df: pd.DataFrame, spec: ModelSpec, beta, sigma2, G, fixed=None):
    """Per term {level: (b, cov)}: the joint BLUP from raw rows, the terms in ``fixed`` held at
    the given modes (term index -> {level: b}) and left out of the solve."""
    fixed = fixed or {}
    Z, levels = dense_design(df, spec)
    X = np.column_stack([np.ones(len(df)) if t == INTERCEPT else df[t].to_numpy(float)
                         for t in spec.fixed])
    r = df[spec.response].to_numpy(float) - X @ beta
    cols, Ginv, out_at = [], [], {}
    o = 0
    for k, term in enumerate(spec.terms):
        width = term.q * len(levels[k])
        if k in fixed:
            bk = np.concatenate([fixed[k].get(lv, np.zeros(term.q)) for lv in levels[k]])
            r = r - Z[:, o:o + width] @ bk
        else:
            out_at[k] = (len(np.concatenate(cols)) if cols else 0)
            cols.append(np.arange(o, o + width))
            Ginv += [np.linalg.inv(G[k])] * len(levels[k])
        o += width
    sel = np.concatenate(cols)
    Zs = Z[:, sel]
    Gi = np.zeros((len(sel), len(sel)))
    i = 0
    for B in Ginv:
        Gi[i:i + len(B), i:i + len(B)] = B
        i += len(B)
    M = Zs.T @ Zs + sigma2 * Gi
    b = np.linalg.solve(M, Zs.T @ r)
    V = sigma2 * np.linalg.inv(M)
    res: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for k, start in out_at.items():
        q = spec.terms[k].q
        res[k] = {lv: (b[start + q * j: start + q * (j + 1)],
                       V[start + q * j: start + q * (j + 1), start + q * j: start + q * (j + 1)])
                  for j, lv in enumerate(levels[k])}
    return res


def model_of(spec, beta, sigma2, G, ranef=None) -> TermsModel:
    return TermsModel(spec, beta, sigma2, G, ranef=ranef)


def modes(sol, k) -> dict[str, np.ndarray]:
    return dict(zip(sol.levels[k], sol.b[k]))


# -- the core -----------------------------------------------------------------------------------


@pytest.mark.parametrize("formula", [CROSSED, NESTED, ONE_FACTOR])
def test_the_joint_solution_from_cells_is_the_dense_blup_of_the_rows(formula):
    df = nested_rows() if "h" in formula else crossed_rows()
    if formula == ONE_FACTOR:
        df = df.rename(columns={"s": "g"})
    spec = ModelSpec.from_formula(formula)
    beta, sigma2, G = params(spec)
    sol = model_of(spec, beta, sigma2, G).joint(frame_stats(df, spec), covariances=True)
    ref = dense_blup(df, spec, beta, sigma2, G)
    for k in range(len(spec.terms)):
        for j, lv in enumerate(sol.levels[k]):
            np.testing.assert_allclose(sol.b[k][j], ref[k][lv][0], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(sol.cov[k][j], ref[k][lv][1], rtol=1e-9, atol=1e-12)


def test_nested_effects_are_the_exact_joint_blup_of_the_outer_level():
    df = nested_rows()
    spec = ModelSpec.from_formula(NESTED)
    beta, sigma2, G = params(spec)
    tm = model_of(spec, beta, sigma2, G)
    assert tm.nested and tm.shared == ("h",)
    stats = frame_stats(df, spec)
    ref = dense_blup(df, spec, beta, sigma2, G)
    for k, name in enumerate(["h", "doc"]):          # "doc" finds the term on h:doc
        for lv, (b, V) in ref[k].items():
            eff = tm.level_effect(name, lv, stats)
            assert eff.solution == "exact" and eff.known
            np.testing.assert_allclose(eff.b, b, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(eff.cov, V, rtol=1e-9, atol=1e-12)
    # the block alone answers the same: the other hospitals' cells do not matter
    h0 = stats.select([k for k in stats.keys if json.loads(k)[0] == "H0"])
    lv = next(iter(ref[1]))
    if lv.startswith("H0:"):
        np.testing.assert_allclose(tm.level_effect("doc", lv, h0).b, ref[1][lv][0], rtol=1e-12)
    eff = tm.level_effect("h:doc", ("H0", "d1"), h0)
    np.testing.assert_allclose(eff.b, ref[1]["H0:d1"][0], rtol=1e-9)
    assert eff.n == pytest.approx(float(((df.h == "H0") & (df.doc == "d1")).sum()))
    assert eff.cells == 1


def test_several_terms_on_one_factor_answer_together_with_their_joint_covariance():
    df = crossed_rows().rename(columns={"s": "g"})
    spec = ModelSpec.from_formula(ONE_FACTOR)
    beta, sigma2, G = params(spec)
    tm = model_of(spec, beta, sigma2, G)
    stats = frame_stats(df, spec)
    # the dense joint covariance of both terms at one level
    ref = dense_blup(df, spec, beta, sigma2, G)
    eff = tm.level_effect("g", "s3", stats)
    assert eff.names == ["(Intercept)", "x"] and eff.cov.shape == (2, 2)
    np.testing.assert_allclose(eff.b, [ref[0]["s3"][0][0], ref[1]["s3"][0][0]], rtol=1e-9)
    np.testing.assert_allclose(np.diag(eff.cov), [ref[0]["s3"][1][0, 0], ref[1]["s3"][1][0, 0]],
                               rtol=1e-9)
    # a one-term-per-column model is independent per level: the cross-covariance is the one of
    # (1 + x || g), the diagonal one-term model, which the one-term kernel computes
    diag = ModelSpec("y", ["1", "x"], ["1", "x"], "g", covariance="diagonal")
    one = group_effects(stats.select(["s3"]), diag, beta, np.diag([G[0][0, 0], G[1][0, 0]]),
                        sigma2)
    np.testing.assert_allclose(eff.cov, one.cov[0], rtol=1e-9)
    np.testing.assert_allclose(eff.b, one.b[0], rtol=1e-9)


def test_one_term_is_the_one_term_kernel_in_its_centred_basis():
    df = crossed_rows()
    df["x"] += 1e4                       # a covariate far from zero: the centred basis matters
    spec = ModelSpec("y", ["1", "x"], ["1", "x"], "s")
    stats = frame_stats(df, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit(stats, spec, ranef=False)
    rec = ModelRecord.from_fit(res, spec)
    tm = rec.terms_model()
    ref = rec.effects(stats)
    for i, key in enumerate(stats.keys[:8]):
        eff = tm.level_effect("s", key, stats)
        np.testing.assert_allclose(eff.b, ref.b[i], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(eff.cov, ref.cov[i], rtol=1e-8, atol=1e-14)
        assert eff.shrinkage == pytest.approx(float(ref.shrinkage[i]), rel=1e-10)


def test_the_joint_blup_is_a_fixed_point_of_the_crossed_step():
    df = crossed_rows()
    spec = ModelSpec.from_formula(CROSSED)
    beta, sigma2, G = params(spec)
    stats = frame_stats(df, spec)
    joint = model_of(spec, beta, sigma2, G).joint(stats)
    tm = model_of(spec, beta, sigma2, G, ranef=[modes(joint, 0), modes(joint, 1)])
    assert not tm.nested
    for k, name in enumerate(["s", "d"]):
        for lv, b in modes(joint, k).items():
            eff = tm.level_effect(name, lv, stats)
            assert eff.solution == "gauss_seidel"
            np.testing.assert_allclose(eff.b, b, rtol=1e-10, atol=1e-13)


def test_the_crossed_step_given_the_others_is_the_dense_conditional_blup():
    df = crossed_rows()
    spec = ModelSpec.from_formula(CROSSED)
    beta, sigma2, G = params(spec)
    stats = frame_stats(df, spec)
    rng = np.random.default_rng(7)
    held_d = {f"d{i}": rng.normal(size=1) for i in range(12)}
    held_s = {f"s{i}": rng.normal(size=2) for i in range(25)}
    tm = model_of(spec, beta, sigma2, G, ranef=[held_s, held_d])
    ref_s = dense_blup(df, spec, beta, sigma2, G, fixed={1: held_d})[0]
    ref_d = dense_blup(df, spec, beta, sigma2, G, fixed={0: held_s})[1]
    for name, ref in (("s", ref_s), ("d", ref_d)):
        for lv, (b, V) in ref.items():
            eff = tm.level_effect(name, lv, stats)
            np.testing.assert_allclose(eff.b, b, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(eff.cov, V, rtol=1e-9, atol=1e-12)   # sigma^2 (..)^-1


def test_between_refreshes_crossed_effects_move_towards_the_new_joint_solution():
    spec = ModelSpec.from_formula(CROSSED)
    beta, sigma2, G = params(spec)
    old = crossed_rows(n=500, seed=0)
    new = crossed_rows(n=400, seed=11)
    new = new[new.s.isin(["s1", "s2", "s3"])].copy()
    new["y"] += 1.5                     # those subjects moved
    before, after = frame_stats(old, spec), frame_stats(pd.concat([old, new]), spec)
    j0 = model_of(spec, beta, sigma2, G).joint(before)
    j1 = model_of(spec, beta, sigma2, G).joint(after)
    ranef = [modes(j0, 0), modes(j0, 1)]
    tm = model_of(spec, beta, sigma2, G, ranef=ranef)
    target = modes(j1, 0)
    for lv in ["s1", "s2", "s3"]:
        step = tm.level_effect("s", lv, after).b
        assert np.linalg.norm(step - target[lv]) < 0.5 * np.linalg.norm(ranef[0][lv] - target[lv])
    # untouched subjects barely move (only through the d effects held at the refresh's)
    for lv in ["s5", "s9"]:
        np.testing.assert_allclose(tm.level_effect("s", lv, after).b, ranef[0][lv], rtol=1e-10)
    # repeating the step over every level (Gauss-Seidel sweeps) reaches the new joint solution
    sweep = model_of(spec, beta, sigma2, G, ranef=ranef)

    def error() -> float:
        return max(float(np.max(np.abs(sweep.parts[k].ranef[lv] - b)))
                   for k in range(2) for lv, b in modes(j1, k).items())

    errors = [error()]
    for _ in range(100):
        for k, name in enumerate(["s", "d"]):
            for lv in j1.levels[k]:
                sweep.parts[k].ranef[lv] = sweep.level_effect(name, lv, after).b
        errors.append(error())
    assert errors[-1] < 1e-4 * errors[0]
    assert all(b <= a * 1.000001 for a, b in itertools.pairwise(errors[5:]))


def test_a_level_never_seen_is_zero_with_the_prior():
    spec = ModelSpec.from_formula(NESTED)
    beta, sigma2, G = params(spec)
    stats = frame_stats(nested_rows(), spec)
    tm = model_of(spec, beta, sigma2, G)
    for name, level, Gk in (("h", "nowhere", G[0]), ("doc", "H0:nobody", G[1]),
                            ("doc", "H99:d0", G[1])):
        eff = tm.level_effect(name, level, stats)
        assert not eff.known and eff.n == 0 and eff.cells == 0
        np.testing.assert_array_equal(eff.b, np.zeros(len(Gk)))
        np.testing.assert_array_equal(eff.cov, Gk)
    eff = tm.level_effect("h", "x", GroupStats.empty(len(spec.columns)))
    assert not eff.known


def test_a_large_block_takes_the_sparse_path_with_the_same_numbers(monkeypatch):
    df = nested_rows(n=800, n_h=3, per_h=40)
    spec = ModelSpec.from_formula(NESTED)
    beta, sigma2, G = params(spec)
    stats = frame_stats(df, spec)
    tm = model_of(spec, beta, sigma2, G)
    dense = [tm.level_effect("doc", lv, stats) for lv in ("H0:d3", "H2:d17")]
    dense.append(tm.level_effect("h", "H1", stats))
    monkeypatch.setattr(blup, "DENSE_MAX", 10)
    sparse = [tm.level_effect("doc", lv, stats) for lv in ("H0:d3", "H2:d17")]
    sparse.append(tm.level_effect("h", "H1", stats))
    for a, b in zip(dense, sparse):
        np.testing.assert_allclose(b.b, a.b, rtol=1e-9)
        np.testing.assert_allclose(b.cov, a.cov, rtol=1e-9)
        assert b.shrinkage == pytest.approx(a.shrinkage, rel=1e-9)
    # the joint solution too (modes only, as a refresh would want them)
    j = tm.joint(stats)
    monkeypatch.setattr(blup, "DENSE_MAX", 10_000)
    jd = tm.joint(stats)
    for k in range(2):
        np.testing.assert_allclose(j.b[k], jd.b[k], rtol=1e-9, atol=1e-12)


def test_an_unknown_factor_names_the_terms():
    spec = ModelSpec.from_formula(CROSSED)
    tm = model_of(spec, *params(spec))
    with pytest.raises(ValueError, match=r"no random-effect term on 'plate'.*'s', 'd'"):
        tm.level_effect("plate", "a", GroupStats.empty(3))


# -- a real fit, stored and queried ---------------------------------------------------------------


def fitted(df: pd.DataFrame, spec: ModelSpec) -> ModelRecord:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit(frame_stats(df, spec), spec, ranef=True)
    return ModelRecord.from_fit(res, spec)


@pytest.mark.parametrize("formula", [CROSSED, NESTED])
def test_right_after_a_refresh_effects_are_the_fits_conditional_modes(formula):
    """The stored record's modes (the blocked engine's ranef) are what every level answers
    when no event has arrived since the fit: exactly, to rounding."""
    df = crossed_rows() if formula == CROSSED else nested_rows()
    spec = ModelSpec.from_formula(formula)
    rec = ModelRecord.from_json(fitted(df, spec).to_json())
    stats = frame_stats(df, spec)
    tm = rec.terms_model()
    for k, term in enumerate(spec.terms):
        stored = rec.fit["terms"][k]["ranef"]
        assert len(stored) == len(set(spec.term_levels(term, spec.cell_levels(stats.keys))))
        for lv, b in stored.items():
            np.testing.assert_allclose(tm.level_effect(term.group, lv, stats).b, b, rtol=1e-10,
                                       atol=1e-12)


@pytest.fixture(params=["memory", "redis"])
def store(request, namespace):
    if request.param == "memory":
        yield MemoryStore()
        return
    s = RedisStore(request.getfixturevalue("redis_url"), namespace)
    yield s
    s.clear()


def load(store, df: pd.DataFrame, spec: ModelSpec, chunk: int = 97) -> None:
    for i in range(0, len(df), chunk):
        assert store.merge(frame_stats(df.iloc[i:i + chunk], spec)).applied


def test_the_client_answers_a_term_from_the_current_cells(store):
    spec = ModelSpec.from_formula(NESTED)
    df = nested_rows()
    load(store, df, spec)
    rec = fitted(df, spec)
    version = store.put_model(rec.to_json())
    client = Client(store)
    tm = rec.terms_model()
    stats = frame_stats(df, spec)
    for name, level in (("h", "H3"), ("doc", "H3:d2"), ("h:doc", "H0:d4"),
                        ("doc", ("H1", "d0"))):
        got = client.effect(level, term=name) if isinstance(level, str) else \
            client.term_effect(name, level)
        want = tm.level_effect(name, level, stats)
        assert isinstance(got, TermEffect) and got.model_version == version
        assert got.term == want.factor and got.level == want.level and got.solution == "exact"
        np.testing.assert_allclose(list(got.effect.values()), want.b, rtol=1e-12)
        np.testing.assert_allclose(got.cov, want.cov, rtol=1e-12)
        assert got.n == want.n and got.cells == want.cells
    line = client.effect("H3:d2", term="doc").to_dict()
    assert list(line) == ["term", "level", "group", "n", "effect", "cov", "shrinkage",
                          "model_version", "known", "cells", "solution"]
    assert line["term"] == "h:doc" and line["group"] == "H3:d2"
    # new events move the effect before any refresh, exactly as the block's new statistics say
    more = nested_rows(n=400, seed=9)
    more = more[(more.h == "H3") & (more.doc == "d2")].assign(y=lambda f: f.y + 3.0)
    assert len(more) > 3
    before = client.effect("H3:d2", term="doc")
    load(store, more, spec)
    now = client.effect("H3:d2", term="doc")
    want = tm.level_effect("doc", "H3:d2", frame_stats(pd.concat([df, more]), spec))
    np.testing.assert_allclose(list(now.effect.values()), want.b, rtol=1e-12)
    assert now.effect["(Intercept)"] > before.effect["(Intercept)"]
    never = client.effect("H3:nobody", term="doc")
    assert not never.known and never.cov == rec.fit["terms"][1]["G"]
    with pytest.raises(UnknownTermError, match="'h', 'h:doc'"):
        client.effect("H3", term="ward")
    with pytest.raises(TermRequired, match="name the term"):
        client.effect("H3")


def test_the_client_on_crossed_terms_and_levels_holding_colons(store):
    spec = ModelSpec.from_formula(CROSSED)
    levels = [f"s{i}" for i in range(20)] + ["a:b", "x:y:z", "é/{ }"]
    df = crossed_rows(s_levels=levels)
    load(store, df, spec)
    rec = fitted(df, spec)
    store.put_model(rec.to_json())
    client = Client(store)
    tm = rec.terms_model()
    stats = frame_stats(df, spec)
    for lv in ["a:b", "x:y:z", "é/{ }", "s4"]:
        got = client.effect(lv, term="s")
        assert got.solution == "gauss_seidel" and got.known
        np.testing.assert_allclose(list(got.effect.values()), tm.level_effect("s", lv, stats).b,
                                   rtol=1e-12)
        # no event since the fit: the stored conditional modes
        np.testing.assert_allclose(list(got.effect.values()),
                                   rec.fit["terms"][0]["ranef"][lv], rtol=1e-10, atol=1e-12)
    got = client.effects(["d3", "d0"], term="d")
    assert [e.level for e in got] == ["d3", "d0"]


def test_a_one_term_model_answers_the_term_route_as_the_group_route(store):
    spec = ModelSpec("y", ["1", "x"], ["1", "x"], "s")
    df = crossed_rows()
    load(store, df, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store.put_model(ModelRecord.from_fit(fit(frame_stats(df, spec), spec), spec).to_json())
    client = Client(store)
    for lv in ["s2", "never"]:
        by_term, by_group = client.effect(lv, term="s"), client.effect(lv)
        assert by_term.effect == by_group.effect and by_term.cov == by_group.cov
        assert by_term.to_dict()["group"] == by_group.to_dict()["group"] == lv


# -- CLI and HTTP -----------------------------------------------------------------------------------


@pytest.fixture
def crossed_config(redis_url, namespace, tmp_path):
    spec = ModelSpec.from_formula(CROSSED)
    df = crossed_rows()
    store = RedisStore(redis_url, namespace)
    load(store, df, spec)
    rec = fitted(df, spec)
    store.put_model(rec.to_json())
    path = tmp_path / "c.toml"
    path.write_text(f'[model]\nformula = "{CROSSED}"\n\n[redis]\nurl = "{redis_url}"\n'
                    f'namespace = "{namespace}"\n')
    yield path, rec
    store.clear()


def test_the_cli_names_the_term(crossed_config):
    path, _ = crossed_config
    run = CliRunner().invoke(main, ["effect", "s3", "nobody", "--term", "s", "--config",
                                    str(path), "--json"])
    assert run.exit_code == 0, run.output
    lines = [json.loads(line) for line in run.output.splitlines()]
    assert [ln["level"] for ln in lines] == ["s3", "nobody"] and lines[0]["term"] == "s"
    assert lines[0]["solution"] == "gauss_seidel" and lines[1]["known"] is False
    text = CliRunner().invoke(main, ["effect", "d1", "--term", "d", "--config", str(path)])
    assert text.exit_code == 0 and text.output.startswith("d d1: (Intercept) ")
    bad = CliRunner().invoke(main, ["effect", "s3", "--term", "plate", "--config", str(path)])
    assert bad.exit_code == 1 and "no random-effect term on 'plate'" in bad.output
    bare = CliRunner().invoke(main, ["effect", "s3", "--config", str(path)])
    assert bare.exit_code == 1 and "name the term" in bare.output


def test_the_http_term_route(crossed_config):
    from fastapi.testclient import TestClient

    from streamlme.api.app import create_app
    from streamlme.config import load_config

    path, _ = crossed_config
    http = TestClient(create_app(load_config(path, env={})))
    client = Client(load_config(path, env={}))
    r = http.get(f"/v1/terms/s/levels/{quote('s3', safe='')}/effect")
    assert r.status_code == 200 and r.json() == client.effect("s3", term="s").to_dict()
    assert http.get("/v1/terms/d/levels/nobody/effect").json()["known"] is False
    r = http.get("/v1/terms/plate/levels/a/effect")
    assert r.status_code == 404 and r.json()["error"] == "unknown_term"
    assert r.json()["detail"][0]["terms"] == ["s", "d"]
    r = http.get("/v1/groups/s3/effect")
    assert r.status_code == 422 and r.json()["error"] == "term_required"
    schema = http.get("/openapi.json").json()
    route = schema["paths"]["/v1/terms/{term}/levels/{level}/effect"]["get"]
    assert {"200", "404", "422", "503"} <= set(route["responses"])
