"""Tests of fairopt.losses: closed forms, numpy hand computations, sklearn cross-checks,
invariances, NaN-freedom on empty cells, jit == no-jit, and error messages."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import balanced_accuracy_score, log_loss

from fairopt import losses

K, G, B = 3, 2, 12


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, K)).astype(np.float32) * 2
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 0, 1], np.int32)
    groups = np.array([0, 0, 0, 1, 1, 1, 0, 1, 0, 1, 1, 0], np.int32)
    return logits, labels, groups


# ------------------------------------------------------------------------------------------------
# Per-example losses.
# ------------------------------------------------------------------------------------------------


def test_cross_entropy_matches_numpy_and_sklearn(batch):
    logits, labels, _ = batch
    loss = losses.cross_entropy(logits, labels)
    chex.assert_shape(loss, (B,))
    expected = -np_log_softmax(logits.astype(np.float64))[np.arange(B), labels]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    probs = np.exp(np_log_softmax(logits.astype(np.float64)))
    np.testing.assert_allclose(jnp.mean(loss), log_loss(labels, probs, labels=range(K)), rtol=1e-5)


def test_vs_loss_neutral_parameters_reduce_to_cross_entropy(batch):
    logits, labels, groups = batch
    ce = losses.cross_entropy(logits, labels)
    np.testing.assert_allclose(losses.vs_loss(logits, labels), ce, rtol=1e-6)
    per_class = losses.vs_loss(
        logits, labels, weight=np.ones(K), shift=np.zeros(K), scale=np.ones(K)
    )
    per_cell = losses.vs_loss(
        logits, labels, weight=np.ones((K, G)), shift=np.zeros((K, G)), scale=np.ones((K, G)), groups=groups
    )
    np.testing.assert_allclose(per_class, ce, rtol=1e-6)
    np.testing.assert_allclose(per_cell, ce, rtol=1e-6)


def test_vs_loss_matches_hand_computation_per_class(batch):
    logits, labels, _ = batch
    weight = np.array([0.5, 2.0, 3.0], np.float32)
    shift = np.array([0.1, -0.7, 1.3], np.float32)
    scale = np.array([0.9, 0.4, 1.7], np.float32)
    z = logits.astype(np.float64) * scale + shift
    expected = -weight[labels] * np_log_softmax(z)[np.arange(B), labels]
    got = losses.vs_loss(logits, labels, weight=weight, shift=shift, scale=scale)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_vs_loss_matches_hand_computation_per_class_and_group(batch):
    """AutoBalance eq. 4.2: every parameter indexed by the example's group."""
    logits, labels, groups = batch
    rng = np.random.default_rng(1)
    weight = rng.uniform(0.2, 2.0, size=(K, G)).astype(np.float32)
    shift = rng.normal(size=(K, G)).astype(np.float32)
    scale = rng.uniform(0.1, 1.5, size=(K, G)).astype(np.float32)
    expected = np.empty(B)
    for i in range(B):
        y, g = labels[i], groups[i]
        z = logits[i].astype(np.float64) * scale[:, g] + shift[:, g]
        expected[i] = -weight[y, g] * (z[y] - np.log(np.exp(z).sum()))
    got = losses.vs_loss(logits, labels, weight=weight, shift=shift, scale=scale, groups=groups)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_class_and_cell_parameters_agree_when_constant_over_groups(batch):
    logits, labels, groups = batch
    weight, shift, scale = np.array([1.0, 2.0, 0.5]), np.array([0.3, -0.2, 0.0]), np.array([0.7, 1.0, 0.2])
    per_class = losses.vs_loss(logits, labels, weight=weight, shift=shift, scale=scale)
    tile = lambda v: np.repeat(v[:, None], G, axis=1)  # noqa: E731
    per_cell = losses.vs_loss(
        logits, labels, weight=tile(weight), shift=tile(shift), scale=tile(scale), groups=groups
    )
    np.testing.assert_allclose(per_cell, per_class, rtol=1e-6)


def test_fixed_losses_reduce_to_cross_entropy_at_neutral_settings(batch):
    logits, labels, groups = batch
    counts = np.array([50, 10, 2])
    ce = losses.cross_entropy(logits, labels)
    np.testing.assert_allclose(losses.logit_adjusted_loss(logits, labels, counts, tau=0.0), ce, rtol=1e-6)
    np.testing.assert_allclose(losses.cdt_loss(logits, labels, counts, gamma=0.0), ce, rtol=1e-6)
    np.testing.assert_allclose(losses.kini_vs_loss(logits, labels, counts, gamma=0.0, tau=0.0), ce, rtol=1e-6)
    np.testing.assert_allclose(losses.ldam_loss(logits, labels, counts, max_margin=0.0, scale=1.0), ce, rtol=1e-6)
    # LA of a uniform prior is a constant shift: CE.
    np.testing.assert_allclose(losses.logit_adjusted_loss(logits, labels, np.ones(K), tau=1.0), ce, rtol=1e-5)
    # Group-LA with tau = 0 and equal group sizes: weights 1, shift 0.
    equal_groups = np.array([[3, 3], [2, 2], [1, 1]])
    np.testing.assert_allclose(
        losses.group_logit_adjusted_loss(logits, labels, groups, equal_groups, tau=0.0), ce, rtol=1e-6
    )
    np.testing.assert_allclose(losses.drw_weights(counts, beta=0.0), np.ones(K), rtol=1e-6)
    np.testing.assert_allclose(losses.inverse_frequency_weights(np.full(K, 7)), np.ones(K), rtol=1e-6)


