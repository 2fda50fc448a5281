r"""Where the wall time of a tuned AutoBalance suite goes (issue 16, third pass).

Runs the entry point ``experiments.autobalance`` itself (same flags, same results files under
``--output_dir``) and records every vmapped program of its suite — each baseline's
selection and final fits (``fit_runs``), each static group of AutoBalance's cross-fitted
searches and the chosen setting's search + retrain (``train_grid_chunk``) — with its wall time,
the part of it spent tracing and compiling (JAX's ``/jax/core/compile/*`` duration events) and
its number of runs. Nothing else changes: the suite's results are those of the entry point.

    python -m benchmarks.autobalance_suite_time --suite=longtail --seeds=0,1,2,3,4 --output_dir=results/x

Use a fresh compilation cache (``FAIROPT_CACHE_DIR=<empty folder>``) for cold-start numbers.
Writes ``benchmarks/results/autobalance_suite_time_<suite><tag>.{json,md}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import pandas as pd
from absl import app, flags

from experiments import autobalance as entry
from experiments import cli, common

FLAGS = flags.FLAGS  # --suite, --seeds and --selection_folds are experiments.autobalance's flags
flags.DEFINE_string("time_dir", "benchmarks/results", "Folder of the JSON / Markdown output.")
flags.DEFINE_string("tag", "", "Suffix of the output files (e.g. _before).")

COMPILE_SECONDS = [0.0]
CALLS: list[dict] = []


def _on_event(name: str, seconds: float, **_) -> None:
    if name.startswith("/jax/core/compile/"):
        COMPILE_SECONDS[0] += seconds


def _timed(function, describe):
    def wrapper(*args, **kwargs):
        compile_before, begin = COMPILE_SECONDS[0], time.perf_counter()
        out = function(*args, **kwargs)
        jax.block_until_ready(jax.tree_util.tree_leaves(out[0] if isinstance(out, tuple) else out))
        CALLS.append(dict(describe(*args, **kwargs), dataset=DATASET[0], wall=time.perf_counter() - begin,
                          compile=COMPILE_SECONDS[0] - compile_before))
        return out
    return wrapper


DATASET = [""]


def _fit_runs(solver, hyperparams, seeds, datasets, settings, init_params, cache, name):
    return dict(program=f"{name[0]} ({name[1]})", runs=len(seeds), rows=len(datasets[0]))


def _grid_chunk(configs, seeds, prepared, settings, *args, retrain=True, **kwargs):
    config = configs[0]
    static = f"init={config.init}, {config.search_space}, {config.val_objective}"
    phase = "chosen: search + retrain" if retrain else "cross-fitted searches"
    return dict(program=f"AutoBalance {phase} [{static}]", runs=len(configs), rows=len(prepared[0].search_train))


def main(argv):
    if FLAGS.suite == "none":
        raise app.UsageError("give --suite=longtail or --suite=groups")
    seeds = common.parse_seeds(FLAGS.seeds)
    jax.monitoring.register_event_duration_secs_listener(_on_event)
    entry.fit_runs = _timed(entry.fit_runs, _fit_runs)
    entry.train_grid_chunk = _timed(entry.train_grid_chunk, _grid_chunk)
    run_tuned_dataset = entry.run_tuned_dataset
    per_dataset = {}

    def timed_dataset(name, *args, **kwargs):
        DATASET[0], start = name, time.perf_counter()
        out = run_tuned_dataset(name, *args, **kwargs)
        per_dataset[name] = time.perf_counter() - start
        return out

    entry.run_tuned_dataset = timed_dataset
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    load_before, cpu_before = os.getloadavg(), time.process_time()
    begin = time.perf_counter()
    entry.main(argv)  # the entry point itself: its results files, under --output_dir
    total, cpu = time.perf_counter() - begin, time.process_time() - cpu_before
    frame = pd.DataFrame(CALLS)
    summary = dict(suite=FLAGS.suite, seeds=seeds, selection_folds=FLAGS.selection_folds or entry.SELECTION_FOLDS[FLAGS.suite],
                   total_wall=total, cpu_seconds=cpu, per_dataset=per_dataset, compile_total=COMPILE_SECONDS[0],
                   compile_in_programs=float(frame["compile"].sum()),
                   programs_wall=float(frame["wall"].sum()), load_before=load_before, load_after=os.getloadavg(),
                   cache_dir=os.environ.get("FAIROPT_CACHE_DIR", "~/.cache/fairopt/jax"),
                   commit=commit,  # the code the run imported
                   calls=CALLS)
    lines = [f"# Wall time of --suite={FLAGS.suite} ({len(seeds)} seeds, {summary['selection_folds']} folds; commit "
             f"{summary['commit']})", "",
             f"Total {total:.0f} s wall, {cpu:.0f} s CPU ({', '.join(f'{k} {v:.0f} s' for k, v in per_dataset.items())}); "
             f"in the programs below {summary['programs_wall']:.0f} s, of which tracing + compiling "
             f"{summary['compile_in_programs']:.0f} s (everywhere: {COMPILE_SECONDS[0]:.0f} s). Load average "
             f"{load_before[0]:.1f} → {summary['load_after'][0]:.1f}.", "",
             "| dataset | program | runs | fit rows | wall (s) | compile (s) |", "|---|---|---|---|---|---|"]
    for call in CALLS:
        lines.append(f"| {call['dataset']} | {call['program']} | {call['runs']} | {call['rows']} | {call['wall']:.1f} | "
                     f"{call['compile']:.1f} |")
    text = "\n".join(lines) + "\n"
    out = Path(FLAGS.time_dir)
    stem = f"autobalance_suite_time_{FLAGS.suite}{FLAGS.tag}"
    common.atomic_write_text(out / f"{stem}.json", json.dumps(summary, indent=1, default=float), overwrite=True)
    common.atomic_write_text(out / f"{stem}.md", text, overwrite=True)
    print(text)


if __name__ == "__main__":
    cli.run(main)
