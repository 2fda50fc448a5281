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
* Two choices of the official code are options, measured in ``docs/facims_ablation.md``:
  ``whole_validation`` with ``validation_draws=1`` (its upper objective: the whole validation
  split, one stochastic pass per row and outer step; default: a sampled batch of
  ``val_batch_size`` per group and ``num_mc`` draws) and ``local_reparameterisation`` (its
  layers draw the pre-activations per row; default: one weight draw per forward pass).
* Not copied: the sigmoid on the network output, class weights from test labels, local models
  for only the first groups, a SAM radius growing with the group index.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairopt import implicit, losses, posterior, sam
from fairopt.data.batching import GroupedArrays, sample_group_batch, whole_group_batch
from fairopt.losses import masked_mean
from fairopt import sweep
from fairopt.sweep import HyperparameterConfig
from fairopt.train import Solver

METHODS = ("facims", "facims_i", "facims_ii", "fams")
DIVERGENCES = ("kl", "w2")
INVERSES = ("cg", "neumann", "exact")
VALIDATION_LOSSES = ("vs_bar", "balanced_ce")
SHARPNESS_SCALINGS = ("uniform", "frequency")
GROUP_MAPPINGS = ("vmap", "unroll", "map", "auto")
PREDICTIONS = ("monte_carlo", "mean")

OptimizerFactory = Callable[[jax.Array], optax.GradientTransformation]


class FacimsHyperparams(NamedTuple):
    """The numeric settings of :class:`FacimsConfig`, traced: a sweep over them is one program."""

    alpha_low: jax.Array
    alpha_up: jax.Array
    sharpness: jax.Array
    local_learning_rate: jax.Array
    global_learning_rate: jax.Array
    global_decay: jax.Array
    hparam_learning_rate: jax.Array
    hparam_momentum: jax.Array
    hparam_max_grad_norm: jax.Array
    neumann_alpha: jax.Array
    damping: jax.Array
    init_std: jax.Array
    noise_scale: jax.Array
    log_std_min: jax.Array
    log_std_max: jax.Array
    tau: jax.Array


