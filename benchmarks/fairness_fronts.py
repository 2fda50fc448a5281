r"""Accuracy–fairness fronts: fairopt's constrained training against fairlearn, same splits.

For one dataset and one constraint (``dp``: demographic parity, ``deo``: equal opportunity,
``eo``: equalised odds), on the splits of :mod:`experiments.fairalm` (``fairopt.data.split``
per seed, features standardised on the training split), every method trains a **linear**
model (multinomial logistic regression; fairlearn's base learner is scikit-learn's
``LogisticRegression``) and is scored on the validation and test splits by accuracy and the
constraint's gap (``fairopt.metrics.demographic_parity_difference`` / ``equal_opportunity_
difference`` / ``equalized_odds_difference``: the max–min over groups, as fairlearn's).

**fairopt** (``fairopt_*``): full-batch training (:func:`fairopt.train.full_batch_steps`,
Adam, ``--steps`` primal steps for every method) of

* ``fairalm`` — FairALM with the quadratic augmentation (the textbook augmented Lagrangian,
  :func:`fairopt.solvers.fairalm.quadratic_augmentation`), grid ``eta x tolerance``. As in the
  method of multipliers, each dual step follows ``--inner_steps`` primal steps (default 10, so
  30 dual steps in 300 primal ones): the primal subproblem is nearly solved before the
  multipliers move, and the solution hardly depends on ``eta``. With one primal step per dual
  step (plain descent–ascent) the iterates oscillate at ``eta >= 10``: on Adult (sex, ``dp``,
  seed 0, validation) accuracy fell to .65–.81 at eta 10–100, against .81–.83 with 10 inner
  steps at every eta;
* ``lagrangian`` — gradient descent–ascent on ``CE + lambda d``, grid ``eta x tolerance``;
* ``penalty`` — ``CE + (eta/2) max(|d| - tol, 0)^2``, grid ``eta x tolerance``;
* ``reweighting`` — cross-entropy with cell weights ``w_{y,g}^alpha`` (``dp``: Kamiran–Calders
  reweighing ``n_y n_g / (n n_{y,g})``; ``deo``/``eo``: ``1 / n_{y,g}``), grid ``alpha``;

with the bounded ``--surrogate`` of the group rates. Each method's whole grid is **one compiled
program** (the hyperparameters are data: ``jax.vmap`` over the stacked settings). A front point
is one grid setting, chosen on **validation**: for each tolerance ``tau`` of ``--val_gaps``, the
setting with the best mean validation accuracy among those whose mean validation gap is at most
``tau`` (means over seeds); its test numbers are reported whatever they are.

**fairlearn** (``fairlearn_*``): ``ExponentiatedGradient`` at every ``--eg_eps``,
``GridSearch`` at every ``--gs_grid_sizes`` and ``ThresholdOptimizer`` (accuracy objective),
each around ``LogisticRegression(max_iter=--lr_max_iter)``; randomised predictions are drawn
with ``random_state=seed``.

**Seconds per point** (training only, measured in this run): a fairlearn point's ``fit`` time;
a fairopt point's share of its method's grid program, ``seconds(grid) / settings`` (compilation
is measured apart, ``compile_seconds``, once per method and shape, and excluded like
scikit-learn's import time).

**Hypervolume** of each front (mean test points): the area dominated by the front and bounded
by the reference point (accuracy of the majority class, gap of the unconstrained
``LogisticRegression``), in accuracy x gap units; also per seed, with the paired difference
of each fairopt front against ``fairlearn_eg``.

    python -m benchmarks.fairness_fronts --dataset=adult --constraint=dp --seeds=0,1,2

Writes ``<output_dir>/fairness_fronts_<dataset>_<constraint>.{json,csv,md,png}`` (and
``_summary.csv``); the JSON's ``summary`` lists the points ``{method, point, accuracy_mean,
accuracy_std, gap_mean, gap_std, seconds_mean}``.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from absl import app, flags

from experiments import common
from fairopt import data, losses, metrics, models, sweep
from fairopt.solvers import constrained
from fairopt.solvers.erm import ERMHyperparams, erm
from fairopt.solvers.fairalm import fairalm
from fairopt.train import full_batch_steps

DATASETS = {  # the >2-group ones: Adult's 5 races (two with ~25 positive training rows), CelebA's Male x Young cells
    **common.FAIRNESS_LOADERS,
    "adult_race": lambda: data.adult(group="race"),
    "celeba_male_young": lambda: data.celeba_attributes(target="Attractive", group=("Male", "Young")),
}
CONSTRAINTS = ("dp", "deo", "eo")
FAIROPT_METHODS = ("fairalm", "lagrangian", "penalty", "reweighting")
FAIRLEARN_METHODS = ("eg", "gridsearch", "threshold")
GAPS = {  # the evaluated gap of each constraint (max - min over groups, as fairlearn's)
    "dp": metrics.demographic_parity_difference,
    "deo": metrics.equal_opportunity_difference,
    "eo": metrics.equalized_odds_difference,
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "adult", tuple(DATASETS), "Dataset (adult_race: Adult with the 5 race groups; celeba_male_young: "
                  "CelebA Attractive with the 4 Male x Young groups).")
flags.DEFINE_enum("constraint", "dp", CONSTRAINTS, "Fairness constraint.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the splits, initialisations and randomised predictions.")
flags.DEFINE_list("methods", [f"fairopt_{m}" for m in FAIROPT_METHODS] + [f"fairlearn_{m}" for m in FAIRLEARN_METHODS],
                  "Fronts to compute.")
flags.DEFINE_integer("steps", 300, "fairopt full-batch primal (optimiser) steps of every method; FairALM and the "
                     "Lagrangian take a dual step after every --inner_steps of them.", lower_bound=1)
flags.DEFINE_float("learning_rate", 0.05, "fairopt Adam learning rate.", lower_bound=0.0)
flags.DEFINE_integer("inner_steps", 10, "FairALM / Lagrangian primal steps per dual step (1 is plain descent-ascent, "
                     "which oscillates and loses accuracy at eta >= 10; see the module docstring).", lower_bound=1)
flags.DEFINE_list("surrogates", ["probability", "ramp"], "Bounded surrogates of the group rates (a static grid "
                  "axis of fairalm / lagrangian / penalty: one compiled program each).")
flags.DEFINE_list("etas", ["1", "10", "100"], "eta grid of fairalm / lagrangian / penalty.")
flags.DEFINE_list("tolerances", ["0", "0.01", "0.02", "0.025", "0.03", "0.035", "0.04", "0.05", "0.07", "0.1"],
                  "Constraint tolerance grid of fairalm / lagrangian / penalty.")
flags.DEFINE_list("alphas", ["0", "0.25", "0.5", "0.75", "1", "1.5", "2", "3", "4"], "Re-weighting power grid.")
flags.DEFINE_list("val_gaps", ["0.005", "0.01", "0.0125", "0.015", "0.0175", "0.02", "0.025", "0.03", "0.04", "0.05",
                                "0.07", "0.1", "0.15", "0.2"],
                  "Tolerances on the mean validation gap that pick the fairopt points.")
flags.DEFINE_list("eg_eps", ["0.005", "0.01", "0.02", "0.05"], "ExponentiatedGradient eps values.")
flags.DEFINE_integer("eg_max_iter", 50, "ExponentiatedGradient max_iter (fairlearn's default).", lower_bound=1)
flags.DEFINE_list("gs_grid_sizes", ["5", "10"], "GridSearch grid sizes.")
flags.DEFINE_integer("lr_max_iter", 1000, "LogisticRegression max_iter.", lower_bound=1)
flags.DEFINE_list("merge", [], "Instead of training: merge the JSON files of runs of the same flags on other seeds "
                  "(e.g. one process per seed on a busy machine) and write the fronts of all their seeds.")
flags.DEFINE_string("output_dir", "results", "Folder for the results files.")
flags.DEFINE_bool("overwrite", False, "Replace existing results files.")


# ---- fronts ----------------------------------------------------------------------------------


def select_points(rows: list[dict], val_gaps) -> list[tuple[float, str]]:
    """``[(tau, setting)]``: per validation tolerance ``tau``, the setting of best mean validation
    accuracy among those with mean validation gap ``<= tau`` (each setting listed once)."""
    frame = pd.DataFrame(rows).groupby("setting", sort=False)[["val_accuracy", "val_gap"]].mean()
    chosen, seen = [], set()
    for tau in sorted(val_gaps):
        admissible = frame[frame["val_gap"] <= tau]
        if admissible.empty:
            continue
        setting = admissible["val_accuracy"].idxmax()
        if setting not in seen:
            seen.add(setting)
            chosen.append((tau, setting))
    return chosen


def dominated_check(ours: pd.DataFrame, theirs: pd.DataFrame) -> list[dict]:
    """For each point of ``theirs``: a point of ``ours`` at least as accurate and at most as
    unfair, within one seed-std of their point (``acc >= acc' - std``, ``gap <= gap' + std``)."""
    result = []
    for _, point in theirs.iterrows():
        matches = ours[(ours["accuracy_mean"] >= point["accuracy_mean"] - point["accuracy_std"])
                       & (ours["gap_mean"] <= point["gap_mean"] + point["gap_std"])]
        result.append(dict(point=point["point"], accuracy=point["accuracy_mean"], gap=point["gap_mean"],
                           matched_by=(f"{matches.iloc[0]['method']} {matches.iloc[0]['point']}" if len(matches) else "")))
    return result


# ---- data and scoring ------------------------------------------------------------------------


def load_splits(seed: int) -> data.Splits:
    return data.standardize(data.split(DATASETS[FLAGS.dataset](), seed=seed))


def score(predictions, split: data.Dataset, prefix: str = "") -> dict[str, float]:
    predictions = np.asarray(predictions).astype(np.int32)
    gap = GAPS[FLAGS.constraint](split.labels, predictions, sensitive_features=split.groups)
    return {f"{prefix}accuracy": float(np.mean(predictions == split.labels)), f"{prefix}gap": float(gap)}


# ---- fairopt: one compiled program per method over its whole grid ----------------------------


def fairopt_grid(method: str) -> list[dict]:
    numbers = lambda name: [float(v) for v in FLAGS[name].value]  # noqa: E731
    if method == "reweighting":
        return sweep.product({"alpha": numbers("alphas")})
    return sweep.product({"surrogate": list(FLAGS.surrogates), "eta": numbers("etas"), "tolerance": numbers("tolerances")})


def fairopt_solver(method: str, apply_fn, num_groups: int, surrogate: str | None = None):
    shared = dict(constraints=FLAGS.constraint, num_groups=num_groups, surrogate=surrogate or "probability")
    if method == "fairalm":
        return fairalm(apply_fn, optax.adam, inner_steps=FLAGS.inner_steps, eta_growth=1.0, augmentation="quadratic",
                       **shared)
    if method == "lagrangian":
        return constrained.lagrangian(apply_fn, optax.adam, inner_steps=FLAGS.inner_steps, **shared)
    if method == "penalty":
        return constrained.penalty(apply_fn, optax.adam, **shared)
    return erm(apply_fn, lambda logits, labels, groups, epoch: losses.cross_entropy(logits, labels), optax.adam)


def solver_steps(method: str) -> int:
    """Calls of ``solver.step``: ``--steps`` primal steps for every method, so FairALM and the
    Lagrangian (``--inner_steps`` primal steps per call, then one dual step) get ``steps // inner_steps``."""
    return FLAGS.steps // FLAGS.inner_steps if method in ("fairalm", "lagrangian") else FLAGS.steps


