"""Your own table as a :class:`~fairopt.data.Dataset`: :func:`from_frame` and :func:`from_csv`.

::

    from fairopt import data
    dataset = data.from_csv("loans.csv", label="default", groups=["sex", "race"], positive="yes")
    splits = data.standardize(data.split(dataset, seed=0))      # standardisation fitted on train

Encoding (fitted on the table given; nothing is learnt from a later split):

* **features** — every column but the label and the sensitive columns (or the ``features``
  listed). Numeric columns are kept as they are (float32). Categorical, string and boolean
  columns are one-hot encoded, one feature ``column=value`` per value present, values in sorted
  order. A numeric column of codes can be one-hot encoded with ``categorical=[...]``.
* **label** — encoded to ``0..K-1`` in sorted order (numbers numerically, text alphabetically).
  For a binary label, ``positive`` names the value that becomes class 1 (the class whose rates
  the fairness gaps measure).
* **groups** — one group per combination of the sensitive columns present in the table
  (intersectional groups), in sorted order, named ``sex=Female|race=Black``. Sensitive columns
  are not features unless ``keep_sensitive=True``.

Bad tables raise ``ValueError`` (``FileNotFoundError`` for a missing file) with a message that
names the column, the count and an example, and nothing is dropped silently: missing values are
an error unless ``impute="median"`` (numeric columns: the median; categorical ones: the most
frequent value) or ``drop_missing=True`` is chosen, and both are reported as warnings. A
constant feature or a column that looks like a row id is kept with a warning.

Row order is kept, so a table exported from a built-in loader loads back to the same arrays.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from fairopt.data.dataset import Dataset

__all__ = ["from_frame", "from_csv", "read_csv", "check_group_sizes", "IMPUTE_CHOICES", "DataWarning"]

#: Values of ``impute``: ``"median"`` fills a numeric column with its median and a categorical
#: column with its most frequent value.
IMPUTE_CHOICES = ("median",)
#: Default limit on the values of a one-hot encoded column (an id or free-text column would
#: otherwise become thousands of features).
MAX_CATEGORIES = 100
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zip", ".xz", ".zst", ".tar")
_MAGIC = (
    (b"PK\x03\x04", "a zip archive or an Excel/OpenDocument workbook"),
    (b"\xd0\xcf\x11\xe0", "an old Excel (.xls) workbook"),
    (b"PAR1", "a Parquet file"),
    (b"%PDF", "a PDF document"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x1f\x8b", "a gzip-compressed file (name it .csv.gz to read it)"),
    (b"SQLite format", "an SQLite database"),
    (b"\x93NUMPY", "a NumPy .npy array"),
)


class DataWarning(UserWarning):
    """A table was loaded, but something in it deserves a look (constant or id-like column,
    rows dropped, values imputed)."""


# --------------------------------------------------------------------------- reading


def read_csv(path, *, sep: str = ",") -> pd.DataFrame:
    """Reads a CSV file into a DataFrame, with a clear error for what is not a usable CSV.

    Compressed files (``.csv.gz``, ``.zip``, ...) are read by pandas from their extension.
    Parsed frames are cached per (path, size, modification time, sep); the frame returned is
    shared, so do not modify it in place.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the path is a directory, the file is empty, has a header but no data rows,
        is not text (an Excel workbook, Parquet, an image...), is JSON / XML / HTML, cannot be
        parsed, or has a single column whose header suggests another separator.
    """
    path = Path(os.fspath(path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a CSV file")
    stat = path.stat()
    if stat.st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): expected a CSV file with a header row and data rows")
    if not str(path).lower().endswith(_COMPRESSED_SUFFIXES):
        _sniff(path)
    return _parse(str(path.resolve()), stat.st_size, stat.st_mtime_ns, sep)


def _sniff(path: Path) -> None:
    with open(path, "rb") as stream:
        head = stream.read(4096)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            raise ValueError(f"{path} is not a CSV file: it looks like {kind}; export the table as CSV (comma-separated text)")
    if b"\x00" in head:
        raise ValueError(f"{path} is not a CSV file: it is binary (it contains NUL bytes); export the table as CSV")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] in (b"{", b"["):
        raise ValueError(f"{path} is not a CSV file: it looks like JSON; convert it, e.g. pandas.read_json(...).to_csv(...)")
    if text[:1] == b"<":
        raise ValueError(f"{path} is not a CSV file: it looks like XML or HTML; export the table as CSV")


@functools.lru_cache(maxsize=4)
def _parse(path: str, size: int, mtime_ns: int, sep: str) -> pd.DataFrame:
    del size, mtime_ns  # cache key only: a rewritten file is parsed again
    try:
        frame = pd.read_csv(path, sep=sep, low_memory=False)
    except pd.errors.EmptyDataError as error:
        raise ValueError(f"{path} is empty: no header row (expected a CSV file with a header row and data rows)") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a CSV file: it is not UTF-8 text ({error.reason} at byte {error.start})") from error
    except (pd.errors.ParserError, ValueError, OSError) as error:
        raise ValueError(f"{path} could not be parsed as CSV: {str(error).strip()}") from error
    if frame.shape[1] == 1:
        header = str(frame.columns[0])
        for candidate, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")):
            if candidate in header:
                raise ValueError(
                    f"{path} has a single column {header[:60]!r}: it seems to be separated by {name}, not commas; "
                    f"save it as a comma-separated CSV (or pass sep={candidate!r} to fairopt.data.from_csv)"
                )
    if len(frame) == 0:
        raise ValueError(f"{path} has a header ({', '.join(map(str, frame.columns[:8]))}) but no data rows")
    return frame


# --------------------------------------------------------------------------- helpers


def _format_value(value: Any) -> str:
    """A readable name of a table value: integral floats without '.0', text as it is."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if isinstance(value, (np.integer,)):
        return str(int(value))
    return str(value)


