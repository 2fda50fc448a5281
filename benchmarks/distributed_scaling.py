r"""A FACIMS sweep over 1, 2 and 4 processes on this machine: time per round and communication.

Each layout ``P:g`` starts ``P`` local processes (``jax.distributed`` with the coordinator on
127.0.0.1, one CPU device each, Gloo collectives); the sweep (``--values`` of alpha_low x one
seed, on the credit data in the paper protocol) is stacked on a run axis and placed on
:func:`fairopt.sharding.sweep_mesh` with ``g`` devices on the group axis (``g = 1``: whole runs
per process). Process 0 reports

* ``compile_s``: lowering + compiling the vmapped round (every process compiles it);
* ``round_s``: median wall time of a round after compilation, including the all-gather of the
  round's metrics that ``experiments.facims`` does every round;
* ``gather_s``: the final all-gather of every run's state (what process 0 checkpoints and
  evaluates), and ``state_mb``, its size;
* ``collective_mb``: the bytes of the collectives in the compiled round, read from its HLO
  (``all-reduce``, ``all-gather``, ...; a collective inside a loop body is counted once, so a
  loop of n iterations moves n times as much).

    python -m benchmarks.distributed_scaling                       # credit, 4 runs, layouts 1:1 2:1 4:1 2:2 4:2
    python -m benchmarks.distributed_scaling --hidden=16 --rounds=2 --layouts=1:1,2:1 --results_dir=/tmp  # smoke

``--hidden`` is the MLP of ``experiments.facims`` (default 400,200,100). Writes
``<results_dir>/distributed_scaling.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from experiments import facims as facims_entry  # its data protocol (prepare) and its --hidden flag

REPO = Path(__file__).resolve().parents[1]

FLAGS = flags.FLAGS
flags.DEFINE_list("values", ["0.1", "0.4", "0.7", "1.0"], "alpha_low of the runs (one seed each).")
flags.DEFINE_integer("seed", 0, "Seed of the data split and of every run.")
flags.DEFINE_integer("rounds", 3, "Timed rounds after compilation.", lower_bound=1)
flags.DEFINE_list("layouts", ["1:1", "2:1", "4:1", "2:2", "4:2"], "processes:group_devices pairs to time.")
flags.DEFINE_string("results_dir", "benchmarks/results", "Folder for distributed_scaling.{json,md}.")
flags.DEFINE_string("from_log", None, "Write the report from the result lines (JSON, one per layout) that an "
                    "interrupted run printed, instead of measuring.")
# set by the driver for its worker processes
flags.DEFINE_integer("worker_processes", 0, "Internal: run as a worker of this many processes.")
flags.DEFINE_integer("worker_id", 0, "Internal: this worker's process id.")
flags.DEFINE_integer("worker_groups", 1, "Internal: devices on the group axis.")
flags.DEFINE_integer("port", 0, "Internal: coordinator port.")

_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4, "s16": 2, "u16": 2, "s8": 1, "u8": 1,
          "pred": 1}
_COLLECTIVE = re.compile(r"=\s*(.*?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes of each kind of collective in an HLO module (result shapes; static count)."""
    totals: dict[str, int] = {}
    for line in hlo.splitlines():
        match = _COLLECTIVE.search(line)
        if not match:
            continue
        size = 0
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", match.group(1)):
            count = 1
            for dim in filter(None, dims.split(",")):
                count *= int(dim)
            size += count * _BYTES.get(dtype, 4)
        totals[match.group(2)] = totals.get(match.group(2), 0) + size
    return totals


def _size(num_bytes: float) -> str:
    return f"{num_bytes:.0f} B" if num_bytes < 1024 else f"{num_bytes / 2**20:.3f} MB"


