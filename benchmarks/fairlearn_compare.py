r"""FairALM (fairopt) side by side with fairlearn's exponentiated-gradient reduction.

On the same splits as :mod:`experiments.fairalm` (``fairopt.data.split(ds, seed=seed)``, then
``fairopt.data.standardize``), for each seed this trains and times:

* ``sklearn_lr`` — ``sklearn.linear_model.LogisticRegression`` (unconstrained reference);
* ``fairlearn_eg`` — ``fairlearn.reductions.ExponentiatedGradient(LogisticRegression,
  TruePositiveRateParity(), eps=--eg_eps, max_iter=--eg_max_iter)`` (Agarwal et al. 2018); its
  ``predict`` draws from the randomised classifier, seeded with ``random_state=seed``;
* ``fairopt_linear_erm`` and ``fairopt_linear_fairalm`` — the linear model (multinomial
  logistic regression) trained by fairopt's ERM and FairALM (Alg. 2, DEO constraint) with the
  same epochs/batch/optimizer for both.

Reported on the test split: accuracy, DEO ``|TPR_0 - TPR_1|`` (fairopt's
``metrics.equal_opportunity_difference``, equal to fairlearn's) and wall time in seconds
(training only; fairopt's compilation happens in an untimed warm-up epoch on the first
seed, reported separately as ``warmup_seconds``). If
``<results_dir>/fairalm_<dataset>.json`` from the experiment exists, its MLP rows for
``unconstrained`` and ``fairalm`` are listed beside (they come from the same splits).

fairlearn is a test extra (``pip install -e '.[test]'``); this file is a benchmark, not a test.

    python -m benchmarks.fairlearn_compare --dataset=adult --seeds=0,1,2

Prints a Markdown table and writes ``<output_dir>/fairlearn_compare_<dataset>.{json,csv,md}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
from absl import app, flags

from experiments import common
from fairopt import data, losses, metrics, models
from fairopt.solvers.erm import erm
from fairopt.solvers.fairalm import fairalm
from fairopt.train import fit, make_epoch_fn, predict_in_batches

DATASETS = tuple(common.FAIRNESS_LOADERS)

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "adult", DATASETS, "Dataset.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the splits (as in experiments.fairalm).")
flags.DEFINE_float("eg_eps", 0.01, "fairlearn ExponentiatedGradient constraint slack eps.", lower_bound=0.0)
flags.DEFINE_integer("eg_max_iter", 50, "fairlearn ExponentiatedGradient iterations.", lower_bound=1)
flags.DEFINE_integer("lr_max_iter", 200, "LogisticRegression lbfgs iterations.", lower_bound=1)
flags.DEFINE_float("eta", None, "FairALM eta (default: the experiment's chosen value if its JSON exists, else 0.01).",
                   lower_bound=0.0)
flags.DEFINE_integer("epochs", 4, "fairopt epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 256, "fairopt batch size.", lower_bound=1)
flags.DEFINE_integer("inner_steps", 5, "FairALM inner primal steps.", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-2, "fairopt Adam learning rate (linear model).", lower_bound=0.0)
flags.DEFINE_string("results_dir", "results", "Where experiments.fairalm wrote its results (read only).")
flags.DEFINE_string("output_dir", "results", "Folder for this benchmark's files.")
flags.DEFINE_bool("overwrite", False, "Replace existing results files.")


def scores(predictions: np.ndarray, split: data.Dataset) -> dict[str, float]:
    predictions = np.asarray(predictions).astype(np.int32)
    return dict(
        accuracy=float(np.mean(predictions == split.labels)),
        deo_gap=metrics.equal_opportunity_difference(split.labels, predictions, sensitive_features=split.groups),
    )


def run_sklearn(splits, seed):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=FLAGS.lr_max_iter)
    start = time.perf_counter()
    model.fit(splits.train.features, splits.train.labels)
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, **scores(model.predict(splits.test.features), splits.test))


def run_fairlearn(splits, seed):
    from fairlearn.reductions import ExponentiatedGradient, TruePositiveRateParity
    from sklearn.linear_model import LogisticRegression

    reduction = ExponentiatedGradient(
        LogisticRegression(max_iter=FLAGS.lr_max_iter),
        TruePositiveRateParity(),
        eps=FLAGS.eg_eps,
        max_iter=FLAGS.eg_max_iter,
    )
    start = time.perf_counter()
    reduction.fit(splits.train.features, splits.train.labels, sensitive_features=splits.train.groups)
    seconds = time.perf_counter() - start
    predictions = reduction.predict(splits.test.features, random_state=seed)
    return dict(seconds=seconds, **scores(predictions, splits.test))


def run_fairopt(method, splits, seed, eta, epoch_fns):
    train = splits.train
    params, apply_fn = models.make_model("linear", train.num_classes, train.num_features, jax.random.key(seed))
    steps_per_epoch = -(-len(train) // FLAGS.batch_size)
    # optax.adam as a factory: the learning rate (and FairALM's eta) are hyperparameters in the state.
    if method == "fairopt_linear_erm":
        solver = erm(apply_fn, losses.make_loss("ce", train.class_counts), optax.adam, learning_rate=FLAGS.learning_rate)
    else:
        solver = fairalm(
            apply_fn, optax.adam, num_groups=train.num_groups, eta=eta, inner_steps=FLAGS.inner_steps,
            steps_per_epoch=steps_per_epoch, learning_rate=FLAGS.learning_rate,
        )
    warmup_seconds = 0.0
    if method not in epoch_fns:
        # One untimed warm-up epoch compiles the epoch (reused by every later seed), so that
        # ``seconds`` is training time, like the fairlearn/sklearn timings.
        epoch_fn = make_epoch_fn(solver.step, num_rows=len(train), batch_size=FLAGS.batch_size)
        start = time.perf_counter()
        jax.block_until_ready(
            fit(solver, solver.init(None, params), train.features, train.labels, train.groups, epochs=1,
                batch_size=FLAGS.batch_size, key=jax.random.key(0), epoch_fn=epoch_fn)[0]
        )
        warmup_seconds = time.perf_counter() - start
        epoch_fns[method] = (solver, epoch_fn)
    solver, epoch_fn = epoch_fns[method]
    start = time.perf_counter()
    state, _ = fit(
        solver, solver.init(None, params), train.features, train.labels, train.groups,
        epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, key=jax.random.key(seed + 2), epoch_fn=epoch_fn,
    )
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    probs = predict_in_batches(solver.predict, state, splits.test.features)
    return dict(seconds=seconds, warmup_seconds=warmup_seconds, **scores(probs.argmax(axis=1), splits.test))


def experiment_rows(dataset: str, seeds) -> tuple[list[dict], float | None]:
    path = Path(FLAGS.results_dir) / f"fairalm_{dataset}.json"
    if not path.exists():
        return [], None
    payload = json.loads(path.read_text())
    config = payload.get("config", {})
    eta = config.get("eta_per_method", {}).get("fairalm")
    # A --grid run has a row per setting: keep the --select-ed setting of a method if there is one.
    selected = {s["method"]: s["setting"] for s in config.get("selected", [])}
    rows = []
    for run in payload.get("runs", []):
        setting = run.get("setting") or ""
        if run["method"] in selected and setting != selected[run["method"]]:
            continue
        if run["method"] in ("unconstrained", "fairalm") and run["seed"] in seeds:
            label = f" [{setting}]" if setting and run["method"] not in selected else ""
            rows.append(dict(method=f"fairopt_mlp_{run['method']}{label} (experiment)", seed=run["seed"],
                             accuracy=run["accuracy"], deo_gap=run["deo_gap"], seconds=run["seconds"]))
            if run["method"] == "fairalm" and run["method"] in selected:
                eta = run["eta"]
    return rows, eta


def main(argv):
    del argv
    seeds = common.parse_seeds(FLAGS.seeds)
    stem = f"fairlearn_compare_{FLAGS.dataset}"
    existing = [p for p in Path(FLAGS.output_dir).glob(f"{stem}*") if p.suffix in (".json", ".csv", ".md")]
    if existing and not FLAGS.overwrite:
        raise app.UsageError(f"results exist: {', '.join(map(str, existing))}; pass --overwrite or another --output_dir")
    previous, chosen_eta = experiment_rows(FLAGS.dataset, seeds)
    eta = FLAGS.eta if FLAGS.eta is not None else (chosen_eta if chosen_eta is not None else 0.01)
    rows, epoch_fns = [], {}
    for seed in seeds:
        splits = data.standardize(data.split(common.FAIRNESS_LOADERS[FLAGS.dataset](), seed=seed))
        for method, run in (
            ("sklearn_lr", lambda: run_sklearn(splits, seed)),
            ("fairlearn_eg", lambda: run_fairlearn(splits, seed)),
            ("fairopt_linear_erm", lambda: run_fairopt("fairopt_linear_erm", splits, seed, eta, epoch_fns)),
            ("fairopt_linear_fairalm", lambda: run_fairopt("fairopt_linear_fairalm", splits, seed, eta, epoch_fns)),
        ):
            row = dict(method=method, seed=seed, **run())
            rows.append(row)
            print(f"[{method} seed={seed}] accuracy={row['accuracy']:.4f} deo={row['deo_gap']:.4f} "
                  f"({row['seconds']:.1f}s)", file=sys.stderr, flush=True)
    all_rows = rows + previous
    columns = ["accuracy", "deo_gap", "seconds"]
    summary = common.summarize(all_rows, by="method", columns=columns)
    markdown = (
        f"# fairlearn ExponentiatedGradient vs fairopt FairALM on {FLAGS.dataset} "
        f"({len(seeds)} seeds: {', '.join(map(str, seeds))})\n\n"
        f"EG: LogisticRegression(max_iter={FLAGS.lr_max_iter}), TruePositiveRateParity, eps={FLAGS.eg_eps}, "
        f"max_iter={FLAGS.eg_max_iter}. fairopt linear: Adam lr {FLAGS.learning_rate:g}, {FLAGS.epochs} epochs, "
        f"batch {FLAGS.batch_size}, FairALM eta={eta:g}, inner steps {FLAGS.inner_steps}.\n\n"
        + common.markdown_table(summary, columns)
    )
    config = dict(flags={k: FLAGS[k].value for k in (
        "dataset", "seeds", "eg_eps", "eg_max_iter", "lr_max_iter", "eta", "epochs", "batch_size", "inner_steps",
        "learning_rate")}, eta_used=eta)
    targets = common.write_results(FLAGS.output_dir, stem, all_rows, summary, markdown, config=config,
                                   overwrite=FLAGS.overwrite)
    print(markdown)
    print(f"wrote {', '.join(str(p) for p in targets.values())}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
