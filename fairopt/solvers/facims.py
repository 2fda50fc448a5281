"""FACIMS: fairness-aware class-imbalanced learning on multiple subgroups (tri-level).

Tarzanagh, Hou, Tong, Long, Shen, UAI 2023, eq. (7) and Algorithm 1. A global Gaussian
posterior ``Z = N(theta, sigma^2)`` over the network weights, one local posterior
``Z^a = N(theta^a, sigma^a^2)`` per subgroup ``a`` and VS-loss hyperparameters ``v``:

    min_{Z, v}  (1/|A'|) sum_{a in A'}  alpha_up D(Z^a* || Z) + E_{w ~ Z} L_bal(w; V^a)        (7a)
    s.t.  Z^a* = argmin_{Z^a} max_{||eps^a|| <= beta^a}
                 alpha_low D(Z^a || Z) + E_{w ~ Z^a} L_vs(w + eps^a; v, T^a)                  (7b)

One *round* of :func:`facims` (the official code's epoch) is

1. ``middle_steps`` times, for every sampled group ``a`` at once (``jax.vmap`` over the leading
   group axis): draw a train batch ``T^a``; the lower level takes the SAM perturbation
   ``eps^a = beta^a g / ||g||`` with ``g = grad_mean E L_vs``; the middle level takes one optax
   step on ``(theta^a, log sigma^a)`` of ``alpha_low D(Z^a||Z) + E L_vs(mean + eps^a + sigma^a xi)``
   with ``num_mc`` reparameterised draws ``xi``;
2. ``upper_steps`` times: draw a validation batch ``V^a`` per group and update ``(Z, v)`` with
   the implicit hypergradient (``fairopt.implicit``) of the upper objective through every
   ``Z^a*`` — each group solves with its own Hessian (block-diagonal; the official code summed
   the groups' Hessians, which is not the implicit function theorem).

The hypergradient is taken on one fixed Monte-Carlo draw per step (the same noise for every
Hessian-vector product: the Neumann / CG iteration needs one fixed function).

Variants (``method``): ``"facims"``; ``"facims_i"`` (beta = 0); ``"facims_ii"`` (beta = 0 and
``v`` frozen at the logit-adjusted ``v_bar``); ``"fams"`` (Shui et al. 2022: no validation
level and no ``v``: local posteriors trained with cross-entropy, the global posterior pulled
towards them by minimising ``mean_a D(Z^a || Z)`` directly).

Decisions and deviations from the official code (see also ``SPEC.md`` §7):

* Weights are sampled as ``w = mu + noise_scale * sigma * xi`` while ``D`` is measured between
  ``N(mu, sigma^2)`` posteriors: the official code's parameterisation (it samples with
  ``0.08 * exp(log_var / 2)`` and measures the divergence with ``exp(log_var / 2)``), kept
  because it sets how tightly ``alpha_low D`` ties the local posteriors to the global one. With
  ``noise_scale = 1`` and ``sigma = 0.08`` (the literal reading) the KL curvature in the means is
  ``alpha_low / 0.08^2 ~ 110`` per weight: the local posteriors cannot leave the global one and
  training stalls (measured: balanced accuracy .54 on credit). Defaults: ``init_std = 1``,
  ``noise_scale = 0.08``, so the initial sampling noise is the official 0.08.
* The global posterior's Adagrad step is 0.1 (official: 0.01), still decayed x0.9 per round:
  with 0.01 the global posterior stops moving after ~20 rounds while the local ones learn
  (measured on a synthetic 3-group problem: balanced accuracy .59 at 0.01, .73 at 0.1; ERM .68).
* ``D`` is KL by default (the paper); ``divergence="w2"`` is what the official code ran.
  The default inverse is conjugate gradient (robust to the curvature of ``alpha_low D``;
  a Neumann series needs ``alpha`` below ``2 / lambda_max``). Neumann stays available.
* The sum over groups in (7a) is a mean over the sampled groups, so step sizes do not depend on
  the number of groups.
* ``L_bal`` is the VS loss with the fixed logit-adjusted ``v_bar`` (shift ``tau log pi_k``,
  scale 1; the paper's definition) or, with ``validation_loss="balanced_ce"``, the
  class-balanced cross-entropy.
* ``v`` is parameterised as ``shift`` and ``log_scale`` (``Delta = exp(log_scale) > 0``) and
  initialised at ``v_bar``, so FACIMS-II is exactly FACIMS with beta = 0 and ``v`` frozen.
* Not copied: the sigmoid on the network output, class weights from test labels, local models
  for only the first groups, a SAM radius growing with the group index.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairopt import implicit, losses, posterior, sam
from fairopt.data.batching import GroupedArrays, sample_group_batch
from fairopt.losses import masked_mean
from fairopt.train import Solver

METHODS = ("facims", "facims_i", "facims_ii", "fams")
DIVERGENCES = ("kl", "w2")
INVERSES = ("cg", "neumann", "exact")
VALIDATION_LOSSES = ("vs_bar", "balanced_ce")
SHARPNESS_SCALINGS = ("uniform", "frequency")
GROUP_MAPPINGS = ("vmap", "unroll", "map", "auto")


@dataclasses.dataclass(frozen=True)
class FacimsConfig:
    """Hyperparameters of :func:`facims`; defaults are the official credit/drug settings.

    Attributes:
      method: one of :data:`METHODS`.
      alpha_low: weight of ``D(Z^a || Z)`` in the lower/middle level.
      alpha_up: weight of ``D(Z^a* || Z)`` in the upper level.
      sharpness: SAM radius beta (forced to 0 by ``facims_i``, ``facims_ii`` and ``fams``).
      sharpness_scaling: ``"uniform"`` (beta^a = beta) or ``"frequency"``
        (beta^a = beta * sqrt(mean_n / n_a), larger radius for smaller groups, mean-normalised).
      middle_steps: middle-level steps per round. upper_steps: upper-level steps per round.
      num_mc: Monte-Carlo weight draws per loss evaluation.
      hypergradient_samples: how many of the last middle step's ``num_mc`` draws define the
        inner objective whose Hessian the hypergradient inverts (the Hessian-vector products are
        most of a round's cost, linear in this number; 1 by default, a stochastic estimate).
      local_learning_rate: Adagrad step of the local posteriors.
      global_learning_rate: Adagrad step of the global posterior, times ``global_decay`` per round.
      hparam_learning_rate, hparam_momentum: SGD on ``v``.
      hparam_max_grad_norm: the hypergradient of ``v`` is clipped to this global norm first (the
        upper objective sums the divergence over every weight, so in the first rounds its
        hypergradient reaches 1e4 and unclipped SGD drove ``log Delta`` to 143, then NaN, on a
        credit-card seed).
      divergence: ``"kl"`` or ``"w2"``.
      inverse: ``"cg"``, ``"neumann"`` or ``"exact"`` (tiny models only).
      neumann_alpha, inverse_terms: Neumann step / number of terms (also CG iterations).
      init_std: initial std ``sigma`` of every posterior (as seen by the divergence).
      noise_scale: weights are sampled as ``mu + noise_scale * sigma * xi`` (module docstring).
      log_std_range: every posterior's ``log sigma`` is clipped to this interval after each
        update, so that ``exp(2 (log sigma_q - log sigma_p))`` in the KL cannot overflow (Adagrad
        moves every coordinate by about its step in the first updates; without the clip a
        credit-card seed reached NaN at round 4).
      tau: logit-adjustment temperature of ``v_bar``.
      validation_loss: ``"vs_bar"`` or ``"balanced_ce"`` (``L_bal``).
      hparams_per_group: ``v`` indexed by (class, group) (eq. 4.2 of AutoBalance) instead of class.
      groups_per_step: size of the random subset A' of groups per step (None: all groups).
      num_eval_samples: Monte-Carlo draws of ``Z`` for prediction.
      common_noise: every group's weight draws use the same standard-normal ``xi`` (common
        random numbers: ``w^a = mu^a + noise_scale * sigma^a * xi``). Each group's Monte-Carlo
        estimate keeps its distribution; only the draws of different groups become correlated.
        Drawing the noise is most of a middle step's cost on a CPU (threefry bits for
        ``num_mc x #weights`` numbers per group), so this cuts a round's CPU time 1.45x at G = 7 and
        makes the noise cost independent of G. False: independent draws per group.
      group_mapping: how the per-group functions run over the group axis; every choice gives
        the same values up to float rounding, inside one compiled round.
        ``"vmap"``: one ``jax.vmap`` over all G groups, one batched kernel per operation (the
        choice for accelerators and for sharding the group axis over devices).
        ``"unroll"``: a Python loop over the groups traced into the program, G independent
        copies of each per-group computation that XLA:CPU runs concurrently on its cores
        (credit, G = 7, 2-core CPU: 1.19 s per round against 1.71 s vmapped; compilation grows
        with G, 71 s against 25 s).
        ``"map"``: ``jax.lax.map``, a compiled loop over groups one at a time (least memory).
        ``"auto"``: ``"unroll"`` on a CPU backend when G <= 16, else ``"vmap"``.
    """

    method: str = "facims"
    alpha_low: float = 0.7
    alpha_up: float = 0.7
    sharpness: float = 0.05
    sharpness_scaling: str = "uniform"
    middle_steps: int = 10
    upper_steps: int = 5
    num_mc: int = 5
    hypergradient_samples: int = 1
    local_learning_rate: float = 0.4
    global_learning_rate: float = 0.1
    global_decay: float = 0.9
    hparam_learning_rate: float = 1e-3
    hparam_momentum: float = 0.9
    hparam_max_grad_norm: float = 1.0
    divergence: str = "kl"
    inverse: str = "cg"
    neumann_alpha: float = 0.1
    inverse_terms: int = 5
    init_std: float = 1.0
    noise_scale: float = 0.08
    log_std_range: tuple[float, float] = (-7.0, 2.0)
    tau: float = 1.0
    validation_loss: str = "vs_bar"
    hparams_per_group: bool = False
    groups_per_step: int | None = None
    num_eval_samples: int = 20
    common_noise: bool = True
    group_mapping: str = "vmap"

    def __post_init__(self):
        for name, value, choices in (
            ("method", self.method, METHODS),
            ("divergence", self.divergence, DIVERGENCES),
            ("inverse", self.inverse, INVERSES),
            ("validation_loss", self.validation_loss, VALIDATION_LOSSES),
            ("sharpness_scaling", self.sharpness_scaling, SHARPNESS_SCALINGS),
            ("group_mapping", self.group_mapping, GROUP_MAPPINGS),
        ):
            if value not in choices:
                raise ValueError(f"FacimsConfig.{name}={value!r}; choose one of {', '.join(choices)}")
        for name in ("alpha_low", "alpha_up", "sharpness", "hparam_momentum"):
            if getattr(self, name) < 0:
                raise ValueError(f"FacimsConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("local_learning_rate", "global_learning_rate", "global_decay", "init_std", "noise_scale", "neumann_alpha", "hparam_max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FacimsConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("middle_steps", "num_mc", "num_eval_samples", "hypergradient_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"FacimsConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("upper_steps", "inverse_terms"):
            if getattr(self, name) < 0:
                raise ValueError(f"FacimsConfig.{name} must be >= 0, got {getattr(self, name)}")
        low, high = self.log_std_range
        if not low < high:
            raise ValueError(f"FacimsConfig.log_std_range must be (low, high) with low < high, got {self.log_std_range}")
        if self.hypergradient_samples > self.num_mc:
            raise ValueError(
                f"FacimsConfig.hypergradient_samples={self.hypergradient_samples} exceeds num_mc={self.num_mc}; "
                "lower it or raise num_mc"
            )
        if self.groups_per_step is not None and self.groups_per_step < 1:
            raise ValueError(f"FacimsConfig.groups_per_step must be None or >= 1, got {self.groups_per_step}")

    @property
    def effective_sharpness(self) -> float:
        return self.sharpness if self.method == "facims" else 0.0

    @property
    def learns_hparams(self) -> bool:
        return self.method in ("facims", "facims_i")

    @property
    def has_validation_level(self) -> bool:
        return self.method != "fams"


class VSParams(NamedTuple):
    """VS-loss hyperparameters ``v``: logits ``f`` become ``exp(log_scale) * f + shift``."""

    shift: jax.Array  # [K] or [K, G]
    log_scale: jax.Array  # [K] or [K, G]


class FacimsState(NamedTuple):
    global_posterior: posterior.Gaussian
    local_posteriors: posterior.Gaussian  # leaves [G, ...]
    vs_params: VSParams
    local_opt_state: Any  # leaves [G, ...]
    global_opt_state: Any
    hparam_opt_state: Any
    rounds: jax.Array  # int32: completed rounds
    key: jax.Array


def logit_adjusted_vs_params(class_counts, num_groups: int, *, tau: float, per_group: bool) -> VSParams:
    """``v_bar``: shift ``tau log pi_k`` (pi from the training counts), scale 1."""
    counts = np.asarray(class_counts, np.float64)
    if counts.ndim != 1 or np.any(counts <= 0):
        raise ValueError(
            f"class_counts must be a positive vector [K], got {counts}; every class needs training rows"
        )
    shift = tau * np.log(counts / counts.sum())
    shift = jnp.asarray(shift, jnp.float32)
    if per_group:
        shift = jnp.repeat(shift[:, None], num_groups, axis=1)
    return VSParams(shift, jnp.zeros_like(shift))


def group_sharpness(config: FacimsConfig, group_counts) -> jax.Array:
    """Per-group SAM radius beta^a [G] (see :class:`FacimsConfig`)."""
    counts = np.asarray(group_counts, np.float64)
    beta = np.full(counts.shape, config.effective_sharpness)
    if config.sharpness_scaling == "frequency":
        scale = np.sqrt(counts[counts > 0].mean() / np.maximum(counts, 1.0))
        beta = beta * scale / scale[counts > 0].mean()
    return jnp.asarray(beta, jnp.float32)


class FacimsParts(NamedTuple):
    """The per-group building blocks of :func:`facims` (exposed for tests and custom loops).

    Every function acts on ONE group; the solver ``jax.vmap``s them over the group axis.
    """

    v_bar: VSParams
    sharpness: jax.Array  # beta^a [G]
    divergence: Callable
    local_optimizer: optax.GradientTransformation
    global_optimizer: optax.GradientTransformation
    hparam_optimizer: optax.GradientTransformation
    inner_objective: Callable  # (local_q, global_q, vs_params, batch, noise, group, perturbation=None)
    upper_objective: Callable  # (local_q, global_q, val_batch, global_noise, group)
    middle_step: Callable  # (local_q, opt_state, global_q, vs_params, batch, noise, group, radius, active)
    group_hypergradient: Callable  # (local_q, global_q, vs_params, batch, noise, val_batch, global_noise, group)
    fams_global_gradient: Callable  # (local_q, global_q)
    sample_weights: Callable  # (q, standard_normal_noise) -> weights
    clip_log_std: Callable  # (q) -> q with log_std clipped to config.log_std_range


def facims_parts(
    apply_fn: Callable[[Any, jax.Array], jax.Array], config: FacimsConfig, *, class_counts, group_counts
) -> FacimsParts:
    """Build the per-group functions of FACIMS (see :class:`FacimsParts` and the module docstring)."""
    class_counts = np.asarray(class_counts)
    group_counts = np.asarray(group_counts)
    num_classes, num_groups = len(class_counts), len(group_counts)
    divergence = posterior.divergence(config.divergence)
    v_bar = logit_adjusted_vs_params(
        class_counts, num_groups, tau=config.tau, per_group=config.hparams_per_group
    )
    beta = group_sharpness(config, group_counts)
    local_optimizer = optax.adagrad(config.local_learning_rate)
    global_optimizer = optax.adagrad(
        optax.exponential_decay(
            config.global_learning_rate,
            transition_steps=max(config.upper_steps, 1),
            decay_rate=config.global_decay,
            staircase=True,
        )
    )
    hparam_optimizer = optax.chain(
        optax.clip_by_global_norm(config.hparam_max_grad_norm),
        optax.sgd(config.hparam_learning_rate, momentum=config.hparam_momentum),
    )

    # ---- losses -------------------------------------------------------------------------------

    def vs_kwargs(vs_params: VSParams, group):
        shift, scale = vs_params.shift, jnp.exp(vs_params.log_scale)
        if config.hparams_per_group:
            shift, scale = shift[:, group], scale[:, group]
        return dict(shift=shift, scale=scale)

    def clip_log_std(q: posterior.Gaussian) -> posterior.Gaussian:
        low, high = config.log_std_range
        return q._replace(log_std=jax.tree_util.tree_map(lambda s: jnp.clip(s, low, high), q.log_std))

    def scaled(noise):
        return jax.tree_util.tree_map(lambda e: config.noise_scale * e, noise)

    def sample_weights(q: posterior.Gaussian, noise):
        """``mu + noise_scale * sigma * xi`` for standard-normal ``noise`` (module docstring)."""
        return posterior.sample_with_noise(q, scaled(noise))

    def mc_mean(loss_of_weights, q: posterior.Gaussian, noise):
        """Average over the leading Monte-Carlo axis of ``noise`` of a loss of sampled weights."""
        weights = posterior.sample_draws(q, scaled(noise))  # one sample_weights per draw
        return jnp.mean(jax.vmap(loss_of_weights)(weights))

    def train_loss(weights, vs_params, x, y, mask, group):
        """``L_vs``: the parametric VS loss on a group's batch (CE for FAMS)."""
        logits = apply_fn(weights, x)
        if config.method == "fams":
            per_example = losses.cross_entropy(logits, y)
        else:
            per_example = losses.vs_loss(logits, y, **vs_kwargs(vs_params, group))
        return masked_mean(per_example, mask)

    def validation_loss(weights, x, y, mask, group):
        """``L_bal``: the balanced validation loss on a group's batch."""
        logits = apply_fn(weights, x)
        if config.validation_loss == "balanced_ce":
            return losses.balanced_mean(losses.cross_entropy(logits, y), y, num_classes, mask=mask)
        return masked_mean(losses.vs_loss(logits, y, **vs_kwargs(v_bar, group)), mask)

    def inner_objective(local_q, global_q, vs_params, batch, noise, group, perturbation=None):
        """``alpha_low D(Z^a || Z) + E_{w ~ Z^a} L_vs(w + eps)`` (7b) on a fixed draw."""
        x, y, mask = batch
        shifted = local_q if perturbation is None else local_q._replace(
            mean=jax.tree_util.tree_map(jnp.add, local_q.mean, perturbation)
        )
        data_term = mc_mean(lambda w: train_loss(w, vs_params, x, y, mask, group), shifted, noise)
        return config.alpha_low * divergence(local_q, global_q) + data_term

    def upper_objective(local_q, global_q, val_batch, global_noise, group):
        """``alpha_up D(Z^a || Z) + E_{w ~ Z} L_bal(w; V^a)`` (7a), one group's term."""
        x, y, mask = val_batch
        data_term = mc_mean(lambda w: validation_loss(w, x, y, mask, group), global_q, global_noise)
        return config.alpha_up * divergence(local_q, global_q) + data_term

    # ---- one middle step for one group ----------------------------------------------------------

    def middle_step(local_q, opt_state, global_q, vs_params, batch, noise, group, radius, active):
        if config.effective_sharpness > 0:
            x, y, mask = batch
            data_term = lambda mean: mc_mean(  # noqa: E731
                lambda w: train_loss(w, vs_params, x, y, mask, group), local_q._replace(mean=mean), noise
            )
            perturbation = sam.sam_perturbation(jax.grad(data_term)(local_q.mean), radius)
        else:
            perturbation = None
        loss, grads = jax.value_and_grad(inner_objective)(
            local_q, global_q, vs_params, batch, noise, group, perturbation
        )
        updates, new_opt_state = local_optimizer.update(grads, opt_state, local_q)
        new_q = clip_log_std(optax.apply_updates(local_q, updates))
        keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731
        return (
            jax.tree_util.tree_map(keep, new_q, local_q),
            jax.tree_util.tree_map(keep, new_opt_state, opt_state),
            loss,
        )

    # ---- one upper step for one group: its share of the hypergradient --------------------------

    def group_hypergradient(local_q, global_q, vs_params, batch, noise, val_batch, global_noise, group):
        """d/d(Z, v) of the group's upper term through ``Z^a*(Z, v)`` (implicit function theorem)."""

        def inner(q, hyper):
            return inner_objective(q, hyper[0], hyper[1], batch, noise, group)

        def outer(q, hyper):
            return upper_objective(q, hyper[0], val_batch, global_noise, group)

        (grad_global, grad_vs), _ = implicit.implicit_hypergradient(
            inner,
            outer,
            local_q,
            (global_q, vs_params),
            inverse=config.inverse,
            alpha=config.neumann_alpha,
            num_terms=config.inverse_terms,
            cg_iters=config.inverse_terms,
        )
        return grad_global, grad_vs, outer(local_q, (global_q, vs_params))

    def fams_global_gradient(local_q, global_q):
        value, grad_global = jax.value_and_grad(lambda g: config.alpha_up * divergence(local_q, g))(global_q)
        return grad_global, value

    return FacimsParts(
        v_bar=v_bar,
        sharpness=beta,
        divergence=divergence,
        local_optimizer=local_optimizer,
        global_optimizer=global_optimizer,
        hparam_optimizer=hparam_optimizer,
        inner_objective=inner_objective,
        upper_objective=upper_objective,
        middle_step=middle_step,
        group_hypergradient=group_hypergradient,
        fams_global_gradient=fams_global_gradient,
        sample_weights=sample_weights,
        clip_log_std=clip_log_std,
    )