def test_logit_adjustment_cdt_and_kini_vs_match_numpy(batch):
    logits, labels, _ = batch
    counts = np.array([60.0, 30.0, 10.0])
    pi = counts / counts.sum()
    tau, gamma = 1.5, 0.25
    np.testing.assert_allclose(losses.logit_adjustment(counts, tau), tau * np.log(pi), rtol=1e-6)
    np.testing.assert_allclose(losses.cdt_scale(counts, gamma), (counts / 60.0) ** gamma, rtol=1e-6)
    z64 = logits.astype(np.float64)
    la = -np_log_softmax(z64 + tau * np.log(pi))[np.arange(B), labels]
    cdt = -np_log_softmax(z64 * (counts / 60.0) ** gamma)[np.arange(B), labels]
    vs = -np_log_softmax(z64 * (counts / 60.0) ** gamma + tau * np.log(pi))[np.arange(B), labels]
    np.testing.assert_allclose(losses.logit_adjusted_loss(logits, labels, pi, tau), la, rtol=1e-5)
    np.testing.assert_allclose(losses.cdt_loss(logits, labels, counts, gamma), cdt, rtol=1e-5)
    np.testing.assert_allclose(losses.kini_vs_loss(logits, labels, counts, gamma, tau), vs, rtol=1e-5)


def test_ldam_margins_closed_form_and_loss_matches_numpy(batch):
    logits, labels, _ = batch
    counts = np.array([256.0, 16.0, 1.0])  # n^{-1/4} = 1/4, 1/2, 1  -> scaled to max 0.5
    margins = losses.ldam_margins(counts, max_margin=0.5)
    np.testing.assert_allclose(margins, [0.125, 0.25, 0.5], rtol=1e-6)
    z = logits.astype(np.float64).copy()
    z[np.arange(B), labels] -= margins[labels]
    weights = np.array([0.2, 1.0, 1.8])
    expected = -weights[labels] * np_log_softmax(30.0 * z)[np.arange(B), labels]
    got = losses.ldam_loss(logits, labels, counts, class_weights=weights)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_drw_weights_closed_form_and_limits():
    counts = np.array([1000.0, 100.0, 10.0])
    beta = 0.999
    raw = (1 - beta) / (1 - beta ** counts)
    np.testing.assert_allclose(losses.drw_weights(counts, beta), raw * 3 / raw.sum(), rtol=1e-5)
    np.testing.assert_allclose(np.sum(losses.drw_weights(counts)), 3.0, rtol=1e-5)
    # beta -> 1: effective number -> n, weights -> ∝ 1/n.
    inverse = (1 / counts) * 3 / np.sum(1 / counts)
    np.testing.assert_allclose(losses.drw_weights(counts, beta=1 - 1e-9), inverse, rtol=1e-4)


def test_deferred_weights_switch_with_traced_epoch_without_recompiling():
    weights = np.array([0.5, 1.0, 1.5], np.float32)
    traces = []

    @jax.jit
    def at_epoch(epoch):
        traces.append(None)
        return losses.deferred_weights(weights, epoch, 3)

    for epoch in range(6):
        expected = weights if epoch >= 3 else np.ones(3)
        np.testing.assert_allclose(at_epoch(jnp.asarray(epoch)), expected)
    assert len(traces) == 1


def test_group_logit_adjustment_params_closed_form():
    cells = np.array([[30.0, 5.0], [10.0, 15.0], [0.0, 20.0]])  # group sizes 40, 40 (after floor 41, 40)
    weight, shift = losses.group_logit_adjustment_params(cells, tau=2.0)
    floored = np.maximum(cells, 1)
    n_g = floored.sum(0)
    w_g = (1 / n_g) / np.mean(1 / n_g)
    np.testing.assert_allclose(weight, np.broadcast_to(w_g, cells.shape), rtol=1e-6)
    np.testing.assert_allclose(shift, 2.0 * np.log(floored / n_g), rtol=1e-6)
    assert np.all(np.isfinite(shift))