def fairopt_hyperparams(method: str, setting: dict, train: data.Dataset):
    if method == "reweighting":
        base = (losses.reweighing_weights if FLAGS.constraint == "dp" else losses.cell_balanced_weights)(train.cell_counts)
        return ERMHyperparams(jnp.float32(FLAGS.learning_rate), jnp.asarray(base, jnp.float32) ** setting["alpha"])
    return constrained.constrained_hyperparams(FLAGS.learning_rate, setting["eta"], 1.0, setting["tolerance"])


COMPILED: dict = {}


def run_fairopt(method: str, splits: data.Splits, seed: int) -> tuple[list[dict], float, float]:
    """Every setting of ``method``'s grid on one seed: ``(rows, grid seconds, compile seconds)``.

    One compiled program per static setting (the surrogate); inside it, ``jax.vmap`` over the
    stacked numeric settings.
    """
    train = splits.train
    settings = fairopt_grid(method)
    params, apply_fn = models.make_model("linear", train.num_classes, train.num_features, jax.random.key(seed))
    x, y, g = (jnp.asarray(a) for a in (train.features, train.labels, train.groups))
    predict = jax.jit(jax.vmap(lambda p, features: jnp.argmax(apply_fn(p, features), axis=-1), in_axes=(0, None)))
    rows, seconds, compile_seconds = [None] * len(settings), 0.0, 0.0
    for surrogate in dict.fromkeys(s.get("surrogate") for s in settings):
        members = [i for i, s in enumerate(settings) if s.get("surrogate") == surrogate]
        solver = fairopt_solver(method, apply_fn, train.num_groups, surrogate)
        if solver.check_data is not None:
            solver.check_data(train.features, train.labels, train.groups)
        hyperparams = sweep.stack([fairopt_hyperparams(method, settings[i], train) for i in members])
        states = jax.vmap(lambda h: solver.init(None, params, h))(hyperparams)

        def train_grid(states, x, y, g, solver=solver):
            run = lambda state: full_batch_steps(solver.step, state, x, y, g, num_steps=solver_steps(method))[0]  # noqa: E731
            return jax.vmap(run)(states).params

        key = (method, surrogate, x.shape, len(members))
        if key not in COMPILED:
            start = time.perf_counter()
            COMPILED[key] = jax.jit(train_grid).lower(states, x, y, g).compile()
            compile_seconds += time.perf_counter() - start
        start = time.perf_counter()
        trained = jax.block_until_ready(COMPILED[key](states, x, y, g))
        seconds += time.perf_counter() - start
        val = np.asarray(predict(trained, jnp.asarray(splits.val.features)))
        test = np.asarray(predict(trained, jnp.asarray(splits.test.features)))
        for position, index in enumerate(members):
            rows[index] = dict(method=f"fairopt_{method}", seed=seed, setting=common.setting_label(settings[index]),
                               **score(val[position], splits.val, "val_"), **score(test[position], splits.test))
    for row in rows:
        row["seconds"] = seconds / len(settings)
    return rows, seconds, compile_seconds