def worker() -> None:
    import jax
    import numpy as np

    from fairopt import distributed, sharding

    if FLAGS.worker_processes > 1:
        distributed.initialize(f"127.0.0.1:{FLAGS.port}", FLAGS.worker_processes, FLAGS.worker_id,
                               heartbeat_timeout_seconds=120)
    from fairopt import data, models, sweep
    from fairopt.solvers.facims import FacimsConfig, FacimsData, facims

    splits, original = facims_entry.prepare(data.credit(), FLAGS.seed, 400)
    pad_to = int(max((original.group_counts + splits.val.group_counts + splits.test.group_counts).max(),
                     splits.train.group_counts.max()))
    # every layout runs the same program: the groups padded (empty, inactive groups) to a multiple
    # of the largest group-axis split timed (credit has 7 education groups)
    multiple = max(int(layout.split(":")[1]) for layout in FLAGS.layouts)
    grouped = FacimsData(*(sharding.pad_groups(data.group_arrays(split, pad_to=pad_to), multiple)
                           for split in (splits.train, splits.val)))
    group_counts = np.pad(original.group_counts, (0, grouped.train.y.shape[0] - len(original.group_counts)))
    params, apply_fn = models.make_model("mlp", splits.train.num_classes, splits.train.num_features,
                                         jax.random.key(FLAGS.seed), hidden=tuple(int(w) for w in FLAGS.hidden))
    base = FacimsConfig(group_mapping="vmap")
    solver = facims(apply_fn, base, class_counts=original.class_counts, group_counts=group_counts,
                    batch_size=50, val_batch_size=50)
    configs = [dataclasses.replace(base, alpha_low=float(v)) for v in FLAGS.values]
    runs = len(configs)
    init = jax.vmap(lambda key, h: solver.init(key, params, h))
    states = init(jax.random.split(jax.random.key(FLAGS.seed + 1), runs), sweep.stack([c.hyperparams() for c in configs]))
    batches = sweep.stack([grouped] * runs)
    if jax.device_count() > 1:
        states, batches = sharding.shard_runs((states, batches), sharding.sweep_mesh(FLAGS.worker_groups))
    step = jax.jit(jax.vmap(solver.step))
    started = time.perf_counter()
    compiled = step.lower(states, batches).compile()
    compile_s = time.perf_counter() - started
    collectives = collective_bytes(compiled.as_text())
    round_s, metric_bytes = [], 0
    for _ in range(FLAGS.rounds):
        started = time.perf_counter()
        states, metrics = compiled(states, batches)
        metrics = distributed.gather(metrics)
        jax.block_until_ready(states)
        round_s.append(time.perf_counter() - started)
        metric_bytes = sum(np.asarray(v).nbytes for v in metrics.values())
    started = time.perf_counter()
    gathered = distributed.gather(states)
    jax.block_until_ready(gathered)
    gather_s = time.perf_counter() - started
    leaves = jax.tree_util.tree_leaves(gathered)
    state_bytes = sum(np.asarray(jax.random.key_data(l) if distributed._is_key(l) else l).nbytes for l in leaves)
    if distributed.is_primary():
        print(json.dumps(dict(
            processes=jax.process_count(), devices=jax.device_count(), group_devices=FLAGS.worker_groups, runs=runs,
            groups=int(len(group_counts)), compile_s=compile_s, round_s=float(np.median(round_s)),
            round_s_all=round_s, gather_s=gather_s, state_mb=state_bytes / 2**20, metric_bytes=int(metric_bytes),
            collective_mb={k: v / 2**20 for k, v in collectives.items()},
        )))


def run_layout(processes: int, groups: int) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-m", "benchmarks.distributed_scaling", f"--values={','.join(FLAGS.values)}",
            f"--seed={FLAGS.seed}", f"--hidden={','.join(FLAGS.hidden)}", f"--rounds={FLAGS.rounds}",
            f"--worker_processes={processes}", f"--worker_groups={groups}", f"--port={port}",
            f"--layouts={','.join(FLAGS.layouts)}"]
    started = time.perf_counter()
    children = [subprocess.Popen(argv + [f"--worker_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for i in range(processes)]
    try:
        outputs = [child.communicate(timeout=3600) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    wall = time.perf_counter() - started
    for child, (_, err) in zip(children, outputs):
        if child.returncode != 0:
            raise RuntimeError(f"layout {processes}:{groups} failed:\n{err[-3000:]}")
    result = json.loads(outputs[0][0].strip().splitlines()[-1])
    result["wall_s"] = wall
    print(json.dumps(result), flush=True)
    return result


def main(argv):
    del argv
    if FLAGS.worker_processes:
        return worker()
    load_before = os.getloadavg()
    if FLAGS.from_log:
        results = [json.loads(line) for line in Path(FLAGS.from_log).read_text().splitlines() if line.startswith("{")]
    else:
        results = []
        for layout in FLAGS.layouts:
            processes, groups = (int(x) for x in layout.split(":"))
            results.append(run_layout(processes, groups))
    base = next(r for r in results if r["processes"] == 1)
    load = ("load average not recorded by the interrupted run" if FLAGS.from_log
            else f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    layouts = ", ".join(f"{r['processes']}:{r['group_devices']}" for r in results)
    measured = f" Layouts reported: {layouts} (from {FLAGS.from_log}, an interrupted run)." if FLAGS.from_log else ""
    lines = [
        f"# FACIMS sweep over processes on this machine ({os.cpu_count()} cores, {load})", "",
        f"credit, {base['runs']} runs (alpha_low {', '.join(FLAGS.values)}; seed {FLAGS.seed}), MLP "
        f"{','.join(FLAGS.hidden)}, {base['groups']} groups (7 education groups + empty padding), median of "
        f"{FLAGS.rounds} rounds.{measured}", "",
        "| processes | group devices | round s | speed-up | compile s | final gather s | state MB | "
        "collectives in the round (static) | metrics gathered per round (bytes) | total wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        comm = ", ".join(f"{k} {_size(v * 2**20)}" for k, v in sorted(r["collective_mb"].items())) or "none"
        lines.append(
            f"| {r['processes']} | {r['group_devices']} | {r['round_s']:.2f} | {base['round_s'] / r['round_s']:.2f} | "
            f"{r['compile_s']:.1f} | {r['gather_s']:.3f} | {r['state_mb']:.2f} | {comm} | {r['metric_bytes']} | "
            f"{r['wall_s']:.1f} |"
        )
    markdown = "\n".join(lines) + "\n"
    output = Path(FLAGS.results_dir)
    output.mkdir(parents=True, exist_ok=True)
    payload = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_before=load_before,
                                load_after=os.getloadavg()), flags={k: FLAGS[k].value for k in
                                ("values", "seed", "hidden", "rounds", "layouts")}, results=results)
    (output / "distributed_scaling.json").write_text(json.dumps(payload, indent=2) + "\n")
    (output / "distributed_scaling.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    app.run(main)
