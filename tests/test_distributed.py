"""Several processes as one run (``python -m experiments.facims --distributed``): 2 and 4 local
CPU processes, coordinator on 127.0.0.1, one CPU device each (the mesh spans the processes).

* a FACIMS grid sweep split over the processes' devices (whole runs per device), and a sweep
  whose group axis is split too (``--shard_groups=2``: a runs x groups mesh), write the same
  results as one process (same rows, values within float tolerance);
* only process 0 writes: every process gets its own ``--output_dir`` and only process 0's
  folder exists afterwards;
* a process SIGKILLed mid-training makes the other stop with a clear error well within 60 s,
  and no results file (nor a half-written one) appears.

Each process is a fresh interpreter (import, JAX start-up, compilation), so the runs are tiny:
a 600-row CSV with 4 groups, hidden width 4, 2 rounds of one middle and one upper step. All
runs of the module share one compilation cache.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STEM = "facims_small"
RESULTS = [f"{STEM}{suffix}" for suffix in (".json", ".csv", "_summary.csv", ".md")]
SWEEP = ["--grid=alpha_low=0.1,0.7", "--seeds=0,1", "--epochs=2", "--hidden=4", "--num_mc=1", "--middle_steps=1",
         "--upper_steps=1", "--inverse=neumann", "--neumann_terms=1", "--num_eval_samples=1", "--group_mapping=vmap", "--samples_per_group=0", "--batch_size=16",
         "--checkpoint_every=1"]
# float32 programs of different batch shapes (and, with the groups split, an all-reduce in
# another order) differ in the last bits; rates of a 150-row test split move in steps of 1/150.
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A small CSV (synthetic subgroups: 4 groups, 4 features) and a shared compilation cache."""
    from fairopt import data

    root = tmp_path_factory.mktemp("distributed")
    dataset = data.synthetic_subgroups(600, num_features=4, class_proportions=(0.6, 0.4),
                                       group_proportions=(0.4, 0.3, 0.2, 0.1), seed=3)
    columns = {f"x{j}": dataset.features[:, j] for j in range(dataset.num_features)}
    import pandas as pd

    pd.DataFrame(dict(columns, label=dataset.labels, group=dataset.groups)).to_csv(root / "small.csv", index=False)
    return root


def _env(root: Path) -> dict:
    flags = "--xla_backend_optimization_level=0"  # only shortens compilation; every run shares it
    return dict(os.environ, JAX_PLATFORMS="cpu", FAIROPT_CACHE_DIR=str(root / "cache"),
                XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())