def run_fairopt_unconstrained(splits: data.Splits, seed: int) -> dict:
    """The reference: fairopt's full-batch ERM (the ``alpha = 0`` program of re-weighting)."""
    train = splits.train
    params, apply_fn = models.make_model("linear", train.num_classes, train.num_features, jax.random.key(seed))
    solver = fairopt_solver("reweighting", apply_fn, train.num_groups)
    state = solver.init(None, params, ERMHyperparams(jnp.float32(FLAGS.learning_rate), jnp.float32(1.0)))
    run = jax.jit(lambda state, x, y, g: full_batch_steps(solver.step, state, x, y, g, num_steps=FLAGS.steps)[0])
    args = [jnp.asarray(a) for a in (train.features, train.labels, train.groups)]
    compiled = run.lower(state, *args).compile()
    start = time.perf_counter()
    state = jax.block_until_ready(compiled(state, *args))
    seconds = time.perf_counter() - start
    predict = lambda split: np.asarray(jnp.argmax(apply_fn(state.params, jnp.asarray(split.features)), -1))  # noqa: E731
    return dict(method="reference_fairopt_erm", seed=seed, setting="", seconds=seconds,
                **score(predict(splits.val), splits.val, "val_"), **score(predict(splits.test), splits.test))


# ---- fairlearn -------------------------------------------------------------------------------


