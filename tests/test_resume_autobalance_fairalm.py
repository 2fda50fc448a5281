"""Reliability of the AutoBalance and FairALM entry points: a run killed with SIGKILL in the
middle (AutoBalance: once in the search phase, then once in the retrain phase; FairALM: in the
--eta_grid selection) and resumed ends with the same numbers as an uninterrupted run, and bad
flags exit non-zero with a message naming the flag and the allowed values, never a traceback.

Every run is its own process: a child forked from a driver process that imported the entry
point once, running the entry point's ``app.run(main, argv)`` exactly as ``python -m`` does
after its imports (a JAX import costs about 2 s of CPU here, so this halves the file's time).
Settings are tiny (linear models, one seed), and the runs use the entry points' persistent
compilation cache ($FAIROPT_CACHE_DIR, else ~/.cache/fairopt/jax): the first run of this file
compiles every program (about 25 s of CPU), later runs only trace them.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pandas as pd
import pytest

from cli_driver import drive

from experiments import common


AUTOBALANCE = [
    "--dataset=synthetic_lt", "--methods=ce,autobalance", "--seeds=0", "--epochs=40", "--warmup_fraction=0.1",
    "--hidden=", "--batch_size=256", "--checkpoint_every=1",
]  # fmt: skip
FAIRALM = [
    "--dataset=german", "--methods=unconstrained,fairalm", "--eta_grid=0.1", "--seeds=0", "--epochs=40",
    "--batch_size=64", "--model=linear", "--inner_steps=1", "--checkpoint_every=1",
]  # fmt: skip

def _runs(path: Path) -> list[dict]:
    """The per-run rows of a results JSON without the wall times."""
    return [{k: v for k, v in run.items() if k != "seconds"} for run in json.loads(path.read_text())["runs"]]


def test_autobalance_killed_in_search_then_in_retrain_resumes_to_the_same_results(tmp_path):
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    checkpoints = interrupted / "checkpoints" / "autobalance_synthetic_lt"
    results = interrupted / "autobalance_synthetic_lt.json"
    command = AUTOBALANCE + [f"--output_dir={interrupted}"]
    uninterrupted, search_kill, retrain_kill, resumed = drive("experiments.autobalance", [
        dict(argv=AUTOBALANCE + [f"--output_dir={full}"]),
        # Killed after the warm-up (4 epochs), while the upper level is updating the loss.
        dict(argv=command, kill=(checkpoints / "autobalance_seed0_search.state", 6), exists=[results]),
        dict(argv=command + ["--resume"], kill=(checkpoints / "autobalance_seed0_retrain.state", 3), exists=[results]),
        dict(argv=command + ["--resume"]),
    ], tmp_path / "logs")  # fmt: skip
    assert uninterrupted["code"] == 0, uninterrupted["output"][-3000:]
    assert resumed["code"] == 0, resumed["output"][-3000:]
    for killed, epoch in ((search_kill, 6), (retrain_kill, 3)):
        assert killed["code"] == -signal.SIGKILL, "the run ended before it could be killed"
        assert epoch <= killed["killed_at"] < 40
        assert killed["exists"] == [False]  # no results file, not even half of one
    assert "ce seed=0" not in retrain_kill["output"]  # the finished baseline was not trained again
    assert not list(interrupted.rglob("*.tmp"))  # temporary files cut short by a kill are removed
    assert _runs(results) == _runs(full / "autobalance_synthetic_lt.json")
    trajectory = "autobalance_synthetic_lt_trajectory.csv"
    assert (interrupted / trajectory).read_text() == (full / trajectory).read_text()
    assert pd.read_csv(full / trajectory)["epoch"].max() == 40  # every search epoch, before and after the kill


def test_fairalm_killed_in_the_eta_grid_resumes_to_the_same_results(tmp_path):
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    checkpoints = interrupted / "checkpoints" / "fairalm_german"
    results = interrupted / "fairalm_german.json"
    command = FAIRALM + [f"--output_dir={interrupted}"]
    uninterrupted, grid_kill, resumed = drive("experiments.fairalm", [
        dict(argv=FAIRALM + [f"--output_dir={full}"]),
        dict(argv=command, kill=(checkpoints / "fairalm_chunk0.state", 3), exists=[results]),
        dict(argv=command + ["--resume"]),
    ], tmp_path / "logs")  # fmt: skip
    assert uninterrupted["code"] == 0, uninterrupted["output"][-3000:]
    assert resumed["code"] == 0, resumed["output"][-3000:]
    assert grid_kill["code"] == -signal.SIGKILL, "the run ended before it could be killed"
    assert 3 <= grid_kill["killed_at"] < 40
    assert grid_kill["exists"] == [False]
    assert "[eta-grid fairalm eta=0.1]" in resumed["output"]
    assert not list(interrupted.rglob("*.tmp"))
    assert _runs(results) == _runs(full / "fairalm_german.json")
    resumed_config, full_config = (json.loads((d / "fairalm_german.json").read_text())["config"] for d in (interrupted, full))
    assert resumed_config["eta_per_method"] == full_config["eta_per_method"]
    drop_seconds = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert drop_seconds(resumed_config["eta_grid_rows"]) == drop_seconds(full_config["eta_grid_rows"])


# ------------------------------------------------------------------------------------------------
# Bad input on the command line.
# ------------------------------------------------------------------------------------------------

# (flags, what the message must contain: the flag and the allowed values or the fix)
AUTOBALANCE_BAD_FLAGS = [
    (["--methods=ce,bogus"], ["--methods has unknown ['bogus']", "choose from ce, weighted_ce"]),
    (["--methods=ce,ce"], ["--methods has repeated values"]),
    (["--methods="], ["--methods is empty", "choose from ce"]),
    (["--methods=deo"], ["--methods ['deo'] need a group --dataset: waterbirds_like, celeba_blond"]),
    (["--val_objective=blend"], ["--val_objective=blend / --per_group=true need a group --dataset"]),
    (["--seeds=0,x"], ["--seeds must be integers", "--seeds=0,42,666"]),
    (["--seeds=-1"], ["--seeds must be >= 0"]),
    (["--seeds=1,1"], ["--seeds has repeated values"]),
    (["--dataset=mnist"], ["flag --dataset=mnist", "<digits_lt|synthetic_lt|waterbirds_like|celeba_blond>"]),
    (["--search_space=bogus"], ["flag --search_space=bogus", "<la_tau|shift|scale|shift_scale|weight>"]),
    (["--epochs=0"], ["flag --epochs=0", "not a positive integer"]),
    (["--lambda_val=2"], ["AutoBalanceConfig.lambda_val must be in [0, 1], got 2.0"]),
    (["--celeba_rows=200000"], ["flag --celeba_rows=200000", "range [100, 135000]"]),
    (["--upper_learning_rate=0"], ["AutoBalanceConfig.upper_learning_rate must be > 0, got 0.0"]),
    (["--lower_weight_decay=nan"], ["--lower_weight_decay must be a finite number, got nan"]),
    (["--cg_iters=0"], ["AutoBalanceConfig.cg_iters must be >= 1, got 0"]),
    (["--neumann_terms=-1"], ["AutoBalanceConfig.neumann_terms must be >= 0, got -1"]),
    (["--lr_decay_fractions=0.5,2"], ["--lr_decay_fractions must be numbers in (0, 1), got '2'"]),
    (["--grid=bogus=1"], ["AutoBalanceConfig has no setting 'bogus'", "upper_learning_rate"]),
    (["--grid=upper_learning_rate=0.1,x"], ["--grid upper_learning_rate='x'"]),
    (["--grid=upper_learning_rate=0,1"], ["--grid setting upper_learning_rate=0: AutoBalanceConfig.upper_learning_rate must be > 0"]),
    (["--grid=upper_learning_rate=0.1", "--methods=ce"], ["add autobalance to --methods=ce"]),
    (["--select=val_balanced_error"], ["--select picks one setting of a --grid"]),
    (["--grid=val_objective=balanced_ce,deo"], ["--grid setting val_objective=deo needs a group --dataset"]),
    (["--grid=lambda_val=0.1,0.9", "--select=balanced_error"], ["choose with a validation metric (val_...)"]),
    (["--hidden=64,x"], ["--hidden must be positive integers, got 'x'", "--hidden=128,64"]),
    (["--hidden=0"], ["--hidden must be positive integers, got '0'"]),
    (["--suite=longtail", "--methods=ce"], ["--methods would be ignored by --suite=longtail"]),
    (["--checkpoint_every=-1"], ["flag --checkpoint_every=-1", "not a non-negative integer"]),
    (["--bogus=1"], ["Unknown command line flag 'bogus'"]),
    (["extra"], ["unexpected arguments ['extra']"]),
]
FAIRALM_BAD_FLAGS = [
    (["--methods=fairalm,bogus"], ["--methods has unknown ['bogus']", "choose from unconstrained, l2_penalty"]),
    (["--methods=fairalm,fairalm"], ["--methods has repeated values"]),
    (["--method=fairalm"], ["Unknown command line flag 'method'"]),
    (["--constraint=deo,bogus"], ["--constraint has unknown ['bogus']", "choose from deo, fpr, eo, dp, pp"]),
    (["--eta_grid=0.1,x"], ["--eta_grid must be finite numbers >= 0, got 'x'", "--eta_grid=0.01,0.1,1"]),
    (["--eta_grid=0.1,0.10"], ["--eta_grid has repeated values"]),
    (["--eta_grid=-1"], ["--eta_grid must be finite numbers >= 0, got '-1'"]),
    (["--eta_grid=0.1", "--methods=unconstrained"], ["--eta_grid tunes l2_penalty, lagrangian, fairalm"]),
    (["--eta_grid=0.1", "--grid=eta=1"], ["use either --eta_grid or --grid"]),
    (["--grid=bogus=1"], ["FairnessConfig has no setting 'bogus'", "settings: constraint, surrogate"]),
    (["--grid=eta=0.1,-1"], ["FairnessConfig.eta must be >= 0"]),
    (["--grid=eta=0.1,x"], ["--grid eta='x'"]),
    (["--grid=eta"], ["write NAME=v1,v2,..."]),
    (["--methods=unconstrained", "--grid=eta=0.1,1"], ["--grid eta changes none of --methods=unconstrained"]),
    (["--select=deo_gap"], ["choose with a validation metric (val_...)"]),
    (["--select=val_bogus"], ["no metric 'val_bogus'", "validation metrics: val_accuracy"]),
    (["--inner_steps=0"], ["--inner_steps must be >= 1"]),
    (["--constraint=deo+bogus"], ["--constraint has unknown ['bogus']"]),
    (["--seeds="], ["--seeds is empty", "--seeds=0"]),
    (["--learning_rate=0"], ["--learning_rate must be > 0"]),
    (["--eta=inf"], ["--eta must be a finite number, got inf"]),
    (["--dataset=mnist"], ["flag --dataset=mnist", "<adult|celeba_attributes|compas|german|credit>"]),
    (["--optimizer=rmsprop"], ["flag --optimizer=rmsprop", "<adam|sgd>"]),
    (["--max_accuracy_drop=2"], ["flag --max_accuracy_drop=2", "range [0.0, 1.0]"]),
    (["--batch_size=0"], ["flag --batch_size=0", "not a positive integer"]),
    (["extra"], ["unexpected arguments ['extra']"]),
]
BAD_FLAGS = {"experiments.autobalance": AUTOBALANCE_BAD_FLAGS, "experiments.fairalm": FAIRALM_BAD_FLAGS}
STEMS = {"experiments.autobalance": "autobalance_synthetic_lt", "experiments.fairalm": "fairalm_adult"}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """``{(module, case): result}`` of every bad-flag case, plus two cases that need files:
    existing results without --overwrite, and --resume with other flags."""
    out = {}
    for module, cases in BAD_FLAGS.items():
        root = tmp_path_factory.mktemp(module.replace(".", "_"))
        untouched, existing, resumed = root / "untouched", root / "existing", root / "resumed"
        existing.mkdir()
        (existing / f"{STEMS[module]}.json").write_text("{}")
        config = resumed / "checkpoints" / STEMS[module] / "config.json"
        common.Checkpointer(config.parent, every=1, config={"epochs": 1}, resume=False)
        steps = [dict(argv=flags + [f"--output_dir={untouched}"]) for flags, _ in cases]
        steps += [dict(argv=[f"--output_dir={existing}"]), dict(argv=[f"--output_dir={resumed}", "--resume"])]
        results = drive(module, steps, root / "logs")
        assert not untouched.exists()  # refused before writing anything
        assert json.loads(config.read_text()) == {"epochs": 1}  # the refused resume changed nothing
        for (flags, _), result in zip(cases, results):
            out[(module, tuple(flags))] = result
        out[(module, "existing")], out[(module, "resume")] = results[-2:]
    return out


def _check_refused(result, expected):
    assert result["code"] == 1, result["output"][-2000:]
    assert "Traceback" not in result["output"]
    for text in expected:
        assert text in result["output"], result["output"][-2000:]


@pytest.mark.parametrize(
    "module,flags,expected", [(m, flags, expected) for m, cases in BAD_FLAGS.items() for flags, expected in cases]
)
def test_bad_flags_exit_nonzero_naming_the_flag_and_the_allowed_values(refusals, module, flags, expected):
    _check_refused(refusals[(module, tuple(flags))], expected)


@pytest.mark.parametrize("module", list(BAD_FLAGS))
def test_existing_results_are_not_overwritten_without_overwrite(refusals, module):
    _check_refused(refusals[(module, "existing")], ["results exist:", "pass --overwrite"])


@pytest.mark.parametrize("module", list(BAD_FLAGS))
def test_resume_with_other_flags_is_refused(refusals, module):
    _check_refused(refusals[(module, "resume")], ["--resume:", "written with other settings", "same flags"])