def _is_bool(series: pd.Series) -> bool:
    return pd.api.types.is_bool_dtype(series.dtype)


def _is_number(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series.dtype) and not _is_bool(series)


class _Locator:
    """Names rows in messages: CSV line numbers for a file, index labels for a DataFrame."""

    def __init__(self, frame: pd.DataFrame, csv: bool):
        self.index, self.csv = frame.index, csv

    def __call__(self, positions, limit: int = 3) -> str:
        positions = list(positions)
        if self.csv:
            shown = ", ".join(str(int(p) + 2) for p in positions[:limit])
            word = "line" if len(positions) == 1 else "lines"
        else:
            shown = ", ".join(repr(self.index[p]) if not isinstance(self.index, pd.RangeIndex) else str(self.index[p])
                              for p in positions[:limit])
            word = "row" if len(positions) == 1 else "rows"
        return f"{word} {shown}" + (", ..." if len(positions) > limit else "")


def _missing_mask(series: pd.Series) -> np.ndarray:
    """NaN / None / NA, and text that is empty or only spaces."""
    missing = series.isna().to_numpy(bool)
    if not _is_number(series) and not _is_bool(series):
        text = series.astype("string")
        blank = (text.str.strip() == "").fillna(False).to_numpy(bool)
        missing = missing | blank
    return missing


def _sort_key_values(values: list) -> list:
    """Distinct values sorted: numerically when every value is a number, else as text."""
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=_format_value)


def _codes(series: pd.Series) -> tuple[np.ndarray, list]:
    """``(codes [n], sorted distinct values)`` of a column without missing values."""
    if isinstance(series.dtype, pd.CategoricalDtype):
        present = set(series.dropna().unique().tolist())
        values = [v for v in series.cat.categories.tolist() if v in present]
        lookup = {v: i for i, v in enumerate(values)}
        return np.array([lookup[v] for v in series.tolist()], np.int64), values
    raw = series.tolist()
    if not _is_number(series) and not _is_bool(series):
        numbers = pd.to_numeric(series, errors="coerce")
        if numbers.notna().all():  # text that is all numbers sorts numerically ("9" before "10")
            order = {}
            for text, number in zip(raw, numbers.tolist()):
                order.setdefault(text, number)
            values = sorted(order, key=lambda v: (order[v], str(v)))
            lookup = {v: i for i, v in enumerate(values)}
            return np.array([lookup[v] for v in raw], np.int64), values
    try:
        codes, uniques = pd.factorize(series, sort=True)
        return codes.astype(np.int64), list(uniques)
    except TypeError:  # values of several types (an object column): sort them as text
        values = _sort_key_values(list(dict.fromkeys(raw)))
        lookup = {v: i for i, v in enumerate(values)}
        return np.array([lookup[v] for v in raw], np.int64), values