def fairlearn_moment():
    from fairlearn.reductions import DemographicParity, EqualizedOdds, TruePositiveRateParity

    return {"dp": DemographicParity, "deo": TruePositiveRateParity, "eo": EqualizedOdds}[FLAGS.constraint]()


def logistic_regression():
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=FLAGS.lr_max_iter)


def fairlearn_settings(method: str) -> list[tuple[str, object]]:
    """``[(label, unfitted estimator)]`` of one fairlearn front."""
    from fairlearn.postprocessing import ThresholdOptimizer
    from fairlearn.reductions import ExponentiatedGradient, GridSearch

    if method == "eg":
        return [(f"eps={e}", ExponentiatedGradient(logistic_regression(), fairlearn_moment(), eps=float(e),
                                                   max_iter=FLAGS.eg_max_iter)) for e in FLAGS.eg_eps]
    if method == "gridsearch":
        return [(f"grid_size={k}", GridSearch(logistic_regression(), fairlearn_moment(), grid_size=int(k)))
                for k in FLAGS.gs_grid_sizes]
    constraint = {"dp": "demographic_parity", "deo": "true_positive_rate_parity", "eo": "equalized_odds"}[FLAGS.constraint]
    return [("accuracy", ThresholdOptimizer(estimator=logistic_regression(), constraints=constraint,
                                            objective="accuracy_score", predict_method="predict_proba"))]


