"""The data flags of every entry point: your own CSV, or a built-in dataset with a chosen
sensitive attribute.

    python -m experiments.facims   --data=loans.csv --label=default --group=sex,race --methods=erm --seeds=0
    python -m experiments.fairalm  --dataset=adult --group=sex,race
    python -m experiments.autobalance --data=loans.csv --label=default --group=sex --positive=yes

Flags (:func:`define_data_flags`):

* ``--data=PATH.csv`` with ``--label=COL`` and ``--group=COL[,COL...]`` (several columns give
  intersectional groups), and optionally ``--features``, ``--positive``, ``--categorical``,
  ``--keep_sensitive``, ``--impute=median``, ``--drop_missing`` — see
  :func:`fairopt.data.from_csv`, which does the encoding.
* ``--group`` alone picks the sensitive attribute(s) of a built-in dataset (:data:`BUILTIN_GROUPS`):
  Adult ``sex``, ``race`` or ``sex,race``; COMPAS ``race``, ``sex`` or both; German ``sex``,
  ``age`` or both; CelebA attributes: any of its 40 binary attributes but the target (several:
  their intersection, all of them removed from the features).
* ``--drug_path`` (else ``$FAIROPT_DRUG_CSV``) locates the drug-consumption CSV.

:func:`load_from_flags` returns the :class:`fairopt.data.Dataset` and a description dict
(source, path, label and group columns, group names...) that the entry points store in their
results ``config``; :func:`check_data_flags` validates everything before any training and
raises ``ValueError`` with a message fit for a usage error. The entry points keep their own
splits, train-only standardisation and protocols; a table is only their input.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from absl import flags

from fairopt import data
from fairopt.data import frames, tabular

__all__ = [
    "DATA_FLAGS",
    "BUILTIN_GROUPS",
    "MIN_GROUP_ROWS",
    "define_data_flags",
    "uses_table",
    "load_from_flags",
    "check_data_flags",
]

#: Flags that only apply to ``--data``.
TABLE_FLAGS = ("label", "features", "positive", "categorical", "keep_sensitive", "impute", "drop_missing")
DATA_FLAGS = ("data", "group", "drug_path") + TABLE_FLAGS
#: A group of your own data needs this many rows for the entry points' train/validation/test splits.
MIN_GROUP_ROWS = 10

#: Sensitive attributes that ``--group`` may name for each built-in dataset (the first is the default).
BUILTIN_GROUPS: dict[str, tuple[str, ...]] = {
    "credit": ("EDUCATION",),
    "drug": ("education",),
    "adult": ("sex", "race"),
    "compas": ("race", "sex"),
    "german": ("sex", "age"),
    "celeba_attributes": ("Male",) + tuple(a for a in tabular.CELEBA_ATTRIBUTES if a not in ("Male", "Attractive")),
    "celeba_blond": ("Male",) + tuple(a for a in tabular.CELEBA_ATTRIBUTES if a not in ("Male", "Blond_Hair")),
}
_CELEBA_TARGETS = {"celeba_attributes": "Attractive", "celeba_blond": "Blond_Hair"}


def define_data_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the data flags on ``flag_values`` (once; a later call only does the next step) and
    makes them key flags of the calling module, so that its ``--helpshort`` lists them."""
    caller = sys._getframe(1).f_globals.get("__name__")
    if "data" not in flag_values:
        _define(flag_values)
    module = sys.argv[0] if caller == "__main__" else caller  # absl's name of the main module
    for name in DATA_FLAGS:
        flag_values.register_key_flag_for_module(module, flag_values[name])


def _define(flag_values: flags.FlagValues) -> None:
    options = dict(flag_values=flag_values)
    flags.DEFINE_string("data", None, "Your own table: a CSV file with a header row (with --label and --group).", **options)
    flags.DEFINE_string("label", None, "--data: the column to predict.", **options)
    flags.DEFINE_list(
        "group", [],
        "Sensitive column(s), comma-separated; several give intersectional groups. With --data: columns of the CSV; "
        "built-in: adult sex|race|sex,race; compas race|sex; german sex|age; celeba: any binary attribute(s).",
        **options,
    )  # fmt: skip
    flags.DEFINE_list("features", [], "--data: the feature columns (default: every column but --label and --group).", **options)
    flags.DEFINE_string("positive", None, "--data: the value of a binary label that is class 1 (e.g. yes).", **options)
    flags.DEFINE_list("categorical", [], "--data: numeric columns to one-hot encode (codes, not quantities).", **options)
    flags.DEFINE_bool("keep_sensitive", False, "--data: also use the --group columns as features.", **options)
    flags.DEFINE_enum(
        "impute", None, frames.IMPUTE_CHOICES,
        "--data: fill missing feature values (median; the most frequent value of a categorical column).", **options,
    )  # fmt: skip
    flags.DEFINE_bool("drop_missing", False, "--data: drop the rows with a missing value (counted in a warning).", **options)
    flags.DEFINE_string("drug_path", None, f"Path of drug_consumption.csv (default: ${tabular.DRUG_CSV_ENV}).", **options)