def _did_you_mean(name: str, columns: Sequence[str]) -> str:
    lowered = {c.lower(): c for c in columns}
    if name.lower() in lowered:
        return f" (did you mean {lowered[name.lower()]!r}? names are case-sensitive)"
    close = difflib.get_close_matches(name, columns, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _list_columns(columns: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(columns[:limit])
    return shown + (f", ... ({len(columns)} columns)" if len(columns) > limit else "")


def _names(value, argument: str, *, allow_none: bool = False) -> list[str] | None:
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{argument} is required: the name of a column of the table")
    if isinstance(value, str):
        value = [value]
    try:
        names = [str(v) for v in value]
    except TypeError:
        raise TypeError(f"{argument} must be a column name or a list of column names, got {value!r}") from None
    for name in names:
        if not name.strip():
            raise ValueError(f"{argument} contains an empty column name: {value!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{argument} lists {duplicates} more than once")
    return names


def _warn(message: str, collected: list[str]) -> None:
    collected.append(message)
    warnings.warn(message, DataWarning, stacklevel=3)


# --------------------------------------------------------------------------- the encoder


def from_frame(
    frame: pd.DataFrame,
    label: str,
    groups: str | Sequence[str],
    features: Sequence[str] | None = None,
    positive: Any = None,
    *,
    categorical: Sequence[str] = (),
    keep_sensitive: bool = False,
    impute: str | None = None,
    drop_missing: bool = False,
    max_categories: int = MAX_CATEGORIES,
    name: str = "data",
    return_info: bool = False,
    _source: str | None = None,
):
    """A :class:`~fairopt.data.Dataset` from a pandas DataFrame (see the module docstring).

    Args:
      frame: the table, one row per example.
      label: the column to predict.
      groups: the sensitive column(s); several give intersectional groups.
      features: the feature columns (default: every other column). Listing a sensitive column
        here requires ``keep_sensitive=True``.
      positive: for a binary label, the value that becomes class 1 (e.g. ``"yes"``); given as
        text it also matches a number (``"1"`` matches 1).
      categorical: numeric columns to one-hot encode (codes, not quantities).
      keep_sensitive: also use the sensitive columns as features.
      impute: ``None`` (missing values are an error) or ``"median"``: missing feature values
        become the column's median (numeric) or most frequent value (categorical). Labels and
        sensitive values are never imputed.
      drop_missing: drop the rows with a missing value in a used column (after ``impute``).
      max_categories: most values a one-hot encoded column may have.
      name: the dataset's name.
      return_info: also return a dict describing the encoding (columns, classes, groups,
        dropped and imputed rows, warnings).

    Returns:
      The Dataset (raw, unstandardised features), or ``(Dataset, info)``.

    Raises:
      TypeError: ``frame`` is not a DataFrame, or an argument has the wrong type.
      ValueError: the table cannot be used as asked; the message names the column, the count
        of offending rows and an example.
    """
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame must be a pandas DataFrame, got {type(frame).__name__}; use fairopt.data.from_csv for a file")
    source = _source or f"the DataFrame {name!r}"
    locate = _Locator(frame, csv=_source is not None)
    if impute is not None and impute not in IMPUTE_CHOICES:
        raise ValueError(f"impute={impute!r} is not supported; choose one of {list(IMPUTE_CHOICES)} or None")
    if isinstance(max_categories, bool) or not isinstance(max_categories, (int, np.integer)) or max_categories < 2:
        raise ValueError(f"max_categories must be an integer >= 2, got {max_categories!r}")
    columns = [str(c) for c in frame.columns]
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise ValueError(f"{source} has duplicate column names {duplicated}; rename them")
    if frame.shape[1] == 0:
        raise ValueError(f"{source} has no columns")
    if len(frame) == 0:
        raise ValueError(f"{source} has no rows")
    table = frame.set_axis(columns, axis=1)
    label = _names(label, "label")
    if len(label) != 1:
        raise ValueError(f"label must be one column, got {label}")
    label = label[0]
    group_columns = _names(groups, "groups")
    if not group_columns:
        raise ValueError("groups must name at least one sensitive column")
    feature_columns = _names(features, "features", allow_none=True)
    categorical = _names(list(categorical), "categorical")

    requested = [("label", label)] + [("group", g) for g in group_columns]
    requested += [("feature", f) for f in feature_columns or ()] + [("categorical", c) for c in categorical]
    missing_columns = [(role, c) for role, c in requested if c not in table.columns]
    if missing_columns:
        parts = [f"{role} column {c!r} not found{_did_you_mean(c, columns)}" for role, c in missing_columns]
        raise ValueError(f"{source}: {'; '.join(parts)}. The table has the columns: {_list_columns(columns)}")
    if label in group_columns:
        raise ValueError(f"column {label!r} is both the label and a sensitive column")
    if feature_columns is None:
        feature_columns = [c for c in columns if c != label and (keep_sensitive or c not in group_columns)]
    else:
        if label in feature_columns:
            raise ValueError(f"features lists the label column {label!r}; a model cannot use its own target")
        sensitive = [c for c in feature_columns if c in group_columns]
        if sensitive and not keep_sensitive:
            raise ValueError(
                f"features lists the sensitive column(s) {sensitive}; pass keep_sensitive=True (--keep_sensitive) "
                f"to use sensitive columns as features, or leave them out"
            )
        if keep_sensitive:
            feature_columns = feature_columns + [g for g in group_columns if g not in feature_columns]
    if not feature_columns:
        raise ValueError(
            f"{source} has no feature columns: only the label {label!r} and the sensitive column(s) {group_columns}"
            + ("" if keep_sensitive else "; pass keep_sensitive=True to use the sensitive columns as features")
        )
    not_features = [c for c in categorical if c not in feature_columns]
    if not_features:
        raise ValueError(f"categorical lists {not_features}, which are not feature columns (features: {_list_columns(feature_columns)})")

    messages: list[str] = []
    info: dict[str, Any] = dict(name=name, source=source, rows_in_table=int(len(table)), label=label,
                                groups=list(group_columns), features=list(feature_columns))

    # ------------------------------------------------------------------ missing values
    missing = {c: _missing_mask(table[c]) for c in dict.fromkeys([label, *group_columns, *feature_columns])}
    fixed = [c for c in (label, *group_columns) if missing[c].any()]
    if fixed and not drop_missing:
        c = fixed[0]
        rows = np.flatnonzero(missing[c])
        role = "label" if c == label else "sensitive"
        raise ValueError(
            f"{source}: {role} column {c!r} has {rows.size} missing value{'s' * (rows.size > 1)} ({locate(rows)}); "
            f"a {role} value cannot be imputed: drop those rows with drop_missing=True (--drop_missing) or fill them in the table"
        )
    feature_missing = {c: int(missing[c].sum()) for c in feature_columns if missing[c].any()}
    if feature_missing and impute is None and not drop_missing:
        parts = [f"column {c!r} has {n} missing value{'s' * (n > 1)} ({locate(np.flatnonzero(missing[c]))})"
                 for c, n in feature_missing.items()]
        raise ValueError(
            f"{source}: {'; '.join(parts)}. Choose what to do: impute='median' (--impute=median: the median of a numeric "
            f"column, the most frequent value of a categorical one) or drop_missing=True (--drop_missing: drop those rows)"
        )
    drop = np.zeros(len(table), bool)
    for c in (label, *group_columns):
        drop |= missing[c]
    if impute is None:
        for c in feature_missing:
            drop |= missing[c]
    keep = np.flatnonzero(~drop)
    if drop.any():
        counts = {c: int(missing[c].sum()) for c in missing if missing[c].any() and (impute is None or c not in feature_missing)}
        _warn(
            f"{source}: dropped {int(drop.sum())} of {len(table)} rows with missing values "
            f"({', '.join(f'{c}: {n}' for c, n in counts.items())})",
            messages,
        )
        if keep.size == 0:
            raise ValueError(f"{source}: every row has a missing value in a used column; nothing is left")
    info["dropped_rows"] = int(drop.sum())
    table = table.iloc[keep]
    locate_kept = lambda positions, limit=3: locate(keep[np.asarray(list(positions), np.int64)], limit)  # noqa: E731
    missing = {c: m[keep] for c, m in missing.items()}

    # ------------------------------------------------------------------ features
    blocks, names, imputed, kinds = [], [], {}, {}
    constant = []
    for column in feature_columns:
        series = table[column]
        hole = missing[column]
        values = series[~hole]
        if hole.all():
            raise ValueError(f"{source}: feature column {column!r} has no values at all; leave it out of the features")
        kind, numbers = _feature_kind(column, values, categorical, source, locate_kept, np.flatnonzero(~hole))
        kinds[column] = kind
        if kind == "numeric":
            filled = np.empty(len(series), np.float64)
            filled[~hole] = numbers
            if hole.any():
                fill = float(np.median(numbers))
                filled[hole] = fill
                imputed[column] = dict(rows=int(hole.sum()), value=fill, how="median")
            if filled.size and np.ptp(filled) == 0:
                constant.append(f"{column!r} (always {_format_value(filled[0])})")
            _check_row_id(column, filled, source, messages)
            blocks.append(filled[:, None])
            names.append(column)
        else:
            codes, categories = _codes(values)
            if len(categories) > max_categories:
                raise ValueError(
                    f"{source}: column {column!r} has {len(categories)} distinct values (e.g. "
                    f"{', '.join(repr(_format_value(v)) for v in categories[:3])}); one-hot encoding it would add "
                    f"{len(categories)} features. Leave it out of the features (--features=...), encode it yourself, or "
                    f"raise max_categories"
                )
            all_codes = np.empty(len(series), np.int64)
            all_codes[~hole] = codes
            if hole.any():
                counts = np.bincount(codes, minlength=len(categories))
                most = int(np.argmax(counts))  # ties: the first value in sorted order
                all_codes[hole] = most
                imputed[column] = dict(rows=int(hole.sum()), value=_format_value(categories[most]), how="most frequent")
            if len(categories) == 1:
                constant.append(f"{column!r} (always {_format_value(categories[0])!r})")
            blocks.append(np.eye(len(categories), dtype=np.float64)[all_codes])
            names += [f"{column}={_format_value(v)}" for v in categories]
    if imputed:
        _warn(
            f"{source}: filled missing values: "
            + "; ".join(f"{c} ({d['rows']} row{'s' * (d['rows'] > 1)}) with the {d['how']} value {d['value']!r}"
                        for c, d in imputed.items()),
            messages,
        )
    if constant:
        _warn(
            f"{source}: constant feature column{'s' * (len(constant) > 1)} {', '.join(constant)}: "
            f"no information for the model (kept; standardisation maps it to 0)",
            messages,
        )
    feature_matrix = np.concatenate(blocks, axis=1)
    if not np.all(np.abs(feature_matrix) <= np.finfo(np.float32).max):
        column = names[int(np.flatnonzero(~np.all(np.abs(feature_matrix) <= np.finfo(np.float32).max, axis=0))[0])]
        raise ValueError(f"{source}: column {column!r} has values beyond the float32 range (±3.4e38); rescale it")

    # ------------------------------------------------------------------ label
    labels, class_names = _encode_label(table[label], label, positive, source)

    # ------------------------------------------------------------------ groups
    group_codes, group_values = [], []
    for column in group_columns:
        codes, values = _codes(table[column])
        group_codes.append(codes)
        group_values.append(values)
    combinations, group_ids = np.unique(np.stack(group_codes, axis=1), axis=0, return_inverse=True)
    group_names = tuple(
        "|".join(f"{column}={_format_value(values[code])}" for column, values, code in zip(group_columns, group_values, row))
        for row in combinations
    )
    description = (
        f"{source}: label = {label} ({', '.join(class_names)}), groups = "
        f"{' x '.join(group_columns)} ({len(group_names)}), {len(names)} features from {len(feature_columns)} columns"
        + (f"; {info['dropped_rows']} rows with missing values dropped" if info["dropped_rows"] else "")
        + (f"; missing values imputed in {', '.join(imputed)}" if imputed else "")
    )
    dataset = Dataset(
        feature_matrix.astype(np.float32),
        labels,
        np.asarray(group_ids, np.int64).reshape(-1),
        class_names=class_names,
        group_names=group_names,
        feature_names=tuple(names),
        name=name,
        description=description,
    )
    if not return_info:
        return dataset
    info.update(
        rows=len(dataset),
        categorical=[c for c, k in kinds.items() if k == "categorical"],
        feature_names=list(names),
        class_names=list(class_names),
        positive=None if positive is None else class_names[-1],
        group_names=list(group_names),
        group_counts=[int(n) for n in dataset.group_counts],
        imputed=imputed,
        warnings=messages,
    )
    return dataset, info


def _feature_kind(column, values: pd.Series, categorical, source, locate, positions) -> tuple[str, np.ndarray | None]:
    """``("numeric", float64 values)`` or ``("categorical", None)`` for a column without missing values."""
    dtype = values.dtype
    if column in categorical or _is_bool(values) or isinstance(dtype, pd.CategoricalDtype):
        return "categorical", None
    if pd.api.types.is_object_dtype(dtype) and pd.api.types.infer_dtype(values, skipna=True) == "boolean":
        return "categorical", None  # a boolean column with missing values is read as objects
    if pd.api.types.is_complex_dtype(dtype) or pd.api.types.is_datetime64_any_dtype(dtype) or pd.api.types.is_timedelta64_dtype(dtype) or isinstance(dtype, (pd.PeriodDtype, pd.IntervalDtype)):
        raise ValueError(
            f"{source}: column {column!r} has type {dtype}, which is neither a number nor a category; convert it "
            f"(e.g. a date to days since a reference date) or leave it out of the features"
        )
    if _is_number(values):
        numbers = values.to_numpy(np.float64)
        bad = ~np.isfinite(numbers)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise ValueError(
                f"{source}: numeric column {column!r} has {rows.size} infinite value{'s' * (rows.size > 1)} "
                f"(e.g. {values.iloc[rows[0]]!r} at {locate(positions[rows])}); fix or drop those rows"
            )
        return "numeric", numbers
    numbers = pd.to_numeric(values, errors="coerce")
    parsed = numbers.notna().to_numpy(bool)
    if parsed.all():
        numbers = numbers.to_numpy(np.float64)
        if not np.all(np.isfinite(numbers)):
            rows = np.flatnonzero(~np.isfinite(numbers))
            raise ValueError(f"{source}: numeric column {column!r} has an infinite value ({values.iloc[rows[0]]!r} at {locate(positions[rows])})")
        return "numeric", numbers
    if parsed.mean() >= 0.5:
        rows = np.flatnonzero(~parsed)
        raise ValueError(
            f"{source}: column {column!r} is numeric but has {rows.size} non-numeric value{'s' * (rows.size > 1)}, "
            f"e.g. {values.iloc[rows[0]]!r} ({locate(positions[rows])}); fix them, leave them empty to mark them as "
            f"missing (then --impute/--drop_missing apply), or list the column in categorical= to treat every value as a category"
        )
    return "categorical", None


def _check_row_id(column: str, values: np.ndarray, source: str, messages: list[str]) -> None:
    n = values.size
    if n >= 20 and (np.array_equal(values, np.arange(n)) or np.array_equal(values, np.arange(1, n + 1))):
        _warn(
            f"{source}: feature column {column!r} counts the rows ({_format_value(values[0])}, {_format_value(values[1])}, ...): "
            f"it looks like a row id, not a feature; leave it out with features=[...] (--features)",
            messages,
        )


def _encode_label(series: pd.Series, column: str, positive, source: str) -> tuple[np.ndarray, tuple[str, ...]]:
    if not _is_number(series) and not _is_bool(series) and not isinstance(series.dtype, pd.CategoricalDtype):
        parsed = pd.to_numeric(series, errors="coerce").notna().to_numpy(bool)
        if 0.5 <= parsed.mean() < 1:
            bad = np.flatnonzero(~parsed)
            raise ValueError(
                f"{source}: label column {column!r} is numeric but has {bad.size} non-numeric value{'s' * (bad.size > 1)}, "
                f"e.g. {series.iloc[bad[0]]!r}; fix them (or leave them empty and pass drop_missing=True / --drop_missing)"
            )
    if _is_number(series):
        numbers = series.to_numpy(np.float64)
        if not np.all(np.isfinite(numbers)):
            raise ValueError(f"{source}: label column {column!r} has infinite values")
        distinct = np.unique(numbers)
        if distinct.size > 2 and not np.all(distinct == np.round(distinct)):
            raise ValueError(
                f"{source}: label column {column!r} holds continuous values (e.g. {_format_value(distinct[distinct != np.round(distinct)][0])}, "
                f"{distinct.size} distinct); fairopt trains classifiers: bin it into classes first"
            )
    codes, values = _codes(series)
    names = [_format_value(v) for v in values]
    if len(values) < 2:
        raise ValueError(
            f"{source}: label column {column!r} has a single class ({names[0]!r} in all {len(series)} rows); "
            f"a classifier needs at least two"
        )
    if positive is not None:
        if len(values) != 2:
            raise ValueError(
                f"positive={positive!r} applies to a binary label, but label column {column!r} has {len(values)} "
                f"classes: {', '.join(map(repr, names[:10]))}"
            )
        matches = [i for i, v in enumerate(values) if v == positive or names[i] == _format_value(positive) or names[i] == str(positive)]
        if not matches:
            raise ValueError(
                f"positive={positive!r} is not a value of label column {column!r}; its values are {', '.join(map(repr, names))}"
            )
        if matches[0] == 0:  # the positive value becomes class 1
            codes = 1 - codes
            names = names[::-1]
    if len(set(names)) != len(names):  # e.g. 1 and "1" in an object column
        raise ValueError(f"{source}: label column {column!r} mixes values that print alike: {names}; clean the column")
    return codes.astype(np.int32), tuple(names)


# --------------------------------------------------------------------------- files


def from_csv(
    path,
    label: str,
    groups: str | Sequence[str],
    features: Sequence[str] | None = None,
    positive: Any = None,
    *,
    categorical: Sequence[str] = (),
    keep_sensitive: bool = False,
    impute: str | None = None,
    drop_missing: bool = False,
    max_categories: int = MAX_CATEGORIES,
    name: str | None = None,
    sep: str = ",",
    return_info: bool = False,
):
    """A :class:`~fairopt.data.Dataset` from a CSV file with a header row.

    The arguments are those of :func:`from_frame`; ``name`` defaults to the file name without
    its extension, ``sep`` is the field separator. Messages name rows by their line in the file
    (the header is line 1).

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: see :func:`read_csv` (empty file, not a CSV) and :func:`from_frame`.
    """
    frame = read_csv(path, sep=sep)
    path = Path(os.fspath(path)).expanduser()
    if name is None:
        name = re.sub(r"(\.(csv|txt|tsv))?(\.(gz|bz2|zip|xz|zst))?$", "", path.name, flags=re.IGNORECASE) or "data"
    result = from_frame(
        frame, label, groups, features, positive, categorical=categorical, keep_sensitive=keep_sensitive,
        impute=impute, drop_missing=drop_missing, max_categories=max_categories, name=name,
        return_info=return_info, _source=str(path),
    )  # fmt: skip
    if return_info:
        result[1]["path"] = str(path.resolve())
    return result


def check_group_sizes(dataset: Dataset, minimum: int, *, purpose: str = "the train/validation/test split") -> None:
    """Raises ValueError naming every group with fewer than ``minimum`` rows (and its count)."""
    counts = dataset.group_counts
    small = [int(g) for g in np.argsort(counts, kind="stable") if counts[g] < minimum]
    if small:
        listed = ", ".join(f"{dataset.group_names[g]!r} ({int(counts[g])} row{'s' * int(counts[g] != 1)})" for g in small[:8])
        more = f" and {len(small) - 8} more" if len(small) > 8 else ""
        raise ValueError(
            f"{dataset.name}: {len(small)} group{'s' * (len(small) > 1)} {'have' if len(small) > 1 else 'has'} too few rows "
            f"for {purpose}, which needs at least {minimum} per group: {listed}{more}. Use fewer or coarser sensitive "
            f"columns, or merge or remove those rows"
        )
