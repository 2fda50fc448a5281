r"""FACIMS ablation: paired 5-seed comparisons, one factor at a time against the defaults.

Each factor is a set of ``experiments.facims`` flags that changes ONE thing relative to the
default configuration. Every factor runs on the same seeds as the default (the same splits, the
same initialisations), so the comparison is paired: for each seed the difference factor − default
of a metric, then the mean and the standard deviation of those differences over the seeds.
Validation numbers (``val_``) are what a selection may read; test numbers are reported beside
them and never used to choose (SPEC / the developers' brief: results are earned on validation).

    python -m experiments.facims_ablation                              # every factor, paper seeds
    python -m experiments.facims_ablation --factors=w2,no_sam --seeds=0,42
    python -m experiments.facims_ablation --epochs=5 --seeds=0 --factors=w2 --hidden=16   # smoke

The runs go to ``<output_dir>/<factor>/facims_<dataset>.json`` (a finished factor is reused when
the command is run again, so an interrupted ablation continues; the ``default`` folder may hold
the results of a plain ``experiments.facims`` run with the same seeds, e.g. ``make run``'s, whose
``facims`` rows are the reference); the report goes to ``--docs``
(default ``docs/facims_ablation.md``): per factor the paired change in validation and test
balanced accuracy and official-estimator SGap, and the rule the defaults follow: a factor is
adopted only if it raises mean validation balanced accuracy by more than the paired standard
error and does not raise validation SGap by more than .01.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments import common
from experiments.paper import PAPER_SEEDS

REPO = Path(__file__).resolve().parents[1]

# name -> (what it changes, flags of experiments.facims)
FACTORS = {
    "w2": ("divergence W2^2 instead of KL (what the official code runs)", ["--divergence=w2"]),
    "no_sam": ("no SAM step (sharpness 0; FACIMS-I without the method switch)", ["--sharpness=0"]),
    "sam_by_frequency": ("SAM radius scaled by 1/sqrt(group size) (larger for small groups)", ["--sharpness_scaling=frequency"]),
    "balanced_ce_upper": ("upper loss: class-balanced CE (official) instead of the VS loss at v_bar", ["--validation_loss=balanced_ce"]),
    "global_lr_official": ("global posterior step 0.01 (official) instead of 0.1", ["--global_learning_rate=0.01"]),
    "alpha_low_0.3": ("alpha_low 0.3 instead of 0.7 (looser tie of the local posteriors)", ["--alpha_low=0.3"]),
    "independent_noise": ("independent Monte-Carlo draws per group (common_noise off)", ["--nocommon_noise"]),
    "damping_1": ("hypergradient inverts H + 1 I (damped CG) instead of the indefinite H", ["--damping=1.0"]),
    "cg_10": ("10 CG iterations instead of 5", ["--cg_iters=10"]),
    "hessian_draws_3": ("3 Monte-Carlo draws in the hypergradient's Hessian instead of 1", ["--hypergradient_samples=3"]),
    "mean_prediction": ("prediction at the posterior mean instead of 20 Monte-Carlo draws", ["--prediction=mean"]),
    "whole_validation": ("upper objective on every validation row of each group with one posterior draw per step (the "
                         "official code's) instead of a batch of 50 per group and 5 draws",
                         ["--whole_validation", "--validation_draws=1"]),
    "local_reparameterisation": ("pre-activation noise fresh per row (local reparameterisation, the official code's "
                                 "layers) instead of one weight draw per forward pass", ["--local_reparameterisation"]),
    "rounds_100": ("100 rounds instead of 50", ["--epochs=100"]),
    "hidden_100": ("MLP with one hidden layer of 100 units instead of the default 32", ["--hidden=100"]),
    "paper_network": ("the papers' 400-200-100 MLP instead of the default one layer of 32 units", ["--hidden=400,200,100"]),
    "sigmoid_output": ("sigmoid on the network output before the softmax (the official code's defect; diagnosis only)",
                       ["--output_activation=sigmoid"]),
    "best_round": ("the round of highest validation BA instead of the last (the upper level trains on that split: biased)",
                   ["--model_selection=best_round"]),
    "original_class_counts": ("v_bar and the balanced loss from the class counts before resampling (22 % defaults) "
                              "instead of the resampled rows the losses see (13-14 %)", ["--class_counts_from=original"]),
}
METRICS = ("balanced_accuracy", "sufficiency_gap_official", "dp_gap", "deo_gap")

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "credit", ("credit", "drug", "synthetic"), "Dataset of experiments.facims.")
flags.DEFINE_list("factors", list(FACTORS), f"Factors to run, any of {', '.join(FACTORS)}.")
flags.DEFINE_list("seeds", [str(s) for s in PAPER_SEEDS], "Seeds (paired across factors).")
flags.DEFINE_integer("epochs", None, "Rounds (default: experiments.facims's 50).", lower_bound=1)
flags.DEFINE_list("hidden", None, "MLP widths (default: experiments.facims's 400,200,100).")
flags.DEFINE_list("extra", [], "Further experiments.facims flags for every run (e.g. --drug_path=...).")
flags.DEFINE_string("output_dir", "results/facims_ablation", "Folder of the runs.")
flags.DEFINE_string("docs", "docs/facims_ablation.md", "Markdown report ('' to skip).")


def _base_flags(seeds) -> list[str]:
    base = [f"--dataset={FLAGS.dataset}", "--methods=facims", f"--seeds={','.join(map(str, seeds))}", "--checkpoint_every=5"]
    if FLAGS.epochs:
        base.append(f"--epochs={FLAGS.epochs}")
    if FLAGS.hidden:
        base.append(f"--hidden={','.join(FLAGS.hidden)}")
    return base + list(FLAGS.extra)


def run_factor(name: str, factor_flags: list[str], seeds) -> list[dict]:
    """The rows of one factor (run unless its results exist)."""
    folder = Path(FLAGS.output_dir) / name
    results = folder / f"facims_{FLAGS.dataset}.json"
    if not results.exists():
        command = [sys.executable, "-m", "experiments.facims", *_base_flags(seeds), *factor_flags, f"--output_dir={folder}"]
        resume = ["--resume"] if (folder / "checkpoints").exists() else []
        print(f"[ablation] {name}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        result = subprocess.run(command + resume, cwd=REPO, text=True, stderr=subprocess.PIPE)
        if result.returncode != 0:
            raise RuntimeError(f"factor {name} failed:\n{result.stderr[-3000:]}")
        print(f"[ablation] {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return [row for row in json.loads(results.read_text())["runs"] if row["method"] == "facims"]


def paired(rows: list[dict], default: list[dict], metric: str) -> tuple[float, float, int]:
    """Mean and standard deviation (ddof=1) over seeds of factor − default, and the seed count."""
    by_seed = {row["seed"]: row[metric] for row in default}
    differences = [row[metric] - by_seed[row["seed"]] for row in rows if row["seed"] in by_seed]
    if not differences:
        return math.nan, math.nan, 0
    spread = float(np.std(differences, ddof=1)) if len(differences) > 1 else math.nan
    return float(np.mean(differences)), spread, len(differences)


def adopted(rows, default) -> bool:
    """The validation-only rule (module docstring)."""
    mean, std, count = paired(rows, default, "val_balanced_accuracy")
    sgap, _, _ = paired(rows, default, "val_sufficiency_gap_official")
    standard_error = std / math.sqrt(count) if count > 1 else math.inf
    return bool(mean > standard_error and sgap <= 0.01)


def report(results: dict[str, list[dict]], seeds) -> str:
    default = results["default"]
    cell = lambda m, s: "" if math.isnan(m) else f"{m:+.4f} ± {s:.4f}" if not math.isnan(s) else f"{m:+.4f}"  # noqa: E731
    lines = [
        f"# FACIMS ablation on {FLAGS.dataset}",
        "",
        f"Generated by `python -m experiments.facims_ablation {' '.join(sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d')}; seeds {', '.join(map(str, seeds))} (paired: same splits and initialisations "
        "for every factor). Cells: mean ± standard deviation over the seeds of (factor − default).",
        "",
        "Default: " + ", ".join(f"{k}={v}" for k, v in _default_summary(default).items()),
        "",
        "| factor | change | Δ val BA | Δ val SGap | Δ test BA | Δ test SGap | Δ test DP | Δ test DEO | adopted (validation rule) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        if name == "default":
            continue
        values = [cell(*paired(rows, default, metric)[:2]) for metric in
                  ("val_balanced_accuracy", "val_sufficiency_gap_official", "balanced_accuracy",
                   "sufficiency_gap_official", "dp_gap", "deo_gap")]
        lines.append(f"| {name} | {FACTORS[name][0]} | " + " | ".join(values) + f" | {'yes' if adopted(rows, default) else 'no'} |")
    lines += ["", "Rule (validation only): adopt a factor if it raises mean validation balanced accuracy by more than its "
              "paired standard error and raises validation SGap by at most .01. Test columns are reported, never used."]
    return "\n".join(lines) + "\n"


def _default_summary(rows) -> dict:
    out = {}
    for metric in ("val_balanced_accuracy", "balanced_accuracy", "sufficiency_gap_official"):
        values = [row[metric] for row in rows]
        out[metric] = f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.4f}"
    return out


def main(argv):
    del argv
    try:
        seeds = common.parse_seeds(FLAGS.seeds)
        common.parse_choices("factors", FLAGS.factors, tuple(FACTORS))
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    results = {"default": run_factor("default", [], seeds)}
    for name in FLAGS.factors:
        results[name] = run_factor(name, FACTORS[name][1], seeds)
    markdown = report(results, seeds)
    if FLAGS.docs:
        common.atomic_write_text(FLAGS.docs, markdown, overwrite=True)
    print(markdown)


if __name__ == "__main__":
    app.run(main)
