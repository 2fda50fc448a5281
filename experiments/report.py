"""Tables, figures and Markdown of the reproduction report (``experiments/reproduce.py``).

Everything here reads results files that the experiment entry points wrote (or synthetic ones,
in the tests) and writes tables (CSV + Markdown), PNG figures (matplotlib, Agg backend, 150
dpi) and the Markdown body of one section of ``docs/results.md``. Nothing here trains a model
and nothing defines a command-line flag, so the module can be imported anywhere (the tests do).

The papers' reported numbers live here too (``PAPER_*``), each with where it comes from.
"""

from __future__ import annotations

import dataclasses
import datetime as _datetime
import io
import math
import os
import platform
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402  # before pyplot: no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments import common  # noqa: E402

SUITES = (
    "facims_credit",
    "facims_drug",
    "autobalance_longtail",
    "autobalance_groups",
    "fairalm_celeba",
    "fairalm_adult",
    "fairness_fronts",
)
OWN_FILE_SUITES = ("fairness_fronts",)  # suites that write a docs file of their own, not a section of --docs
SUITE_TITLES = {
    "facims_credit": "FACIMS on credit card (FACIMS Table 2, Fig. 2, Fig. 3)",
    "facims_drug": "FACIMS on drug consumption (FACIMS appendix, Fig. 2 view)",
    "autobalance_longtail": "AutoBalance, class imbalance (AutoBalance Table 1, Fig. 3)",
    "autobalance_groups": "AutoBalance, group imbalance (AutoBalance Table 3, Fig. 5)",
    "fairalm_celeba": "FairALM on CelebA attributes (FairALM Fig. 2)",
    "fairalm_adult": "FairALM on Adult (FairALM training profiles)",
    "fairness_fronts": "Accuracy–fairness fronts: fairopt against fairlearn (issue 15)",
}
DPI = 150
plt.rcParams.update(
    {
        "font.size": 11,
        "axes.titlesize": 12,
        "axes.labelsize": 11,
        "legend.fontsize": 9,
        "xtick.labelsize": 10,
        "ytick.labelsize": 10,
        "figure.titlesize": 13,
    }
)

# ------------------------------------------------------------------------------------------------
# The papers' numbers.
# ------------------------------------------------------------------------------------------------

from experiments.paper import PAPER_FACIMS_CREDIT, PAPER_FACIMS_CREDIT_STD  # noqa: E402,F401
FACIMS_METHODS = ("facims", "facims_i", "facims_ii", "fams", "erm", "berm")
FACIMS_LABELS = {
    "facims": "FACIMS",
    "facims_i": "FACIMS-I (β=0)",
    "facims_ii": "FACIMS-II (β=0, v=v̄)",
    "fams": "FAMS",
    "erm": "ERM",
    "berm": "BERM",
}

# AutoBalance (Li et al., NeurIPS 2021) Table 1, CIFAR10-LT column (balanced error, %). The
# paper's LDAM row is LDAM without DRW; its "tau of LA" row has no counterpart in our suite.
PAPER_AUTOBALANCE_LONGTAIL = {
    "CE": {"balanced_error": 30.45},
    "LDAM-DRW": {"balanced_error": 26.37},
    "LA (tau=1)": {"balanced_error": 23.13},
    "CDT": {"balanced_error": 20.73},
    "AutoBalance: l": {"balanced_error": 23.02},
    "AutoBalance: Delta": {"balanced_error": 22.59},
    "AutoBalance: l & Delta": {"balanced_error": 21.39},
    "AutoBalance: l & Delta, LA init": {"balanced_error": 21.15},
}
# AutoBalance Table 3 (Waterbirds, ResNet-18 features): group-balanced error, worst (class,
# group) error, DEO (eq. 4.1), %. The paper's blend row reads "0.1 CE + 0.9 CE_deo (lambda =
# 0.1)"; with lambda = 0.1 on CE_deo that is our "0.9 CE + 0.1 CE_deo".
_AB_GROUP_ROWS = {
    "CE": (23.38, 43.25, 33.75),
    "CE_bal^G": (20.83, 36.67, 20.25),
    "Group-LA": (22.83, 40.50, 29.33),
    "CE_deo": (19.29, 35.17, 25.25),
    "0.9 CE + 0.1 CE_deo": (20.06, 31.67, 26.25),
    "Group DRO": (16.47, 32.67, 6.91),
    "AutoBalance: lambda_val=0.1": (15.13, 30.33, 4.25),
}
PAPER_AUTOBALANCE_GROUPS = {
    m: dict(zip(("group_balanced_error", "worst_group_error", "deo"), v)) for m, v in _AB_GROUP_ROWS.items()
}
# FairALM (Lokhande et al., ECCV 2020) Fig. 2 (right), CelebA, target Attractive, protected
# Male, ResNet-18 on images: ERR 24.5 %, DEO 10.4 %, FNR Female 6.6 %, FNR Male 17.0 %.
PAPER_FAIRALM_CELEBA = {
    "fairalm": {"accuracy": 0.755, "deo_gap": 0.104, "fnr_not Male": 0.066, "fnr_Male": 0.170},
}

# ------------------------------------------------------------------------------------------------
# Small helpers.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Built:
    """What a suite builder produced: Markdown body, files written, generated comparisons."""

    markdown: str
    tables: list[Path]
    figures: list[Path]
    comparisons: list[str]


