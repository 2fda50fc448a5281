r"""FACIMS round by round: validation-only judgement of choices that themselves read validation.

``--model_selection=best_round`` picks a round on the validation split, so its validation
balanced accuracy is optimistic and cannot be compared with the last round's on the same rows.
This tool trains FACIMS settings x the paper seeds as one vmapped program (as
``experiments.facims`` does; same splits, same initialisations, same numbers), records every
run's predicted probabilities on the validation and test splits after every round, and reports:

* ``last``: the last round (validation BA on all validation rows);
* ``best_round``: the round of highest validation BA;
* ``cross-fitted``: the honest validation estimate of both rules: the validation rows are split
  in two random halves; a rule chooses its round on one half and is scored on the other, both
  ways, averaged (for ``last`` nothing is chosen, so this is its BA on the same halves);
* test BA of each rule (reported, never used to choose).

Caveat, measured: FACIMS's upper level *trains* on the validation split (its objective is the
balanced loss on validation batches), so every FACIMS validation number here, cross-fitted or
not, is in-sample for the upper level. On drug, rounds chosen on validation scored validation BA
.46-.62 and test BA .24-.31 (4 classes). That is why ``experiments.facims --model_selection=auto``
(the default) does not choose FACIMS rounds on validation.

    python -m experiments.facims_rounds                                    # defaults, paper seeds
    python -m experiments.facims_rounds --settings=,class_counts_from=original,damping=10

Each ``--settings`` entry is ``name=value;name=value`` over FacimsConfig fields plus
``class_counts_from`` (resampled / original, default that of ``experiments.facims``); the empty
entry is the defaults. ``--seeds``, ``--epochs``, ``--hidden``, ``--output_dir`` are those of
``experiments.facims`` (same meaning, own defaults). Writes ``<output_dir>/facims_rounds.{npz,md}``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from experiments.paper import CLASS_COUNT_SOURCES, PAPER_SEEDS, hold_out_selection, prepare
from fairopt import data, metrics, models, sweep
from fairopt.solvers.facims import FacimsConfig, FacimsData, facims

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The entry point's flags, defined when it runs (importing the module for its functions, e.g.
    in tests next to other entry points, defines none)."""
    flags.DEFINE_list("settings", [""], "Settings to compare: 'name=value;name=value' each ('' = the defaults).")
    flags.DEFINE_list("seeds", [str(s) for s in PAPER_SEEDS], "Seeds (paired across settings).")
    flags.DEFINE_integer("epochs", 50, "Rounds.", lower_bound=1)
    flags.DEFINE_list("hidden", ["400", "200", "100"], "MLP widths.")
    flags.DEFINE_float("selection_fraction", 0.0, "Validation rows held out of the upper level (as experiments.facims); "
                       "the probabilities are recorded, and the rules judged, on those rows.", lower_bound=0.0,
                       upper_bound=0.9)
    flags.DEFINE_string("output_dir", "results/facims_rounds", "Folder of the npz and the markdown report.")

def parse_setting(text: str) -> tuple[FacimsConfig, str]:
    """``name=value;...`` -> (config, class-count source)."""
    fields = dict(item.split("=", 1) for item in text.split(";") if item)
    counts = fields.pop("class_counts_from", CLASS_COUNT_SOURCES[0])
    if counts not in CLASS_COUNT_SOURCES:
        raise ValueError(f"class_counts_from={counts!r}; choose one of {', '.join(CLASS_COUNT_SOURCES)}")
    defaults = FacimsConfig()
    values = {}
    for name, value in fields.items():
        if not hasattr(defaults, name):
            raise ValueError(f"FacimsConfig has no setting {name!r}")
        kind = type(getattr(defaults, name))
        values[name] = value == "True" if kind is bool else kind(value)
    return dataclasses.replace(defaults, **values), counts


