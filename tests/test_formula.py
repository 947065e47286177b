"""lme4 formulas: the grammar, categorical coding against formulaic's own model matrices, errors
that point at the character, and specs that survive serialisation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from formulaic import model_matrix
from hypothesis import given, settings
from hypothesis import strategies as st

from streamlme.data import frame_cells, frame_levels
from streamlme.formula import FormulaError, grouping_columns, parse
from streamlme.spec import ModelSpec, SpecError


@pytest.mark.parametrize(
    ("formula", "fixed", "terms"),
    [
        ("y ~ 1 + x + (1 + x | g) + (1 | h)", ("1", "x"), ["(1 + x | g)", "(1 | h)"]),
        ("y ~ x + (x | g)", ("1", "x"), ["(1 + x | g)"]),
        ("y ~ 0 + x + (0 + x | g)", ("x",), ["(0 + x | g)"]),
        ("y ~ x - 1 + (x - 1 | g)", ("x",), ["(0 + x | g)"]),
        ("y ~ x + (1 + x || g)", ("1", "x"), ["(1 + x || g)"]),
        ("y ~ 1 + (1 | g:h)", ("1",), ["(1 | g:h)"]),
        ("y ~ 1 + (1 | a/b/c)", ("1",), ["(1 | a)", "(1 | a:b)", "(1 | a:b:c)"]),
        ("y ~ x + (x | a/b)", ("1", "x"), ["(1 + x | a)", "(1 + x | a:b)"]),
        ("y ~ 1 + (1 | g) + (0 + x | g)", ("1",), ["(1 | g)", "(0 + x | g)"]),
        ("y ~ x*z + (1 | s) + (1 | d)", ("1", "x", "z", "x:z"), ["(1 | s)", "(1 | d)"]),
    ],
)
def test_grammar(formula: str, fixed: tuple[str, ...], terms: list[str]) -> None:
    spec = parse(formula)
    assert spec.fixed == fixed
    assert [t.formula() for t in spec.terms] == terms
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_one_term_formula_is_the_shorthand_spec() -> None:
    spec = parse("Reaction ~ Days + (Days | Subject)")
    short = ModelSpec("Reaction", ["1", "Days"], ["1", "Days"], "Subject")
    assert (spec.fixed, spec.terms, spec.columns) == (short.fixed, short.terms, short.columns)
    assert spec.is_simple


def test_printed_formulas_use_lme4_notation() -> None:
    assert ModelSpec("y", ["Days"], ["Days"], "Subject").formula == \
        "y ~ 0 + Days + (0 + Days | Subject)"
    assert ModelSpec("y", ["1"], ["1", "x"], "g", "diagonal").formula == "y ~ 1 + (1 + x || g)"


def test_grouping_columns_without_the_data() -> None:
    assert grouping_columns("y ~ C(f) + (1 | a/b) + (x || c)") == ("a", "b", "c")


@pytest.mark.parametrize(
    ("formula", "at", "expected"),
    [
        ("y ~ x + (1 | g", 14, "expected ')'"),
        ("y ~ x + (1 | )", 13, "grouping factor"),
        ("y ~ x + ( | g)", 9, "random terms before '|'"),
        ("y x", 3, "'~'"),
        ("y ~ x", 5, "random-effect term"),
        ("y ~ log(x) + (1 | g)", 4, "column name or C(column"),
        ("y ~ C(f) + (1 | g)", 4, "levels of categorical 'f'"),
        ("y ~ x + + (1 | g)", 8, "between '+' signs"),
        ("y ~ x + (1 | g h)", 13, "grouping column name"),
    ],
)
def test_errors_point_at_the_character(formula: str, at: int, expected: str) -> None:
    with pytest.raises(FormulaError) as info:
        parse(formula)
    assert info.value.at == at
    assert expected in str(info.value)
    pointer = str(info.value).splitlines()[-1]
    assert pointer.index("^") - 2 == at


def test_not_a_string() -> None:
    with pytest.raises(SpecError, match="expected a string"):
        parse(["y", "x"])  # type: ignore[arg-type]


def _frame(seed: int, n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "g": rng.choice(["g1", "g2", "g3"], n),
        "f": rng.choice(["a", "b", "c"], n),
        "h": rng.choice(["u", "v"], n),
        "x": rng.normal(size=n),
        "y": rng.normal(size=n),
    })


# f:h beside an intercept alone is left out: R codes both factors fully there (a rank-deficient
# X, which lme4 trims and streamlme refuses, naming the columns), formulaic reduces the rank.
@pytest.mark.parametrize("rhs", ["1 + f", "0 + f", "x + f", "x*f", "1 + f + h + f:h",
                                 "0 + x:f", "x + x:f", "f*h"])
def test_categorical_coding_equals_formulaics_model_matrix(rhs: str) -> None:
    """Treatment contrasts and full dummy coding as R (and formulaic) choose them."""
    df = _frame(0)
    spec = parse(f"y ~ {rhs} + (1 | g)", levels_of=frame_levels(df))
    _, _, W = frame_cells(df, spec)
    ours = {name: W[:, spec.columns.index(name)] for name in spec.fixed if name != "1"}
    theirs = model_matrix(f"{rhs}", df)
    assert len(theirs.columns) == len(spec.fixed)
    want = [c for c in theirs.columns if c != "Intercept"]
    assert len(want) == len(ours)
    for (name, col), ref in zip(ours.items(), want):
        np.testing.assert_array_equal(col, theirs[ref].to_numpy(), err_msg=f"{name} vs {ref}")


def test_declared_levels_fix_the_reference_and_the_order() -> None:
    spec = parse('y ~ C(f, levels=["c", "a", "b"]) + (1 | g)')
    assert spec.fixed == ("1", "fa", "fb")
    assert spec.levels == {"f": ("c", "a", "b")}
    spec2 = parse("y ~ f + (1 | g)", levels={"f": ["c", "a", "b"]})
    assert spec2.fixed == spec.fixed
    assert ModelSpec.from_dict(spec2.to_dict()) == spec2


def test_unknown_level_in_a_file_names_row_and_levels() -> None:
    from streamlme.data import DataFileError

    df = _frame(1)
    spec = parse('y ~ C(f, levels=["a", "b"]) + (1 | g)')
    with pytest.raises(DataFileError, match=r"column 'f': row \d+ holds 'c', not one of its"):
        frame_cells(df, spec)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["A", "B", '"', "[,]", "a:b", "\u00e9"]),
                          st.sampled_from(["x", "y", "", " ", "1"])), min_size=1, max_size=8))
def test_cell_keys_round_trip_any_level(levels: list[tuple[str, str]]) -> None:
    spec = parse("y ~ 1 + (1 | p) + (1 | q)")
    keys = [spec.cell_key(list(lv)) for lv in levels]
    assert spec.cell_levels(keys) == levels
    assert len(set(keys)) == len(set(levels))