def machine_info() -> dict[str, str]:
    """CPU model (``/proc/cpuinfo``), core count, load average, jax version, Python, OS."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "n/a"
    try:
        import jax

        jax_version = f"jax {jax.__version__} ({jax.default_backend()})"
    except Exception:  # pragma: no cover - jax is a dependency
        jax_version = "jax not importable"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "load": load,
        "jax": jax_version,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def now() -> str:
    return _datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at :data:`DPI` atomically, then close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return common.atomic_write_bytes(path, buffer.getvalue())


def write_table(out_dir: Path, stem: str, frame: pd.DataFrame, markdown: str) -> list[Path]:
    """``<stem>.csv`` (the numbers) and ``<stem>.md`` (the Markdown table), atomically."""
    out_dir = Path(out_dir)
    csv = common.atomic_write_text(out_dir / f"{stem}.csv", frame.to_csv(), overwrite=True)
    md = common.atomic_write_text(out_dir / f"{stem}.md", markdown, overwrite=True)
    return [csv, md]


def link(path: Path, base: Path) -> str:
    """``path`` relative to the folder ``base`` (Markdown links from the docs file)."""
    return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


def relabel_paper(markdown: str, label: str) -> str:
    """Rename the ``(paper)`` header cells of a :func:`common.markdown_table` to ``(paper, label)``."""
    head, _, rest = markdown.partition("\n")
    return head.replace(" (paper) |", f" (paper, {label}) |") + "\n" + rest


def compare(subject: str, metric: str, mean: float, std: float, paper: float, *, higher_is_better: bool,
            digits: int = 3, runs: int | None = None) -> str:
    """One factual sentence: our mean ± std against the paper's value and the verdict.

    "matches" when the paper's value is within one standard deviation (over seeds) of our mean;
    otherwise "above"/"below", and whether that is better or worse for the metric.
    """
    if mean is None or not np.isfinite(mean):
        return f"{subject} {metric}: no finite result (paper {paper:.{digits}f})."
    diff = mean - paper
    if abs(diff) <= std:
        verdict = "matches (paper value within one std over seeds)"
    else:
        direction = "above" if diff > 0 else "below"
        better = (diff > 0) == higher_is_better
        verdict = f"{direction}, {'better' if better else 'worse'}"
    spread = f" ± {std:.{digits}f}" if runs is None or runs > 1 else " (1 run)"
    return f"{subject} {metric} {mean:.{digits}f}{spread} vs paper {paper:.{digits}f}: {verdict} ({diff:+.{digits}f})."


def _summary(frame: pd.DataFrame, columns: Sequence[str], by: str = "method", order: Sequence[str] | None = None):
    summary = common.summarize(frame.to_dict(orient="records"), by=by, columns=columns)
    if order is not None:
        summary = summary.loc[[m for m in order if m in summary.index] + [m for m in summary.index if m not in order]]
    return summary


def _value(summary: pd.DataFrame, row: str, column: str) -> tuple[float, float, int]:
    if row not in summary.index or f"{column}_mean" not in summary.columns:
        return float("nan"), float("nan"), 0
    entry = summary.loc[row]
    return float(entry[f"{column}_mean"]), float(entry[f"{column}_std"]), int(entry["runs"])


def _color_cycle(n: int):
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


# ------------------------------------------------------------------------------------------------
# FACIMS.
# ------------------------------------------------------------------------------------------------

FACIMS_TABLE_COLUMNS = (
    "balanced_accuracy",
    "accuracy",
    "dp_gap",
    "deo_gap",
    "eo_gap",
    "sufficiency_gap_official",
    "sufficiency_gap",
)


def facims_table(runs: pd.DataFrame, paper: Mapping | None) -> tuple[pd.DataFrame, str]:
    recall = sorted(c for c in runs.columns if re.fullmatch(r"recall_\d+", c))
    columns = [c for c in FACIMS_TABLE_COLUMNS if c in runs.columns] + recall + ["seconds"]
    summary = _summary(runs, columns, order=FACIMS_METHODS)
    return summary, common.markdown_table(summary, columns, paper=paper)


def plot_facims_boxes(runs: pd.DataFrame, path: Path, *, title: str, paper: Mapping | None = None,
                      paper_std: Mapping | None = None, sgap: str = "sufficiency_gap_official") -> Path:
    """FACIMS Fig. 2 view: one box per method centred at the mean (balanced accuracy, SGap),
    extending one standard deviation each way (width = 2 std); dots are the seeds; dashed boxes
    are the paper's mean ± std."""
    methods = [m for m in FACIMS_METHODS if m in set(runs["method"])] + sorted(set(runs["method"]) - set(FACIMS_METHODS))
    colors = dict(zip(methods, _color_cycle(len(methods))))
    fig, ax = plt.subplots(figsize=(8, 6))
    for method in methods:
        rows = runs[runs["method"] == method]
        x, y = rows["balanced_accuracy"].to_numpy(float), rows[sgap].to_numpy(float)
        mx, my, sx, sy = np.nanmean(x), np.nanmean(y), np.nanstd(x), np.nanstd(y)
        color = colors[method]
        ax.add_patch(plt.Rectangle((mx - sx, my - sy), 2 * sx, 2 * sy, facecolor=color, alpha=0.25, edgecolor=color, lw=1.5))
        ax.plot(x, y, "o", color=color, ms=4, alpha=0.8)
        ax.plot([mx], [my], "s", color=color, ms=7, label=f"{FACIMS_LABELS.get(method, method)} ({len(rows)} run{'s' if len(rows) != 1 else ''})")
        if paper and method in paper:
            px, py = paper[method]["balanced_accuracy"], paper[method][sgap]
            qx = (paper_std or {}).get(method, {}).get("balanced_accuracy", 0.0)
            qy = (paper_std or {}).get(method, {}).get(sgap, 0.0)
            ax.add_patch(plt.Rectangle((px - qx, py - qy), 2 * qx, 2 * qy, fill=False, edgecolor=color, lw=1.2, ls="--"))
            ax.plot([px], [py], "D", mfc="none", color=color, ms=7)
    ax.plot([], [], "s", color="gray", label="ours: mean (square), ± std (box), seeds (dots)")
    if paper:
        ax.plot([], [], "D", mfc="none", color="gray", ls="--", label="paper Table 2: mean (diamond), ± std (dashed)")
    ax.autoscale_view()
    ax.set_xlabel("balanced accuracy (fraction; higher is better)")
    ax.set_ylabel("sufficiency gap SGap, official estimator (lower is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9)
    return save_figure(fig, path)


def plot_alpha_tradeoff(points: pd.DataFrame, path: Path, *, title: str, sgap: str = "sufficiency_gap_official") -> Path:
    """FACIMS Fig. 3: balanced accuracy against SGap for each alpha_low (mean ± std over seeds),
    joined in increasing alpha_low."""
    summary = points.groupby("alpha_low").agg(
        ba=("balanced_accuracy", "mean"), ba_std=("balanced_accuracy", lambda s: s.std(ddof=0)),
        gap=(sgap, "mean"), gap_std=(sgap, lambda s: s.std(ddof=0)), runs=("seed", "count"),
    ).sort_index()  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot(summary["gap"], summary["ba"], "-", color="tab:blue", alpha=0.5)
    ax.errorbar(summary["gap"], summary["ba"], xerr=summary["gap_std"], yerr=summary["ba_std"], fmt="o",
                color="tab:blue", capsize=3, label="FACIMS, mean ± std over seeds")
    for alpha, row in summary.iterrows():
        runs = int(row["runs"])
        ax.annotate(f"α_low={alpha:g} ({runs} run{'s' if runs != 1 else ''})", (row["gap"], row["ba"]), textcoords="offset points",
                    xytext=(6, 6), fontsize=9)
    ax.set_xlabel("sufficiency gap SGap, official estimator (lower is better)")
    ax.set_ylabel("balanced accuracy (fraction; higher is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    ax.margins(0.15)
    return save_figure(fig, path)


def build_facims(runs: pd.DataFrame, *, dataset: str, out_dir: Path, fig_dir: Path, docs_dir: Path,
                 sweep: pd.DataFrame | None = None, prefix: str) -> Built:
    """Table (paper columns on credit), the Fig. 2 box view and, with ``sweep`` (rows with an
    ``alpha_low`` column), the Fig. 3 trade-off curve and its table."""
    paper = PAPER_FACIMS_CREDIT if dataset == "credit" else None
    summary, table = facims_table(runs, paper)
    tables = write_table(out_dir, f"{prefix}_table", summary, table)
    seeds = sorted(set(runs["seed"]))
    figures = [
        plot_facims_boxes(
            runs, fig_dir / f"{prefix}_ba_vs_sgap.png", paper=paper, paper_std=PAPER_FACIMS_CREDIT_STD if paper else None,
            title=f"FACIMS Fig. 2 view: {dataset} (test split)",
        )
    ]
    md = [
        "Mean ± std (ddof 0) over seeds (`runs` column)"
        + ("; `(paper)` columns: the paper's Table 2 where it reports the value" if paper else "; the paper has no numbers here")
        + ". `deo_gap` is the paper's \"EO\" column, `sufficiency_gap_official` its SGap (official estimator), "
        f"`sufficiency_gap` the binned estimator (10 bins). Seeds: {', '.join(map(str, seeds))}.\n\n",
        table,
        f"\n![balanced accuracy vs sufficiency gap]({link(figures[0], docs_dir)})\n",
        "\n*Fig. 2 view*: each box is centred on a method's mean (balanced accuracy, SGap) and extends one "
        "standard deviation each way; dots are single seeds"
        + ("; dashed boxes are the paper's mean ± std. Better is bottom right." if paper else ". Better is bottom right.")
        + "\n",
    ]
    comparisons = []
    if paper:
        for method in FACIMS_METHODS:
            if method not in summary.index:
                continue
            for column, name, higher in (("balanced_accuracy", "balanced accuracy", True), ("sufficiency_gap_official", "SGap", False)):
                mean, std, n = _value(summary, method, column)
                comparisons.append(compare(FACIMS_LABELS[method], name, mean, std, paper[method][column], higher_is_better=higher, runs=n))
    comparisons += _facims_ranking(summary, paper)
    if sweep is not None and len(sweep):
        figures.append(plot_alpha_tradeoff(sweep, fig_dir / f"{prefix}_alpha_low.png",
                                           title=f"FACIMS Fig. 3: accuracy–SGap under α_low ({dataset})"))
        sweep_summary = _summary(sweep, ["balanced_accuracy", "sufficiency_gap_official", "sufficiency_gap", "dp_gap", "deo_gap"],
                                 by="alpha_low").sort_index()
        sweep_table = common.markdown_table(sweep_summary, ["balanced_accuracy", "sufficiency_gap_official", "sufficiency_gap",
                                                             "dp_gap", "deo_gap"], index_name="alpha_low")
        tables += write_table(out_dir, f"{prefix}_alpha_low_table", sweep_summary, sweep_table)
        md += [
            f"\nα_low sweep (FACIMS only; seeds {', '.join(map(str, sorted(set(sweep['seed']))))}; the paper shows this "
            "curve for the Alzheimer's data only, without numbers, so there is no paper column):\n\n",
            sweep_table,
            f"\n![accuracy-SGap trade-off under alpha_low]({link(figures[-1], docs_dir)})\n",
        ]
        comparisons += _alpha_trend(sweep_summary)
    return Built("".join(md), tables, figures, comparisons)


def _facims_ranking(summary: pd.DataFrame, paper: Mapping | None) -> list[str]:
    out = []
    if "balanced_accuracy_mean" not in summary.columns or summary.empty:
        return out
    best = summary["balanced_accuracy_mean"].idxmax()
    text = f"Highest balanced accuracy here: {FACIMS_LABELS.get(best, best)} ({summary.loc[best, 'balanced_accuracy_mean']:.3f})"
    if paper:
        paper_best = max(paper, key=lambda m: paper[m]["balanced_accuracy"])
        text += f"; in the paper: {FACIMS_LABELS[paper_best]} ({paper[paper_best]['balanced_accuracy']:.3f})"
    out.append(text + ".")
    if "sufficiency_gap_official_mean" in summary.columns:
        best = summary["sufficiency_gap_official_mean"].idxmin()
        text = f"Lowest SGap here: {FACIMS_LABELS.get(best, best)} ({summary.loc[best, 'sufficiency_gap_official_mean']:.3f})"
        if paper:
            paper_best = min(paper, key=lambda m: paper[m]["sufficiency_gap_official"])
            text += f"; in the paper: {FACIMS_LABELS[paper_best]} ({paper[paper_best]['sufficiency_gap_official']:.3f})"
        out.append(text + ".")
    if {"facims", "berm"} <= set(summary.index) and "sufficiency_gap_official_mean" in summary.columns:
        ours = summary.loc["facims", "sufficiency_gap_official_mean"] < summary.loc["berm", "sufficiency_gap_official_mean"]
        claim = " (the paper: yes)" if paper else ""
        out.append(f"FACIMS has a lower SGap than BERM here: {'yes' if ours else 'no'}{claim}.")
    return out


def _alpha_trend(sweep_summary: pd.DataFrame) -> list[str]:
    """The paper's Fig. 3 claim: as alpha_low grows, balanced accuracy and SGap both decrease."""
    if len(sweep_summary) < 2:
        return ["α_low sweep: fewer than two values, no trend to report."]
    ba = sweep_summary["balanced_accuracy_mean"].to_numpy()
    gap = sweep_summary["sufficiency_gap_official_mean"].to_numpy()
    alphas = ", ".join(f"{a:g}" for a in sweep_summary.index)

    def trend(values):
        diffs = np.diff(values)
        if (diffs < 0).all():
            return "decreases monotonically"
        if (diffs > 0).all():
            return "increases monotonically"
        return f"is not monotone (Spearman ρ with α_low = {pd.Series(values).rank().corr(pd.Series(range(len(values))).rank()):+.2f})"

    return [
        f"α_low sweep ({alphas}): balanced accuracy {trend(ba)} "
        f"({' → '.join(f'{v:.3f}' for v in ba)}); SGap {trend(gap)} ({' → '.join(f'{v:.3f}' for v in gap)}). "
        "The paper (Alzheimer's data) reports both decreasing as α_low grows."
    ]


# ------------------------------------------------------------------------------------------------
# AutoBalance.
# ------------------------------------------------------------------------------------------------

LONGTAIL_COLUMNS = ("balanced_error", "error", "shift_frequency_spearman", "delta_frequency_spearman", "seconds")
GROUP_COLUMNS = ("group_balanced_error", "worst_group_error", "deo", "error", "seconds")
TRAJECTORY_PANELS = (
    ("AutoBalance: Delta", ("delta",)),
    ("AutoBalance: l", ("shift",)),
    ("AutoBalance: l & Delta", ("delta", "shift")),
    ("AutoBalance: l & Delta, LA init", ("delta", "shift")),
)


def _diverged_note(runs: pd.DataFrame) -> str:
    if "diverged" not in runs.columns:
        return ""
    counts = runs.groupby("method", sort=False)["diverged"].agg(["sum", "count"])
    counts = counts[counts["sum"] > 0]
    if counts.empty:
        return ""
    return "\nDiverged runs (non-finite loss; excluded from the means): " + ", ".join(
        f"{m} {int(r['sum'])}/{int(r['count'])}" for m, r in counts.iterrows()
    ) + ".\n"


def plot_trajectory(trajectory: pd.DataFrame, path: Path, *, title: str, clusters: int = 5,
                    warmup_fraction: float | None = 0.4) -> Path:
    """AutoBalance Fig. 3: learnt Delta (solid) and l (dashed) per frequency cluster over the
    search epochs, averaged over the classes of a cluster and over seeds; one panel per search
    space."""
    panels = [(m, p) for m, p in TRAJECTORY_PANELS if m in set(trajectory["method"])]
    if not panels:
        panels = [(m, ("delta", "shift")) for m in sorted(set(trajectory["method"]))]
    counts = trajectory.groupby("cls")["class_count"].mean().sort_values(ascending=False)
    order = list(counts.index)  # head first
    size = max(1, math.ceil(len(order) / clusters))
    cluster_of = {cls: i // size for i, cls in enumerate(order)}
    num_clusters = max(cluster_of.values()) + 1
    cmap = plt.get_cmap("viridis")
    colors = [cmap(i / max(1, num_clusters - 1)) for i in range(num_clusters)]
    labels = []
    for c in range(num_clusters):
        members = [k for k in order if cluster_of[k] == c]
        lo, hi = int(counts[members].min()), int(counts[members].max())
        where = "head" if c == 0 else "tail" if c == num_clusters - 1 else f"cluster {c + 1}"
        labels.append(f"{where}: classes {','.join(map(str, members))} (n={lo}–{hi})" if lo != hi else
                      f"{where}: classes {','.join(map(str, members))} (n={lo})")
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.2 * rows), squeeze=False, sharex=True)
    frame = trajectory.assign(cluster=trajectory["cls"].map(cluster_of))
    last_epoch = int(frame["epoch"].max())
    for ax, (method, params) in zip(axes.ravel(), panels):
        rows_m = frame[frame["method"] == method]
        mean = rows_m.groupby(["cluster", "epoch"])[["shift", "delta"]].mean()
        for c in range(num_clusters):
            if c not in mean.index.get_level_values(0):
                continue
            series = mean.loc[c]
            if "delta" in params:
                ax.plot(series.index, series["delta"], "-", color=colors[c], lw=2)
            if "shift" in params:
                ax.plot(series.index, series["shift"], "--", color=colors[c], lw=2)
        if warmup_fraction:
            ax.axvline(round(warmup_fraction * last_epoch), color="gray", ls=":", lw=1)
        ax.set_title(method.replace("AutoBalance: ", "search space: "))
        ax.set_xlabel("search epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel({("delta",): "Δ = σ(d) (unitless)", ("shift",): "l (logit units)"}.get(params, "Δ (solid), l (dashed)"))
        ax.grid(True, alpha=0.3)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[c], lw=2, label=labels[c]) for c in range(num_clusters)]
    handles += [plt.Line2D([], [], color="black", lw=2, ls="-", label="Δ (solid)"),
                plt.Line2D([], [], color="black", lw=2, ls="--", label="l (dashed)")]
    if warmup_fraction:
        handles.append(plt.Line2D([], [], color="gray", ls=":", label="end of warm-up (upper level starts)"))
    fig.legend(handles=handles, loc="lower center", ncol=2, bbox_to_anchor=(0.5, -0.02 - 0.03 * math.ceil(len(handles) / 2)))
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _rank_claims_longtail(summary: pd.DataFrame, dataset: str) -> list[str]:
    out = []
    if "balanced_error_mean" not in summary.columns:
        return out
    finite = summary["balanced_error_mean"].dropna()
    if finite.empty:
        return out
    best = finite.idxmin()
    out.append(f"{dataset}: lowest balanced error {best} ({finite[best]:.2f} %); paper (CIFAR10-LT): CDT (20.73 %), "
               "AutoBalance l & Delta, LA init second (21.15 %).")
    autobalance_rows = [m for m in finite.index if m.startswith("AutoBalance")]
    if autobalance_rows:
        ours = min(autobalance_rows, key=lambda m: finite[m])
        for baseline in ("CE", "LA (tau=1)", "CDT"):
            if baseline in finite.index:
                beats = finite[ours] < finite[baseline]
                paper_beats = PAPER_AUTOBALANCE_LONGTAIL[ours]["balanced_error"] < PAPER_AUTOBALANCE_LONGTAIL[baseline]["balanced_error"]
                out.append(f"{dataset}: best AutoBalance row ({ours}, {finite[ours]:.2f}) beats {baseline} ({finite[baseline]:.2f}): "
                           f"{'yes' if beats else 'no'} (paper, same rows: {'yes' if paper_beats else 'no'}).")
    for column, name in (("shift_frequency_spearman", "l"), ("delta_frequency_spearman", "Delta")):
        key = f"{column}_mean"
        if key in summary.columns:
            values = summary[key].dropna()
            if len(values):
                out.append(f"{dataset}: Spearman correlation of the learnt {name} with the class frequency (Fig. 3 claim: "
                           f"ordered by frequency, ±1): " + ", ".join(f"{m} {v:+.2f}" for m, v in values.items()) + ".")
    return out


