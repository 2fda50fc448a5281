r"""Seconds per FACIMS credit round: the defaults before and after the held-out-selection pass, side by side.

The quality issue asks that a FACIMS round cost at most 1.5x what it did before its changes.
This times, in one process on one machine, the steady-state wall time of one jitted round
(``solver.step``) for two configurations:

* ``before``: the third-pass defaults: the papers' 400-200-100 MLP, ``damping=0``,
  ``global_learning_rate=0.1``, ``tau=1``, ``alpha_low=0.7``, ``hparam_learning_rate=1e-3``; the
  upper level on every validation row, no per-round selection;
* ``after``: the current defaults (``FacimsConfig()``, the 32-unit MLP of ``experiments.facims``),
  the upper level on 2/3 of the validation rows, plus what ``--model_selection=auto`` adds to every
  round: the prediction on the held-out third and the best-round update.

Rounds alternate between the two (``--rounds`` each, after one warm-up round that compiles), so
both see the same machine load; the medians and their ratio are reported.

    python -m benchmarks.facims_round_time            # credit, seed 0, 5 timed rounds each

Writes ``<output_dir>/facims_round_time.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from experiments.paper import hold_out_selection, prepare
from fairopt import data, models
from fairopt.solvers.facims import FacimsConfig, FacimsData, facims
from fairopt.train import best_iterate_tracker

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 5, "Timed rounds per configuration (after one warm-up round).", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the split and the initialisation.")
flags.DEFINE_string("output_dir", "benchmarks/results", "Folder for facims_round_time.{json,md}.")

BEFORE = dict(config=dataclasses.replace(FacimsConfig(), damping=0.0, global_learning_rate=0.1, tau=1.0, alpha_low=0.7,
                                         hparam_learning_rate=1e-3),
              hidden=(400, 200, 100), selection_fraction=0.0)
AFTER = dict(config=FacimsConfig(), hidden=(32,), selection_fraction=1 / 3)


def build(setting, splits, original, seed):
    """A jitted round (and, with held-out rows, the per-round best-round update) and its first state."""
    upper, selection = hold_out_selection(splits.val, setting["selection_fraction"], seed)
    params, apply_fn = models.make_model("mlp", 2, splits.train.num_features, jax.random.key(seed), hidden=setting["hidden"])
    solver = facims(apply_fn, setting["config"], class_counts=original.class_counts, group_counts=original.group_counts)
    grouped = FacimsData(data.group_arrays(splits.train), data.group_arrays(upper))
    state = solver.init(jax.random.key(seed + 1), params)
    step = jax.jit(solver.step)
    if not setting["selection_fraction"]:
        return lambda state_and_best: (step(state_and_best[0], grouped)[0], None), (state, None)
    init_best, update_best = best_iterate_tracker(solver.predict, num_classes=2)
    update_best = jax.jit(update_best)
    x, y = jnp.asarray(selection.features), jnp.asarray(selection.labels)
    mask = jnp.ones(len(selection), bool)

    def round_with_selection(state_and_best):
        state, best = state_and_best
        state = step(state, grouped)[0]
        return state, update_best(best, state, 1, x, y, mask)

    return round_with_selection, (state, init_best(state))


def main(argv):
    del argv
    splits, original = prepare(data.credit(), FLAGS.seed, 400)
    programs = {name: build(setting, splits, original, FLAGS.seed)
                for name, setting in (("before", BEFORE), ("after", AFTER))}
    carries, seconds = {}, {name: [] for name in programs}
    for name, (round_fn, carry) in programs.items():  # warm-up: compiles
        started = time.perf_counter()
        carries[name] = jax.block_until_ready(round_fn(carry))
        print(f"[round_time] {name}: first round (compiling) {time.perf_counter() - started:.1f} s", flush=True)
    for _ in range(FLAGS.rounds):
        for name, (round_fn, _) in programs.items():
            started = time.perf_counter()
            carries[name] = jax.block_until_ready(round_fn(carries[name]))
            seconds[name].append(time.perf_counter() - started)
    medians = {name: float(np.median(values)) for name, values in seconds.items()}
    ratio = medians["after"] / medians["before"]
    payload = dict(seconds=seconds, median_seconds=medians, ratio_after_over_before=ratio, rounds=FLAGS.rounds,
                   seed=FLAGS.seed, load_average=os.getloadavg(), cpus=os.cpu_count(), platform=platform.platform(),
                   jax=jax.__version__, configurations={k: dict(hidden=v["hidden"], selection_fraction=v["selection_fraction"],
                                                               config=dataclasses.asdict(v["config"]))
                                                        for k, v in (("before", BEFORE), ("after", AFTER))})
    output = Path(FLAGS.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    common.atomic_write_text(output / "facims_round_time.json", json.dumps(payload, indent=2), overwrite=True)
    markdown = (
        "# Seconds per FACIMS credit round, before / after the held-out-selection defaults\n\n"
        "`python -m benchmarks.facims_round_time` (rounds alternate; median of "
        f"{FLAGS.rounds} steady rounds each; load average {os.getloadavg()[0]:.1f})\n\n"
        "| configuration | median s per round |\n|---|---|\n"
        f"| before (400-200-100 MLP, upper level on all validation rows) | {medians['before']:.3f} |\n"
        f"| after (32-unit MLP, defaults, 2/3 of validation + best-round update) | {medians['after']:.3f} |\n"
        f"| ratio after / before | **{ratio:.3f}** |\n"
    )
    common.atomic_write_text(output / "facims_round_time.md", markdown, overwrite=True)
    print(markdown)


if __name__ == "__main__":
    app.run(main)
