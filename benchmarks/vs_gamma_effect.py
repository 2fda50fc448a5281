r"""Does the VS loss's gamma reach the model on the group suites? (issue 16, third pass)

In the group suite's validation grids, VS at gamma 0.1, 0.2 and 0.3 (same tau) often had the
*same* validation worst-group error to the last digit. This measures, on the suite's own
protocol (``experiments.autobalance``: data, model, the pooled selection folds, the VS grid
``VS_GRID`` trained as one vmapped program by ``fit_runs``), what gamma changes:

* the loss numbers each run trains with (``Delta_k = (n_k / n_max)^gamma`` of the class counts),
* the trained models (relative distance of the final parameters between gamma 0.1 and 0.3),
* the held-out predictions: the fraction of rows whose predicted class changes, overall and in
  every (class, group) cell, next to the same fraction for a change of tau,
* the validation scores of the grid (worst-group, balanced, group-balanced error).

VS (Kini et al.) is a class-imbalance loss: ``-log softmax(Delta ⊙ f + tau log pi)_y`` with
per-*class* ``Delta``; with K = 2 classes only ``Delta_1 / Delta_0`` matters, and a per-class
scale of a linear output layer is a reparameterisation of that layer (it changes only the
effective step size and weight decay of one output row), so gamma moves few predictions.

    python -m benchmarks.vs_gamma_effect --seeds=0,1,2,3,4

Writes ``benchmarks/results/vs_gamma_effect.{json,md}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from absl import app, flags

from experiments import autobalance as entry
from experiments import common
from fairopt import sweep
from fairopt.train import predict_in_batches

FLAGS = flags.FLAGS  # --seeds is experiments.autobalance's flag
flags.DEFINE_list("vs_datasets", ["waterbirds_like", "celeba_blond"], "Group datasets to measure.")
flags.DEFINE_string("results_dir", "benchmarks/results", "Folder of the JSON / Markdown output.")


def measure(dataset: str, seeds: list[int]) -> dict:
    """The VS grid of the group suite on ``dataset``: every (gamma, tau, seed, fold) run's
    held-out predictions and the differences between gammas (see the module docstring)."""
    settings = entry.dataset_settings(dataset)
    prepared = {seed: entry.prepare(dataset, seed) for seed in seeds}
    model = entry._model(prepared[seeds[0]].train, settings.hidden)
    config = entry.autobalance_config(settings, dataset, {})
    folds = entry.SELECTION_FOLDS["groups"]
    splits = {seed: entry.selection_splits(prepared[seed], seed, folds) for seed in seeds}
    spec = next(t for t in entry.TUNED_ROWS["groups"] if t.method == "vs")
    points = sweep.product(spec.grid)
    runs = [(point, seed, j) for point in points for seed in seeds for j in range(folds)]
    builds = [entry.tuned_baseline(spec, model["apply"], splits[seed][j][0], config, settings, point)
              for point, seed, j in runs]
    begin = time.perf_counter()
    states = entry.fit_runs(builds[0][0], [h for _, h in builds], [seed for _, seed, _ in runs],
                            [splits[seed][j][0] for _, seed, j in runs], settings, model["init"], {}, "vs_gamma")
    seconds = time.perf_counter() - begin
    solver = builds[0][0]
    predicted, scale, flat = {}, {}, {}
    for (point, seed, j), (_, hyper), state in zip(runs, builds, states):
        key = (point["gamma"], point["tau"], seed, j)
        probs = predict_in_batches(solver.predict, state, splits[seed][j][1].features)
        predicted[key] = np.argmax(probs, axis=1)
        scale[key] = np.asarray(hyper.loss_params.scale)
        flat[key] = np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(state.params)])
    gammas, taus = spec.grid["gamma"], spec.grid["tau"]
    validation = []
    for point in points:
        for seed in seeds:
            held = [splits[seed][j][1] for j in range(folds)]
            probs = [np.eye(2)[predicted[(point["gamma"], point["tau"], seed, j)]] for j in range(folds)]
            scores = entry.pooled_scores(probs, held)
            validation.append(dict(gamma=point["gamma"], tau=point["tau"], seed=seed,
                                   **{k: scores[k] for k in ("worst_group_error", "balanced_error", "group_balanced_error")}))

    def changed(first: tuple, second: tuple) -> dict:
        """Fraction (%) of held-out rows whose prediction differs between two (gamma, tau) points,
        overall and per (class, group) cell, pooled over seeds and folds; relative parameter distance."""
        total, rows, cells, distance = 0, 0, {}, []
        for seed in seeds:
            for j in range(folds):
                held = splits[seed][j][1]
                a, b = predicted[first + (seed, j)], predicted[second + (seed, j)]
                total += int((a != b).sum())
                rows += len(a)
                for k in range(2):
                    for g in range(held.num_groups):
                        mask = (held.labels == k) & (held.groups == g)
                        n, d = cells.get(f"{k},{g}", (0, 0))
                        cells[f"{k},{g}"] = (n + int(mask.sum()), d + int((a[mask] != b[mask]).sum()))
                p, q = flat[first + (seed, j)], flat[second + (seed, j)]
                distance.append(float(np.linalg.norm(p - q) / np.linalg.norm(p)))
        return dict(rows_changed=100 * total / rows, cells={c: dict(rows=n, changed=d) for c, (n, d) in cells.items()},
                    relative_parameter_distance=float(np.mean(distance)))

    return dict(
        dataset=dataset, seeds=seeds, folds=folds, seconds=seconds,
        class_counts=prepared[seeds[0]].train.class_counts.tolist(),
        scale={f"gamma={g}": scale[(g, taus[0], seeds[0], 0)].tolist() for g in gammas},
        gamma_change={f"tau={t}": changed((gammas[0], t), (gammas[-1], t)) for t in taus},
        tau_change={f"gamma={g}": changed((g, taus[0]), (g, taus[-1])) for g in gammas},
        validation_rows=validation,
    )


def markdown(result: dict) -> str:
    gammas = sorted({r["gamma"] for r in result["validation_rows"]})
    lines = [f"## {result['dataset']} ({len(result['seeds'])} seeds, {result['folds']} pooled folds; "
             f"class counts {result['class_counts']})", "",
             "Delta per class: " + ", ".join(f"{k}: {np.round(v, 3).tolist()}" for k, v in result["scale"].items()), "",
             f"| change | rows whose prediction changes (%) | per cell: changed / rows | relative parameter distance |",
             "|---|---|---|---|"]
    for kind, label in (("gamma_change", f"gamma {gammas[0]} → {gammas[-1]} at"), ("tau_change", "tau 0.5 → 1.5 at")):
        for at, entry_ in result[kind].items():
            cells = ", ".join(f"({c}) {v['changed']}/{v['rows']}" for c, v in entry_["cells"].items())
            lines.append(f"| {label} {at} | {entry_['rows_changed']:.2f} | {cells} | {entry_['relative_parameter_distance']:.3f} |")
    frame = pd.DataFrame(result["validation_rows"])
    lines += ["", "| gamma | tau | val worst-group error | val balanced error | val group-balanced error |", "|---|---|---|---|---|"]
    for (gamma, tau), part in frame.groupby(["gamma", "tau"]):
        cells = " | ".join(f"{part[c].mean():.2f} ± {part[c].std(ddof=0):.2f}"
                           for c in ("worst_group_error", "balanced_error", "group_balanced_error"))
        lines.append(f"| {gamma} | {tau} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    seeds = common.parse_seeds(FLAGS.seeds)
    results = []
    for dataset in FLAGS.vs_datasets:
        begin = time.perf_counter()
        results.append(measure(dataset, seeds))
        print(f"[{dataset}] {time.perf_counter() - begin:.0f}s", file=sys.stderr, flush=True)
    text = "# VS gamma on the group suites (benchmarks/vs_gamma_effect.py)\n\n" + "\n".join(markdown(r) for r in results)
    out = Path(FLAGS.results_dir)
    common.atomic_write_text(out / "vs_gamma_effect.json", json.dumps(results, indent=1, default=float), overwrite=True)
    common.atomic_write_text(out / "vs_gamma_effect.md", text, overwrite=True)
    print(text)


if __name__ == "__main__":
    app.run(main)