def build_autobalance_longtail(results: Mapping[str, tuple[pd.DataFrame, pd.DataFrame | None]], *, out_dir: Path,
                               fig_dir: Path, docs_dir: Path, prefix: str) -> Built:
    """One table per dataset (paper column: CIFAR10-LT) and a Fig. 3 trajectory plot per dataset."""
    md, tables, figures, comparisons = [], [], [], []
    for dataset, (runs, trajectory) in results.items():
        columns = [c for c in LONGTAIL_COLUMNS if c in runs.columns]
        summary = _summary(runs, columns, order=list(PAPER_AUTOBALANCE_LONGTAIL))
        table = relabel_paper(common.markdown_table(summary, columns, paper=PAPER_AUTOBALANCE_LONGTAIL, digits=2), "CIFAR10-LT")
        tables += write_table(out_dir, f"{prefix}_{dataset}_table", summary, table)
        seeds = sorted(set(runs["seed"]))
        md += [f"\n#### {dataset} (balanced test split; errors in %; seeds {', '.join(map(str, seeds))})\n\n", table,
               _diverged_note(runs)]
        comparisons += _rank_claims_longtail(summary, dataset)
        if trajectory is not None and len(trajectory):
            figure = plot_trajectory(trajectory, fig_dir / f"{prefix}_{dataset}_trajectory.png",
                                     title=f"AutoBalance Fig. 3: learnt l and Δ per class cluster ({dataset})")
            figures.append(figure)
            md.append(f"\n![l and Delta per class cluster over epochs, {dataset}]({link(figure, docs_dir)})\n")
    md.insert(0, "The paper's numbers are for CIFAR10-LT (ResNet-32 on images); ours are tabular stand-ins, so the "
                 "`(paper, CIFAR10-LT)` column is for the ordering of the rows, not the values. The Spearman columns "
                 "correlate the learnt per-class l / Delta with the class frequency (+1: larger for frequent classes).\n")
    return Built("".join(md), tables, figures, comparisons)