def run_fairlearn(method: str, splits: data.Splits, seed: int) -> list[dict]:
    rows = []
    # float64 features: fairlearn 0.15's ThresholdOptimizer writes float64 into a float32 pandas Series otherwise.
    features = {name: np.asarray(getattr(splits, name).features, np.float64) for name in ("train", "val", "test")}
    for label, estimator in fairlearn_settings(method):
        train = splits.train
        start = time.perf_counter()
        estimator.fit(features["train"], train.labels, sensitive_features=train.groups)
        seconds = time.perf_counter() - start

        def predict(split):
            x = features["val" if split is splits.val else "test"]
            if method == "gridsearch":
                return estimator.predict(x)
            if method == "threshold":
                return estimator.predict(x, sensitive_features=split.groups, random_state=seed)
            return estimator.predict(x, random_state=seed)

        rows.append(dict(method=f"fairlearn_{method}", seed=seed, setting=label, seconds=seconds,
                         **score(predict(splits.val), splits.val, "val_"), **score(predict(splits.test), splits.test)))
    return rows


def run_reference_lr(splits: data.Splits, seed: int) -> dict:
    model = logistic_regression()
    start = time.perf_counter()
    model.fit(splits.train.features, splits.train.labels)
    seconds = time.perf_counter() - start
    majority = float(np.max(np.bincount(splits.test.labels)) / len(splits.test))
    val_majority = float(np.max(np.bincount(splits.val.labels)) / len(splits.val))
    return dict(method="reference_sklearn_lr", seed=seed, setting="", seconds=seconds, majority_accuracy=majority,
                val_majority_accuracy=val_majority,
                **score(model.predict(splits.val.features), splits.val, "val_"),
                **score(model.predict(splits.test.features), splits.test))


# ---- the run ---------------------------------------------------------------------------------


def front_points(rows: list[dict], methods, seeds) -> tuple[list[dict], dict[str, list[str]]]:
    """The summary points and, per method, the settings on its front."""
    points, chosen = [], {}
    val_gaps = [float(v) for v in FLAGS.val_gaps]
    for method in methods:
        method_rows = [r for r in rows if r["method"] == method]
        if method.startswith("fairopt_"):
            picks = select_points(method_rows, val_gaps)
            labels = {setting: f"val gap <= {tau:g}: {setting}" for tau, setting in picks}
        else:
            labels = {r["setting"]: r["setting"] for r in method_rows if r["seed"] == seeds[0]}
        chosen[method] = list(labels)
        for setting, label in labels.items():
            part = pd.DataFrame([r for r in method_rows if r["setting"] == setting])
            points.append(dict(method=method, point=label, setting=setting,
                               accuracy_mean=part["accuracy"].mean(), accuracy_std=part["accuracy"].std(ddof=0),
                               gap_mean=part["gap"].mean(), gap_std=part["gap"].std(ddof=0),
                               seconds_mean=part["seconds"].mean(),
                               val_accuracy_mean=part["val_accuracy"].mean(), val_gap_mean=part["val_gap"].mean()))
    return points, chosen