def uses_table(flag_values) -> bool:
    """Whether the data come from the data flags (``--data``, or ``--group`` for a built-in)."""
    return bool(flag_values.data) or bool(flag_values.group)


def _check_combination(flag_values, default_dataset: str) -> None:
    present = lambda name: name in flag_values and flag_values[name].present  # noqa: E731
    if flag_values.data:
        if present("dataset"):
            raise ValueError(f"--data and --dataset={flag_values.dataset} are exclusive: give one of them")
        if not flag_values.label:
            raise ValueError("--data needs --label=COLUMN, the column to predict")
        if not flag_values.group:
            raise ValueError("--data needs --group=COLUMN[,COLUMN...], the sensitive column(s)")
        return
    stray = [f"--{name}" for name in TABLE_FLAGS if present(name)]
    if stray:
        raise ValueError(f"{', '.join(stray)} appl{'ies' if len(stray) == 1 else 'y'} to --data=PATH.csv only")
    if flag_values.group:
        choices = BUILTIN_GROUPS.get(default_dataset)
        if choices is None:
            raise ValueError(
                f"--group: --dataset={default_dataset} has no sensitive attribute to choose; --group applies to "
                f"{', '.join(BUILTIN_GROUPS)} and to --data"
            )
        unknown = [g for g in flag_values.group if g not in choices]
        if unknown:
            shown = ", ".join(choices) if len(choices) <= 6 else ", ".join(choices[:6]) + f", ... ({len(choices)} attributes)"
            raise ValueError(f"--group: {default_dataset} has no sensitive attribute {', '.join(map(repr, unknown))}; choose from {shown}")
        if len(set(flag_values.group)) != len(flag_values.group):
            raise ValueError(f"--group has repeated values: {list(flag_values.group)}")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "data"


def _intersect(datasets: Sequence[data.Dataset], attributes: Sequence[str], name: str) -> data.Dataset:
    """One group per combination present of the groups of ``datasets`` (same rows, same labels);
    features of the first without the columns named in ``attributes``."""
    codes = np.stack([d.groups for d in datasets], axis=1)
    combinations, inverse = np.unique(codes, axis=0, return_inverse=True)
    names = tuple("|".join(d.group_names[c] for d, c in zip(datasets, row)) for row in combinations)
    first = datasets[0]
    keep = [j for j, f in enumerate(first.feature_names) if f not in attributes]
    return first.replace(
        features=first.features[:, keep],
        feature_names=tuple(first.feature_names[j] for j in keep),
        groups=np.asarray(inverse).reshape(-1),
        group_names=names,
        name=name,
        description=f"{first.description.split(', group =')[0]}, groups = {' x '.join(attributes)}",
    )


def _builtin(name: str, groups: Sequence[str], seed: int, drug_path: str | None) -> data.Dataset:
    groups = list(groups)
    if not groups and name in BUILTIN_GROUPS:
        groups = [BUILTIN_GROUPS[name][0]]
    if name == "drug":
        try:
            return data.drug(drug_path)
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"--drug_path: {error}") from None
    if name == "credit":
        return data.credit()
    if name == "synthetic":
        return data.synthetic_subgroups(seed=seed)
    if name in ("adult", "compas"):
        loader = data.adult if name == "adult" else data.compas
        return loader(group=groups[0] if len(groups) == 1 else "sex_race")
    if name == "german":
        if len(groups) == 1:
            return data.german(group=groups[0])
        return _intersect([data.german(group=g) for g in groups], groups, "german_" + "_".join(groups))
    if name in _CELEBA_TARGETS:
        target = _CELEBA_TARGETS[name]
        if len(groups) == 1:
            return data.celeba_attributes(target=target, group=groups[0])
        parts = [data.celeba_attributes(target=target, group=g) for g in groups]
        return _intersect(parts, groups, f"celeba_{target}_" + "_".join(groups))
    return data.load(name)