def weighted_error(runs: pd.DataFrame, proportions: np.ndarray) -> pd.Series:
    """The paper's standard error E(f) = sum_{y,g} pi_{y,g} E_{y,g}(f), with the training
    (class, group) proportions ``proportions [K, G]``, from the ``error_<k>_<g>`` columns (%)."""
    proportions = np.asarray(proportions, float)
    proportions = proportions / proportions.sum()
    total = pd.Series(0.0, index=runs.index)
    for k in range(proportions.shape[0]):
        for g in range(proportions.shape[1]):
            total = total + proportions[k, g] * runs[f"error_{k}_{g}"].astype(float)
    return total


def plot_pareto(points: pd.DataFrame, path: Path, *, title: str) -> Path:
    """AutoBalance Fig. 5: group-balanced error (left) and DEO (right) against the standard
    error, one curve per training-loss family (one point per lambda, mean over seeds).

    Far outliers in standard error (degenerate losses, e.g. CE_deo blends that predict one class;
    beyond Q3 + 3 IQR) would squash the other points: the x axis stops after the others and the
    outliers are drawn at its right edge as ">" markers labelled with lambda and their true
    standard error."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
    series = sorted(dict.fromkeys(points["series"]), key=lambda name: name.startswith("AutoBalance"))
    colors = dict(zip(series, _color_cycle(len(series))))
    markers = dict(zip(series, "osD^vx*"))
    mean = points.groupby(["series", "lambda"]).agg(
        std_error=("standard_error", "mean"), gbal=("group_balanced_error", "mean"), deo=("deo", "mean"),
        worst=("worst_group_error", "mean"), runs=("seed", "count"),
    ).reset_index()  # fmt: skip
    x = mean["std_error"].to_numpy(float)
    q1, q3 = np.nanpercentile(x, [25, 75])
    span = x[x <= q3 + 3 * max(q3 - q1, 1.0)]  # far outliers (degenerate losses) go to the edge
    right = float(span.max()) + 0.15 * max(float(span.max() - span.min()), 1.0)
    clipped = False
    for ax, column, label in ((axes[0], "gbal", "group-balanced error E_bal^G (%)"), (axes[1], "deo", "DEO, eq. 4.1 (%, 0–200)")):
        for name in series:
            rows = mean[mean["series"] == name].sort_values("lambda")
            if rows.empty:
                continue
            bold = name.startswith("AutoBalance")
            inside, outside = rows[rows["std_error"] <= right], rows[rows["std_error"] > right]
            ax.plot(inside["std_error"], inside[column], "-" + markers[name], color=colors[name], lw=2.8 if bold else 1.5,
                    ms=8 if bold else 6, label=name, alpha=0.9, zorder=3 if bold else 2)
            for _, r in inside.iterrows():
                ax.annotate(f"{r['lambda']:g}", (r["std_error"], r[column]), textcoords="offset points", xytext=(4, 3),
                            fontsize=7, color=colors[name])
            for _, r in outside.iterrows():
                clipped = True
                ax.plot([right], [r[column]], ">", color=colors[name], ms=8, mfc="none", clip_on=False)
                ax.annotate(f"λ={r['lambda']:g}: E={r['std_error']:.0f}", (right, r[column]), textcoords="offset points",
                            xytext=(-6, 5), ha="right", fontsize=7, color=colors[name])
        ax.set_xlim(right=right)
        ax.set_xlabel("standard error E(f) (%, training-proportion weighted)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("group-balanced error vs standard error")
    axes[1].set_title("DEO vs standard error")
    handles, labels = axes[0].get_legend_handles_labels()
    if clipped:
        handles.append(plt.Line2D([], [], marker=">", ls="none", mfc="none", color="gray",
                                  label="beyond the axis: λ and its standard error E"))
    fig.legend(handles=handles, loc="lower center", ncol=2, bbox_to_anchor=(0.5, -0.13))
    fig.suptitle(title + " (numbers next to points: λ)")
    fig.tight_layout()
    return save_figure(fig, path)


def _pareto_dominance(mean: pd.DataFrame) -> list[str]:
    """For every AutoBalance point: is it dominated (both lower standard error and lower metric)
    by a baseline point? The paper's claim: AutoBalance Pareto-dominates the baselines."""
    out = []
    ours = mean[mean["series"].str.startswith("AutoBalance")]
    others = mean[~mean["series"].str.startswith("AutoBalance")]
    if ours.empty or others.empty:
        return out
    for column, name in (("group_balanced_error", "group-balanced error"), ("deo", "DEO")):
        dominated = []
        for _, point in ours.iterrows():
            better = others[(others["standard_error"] <= point["standard_error"]) & (others[column] <= point[column])]
            if len(better):
                dominated.append(f"λ={point['lambda']:g}")
        out.append(
            f"Fig. 5 ({name} vs standard error): {len(ours) - len(dominated)} of {len(ours)} AutoBalance points are not "
            f"dominated by any baseline point" + (f" (dominated: {', '.join(dominated)})" if dominated else "")
            + "; the paper reports AutoBalance Pareto-dominating the baselines."
        )
        beaten = 0
        for _, point in others.iterrows():
            if len(ours[(ours["standard_error"] <= point["standard_error"]) & (ours[column] <= point[column])]):
                beaten += 1
        out.append(f"Fig. 5 ({name}): {beaten} of {len(others)} baseline points (λ = 0 included) are dominated by an "
                   "AutoBalance point.")
    return out