def balanced_accuracy(p1: np.ndarray, labels: np.ndarray) -> float:
    """BA of the argmax decision ``p1 > 1/2`` (binary)."""
    predicted = p1 > 0.5
    return 0.5 * (float(np.mean(predicted[labels == 1])) + float(np.mean(~predicted[labels == 0])))


def train_and_record(settings, seeds, hidden, selection_fraction=0.0):
    """Per-round class-1 probabilities on the selection rows and test: arrays [rounds, runs, rows].

    With ``selection_fraction`` the upper level trains on the rest of the validation split
    (``hold_out_selection``) and the recorded "validation" rows are the held-out ones; the
    returned ``prepared[seed]`` is ``(splits, original_train)`` with ``splits.val`` replaced by them."""
    credit = data.credit()
    prepared, upper = {}, {}
    for seed in seeds:
        splits, original = prepare(credit, seed, 400)
        upper[seed], selection = hold_out_selection(splits.val, selection_fraction, seed)
        prepared[seed] = (splits._replace(val=selection), original)
    pad_to = int(max(max((o.group_counts + s.val.group_counts + s.test.group_counts).max(), s.train.group_counts.max())
                     for s, o in prepared.values()))
    pad_to = max(pad_to, max(int(u.group_counts.max()) for u in upper.values()))
    configs = [parse_setting(text) for text in settings]
    if len(sweep.group_by_static([c for c, _ in configs])) != 1:
        raise ValueError("--settings must differ in hyperparameters only (one compiled program)")
    first_split, first_original = prepared[seeds[0]]
    _, apply_fn = models.make_model("mlp", 2, first_split.train.num_features, jax.random.key(0), hidden=hidden)
    solver = facims(apply_fn, configs[0][0], class_counts=first_original.class_counts,
                    group_counts=first_original.group_counts)
    runs = []
    for config, counts in configs:
        for seed in seeds:
            splits, original = prepared[seed]
            params = models.make_model("mlp", 2, splits.train.num_features, jax.random.key(seed), hidden=hidden)[0]
            grouped = FacimsData(data.group_arrays(splits.train, pad_to=pad_to), data.group_arrays(upper[seed], pad_to=pad_to))
            class_counts = splits.train.class_counts if counts == "resampled" else original.class_counts
            runs.append((jax.random.key(seed + 1), params, config.hyperparams(), class_counts, original.group_counts, grouped))
    keys, params, hyperparams, class_counts, group_counts, grouped = (sweep.stack([r[i] for r in runs]) for i in range(6))
    states = jax.vmap(lambda k, p, h, c, g: solver.init(k, p, h, class_counts=c, group_counts=g))(
        keys, params, hyperparams, class_counts, group_counts)
    step = jax.jit(jax.vmap(solver.step))

    def stacked(split_name):
        splits = [getattr(prepared[seed][0], split_name) for seed in seeds] * len(configs)
        rows = max(len(s) for s in splits)
        return jnp.asarray(np.stack([np.pad(np.asarray(s.features, np.float32), ((0, rows - len(s)), (0, 0))) for s in splits]))

    x_val, x_test = stacked("val"), stacked("test")
    predict = jax.jit(jax.vmap(lambda state, x: solver.predict(state, x)[:, 1]))
    val, test = [], []
    started = time.perf_counter()
    for epoch in range(1, FLAGS.epochs + 1):
        states, _ = step(states, grouped)
        val.append(np.asarray(predict(states, x_val)))
        test.append(np.asarray(predict(states, x_test)))
        print(f"[facims_rounds] round {epoch}/{FLAGS.epochs} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return np.stack(val), np.stack(test), prepared


def judge(val, test, prepared, settings, seeds) -> tuple[list[dict], str]:
    """Rows per (setting, seed) and the markdown summary (module docstring)."""
    rows = []
    for index in range(val.shape[1]):
        setting, seed = settings[index // len(seeds)], seeds[index % len(seeds)]
        splits = prepared[seed][0]
        y_val, y_test, groups_test = splits.val.labels, splits.test.labels, splits.test.groups
        per_round_val = val[:, index, : len(y_val)]
        per_round_test = test[:, index, : len(y_test)]
        best = int(np.argmax([balanced_accuracy(p, y_val) for p in per_round_val]))
        half = np.random.default_rng(seed).permutation(len(y_val)) % 2 == 0
        crossed_best, crossed_last = [], []
        for chooser in (half, ~half):
            scorer = ~chooser
            chosen = int(np.argmax([balanced_accuracy(p[chooser], y_val[chooser]) for p in per_round_val]))
            crossed_best.append(balanced_accuracy(per_round_val[chosen][scorer], y_val[scorer]))
            crossed_last.append(balanced_accuracy(per_round_val[-1][scorer], y_val[scorer]))

        def test_metrics(p):
            report = metrics.report(np.stack([1 - p, p], 1), y_test, groups_test, num_classes=2,
                                    num_groups=splits.test.num_groups)
            return report["balanced_accuracy"], report["sufficiency_gap_official"]

        (last_ba, last_sgap), (best_ba, best_sgap) = test_metrics(per_round_test[-1]), test_metrics(per_round_test[best])
        rows.append(dict(setting=setting or "defaults", seed=seed, best_round=best + 1,
                         val_last=balanced_accuracy(per_round_val[-1], y_val), val_best=balanced_accuracy(per_round_val[best], y_val),
                         crossfit_last=float(np.mean(crossed_last)), crossfit_best=float(np.mean(crossed_best)),
                         test_last=last_ba, test_best=best_ba, sgap_last=last_sgap, sgap_best=best_sgap))
    cell = lambda values: f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.4f}"  # noqa: E731
    lines = [
        "| setting | val BA last | val BA best round (optimistic) | cross-fitted val BA last | cross-fitted val BA best round | "
        "paired cross-fitted (best − last) | test BA last | test BA best round | test SGap last | test SGap best round | best rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in dict.fromkeys(row["setting"] for row in rows):
        group = [row for row in rows if row["setting"] == setting]
        column = lambda name: [row[name] for row in group]  # noqa: E731
        lines.append(f"| {setting} | " + " | ".join(cell(column(name)) for name in ("val_last", "val_best", "crossfit_last", "crossfit_best"))
                     + f" | {cell(np.subtract(column('crossfit_best'), column('crossfit_last')))} | "
                     + " | ".join(cell(column(name)) for name in ("test_last", "test_best", "sgap_last", "sgap_best"))
                     + f" | {', '.join(map(str, column('best_round')))} |")
    return rows, "\n".join(lines) + "\n"


def main(argv):
    del argv
    try:
        seeds = common.parse_seeds(FLAGS.seeds)
        hidden = common.parse_numbers("hidden", FLAGS.hidden, kind=int, valid=lambda w: w >= 1,
                                      requirement="comma-separated integers >= 1", example="400,200,100")
        settings = [text.strip() for text in FLAGS.settings]
        for text in settings:
            parse_setting(text)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    val, test, prepared = train_and_record(settings, seeds, hidden, FLAGS.selection_fraction)
    rows, table = judge(val, test, prepared, settings, seeds)
    output = Path(FLAGS.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / ".facims_rounds.npz.tmp", "wb") as handle:
        np.savez_compressed(handle, val=val, test=test, seeds=np.asarray(seeds), settings=np.asarray(settings))
    (output / ".facims_rounds.npz.tmp").replace(output / "facims_rounds.npz")
    markdown = (f"# FACIMS round by round on credit (seeds {', '.join(map(str, seeds))}, {FLAGS.epochs} rounds)\n\n"
                f"`python -m experiments.facims_rounds {' '.join(sys.argv[1:])}`\n\n" + table)
    common.atomic_write_text(output / "facims_rounds.md", markdown, overwrite=True)
    print(markdown)


if __name__ == "__main__":
    define_flags()
    app.run(main)