def test_cell_balanced_weights_closed_form():
    cells = np.array([[10.0, 0.0], [5.0, 20.0]])
    inverse = np.array([1 / 10, 1 / 5, 1 / 20])
    inverse /= inverse.mean()
    expected = np.array([[inverse[0], 1.0], [inverse[1], inverse[2]]])
    np.testing.assert_allclose(losses.cell_balanced_weights(cells), expected, rtol=1e-6)


def test_gradients_finite_wrt_logits_and_hyperparameters(batch):
    logits, labels, groups = batch
    logits = logits * 500.0  # extreme scores
    params = dict(
        weight=jnp.full((K, G), 1.3), shift=jnp.zeros((K, G)) + 0.2, scale=jnp.full((K, G), 0.7)
    )

    def total(logits, params):
        return jnp.sum(losses.vs_loss(logits, labels, groups=groups, **params))

    grad_logits, grad_params = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(logits), params)
    for leaf in [grad_logits, *jax.tree_util.tree_leaves(grad_params)]:
        assert np.all(np.isfinite(leaf))
    assert np.any(np.asarray(grad_params["shift"]) != 0)
    counts = np.array([100, 10, 1])
    for name in ("ldam", "la", "vs", "cdt"):
        fn = losses.make_loss(name, counts)
        grad = jax.jit(jax.grad(lambda f: jnp.sum(fn(f, labels, groups, 0))))(jnp.asarray(logits))
        assert np.all(np.isfinite(grad)), name


def test_key_losses_same_jitted_and_not(batch):
    logits, labels, groups = batch
    kwargs = dict(weight=np.full((K, G), 2.0), shift=np.ones((K, G)), scale=np.full((K, G), 0.5))
    eager = losses.vs_loss(logits, labels, groups=groups, **kwargs)
    jitted = jax.jit(lambda f, y, g: losses.vs_loss(f, y, groups=g, **kwargs))(logits, labels, groups)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    counts, cells = np.array([40, 20, 5]), np.array([[20, 20], [5, 15], [1, 4]])
    for name in losses.LOSS_NAMES:
        options = {"drw_start_epoch": 1} if "drw" in name else {}
        fn = losses.make_loss(name, counts, cell_counts=cells, **options)
        np.testing.assert_allclose(
            jax.jit(fn)(logits, labels, groups, 2), fn(logits, labels, groups, 2), rtol=1e-5, atol=1e-5, err_msg=name
        )


def test_non_finite_logits_give_nan_loss_not_a_silent_zero(batch):
    """The clip of float rounding below 0 must not hide a diverged model."""
    logits, labels, _ = batch
    logits = logits.copy()
    logits[0, 0] = np.nan
    assert np.isnan(np.asarray(losses.cross_entropy(logits, labels))[0])
    assert np.isnan(np.asarray(losses.vs_loss(logits, labels, shift=np.zeros(K)))[0])


# ------------------------------------------------------------------------------------------------
# make_loss.
# ------------------------------------------------------------------------------------------------


def test_make_loss_plugs_into_erm_solver_with_traced_epoch():
    """fairopt.solvers.erm calls loss_fn(logits, y, groups, epoch) with a traced epoch."""
    erm = pytest.importorskip("fairopt.solvers.erm")
    train = pytest.importorskip("fairopt.train")
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, K, size=16), jnp.int32)
    groups = jnp.asarray(rng.integers(0, G, size=16), jnp.int32)
    batch = train.Batch(x, y, groups, jnp.ones(16, bool))
    apply_fn = lambda params, x: x @ params  # noqa: E731
    loss_fn = losses.make_loss("ldam_drw", np.array([40, 20, 5]), drw_start_epoch=1)
    solver = erm.erm(apply_fn, loss_fn, optax.sgd(0.01), steps_per_epoch=1)
    state = solver.init(jax.random.key(0), jnp.zeros((4, K)))
    step = jax.jit(solver.step)
    for _ in range(3):  # epochs 0, 1, 2: weights switch on at 1 without retracing issues
        state, metrics = step(state, batch)
        assert np.isfinite(metrics["loss"])
    expected = losses.ldam_loss(apply_fn(state.params, x), y, np.array([40, 20, 5]),
                                class_weights=losses.drw_weights(np.array([40, 20, 5])))
    np.testing.assert_allclose(loss_fn(apply_fn(state.params, x), y, groups, 3), expected, rtol=1e-6)