def _command(root: Path, output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.facims", f"--data={root / 'small.csv'}", "--label=label", "--group=group",
            *SWEEP, f"--output_dir={output_dir}", *extra]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(root: Path, name: str, num_processes: int, *extra: str) -> tuple[list[subprocess.Popen], list[Path]]:
    """Start ``num_processes`` processes of one distributed run; process i writes to
    ``<root>/<name>/p<i>`` and logs to ``<root>/<name>/log<i>``."""
    port = _free_port()
    folder = root / name
    folder.mkdir()
    processes, outputs = [], []
    for index in range(num_processes):
        output = folder / f"p{index}"
        command = _command(root, output, "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                           f"--num_processes={num_processes}", f"--process_id={index}", "--heartbeat_timeout=10", *extra)
        with open(folder / f"log{index}", "w") as log:
            processes.append(subprocess.Popen(command, cwd=REPO, env=_env(root), stdout=log, stderr=subprocess.STDOUT))
        outputs.append(output)
    return processes, outputs


def _stop(processes) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def _run_distributed(root: Path, name: str, num_processes: int, *extra: str) -> list[Path]:
    processes, outputs = _start(root, name, num_processes, *extra)
    try:
        codes = [process.wait(timeout=600) for process in processes]
    finally:
        _stop(processes)
    logs = [(root / name / f"log{i}").read_text()[-3000:] for i in range(num_processes)]
    assert codes == [0] * num_processes, "\n".join(logs)
    return outputs


def _rows(output_dir: Path) -> dict:
    payload = json.loads((output_dir / f"{STEM}.json").read_text())
    return {(row["setting"], row["seed"]): row for row in payload["runs"]}, payload["config"]


@pytest.fixture(scope="module")
def reference(workspace):
    output = workspace / "single"
    result = subprocess.run(_command(workspace, output), cwd=REPO, env=_env(workspace), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows, config = _rows(output)
    assert config["processes"] == 1 and config["mesh"] is None
    return rows


def _assert_same_results(rows: dict, reference: dict) -> None:
    assert sorted(rows) == sorted(reference) and len(rows) == 4  # 2 settings x 2 seeds
    for run, want in reference.items():
        got = rows[run]
        assert sorted(got) == sorted(want), run
        for column, value in want.items():
            if column == "seconds":
                continue
            if isinstance(value, float):
                np.testing.assert_allclose(got[column], value, rtol=RTOL, atol=ATOL, err_msg=f"{run} {column}")
            else:
                assert got[column] == value, (run, column)


@pytest.mark.parametrize(
    "num_processes, extra, mesh",
    [(2, (), {"runs": 2, "groups": 1}), (4, ("--shard_groups=2",), {"runs": 2, "groups": 2})],
    ids=["2proc-runs", "4proc-runs2xgroups2"],
)
def test_a_distributed_sweep_writes_the_single_process_results_from_process_0_only(
        workspace, reference, num_processes, extra, mesh):
    name = f"run{num_processes}{''.join(extra).replace('-', '').replace('=', '')}"
    outputs = _run_distributed(workspace, name, num_processes, *extra)
    rows, config = _rows(outputs[0])
    assert config["processes"] == num_processes and config["mesh"] == mesh
    _assert_same_results(rows, reference)
    assert sorted(p.name for p in outputs[0].iterdir()) == ["checkpoints"] + sorted(RESULTS)
    assert not any(output.exists() for output in outputs[1:]), "a process other than 0 wrote files"
    # process 0's checkpoint holds the gathered state of every run: all 4 runs, whatever the layout
    runs = json.loads((outputs[0] / "checkpoints" / STEM / "runs.json").read_text())
    assert len(runs) == 4


def test_a_killed_process_stops_the_other_with_a_clear_error_and_no_results(workspace, reference):
    """SIGKILL process 1 once process 0 has checkpointed a round: process 0 must stop with the
    error within 60 s (heartbeat timeout 10 s), leaving no results and no temporary files."""
    processes, outputs = _start(workspace, "kill", 2, "--epochs=100000")
    try:
        checkpoint = outputs[0] / "checkpoints" / STEM / "facims_static0_chunk0.state"
        deadline = time.time() + 600
        while not checkpoint.exists():
            assert time.time() < deadline and all(p.poll() is None for p in processes), (
                (workspace / "kill" / "log0").read_text()[-3000:])
            time.sleep(0.2)
        processes[1].send_signal(signal.SIGKILL)
        killed = time.time()
        code = processes[0].wait(timeout=60)
        seconds = time.time() - killed
    finally:
        _stop(processes)
    log = (workspace / "kill" / "log0").read_text()
    assert code != 0 and seconds < 60
    # in a collective (almost always: every round all-gathers its metrics) the entry point's
    # message; if process 0 was busy with local work, JAX's own after the heartbeat timeout
    ours = "Error: process 0 of 2 stopped" in log and "--resume" in log
    assert ours or "another task died" in log, log[-3000:]
    leftovers = sorted(p.name for p in outputs[0].rglob("*") if p.is_file() and not p.parent.name == STEM)
    assert leftovers == [], leftovers  # no results file, whole or partial
    assert not list(outputs[0].rglob("*.tmp")) and not outputs[1].exists()
    print(f"process 0 stopped {seconds:.1f} s after process 1 was killed ({'our' if ours else 'JAX'} message)")


def test_sweep_mesh_and_shard_runs_place_runs_and_groups_and_name_the_fix():
    """In this (one-device) process: the mesh axes, the specs shard_runs gives a stacked
    FACIMS data pytree, the single-process identities of the collectives, and the errors."""
    import jax
    from jax.sharding import PartitionSpec

    from fairopt import distributed, sharding
    from fairopt.data import GroupedArrays

    with pytest.raises(ValueError, match=r"divisor of the 1 devices \(1\), got 2"):
        sharding.sweep_mesh(2)
    mesh = sharding.sweep_mesh()
    assert mesh.axis_names == ("runs", "groups") and dict(mesh.shape) == {"runs": 1, "groups": 1}
    stacked = GroupedArrays(np.zeros((3, 4, 5, 2), np.float32), np.zeros((3, 4, 5), np.int32), np.ones((3, 4), np.int32))
    placed = sharding.shard_runs((stacked, np.arange(3.0)), mesh)
    assert [leaf.sharding.spec for leaf in placed[0]] == [PartitionSpec("runs", "groups")] * 3
    assert placed[1].sharding.spec == PartitionSpec("runs")
    with pytest.raises(ValueError, match="leading run axis must be a multiple"):
        sharding.shard_runs(np.float32(1.0), mesh)
    tree = {"w": np.arange(3.0), "key": jax.random.key(0)}
    assert distributed.gather(tree) is tree and distributed.broadcast(tree) is tree
    assert distributed.broadcast_json({"a": [1, float("nan")]})["a"][0] == 1 and distributed.is_primary()
