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
        "--epochs=60", "--checkpoint_every=1", f"--output_dir={output_dir}", *extra,
    ]


def _metrics(output_dir):
    runs = json.loads((Path(output_dir) / "facims_synthetic.json").read_text())["runs"]
    return {(run["method"], run["seed"]): {k: v for k, v in run.items() if k != "seconds"} for run in runs}


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    env = dict(os.environ, FAIROPT_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    subprocess.run(_command(tmp_path / "full"), cwd=REPO, env=env, check=True, capture_output=True)

    interrupted = tmp_path / "interrupted"
    state_file = interrupted / "checkpoints" / "facims_synthetic" / "berm_seed0.state"
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


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--seeds=0,x", "--seeds must be integers"),
        ("--methods=facims,bogus", "--methods has unknown ['bogus']"),
        ("--divergence=bogus", "value should be one of <kl|w2>"),
        ("--epochs=0", "0 is not a positive integer"),
    ],
)
def test_bad_flags_exit_nonzero_with_the_allowed_values_and_no_traceback(flag, message):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.facims", flag, "--output_dir=/nonexistent/never-written"],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_flags_reach_the_solver_config():
    """Every FacimsConfig flag of experiments.facims ends up in the config it builds (a flag that
    was parsed but not passed on would silently run the defaults)."""
    script = (
        "import sys, json\n"
        "from experiments import facims as e\n"
        "e.FLAGS(sys.argv)\n"
        "c = e.facims_config('facims_i')\n"
        "print(json.dumps(dict(method=c.method, common_noise=c.common_noise, num_mc=c.num_mc, "
        "inverse=c.inverse, inverse_terms=c.inverse_terms, alpha_low=c.alpha_low, group_mapping=c.group_mapping)))\n"
    )
    flags = ["--nocommon_noise", "--num_mc=3", "--inverse=neumann", "--inverse_terms=7", "--alpha_low=0.2", "--group_mapping=map"]
    result = subprocess.run(
        [sys.executable, "-c", script, *flags], cwd=REPO, capture_output=True, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True,
    )
    config = json.loads(result.stdout.strip().splitlines()[-1])
    assert config == dict(method="facims_i", common_noise=False, num_mc=3, inverse="neumann", inverse_terms=7, alpha_low=0.2, group_mapping="map")