def load_from_flags(flag_values, *, default_dataset: str, seed: int) -> tuple[data.Dataset, dict]:
    """The dataset the data flags ask for, and its description (for the results ``config``).

    Args:
      flag_values: parsed flags with :func:`define_data_flags` (and usually ``--dataset``).
      default_dataset: the built-in dataset to load without ``--data`` (the ``--dataset`` value).
      seed: the seed of a generated dataset (``synthetic``).

    Returns:
      ``(dataset, description)``; ``description["name"]`` names the results files: the CSV's
      name, the built-in name, or ``<built-in>_<groups>`` for a non-default ``--group``.
      Warnings about the table (constant columns, dropped or imputed rows) are collected in
      ``description["warnings"]`` rather than emitted.

    Raises:
      ValueError: bad flag combinations or a bad table (the message names the flag or the
        column); FileNotFoundError / ModuleNotFoundError: missing files or the data extra.
    """
    _check_combination(flag_values, default_dataset)
    if flag_values.data:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", frames.DataWarning)
            dataset, info = data.from_csv(
                flag_values.data, label=flag_values.label, groups=list(flag_values.group),
                features=list(flag_values.features) or None, positive=flag_values.positive,
                categorical=list(flag_values.categorical), keep_sensitive=flag_values.keep_sensitive,
                impute=flag_values.impute, drop_missing=flag_values.drop_missing, return_info=True,
            )  # fmt: skip
        for warning in caught:
            if not issubclass(warning.category, frames.DataWarning):
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        if dataset.num_groups < 2:
            raise ValueError(
                f"--group={','.join(flag_values.group)}: every row of {flag_values.data} has the same value "
                f"({dataset.group_names[0]}); fairness needs at least two groups"
            )
        data.check_group_sizes(dataset.replace(name=str(flag_values.data)), MIN_GROUP_ROWS)
        name = _safe_name(dataset.name)
        description = dict(
            source="csv", name=name, path=info["path"], label=info["label"], group_columns=info["groups"],
            group_names=info["group_names"], group_counts=info["group_counts"], class_names=info["class_names"],
            positive=info["positive"], features=info["features"], categorical=info["categorical"],
            num_features=dataset.num_features, rows=info["rows"], rows_in_file=info["rows_in_table"],
            dropped_rows=info["dropped_rows"], imputed=info["imputed"], warnings=info["warnings"],
        )  # fmt: skip
        return dataset.replace(name=name), description
    groups = list(flag_values.group)
    dataset = _builtin(default_dataset, groups, seed, flag_values.drug_path if "drug_path" in flag_values else None)
    default = BUILTIN_GROUPS.get(default_dataset, ())[:1]
    name = default_dataset if not groups or groups == list(default) else f"{default_dataset}_{'_'.join(groups)}"
    description = dict(
        source="builtin", name=name, dataset=default_dataset, group_columns=groups or list(default),
        group_names=list(dataset.group_names), group_counts=[int(n) for n in dataset.group_counts],
        class_names=list(dataset.class_names), num_features=dataset.num_features, rows=len(dataset),
    )  # fmt: skip
    return dataset, description


def check_data_flags(
    flag_values,
    *,
    default_dataset: str,
    seeds: Sequence[int] = (0,),
    prepare: Callable[[data.Dataset, int], object] | None = None,
    stream=None,
    return_dataset: bool = False,
):
    """Validates the data flags before any training: loads the data once and, for ``--data``,
    runs ``prepare(dataset, seed)`` (the entry point's split) for every seed. Prints the
    table's warnings (one ``warning:`` line each) to ``stream`` (default stderr).

    Returns:
      The description of :func:`load_from_flags` (``(dataset, description)`` with
      ``return_dataset=True``).

    Raises:
      ValueError: with a message naming the flag, the column or the group (a missing file or
        the missing data extra included), fit for ``app.UsageError``.
    """
    seeds = tuple(seeds) or (0,)
    try:
        dataset, description = load_from_flags(flag_values, default_dataset=default_dataset, seed=seeds[0])
    except FileNotFoundError as error:
        flag = "--data" if flag_values.data else "--drug_path" if default_dataset == "drug" else f"--dataset={default_dataset}"
        raise ValueError(f"{flag}: {error}") from None
    except ModuleNotFoundError as error:
        raise ValueError(f"--dataset={default_dataset}: {error}") from None
    except ValueError as error:
        message = str(error)
        if not message.startswith("--"):
            message = f"--data: {message}" if flag_values.data else f"--dataset={default_dataset}: {message}"
        raise ValueError(message) from None
    if flag_values.data and prepare is not None:
        for seed in seeds:
            try:
                prepare(dataset, seed)
            except ValueError as error:
                raise ValueError(f"--data={flag_values.data} with seed {seed}: {error}") from None
    stream = sys.stderr if stream is None else stream
    for message in description.get("warnings", ()):
        print(f"warning: {message}", file=stream, flush=True)
    return (dataset, description) if return_dataset else description


def describe(description: dict) -> str:
    """One line naming the data and the columns, for logs and Markdown titles."""
    if description["source"] == "csv":
        return (
            f"{Path(description['path']).name} (label {description['label']}, groups "
            f"{' x '.join(description['group_columns'])}: {len(description['group_names'])})"
        )
    return description["name"]