def _group_claims(summary: pd.DataFrame, dataset: str) -> list[str]:
    """Which row is lowest on each metric; for DEO also among the rows that are not (nearly)
    constant predictors (worst-group error >= 99 %), since a constant predictor has DEO 0."""
    out = []
    if "worst_group_error_mean" not in summary.columns:
        return out
    worst = summary["worst_group_error_mean"]
    for column, name in (("group_balanced_error", "group-balanced error"), ("worst_group_error", "worst-group error"), ("deo", "DEO")):
        key = f"{column}_mean"
        values = summary[key].dropna() if key in summary.columns else pd.Series(dtype=float)
        if values.empty:
            continue
        best = values.idxmin()
        text = f"{dataset}: lowest {name} {best} ({values[best]:.2f})"
        if column == "deo" and worst.get(best, 0) >= 99:
            text += f" — a (nearly) constant predictor, worst-group error {worst[best]:.1f}"
            useful = values[worst.reindex(values.index) < 99]
            if len(useful):
                text += f"; lowest among the others: {useful.idxmin()} ({useful.min():.2f})"
        out.append(text + "; paper (Waterbirds): AutoBalance lowest on every metric.")
    return out


def build_autobalance_groups(results: Mapping[str, pd.DataFrame], pareto: pd.DataFrame | None, *, out_dir: Path,
                             fig_dir: Path, docs_dir: Path, prefix: str,
                             proportions: np.ndarray | None = None) -> Built:
    """Table 3 per dataset (paper columns on Waterbirds-like) and, with ``pareto`` (rows with
    ``series``, ``lambda``, ``seed``, ``error_<k>_<g>``, ``group_balanced_error``, ``deo``), the
    Fig. 5 Pareto fronts and their table."""
    md, tables, figures, comparisons = [], [], [], []
    for dataset, runs in results.items():
        columns = [c for c in GROUP_COLUMNS if c in runs.columns]
        paper = PAPER_AUTOBALANCE_GROUPS if dataset == "waterbirds_like" else None
        summary = _summary(runs, columns, order=list(PAPER_AUTOBALANCE_GROUPS))
        table = common.markdown_table(summary, columns, paper=paper, digits=2)
        if paper:
            table = relabel_paper(table, "Waterbirds")
        tables += write_table(out_dir, f"{prefix}_{dataset}_table", summary, table)
        seeds = sorted(set(runs["seed"]))
        md += [f"\n#### {dataset} (errors and DEO in %; seeds {', '.join(map(str, seeds))})\n\n", table, _diverged_note(runs)]
        if paper:
            for method in ("AutoBalance: lambda_val=0.1", "Group DRO", "CE_bal^G"):
                for column, name in (("group_balanced_error", "group-balanced error"), ("worst_group_error", "worst-group error"), ("deo", "DEO")):
                    mean, std, n = _value(summary, method, column)
                    if n:
                        comparisons.append(compare(f"{dataset} {method}", name, mean, std, paper[method][column],
                                                   higher_is_better=False, digits=2, runs=n))
        comparisons += _group_claims(summary, dataset)
    if pareto is not None and len(pareto):
        points = pareto[pareto.get("diverged", 0) != 1].copy() if "diverged" in pareto.columns else pareto.copy()
        if proportions is None:
            from fairopt.data import WATERBIRDS_CELL_PROPORTIONS as proportions  # noqa: N811
        points["standard_error"] = weighted_error(points, proportions)
        figure = plot_pareto(points, fig_dir / f"{prefix}_pareto.png",
                             title="AutoBalance Fig. 5: (1 − λ) CE + λ L_reg vs AutoBalance, waterbirds_like test")
        figures.append(figure)
        mean = points.groupby(["series", "lambda"], sort=False).agg(
            standard_error=("standard_error", "mean"), group_balanced_error=("group_balanced_error", "mean"),
            worst_group_error=("worst_group_error", "mean"), deo=("deo", "mean"), runs=("seed", "count"),
        ).reset_index()  # fmt: skip
        pareto_table = ["| series | λ | standard error | group-balanced error | worst-group error | DEO | runs |",
                        "|---|---|---|---|---|---|---|"]
        for _, r in mean.iterrows():
            pareto_table.append(f"| {r['series']} | {r['lambda']:g} | {r['standard_error']:.2f} | {r['group_balanced_error']:.2f} | "
                                f"{r['worst_group_error']:.2f} | {r['deo']:.2f} | {int(r['runs'])} |")
        pareto_md = "\n".join(pareto_table) + "\n"
        tables += write_table(out_dir, f"{prefix}_pareto_table", mean.set_index(["series", "lambda"]), pareto_md)
        diverged = ""
        if "diverged" in pareto.columns and pareto["diverged"].eq(1).any():
            counts = pareto[pareto["diverged"] == 1].groupby(["series", "lambda"]).size()
            diverged = "\nDiverged (excluded): " + ", ".join(f"{s} λ={lam:g} ({n} runs)" for (s, lam), n in counts.items()) + ".\n"
        md += [
            "\n#### Pareto fronts (Fig. 5), waterbirds_like\n\n"
            "Baselines train with (1 − λ) CE + λ L_reg; AutoBalance searches the loss with the validation objective "
            "(1 − λ_val) CE + λ_val CE_deo for the same λ values. The standard error weights the four test cells by "
            "the training proportions (.73/.038/.012/.22), as the paper defines E(f); means over seeds.\n\n",
            pareto_md, diverged,
            f"\n![fairness-accuracy Pareto fronts]({link(figure, docs_dir)})\n",
        ]
        comparisons += _pareto_dominance(mean)
    return Built("".join(md), tables, figures, comparisons)


