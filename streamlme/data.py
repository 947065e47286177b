"""Reading rows from files into the arrays a ModelSpec needs (the batch path of `streamlme fit`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from streamlme.spec import ModelSpec, SpecError
from streamlme.stats import GroupStats


class DataFileError(ValueError):
    """A data file that cannot be read as the model's rows."""


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV, JSON-lines or Parquet file as a DataFrame (the group column kept as text)."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True)
        return pd.read_csv(path)
    except (ValueError, OSError, ImportError) as exc:
        raise DataFileError(f"{path}: cannot read as {suffix or 'csv'}: {exc}") from exc


def frame_arrays(frame: pd.DataFrame, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """(group ids as str, W with spec.columns) from a frame; errors name the bad column/row."""
    try:
        spec.check_columns(frame.columns)
    except SpecError as exc:
        raise DataFileError(str(exc)) from exc
    cols = []
    for c in spec.columns:
        col = pd.to_numeric(frame[c], errors="coerce")
        bad = col.isna() | ~np.isfinite(col.to_numpy(dtype=float, na_value=np.nan))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataFileError(
                f"column {c!r}: row {i + 1} holds {frame[c].iloc[i]!r}, not a finite number "
                f"({int(bad.sum())} such rows)"
            )
        cols.append(col.to_numpy(dtype=float))
    groups = frame[spec.group].astype(str).to_numpy()
    return groups, np.column_stack(cols)


def stats_from_file(path: str | Path, spec: ModelSpec) -> GroupStats:
    """Per-group statistics of every row of a data file."""
    groups, W = frame_arrays(read_table(path), spec)
    return GroupStats.from_rows(groups, W)