def facims(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    config: FacimsConfig,
    *,
    class_counts,
    group_counts,
    batch_size: int = 50,
    val_batch_size: int = 50,
) -> Solver:
    """The FACIMS solver (module docstring) as pure ``init / step / predict`` functions.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits``; a parameter pytree is a network.
      config: :class:`FacimsConfig`.
      class_counts: training rows per class [K] (for ``v_bar`` and the balanced loss).
      group_counts: training rows per group [G] before any resampling (frequency-scaled SAM).
      batch_size: train rows per group per middle step. val_batch_size: per upper step.

    Returns:
      A :class:`fairopt.train.Solver`: ``init(key, params) -> FacimsState``;
      ``step(state, (train: GroupedArrays, val: GroupedArrays)) -> (state, metrics)`` runs one round;
      ``predict(state, x)`` is the Monte-Carlo average of the global posterior's probabilities.
    """
    class_counts = np.asarray(class_counts)
    group_counts = np.asarray(group_counts)
    num_classes, num_groups = len(class_counts), len(group_counts)
    if num_classes < 2 or num_groups < 1:
        raise ValueError(f"need >= 2 classes and >= 1 group, got K={num_classes}, G={num_groups}")
    if batch_size < 1 or val_batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_size}, {val_batch_size}")
    if config.groups_per_step is not None and config.groups_per_step > num_groups:
        raise ValueError(f"groups_per_step={config.groups_per_step} exceeds the {num_groups} groups")
    parts = facims_parts(apply_fn, config, class_counts=class_counts, group_counts=group_counts)
    divergence, v_bar, beta = parts.divergence, parts.v_bar, parts.sharpness
    local_optimizer, global_optimizer, hparam_optimizer = (
        parts.local_optimizer,
        parts.global_optimizer,
        parts.hparam_optimizer,
    )
    middle_step, group_hypergradient, fams_global_gradient = (
        parts.middle_step,
        parts.group_hypergradient,
        parts.fams_global_gradient,
    )

    # ---- solver functions -----------------------------------------------------------------------

    def init(key, params) -> FacimsState:
        global_q = posterior.gaussian_init(params, init_std=config.init_std)
        local_q = jax.tree_util.tree_map(lambda leaf: jnp.repeat(leaf[None], num_groups, axis=0), global_q)
        return FacimsState(
            global_posterior=global_q,
            local_posteriors=local_q,
            vs_params=v_bar,
            local_opt_state=jax.vmap(local_optimizer.init)(local_q),
            global_opt_state=global_optimizer.init(global_q),
            hparam_opt_state=hparam_optimizer.init(v_bar),
            rounds=jnp.zeros((), jnp.int32),
            key=key,
        )

    def active_groups(key, train: GroupedArrays):
        present = train.count > 0
        if config.groups_per_step is None:
            return present
        scores = jnp.where(present, jax.random.uniform(key, (num_groups,)), -1.0)
        threshold = jnp.sort(scores)[num_groups - config.groups_per_step]
        return present & (scores >= threshold)

    group_mapping = config.group_mapping
    if group_mapping == "auto":
        group_mapping = "unroll" if jax.default_backend() == "cpu" and num_groups <= 16 else "vmap"

    def over_groups(fn, in_axes):
        """``fn`` mapped over the group axis (``in_axes`` as in ``jax.vmap``: 0 or None per
        argument) the way ``config.group_mapping`` says: ``jax.vmap``, a traced Python loop whose
        per-group results are stacked, or ``jax.lax.map``."""
        if group_mapping == "vmap":
            return jax.vmap(fn, in_axes=in_axes)

        def mapped(*args):
            per_group = tuple(arg for arg, axis in zip(args, in_axes) if axis == 0)

            def one_group(sliced):
                sliced = iter(sliced)
                return fn(*(next(sliced) if axis == 0 else arg for arg, axis in zip(args, in_axes)))

            if group_mapping == "map":
                return jax.lax.map(one_group, per_group)
            outputs = [
                one_group(jax.tree_util.tree_map(lambda leaf: leaf[group], per_group)) for group in range(num_groups)
            ]
            return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *outputs)

        return mapped

    def step(state: FacimsState, data):
        train, val = data
        key, round_key = jax.random.split(state.key)
        middle_key, upper_key, active_key, _ = jax.random.split(round_key, 4)  # 4: the streams of recorded runs
        middle_keys = jax.random.split(middle_key, (config.middle_steps, 2))
        upper_keys = jax.random.split(upper_key, (config.upper_steps, 2))
        groups = jnp.arange(num_groups)
        global_q, vs_params = state.global_posterior, state.vs_params
        active = active_groups(active_key, train)

        def noise_for(key, q, leading):
            return posterior.standard_normal_like(key, q, config.num_mc) if leading is None else jax.vmap(
                lambda k: posterior.standard_normal_like(k, q, config.num_mc)
            )(jax.random.split(key, leading))

        one_group_q = jax.tree_util.tree_map(lambda leaf: leaf[0], state.local_posteriors)  # noise shapes

        def middle_draw(batch_key, noise_key):
            """A middle step's train batch [G, B] and Monte-Carlo noise [num_mc, ...] ([G, num_mc, ...]
            without ``common_noise``)."""
            leading = None if config.common_noise else num_groups
            return sample_group_batch(batch_key, train, batch_size), noise_for(noise_key, one_group_q, leading)

        noise_axis = None if config.common_noise else 0  # the group axis of the noise, if any
        mc_axis = 0 if config.common_noise else 1

        def middle_body(carry, step_keys):
            local_q, opt_state = carry
            batch, noise = middle_draw(*step_keys)
            local_q, opt_state, loss = over_groups(
                middle_step, in_axes=(0, 0, None, None, 0, noise_axis, 0, 0, 0)
            )(local_q, opt_state, global_q, vs_params, batch, noise, groups, beta, active)
            return (local_q, opt_state), jnp.sum(jnp.where(active, loss, 0.0)) / jnp.maximum(jnp.sum(active), 1)

        (local_q, local_opt_state), middle_losses = jax.lax.scan(
            middle_body,
            (state.local_posteriors, state.local_opt_state),
            (middle_keys[:, 0], middle_keys[:, 1]),
        )
        # The hypergradient is taken at the last middle step's draw, redrawn from its keys.
        last_batch, middle_noise = middle_draw(middle_keys[-1, 0], middle_keys[-1, 1])
        last_noise = jax.tree_util.tree_map(
            lambda leaf: jax.lax.slice_in_dim(leaf, 0, config.hypergradient_samples, axis=mc_axis),
            middle_noise,
        )

        def upper_body(carry, step_keys):
            global_q, vs_params, global_opt_state, hparam_opt_state = carry
            val_key, noise_key = step_keys
            num_active = jnp.maximum(jnp.sum(active), 1)
            weight = active.astype(jnp.float32) / num_active
            if config.has_validation_level:
                val_batch = sample_group_batch(val_key, val, val_batch_size)
                global_noise = noise_for(noise_key, global_q, None)
                grad_global, grad_vs, values = over_groups(
                    group_hypergradient, in_axes=(0, None, None, 0, noise_axis, 0, None, 0)
                )(local_q, global_q, vs_params, last_batch, last_noise, val_batch, global_noise, groups)
            else:
                grad_global, values = jax.vmap(fams_global_gradient, in_axes=(0, None))(local_q, global_q)
                grad_vs = jax.tree_util.tree_map(lambda leaf: jnp.zeros((num_groups,) + leaf.shape), vs_params)
            average = lambda tree: jax.tree_util.tree_map(  # noqa: E731
                lambda leaf: jnp.tensordot(weight, leaf, axes=1), tree
            )
            grad_global, grad_vs = average(grad_global), average(grad_vs)
            updates, global_opt_state = global_optimizer.update(grad_global, global_opt_state, global_q)
            global_q = parts.clip_log_std(optax.apply_updates(global_q, updates))
            if config.learns_hparams:
                updates, hparam_opt_state = hparam_optimizer.update(grad_vs, hparam_opt_state, vs_params)
                vs_params = optax.apply_updates(vs_params, updates)
            return (global_q, vs_params, global_opt_state, hparam_opt_state), jnp.sum(weight * values)

        (global_q, vs_params, global_opt_state, hparam_opt_state), upper_values = jax.lax.scan(
            upper_body,
            (global_q, vs_params, state.global_opt_state, state.hparam_opt_state),
            (upper_keys[:, 0], upper_keys[:, 1]),
        )
        new_state = FacimsState(
            global_posterior=global_q,
            local_posteriors=local_q,
            vs_params=vs_params,
            local_opt_state=local_opt_state,
            global_opt_state=global_opt_state,
            hparam_opt_state=hparam_opt_state,
            rounds=state.rounds + 1,
            key=key,
        )
        metrics = {
            "middle_loss": middle_losses[-1],
            "upper_loss": upper_values[-1] if config.upper_steps else jnp.zeros(()),
            "divergence": jnp.mean(jax.vmap(divergence, in_axes=(0, None))(local_q, global_q)),
        }
        return new_state, metrics

    def predict(state: FacimsState, x):
        """Monte-Carlo average of the global posterior's predictive probabilities."""
        key = jax.random.fold_in(jax.random.key(0), 0)
        noise = posterior.standard_normal_like(key, state.global_posterior, config.num_eval_samples)
        samples = jax.vmap(lambda n: parts.sample_weights(state.global_posterior, n))(noise)
        probs = jax.vmap(lambda w: jax.nn.softmax(apply_fn(w, x), axis=-1))(samples)
        return jnp.mean(probs, axis=0)

    return Solver(init, step, predict)