def hypervolumes(points, rows, chosen, reference_by_seed, val_reference, seeds) -> list[dict]:
    """Per method: hypervolume of the mean front (test; and validation, which may choose static
    settings), per-seed test hypervolumes and the paired difference against ``fairlearn_eg``."""
    frame = pd.DataFrame(points)
    mean_reference = (np.mean([reference_by_seed[s][0] for s in seeds]), np.mean([reference_by_seed[s][1] for s in seeds]))
    per_seed = {}
    for method, settings in chosen.items():
        per_seed[method] = np.asarray([
            metrics.front_hypervolume([r["accuracy"] for r in rows if r["method"] == method and r["seed"] == s and r["setting"] in settings],
                        [r["gap"] for r in rows if r["method"] == method and r["seed"] == s and r["setting"] in settings],
                        reference_by_seed[s])
            for s in seeds])
    table = []
    for method in chosen:
        part = frame[frame["method"] == method]
        entry = dict(method=method, hypervolume=metrics.front_hypervolume(part["accuracy_mean"], part["gap_mean"], mean_reference),
                     val_hypervolume=metrics.front_hypervolume(part["val_accuracy_mean"], part["val_gap_mean"], val_reference),
                     hypervolume_seed_mean=float(per_seed[method].mean()), hypervolume_seed_std=float(per_seed[method].std()))
        if "fairlearn_eg" in per_seed and method != "fairlearn_eg":
            difference = per_seed[method] - per_seed["fairlearn_eg"]
            entry.update(paired_difference_vs_eg_mean=float(difference.mean()),
                         paired_difference_vs_eg_std=float(difference.std()))
        table.append(entry)
    return table


