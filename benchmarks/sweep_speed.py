r"""A FACIMS sweep as one compiled program against one command per setting, side by side.

Issue "hyperparameters as data": ``--grid=alpha_low=0.1,0.4,0.7,1.0`` runs every (setting, seed)
through ONE compiled, vmapped FACIMS round. This benchmark times, in one run on one machine:

* ``grid`` — ``python -m experiments.facims --grid=alpha_low=... --seeds=...`` with an empty
  compilation cache (it compiles once);
* ``separate_cold`` — one ``--alpha_low=v`` command per value, each with its own empty
  compilation cache: what a sweep cost when every value was a new program (each compiled);
* ``separate_shared_cache`` — the same commands sharing one cache: since the numbers are data,
  commands 2..n load the first one's program from disk instead of compiling it (each still
  starts a process, loads the data, traces the round and loads the program).

It also times the cold compilation of one round (``lower + compile`` of the jitted step,
cache off) for ``group_mapping`` vmap and unroll, in a subprocess per measurement, for this
tree and — with ``--before=PATH`` (a checkout of an older commit, e.g. made with
``git worktree add /tmp/before 41f606b``) — for that tree too, alternating, so the before/after
figures see the same machine load.

    python -m benchmarks.sweep_speed                         # credit, 4 alpha_low x 2 seeds, 5 rounds
    python -m benchmarks.sweep_speed --before=/tmp/before    # plus compile times before/after
    python -m benchmarks.sweep_speed --epochs=2 --seeds=0 --values=0.1,0.7 --hidden=16 --skip_compile  # smoke

Writes ``<output_dir>/sweep_speed.{json,md}`` and prints the table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "credit", "Dataset of experiments.facims.")
flags.DEFINE_list("values", ["0.1", "0.4", "0.7", "1.0"], "alpha_low values of the sweep.")
flags.DEFINE_list("seeds", ["0", "42"], "Seeds of every setting.")
flags.DEFINE_integer("epochs", 5, "FACIMS rounds per run.", lower_bound=1)
flags.DEFINE_list("hidden", ["400", "200", "100"], "MLP widths.")
flags.DEFINE_string("before", None, "A checkout of an older fairopt to time its round compilation beside this tree's.")
flags.DEFINE_bool("skip_compile", False, "Skip the compile-time measurements.")
flags.DEFINE_integer("compile_repeats", 1, "Cold compilations per tree and group mapping.", lower_bound=1)
flags.DEFINE_string("output_dir", "benchmarks/results", "Folder for sweep_speed.{json,md}.")

# Cold compile time of one credit FACIMS round; works with the API before and after
# hyperparameters became data (init(key, params), step(state, (train, val))).
_COMPILE_SCRIPT = r"""
import json, sys, time
import jax
from fairopt import data, models
from fairopt.solvers.facims import FacimsConfig, facims
mapping = sys.argv[1]
splits = data.standardize(data.facims_split(data.credit(), seed=0))
original = splits.train
train = data.resample_per_group(original, 400, seed=0)
pad = int((original.group_counts + splits.val.group_counts + splits.test.group_counts).max())
grouped = (data.group_arrays(train, pad_to=pad), data.group_arrays(splits.val, pad_to=pad))
params, apply_fn = models.make_model("mlp", 2, train.num_features, jax.random.key(0))
solver = facims(apply_fn, FacimsConfig(group_mapping=mapping), class_counts=original.class_counts,
                group_counts=original.group_counts)