def test_make_loss_builds_each_baseline(batch):
    logits, labels, groups = batch
    counts, cells = np.array([40, 20, 5]), np.array([[20, 20], [5, 15], [1, 4]])
    ce = losses.cross_entropy(logits, labels)
    np.testing.assert_allclose(losses.make_loss("ce", counts)(logits, labels, groups, 0), ce, rtol=1e-6)
    bal = (1 / counts) / np.mean(1 / counts)
    np.testing.assert_allclose(
        losses.make_loss("weighted_ce", counts)(logits, labels, groups, 0), bal[labels] * ce, rtol=1e-5
    )
    np.testing.assert_allclose(
        losses.make_loss("la", counts, tau=0.5)(logits, labels, groups, 0),
        losses.logit_adjusted_loss(logits, labels, counts, 0.5),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        losses.make_loss("vs", counts, gamma=0.1, tau=2.0)(logits, labels),
        losses.kini_vs_loss(logits, labels, counts, 0.1, 2.0),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        losses.make_loss("group_la", counts, cell_counts=cells)(logits, labels, groups, 0),
        losses.group_logit_adjusted_loss(logits, labels, groups, cells),
        rtol=1e-6,
    )
    cell_w = losses.cell_balanced_weights(cells)
    np.testing.assert_allclose(
        losses.make_loss("group_balanced_ce", counts, cell_counts=cells, num_groups=G)(logits, labels, groups, 0),
        cell_w[labels, groups] * ce,
        rtol=1e-5,
    )


def test_make_loss_drw_switches_at_start_epoch(batch):
    logits, labels, groups = batch
    counts = np.array([40, 20, 5])
    ce = np.asarray(losses.cross_entropy(logits, labels))
    drw = losses.make_loss("drw", counts, drw_start_epoch=2, beta=0.99)
    weights = losses.drw_weights(counts, 0.99)
    np.testing.assert_allclose(drw(logits, labels, groups, 1), ce, rtol=1e-6)
    np.testing.assert_allclose(drw(logits, labels, groups, 2), weights[labels] * ce, rtol=1e-5)
    ldam_drw = losses.make_loss("ldam_drw", counts, drw_start_epoch=2)
    np.testing.assert_allclose(ldam_drw(logits, labels, groups, 0), losses.ldam_loss(logits, labels, counts), rtol=1e-6)
    np.testing.assert_allclose(
        ldam_drw(logits, labels, groups, jnp.asarray(5)),
        losses.ldam_loss(logits, labels, counts, class_weights=losses.drw_weights(counts)),
        rtol=1e-6,
    )


def test_make_loss_errors():
    counts = np.array([40, 20, 5])
    with pytest.raises(ValueError, match="unknown loss 'focal'.*'ce'"):
        losses.make_loss("focal", counts)
    with pytest.raises(TypeError, match="unexpected options \\['gamma'\\]"):
        losses.make_loss("la", counts, gamma=0.3)
    with pytest.raises(ValueError, match="needs cell_counts"):
        losses.make_loss("group_la", counts)
    with pytest.raises(ValueError, match="drw_start_epoch"):
        losses.make_loss("ldam_drw", counts)
    with pytest.raises(ValueError, match="non-negative"):
        losses.make_loss("ce", np.array([3, -1, 2]))
    with pytest.raises(ValueError, match="positive"):
        losses.make_loss("la", np.array([3, 0, 2]))
    with pytest.raises(ValueError, match="num_groups=3"):
        losses.make_loss("group_la", counts, cell_counts=np.ones((3, 2)), num_groups=3)
    with pytest.raises(ValueError, match="K=3"):
        losses.make_loss("ce", counts)(np.zeros((4, 2), np.float32), np.zeros(4, np.int32))


# ------------------------------------------------------------------------------------------------
# Bad input at the boundary.
# ------------------------------------------------------------------------------------------------


