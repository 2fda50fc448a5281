"""The reproduction report: tables, figures and docs sections from synthetic results files
(no training), and the command line's refusals (subprocesses, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments import report

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _check_png(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 5_000, path
    assert path.read_bytes()[:8] == PNG


def _facims_runs(rng, methods=report.FACIMS_METHODS, seeds=(0, 42)) -> pd.DataFrame:
    rows = []
    for method in methods:
        for seed in seeds:
            rows.append(dict(method=method, seed=seed, balanced_accuracy=rng.uniform(0.55, 0.7), accuracy=rng.uniform(0.7, 0.8),
                             dp_gap=rng.uniform(0, 0.1), deo_gap=rng.uniform(0, 0.2), eo_gap=rng.uniform(0, 0.1),
                             sufficiency_gap_official=rng.uniform(0.1, 0.2), sufficiency_gap=rng.uniform(0.08, 0.12),
                             recall_0=rng.uniform(0.7, 0.9), recall_1=rng.uniform(0.3, 0.6), seconds=rng.uniform(1, 100)))
    return pd.DataFrame(rows)


def test_facims_tables_and_figures(tmp_path):
    rng = np.random.default_rng(0)
    runs = _facims_runs(rng)
    sweep = pd.concat([_facims_runs(rng, ("facims",)).assign(alpha_low=a) for a in (0.01, 0.1, 0.7, 1.0)])
    built = report.build_facims(runs, dataset="credit", out_dir=tmp_path / "out", fig_dir=tmp_path / "docs" / "figures",
                                docs_dir=tmp_path / "docs", sweep=sweep, prefix="facims_credit")
    for column in ("balanced_accuracy", "dp_gap", "deo_gap", "sufficiency_gap_official", "recall_0"):
        assert f"| {column} (paper) |" in built.markdown
    assert "| 0.6799 |" in built.markdown  # FACIMS's paper balanced accuracy, next to ours
    assert "(figures/facims_credit_ba_vs_sgap.png)" in built.markdown
    assert "(figures/facims_credit_alpha_low.png)" in built.markdown
    assert [p.name for p in built.figures] == ["facims_credit_ba_vs_sgap.png", "facims_credit_alpha_low.png"]
    for figure in built.figures:
        _check_png(figure)
    table = (tmp_path / "out" / "facims_credit_table.md").read_text()
    assert "balanced_accuracy (paper)" in table and (tmp_path / "out" / "facims_credit_table.csv").exists()
    assert any(c.startswith("FACIMS balanced accuracy") and "vs paper 0.680" in c for c in built.comparisons)
    assert any(c.startswith("α_low sweep") for c in built.comparisons)


def test_facims_without_paper_numbers_has_no_paper_columns(tmp_path):
    runs = _facims_runs(np.random.default_rng(1), ("facims", "erm", "berm"))
    built = report.build_facims(runs, dataset="drug", out_dir=tmp_path, fig_dir=tmp_path, docs_dir=tmp_path, prefix="facims_drug")
    assert "(paper" not in built.markdown
    _check_png(built.figures[0])


def test_autobalance_longtail_and_trajectory(tmp_path):
    rng = np.random.default_rng(2)
    runs = pd.DataFrame([dict(method=m, seed=s, balanced_error=rng.uniform(20, 30), error=rng.uniform(20, 30), seconds=1.0,
                              diverged=0, shift_frequency_spearman=0.9, delta_frequency_spearman=0.8)
                         for m in report.PAPER_AUTOBALANCE_LONGTAIL for s in (0, 1)])
    counts = [1200, 700, 400, 250, 150, 90, 50, 30, 20, 12]
    trajectory = pd.DataFrame([dict(method=m, seed=s, epoch=e, cls=k, group=-1, class_count=counts[k], weight=1.0,
                                    shift=-0.1 * e * k / 10, delta=0.73 - 0.01 * e * k / 10, radius=0.0)
                               for m, _ in report.TRAJECTORY_PANELS for s in (0, 1) for e in range(6) for k in range(10)])
    built = report.build_autobalance_longtail({"synthetic_lt": (runs, trajectory)}, out_dir=tmp_path / "out",
                                              fig_dir=tmp_path / "figures", docs_dir=tmp_path, prefix="autobalance_longtail")
    assert "| balanced_error (paper, CIFAR10-LT) |" in built.markdown and "| 30.45 |" in built.markdown
    _check_png(built.figures[0])
    assert built.figures[0].name == "autobalance_longtail_synthetic_lt_trajectory.png"


def _group_rows(rng, names, seeds=(0, 1), **extra):
    rows = []
    for name in names:
        for seed in seeds:
            cells = {f"error_{k}_{g}": rng.uniform(5, 40) for k in range(2) for g in range(2)}
            rows.append(dict(method=name, seed=seed, diverged=0, group_balanced_error=np.mean(list(cells.values())),
                             worst_group_error=max(cells.values()), deo=rng.uniform(0, 60), error=rng.uniform(10, 30),
                             seconds=1.0, **cells, **extra))
    return rows


def test_autobalance_groups_and_pareto(tmp_path):
    rng = np.random.default_rng(3)
    runs = pd.DataFrame(_group_rows(rng, report.PAPER_AUTOBALANCE_GROUPS))
    pareto = []
    for series in ("(1−λ) CE + λ CE_deo", "(1−λ) CE + λ Group-LA", "AutoBalance, val. (1−λ) CE + λ CE_deo"):
        for lam in (0.1, 0.5, 0.9):
            pareto += [dict(r, series=series, **{"lambda": lam}) for r in _group_rows(rng, ["x"])]
    pareto.append(dict(series="(1−λ) CE + λ CE_deo", seed=2, diverged=1, **{"lambda": 0.9}))
    built = report.build_autobalance_groups({"waterbirds_like": runs}, pd.DataFrame(pareto), out_dir=tmp_path / "out",
                                            fig_dir=tmp_path / "figures", docs_dir=tmp_path, prefix="autobalance_groups")
    for column in ("group_balanced_error", "worst_group_error", "deo"):
        assert f"| {column} (paper, Waterbirds) |" in built.markdown
    assert "Diverged (excluded)" in built.markdown
    assert [p.name for p in built.figures] == ["autobalance_groups_pareto.png"]
    _check_png(built.figures[0])
    assert any(c.startswith("Fig. 5") for c in built.comparisons)


def test_weighted_error_uses_the_training_proportions():
    frame = pd.DataFrame([{"error_0_0": 10.0, "error_0_1": 0.0, "error_1_0": 0.0, "error_1_1": 20.0}])
    value = report.weighted_error(frame, np.array([[0.5, 0.0], [0.0, 0.5]]))
    assert value.iloc[0] == pytest.approx(15.0)


def test_fairalm_table_and_profile(tmp_path):
    rng = np.random.default_rng(4)
    methods = ("unconstrained", "l2_penalty", "lagrangian", "fairalm")
    runs = pd.DataFrame([dict(method=m, seed=s, eta=0.1, seconds=1.0, accuracy=rng.uniform(0.7, 0.8), deo_gap=rng.uniform(0, 0.4),
                              dp_gap=0.1, eo_gap=0.1, **{"fnr_not Male": 0.1, "fnr_Male": 0.2}) for m in methods for s in (0, 1)])
    profile = pd.DataFrame([dict(method=m, seed=s, epoch=e, eta=0.1, accuracy=rng.uniform(0.7, 0.8), deo_gap=rng.uniform(0, 0.4))
                            for m in methods for s in (0, 1) for e in range(4)])
    built = report.build_fairalm(runs, profile, dataset="celeba_attributes", out_dir=tmp_path / "out", fig_dir=tmp_path / "figures",
                                 docs_dir=tmp_path, prefix="fairalm_celeba", config={"eta_per_method": {"fairalm": 0.1}},
                                 table_epochs=2)
    assert "| accuracy (paper, ResNet-18 on images) |" in built.markdown and "| 0.7550 |" in built.markdown
    _check_png(built.figures[0])
    assert any("FairALM vs unconstrained" in c for c in built.comparisons)
    assert any(c.startswith("Consistency: at epoch 2") for c in built.comparisons)


def test_docs_sections_are_replaced_one_at_a_time():
    machine = dict(cpu="cpu", cores="2", load="0 0 0", jax="jax", python="3", os="linux")

    def section(suite, text):
        return report.section_markdown(suite=suite, command="cmd", date="today", machine=machine, settings=["s"], steps=["x"],
                                       body=text, comparisons=["c"], notes=["n"])

    first = {"fairalm_adult": section("fairalm_adult", "ADULT v1"), "facims_credit": section("facims_credit", "CREDIT v1")}
    text = report.assemble_docs(first, header=report.docs_header(first))
    assert text.index("CREDIT v1") < text.index("ADULT v1")  # suite order, not insertion order
    sections = report.read_sections(text)
    assert set(sections) == {"facims_credit", "fairalm_adult"}
    sections["fairalm_adult"] = section("fairalm_adult", "ADULT v2")
    text = report.assemble_docs(sections, header=report.docs_header(sections))
    assert "ADULT v2" in text and "ADULT v1" not in text and "CREDIT v1" in text
    assert "Suites not run yet" in text and "`facims_drug`" in text


def _run(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "experiments.reproduce", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--suite=everything"], "suite"),
        (["--suite=facims_drug", "--drug_path=/nonexistent/drug.csv"], "drug_consumption.csv"),
        (["--suite=facims_credit", "--seeds=0,x"], "--seeds must be integers"),
    ],
)
def test_bad_flags_give_a_usage_message_without_traceback(args, message, tmp_path):
    completed = _run(*args, f"--output_dir={tmp_path / 'out'}", f"--docs={tmp_path / 'docs' / 'results.md'}")
    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr
    assert message in completed.stderr
    assert not (tmp_path / "out").exists()


def test_refuses_to_replace_an_existing_section_without_overwrite(tmp_path):
    docs = tmp_path / "docs" / "results.md"
    docs.parent.mkdir()
    docs.write_text("# old\n\n<!-- reproduce:begin fairalm_adult -->\nold section\n<!-- reproduce:end fairalm_adult -->\n")
    completed = _run("--suite=fairalm_adult", f"--output_dir={tmp_path / 'out'}", f"--docs={docs}")
    assert completed.returncode != 0 and "Traceback" not in completed.stderr
    assert "--overwrite" in completed.stderr
    assert "old section" in docs.read_text() and not (tmp_path / "out").exists()


def _front_payload(dataset: str, constraint: str) -> dict:
    """A benchmarks.fairness_fronts JSON in miniature: two fairopt points, one EG point."""
    points = [
        dict(method="fairopt_fairalm", point="val gap <= 0.01: a", setting="a", accuracy_mean=0.83, accuracy_std=0.002,
             gap_mean=0.008, gap_std=0.002, seconds_mean=1.0, val_accuracy_mean=0.83, val_gap_mean=0.009),
        dict(method="fairopt_fairalm", point="val gap <= 0.1: b", setting="b", accuracy_mean=0.845, accuracy_std=0.002,
             gap_mean=0.09, gap_std=0.01, seconds_mean=1.0, val_accuracy_mean=0.845, val_gap_mean=0.09),
        dict(method="fairlearn_eg", point="eps=0.01", setting="eps=0.01", accuracy_mean=0.829, accuracy_std=0.003,
             gap_mean=0.009, gap_std=0.002, seconds_mean=40.0, val_accuracy_mean=0.83, val_gap_mean=0.01),
    ]
    runs = [dict(method="fairopt_fairalm", seed=s, setting=k, accuracy=a) for s in (0, 1) for k, a in (("a", 0.83), ("b", 0.845))]
    references = [dict(method="reference_sklearn_lr", seed=s, accuracy=0.849, gap=0.18, majority_accuracy=0.75) for s in (0, 1)]
    hv = [dict(method="fairopt_fairalm", hypervolume=0.016, hypervolume_seed_mean=0.016, hypervolume_seed_std=0.001,
               paired_difference_vs_eg_mean=0.001, paired_difference_vs_eg_std=0.0005),
          dict(method="fairlearn_eg", hypervolume=0.0135, hypervolume_seed_mean=0.0135, hypervolume_seed_std=0.001)]
    config = dict(flags=dict(dataset=dataset, constraint=constraint), points=points, references=references, hypervolume=hv,
                  eg_dominance=[dict(point="eps=0.01", accuracy=0.829, gap=0.009, matched_by="fairopt_fairalm a")],
                  eg_seconds_per_point=40.0)
    return dict(config=config, runs=runs, summary=[])


def test_fairness_fronts_section_states_the_must_show_checks(tmp_path):
    png = tmp_path / "front.png"
    png.write_bytes(PNG + b"0" * 6000)
    results = {"adult_dp": (_front_payload("adult", "dp"), "# title\n\n## Points\n\n| a |\n", png)}
    built = report.build_fairness_fronts(results, fig_dir=tmp_path / "docs" / "figures", docs_dir=tmp_path / "docs",
                                         prefix="fairness_fronts")
    _check_png(built.figures[0])
    assert "##### Points" in built.markdown and "# title" not in built.markdown
    claims = " ".join(built.comparisons)
    assert "fairopt_fairalm 0.01600 vs ExponentiatedGradient 0.01350 (larger)" in claims
    assert "within one seed-std): yes" in claims
    assert "(40x less)" in claims
    # midpoint (0.75 + 0.849) / 2 = 0.7995 < every FairALM setting; tightest gap .008 <= .18 / 2
    assert "every eta and tolerance): yes" in claims and "at least halved" in claims
