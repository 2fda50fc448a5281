"""Tests of fairopt.models: parameter/output shapes, the ELU forward pass by hand, default
initialisation statistics, vmap over stacked parameters, jit, and argument errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairopt import models

NUM_FEATURES, NUM_CLASSES = 7, 3


@pytest.fixture(scope="module")
def paper_mlp():
    return models.make_model("mlp", NUM_CLASSES, NUM_FEATURES, jax.random.key(0))


def random_inputs(seed, shape):
    """Standard-normal inputs from numpy (cheaper than compiling jax.random for a test input)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def manual_forward(params, x, activation):
    for index in range(3):
        layer = params[f"Dense_{index}"]
        x = activation(x @ layer["kernel"] + layer["bias"])
    return x @ params["Dense_3"]["kernel"] + params["Dense_3"]["bias"]


def test_mlp_parameter_shapes_are_400_200_100(paper_mlp):
    params, _ = paper_mlp
    expected = {
        "Dense_0": {"kernel": (NUM_FEATURES, 400), "bias": (400,)},
        "Dense_1": {"kernel": (400, 200), "bias": (200,)},
        "Dense_2": {"kernel": (200, 100), "bias": (100,)},
        "Dense_3": {"kernel": (100, NUM_CLASSES), "bias": (NUM_CLASSES,)},
    }
    assert jax.tree_util.tree_map(jnp.shape, params) == expected
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))


def test_mlp_uses_elu_and_returns_raw_logits(paper_mlp):
    params, apply_fn = paper_mlp
    x = random_inputs(1, (5, NUM_FEATURES))
    logits = apply_fn(params, x)
    chex.assert_shape(logits, (5, NUM_CLASSES))
    np.testing.assert_allclose(logits, manual_forward(params, x, jax.nn.elu), rtol=1e-5, atol=1e-6)
    # ELU and ReLU differ on this input (negative pre-activations exist), so the check above has teeth
    assert not np.allclose(logits, manual_forward(params, x, jax.nn.relu), atol=1e-4)
    # no sigmoid on the output (the official FACIMS code's defect): logits are not confined to (0, 1)
    big = apply_fn(params, 20.0 * x)
    assert float(jnp.max(jnp.abs(big))) > 1.0


def test_sigmoid_output_is_the_official_defect_on_the_same_logits(paper_mlp):
    params, apply_fn = paper_mlp
    squashed_params, squashed_fn = models.make_model(
        "mlp", NUM_CLASSES, NUM_FEATURES, jax.random.key(0), output_activation="sigmoid")
    chex.assert_trees_all_equal(params, squashed_params)  # same parameters, only the output differs
    x = random_inputs(2, (5, NUM_FEATURES))
    np.testing.assert_allclose(squashed_fn(params, 20.0 * x), jax.nn.sigmoid(apply_fn(params, 20.0 * x)), rtol=1e-6)
    # binary probabilities stay inside (1/(1+e), e/(1+e)) = (0.269, 0.731) however large the logits
    binary_params, binary_fn = models.make_model("mlp", 2, NUM_FEATURES, jax.random.key(1), output_activation="sigmoid")
    probabilities = jax.nn.softmax(binary_fn(binary_params, 100.0 * x))
    assert float(jnp.max(probabilities)) < 0.7311 and float(jnp.min(probabilities)) > 0.2689
    with pytest.raises(ValueError, match="output_activation must be one of none, sigmoid"):
        models.mlp(2, output_activation="softplus")


def test_default_initialisation_is_lecun_normal_kernels_and_zero_biases(paper_mlp):
    params, _ = paper_mlp
    for layer, fan_in in (("Dense_1", 400), ("Dense_2", 200)):
        kernel = np.asarray(params[layer]["kernel"])
        # std of 80,000 / 20,000 draws is within 3 % of sqrt(1 / fan_in) (LeCun normal, truncated
        # normal rescaled to that std): relative standard error of a std is 1/sqrt(2n) < 0.5 %
        assert np.std(kernel) == pytest.approx(np.sqrt(1.0 / fan_in), rel=0.03)
        np.testing.assert_array_equal(params[layer]["bias"], 0.0)