def test_vs_loss_input_errors(batch):
    logits, labels, groups = batch
    with pytest.raises(ValueError, match="logits must have shape \\[B, K\\]"):
        losses.vs_loss(logits[0], labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        losses.vs_loss(logits, labels[:-1])
    with pytest.raises(TypeError, match="labels must be integer"):
        losses.vs_loss(logits, labels.astype(np.float32))
    with pytest.raises(ValueError, match="labels must lie in \\[0, 3\\)"):
        losses.vs_loss(logits, np.full(B, 3, np.int32))
    with pytest.raises(ValueError, match="shift per class must have shape \\[K\\]"):
        losses.vs_loss(logits, labels, shift=np.zeros(K + 1))
    with pytest.raises(ValueError, match="pass groups="):
        losses.vs_loss(logits, labels, weight=np.ones((K, G)))
    with pytest.raises(ValueError, match="groups must lie in \\[0, 2\\)"):
        losses.vs_loss(logits, labels, scale=np.ones((K, G)), groups=np.full(B, 2, np.int32))
    with pytest.raises(ValueError, match="\\[K\\] \\(per class\\) or \\[K, G\\]"):
        losses.vs_loss(logits, labels, scale=np.ones((K, G, 1)), groups=groups)
    # Shape errors are also raised under jit (shapes are static).
    with pytest.raises(ValueError, match="shift per class"):
        jax.jit(lambda f, y: losses.vs_loss(f, y, shift=jnp.zeros(K + 1)))(logits, labels)


def test_reduction_input_errors(batch):
    logits, labels, groups = batch
    per_example = losses.cross_entropy(logits, labels)
    with pytest.raises(ValueError, match="per_example must be a loss vector"):
        losses.balanced_mean(per_example[:, None], labels, K)
    with pytest.raises(ValueError, match="mask must have shape"):
        losses.balanced_mean(per_example, labels, K, mask=np.ones(B + 1, bool))
    with pytest.raises(TypeError, match="num_classes must be a Python int"):
        losses.balanced_mean(per_example, labels, 3.0)
    with pytest.raises(ValueError, match="reduce must be one of"):
        losses.deo_objective(per_example, labels, groups, K, G, reduce="median")
    with pytest.raises(ValueError, match="unknown validation objective 'auc'"):
        losses.validation_objective("auc", per_example, labels, groups, num_classes=K, num_groups=G)
    with pytest.raises(ValueError, match="needs lambda_val"):
        losses.validation_objective("blend", per_example, labels, groups, num_classes=K, num_groups=G)
    with pytest.raises(ValueError, match="needs groups"):
        losses.validation_objective("deo", per_example, labels, None, num_classes=K, num_groups=G)


# ------------------------------------------------------------------------------------------------
# Validation objectives.
# ------------------------------------------------------------------------------------------------

# A small hand-checkable case: K = 2 classes, G = 2 groups.
HAND_LOSSES = np.array([1.0, 3.0, 2.0, 4.0, 10.0, 6.0, 100.0], np.float32)
HAND_LABELS = np.array([0, 0, 0, 1, 1, 1, 1], np.int32)
HAND_GROUPS = np.array([0, 0, 1, 0, 1, 1, 1], np.int32)
HAND_MASK = np.array([1, 1, 1, 1, 1, 1, 0], bool)  # the 100 is a padded row


def test_balanced_and_group_balanced_means_hand_computed():
    # class 0: (1+3+2)/3 = 2 ; class 1: (4+10+6)/3 = 20/3
    expected_bal = (2.0 + 20.0 / 3.0) / 2
    got = losses.balanced_mean(HAND_LOSSES, HAND_LABELS, 2, mask=HAND_MASK)
    np.testing.assert_allclose(got, expected_bal, rtol=1e-6)
    # cells: (0,0): 2, (0,1): 2, (1,0): 4, (1,1): 8
    got = losses.group_balanced_mean(HAND_LOSSES, HAND_LABELS, HAND_GROUPS, 2, 2, mask=HAND_MASK)
    np.testing.assert_allclose(got, (2 + 2 + 4 + 8) / 4, rtol=1e-6)
    # A float 0/1 mask is accepted and equivalent.
    got = losses.balanced_mean(HAND_LOSSES, HAND_LABELS, 2, mask=HAND_MASK.astype(np.float32))
    np.testing.assert_allclose(got, expected_bal, rtol=1e-6)


def test_deo_and_blend_hand_computed():
    # eq. 4.1: |2 - 2| + |4 - 8| = 4
    deo = losses.deo_objective(HAND_LOSSES, HAND_LABELS, HAND_GROUPS, 2, 2, mask=HAND_MASK)
    np.testing.assert_allclose(deo, 4.0, rtol=1e-6)
    plain = np.mean(HAND_LOSSES[:6])
    blend = losses.blended_objective(HAND_LOSSES, HAND_LABELS, HAND_GROUPS, 2, 2, 0.25, mask=HAND_MASK)
    np.testing.assert_allclose(blend, 0.75 * plain + 0.25 * 4.0, rtol=1e-6)
    via_selector = losses.validation_objective(
        "blend", HAND_LOSSES, HAND_LABELS, HAND_GROUPS, num_classes=2, num_groups=2, mask=HAND_MASK, lambda_val=0.25
    )
    np.testing.assert_allclose(via_selector, blend, rtol=1e-6)


def test_soft_worst_group_hand_computed_limits_and_gradient():
    # cells (0,0): 2, (0,1): 2, (1,0): 4, (1,1): 8 (the 100 is masked out)
    cells = np.array([2.0, 2.0, 4.0, 8.0])
    args = (HAND_LOSSES, HAND_LABELS, HAND_GROUPS, 2, 2)
    for temperature in (0.5, 2.0):
        expected = temperature * np.log(np.mean(np.exp(cells / temperature)))
        got = losses.soft_worst_group_mean(*args, temperature, mask=HAND_MASK)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    # T -> 0: the worst cell; T -> inf: CE_bal^G; in between, between the two.
    # (T -> 0: max - T log |P| when one cell is the largest)
    np.testing.assert_allclose(losses.soft_worst_group_mean(*args, 1e-3, mask=HAND_MASK), 8.0 - 1e-3 * np.log(4), atol=1e-5)
    np.testing.assert_allclose(losses.soft_worst_group_mean(*args, 1e4, mask=HAND_MASK), 4.0, rtol=1e-3)
    # d/dl_i = softmax(L / T)_{cell(i)} / n_{cell(i)}; traced temperature under jit.
    temperature = 2.0
    weights = np.exp(cells / temperature) / np.exp(cells / temperature).sum()
    cell_of_row = HAND_LABELS * 2 + HAND_GROUPS
    sizes = np.array([2, 1, 1, 2])
    expected = np.where(HAND_MASK, weights[cell_of_row] / sizes[cell_of_row], 0.0)
    objective = losses.make_validation_objective("worst_group_ce", num_classes=2, num_groups=2, temperature=temperature)
    grad = jax.jit(jax.grad(lambda l, t: losses.soft_worst_group_mean(l, *args[1:], t, mask=HAND_MASK)))(
        jnp.asarray(HAND_LOSSES), temperature)
    np.testing.assert_allclose(grad, expected, rtol=1e-5)
    np.testing.assert_allclose(objective(HAND_LOSSES, HAND_LABELS, HAND_GROUPS, HAND_MASK),
                               temperature * np.log(np.mean(np.exp(cells / temperature))), rtol=1e-5)
    with pytest.raises(ValueError, match="temperature > 0"):
        losses.make_validation_objective("worst_group_ce", num_classes=2, num_groups=2, temperature=0.0)
    with pytest.raises(ValueError, match="groups"):
        objective(HAND_LOSSES, HAND_LABELS)


def test_deo_more_than_two_groups_mean_and_max():
    per_example = np.array([1.0, 3.0, 5.0, 2.0, 2.0, 8.0], np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1], np.int32)
    groups = np.array([0, 1, 2, 0, 0, 2], np.int32)  # cell (1, 1) empty
    # class 0: L = 3, gaps |1-3|, |3-3|, |5-3| = 2, 0, 2 ; class 1: L = 4, gaps |2-4|, |8-4| = 2, 4
    mean = losses.deo_objective(per_example, labels, groups, 2, 3, reduce="mean")
    np.testing.assert_allclose(mean, 4 / 3 + 3.0, rtol=1e-6)
    maximum = losses.deo_objective(per_example, labels, groups, 2, 3, reduce="max")
    np.testing.assert_allclose(maximum, 2.0 + 4.0, rtol=1e-6)


