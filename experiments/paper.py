"""The papers' reported numbers and protocol constants, defined once (no plotting imports, so
the entry points can use them without the ``plot`` extra). ``experiments.report`` and the entry
points read them from here."""

from fairopt import data

PAPER_SEEDS = (0, 42, 666, 777, 1009)  # FACIMS Table 2's five repeats; the official code's seeds

# FACIMS (Tarzanagh et al., UAI 2023) Table 2, credit-card rows: (mean, std) of balanced
# accuracy, DP, EO (our deo_gap: the official code's mean over groups of |TPR - TPR_g|), SGap
# (the official estimator: our sufficiency_gap_official) and the recall of each class.
_FACIMS_COLUMNS = ("balanced_accuracy", "dp_gap", "deo_gap", "sufficiency_gap_official", "recall_0", "recall_1")
_FACIMS_CREDIT_ROWS = {
    "facims": ((0.6799, 0.0374), (0.0593, 0.0070), (0.1567, 0.0230), (0.1264, 0.0145), (0.8136, 0.0054), (0.5462, 0.0017)),
    "facims_i": ((0.6768, 0.0040), (0.0750, 0.0105), (0.1951, 0.0524), (0.1396, 0.0081), (0.8081, 0.0114), (0.5455, 0.0098)),
    "facims_ii": ((0.6446, 0.0163), (0.0707, 0.0073), (0.1973, 0.0358), (0.1340, 0.0147), (0.8002, 0.0374), (0.4890, 0.0270)),
    "fams": ((0.6542, 0.0098), (0.0746, 0.0066), (0.1859, 0.0368), (0.1352, 0.0106), (0.8194, 0.0374), (0.4890, 0.0270)),
    "erm": ((0.6104, 0.0111), (0.0599, 0.0173), (0.1577, 0.0175), (0.2760, 0.0710), (0.9919, 0.0233), (0.2289, 0.0820)),
    "berm": ((0.6570, 0.0106), (0.1060, 0.0125), (0.1631, 0.0304), (0.2315, 0.0623), (0.8717, 0.0191), (0.4423, 0.0146)),
}
PAPER_FACIMS_CREDIT = {m: {c: v[0] for c, v in zip(_FACIMS_COLUMNS, row)} for m, row in _FACIMS_CREDIT_ROWS.items()}
PAPER_FACIMS_CREDIT_STD = {m: {c: v[1] for c, v in zip(_FACIMS_COLUMNS, row)} for m, row in _FACIMS_CREDIT_ROWS.items()}

# Whose class counts set FACIMS's v_bar / balanced loss and BERM's weights (``--class_counts_from``);
# the first is the default, chosen on validation (docs/facims_ablation.md, second pass).
CLASS_COUNT_SOURCES = ("original", "resampled")


def prepare(dataset: data.Dataset, seed: int, samples_per_group: int, *,
            fixed_split: bool = False) -> tuple[data.Splits, data.Dataset]:
    """Paper protocol: label-stratified split, train-only standardisation, per-group resampling.

    ``fixed_split``: the official code's split, one for every seed (``data.facims_split(fixed=True)``;
    the seed then varies the resampling and the training only). Returns the splits (train
    resampled) and the training split before resampling (whose group counts set the
    frequency-scaled SAM radii; ``--class_counts_from`` says whose class counts set the losses)."""
    splits = data.standardize(data.facims_split(dataset, seed=seed, fixed=fixed_split))
    original_train = splits.train
    if samples_per_group:
        splits = splits._replace(train=data.resample_per_group(original_train, samples_per_group, seed=seed))
    return splits, original_train


def hold_out_selection(val: data.Dataset, fraction: float, seed: int) -> tuple[data.Dataset, data.Dataset]:
    """``(upper, selection)``: the validation rows the FACIMS upper level trains on and the
    ``fraction`` held out from it (stratified by (class, group) cell), on which a FACIMS run's
    round is chosen and its validation metrics are honest. ``fraction`` 0: both are ``val``."""
    if not fraction:
        return val, val
    upper, selection, _ = data.split(val, (1.0 - fraction, fraction, 0.0), seed=seed, stratify="label_group",
                                     empty_groups="ignore")
    return upper, selection
