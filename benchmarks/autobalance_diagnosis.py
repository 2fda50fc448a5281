r"""Why AutoBalance's search hurts on the tabular long-tail suites: measurements (issue 16).

On one dataset of ``experiments.autobalance`` (its data, model and protocol) and a few seeds:

1. **Hypergradient vs finite differences.** At the LA-init loss ``alpha_0`` (search space
   ``l & Delta``, LA at the dataset's tuned ``tau``), the model is trained with the frozen loss on
   the search-train split; the implicit hypergradient of the validation objective (CE_bal on the
   whole search-validation split, ``d_train`` over the whole search-train split) is compared with
   central finite differences of the same objective *after retraining* at ``alpha_0 ± eps e_i``
   (same initialisation, same batch order, so the only change is the loss):

   .. math:: \mathrm{FD}_i = \frac{F(\theta_T(\alpha_0 + \epsilon e_i)) - F(\theta_T(\alpha_0 - \epsilon e_i))}{2\epsilon}

   for every class's ``l_i`` and raw ``Delta_i`` (2K coordinates). Reported: the cosine between
   the hypergradient and FD, the fraction of coordinates with the same sign, and the norm ratio,
   for the solver's inverse (Neumann J = 5, alpha = 0.1) and for CG with 50 iterations; and the
   cosine between FD at two step sizes (how reproducible the "true" response is).
2. **Upper-level overfitting / validation size.** AutoBalance searches (``l & Delta``, LA init,
   several upper learning rates) on one half of the validation split; its search-phase model is
   scored on that half (seen by the upper level) and on the other half (held out). The gap is the
   upper level's overfitting; the held-out score against the trust-radius-0 run (the initial
   loss) says whether the search helps on data it did not fit.
3. **Retrain on the split the loss was fit on, and the retrain schedule.** The searched loss
   (whole validation split) retrained on search-train ∪ search-validation (the protocol) and on
   search-train only; and the search-phase model itself (trained while the loss moved), all on
   the test split.
4. **Warm-up.** Held-out validation and test balanced error of the search at warm-up fractions
   0.1, 0.4 (default) and 0.7.

    python -m benchmarks.autobalance_diagnosis --dataset=digits_lt --seeds=0,1,2
    python -m benchmarks.autobalance_diagnosis --dataset=synthetic_lt --seeds=0,1,2 --tau=1.5

Writes ``benchmarks/results/autobalance_diagnosis_<dataset>.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from absl import app, flags
from jax.flatten_util import ravel_pytree

from experiments import autobalance as entry
from experiments import common
from fairopt import sweep
from fairopt.solvers import autobalance as ab
from fairopt.train import Batch, make_epoch_fn, predict_in_batches

FLAGS = flags.FLAGS  # --dataset, --seeds, --epochs and --tau are experiments.autobalance's flags
flags.DEFINE_list("upper_learning_rates", ["0.01", "0.03", "0.1"], "Upper steps of parts 2-4.")
flags.DEFINE_string("diagnosis_dir", "benchmarks/results", "Folder of the JSON / Markdown output.")

FD_STEPS = (0.05, 0.2)


def _config(settings: entry.Settings, dataset: str, **changes) -> ab.AutoBalanceConfig:
    return dataclasses.replace(entry.autobalance_config(settings, dataset, {}), search_space="shift_scale", init="la",
                               **changes)


def _cosine(a, b) -> float:
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def hypergradient_vs_finite_differences(dataset: str, seed: int, settings: entry.Settings, tau: float) -> dict:
    """Part 1 on one seed (see the module docstring)."""
    prepared = entry.prepare(dataset, seed)
    model = entry._model(prepared.train, settings.hidden)
    train, val = prepared.search_train, prepared.search_val
    num_classes = train.num_classes
    config = ab.phase_config(_config(settings, dataset, tau=tau), num_rows=len(train), epochs=settings.epochs,
                             batch_size=settings.batch_size, lr_decay_fractions=settings.lr_decay_fractions)
    counts, cells = entry._split_counts(train, num_classes, train.num_groups)
    solver = ab.autobalance(model["apply"], config, class_counts=counts, cell_counts=cells, num_features=train.num_features)
    frozen = ab.retrain_solver(model["apply"], solver)
    h = config.hyperparams()
    alpha0 = solver.initial_hparams(h)
    flat0, unravel = ravel_pytree(alpha0.loss)
    # Coordinates of l (shift) and raw Delta (scale_logit) in the flattened LossHparams.
    layout = ravel_pytree(alpha0.loss._replace(
        weight=jnp.zeros_like(alpha0.loss.weight), shift=jnp.ones_like(alpha0.loss.shift),
        scale_logit=2 * jnp.ones_like(alpha0.loss.scale_logit)))[0]
    coordinates = np.flatnonzero(np.asarray(layout) > 0)
    directions = []
    for eps in FD_STEPS:
        for i in coordinates:
            for sign in (1.0, -1.0):
                directions.append(alpha0._replace(loss=unravel(flat0.at[i].add(sign * eps))))
    runs = [alpha0] + directions
    key_init, key_fit = jax.random.split(jax.random.key(seed))
    params = sweep.stack([model["init"](key_init)] * len(runs))
    states = jax.vmap(lambda p, a: frozen.init(key_init, p, h, hparams=a))(params, sweep.stack(runs))
    epoch_fn = jax.jit(jax.vmap(make_epoch_fn(frozen.step, num_rows=len(train), batch_size=settings.batch_size),
                                in_axes=(0, None, None, None, None)))
    arrays = [jnp.asarray(a) for a in (train.features, train.labels, train.groups)]
    for epoch in range(1, settings.epochs + 1):
        states, _ = epoch_fn(states, *arrays, jax.random.fold_in(key_fit, epoch))
    val_mask = jnp.ones(len(val), bool)
    objective = jax.vmap(lambda p: solver.val_objective(p, jnp.asarray(val.features), jnp.asarray(val.labels),
                                                        jnp.asarray(val.groups), val_mask, h))(states.params)
    objective = np.asarray(objective, np.float64)
    fd = {}
    per_step = 2 * len(coordinates)
    for j, eps in enumerate(FD_STEPS):
        values = objective[1 + j * per_step: 1 + (j + 1) * per_step].reshape(-1, 2)
        fd[eps] = (values[:, 0] - values[:, 1]) / (2 * eps)
    base = sweep.take(states.params, 0)
    train_rows = Batch(*arrays, jnp.ones(len(train), bool))
    val_rows = Batch(jnp.asarray(val.features), jnp.asarray(val.labels), jnp.asarray(val.groups), val_mask)
    noise = jnp.zeros_like(train_rows.x)
    out = {"seed": seed, "val_objective": float(objective[0]), "fd_step_cosine": _cosine(fd[FD_STEPS[0]], fd[FD_STEPS[1]])}
    for name, changes in (("neumann_J5_alpha0.1", {}), ("cg_50", dict(inverse="cg", cg_iters=50))):
        probe = ab.autobalance(model["apply"], dataclasses.replace(config, **changes), class_counts=counts,
                               cell_counts=cells, num_features=train.num_features)
        grads, _ = jax.jit(probe.hypergradient)(base, alpha0, train_rows, val_rows, noise, h)
        implicit = np.asarray(ravel_pytree(grads.loss)[0], np.float64)[coordinates]
        for eps in FD_STEPS:
            out[f"{name}_vs_fd{eps}_cosine"] = _cosine(implicit, fd[eps])
            out[f"{name}_vs_fd{eps}_sign_agreement"] = float(np.mean(np.sign(implicit) == np.sign(fd[eps])))
            out[f"{name}_vs_fd{eps}_norm_ratio"] = float(np.linalg.norm(implicit) / max(np.linalg.norm(fd[eps]), 1e-30))
    return out


def search_measurements(dataset: str, seeds, settings: entry.Settings, tau: float, rates) -> list[dict]:
    """Parts 2-4: one row per (warm-up, upper learning rate or trust radius 0, seed)."""
    prepared = {seed: entry.prepare(dataset, seed) for seed in seeds}
    model = entry._model(prepared[seeds[0]].train, settings.hidden)
    rows, cache = [], {}
    for warmup in (0.1, 0.4, 0.7):
        phase = dataclasses.replace(settings, warmup_fraction=warmup)
        candidates = [("trust_radius=0", _config(settings, dataset, tau=tau, trust_radius=0.0))]
        candidates += [(f"upper_lr={r:g}", _config(settings, dataset, tau=tau, upper_learning_rate=r)) for r in rates]
        runs = [(label, config, seed) for label, config in candidates for seed in seeds]
        half = {seed: entry.validation_folds(prepared[seed].search_val, seed)[0] for seed in seeds}  # (fit, held out)
        searched = {}
        for fit_on in ("half", "all"):
            parts = [prepared[seed]._replace(search_val=half[seed][0]) if fit_on == "half" else prepared[seed]
                     for _, _, seed in runs]
            search, retrained, _, solver, retrainer = entry.train_grid_chunk(
                [c for _, c, _ in runs], [s for _, _, s in runs], parts, phase, model["apply"], model["init"], cache=cache,
                retrain=fit_on == "all")
            searched[fit_on] = (search, retrained, solver, retrainer)
        only_train = [prepared[seed]._replace(train=prepared[seed].search_train) for _, _, seed in runs]
        search_states = searched["all"][0]
        retrain_on_split = entry.train_grid_chunk(
            [c for _, c, _ in runs], [s for _, _, s in runs], only_train, phase, model["apply"], model["init"],
            cache=cache)[1]
        for index, (label, _, seed) in enumerate(runs):
            fit, held = half[seed]
            state = searched["half"][0][index]
            solver, retrainer = searched["half"][2], searched["all"][3]

            def error(predict, s, split):
                return entry.evaluate(predict_in_batches(predict, s, split.features), split)["balanced_error"]

            rows.append(dict(
                dataset=dataset, warmup_fraction=warmup, setting=label, seed=seed,
                val_fit_half=error(solver.predict, state, fit), val_held_out_half=error(solver.predict, state, held),
                test_retrain_all=error(retrainer.predict, searched["all"][1][index], prepared[seed].test),
                test_retrain_search_train_only=error(retrainer.predict, retrain_on_split[index], prepared[seed].test),
                test_search_model=error(solver.predict, search_states[index], prepared[seed].test),
            ))
    return rows


def main(argv):
    del argv
    if FLAGS.dataset not in ("digits_lt", "synthetic_lt"):
        raise app.UsageError(f"--dataset must be a long-tail dataset (digits_lt, synthetic_lt), got {FLAGS.dataset}")
    seeds = list(common.parse_seeds(FLAGS.seeds))
    rates = [float(r) for r in FLAGS.upper_learning_rates]
    settings = entry.dataset_settings(FLAGS.dataset, **({"epochs": FLAGS.epochs} if FLAGS.epochs else {}))
    begin = time.perf_counter()
    fd_rows = [hypergradient_vs_finite_differences(FLAGS.dataset, seed, settings, FLAGS.tau) for seed in seeds]
    search_rows = search_measurements(FLAGS.dataset, seeds, settings, FLAGS.tau, rates)
    seconds = time.perf_counter() - begin
    fd_frame, search_frame = pd.DataFrame(fd_rows), pd.DataFrame(search_rows)
    lines = [f"# AutoBalance diagnosis on {FLAGS.dataset} (seeds {', '.join(map(str, seeds))}; tau {FLAGS.tau:g}; "
             f"{seconds:.0f} s)\n", "## Hypergradient vs finite differences (mean ± std over seeds)\n",
             "| quantity | value |", "|---|---|"]
    for column in fd_frame.columns:
        if column != "seed":
            lines.append(f"| {column} | {fd_frame[column].mean():.3f} ± {fd_frame[column].std(ddof=0):.3f} |")
    lines += ["\n## Search: upper-level overfitting, retrain, warm-up (balanced error %, mean ± std over seeds)\n"]
    value_columns = ["val_fit_half", "val_held_out_half", "test_retrain_all", "test_retrain_search_train_only",
                     "test_search_model"]
    lines += ["| warm-up | setting | " + " | ".join(value_columns) + " |", "|---|---|" + "---|" * len(value_columns)]
    for (warmup, setting), part in search_frame.groupby(["warmup_fraction", "setting"], sort=False):
        cells = [f"{part[c].mean():.2f} ± {part[c].std(ddof=0):.2f}" for c in value_columns]
        lines.append(f"| {warmup:g} | {setting} | " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    out = Path(FLAGS.diagnosis_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"autobalance_diagnosis_{FLAGS.dataset}"
    common.atomic_write_text(stem.with_suffix(".json"), json.dumps(dict(fd=fd_rows, search=search_rows, seconds=seconds),
                                                                   indent=1), overwrite=True)
    common.atomic_write_text(stem.with_suffix(".md"), markdown, overwrite=True)
    print(markdown)
    print(f"wrote {stem}.json, {stem}.md", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
