"""Checkpoint and resume: a run killed with SIGKILL mid-training and resumed ends with the same
metrics as an uninterrupted run; checkpoints round-trip solver states with typed PRNG keys."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common

REPO = Path(__file__).resolve().parents[1]


def test_checkpointer_round_trips_states_with_typed_keys(tmp_path):
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(4), "key": jax.random.key(7)}
    checkpoints = common.Checkpointer(tmp_path, every=2, config={"a": 1}, resume=False)
    checkpoints.save("run", 3, state)  # not a multiple of 2: skipped
    assert not (tmp_path / "run.state").exists()
    checkpoints.save("run", 4, state)
    like = {"w": jnp.zeros((2, 3)), "step": jnp.int32(0), "key": jax.random.key(0)}
    epoch, restored = common.Checkpointer(tmp_path, every=2, config={"a": 1}, resume=True).restore("run", like)
    assert epoch == 4
    np.testing.assert_array_equal(restored["w"], state["w"])
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(state["key"]))
    np.testing.assert_array_equal(jax.random.normal(restored["key"], (3,)), jax.random.normal(state["key"], (3,)))
    with pytest.raises(ValueError, match="does not match this solver's state"):
        common.Checkpointer(tmp_path, every=2, config={"a": 1}, resume=True).restore("run", {"w": jnp.zeros(1)})
    with pytest.raises(ValueError, match="written with other settings"):
        common.Checkpointer(tmp_path, every=2, config={"a": 2}, resume=True)
    common.Checkpointer(tmp_path, every=2, config={"a": 2}, resume=False)  # a fresh start clears old states
    assert not (tmp_path / "run.state").exists()


def _command(output_dir, *extra):
    return [
        sys.executable, "-m", "experiments.facims", "--dataset=synthetic", "--methods=erm,berm", "--seeds=0",
        "--epochs=60", "--checkpoint_every=1", "--baseline_lr=1e-3", "--model_selection=best_round",
        f"--output_dir={output_dir}", *extra,
    ]


def _metrics(output_dir):
    runs = json.loads((Path(output_dir) / "facims_synthetic.json").read_text())["runs"]
    return {(run["method"], run["seed"]): {k: v for k, v in run.items() if k != "seconds"} for run in runs}


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    env = dict(os.environ, FAIROPT_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    subprocess.run(_command(tmp_path / "full"), cwd=REPO, env=env, check=True, capture_output=True)

    interrupted = tmp_path / "interrupted"
    state_file = interrupted / "checkpoints" / "facims_synthetic" / "berm_seed0_lr0.001.state"
    process = subprocess.Popen(_command(interrupted), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and process.poll() is None:
            if state_file.exists() and pickle.loads(state_file.read_bytes())["epoch"] >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    killed_at = pickle.loads(state_file.read_bytes())["epoch"]
    assert 3 <= killed_at < 60
    assert not (interrupted / "facims_synthetic.json").exists()  # no results file, not even half of one

    result = subprocess.run(_command(interrupted, "--resume"), cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(interrupted.rglob("*.tmp"))  # a temporary file cut short by the kill is cleaned up
    assert _metrics(interrupted) == _metrics(tmp_path / "full")


def test_resume_with_other_flags_is_refused(tmp_path):
    env = dict(os.environ, FAIROPT_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    checkpoints = tmp_path / "checkpoints" / "facims_synthetic"
    common.Checkpointer(checkpoints, every=1, config={"epochs": 1}, resume=False)
    result = subprocess.run(_command(tmp_path, "--resume"), cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "written with other settings" in result.stderr


def test_every_config_field_is_a_flag_that_reaches_the_solver_config():
    """Every FacimsConfig field is a flag of experiments.facims of the same name, and its value
    ends up in the config it builds (a flag parsed but not passed on would run the defaults)."""
    script = (
        "import sys, json, dataclasses\n"
        "from experiments import facims as e\n"
        "e.FLAGS(sys.argv)\n"
        "c = e.facims_config('facims_i')\n"
        "print(json.dumps(dict(fields=[f.name for f in dataclasses.fields(c)], flags=list(e.CONFIG_FLAGS), "
        "config=dataclasses.asdict(c))))\n"
    )
    flags = ["--nocommon_noise", "--num_mc=3", "--inverse=neumann", "--neumann_terms=7", "--cg_iters=2", "--alpha_low=0.2",
             "--group_mapping=map", "--log_std_min=-5", "--local_learning_rate=0.3", "--groups_per_step=2"]
    result = subprocess.run(
        [sys.executable, "-c", script, *flags], cwd=REPO, capture_output=True, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True,
    )
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(reply["flags"]) == set(reply["fields"]) - {"method"}
    expected = dict(method="facims_i", common_noise=False, num_mc=3, inverse="neumann", neumann_terms=7, cg_iters=2,
                    alpha_low=0.2, group_mapping="map", log_std_min=-5.0, local_learning_rate=0.3, groups_per_step=2)
    assert {k: reply["config"][k] for k in expected} == expected


def test_selection_fraction_holds_validation_rows_out_of_the_upper_level():
    """--selection_fraction splits the validation split (stratified by class and group) into the
    rows the FACIMS upper level trains on and the held-out rows it chooses its round on; with 0
    both are the whole split and FACIMS keeps its last round (its validation metrics are in-sample)."""
    script = (
        "import sys, json, numpy as np\n"
        "from experiments import facims as e\n"
        "e.FLAGS(sys.argv)\n"
        "d = e.seed_data(0)\n"
        "ids = lambda part: sorted(map(tuple, np.round(np.asarray(part.features, np.float64), 5).tolist()))\n"
        "upper, held, val = ids(d.upper_val), ids(d.selection), ids(d.splits.val)\n"
        "grouped_rows = int(np.asarray(d.grouped.val.count).sum())\n"
        "print(json.dumps(dict(upper=len(upper), held=len(held), val=len(val), union=sorted(upper + held) == val,\n"
        "    cells_val=d.splits.val.cell_counts.tolist(), cells_held=d.selection.cell_counts.tolist(),\n"
        "    grouped_rows=grouped_rows, selects=e.selects_round(e.facims_config('facims')))))\n"
    )
    replies = []
    for fraction in ("0.3", "0"):
        result = subprocess.run(
            [sys.executable, "-c", script, "--dataset=synthetic", f"--selection_fraction={fraction}"], cwd=REPO,
            capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True,
        )
        replies.append(json.loads(result.stdout.strip().splitlines()[-1]))
    held_out, whole = replies
    assert held_out["union"] and held_out["held"] == round(0.3 * held_out["val"]) and held_out["selects"]
    assert held_out["grouped_rows"] == held_out["upper"]  # the upper level's arrays hold only its own rows
    cells, held_cells = np.asarray(held_out["cells_val"]), np.asarray(held_out["cells_held"])
    assert np.all(np.abs(held_cells - 0.3 * cells) < 1.0 + 1e-9)  # every (class, group) cell split 70/30
    assert whole["held"] == whole["upper"] == whole["val"] == whole["grouped_rows"] and not whole["selects"]


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--seeds=0,x", "--seeds must be integers"),
        ("--methods=facims,bogus", "--methods has unknown ['bogus']"),
        ("--divergence=bogus", "value should be one of <kl|w2>"),
        ("--epochs=0", "0 is not a positive integer"),
        ("--cg_iters=0", "FacimsConfig.cg_iters must be >= 1, got 0"),
        ("--inverse_terms=3", "Unknown command line flag 'inverse_terms'"),
        ("--grid=bogus=1,2", "FacimsConfig has no setting 'bogus' (settings: method, alpha_low"),
        ("--grid=alpha_low=0.1,x", "--grid alpha_low='x': could not convert"),
        ("--grid=alpha_low=-1", "FacimsConfig.alpha_low must be >= 0, got -1.0"),
        ("--grid=alpha_low", "--grid 'alpha_low': write NAME=v1,v2,..."),
        ("--select=balanced_accuracy", "choose with a validation metric (val_...), never a test one"),
        ("--hidden=4,x", "--hidden must be comma-separated integers"),
        ("--baseline_lr=1e-3,0", "--baseline_lr must be distinct numbers > 0"),
        ("--model_selection=best", "value should be one of <auto|last|best_round>"),
    ],
)
def test_bad_flags_and_settings_are_usage_errors_without_a_traceback(flag, message):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.facims", flag, "--output_dir=/nonexistent/never-written"],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_a_grid_sweep_writes_a_row_per_setting_and_seed_and_compiles_the_round_once(tmp_path):
    """--grid=alpha_low=... x 2 seeds: 8 rows with the setting as a column, validation and test
    metrics, one selected row, and one compiled FACIMS round for all 8 runs."""
    env = dict(os.environ, FAIROPT_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    command = [
        sys.executable, "-m", "experiments.facims", "--dataset=synthetic", "--grid=alpha_low=0.1,0.4,0.7,1.0",
        "--seeds=0,42", "--epochs=2", "--hidden=8", "--num_mc=1", "--middle_steps=2", "--upper_steps=1",
        "--group_mapping=vmap", "--grid_chunk=3", "--select=val_balanced_accuracy", f"--output_dir={tmp_path}",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "facims_synthetic.json").read_text())
    runs = payload["runs"]
    assert sorted((run["alpha_low"], run["seed"]) for run in runs) == sorted(
        (a, s) for a in (0.1, 0.4, 0.7, 1.0) for s in (0, 42)
    )
    assert all(0 <= run["val_balanced_accuracy"] <= 1 and 0 <= run["balanced_accuracy"] <= 1 for run in runs)
    assert payload["config"]["compiled_rounds"] == {"round_0": 1}  # 3 chunks (3 + 3 + 2 padded to 3), one program
    labels = [row["run"] for row in payload["summary"]]
    assert labels[:4] == [f"facims [alpha_low={a:g}]" for a in (0.1, 0.4, 0.7, 1.0)]
    assert labels[4] == "facims (selected on val_balanced_accuracy)"
    best = max(payload["summary"][:4], key=lambda row: row["val_balanced_accuracy_mean"])
    assert payload["summary"][4]["balanced_accuracy_mean"] == best["balanced_accuracy_mean"]


def test_scikit_learn_reference_rows_are_tuned_on_validation(tmp_path):
    from experiments import sklearn_reference

    result = subprocess.run(
        [sys.executable, "-m", "experiments.facims", "--dataset=synthetic", "--methods=logreg", "--seeds=0",
         f"--output_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", FAIROPT_CACHE_DIR=str(tmp_path / "c")),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = json.loads((tmp_path / "facims_synthetic.json").read_text())["runs"]
    assert run["method"] == "logreg"
    assert run["chosen_on_validation"] in [f"C={c:g}" for c in sklearn_reference.LOGREG_C]
    assert 0.5 < run["val_balanced_accuracy"] <= 1 and 0.5 < run["balanced_accuracy"] <= 1