@dataclasses.dataclass(frozen=True)
class FacimsConfig(HyperparameterConfig):
    """Settings of :func:`facims`; defaults are the official credit/drug settings except where
    the module docstring says otherwise.

    The fields named in :class:`FacimsHyperparams` are *hyperparameters*: numbers that
    ``init`` stores in the state and ``step`` reads from there, so changing one never
    recompiles and ``jax.vmap`` sweeps over them (:mod:`fairopt.sweep`). The other fields are
    static: they change the compiled program.

    Attributes:
      method: facims, facims_i (no SAM), facims_ii (no SAM, VS loss frozen at v_bar) or fams.
      alpha_low: weight of D(Z^a || Z) in the lower/middle level (the paper's 0.7; default 0.3,
        with tau 1.25 and hparam_learning_rate 1e-2 chosen on held-out validation rows,
        docs/facims_ablation.md, fourth pass).
      alpha_up: weight of D(Z^a* || Z) in the upper level.
      sharpness: SAM radius beta (no effect in facims_i, facims_ii and fams).
      sharpness_scaling: uniform (beta^a = beta) or frequency (beta^a = beta sqrt(mean_n / n_a),
        mean-normalised over the groups: a larger radius for smaller groups).
      middle_steps: middle-level steps per round.
      upper_steps: upper-level steps per round.
      num_mc: Monte-Carlo weight draws per loss evaluation.
      hypergradient_samples: Monte-Carlo draws (of the last middle step's num_mc) inside the
        hypergradient's Hessian; its Hessian-vector products, most of a round's cost, are linear
        in this number.
      local_learning_rate: step of the local posteriors' optimiser (Adagrad by default).
      global_learning_rate: step of the global posterior's optimiser (Adagrad by default), times
        global_decay per round. Default 0.3 (with damping 10: chosen on held-out validation
        rows, docs/facims_ablation.md, fourth pass; the official code's 0.01 stalls).
      global_decay: per-round decay of the global step.
      hparam_learning_rate: step of the VS hyperparameters' optimiser (SGD by default; default
        1e-2: see alpha_low).
      hparam_momentum: momentum of the default VS-hyperparameter SGD.
      hparam_max_grad_norm: the hypergradient of v is clipped to this global norm first (in the
        first rounds it reaches 1e4 and unclipped SGD drove log Delta to 143, then NaN, on a
        credit-card seed).
      divergence: kl (the paper) or w2 (what the official code ran).
      inverse: inverse-Hessian-vector product of the hypergradient: cg, neumann or exact (tiny
        models only).
      neumann_alpha: Neumann series step.
      neumann_terms: Neumann series terms J (inverse=neumann).
      cg_iters: conjugate-gradient iterations (inverse=cg), >= 1.
      damping: the hypergradient inverts H + damping I instead of the inner Hessian H (>= 0). At
        the credit MLP's scale H is indefinite and CG on it amplifies a 1e-7 change of the weights
        into an 80 % different global posterior after one round; damping bounds that. Default
        10 (chosen on held-out validation rows, docs/facims_ablation.md, fourth pass); 0 gives
        the exact implicit hypergradient of the papers.
      init_std: initial std sigma of every posterior (as seen by the divergence).
      noise_scale: weights are sampled as mu + noise_scale * sigma * xi (module docstring).
      log_std_min: every posterior's log sigma is clipped to [log_std_min, log_std_max] after each
        update, so that exp(2 (log sigma_q - log sigma_p)) in the KL cannot overflow (without the
        clip a credit-card seed reached NaN at round 4).
      log_std_max: upper end of the log sigma clip.
      tau: logit-adjustment temperature of v_bar (default 1.25: see alpha_low).
      validation_loss: the upper-level balanced loss L_bal: vs_bar or balanced_ce.
      hparams_per_group: VS hyperparameters v indexed by (class, group) (eq. 4.2 of AutoBalance).
      groups_per_step: partial-group setting: the size of the random subset A' of groups per round
        (None: every group).
      num_eval_samples: Monte-Carlo draws of Z for prediction.
      prediction: monte_carlo (average of the predictive probabilities over num_eval_samples draws
        of the global posterior) or mean (softmax at the posterior mean weights, deterministic).
      common_noise: every group's weight draws use the same standard-normal xi (common random
        numbers; each group's estimate keeps its distribution, only the groups' draws become
        correlated). It cuts a round's CPU time 1.45x at G = 7 on a CPU.
      local_reparameterisation: every Monte-Carlo forward pass (training, hypergradient and
        prediction) draws each dense layer's pre-activations, fresh per row, instead of one
        weight draw per pass (``fairopt.posterior.local_reparameterisation_apply``; the official
        code's layers): each row's output keeps its distribution, rows become independent. The
        model must be a flax module of ``nn.Dense`` layers (fairopt's mlp and linear).
      whole_validation: every upper step evaluates ``L_bal`` on all of each group's validation
        rows (the padded layout, padding masked) instead of a sampled batch of
        ``val_batch_size`` per group. The official code averages its validation loss over the
        whole split at every outer step (pooled over groups; here each group's term is its own
        rows' mean, as in (7a)). Its cost grows with the largest group's validation rows.
      validation_draws: Monte-Carlo draws of the global posterior in the upper objective's
        ``E_{w ~ Z} L_bal`` (None: ``num_mc``). The official code makes one stochastic pass over
        each validation row per outer step: ``whole_validation`` with ``validation_draws=1``.
      group_mapping: how the per-group functions run over the group axis, inside one compiled
        round (every choice gives the same values up to float rounding): vmap (one batched
        kernel per operation; accelerators, sharded group axes), unroll (G traced copies that
        XLA:CPU runs concurrently; faster on a CPU, longer to compile), map (jax.lax.map, least
        memory) or auto (unroll on a CPU backend when G <= 16, else vmap).
    """

    Hyperparams: ClassVar[type] = FacimsHyperparams
    CHOICES: ClassVar[dict] = {
        "method": METHODS,
        "divergence": DIVERGENCES,
        "inverse": INVERSES,
        "validation_loss": VALIDATION_LOSSES,
        "sharpness_scaling": SHARPNESS_SCALINGS,
        "group_mapping": GROUP_MAPPINGS,
        "prediction": PREDICTIONS,
    }

    method: str = "facims"
    alpha_low: float = 0.3
    alpha_up: float = 0.7
    sharpness: float = 0.05
    sharpness_scaling: str = "uniform"
    middle_steps: int = 10
    upper_steps: int = 5
    num_mc: int = 5
    hypergradient_samples: int = 1
    local_learning_rate: float = 0.4
    global_learning_rate: float = 0.3
    global_decay: float = 0.9
    hparam_learning_rate: float = 1e-2
    hparam_momentum: float = 0.9
    hparam_max_grad_norm: float = 1.0
    divergence: str = "kl"
    inverse: str = "cg"
    neumann_alpha: float = 0.1
    neumann_terms: int = 10
    cg_iters: int = 5
    damping: float = 10.0
    init_std: float = 1.0
    noise_scale: float = 0.08
    log_std_min: float = -7.0
    log_std_max: float = 2.0
    tau: float = 1.25
    validation_loss: str = "vs_bar"
    hparams_per_group: bool = False
    groups_per_step: int | None = None
    num_eval_samples: int = 20
    prediction: str = "monte_carlo"
    common_noise: bool = True
    local_reparameterisation: bool = False
    whole_validation: bool = False
    validation_draws: int | None = None
    group_mapping: str = "auto"

    def __post_init__(self):
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"FacimsConfig.{name}={getattr(self, name)!r}; choose one of {', '.join(choices)}")
        for name in self.hyperparameter_names():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value):
                raise ValueError(f"FacimsConfig.{name} must be a finite number, got {value!r}")
        for name in ("alpha_low", "alpha_up", "sharpness", "hparam_momentum", "damping"):
            if getattr(self, name) < 0:
                raise ValueError(f"FacimsConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("local_learning_rate", "global_learning_rate", "global_decay", "init_std", "noise_scale",
                     "neumann_alpha", "hparam_max_grad_norm", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FacimsConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("middle_steps", "num_mc", "num_eval_samples", "hypergradient_samples", "cg_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"FacimsConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("upper_steps", "neumann_terms"):
            if getattr(self, name) < 0:
                raise ValueError(f"FacimsConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.log_std_min < self.log_std_max:
            raise ValueError(
                f"FacimsConfig.log_std_min={self.log_std_min} must be below log_std_max={self.log_std_max}"
            )
        if not self.log_std_min <= np.log(self.init_std) <= self.log_std_max:
            raise ValueError(
                f"FacimsConfig.init_std={self.init_std} lies outside the clip range exp([log_std_min, log_std_max]) = "
                f"[{np.exp(self.log_std_min):.3g}, {np.exp(self.log_std_max):.3g}]"
            )
        if self.hypergradient_samples > self.num_mc:
            raise ValueError(
                f"FacimsConfig.hypergradient_samples={self.hypergradient_samples} exceeds num_mc={self.num_mc}; "
                "lower it or raise num_mc"
            )
        if self.validation_draws is not None and self.validation_draws < 1:
            raise ValueError(f"FacimsConfig.validation_draws must be None or >= 1, got {self.validation_draws}")
        if self.groups_per_step is not None and self.groups_per_step < 1:
            raise ValueError(f"FacimsConfig.groups_per_step must be None or >= 1, got {self.groups_per_step}")

    @property
    def uses_sharpness(self) -> bool:
        """Only FACIMS proper takes the SAM step (FACIMS-I/II and FAMS have beta = 0)."""
        return self.method == "facims"

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


class FacimsData(NamedTuple):
    """What one FACIMS round consumes: every group's training and validation rows
    (:func:`fairopt.data.group_arrays`, leaves ``[G, N, ...]``)."""

    train: GroupedArrays
    val: GroupedArrays


class FacimsState(NamedTuple):
    global_posterior: posterior.Gaussian
    local_posteriors: posterior.Gaussian  # leaves [G, ...]
    vs_params: VSParams
    local_opt_state: Any  # leaves [G, ...]
    global_opt_state: Any
    hparam_opt_state: Any
    rounds: jax.Array  # int32: completed rounds
    key: jax.Array
    hyperparams: FacimsHyperparams
    class_counts: jax.Array  # float32 [K]: training rows per class (v_bar, the balanced loss)
    group_counts: jax.Array  # float32 [G]: training rows per group before resampling (SAM radii)


def logit_adjusted_vs_params(class_counts, num_groups: int, *, tau, per_group: bool) -> VSParams:
    """``v_bar``: shift ``tau log pi_k`` (pi from the training counts), scale 1 (traceable)."""
    counts = jnp.asarray(class_counts, jnp.float32)
    shift = jnp.asarray(tau, jnp.float32) * jnp.log(counts / jnp.sum(counts))
    if per_group:
        shift = jnp.repeat(shift[:, None], num_groups, axis=1)
    return VSParams(shift, jnp.zeros_like(shift))


def monte_carlo_noise(config: FacimsConfig, key, q: posterior.Gaussian, num_draws: int):
    """What ``num_draws`` Monte-Carlo forward passes of ``q`` consume: standard-normal weight noise
    shaped like ``q.mean`` with a leading ``[num_draws]`` axis, or with
    ``config.local_reparameterisation`` ``num_draws`` PRNG keys (the pre-activation noise of each
    pass is drawn from its key inside the pass)."""
    if config.local_reparameterisation:
        return jax.random.split(key, num_draws)
    return posterior.standard_normal_like(key, q, num_draws)


def group_sharpness(config: FacimsConfig, group_counts, sharpness=None) -> jax.Array:
    """Per-group SAM radius beta^a [G] (see :class:`FacimsConfig`); traceable in the counts and
    ``sharpness`` (default ``config.sharpness``). Zero unless the method takes SAM steps."""
    counts = jnp.asarray(group_counts, jnp.float32)
    sharpness = config.sharpness if sharpness is None else sharpness
    beta = jnp.full(counts.shape, jnp.asarray(sharpness, jnp.float32) * float(config.uses_sharpness))
    if config.sharpness_scaling == "frequency":
        present = counts > 0
        mean_count = jnp.sum(jnp.where(present, counts, 0.0)) / jnp.maximum(jnp.sum(present), 1)
        scale = jnp.sqrt(mean_count / jnp.maximum(counts, 1.0))
        scale_mean = jnp.sum(jnp.where(present, scale, 0.0)) / jnp.maximum(jnp.sum(present), 1)
        beta = beta * scale / scale_mean
    return beta


def _check_counts(class_counts, group_counts) -> tuple[np.ndarray, np.ndarray]:
    class_counts, group_counts = np.asarray(class_counts), np.asarray(group_counts)
    if class_counts.ndim != 1 or class_counts.size < 2 or np.any(class_counts <= 0):
        raise ValueError(
            f"class_counts must be a positive vector [K] with K >= 2, got {class_counts}; every class needs training rows"
        )
    if group_counts.ndim != 1 or group_counts.size < 1 or np.any(group_counts < 0):
        raise ValueError(f"group_counts must be a non-negative vector [G] with G >= 1, got {group_counts}")
    return class_counts, group_counts


class FacimsParts(NamedTuple):
    """The per-group building blocks of :func:`facims` for one set of hyperparameters (exposed
    for tests, benchmarks and custom loops).

    Every function acts on ONE group; the solver maps them over the group axis.
    """

    v_bar: VSParams
    sharpness: jax.Array  # beta^a [G]
    divergence: Callable
    local_optimizer: optax.GradientTransformation
    global_optimizer: optax.GradientTransformation  # at the undecayed global step
    hparam_optimizer: optax.GradientTransformation
    inner_objective: Callable  # (local_q, global_q, vs_params, batch, noise, group, perturbation=None)
    upper_objective: Callable  # (local_q, global_q, val_batch, global_noise, group)
    middle_step: Callable  # (local_q, opt_state, global_q, vs_params, batch, noise, group, radius, active)
    group_hypergradient: Callable  # (local_q, global_q, vs_params, batch, noise, val_batch, global_noise, group)
    fams_global_gradient: Callable  # (local_q, global_q)
    sample_weights: Callable  # (q, standard_normal_noise) -> weights
    clip_log_std: Callable  # (q) -> q with log_std clipped to [log_std_min, log_std_max]


def facims_parts(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    config: FacimsConfig,
    *,
    class_counts,
    group_counts,
    hyperparams: FacimsHyperparams | None = None,
    local_optimizer=None,
    global_optimizer=None,
    hparam_optimizer=None,
) -> FacimsParts:
    """The per-group functions of :func:`facims` at ``hyperparams`` (default: the config's
    numbers). ``class_counts`` / ``group_counts`` may be traced arrays."""
    hyperparams = config.hyperparams() if hyperparams is None else hyperparams
    return _group_functions(
        apply_fn,
        config,
        hyperparams,
        class_counts=class_counts,
        group_counts=group_counts,
        optimizers=(
            sweep.optimizer_factory(local_optimizer, "local_optimizer"),
            sweep.optimizer_factory(global_optimizer, "global_optimizer"),
            sweep.optimizer_factory(hparam_optimizer, "hparam_optimizer"),
        ),
    )


def _group_functions(apply_fn, config: FacimsConfig, h: FacimsHyperparams, *, class_counts, group_counts,
                     optimizers, global_learning_rate=None) -> FacimsParts:
    """Build the per-group functions for the (possibly traced) hyperparameters ``h``."""
    num_classes, num_groups = int(jnp.shape(class_counts)[0]), int(jnp.shape(group_counts)[0])
    divergence = posterior.divergence(config.divergence)
    v_bar = logit_adjusted_vs_params(class_counts, num_groups, tau=h.tau, per_group=config.hparams_per_group)
    beta = group_sharpness(config, group_counts, h.sharpness)
    local_factory, global_factory, hparam_factory = optimizers
    local_optimizer = (local_factory or optax.adagrad)(h.local_learning_rate)
    global_lr = h.global_learning_rate if global_learning_rate is None else global_learning_rate
    global_optimizer = (global_factory or optax.adagrad)(global_lr)
    hparam_optimizer = optax.chain(
        optax.clip_by_global_norm(h.hparam_max_grad_norm),
        hparam_factory(h.hparam_learning_rate) if hparam_factory is not None
        else optax.sgd(h.hparam_learning_rate, momentum=h.hparam_momentum),
    )

    # ---- losses -------------------------------------------------------------------------------

    def vs_kwargs(vs_params: VSParams, group):
        shift, scale = vs_params.shift, jnp.exp(vs_params.log_scale)
        if config.hparams_per_group:
            shift, scale = shift[:, group], scale[:, group]
        return dict(shift=shift, scale=scale)

    def clip_log_std(q: posterior.Gaussian) -> posterior.Gaussian:
        return q._replace(
            log_std=jax.tree_util.tree_map(lambda s: jnp.clip(s, h.log_std_min, h.log_std_max), q.log_std)
        )

    def scaled(noise):
        return jax.tree_util.tree_map(lambda e: h.noise_scale * e, noise)

    def sample_weights(q: posterior.Gaussian, noise):
        """``mu + noise_scale * sigma * xi`` for standard-normal ``noise`` (module docstring)."""
        return posterior.sample_with_noise(q, scaled(noise))

    def mc_mean(loss_of_logits, q: posterior.Gaussian, x, noise):
        """``(1/S) sum_s loss_of_logits(f(x; w_s))``, ``w_s ~ q``, over the leading Monte-Carlo axis of
        ``noise`` (:func:`monte_carlo_noise`): standard-normal weight noise (one weight draw per
        forward pass), or with ``local_reparameterisation`` one key per forward pass whose
        pre-activation noise is fresh per row (:func:`fairopt.posterior.local_reparameterisation_apply`)."""
        if config.local_reparameterisation:
            forward = lambda key: posterior.local_reparameterisation_apply(apply_fn, q, x, key, h.noise_scale)  # noqa: E731
            return jnp.mean(jax.vmap(lambda key: loss_of_logits(forward(key)))(noise))
        weights = posterior.sample_draws(q, scaled(noise))  # one sample_weights per draw
        return jnp.mean(jax.vmap(lambda w: loss_of_logits(apply_fn(w, x)))(weights))

    def train_loss(logits, vs_params, y, mask, group):
        """``L_vs``: the parametric VS loss on a group's batch (CE for FAMS)."""
        if config.method == "fams":
            per_example = losses.cross_entropy(logits, y)
        else:
            per_example = losses.vs_loss(logits, y, **vs_kwargs(vs_params, group))
        return masked_mean(per_example, mask)

    def validation_loss(logits, y, mask, group):
        """``L_bal``: the balanced validation loss on a group's batch."""
        if config.validation_loss == "balanced_ce":
            return losses.balanced_mean(losses.cross_entropy(logits, y), y, num_classes, mask=mask)
        return masked_mean(losses.vs_loss(logits, y, **vs_kwargs(v_bar, group)), mask)

    def inner_objective(local_q, global_q, vs_params, batch, noise, group, perturbation=None):
        """``alpha_low D(Z^a || Z) + E_{w ~ Z^a} L_vs(w + eps)`` (7b) on a fixed draw."""
        x, y, mask = batch
        shifted = local_q if perturbation is None else local_q._replace(
            mean=jax.tree_util.tree_map(jnp.add, local_q.mean, perturbation)
        )
        data_term = mc_mean(lambda logits: train_loss(logits, vs_params, y, mask, group), shifted, x, noise)
        return h.alpha_low * divergence(local_q, global_q) + data_term

    def upper_objective(local_q, global_q, val_batch, global_noise, group):
        """``alpha_up D(Z^a || Z) + E_{w ~ Z} L_bal(w; V^a)`` (7a), one group's term."""
        x, y, mask = val_batch
        data_term = mc_mean(lambda logits: validation_loss(logits, y, mask, group), global_q, x, global_noise)
        return h.alpha_up * divergence(local_q, global_q) + data_term

    # ---- one middle step for one group ----------------------------------------------------------

    def middle_step(local_q, opt_state, global_q, vs_params, batch, noise, group, radius, active):
        if config.uses_sharpness:
            x, y, mask = batch
            data_term = lambda mean: mc_mean(  # noqa: E731
                lambda logits: train_loss(logits, vs_params, y, mask, group), local_q._replace(mean=mean), x, noise
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
            alpha=h.neumann_alpha,
            num_terms=config.neumann_terms,
            cg_iters=config.cg_iters,
            damping=h.damping,
        )
        return grad_global, grad_vs, outer(local_q, (global_q, vs_params))

    def fams_global_gradient(local_q, global_q):
        value, grad_global = jax.value_and_grad(lambda g: h.alpha_up * divergence(local_q, g))(global_q)
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


def _check_round_input(data, num_groups: int) -> FacimsData:
    """The round's input as :class:`FacimsData`, or a TypeError / ValueError naming what is expected."""
    expected = (
        "FacimsData(train, val) (or a (train, val) tuple) of fairopt.data.GroupedArrays "
        "from fairopt.data.group_arrays"
    )
    if not (isinstance(data, tuple) and len(data) == 2 and all(isinstance(part, GroupedArrays) for part in data)):
        got = type(data).__name__
        if isinstance(data, tuple):
            got += "(" + ", ".join(type(part).__name__ for part in data) + ")"
        raise TypeError(f"the FACIMS step takes {expected}; got {got}")
    train, val = data
    for name, part in (("train", train), ("val", val)):
        groups_axis = part.count.shape[-1]
        if groups_axis != num_groups:
            raise ValueError(
                f"the FACIMS {name} arrays have {groups_axis} groups but the solver was built for {num_groups} "
                "(group_counts); pass num_groups to data.group_arrays or build the solver from this dataset's counts"
            )
    return FacimsData(train, val)


def facims(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    config: FacimsConfig,
    *,
    class_counts,
    group_counts,
    batch_size: int = 50,
    val_batch_size: int = 50,
    local_optimizer=None,
    global_optimizer=None,
    hparam_optimizer=None,
) -> Solver:
    """The FACIMS solver (module docstring) as pure ``init / step / predict`` functions.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits``; a parameter pytree is a network.
      config: :class:`FacimsConfig` (its static fields fix the program; its numbers are only the
        defaults of ``init``'s ``hyperparams``).
      class_counts: training rows per class [K] (``v_bar`` and the balanced loss); the default of
        ``init``'s ``class_counts`` (only K is fixed by the program).
      group_counts: training rows per group [G] before any resampling (frequency-scaled SAM); the
        default of ``init``'s ``group_counts`` (only G is fixed).
      batch_size: train rows per group per middle step. val_batch_size: per upper step.
      local_optimizer, global_optimizer, hparam_optimizer: the optimisers of the three levels:
        None (Adagrad, Adagrad, SGD with ``hparam_momentum``), a factory
        ``learning_rate -> optax.GradientTransformation`` such as ``optax.adam`` (the config's
        learning rate of that level stays a traced hyperparameter; the global one arrives
        decayed by ``global_decay ** rounds``), or a ready transformation (used as it is).
        The hypergradient of ``v`` is always clipped to ``hparam_max_grad_norm`` first.

    Returns:
      A :class:`fairopt.train.Solver`:
      ``init(key, params, hyperparams=None, *, class_counts=None, group_counts=None) -> FacimsState``
      (every argument may be batched with ``jax.vmap`` for a sweep);
      ``step(state, FacimsData(train, val)) -> (state, metrics)`` runs one round;
      ``predict(state, x, key=None)`` is the Monte-Carlo average of the global posterior's
      probabilities over ``num_eval_samples`` draws (``key=None``: drawn from the state's key,
      so a state always predicts the same).
    """
    if not isinstance(config, FacimsConfig):
        raise TypeError(f"config must be a FacimsConfig, got {type(config).__name__}")
    class_counts, group_counts = _check_counts(class_counts, group_counts)
    num_classes, num_groups = len(class_counts), len(group_counts)
    if batch_size < 1 or val_batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_size}, {val_batch_size}")
    if config.groups_per_step is not None and config.groups_per_step > num_groups:
        raise ValueError(f"groups_per_step={config.groups_per_step} exceeds the {num_groups} groups")
    optimizers = (
        sweep.optimizer_factory(local_optimizer, "local_optimizer"),
        sweep.optimizer_factory(global_optimizer, "global_optimizer"),
        sweep.optimizer_factory(hparam_optimizer, "hparam_optimizer"),
    )

    def parts_for(state: FacimsState, global_learning_rate=None) -> FacimsParts:
        return _group_functions(
            apply_fn, config, state.hyperparams, class_counts=state.class_counts, group_counts=state.group_counts,
            optimizers=optimizers, global_learning_rate=global_learning_rate,
        )

    # ---- solver functions -----------------------------------------------------------------------

    def init(key, params, hyperparams: FacimsHyperparams | None = None, *, class_counts=class_counts,
             group_counts=group_counts) -> FacimsState:
        hyperparams = sweep.as_hyperparams(hyperparams, FacimsHyperparams, config.hyperparams())
        counts = jnp.asarray(class_counts, jnp.float32), jnp.asarray(group_counts, jnp.float32)
        if counts[0].shape != (num_classes,) or counts[1].shape != (num_groups,):
            raise ValueError(
                f"init's class_counts / group_counts must have shapes ({num_classes},) / ({num_groups},) like the "
                f"solver's, got {counts[0].shape} / {counts[1].shape}"
            )
        log_std = jnp.log(hyperparams.init_std)
        global_q = posterior.Gaussian(
            jax.tree_util.tree_map(jnp.asarray, params),
            jax.tree_util.tree_map(lambda leaf: jnp.full(jnp.shape(leaf), log_std, jnp.result_type(leaf)), params),
        )
        local_q = jax.tree_util.tree_map(lambda leaf: jnp.repeat(leaf[None], num_groups, axis=0), global_q)
        state = FacimsState(
            global_posterior=global_q, local_posteriors=local_q, vs_params=None, local_opt_state=None,
            global_opt_state=None, hparam_opt_state=None, rounds=jnp.zeros((), jnp.int32), key=key,
            hyperparams=hyperparams, class_counts=counts[0], group_counts=counts[1],
        )
        parts = parts_for(state)
        return state._replace(
            vs_params=parts.v_bar,
            local_opt_state=jax.vmap(parts.local_optimizer.init)(local_q),
            global_opt_state=parts.global_optimizer.init(global_q),
            hparam_opt_state=parts.hparam_optimizer.init(parts.v_bar),
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
        train, val = _check_round_input(data, num_groups)
        h = state.hyperparams
        # The global step of this round: global_learning_rate * global_decay ** rounds.
        parts = parts_for(state, h.global_learning_rate * h.global_decay ** state.rounds.astype(jnp.float32))
        beta = parts.sharpness
        key, round_key = jax.random.split(state.key)
        middle_key, upper_key, active_key, _ = jax.random.split(round_key, 4)  # 4: the streams of recorded runs
        middle_keys = jax.random.split(middle_key, (config.middle_steps, 2))
        upper_keys = jax.random.split(upper_key, (config.upper_steps, 2))
        groups = jnp.arange(num_groups)
        global_q, vs_params = state.global_posterior, state.vs_params
        active = active_groups(active_key, train)

        def noise_for(key, q, leading, num_draws=config.num_mc):
            return monte_carlo_noise(config, key, q, num_draws) if leading is None else jax.vmap(
                lambda k: monte_carlo_noise(config, k, q, num_draws)
            )(jax.random.split(key, leading))

        one_group_q = jax.tree_util.tree_map(lambda leaf: leaf[0], state.local_posteriors)  # noise shapes

        def middle_draw(batch_key, noise_key):
            """A middle step's train batch [G, B] and Monte-Carlo noise [num_mc, ...] ([G, num_mc, ...]
            without ``common_noise``; keys instead of weight noise with ``local_reparameterisation``)."""
            leading = None if config.common_noise else num_groups
            return sample_group_batch(batch_key, train, batch_size), noise_for(noise_key, one_group_q, leading)

        noise_axis = None if config.common_noise else 0  # the group axis of the noise, if any
        mc_axis = 0 if config.common_noise else 1

        def middle_body(carry, step_keys):
            local_q, opt_state = carry
            batch, noise = middle_draw(*step_keys)
            local_q, opt_state, loss = over_groups(
                parts.middle_step, in_axes=(0, 0, None, None, 0, noise_axis, 0, 0, 0)
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

        whole_val = whole_group_batch(val) if config.whole_validation else None  # every row, padding masked

        def upper_body(carry, step_keys):
            global_q, vs_params, global_opt_state, hparam_opt_state = carry
            val_key, noise_key = step_keys
            num_active = jnp.maximum(jnp.sum(active), 1)
            weight = active.astype(jnp.float32) / num_active
            if config.has_validation_level:
                val_batch = whole_val if config.whole_validation else sample_group_batch(val_key, val, val_batch_size)
                global_noise = noise_for(noise_key, global_q, None, config.validation_draws or config.num_mc)
                grad_global, grad_vs, values = over_groups(
                    parts.group_hypergradient, in_axes=(0, None, None, 0, noise_axis, 0, None, 0)
                )(local_q, global_q, vs_params, last_batch, last_noise, val_batch, global_noise, groups)
            else:
                grad_global, values = jax.vmap(parts.fams_global_gradient, in_axes=(0, None))(local_q, global_q)
                grad_vs = jax.tree_util.tree_map(lambda leaf: jnp.zeros((num_groups,) + leaf.shape), vs_params)
            average = lambda tree: jax.tree_util.tree_map(  # noqa: E731
                lambda leaf: jnp.tensordot(weight, leaf, axes=1), tree
            )
            grad_global, grad_vs = average(grad_global), average(grad_vs)
            updates, global_opt_state = parts.global_optimizer.update(grad_global, global_opt_state, global_q)
            global_q = parts.clip_log_std(optax.apply_updates(global_q, updates))
            if config.learns_hparams:
                updates, hparam_opt_state = parts.hparam_optimizer.update(grad_vs, hparam_opt_state, vs_params)
                vs_params = optax.apply_updates(vs_params, updates)
            return (global_q, vs_params, global_opt_state, hparam_opt_state), jnp.sum(weight * values)

        (global_q, vs_params, global_opt_state, hparam_opt_state), upper_values = jax.lax.scan(
            upper_body,
            (global_q, vs_params, state.global_opt_state, state.hparam_opt_state),
            (upper_keys[:, 0], upper_keys[:, 1]),
        )
        new_state = state._replace(
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
            "divergence": jnp.mean(jax.vmap(parts.divergence, in_axes=(0, None))(local_q, global_q)),
        }
        return new_state, metrics

    def predict(state: FacimsState, x, key=None):
        """Monte-Carlo average of the global posterior's predictive probabilities
        ``(1/S) sum_s softmax(f(x; mu + noise_scale sigma xi_s))`` with ``S = num_eval_samples``
        (``local_reparameterisation``: each pass draws the pre-activations per row;
        ``prediction="mean"``: ``softmax(f(x; mu))``, and ``key`` is unused)."""
        if config.prediction == "mean":
            return posterior.mean_predict(apply_fn, state.global_posterior, x)
        if key is None:
            key = jax.random.fold_in(state.key, 0x5EED)
        scale = state.hyperparams.noise_scale
        if config.local_reparameterisation:
            forward = lambda k: posterior.local_reparameterisation_apply(apply_fn, state.global_posterior, x, k, scale)  # noqa: E731
            keys = jax.random.split(key, config.num_eval_samples)
            return jnp.mean(jax.vmap(lambda k: jax.nn.softmax(forward(k), axis=-1))(keys), axis=0)
        noise = posterior.standard_normal_like(key, state.global_posterior, config.num_eval_samples)
        samples = posterior.sample_draws(state.global_posterior, jax.tree_util.tree_map(lambda e: scale * e, noise))
        probs = jax.vmap(lambda w: jax.nn.softmax(apply_fn(w, x), axis=-1))(samples)
        return jnp.mean(probs, axis=0)

    return Solver(init, step, predict)