def plot(points, references, reference_point, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 5.0))
    frame = pd.DataFrame(points)
    for method, part in frame.groupby("method", sort=False):
        part = part.sort_values("gap_mean")
        style = "-o" if method.startswith("fairopt_") else "--s"
        axis.errorbar(part["gap_mean"], part["accuracy_mean"], xerr=part["gap_std"], yerr=part["accuracy_std"],
                      fmt=style, capsize=2, markersize=4, label=method)
    for name, (accuracy, gap) in references.items():
        axis.plot([gap], [accuracy], "k*" if "sklearn" in name else "kx", markersize=9, label=name)
    axis.axvline(reference_point[1], color="grey", lw=0.5)
    axis.set_xlabel(f"test {FLAGS.constraint} gap (max - min over groups)")
    axis.set_ylabel("test accuracy")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=150)
    plt.close(figure)
    return buffer.getvalue()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    seeds = common.parse_seeds(FLAGS.seeds)
    known = [f"fairopt_{m}" for m in FAIROPT_METHODS] + [f"fairlearn_{m}" for m in FAIRLEARN_METHODS]
    methods = common.parse_choices("methods", FLAGS.methods, known)
    if FLAGS.inner_steps > FLAGS.steps:
        raise app.UsageError(f"--inner_steps={FLAGS.inner_steps} exceeds --steps={FLAGS.steps} (the primal-step budget of "
                             "every method); lower --inner_steps or raise --steps")
    stem = f"fairness_fronts_{FLAGS.dataset}_{FLAGS.constraint}"
    common.check_results_writable(FLAGS.output_dir, stem, overwrite=FLAGS.overwrite)
    common.enable_compilation_cache()
    rows, references, grid_seconds, compile_seconds = [], [], {}, {}
    for path in FLAGS.merge:  # finished runs on other seeds: their rows, references and timings
        config, runs = (lambda payload: (payload["config"], payload["runs"]))(json.loads(Path(path).read_text()))
        for name in ("dataset", "constraint", "methods", "steps", "inner_steps", "surrogates", "etas", "tolerances", "alphas", "eg_eps",
                     "gs_grid_sizes"):
            if config["flags"][name] != FLAGS[name].value:
                raise app.UsageError(f"--merge {path}: --{name}={config['flags'][name]} differs from this run's {FLAGS[name].value}")
        rows += runs
        references += config["references"]
        for method, values in config["fairopt_grid_seconds"].items():
            grid_seconds.setdefault(method, []).extend(values)
            compile_seconds[method] = compile_seconds.get(method, 0.0) + config["fairopt_compile_seconds"][method]
    if FLAGS.merge:
        seeds = tuple(sorted({r["seed"] for r in rows}))
    for seed in seeds if not FLAGS.merge else ():
        splits = load_splits(seed)
        references.append(run_reference_lr(splits, seed))
        references.append(run_fairopt_unconstrained(splits, seed))
        for method in methods:
            name = method.split("_", 1)[1]
            if method.startswith("fairopt_"):
                method_rows, seconds, compiling = run_fairopt(name, splits, seed)
                grid_seconds.setdefault(method, []).append(seconds)
                compile_seconds[method] = compile_seconds.get(method, 0.0) + compiling
            else:
                method_rows = run_fairlearn(name, splits, seed)
            rows.extend(method_rows)
            print(f"[{method} seed={seed}] {len(method_rows)} settings, "
                  f"{sum(r['seconds'] for r in method_rows):.1f} s", file=sys.stderr, flush=True)
    reference_by_seed = {r["seed"]: (r["majority_accuracy"], r["gap"]) for r in references
                         if r["method"] == "reference_sklearn_lr"}
    points, chosen = front_points(rows, methods, seeds)
    reference_frame = pd.DataFrame(references)
    lr_frame = reference_frame[reference_frame["method"] == "reference_sklearn_lr"]
    val_reference = (float(lr_frame["val_majority_accuracy"].mean()), float(lr_frame["val_gap"].mean()))
    hv = hypervolumes(points, rows, chosen, reference_by_seed, val_reference, seeds)
    def std(values):  # ddof=0, like numpy and experiments.common.summarize
        return float(np.std(values))

    reference_means = reference_frame.groupby("method", sort=False)[["accuracy", "gap", "seconds"]].agg(["mean", std])
    reference_point = (float(reference_frame["majority_accuracy"].mean()),
                       float(reference_frame[reference_frame["method"] == "reference_sklearn_lr"]["gap"].mean()))

    frame = pd.DataFrame(points)
    fairopt_points = frame[frame["method"].str.startswith("fairopt_")]
    eg_points = frame[frame["method"] == "fairlearn_eg"]
    dominance = dominated_check(fairopt_points, eg_points) if len(eg_points) else []
    eg_seconds = float(eg_points["seconds_mean"].mean()) if len(eg_points) else float("nan")

    lines = [f"# Accuracy–fairness fronts: {FLAGS.dataset}, constraint {FLAGS.constraint} "
             f"({len(seeds)} seeds: {', '.join(map(str, seeds))})\n\n",
             f"Linear models. fairopt: full batch, Adam lr {FLAGS.learning_rate:g}, {FLAGS.steps} steps, surrogates "
             f"{','.join(FLAGS.surrogates)}, inner steps {FLAGS.inner_steps}; eta {','.join(FLAGS.etas)}, tolerance "
             f"{','.join(FLAGS.tolerances)}, re-weighting alpha {','.join(FLAGS.alphas)}; points chosen for validation "
             f"gap <= {','.join(FLAGS.val_gaps)}. fairlearn: LogisticRegression(max_iter={FLAGS.lr_max_iter}), "
             f"EG eps {','.join(FLAGS.eg_eps)} (max_iter {FLAGS.eg_max_iter}), GridSearch grid sizes "
             f"{','.join(FLAGS.gs_grid_sizes)}, ThresholdOptimizer (accuracy). Test split, mean ± std over seeds.\n\n",
             "## References (unconstrained)\n\n| model | accuracy | gap | seconds |\n|---|---|---|---|\n"]
    for name, row in reference_means.iterrows():
        lines.append(f"| {name} | {row[('accuracy', 'mean')]:.4f} ± {row[('accuracy', 'std')]:.4f} | "
                     f"{row[('gap', 'mean')]:.4f} ± {row[('gap', 'std')]:.4f} | {row[('seconds', 'mean')]:.2f} |\n")
    lines.append(f"\nHypervolume reference point: majority-class accuracy {reference_point[0]:.4f}, "
                 f"unconstrained LogisticRegression gap {reference_point[1]:.4f}.\n\n## Points\n\n"
                 "| method | point | accuracy | gap | val accuracy | val gap | seconds/point |\n|---|---|---|---|---|---|---|\n")
    for p in points:
        lines.append(f"| {p['method']} | {p['point']} | {p['accuracy_mean']:.4f} ± {p['accuracy_std']:.4f} | "
                     f"{p['gap_mean']:.4f} ± {p['gap_std']:.4f} | {p['val_accuracy_mean']:.4f} | {p['val_gap_mean']:.4f} | "
                     f"{p['seconds_mean']:.3f} |\n")
    lines.append("\n## Hypervolume (larger is better)\n\n| method | HV of mean front | HV per seed | paired diff. vs EG | "
                 "validation HV |\n|---|---|---|---|---|\n")
    for h in hv:
        paired = (f"{h['paired_difference_vs_eg_mean']:+.5f} ± {h['paired_difference_vs_eg_std']:.5f}"
                  if "paired_difference_vs_eg_mean" in h else "")
        lines.append(f"| {h['method']} | {h['hypervolume']:.5f} | {h['hypervolume_seed_mean']:.5f} ± "
                     f"{h['hypervolume_seed_std']:.5f} | {paired} | {h['val_hypervolume']:.5f} |\n")
    lines.append("\n## Time (training only, this run)\n\n| method | seconds per point | seconds per seed (whole grid) | "
                 "compile seconds (once) |\n|---|---|---|---|\n")
    for method in methods:
        part = frame[frame["method"] == method]
        if method in grid_seconds:
            lines.append(f"| {method} | {np.mean(grid_seconds[method]) / len(fairopt_grid(method.split('_', 1)[1])):.3f} | "
                         f"{np.mean(grid_seconds[method]):.2f} | {compile_seconds[method]:.1f} |\n")
        elif len(part):
            lines.append(f"| {method} | {part['seconds_mean'].mean():.3f} | {part['seconds_mean'].sum():.2f} | |\n")
    if dominance:
        met = all(d["matched_by"] for d in dominance)
        lines.append("\n## Every ExponentiatedGradient point matched by a fairopt point (within one seed-std)\n\n"
                     "| EG point | accuracy | gap | fairopt point with accuracy >= and gap <= |\n|---|---|---|---|\n")
        for d in dominance:
            lines.append(f"| {d['point']} | {d['accuracy']:.4f} | {d['gap']:.4f} | {d['matched_by'] or 'none'} |\n")
        lines.append(f"\nAll matched: {'yes' if met else 'NO'}.\n")
    markdown = "".join(lines)

    summary = frame[["method", "point", "accuracy_mean", "accuracy_std", "gap_mean", "gap_std", "seconds_mean"]]
    config = dict(flags={k: FLAGS[k].value for k in (
        "dataset", "constraint", "seeds", "methods", "steps", "learning_rate", "inner_steps", "surrogates", "etas",
        "tolerances", "alphas", "val_gaps", "eg_eps", "eg_max_iter", "gs_grid_sizes", "lr_max_iter")},
        references=references, reference_point=reference_point, hypervolume=hv, chosen_settings=chosen,
        points=points, eg_dominance=dominance, fairopt_grid_seconds=grid_seconds,
        fairopt_compile_seconds=compile_seconds, eg_seconds_per_point=eg_seconds)
    targets = common.write_results(FLAGS.output_dir, stem, rows, summary.set_index("method"), markdown, config=config,
                                   overwrite=FLAGS.overwrite)
    ref_plot = {name: (row[("accuracy", "mean")], row[("gap", "mean")]) for name, row in reference_means.iterrows()}
    png = common.atomic_write_bytes(f"{FLAGS.output_dir}/{stem}.png", plot(points, ref_plot, reference_point,
                                                                          f"{FLAGS.dataset}, {FLAGS.constraint}"))
    print(markdown)
    print(f"wrote {', '.join(str(p) for p in targets.values())}, {png}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