def test_leading_axes_and_single_example(paper_mlp):
    params, apply_fn = paper_mlp
    x = jnp.ones((2, 4, NUM_FEATURES))
    chex.assert_shape(apply_fn(params, x), (2, 4, NUM_CLASSES))
    np.testing.assert_allclose(apply_fn(params, x)[1, 2], apply_fn(params, x[1, 2]), rtol=1e-5, atol=1e-6)


def test_linear_model_is_affine():
    params, apply_fn = models.make_model("linear", 2, 4, jax.random.key(2))
    assert jax.tree_util.tree_map(jnp.shape, params) == {"Dense_0": {"kernel": (4, 2), "bias": (2,)}}
    x = random_inputs(3, (6, 4))
    np.testing.assert_allclose(apply_fn(params, x), x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"], rtol=1e-6)


def test_custom_hidden_widths_and_activation():
    params, apply_fn = models.make_model("mlp", 4, 3, jax.random.key(4), hidden=(8, 5), activation="tanh")
    assert [params[f"Dense_{i}"]["kernel"].shape for i in range(3)] == [(3, 8), (8, 5), (5, 4)]
    x = jnp.linspace(-1, 1, 6).reshape(2, 3)
    hidden = jnp.tanh(jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]) @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"])
    np.testing.assert_allclose(apply_fn(params, x), hidden @ params["Dense_2"]["kernel"] + params["Dense_2"]["bias"], rtol=1e-5, atol=1e-6)


def test_different_keys_give_different_params_and_same_key_the_same():
    first, _ = models.make_model("mlp", 2, 3, jax.random.key(5), hidden=(4,))
    again, _ = models.make_model("mlp", 2, 3, jax.random.key(5), hidden=(4,))
    other, _ = models.make_model("mlp", 2, 3, jax.random.key(6), hidden=(4,))
    chex.assert_trees_all_equal(first, again)
    assert not np.allclose(first["Dense_0"]["kernel"], other["Dense_0"]["kernel"])


def test_vmap_over_stacked_params_equals_loop():
    keys = jax.random.split(jax.random.key(7), 3)
    _, apply_fn = models.make_model("mlp", 2, 3, keys[0], hidden=(4,))
    group_params = [models.make_model("mlp", 2, 3, k, hidden=(4,))[0] for k in keys]
    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *group_params)
    x = random_inputs(8, (3, 5, 3))
    vmapped = jax.vmap(apply_fn)(stacked, x)
    loop = jnp.stack([apply_fn(p, xi) for p, xi in zip(group_params, x)])
    np.testing.assert_allclose(vmapped, loop, rtol=1e-5, atol=1e-6)
    shared_x = jax.vmap(apply_fn, in_axes=(0, None))(stacked, x[0])
    np.testing.assert_allclose(shared_x[2], apply_fn(group_params[2], x[0]), rtol=1e-5, atol=1e-6)


def test_jit_equals_no_jit(paper_mlp):
    params, apply_fn = paper_mlp
    x = random_inputs(9, (4, NUM_FEATURES))
    np.testing.assert_allclose(jax.jit(apply_fn)(params, x), apply_fn(params, x), rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="'mlp', 'linear'"):
        models.make_model("resnet", 2, 3, key)
    with pytest.raises(ValueError, match="num_features must be >= 1"):
        models.make_model("mlp", 2, 0, key)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        models.make_model("linear", 0, 3, key)
    with pytest.raises(TypeError, match="num_classes must be a Python int"):
        models.mlp(2.0)
    with pytest.raises(ValueError, match="activation must be one of elu"):
        models.mlp(2, activation="swish2")
    with pytest.raises(ValueError, match=r"hidden\[1\] must be >= 1"):
        models.mlp(2, hidden=(4, 0))
    with pytest.raises(TypeError, match="does not take option"):
        models.make_model("linear", 2, 3, key, hidden=(4,))