def test_blend_with_traced_lambda_and_its_gradient():
    args = (HAND_LOSSES, HAND_LABELS, HAND_GROUPS)
    objective = losses.make_validation_objective("blend", num_classes=2, num_groups=2, lambda_val=0.5)
    blend = jax.jit(
        lambda lam: losses.blended_objective(*args, 2, 2, lam, mask=HAND_MASK)
    )
    np.testing.assert_allclose(blend(0.5), objective(*args, HAND_MASK), rtol=1e-6)
    # d/d lambda [(1 - lambda) CE + lambda DEO] = DEO - CE
    np.testing.assert_allclose(jax.grad(blend)(0.3), 4.0 - np.mean(HAND_LOSSES[:6]), rtol=1e-5)
    with pytest.raises(ValueError, match="lambda_val must lie in \\[0, 1\\]"):
        losses.make_validation_objective("blend", num_classes=2, num_groups=2, lambda_val=1.5)


def test_objectives_vmap_over_a_leading_group_axis():
    """Solvers vmap validation losses over stacked per-group batches [G, B]."""
    rng = np.random.default_rng(6)
    per_example = rng.uniform(0, 3, size=(3, 9)).astype(np.float32)
    labels = rng.integers(0, 3, size=(3, 9)).astype(np.int32)
    mask = rng.random((3, 9)) < 0.7
    vmapped = jax.vmap(lambda l, y, m: losses.balanced_mean(l, y, 3, mask=m))(per_example, labels, mask)
    looped = [losses.balanced_mean(per_example[i], labels[i], 3, mask=mask[i]) for i in range(3)]
    np.testing.assert_allclose(vmapped, looped, rtol=1e-6)


def test_balanced_mean_of_zero_one_loss_matches_sklearn_balanced_accuracy():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=200).astype(np.int32)
    predictions = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 4, size=200))
    errors = (predictions != labels).astype(np.float32)
    np.testing.assert_allclose(
        losses.balanced_mean(errors, labels, 4), 1 - balanced_accuracy_score(labels, predictions), rtol=1e-5
    )


