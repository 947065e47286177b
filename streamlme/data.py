"""Reading rows from files into the arrays a ModelSpec needs (the batch path of `streamlme fit`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

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
        raw = frame[c]
        text = raw.astype(str)
        blank = raw.isna().to_numpy() | (text.str.strip() == "").to_numpy()
        if blank.any():
            i = int(np.flatnonzero(blank)[0])
            raise DataFileError(f"column {c!r}: row {i + 1} has no level (blank); every row "
                                "needs a level of every grouping column")
        code, levels = pd.factorize(text, sort=True)
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