# ------------------------------------------------------------------------------------------------
# FairALM.
# ------------------------------------------------------------------------------------------------

FAIRALM_ORDER = ("unconstrained", "l2_penalty", "reweighting", "lagrangian", "fairalm", "group_dro")
FAIRALM_LABELS = {"unconstrained": "unconstrained", "l2_penalty": "ℓ2 penalty", "reweighting": "re-weighting",
                  "lagrangian": "Lagrangian", "fairalm": "FairALM", "group_dro": "group DRO"}


def plot_profile(profile: pd.DataFrame, path: Path, *, title: str) -> Path:
    """FairALM Fig. 2 (left) / Fig. 5: test DEO and test error per epoch, mean ± std over seeds.

    The error panel starts at epoch 1 when the untrained model's error (epoch 0) lies outside the
    trained epochs' range (it would squash their differences); its value is given in the title."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    methods = [m for m in FAIRALM_ORDER if m in set(profile["method"])] + sorted(set(profile["method"]) - set(FAIRALM_ORDER))
    colors = dict(zip(methods, _color_cycle(len(methods))))
    trained = profile[profile["epoch"] > 0]
    start = float(profile.loc[profile["epoch"] == 0, "error"].mean()) if (profile["epoch"] == 0).any() else float("nan")
    skip_start = trained["epoch"].nunique() >= 2 and np.isfinite(start) and not (trained["error"].min() <= start <= trained["error"].max())
    error_title = f"error per epoch (epoch 0: {start:.2f}, not shown)" if skip_start else "error per epoch"
    for ax, column, label in ((axes[0], "deo_gap", "test DEO |TPR_0 − TPR_1|"), (axes[1], "error", "test error, 1 − accuracy (fraction)")):
        frame = trained if (column == "error" and skip_start) else profile
        for method in methods:
            rows = frame[frame["method"] == method]
            stats = rows.groupby("epoch")[column].agg(["mean", lambda s: s.std(ddof=0)])
            stats.columns = ["mean", "std"]
            eta = rows["eta"].dropna().unique() if "eta" in rows.columns else []
            name = FAIRALM_LABELS.get(method, method) + (f" (η={eta[0]:g})" if len(eta) else "")
            ax.plot(stats.index, stats["mean"], "-o", ms=3, color=colors[method], label=name)
            ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], color=colors[method], alpha=0.15)
        ax.set_xlabel("epoch (0: initialisation)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("DEO per epoch (lower is fairer)")
    axes[1].set_title(error_title)
    axes[0].legend(loc="best")
    seeds = profile["seed"].nunique()
    fig.suptitle(f"{title} (mean ± std over {seeds} seeds)" if seeds > 1 else f"{title} (1 seed)")
    fig.tight_layout()
    return save_figure(fig, path)


def build_fairalm(runs: pd.DataFrame, profile: pd.DataFrame | None, *, dataset: str, out_dir: Path, fig_dir: Path,
                  docs_dir: Path, prefix: str, config: Mapping | None = None, table_epochs: int | None = None) -> Built:
    fnr = [c for c in runs.columns if c.startswith("fnr_")]
    columns = [c for c in ("accuracy", "deo_gap", *fnr, "dp_gap", "eo_gap", "seconds") if c in runs.columns]
    paper = PAPER_FAIRALM_CELEBA if dataset == "celeba_attributes" else None
    summary = _summary(runs, columns, order=FAIRALM_ORDER)
    table = common.markdown_table(summary, columns, paper=paper)
    if paper:
        table = relabel_paper(table, "ResNet-18 on images")
    tables = write_table(out_dir, f"{prefix}_table", summary, table)
    seeds = sorted(set(runs["seed"]))
    md = [f"Test split, mean ± std over seeds {', '.join(map(str, seeds))}; DEO = |TPR_0 − TPR_1|.\n"]
    if config and config.get("eta_per_method"):
        md.append("η per method (validation rule of `experiments/fairalm.py`, seed "
                  f"{seeds[0]}): " + ", ".join(f"{m}={v:g}" for m, v in config["eta_per_method"].items()) + ".\n")
    md += ["\n", table]
    comparisons = []
    if {"unconstrained", "fairalm"} <= set(summary.index):
        base_acc, _, _ = _value(summary, "unconstrained", "accuracy")
        base_deo, _, _ = _value(summary, "unconstrained", "deo_gap")
        acc, _, _ = _value(summary, "fairalm", "accuracy")
        deo, _, _ = _value(summary, "fairalm", "deo_gap")
        cut = 1 - deo / base_deo if base_deo > 0 else float("nan")
        comparisons.append(f"{dataset}: FairALM vs unconstrained: DEO {base_deo:.3f} → {deo:.3f} (cut by {cut * 100:.1f} %), "
                           f"accuracy {base_acc:.3f} → {acc:.3f} ({(acc - base_acc) * 100:+.2f} points); the project's "
                           f"target (≥ 70 % cut, ≤ 2 points lost): {'met' if cut >= 0.7 and acc - base_acc >= -0.02 else 'not met'}.")
    if "fairalm" in summary.index and "deo_gap_mean" in summary.columns:
        best = summary["deo_gap_mean"].idxmin()
        comparisons.append(f"{dataset}: lowest DEO {FAIRALM_LABELS.get(best, best)} ({summary.loc[best, 'deo_gap_mean']:.3f}); "
                           "the paper reports FairALM lowest.")
    if paper:
        for column, name, higher in (("accuracy", "accuracy", True), ("deo_gap", "DEO", False)):
            mean, std, n = _value(summary, "fairalm", column)
            if n:
                comparisons.append(compare(f"{dataset} FairALM", name, mean, std, paper["fairalm"][column],
                                           higher_is_better=higher, runs=n) + " (paper: ResNet-18 on images)")
    figures = []
    if profile is not None and len(profile):
        profile = profile.copy()
        profile["error"] = 1 - profile["accuracy"]
        figure = plot_profile(profile, fig_dir / f"{prefix}_profile.png", title=f"FairALM training profile on {dataset}")
        figures.append(figure)
        epochs = int(profile["epoch"].max())
        md.append(f"\n![FairALM training profile]({link(figure, docs_dir)})\n\n*Training profile*: test DEO and test error "
                  f"after every epoch ({epochs} epochs, same η, seeds, splits and model as the table).\n")
        profile_summary = profile.groupby(["method", "epoch"])[["accuracy", "deo_gap"]].agg(["mean", _std0])
        lines = ["| method | epoch | test accuracy | test DEO |", "|---|---|---|---|"]
        for (method, epoch), r in profile_summary.iterrows():
            lines.append(f"| {method} | {epoch} | {r[('accuracy', 'mean')]:.4f} ± {np.nan_to_num(r[('accuracy', 'std')]):.4f} | "
                         f"{r[('deo_gap', 'mean')]:.4f} ± {np.nan_to_num(r[('deo_gap', 'std')]):.4f} |")
        tables += write_table(out_dir, f"{prefix}_profile_table", profile_summary, "\n".join(lines) + "\n")
        comparisons += _profile_claims(profile, runs, table_epochs)
    return Built("".join(md), tables, figures, comparisons)


def _std0(values: pd.Series) -> float:
    """Standard deviation with ddof 0, like every table of the project."""
    return float(np.std(values.to_numpy(float)))


_std0.__name__ = "std"


def _profile_claims(profile: pd.DataFrame, runs: pd.DataFrame, table_epochs: int | None) -> list[str]:
    out = []
    mean = profile.groupby(["method", "epoch"])[["deo_gap", "error"]].mean()
    for method in profile["method"].unique():
        series = mean.loc[method]["deo_gap"]
        trained = series[series.index > 0]
        if len(trained) >= 2:
            out.append(f"Profile, {FAIRALM_LABELS.get(method, method)}: test DEO from epoch 1 to {int(trained.index.max())}: "
                       f"{trained.iloc[0]:.3f} → {trained.iloc[-1]:.3f} (min {trained.min():.3f}, max {trained.max():.3f}; "
                       f"epoch-to-epoch std {trained.std(ddof=0):.3f}).")
    if table_epochs and table_epochs in set(profile["epoch"]):
        at = profile[profile["epoch"] == table_epochs].set_index(["method", "seed"])["accuracy"]
        table = runs.set_index(["method", "seed"])["accuracy"]
        common_index = at.index.intersection(table.index)
        if len(common_index):
            gap = float(np.max(np.abs(at.loc[common_index].to_numpy() - table.loc[common_index].to_numpy())))
            out.append(f"Consistency: at epoch {table_epochs} the profile runs reproduce the table's test accuracy "
                       f"(max |difference| {gap:.4f} over {len(common_index)} runs).")
    return out


# ------------------------------------------------------------------------------------------------
# docs/results.md: one section per suite between markers, assembled in suite order.
# ------------------------------------------------------------------------------------------------

BEGIN = "<!-- reproduce:begin {suite} -->"
END = "<!-- reproduce:end {suite} -->"
_SECTION = re.compile(r"<!-- reproduce:begin (\w+) -->\n(.*?)<!-- reproduce:end \1 -->\n?", re.S)


def _front_claims(name: str, payload: Mapping) -> list[str]:
    """The issue-15 "must show" checks of one front, as sentences generated from its JSON."""
    config, claims = payload["config"], []
    dataset, constraint = config["flags"]["dataset"], config["flags"]["constraint"]
    points = pd.DataFrame(config["points"])
    references = pd.DataFrame(config["references"])
    lr = references[references["method"] == "reference_sklearn_lr"]
    unconstrained_accuracy, unconstrained_gap = lr["accuracy"].mean(), lr["gap"].mean()
    majority = lr["majority_accuracy"].mean()
    ours = points[points["method"].str.startswith("fairopt_")]
    hv = {h["method"]: h for h in config["hypervolume"]}
    if "fairlearn_eg" in hv and len(ours):
        best = max((h for m, h in hv.items() if m.startswith("fairopt_")), key=lambda h: h["hypervolume"])
        eg = hv["fairlearn_eg"]
        paired = (f"; per seed {best['hypervolume_seed_mean']:.5f} ± {best['hypervolume_seed_std']:.5f} vs "
                  f"{eg['hypervolume_seed_mean']:.5f} ± {eg['hypervolume_seed_std']:.5f}, paired difference "
                  f"{best.get('paired_difference_vs_eg_mean', float('nan')):+.5f} ± {best.get('paired_difference_vs_eg_std', float('nan')):.5f}")
        claims.append(f"{name}: largest fairopt hypervolume {best['method']} {best['hypervolume']:.5f} vs "
                      f"ExponentiatedGradient {eg['hypervolume']:.5f} ({'larger' if best['hypervolume'] > eg['hypervolume'] else 'NOT larger'}){paired}.")
    if config.get("eg_dominance"):
        unmatched = [d["point"] for d in config["eg_dominance"] if not d["matched_by"]]
        claims.append(f"{name}: every ExponentiatedGradient point matched by a fairopt point at least as accurate and at most as "
                      f"unfair (within one seed-std): {'yes' if not unmatched else 'NO, unmatched ' + ', '.join(unmatched)}.")
    if len(ours):
        good = ours[(ours["gap_mean"] <= 0.02) & (ours["accuracy_mean"] >= unconstrained_accuracy - 0.02)]
        claims.append(f"{name}: fairopt points with test gap <= .02 and accuracy at most 2 points below the unconstrained "
                      f"LogisticRegression ({unconstrained_accuracy:.4f}): "
                      + (", ".join(f"{r.method} {r.point} ({r.accuracy_mean:.4f}, {r.gap_mean:.4f})" for r in good.itertuples())
                         if len(good) else "none") + ".")
        runs = pd.DataFrame(payload["runs"])
        fairalm = runs[runs["method"] == "fairopt_fairalm"]
        if len(fairalm):
            per_setting = fairalm.groupby("setting")["accuracy"].mean()
            midpoint = (majority + unconstrained_accuracy) / 2
            front = ours[ours["method"] == "fairopt_fairalm"]
            tightest = front.loc[front["gap_mean"].idxmin()] if len(front) else None
            claims.append(f"{name}: FairALM accuracy above the midpoint {midpoint:.4f} of majority-class and unconstrained "
                          f"accuracy at every grid setting (every eta and tolerance): "
                          f"{'yes' if (per_setting > midpoint).all() else 'NO'} (lowest {per_setting.min():.4f})"
                          + (f"; its most constrained front point has gap {tightest['gap_mean']:.4f} vs unconstrained "
                             f"{unconstrained_gap:.4f} ({'at least halved' if tightest['gap_mean'] <= unconstrained_gap / 2 else 'NOT halved'})"
                             if tightest is not None else "") + ".")
    eg_seconds = config.get("eg_seconds_per_point")
    if eg_seconds == eg_seconds and eg_seconds is not None and len(ours):
        slowest = ours.groupby("method")["seconds_mean"].mean()
        claims.append(f"{name}: seconds per front point (training only, same run): ExponentiatedGradient {eg_seconds:.2f}, "
                      + ", ".join(f"{m} {v:.3f} ({eg_seconds / v:.0f}x less)" for m, v in slowest.items()) + ".")
    return claims


def build_fairness_fronts(results: Mapping[str, tuple[Mapping, str, Path]], *, fig_dir: Path, docs_dir: Path,
                          prefix: str) -> Built:
    """One subsection per front: its figure (copied into the docs' figures), the benchmark's
    tables (its Markdown without the title) and the must-show checks as comparisons."""
    body, figures, comparisons = [], [], []
    for name, (payload, markdown, png) in results.items():
        figure = common.atomic_write_bytes(Path(fig_dir) / f"{prefix}_{name}.png", Path(png).read_bytes())
        figures.append(figure)
        tables = markdown.split("\n", 1)[1] if markdown.startswith("# ") else markdown
        tables = re.sub(r"^## ", "##### ", tables, flags=re.M)
        body += [f"#### {name}", "", f"![{name}]({link(figure, docs_dir)})", "", tables.strip(), ""]
        comparisons += _front_claims(name, payload)
    return Built("\n".join(body), [], figures, comparisons)


def read_sections(text: str) -> dict[str, str]:
    """The sections of a generated docs file, ``{suite: body}`` (body without the markers)."""
    return {m.group(1): m.group(2) for m in _SECTION.finditer(text)}


def assemble_docs(sections: Mapping[str, str], *, header: str) -> str:
    """``header`` then every present section in :data:`SUITES` order, each between markers."""
    parts = [header.rstrip() + "\n"]
    missing = [s for s in SUITES if s not in sections and s not in OWN_FILE_SUITES]
    for suite in SUITES:
        if suite in sections:
            parts.append("\n" + BEGIN.format(suite=suite) + "\n" + sections[suite].rstrip() + "\n" + END.format(suite=suite) + "\n")
    if missing:
        parts.append("\nSuites not run yet: " + ", ".join(f"`{s}`" for s in missing) + ".\n")
    return "".join(parts)


def docs_header(sections: Iterable[str]) -> str:
    present = [s for s in SUITES if s in set(sections)]
    lines = [
        "# Reproduction report",
        "",
        "Generated by `experiments/reproduce.py` from real runs; do not edit by hand (rerun the command of a "
        "section to regenerate it; the other sections are kept). Every section gives its exact command, date, "
        "machine, seeds and epochs, the tables with the papers' numbers in adjacent `(paper)` columns where "
        "the paper reports them, the figures, generated comparison sentences and hand-written notes on known "
        "deviations. Longer discussions: [FACIMS](results_facims.md), [AutoBalance](results_autobalance.md), "
        "[FairALM](results_fairalm.md).",
        "",
        "Regenerate everything: `make reproduce` (= `python -m experiments.reproduce --suite=all`); one suite: "
        "`python -m experiments.reproduce --suite=<name> --overwrite`.",
        "",
    ]
    if present:
        lines.append("Sections: " + ", ".join(f"[{SUITE_TITLES[s]}](#{_anchor(SUITE_TITLES[s])})" for s in present) + ".")
    return "\n".join(lines) + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", title.lower())
    return text.replace(" ", "-")


def section_markdown(*, suite: str, command: str, date: str, machine: Mapping[str, str], settings: Sequence[str],
                     steps: Sequence[str], body: str, comparisons: Sequence[str], notes: Sequence[str],
                     wall_seconds: float | None = None, load_end: str | None = None, shortened: bool = False,
                     experiment_seconds: float | None = None,
                     comparison_title: str = "Comparison with the paper (generated from the numbers)",
                     notes_title: str = "Notes (hand-written: known deviations)") -> str:
    """The Markdown of one suite's section (between the markers); ``shortened``: a run with
    fewer epochs than the protocol (a smoke run), flagged at the top."""
    lines = [f"## {SUITE_TITLES[suite]}", ""]
    if shortened:
        lines += ["**Epochs changed from the defaults (--epochs / --epochs_scale, e.g. a smoke run): the numbers below test the pipeline, "
                  "they are not a reproduction.**", ""]
    lines += [
        f"* Command: `{command}`",
        f"* Date: {date}" + (f"; wall time of this invocation: {wall_seconds / 60:.1f} min" if wall_seconds is not None else "")
        + (f"; the experiments' own run times add up to {experiment_seconds / 60:.1f} min (reused ones included, see below)"
           if experiment_seconds is not None else ""),
        f"* Machine: {machine['cpu']}, {machine['cores']} cores, {machine['jax']}, Python {machine['python']}, {machine['os']}; "
        f"load average at the start {machine['load']}" + (f", at the end {load_end}" if load_end else "")
        + " (the machine is shared, so wall times are upper bounds)",
    ]
    lines += [f"* {s}" for s in settings]
    lines += ["", "Experiments (exact commands; each writes its results files under the folder named in `--output_dir`):",
              "", "```bash", *steps, "```", "", "### Results", "", body.rstrip(), "", f"### {comparison_title}", ""]
    lines += [f"* {c}" for c in comparisons] or ["* (no paper numbers for this suite)"]
    lines += ["", f"### {notes_title}", ""]
    lines += [f"* {n}" for n in notes]
    return "\n".join(lines) + "\n"