def test_objectives_nan_free_with_empty_cells_and_padded_nan():
    per_example = np.array([1.0, 2.0, np.nan, np.inf], np.float32)
    labels = np.array([0, 0, 2, 1], np.int32)
    groups = np.array([0, 0, 1, 2], np.int32)
    mask = np.array([1, 1, 0, 0], bool)  # only class 0, group 0 is present
    for name in losses.VALIDATION_OBJECTIVES:
        value = losses.validation_objective(
            name, per_example, labels, groups, num_classes=3, num_groups=3, mask=mask, lambda_val=0.5
        )
        assert np.isfinite(value), name
    np.testing.assert_allclose(losses.balanced_mean(per_example, labels, 3, mask=mask), 1.5)
    np.testing.assert_allclose(losses.deo_objective(per_example, labels, groups, 3, 3, mask=mask), 0.0)


def test_all_empty_objectives_are_zero_with_zero_gradient():
    per_example = jnp.array([1.0, 2.0, 3.0])
    labels = jnp.array([0, 1, 1])
    groups = jnp.array([0, 1, 0])
    mask = jnp.zeros(3, bool)
    for name in losses.VALIDATION_OBJECTIVES:
        objective = losses.make_validation_objective(name, num_classes=2, num_groups=2, lambda_val=0.3)
        value, grad = jax.jit(jax.value_and_grad(lambda l: objective(l, labels, groups, mask)))(per_example)
        assert float(value) == 0.0, name
        np.testing.assert_array_equal(grad, np.zeros(3), err_msg=name)


def test_objective_gradients_hand_computed():
    """d CE_bal / d l_i = 1 / (K_present n_{y_i})."""
    labels = jnp.array([0, 0, 0, 1])
    grad = jax.grad(lambda l: losses.balanced_mean(l, labels, 3))(jnp.ones(4))
    np.testing.assert_allclose(grad, [1 / 6, 1 / 6, 1 / 6, 1 / 2], rtol=1e-6)