state = solver.init(jax.random.key(1), params)
started = time.perf_counter()
lowered = jax.jit(solver.step).lower(state, grouped)
traced = time.perf_counter() - started
lowered.compile()
print(json.dumps(dict(trace_lower=traced, total=time.perf_counter() - started)))
"""


def _facims_command(output_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "experiments.facims", f"--dataset={FLAGS.dataset}", "--methods=facims",
        f"--seeds={','.join(FLAGS.seeds)}", f"--epochs={FLAGS.epochs}", f"--hidden={','.join(FLAGS.hidden)}",
        "--checkpoint_every=0", f"--output_dir={output_dir}", "--overwrite", *extra,
    ]


def _timed(command: list[str], cache: Path, cwd: Path = REPO) -> float:
    env = dict(os.environ, FAIROPT_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu")
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds


def _compile_seconds(tree: Path, mapping: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(tree))
    env.pop("FAIROPT_CACHE_DIR", None)
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, mapping], cwd=tree, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"compile measurement in {tree} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    work = Path(tempfile.mkdtemp(prefix="sweep_speed_"))
    grid = f"--grid=alpha_low={','.join(FLAGS.values)}"
    load_before = os.getloadavg()
    timings = {"grid": _timed(_facims_command(work / "grid", grid), work / "cache_grid")}
    print(f"grid: {timings['grid']:.1f} s", file=sys.stderr, flush=True)
    timings["separate_cold"] = sum(
        _timed(_facims_command(work / f"cold_{v}", f"--alpha_low={v}"), work / f"cache_cold_{v}") for v in FLAGS.values
    )
    print(f"separate, cold caches: {timings['separate_cold']:.1f} s", file=sys.stderr, flush=True)
    timings["separate_shared_cache"] = sum(
        _timed(_facims_command(work / f"shared_{v}", f"--alpha_low={v}"), work / "cache_shared") for v in FLAGS.values
    )
    print(f"separate, one shared cache: {timings['separate_shared_cache']:.1f} s", file=sys.stderr, flush=True)
    compile_rows = []
    if not FLAGS.skip_compile:
        trees = [("after", REPO)] + ([("before", Path(FLAGS.before).resolve())] if FLAGS.before else [])
        for _ in range(FLAGS.compile_repeats):
            for mapping in ("vmap", "unroll"):
                for name, tree in trees:
                    seconds = _compile_seconds(tree, mapping)
                    compile_rows.append(dict(tree=name, group_mapping=mapping, **seconds))
                    print(f"compile {name} {mapping}: {seconds['total']:.1f} s", file=sys.stderr, flush=True)
    runs = len(FLAGS.values) * len(FLAGS.seeds)
    result = dict(
        protocol=dict(dataset=FLAGS.dataset, values=FLAGS.values, seeds=FLAGS.seeds, epochs=FLAGS.epochs,
                      hidden=FLAGS.hidden, runs=runs),
        seconds=timings,
        ratio_grid_over_separate_cold=timings["grid"] / timings["separate_cold"],
        ratio_grid_over_separate_shared_cache=timings["grid"] / timings["separate_shared_cache"],
        compile=compile_rows,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_before=load_before, load_after=os.getloadavg()),
    )
    lines = [
        f"# FACIMS sweep: one program vs one command per setting ({FLAGS.dataset}, {len(FLAGS.values)} alpha_low x "
        f"{len(FLAGS.seeds)} seeds, {FLAGS.epochs} rounds)",
        "",
        "| variant | wall s | grid / variant |",
        "|---|---|---|",
        f"| grid (one compiled, vmapped program) | {timings['grid']:.1f} | 1.00 |",
        f"| separate commands, cold caches | {timings['separate_cold']:.1f} | {result['ratio_grid_over_separate_cold']:.2f} |",
        f"| separate commands, one shared cache | {timings['separate_shared_cache']:.1f} | "
        f"{result['ratio_grid_over_separate_shared_cache']:.2f} |",
    ]
    if compile_rows:
        lines += ["", "| tree | group_mapping | trace + lower s | cold compile total s |", "|---|---|---|---|"]
        lines += [f"| {r['tree']} | {r['group_mapping']} | {r['trace_lower']:.1f} | {r['total']:.1f} |" for r in compile_rows]
    lines += ["", f"Load average before / after: {load_before} / {os.getloadavg()}; {platform.platform()}, {os.cpu_count()} CPUs."]
    markdown = "\n".join(lines) + "\n"
    output = Path(FLAGS.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from experiments import common

    common.atomic_write_text(output / "sweep_speed.json", json.dumps(result, indent=2) + "\n", overwrite=True)
    common.atomic_write_text(output / "sweep_speed.md", markdown, overwrite=True)
    print(markdown)


if __name__ == "__main__":
    app.run(main)
