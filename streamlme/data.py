"""Reading rows from files into the arrays a ModelSpec needs (the batch path of `streamlme fit`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from streamlme.events import MAX_GROUP_BYTES, _level_problem
from streamlme.spec import ModelSpec, SpecError
from streamlme.stats import GroupStats


class DataFileError(ValueError):
    """A data file that cannot be read as the model's rows."""


def read_table(path: str | Path, text_columns: Sequence[str] = ()) -> pd.DataFrame:
    """A CSV, JSON-lines or Parquet file as a DataFrame; ``text_columns`` (the grouping
    columns) are read as text, so ids ``007`` and ``7`` stay two levels, as in the stream."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    as_text = dict.fromkeys(text_columns, str)
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True, dtype=as_text or None)
        # only an empty cell is missing: a group named "NA" is a group
        return pd.read_csv(path, dtype=as_text or None, keep_default_na=False, na_values=[""])
    except (ValueError, OSError, ImportError) as exc:
        raise DataFileError(f"{path}: cannot read as {suffix or 'csv'}: {exc}") from exc


def frame_levels(frame: pd.DataFrame) -> Callable[[str], list[str] | None]:
    """The levels of a frame's categorical and text columns, as R's ``factor`` takes them
    (a pandas Categorical keeps its own order; text is sorted); None for numeric columns."""

    def levels_of(column: str) -> list[str] | None:
        if column not in frame.columns:
            return None
        col = frame[column]
        if isinstance(col.dtype, pd.CategoricalDtype):
            return [str(v) for v in col.cat.categories]
        if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            return None
        return sorted({str(v) for v in col.dropna()})

    return levels_of


def frame_cells(frame: pd.DataFrame, spec: ModelSpec) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(cell code per row, cell keys, W with spec.columns) from a frame.

    Errors name the bad column and row: a missing column, a blank level, a value that is not a
    finite number, a categorical level the spec does not declare.
    """
    try:
        spec.check_columns(frame.columns)
    except SpecError as exc:
        raise DataFileError(str(exc)) from exc
    numeric = {c: _numeric(frame, c) for c in spec.numeric_inputs}
    codes = {}
    for c in spec.categorical_inputs:
        values = frame[c].astype(str).to_numpy()
        code = spec.level_codes(c, values)
        if (code < 0).any():
            i = int(np.flatnonzero(code < 0)[0])
            raise DataFileError(
                f"column {c!r}: row {i + 1} holds {values[i]!r}, not one of its levels "
                f"{', '.join(spec.levels[c])}"
            )
        codes[c] = code
    W = spec.design_matrix(numeric, codes)
    parts, uniques = [], []
    for c in spec.grouping_columns:
        code, levels = pd.factorize(group_ids(frame, c), sort=True)
        parts.append(code.astype(np.int64))
        uniques.append([str(v) for v in levels])
    # one integer per row (mixed radix over the grouping columns), then the distinct cells
    combined = np.zeros(len(frame), dtype=np.int64)
    for code, levels in zip(parts, uniques):
        combined = combined * len(levels) + code
    cells, inverse = np.unique(combined, return_inverse=True)
    digits = []
    for levels in reversed(uniques):
        digits.append(cells % len(levels))
        cells = cells // len(levels)
    digits.reverse()
    keys = [spec.cell_key([uniques[k][int(d[i])] for k, d in enumerate(digits)])
            for i in range(len(digits[0]))]
    return inverse.ravel(), keys, W


def group_ids(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A grouping column's ids as text, by the stream's rule: an id is a string, kept as it is
    (``007`` and ``7`` are two groups), or an integer, written in decimal (``7``); a float
    column's whole numbers count as integers (``1.0`` is ``1``: a column read as float because
    of a missing cell). A missing or empty id, any other value, and an id the stream refuses
    (over 256 bytes) raise DataFileError naming the column and the first such row.
    """
    col = frame[column]
    if isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype(object)
    if pd.api.types.is_bool_dtype(col.dtype):
        _refuse_id(column, 0, col.iloc[0] if len(col) else None)
    missing = col.isna().to_numpy()
    if missing.any():
        _refuse_id(column, int(np.flatnonzero(missing)[0]), None)
    if pd.api.types.is_integer_dtype(col.dtype):
        text = col.astype(str).to_numpy(dtype=object)
    elif pd.api.types.is_float_dtype(col.dtype):
        values = col.to_numpy(dtype=float)
        whole = np.isfinite(values) & (values == np.floor(values))
        if not whole.all():
            i = int(np.flatnonzero(~whole)[0])
            _refuse_id(column, i, col.iloc[i])
        text = np.array([str(int(v)) for v in values], dtype=object)
    else:
        values = col.to_numpy(dtype=object)
        text = values if pd.api.types.infer_dtype(values, skipna=False) == "string" \
            else np.array([_id_text(column, i, v) for i, v in enumerate(values)], dtype=object)
    bad = [i for i, v in enumerate(text) if _level_problem(v) is not None] \
        if not _plain_ids(text) else []
    if bad:
        _refuse_id(column, bad[0], text[bad[0]])
    return text


def _id_text(column: str, row: int, value: object) -> str:
    """One id of a column of mixed values (JSON lines), by `group_ids`' rule."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        _refuse_id(column, row, value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        return str(int(value))
    _refuse_id(column, row, value)
    raise AssertionError  # unreachable: _refuse_id raises


def _plain_ids(text: np.ndarray) -> bool:
    """Every id non-empty and short enough, checked at C speed (the usual case)."""
    if not len(text):
        return True
    lengths = pd.Series(text, dtype=object).str.len().to_numpy()
    return bool(lengths.min() > 0 and lengths.max() <= MAX_GROUP_BYTES // 4)


def _refuse_id(column: str, row: int, value: object) -> None:
    if value is None or (isinstance(value, str) and value == ""):
        raise DataFileError(f"column {column!r}: row {row + 1} has no level (blank); every row "
                            "needs a level of every grouping column")
    if isinstance(value, np.generic):
        value = value.item()
    problem = _level_problem(value) if isinstance(value, str) else None
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise DataFileError(f"column {column!r}: row {row + 1} holds {shown}, not a group id "
                        f"({problem or 'a group id is a string or an integer, as in the stream'})")


def _numeric(frame: pd.DataFrame, c: str) -> np.ndarray:
    col = pd.to_numeric(frame[c], errors="coerce")
    bad = col.isna() | ~np.isfinite(col.to_numpy(dtype=float, na_value=np.nan))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataFileError(
            f"column {c!r}: row {i + 1} holds {frame[c].iloc[i]!r}, not a finite number "
            f"({int(bad.sum())} such rows)"
        )
    return col.to_numpy(dtype=float)


def frame_stats(frame: pd.DataFrame, spec: ModelSpec,
                weights: np.ndarray | None = None) -> GroupStats:
    """Per-cell statistics of every row of a frame."""
    codes, keys, W = frame_cells(frame, spec)
    return GroupStats.from_codes(codes, keys, W, weights)


def stats_from_file(path: str | Path, spec: ModelSpec) -> GroupStats:
    """Per-cell statistics of every row of a data file."""
    return frame_stats(read_table(path, spec.grouping_columns), spec)