def test_objectives_same_jitted_and_not():
    args = (HAND_LOSSES, HAND_LABELS, HAND_GROUPS)
    for name in losses.VALIDATION_OBJECTIVES:
        objective = losses.make_validation_objective(name, num_classes=2, num_groups=2, lambda_val=0.4)
        eager = objective(*args, HAND_MASK)
        jitted = jax.jit(objective)(*args, HAND_MASK)
        np.testing.assert_allclose(jitted, eager, rtol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------------------------
# Group DRO.
# ------------------------------------------------------------------------------------------------


def test_group_mean_losses_with_mask():
    means, counts = losses.group_mean_losses(
        np.array([1.0, 3.0, 5.0, 7.0]), np.array([0, 0, 2, 2]), 3, mask=np.array([1, 1, 1, 0], bool)
    )
    np.testing.assert_allclose(means, [2.0, 0.0, 5.0])
    np.testing.assert_allclose(counts, [2.0, 0.0, 1.0])


def test_group_dro_weights_follow_closed_form():
    eta, adjustment = 0.5, 0.3
    group_counts = np.array([100.0, 25.0, 4.0])
    dro = losses.group_dro(3, step_size=eta, group_counts=group_counts, generalization_adjustment=adjustment)
    state = dro.init()
    np.testing.assert_allclose(state.weights, np.full(3, 1 / 3), rtol=1e-6)
    q = np.full(3, 1 / 3)
    rng = np.random.default_rng(4)
    update = jax.jit(dro.update)
    for _ in range(4):
        group_losses = rng.uniform(0, 2, size=3)
        q = q * np.exp(eta * (group_losses + adjustment / np.sqrt(group_counts)))
        q = q / q.sum()
        state = update(state, jnp.asarray(group_losses, jnp.float32))
        np.testing.assert_allclose(state.weights, q, rtol=1e-5)
        np.testing.assert_allclose(dro.loss(state, group_losses), q @ group_losses, rtol=1e-5)


def test_group_dro_update_and_loss_and_gradient():
    dro = losses.group_dro(2, step_size=1.0)
    per_example = jnp.array([1.0, 3.0, 4.0])
    groups = jnp.array([0, 0, 1])
    loss, state = dro.update_and_loss(dro.init(), per_example, groups)
    q = np.exp([2.0, 4.0]) / np.exp([2.0, 4.0]).sum()  # uniform prior times exp(L_g)
    np.testing.assert_allclose(state.weights, q, rtol=1e-5)
    np.testing.assert_allclose(loss, q @ np.array([2.0, 4.0]), rtol=1e-5)
    # The weights are constants for the model: d loss / d l_i = q_g / n_g.
    grad = jax.grad(lambda l: dro.update_and_loss(dro.init(), l, groups)[0])(per_example)
    np.testing.assert_allclose(grad, [q[0] / 2, q[0] / 2, q[1]], rtol=1e-5)
    # A group absent from the batch keeps its (unnormalised) weight: exponent 0.
    _, state = dro.update_and_loss(dro.init(), per_example[:2], groups[:2])
    np.testing.assert_allclose(state.weights, np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum(), rtol=1e-5)


def test_group_dro_errors():
    with pytest.raises(ValueError, match="needs group_counts"):
        losses.group_dro(3, generalization_adjustment=1.0)
    with pytest.raises(ValueError, match="step_size must be >= 0"):
        losses.group_dro(3, step_size=-1.0)
    with pytest.raises(ValueError, match="expected G=3"):
        losses.group_dro(3, group_counts=np.ones(2), generalization_adjustment=1.0)


# ------------------------------------------------------------------------------------------------
# Property tests.
# ------------------------------------------------------------------------------------------------

PROPERTY_B, PROPERTY_K = 8, 4
_finite_logits = hnp.arrays(
    np.float32, (PROPERTY_B, PROPERTY_K), elements=st.floats(-1e4, 1e4, allow_nan=False, width=32)
)
_labels = hnp.arrays(np.int32, (PROPERTY_B,), elements=st.integers(0, PROPERTY_K - 1))
_positive = hnp.arrays(np.float32, (PROPERTY_K,), elements=st.floats(0.125, 10.0, width=32))


@jax.jit
def _three_losses(logits, labels, weight, scale, shift):
    return jnp.stack([
        losses.cross_entropy(logits, labels),
        losses.vs_loss(logits, labels, weight=weight, scale=scale, shift=-shift),
        losses.ldam_loss(logits, labels, np.array([100, 30, 5, 1])),
    ])


@settings(max_examples=40, deadline=None)
@given(logits=_finite_logits, labels=_labels, weight=_positive, scale=_positive, shift=_positive)
def test_losses_finite_and_non_negative_for_any_finite_logits(logits, labels, weight, scale, shift):
    values = np.asarray(_three_losses(logits, labels, weight, scale, shift))
    assert np.all(np.isfinite(values))
    assert np.all(values >= 0)


@jax.jit
def _balanced_objectives(per_example, labels, groups, mask):
    return jnp.stack([
        losses.make_validation_objective(name, num_classes=3, num_groups=3)(per_example, labels, groups, mask)
        for name in ("balanced_ce", "group_balanced_ce", "deo")
    ])


@settings(max_examples=30, deadline=None)
@given(
    per_example=hnp.arrays(np.float32, (10,), elements=st.floats(0, 50, width=32)),
    labels=hnp.arrays(np.int32, (10,), elements=st.integers(0, 2)),
    groups=hnp.arrays(np.int32, (10,), elements=st.integers(0, 2)),
    mask=hnp.arrays(bool, (10,)),
    permutation=st.permutations(range(3)),
)
def test_balanced_objectives_invariant_to_consistent_class_relabelling(per_example, labels, groups, mask, permutation):
    relabelled = np.asarray(permutation, np.int32)[labels]
    original = _balanced_objectives(per_example, labels, groups, mask)
    permuted = _balanced_objectives(per_example, relabelled, groups, mask)
    assert np.all(np.isfinite(original))
    np.testing.assert_allclose(permuted, original, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, options", [
    ("ce", {}), ("la", dict(tau=1.5)), ("cdt", dict(gamma=0.2)), ("vs", dict(gamma=0.2, tau=0.7)),
    ("group_la", dict(tau=1.3)), ("ldam_drw", dict(max_margin=0.4, scale=3.0, drw_start_epoch=2)),
])
def test_parametric_loss_equals_make_loss_and_is_one_function_for_every_knob(name, options):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    labels, groups = jnp.asarray(rng.integers(0, 4, 16)), jnp.asarray(rng.integers(0, 2, 16))
    counts, cells = np.array([50, 20, 8, 2]), np.array([[40, 10], [5, 15], [6, 2], [1, 1]])
    loss_fn, params = losses.make_parametric_loss(name, counts, cell_counts=cells, **options)
    reference = losses.make_loss(name, counts, cell_counts=cells, **options)
    for epoch in (0, 3):  # before and after DRW switches its weights on
        np.testing.assert_allclose(loss_fn(logits, labels, groups, epoch, params), reference(logits, labels, groups, epoch),
                                   rtol=1e-6)
    other_fn, _ = losses.make_parametric_loss(name, counts[::-1].copy(), cell_counts=cells, **options)
    assert other_fn is loss_fn  # other counts / knobs: other numbers, the same code (one compiled program)


def test_parametric_loss_rejects_a_loss_without_a_parametric_form_and_unknown_options():
    with pytest.raises(ValueError, match="no parametric form of 'weighted_ce'"):
        losses.make_parametric_loss("weighted_ce", [3, 1])
    with pytest.raises(TypeError, match="unexpected options \\['gamma'\\]"):
        losses.make_parametric_loss("la", [3, 1], gamma=0.3)
