"""Tests of fairopt.hparams: cluster dictionaries, parameter expansion, initialisations,
search spaces / frozen leaves, jit == no-jit, and error messages."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fairopt import hparams, losses

SIGMOID_ONE = 1 / (1 + np.exp(-1.0))
# K = 10 classes with frequencies in a shuffled order (class 3 is the most frequent, ...).
COUNTS_10 = np.array([50, 5, 200, 500, 20, 1, 100, 10, 2, 300])
ORDER_10 = np.argsort(-COUNTS_10, kind="stable")  # 3, 9, 2, 6, 0, 4, 7, 1, 8, 5


def cluster_of(dictionary):
    chex.assert_rank(dictionary, 2)
    np.testing.assert_array_equal(dictionary.sum(axis=1), 1.0)  # exactly one cluster per class
    return dictionary.argmax(axis=1)


@pytest.mark.parametrize(
    "cluster_size, expected_sizes",
    [(3, [3, 3, 3, 1]), (1, [1] * 10), (10, [10]), (4, [4, 4, 2]), (25, [10])],
)
def test_class_clusters_are_contiguous_frequency_blocks(cluster_size, expected_sizes):
    dictionary = hparams.class_clusters(COUNTS_10, cluster_size)
    chex.assert_shape(dictionary, (10, len(expected_sizes)))
    np.testing.assert_array_equal(dictionary.sum(axis=0), expected_sizes)
    clusters = cluster_of(dictionary)
    # Walking classes from most to least frequent visits clusters 0, 0, .., 1, 1, .. in blocks.
    effective_size = min(cluster_size, 10)
    np.testing.assert_array_equal(clusters[ORDER_10], np.arange(10) // effective_size)


def test_class_clusters_map_cluster_parameters_to_classes():
    dictionary = hparams.class_clusters(COUNTS_10, 3)
    cluster_values = np.array([10.0, 20.0, 30.0, 40.0])
    per_class = np.asarray(hparams.expand(cluster_values, dictionary))
    # The three most frequent classes (3, 9, 2) share cluster 0; the rarest class (5) is alone.
    np.testing.assert_array_equal(per_class[[3, 9, 2]], 10.0)
    np.testing.assert_array_equal(per_class[[6, 0, 4]], 20.0)
    np.testing.assert_array_equal(per_class[[7, 1, 8]], 30.0)
    assert per_class[5] == 40.0
    # With C = 1, D^T D = I and D is a permutation: D^T (D v) = v.
    identity_like = hparams.class_clusters(COUNTS_10, 1)
    np.testing.assert_array_equal(identity_like.T @ identity_like, np.eye(10))
    # [K', G] raw values expand to [K, G].
    per_cell = hparams.expand(np.stack([cluster_values, -cluster_values], axis=1), dictionary)
    chex.assert_shape(per_cell, (10, 2))
    np.testing.assert_array_equal(per_cell[:, 1], -per_class)


def test_class_clusters_ties_keep_class_order():
    dictionary = hparams.class_clusters(np.array([5, 5, 5, 5, 9]), 2)
    np.testing.assert_array_equal(cluster_of(dictionary), [0, 1, 1, 2, 0])


def test_neutral_init_expands_to_plain_scaled_cross_entropy():
    counts = np.array([30, 10, 5])
    space = hparams.make_search_space("shift_scale", counts, init="ones")
    kwargs = hparams.to_loss_kwargs(space.hparams, space.dictionary)
    np.testing.assert_allclose(kwargs["weight"], np.ones(3))
    np.testing.assert_allclose(kwargs["shift"], np.zeros(3))
    np.testing.assert_allclose(kwargs["scale"], np.full(3, SIGMOID_ONE), rtol=1e-6)
    zeros = hparams.make_search_space("shift_scale", counts, init="zeros")
    chex.assert_trees_all_close(zeros.hparams, space.hparams)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 2, 1, 0], np.int32)
    np.testing.assert_allclose(
        losses.vs_loss(logits, labels, **kwargs),
        losses.cross_entropy(SIGMOID_ONE * logits, labels),
        rtol=1e-5,
    )


def test_la_init_gives_tau_log_pi_exactly_without_clusters_and_cluster_means_with():
    counts = COUNTS_10.astype(float)
    log_pi = np.log(counts / counts.sum())
    space = hparams.make_search_space("shift", counts, init="la", tau=1.5)
    np.testing.assert_allclose(hparams.to_loss_kwargs(space.hparams, space.dictionary)["shift"], 1.5 * log_pi, rtol=1e-5)
    clustered = hparams.make_search_space("shift", counts, init="la", cluster_size=3)
    shift = np.asarray(hparams.to_loss_kwargs(clustered.hparams, clustered.dictionary)["shift"])
    clusters = cluster_of(clustered.dictionary.shift)
    for cluster in range(4):
        members = clusters == cluster
        np.testing.assert_allclose(shift[members], np.mean(log_pi[members]), rtol=1e-5)


def test_la_tau_space_has_single_parameter_tau():
    counts = np.array([60, 30, 10])
    log_pi = np.log(counts / counts.sum())
    space = hparams.make_search_space("la_tau", counts, init="la", tau=0.7)
    chex.assert_shape(space.hparams.shift, (1,))
    np.testing.assert_allclose(space.hparams.shift, [0.7], rtol=1e-6)
    assert space.trainable == hparams.LossHparams(False, True, False)
    moved = space.hparams._replace(shift=jnp.array([2.0]))
    np.testing.assert_allclose(hparams.to_loss_kwargs(moved, space.dictionary)["shift"], 2.0 * log_pi, rtol=1e-5)
    neutral = hparams.make_search_space("la_tau", counts, init="ones")
    np.testing.assert_allclose(neutral.hparams.shift, [0.0], atol=1e-7)


def test_cdt_and_vs_inits():
    counts = np.array([400.0, 100.0, 25.0])
    gamma, tau = 0.5, 1.0
    for init in ("cdt", "vs"):
        space = hparams.make_search_space("shift_scale", counts, init=init, gamma=gamma, tau=tau)
        kwargs = hparams.to_loss_kwargs(space.hparams, space.dictionary)
        np.testing.assert_allclose(kwargs["scale"], SIGMOID_ONE * np.array([1.0, 0.5, 0.25]), rtol=1e-5)
        expected_shift = tau * np.log(counts / counts.sum()) if init == "vs" else np.zeros(3)
        np.testing.assert_allclose(kwargs["shift"], expected_shift, rtol=1e-5, atol=1e-6)
    # The scale ratios are those of CDT: Delta_k / Delta_max = (n_k / n_max)^gamma.
    np.testing.assert_allclose(kwargs["scale"] / kwargs["scale"][0], losses.cdt_scale(counts, gamma), rtol=1e-5)


def test_group_hparams_are_constant_over_groups_and_match_class_version():
    counts = np.array([40, 12, 4])
    per_class = hparams.make_search_space("shift_scale", counts, init="vs")
    per_cell = hparams.make_search_space("shift_scale", counts, init="vs", num_groups=3)
    chex.assert_tree_shape_prefix(per_cell.hparams, (3, 3))
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(8, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=8).astype(np.int32)
    groups = rng.integers(0, 3, size=8).astype(np.int32)
    np.testing.assert_allclose(
        losses.vs_loss(logits, labels, groups=groups, **hparams.to_loss_kwargs(per_cell.hparams, per_cell.dictionary)),
        losses.vs_loss(logits, labels, **hparams.to_loss_kwargs(per_class.hparams, per_class.dictionary)),
        rtol=1e-6,
    )


def test_group_la_init_from_cell_counts_matches_group_la_loss():
    counts = np.array([40, 12, 4])
    cells = np.array([[30, 10], [2, 10], [1, 3]])
    space = hparams.make_search_space("shift", counts, init="la", num_groups=2, cell_counts=cells, tau=0.8)
    shift = hparams.to_loss_kwargs(space.hparams, space.dictionary)["shift"]
    np.testing.assert_allclose(shift, 0.8 * np.log(cells / cells.sum(axis=0)), rtol=1e-5)
    with pytest.raises(ValueError, match="'la_tau' space"):
        hparams.make_search_space("la_tau", counts, num_groups=2, cell_counts=cells)
    with pytest.raises(ValueError, match="needs num_groups"):
        hparams.make_search_space("shift", counts, init="la", cell_counts=cells)
    with pytest.raises(ValueError, match="cell_counts must have shape"):
        hparams.make_search_space("shift", counts, init="la", num_groups=3, cell_counts=cells)


def test_weight_leaf_is_positive_exp_of_raw():
    dictionary = hparams.class_clusters(np.array([9, 3, 1]), 1)
    raw = hparams.LossHparams(jnp.array([-50.0, 0.0, 2.0]), jnp.zeros(3), jnp.zeros(3))
    weight = hparams.to_loss_kwargs(raw, dictionary)["weight"]
    assert np.all(np.asarray(weight) > 0)
    np.testing.assert_allclose(weight, np.exp([-50.0, 0.0, 2.0]), rtol=1e-6)


def test_hypergradients_finite_and_frozen_leaves_get_zero():
    counts = np.array([50, 10, 2])
    space = hparams.make_search_space("shift", counts, init="la", cluster_size=2)
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(10, 3)) * 100, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, size=10), jnp.int32)

    @jax.jit
    def grads(raw):
        def objective(raw):
            return jnp.mean(losses.vs_loss(logits, labels, **hparams.to_loss_kwargs(raw, space.dictionary)))

        return hparams.freeze_gradients(jax.grad(objective)(raw), space.trainable)

    gradient = grads(space.hparams)
    for leaf in gradient:
        assert np.all(np.isfinite(leaf))
    assert np.any(np.asarray(gradient.shift) != 0)
    np.testing.assert_array_equal(gradient.weight, 0.0)
    np.testing.assert_array_equal(gradient.scale_logit, 0.0)


def test_masked_optimizer_moves_only_trainable_leaves():
    counts = np.array([50, 10, 2])
    space = hparams.make_search_space("scale", counts, init="vs")
    optimizer = hparams.masked_optimizer(
        optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.5, momentum=0.9)), space.trainable
    )
    state = optimizer.init(space.hparams)
    params = space.hparams
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    for _ in range(3):
        updates, state = optimizer.update(ones, state, params)
        params = optax.apply_updates(params, updates)
    chex.assert_trees_all_equal(params.weight, space.hparams.weight)
    chex.assert_trees_all_equal(params.shift, space.hparams.shift)
    assert np.all(np.asarray(params.scale_logit) < np.asarray(space.hparams.scale_logit))


def test_to_loss_kwargs_same_jitted_and_not():
    counts = COUNTS_10
    space = hparams.make_search_space("shift_scale", counts, init="vs", cluster_size=3, num_groups=2)
    eager = hparams.to_loss_kwargs(space.hparams, space.dictionary)
    jitted = jax.jit(hparams.to_loss_kwargs)(space.hparams, space.dictionary)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-6)
    chex.assert_shape(eager["shift"], (10, 2))


@pytest.mark.parametrize("space_name", hparams.SEARCH_SPACES)
@pytest.mark.parametrize("init", [i for i in hparams.INITS if i != "group_la"])  # group_la: below
def test_every_space_and_init_builds_finite_parameters(space_name, init):
    space = hparams.make_search_space(space_name, COUNTS_10, init=init, cluster_size=3)
    kwargs = hparams.to_loss_kwargs(space.hparams, space.dictionary)
    for name, value in kwargs.items():
        chex.assert_shape(value, (10,))
        assert np.all(np.isfinite(value)), (space_name, init, name)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="cluster_size must be >= 1"):
        hparams.class_clusters(COUNTS_10, 0)
    with pytest.raises(TypeError, match="cluster_size must be an int"):
        hparams.class_clusters(COUNTS_10, 2.5)
    with pytest.raises(ValueError, match="non-negative"):
        hparams.class_clusters(np.array([3, -1, 4]), 1)
    with pytest.raises(ValueError, match="shape \\[K\\] with K >= 2"):
        hparams.class_clusters(np.ones((2, 2)), 1)
    with pytest.raises(ValueError, match="unknown init 'random'"):
        hparams.make_search_space("shift", COUNTS_10, init="random")
    with pytest.raises(ValueError, match="unknown search space 'tau'.*la_tau"):
        hparams.make_search_space("tau", COUNTS_10)
    with pytest.raises(ValueError, match="positive"):
        hparams.make_search_space("la_tau", np.array([3, 0, 4]))
    with pytest.raises(ValueError, match="K' = 4"):
        hparams.expand(jnp.zeros(3), hparams.class_clusters(COUNTS_10, 3))
    with pytest.raises(TypeError, match="must be a LossHparams"):
        hparams.to_loss_kwargs({"weight": 0.0}, np.eye(3))
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        hparams.init_hparams("ones", COUNTS_10, np.eye(10), num_groups=0)
