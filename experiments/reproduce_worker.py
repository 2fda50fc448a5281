"""Internal helper of ``experiments/reproduce.py``: the two in-process computations of the report.

* ``pareto_blends`` — AutoBalance Fig. 5 baselines that the AutoBalance entry point has no
  method for: ``(1 - lambda) CE + lambda L_reg`` with ``L_reg`` = CE_bal^G (per-example weights
  ``∝ 1/n_{y,g}``) or Group-LA, trained exactly like the entry point's baselines (its
  ``prepare``, lower optimiser, model and ``evaluate``).
* ``fairalm_profile`` — FairALM training profiles: test DEO and accuracy after every epoch,
  with the solvers, splits and evaluation of ``experiments/fairalm.py`` (``make_solver``,
  ``prepare``, ``evaluate_split``) and ``fairopt.train.fit``'s ``on_epoch_end`` callback.

It runs as a child process (``python -m experiments.reproduce_worker <task> <json>``) because the
entry points define absl flags with the same names as reproduce.py's (``--seeds``, ...): both
cannot be imported into one process. The JSON gives the task's arguments and the output CSV,
written atomically at the end. Not meant to be run by hand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time

import jax
import pandas as pd

from experiments import common


def pareto_blends(args: dict) -> pd.DataFrame:
    from experiments import autobalance as entry  # defines the entry point's flags (unparsed, unused)
    from fairopt import losses, models
    from fairopt.solvers import autobalance as ab
    from fairopt.solvers.erm import erm
    from fairopt.train import NonFiniteError, Progress, fit, make_epoch_fn, predict_in_batches

    dataset = args["dataset"]
    defaults = entry.DEFAULTS[dataset]
    settings = entry.dataset_settings(dataset, epochs=args.get("epochs") or defaults["epochs"])
    config = entry.autobalance_config(settings, dataset, {})
    rows = []
    total = len(args["seeds"]) * len(args["regs"]) * len(args["lambdas"]) * settings.epochs
    progress = Progress(f"pareto:{dataset}", total, every=max(1, total // 10))
    for seed in args["seeds"]:
        prepared = entry.prepare(dataset, seed)
        train, test = prepared.train, prepared.test
        num_classes, num_features = train.num_classes, train.num_features
        # As entry.run_dataset: one model definition, parameters drawn from the run's init key.
        _, apply_fn = models.make_model("mlp", num_classes, num_features, jax.random.key(0), hidden=settings.hidden)
        steps = max(1, math.ceil(len(train) / settings.batch_size))
        ce = losses.make_loss("ce", train.class_counts)
        for reg_name in args["regs"]:
            reg = losses.make_loss(reg_name, train.class_counts, cell_counts=train.cell_counts)
            for lam in args["lambdas"]:

                def loss_fn(logits, labels, groups=None, epoch=0, reg=reg, lam=lam):
                    return (1.0 - lam) * ce(logits, labels, groups, epoch) + lam * reg(logits, labels, groups, epoch)

                optimizer = ab.make_lower_optimizer(ab.phase_config(
                    config, num_rows=len(train), epochs=settings.epochs, batch_size=settings.batch_size,
                    lr_decay_fractions=settings.lr_decay_fractions))
                solver = erm(apply_fn, loss_fn, optimizer, steps_per_epoch=steps)
                epoch_fn = make_epoch_fn(solver.step, num_rows=len(train), batch_size=settings.batch_size)
                init_key, fit_key = jax.random.split(jax.random.key(seed))
                params = models.make_model("mlp", num_classes, num_features, init_key, hidden=settings.hidden)[0]
                state = solver.init(init_key, params)
                start = time.perf_counter()
                row = dict(series=args["labels"][reg_name], reg=reg_name, dataset=dataset, seed=seed, **{"lambda": lam})
                try:
                    state, _ = fit(solver, state, train.features, train.labels, train.groups, epochs=settings.epochs,
                                   batch_size=settings.batch_size, key=fit_key, epoch_fn=epoch_fn,
                                   on_epoch_end=lambda e, s, m: progress.advance(m))
                except NonFiniteError as error:
                    print(f"[pareto {reg_name} lambda={lam:g} seed={seed}] DIVERGED: {error}", file=sys.stderr, flush=True)
                    rows.append(dict(row, diverged=1, seconds=time.perf_counter() - start))
                    continue
                scores = entry.evaluate(predict_in_batches(solver.predict, state, test.features), test)
                rows.append(dict(row, diverged=0, seconds=time.perf_counter() - start, **scores))
                print(f"[pareto {reg_name} lambda={lam:g} seed={seed}] gbal={scores['group_balanced_error']:.2f} "
                      f"deo={scores['deo']:.2f}", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def fairalm_profile(args: dict) -> pd.DataFrame:
    from experiments import fairalm as entry
    from fairopt import models
    from fairopt.train import Progress, fit, make_epoch_fn

    # The entry point's flags, parsed from the same values its table run used.
    entry.FLAGS(["fairalm", *args["flags"]])
    flags = entry.FLAGS
    rows = []
    total = len(args["seeds"]) * len(args["methods"]) * flags.epochs
    progress = Progress(f"profile:{flags.dataset}", total, every=max(1, total // 10))
    epoch_fns = {}
    for seed in args["seeds"]:
        splits = entry.prepare(seed)
        train = splits.train
        for method in args["methods"]:
            eta = args["etas"].get(method)
            params, apply_fn = models.make_model(flags.model, train.num_classes, train.num_features, jax.random.key(seed))
            steps = -(-len(train) // flags.batch_size)
            config = entry.base_config() if eta is None else dataclasses.replace(entry.base_config(), eta=eta)
            solver = entry.make_solver(method, apply_fn, num_classes=train.num_classes, num_groups=train.num_groups,
                                       config=config, steps_per_epoch=steps)
            key = (method, len(train))
            if key not in epoch_fns:  # eta is a traced hyperparameter: one program per method and shape
                epoch_fns[key] = (solver, make_epoch_fn(solver.step, num_rows=len(train), batch_size=flags.batch_size))
            solver, epoch_fn = epoch_fns[key]
            state = solver.init(jax.random.key(seed + 1), params, entry.method_hyperparams(method, config, train))
            base = dict(method=method, seed=seed, eta=float("nan") if eta is None else eta)
            rows.append(dict(base, epoch=0, **entry.evaluate_split(solver, state, splits.test)))

            def record(epoch, state, metrics, base=base, solver=solver):
                rows.append(dict(base, epoch=epoch, train_loss=metrics.get("loss", float("nan")),
                                 **entry.evaluate_split(solver, state, splits.test)))
                progress.advance(metrics)

            fit(solver, state, train.features, train.labels, train.groups, epochs=flags.epochs,
                batch_size=flags.batch_size, key=jax.random.key(seed + 2), epoch_fn=epoch_fn, on_epoch_end=record)
            last = rows[-1]
            print(f"[profile {method} seed={seed}] accuracy={last['accuracy']:.4f} deo={last['deo_gap']:.4f}",
                  file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


TASKS = {"pareto_blends": pareto_blends, "fairalm_profile": fairalm_profile}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in TASKS:
        print(f"usage: python -m experiments.reproduce_worker {{{','.join(TASKS)}}} '<json arguments>'", file=sys.stderr)
        return 2
    args = json.loads(argv[2])
    common.enable_compilation_cache()
    frame = TASKS[argv[1]](args)
    common.atomic_write_text(args["output"], frame.to_csv(index=False), overwrite=True)
    print(f"wrote {args['output']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
