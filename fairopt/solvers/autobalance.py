r"""AutoBalance: bilevel design of a parametric training loss (search, then retrain).

Li, Zhang, Thrampoulidis, Chen, Oymak, "AutoBalance: Optimized Loss Functions for Imbalanced
Data", NeurIPS 2021 — Algorithm 1 (search and retrain phases) with the hypergradient of
Algorithm 2 (implicit differentiation with a Neumann series), SPEC §6.

**Lower level** (model ``theta`` on the search-train split ``S_T``), the parametric
cross-entropy of eq. (2.2) / (4.2) with personalised augmentation ``A``:

.. math::
    \ell_{train}(y, g, x; \alpha) = -w_{yg}\,\log
      \frac{\exp(\sigma(d_{yg}) f_y(A_y(x)) + l_{yg})}{\sum_k \exp(\sigma(d_{kg}) f_k(A_y(x)) + l_{kg})},

reduced over a batch as the weighted mean ``sum_i w_i l_i / sum_i w_i`` (the PyTorch
``cross_entropy(weight=...)`` reduction of the official code). Without the group axis every
parameter is indexed by the class only (eq. 2.2). ``Delta = sigmoid(d)`` (the paper clamps
Delta into (0, 1)).

**Upper level** (hyperparameters ``alpha`` on the search-validation split ``S_V``): the
validation objective

``L_fair`` in {CE, CE_bal, CE_bal^G, CE_deo (eq. 4.1), the blend, the smoothed worst cell}
(:func:`fairopt.losses.make_validation_objective`: ``ce``, ``balanced_ce``,
``group_balanced_ce``, ``deo``, ``blend``, ``worst_group_ce``) of the plain cross-entropy, where the blend is

.. math::
    \mathcal{L}_{fair} = (1 - \lambda_{val})\,\mathrm{CE} + \lambda_{val}\,\mathrm{CE}_{deo}

(paper §2.1 and §4; Table 3 uses ``lambda_val = 0.1``), minimised with the implicit
hypergradient (SPEC §5, :func:`fairopt.implicit.implicit_hypergradient`)

.. math::
    \frac{d\mathcal{L}_{fair}}{d\alpha} = -\,\partial^2_{\alpha,\theta}\mathcal{L}_{train}\,
      H^{-1}\,\nabla_\theta \mathcal{L}_{fair}, \qquad H = \nabla^2_\theta \mathcal{L}_{train},

where ``L_train`` is averaged over ``train_batches`` train batches (the official ``d_train``) and
``L_fair`` over ``val_batches`` validation batches, and ``H^{-1} v`` is the Neumann series with
``alpha = 1, J = 5`` (official code) unless configured otherwise.

**Algorithm 1.** Search phase: ``warmup_steps`` lower steps with the initial loss; afterwards, every
``iter_interval`` lower steps, one upper step (before the lower step, as in the official code).
Retrain phase: freeze ``alpha``, reset the model, train on ``S_T ∪ S_V`` for the same number of
epochs (:func:`retrain_solver`, :func:`search_and_retrain`).

Search spaces (``search_space``, :mod:`fairopt.hparams`): ``"la_tau"`` (``l = tau log pi``, the
paper's "tau of LA loss"), ``"shift"`` (``l``), ``"scale"`` (``Delta``), ``"shift_scale"``
(``l & Delta``), ``"weight"`` (``w``); ``augment=True`` adds the per-class augmentation radii
(:mod:`fairopt.augment`, Lemma 2). Inits (``init``): ``"ones"`` (``w = 1, l = 0, d = 1``, i.e.
``Delta = sigmoid(1) = 0.731``, the official ``Ones/Zeros``), ``"la"`` (``l = tau log pi``), and
the CDT / VS / Group-LA inits of :func:`fairopt.hparams.init_hparams`. Class clustering
(``cluster_size = C``, §2.2, :func:`fairopt.hparams.class_clusters`): classes sorted by training
frequency are grouped into contiguous blocks of ``C`` (a smaller last block is allowed) and
share one hyperparameter, ``alpha_full = D alpha'`` with the ``K x K'`` indicator ``D``. With
``per_group`` every raw leaf is ``[K', G]`` (eq. 4.2).

Decisions and deviations from the official code (github.com/ucr-optml/AutoBalance):

* Weights are ``w = exp(u)`` (:func:`fairopt.hparams.to_loss_kwargs`) so the upper level cannot
  make them negative (the official code updates raw weights, and never searched them in its
  configs). Augmentation radii are ``eps = softplus(r)``.
* The "la" init of the (class, group) loss repeats the per-class ``tau log pi_k`` over groups
  (:func:`fairopt.hparams.init_hparams`).
* The inner loss of the hypergradient includes the lower level's L2 penalty
  ``(weight_decay / 2) ||theta||^2`` (SGD with weight decay minimises exactly that), which
  keeps the Hessian positive definite; the official code leaves it out of ``d_train``.
* The official code additionally takes, at every lower step of the search, an upper-optimiser
  step on the *direct* gradient of the validation loss, which is zero for these
  hyperparameters (with old PyTorch ``zero_grad`` semantics that step still applied momentum
  and weight decay every iteration). fairopt updates ``alpha`` only at hypergradient steps.
* Because the batch loss is the weighted *mean*, only the ratios of the weights matter (a common
  factor cancels), as in the official code.
* The upper optimiser is SGD with momentum (official) or Adam (``upper_optimizer``); its step
  decays at the same lower-step counts (``lr_decay_steps``) as the lower level's.
* Every number of :class:`AutoBalanceConfig` (:class:`AutoBalanceHyperparams`) is data: ``init``
  stores it in the state and ``step`` reads it, so one compiled program serves a sweep
  (``jax.vmap`` over settings and seeds); the solver has no training-loop settings: it counts
  lower steps, and its batch size is the shape of the batch it is given.
* Neumann series: fairopt's :func:`fairopt.implicit.neumann_inverse_hvp` returns
  ``alpha sum_j (I - alpha H)^j v`` (equal to the official code's at ``alpha = 1``).
* The Table 1 image pipelines (ResNet-32, AutoAugment policies for PDA) are replaced by MLPs
  on tabular features and the spherical augmentation of Lemma 2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairopt import augment as augment_lib
from fairopt import hparams as hparams_lib
from fairopt import implicit, losses, sweep
from fairopt.sweep import HyperparameterConfig
from fairopt.train import (
    Batch,
    CheckpointStore,
    Progress,
    Solver,
    check_finite,
    fit_resumable,
    make_epoch_fn,
    shuffled_batch_indices,
)

SEARCH_SPACES = hparams_lib.SEARCH_SPACES  # ("la_tau", "shift", "scale", "shift_scale", "weight")
INITS = hparams_lib.INITS  # ("ones", "zeros", "la", "cdt", "vs")
VAL_OBJECTIVES = losses.VALIDATION_OBJECTIVES  # ce, balanced_ce, group_balanced_ce, deo, blend, worst_group_ce
UPPER_OPTIMIZERS = ("sgd", "adam")
DEO_REDUCTIONS = losses.DEO_REDUCTIONS
_GROUP_OBJECTIVES = losses.GROUP_OBJECTIVES


class AutoBalanceHyperparams(NamedTuple):
    """The numeric settings of :class:`AutoBalanceConfig`, traced: ``init`` stores them in the
    state and ``step`` reads them from there, so a sweep over them is one compiled program.

    (Not to be confused with :class:`AutoBalanceHparams`, the loss hyperparameters ``alpha``
    that the upper level *learns*.)
    """

    tau: jax.Array
    lambda_val: jax.Array
    val_temperature: jax.Array
    augment_radius_init: jax.Array
    lower_learning_rate: jax.Array
    lower_momentum: jax.Array
    lower_weight_decay: jax.Array
    upper_learning_rate: jax.Array
    upper_momentum: jax.Array
    upper_weight_decay: jax.Array
    lr_decay_factor: jax.Array
    neumann_alpha: jax.Array
    damping: jax.Array
    max_hypergrad_norm: jax.Array  # the largest float32: no clipping
    trust_radius: jax.Array  # the largest float32: no trust region


@dataclasses.dataclass(frozen=True)
class AutoBalanceConfig(HyperparameterConfig):
    """Settings of :func:`autobalance`. The defaults are the project's tabular settings
    (``experiments/autobalance.py`` derives its flags from them); the official CIFAR values of
    Li et al.'s code are given in brackets where they differ.

    The fields named in :class:`AutoBalanceHyperparams` are *hyperparameters*: numbers that
    ``init`` stores in the state and ``step`` reads from there (changing one never recompiles;
    ``jax.vmap`` sweeps over them, :mod:`fairopt.sweep`). The other fields are static: they change
    the compiled program. Training-loop settings (epochs, batch size) are not here: the solver
    counts lower steps, and the lower batch size is the shape of the batch it is given.

    Attributes:
      search_space: what the upper level learns: la_tau, shift (l), scale (Delta), shift_scale
        (l and Delta) or weight (w).
      init: initial loss: ones or zeros (w = 1, l = 0, d = 1), la (l = tau log pi), cdt, vs, or group_la
        (Group-LA: w = 1/pi_g, l = tau log pi_{k|g}; per_group only).
      tau: logit-adjustment temperature of the la/vs inits (and the start of la_tau).
      gamma: CDT exponent of the cdt/vs inits, ``Delta_k = sigmoid(1) (n_k / n_max)^gamma``.
      val_objective: upper-level objective: ce, balanced_ce, group_balanced_ce, deo (CE_deo,
        eq. 4.1), blend ((1 - lambda_val) CE + lambda_val CE_deo) or worst_group_ce (the smoothed
        worst (class, group) cell loss ``T log mean_c exp(L_c / T)``,
        :func:`fairopt.losses.soft_worst_group_mean`).
      lambda_val: the CE_deo weight of the blend objective, in [0, 1].
      val_temperature: the temperature T > 0 of worst_group_ce (T -> 0: the worst cell's loss;
        large T: CE_bal^G).
      deo_reduce: reduction over groups of the DEO surrogate for G > 2: mean or max.
      cluster_size: classes per frequency cluster C sharing one hyperparameter (1: none).
      per_group: (class, group) hyperparameters of eq. (4.2).
      augment: learn per-class spherical augmentation radii (Lemma 2).
      augment_radius_init: initial augmentation radius eps_y of every class.
      warmup_steps: lower steps with the initial loss before the first upper step.
      iter_interval: lower steps between upper steps [official 20].
      train_batches: lower batches (of the step's batch size) sampled for d_train, the inner loss
        of the hypergradient [official 10].
      val_batches: validation batches of that size for the upper gradient (all validation rows
        when there are fewer) [official 10].
      lower_learning_rate: SGD step of the model [official 0.1].
      lower_momentum: SGD momentum of the model.
      lower_weight_decay: weight decay of the model [official 1e-4].
      upper_optimizer: optimiser of the loss hyperparameters: sgd (official) or adam.
      upper_learning_rate: step of the upper optimiser [official 0.01 with sgd].
      upper_momentum: momentum of the upper SGD.
      upper_weight_decay: weight decay of the upper optimiser.
      lr_decay_steps: lower-step counts at which both learning rates are multiplied by
        lr_decay_factor (official: epochs 220 and 260 of 300).
      lr_decay_factor: the learning-rate decay factor.
      inverse: inverse-Hessian-vector product of the hypergradient: neumann, cg or exact (tiny
        models only).
      neumann_alpha: Neumann series step [official 1].
      neumann_terms: Neumann series terms J (inverse=neumann).
      cg_iters: conjugate-gradient iterations (inverse=cg), >= 1.
      damping: H + damping I in the inverse.
      max_hypergrad_norm: clip the hypergradient to this global norm (None: no clipping).
      trust_radius: trust region of the search around the initial loss: after every upper step
        the raw hyperparameters are projected onto ``||alpha - alpha_0||_2 <= trust_radius``
        (alpha_0: ``init`` at ``tau``); 0 keeps the initial loss, so the init itself is one point
        of a sweep (None: no trust region).
    """

    Hyperparams: ClassVar[type] = AutoBalanceHyperparams
    CHOICES: ClassVar[dict] = {
        "search_space": SEARCH_SPACES,
        "init": INITS,
        "val_objective": VAL_OBJECTIVES,
        "deo_reduce": DEO_REDUCTIONS,
        "upper_optimizer": UPPER_OPTIMIZERS,
        "inverse": implicit.INVERSES,
    }

    search_space: str = "shift_scale"
    init: str = "ones"
    tau: float = 1.0
    gamma: float = 0.3
    val_objective: str = "balanced_ce"
    lambda_val: float = 0.1
    val_temperature: float = losses.WORST_GROUP_TEMPERATURE
    deo_reduce: str = "mean"
    cluster_size: int = 1
    per_group: bool = False
    augment: bool = False
    augment_radius_init: float = 0.1
    warmup_steps: int = 0
    iter_interval: int = 5
    train_batches: int = 2
    val_batches: int = 4
    lower_learning_rate: float = 0.05
    lower_momentum: float = 0.9
    lower_weight_decay: float = 5e-4
    upper_optimizer: str = "adam"
    upper_learning_rate: float = 0.1
    upper_momentum: float = 0.9
    upper_weight_decay: float = 1e-4
    lr_decay_steps: tuple[int, ...] = ()
    lr_decay_factor: float = 0.1
    inverse: str = "neumann"
    neumann_alpha: float = 0.1
    neumann_terms: int = 5
    cg_iters: int = 5
    damping: float = 0.0
    max_hypergrad_norm: float | None = None
    trust_radius: float | None = None

    OPTIONAL: ClassVar[tuple[str, ...]] = ("max_hypergrad_norm", "trust_radius")  # None: off (largest float32)

    def __post_init__(self):
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"AutoBalanceConfig.{name}={getattr(self, name)!r}; choose one of {', '.join(choices)}")
        for name in self.hyperparameter_names():
            value = getattr(self, name)
            if name in self.OPTIONAL and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value):
                raise ValueError(f"AutoBalanceConfig.{name} must be a finite number, got {value!r}")
        if not 0.0 <= self.lambda_val <= 1.0:
            raise ValueError(f"AutoBalanceConfig.lambda_val must be in [0, 1], got {self.lambda_val}")
        for name in ("cluster_size", "iter_interval", "train_batches", "val_batches", "cg_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"AutoBalanceConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lower_learning_rate", "upper_learning_rate", "neumann_alpha", "lr_decay_factor", "val_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"AutoBalanceConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("lower_momentum", "upper_momentum", "lower_weight_decay", "upper_weight_decay", "damping",
                     "augment_radius_init", "neumann_terms", "warmup_steps", "tau", "gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"AutoBalanceConfig.{name} must be >= 0, got {getattr(self, name)}")
        try:
            steps = tuple(int(b) for b in self.lr_decay_steps)
        except (TypeError, ValueError):
            raise ValueError(f"AutoBalanceConfig.lr_decay_steps must be step counts, got {self.lr_decay_steps!r}") from None
        if any(b < 1 or b != v for b, v in zip(steps, self.lr_decay_steps)) or list(steps) != sorted(set(steps)):
            raise ValueError(
                f"AutoBalanceConfig.lr_decay_steps must be increasing whole step counts >= 1, got {self.lr_decay_steps!r}"
            )
        object.__setattr__(self, "lr_decay_steps", steps)
        if self.max_hypergrad_norm is not None and not self.max_hypergrad_norm > 0:
            raise ValueError(f"AutoBalanceConfig.max_hypergrad_norm must be None or > 0, got {self.max_hypergrad_norm}")
        if self.trust_radius is not None and not self.trust_radius >= 0:
            raise ValueError(f"AutoBalanceConfig.trust_radius must be None or >= 0, got {self.trust_radius}")

    def hyperparams(self) -> AutoBalanceHyperparams:
        """The numeric fields as float32 scalars (``max_hypergrad_norm`` / ``trust_radius`` None
        become the largest float32, i.e. no clipping / no trust region, so the state stays finite)."""
        values = {name: getattr(self, name) for name in self.hyperparameter_names()}
        for name in self.OPTIONAL:
            if values[name] is None:
                values[name] = float(np.finfo(np.float32).max)
        return AutoBalanceHyperparams(**{name: jnp.asarray(value, jnp.float32) for name, value in values.items()})

    @property
    def objective_name(self) -> str:
        """A readable name of the validation objective, e.g. ``0.9*ce+0.1*deo``."""
        if self.val_objective != "blend":
            return self.val_objective
        return f"{1 - self.lambda_val:g}*ce+{self.lambda_val:g}*deo"


def decay_steps(fractions: Sequence[float], total_steps: int) -> tuple[int, ...]:
    """``lr_decay_steps`` from fractions of a run of ``total_steps`` lower steps (e.g. the
    official ``(220/300, 260/300)``): ``round(f * total_steps)``, those strictly inside the run."""
    return tuple(sorted({int(round(f * total_steps)) for f in fractions} & set(range(1, total_steps))))


class AutoBalanceHparams(NamedTuple):
    """Everything the upper level learns (raw, unconstrained; a pytree).

    Attributes:
      loss: :class:`fairopt.hparams.LossHparams` (raw ``weight``, ``shift``, ``scale_logit``;
        leaves ``[K']``, ``[K', G]``, or ``[1]`` / ``[1, G]`` for the ``la_tau`` shift).
      radius: ``[K']`` raw augmentation radii, ``eps = softplus(D radius)``.
    """

    loss: hparams_lib.LossHparams
    radius: jax.Array


class LossParams(NamedTuple):
    """Effective per-class (``[K]``) or per-(class, group) (``[K, G]``) loss parameters."""

    weight: jax.Array
    shift: jax.Array
    scale: jax.Array
    radius: jax.Array  # [K] (zeros without augmentation)


class AutoBalanceState(NamedTuple):
    params: Any
    opt_state: Any
    hparams: AutoBalanceHparams
    hparam_opt_state: Any
    step: jax.Array  # int32: lower steps taken
    key: jax.Array  # raw uint32 key data (jax.random.key_data), so numpy-based checks accept it
    hyperparams: AutoBalanceHyperparams  # the config's numbers (traced; vmap-able)


class HyperData(NamedTuple):
    """Full search-train and search-validation arrays (sampled inside the upper step)."""

    train_x: jax.Array
    train_y: jax.Array
    train_groups: jax.Array
    val_x: jax.Array
    val_y: jax.Array
    val_groups: jax.Array


class SearchBatch(NamedTuple):
    """What one search step consumes: a lower minibatch and the data of the upper level."""

    train: Batch
    data: HyperData


def _key_data(key: jax.Array) -> jax.Array:
    """Raw key data of a typed key (``jax.random.key``) or of a legacy ``PRNGKey`` array."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return jnp.asarray(key)


def _decayed(base, factor, step, boundaries: Sequence[int]):
    """``base * factor ** (number of boundaries <= step)`` (optax's piecewise-constant schedule)."""
    if not boundaries:
        return base
    passed = sum((step >= b).astype(jnp.float32) for b in boundaries)
    return base * factor**passed


def make_lower_optimizer(config: AutoBalanceConfig) -> optax.GradientTransformation:
    """The lower-level optimiser at the config's numbers: SGD with momentum and weight decay, the
    step decayed at ``config.lr_decay_steps`` (its own update count). Exposed so that fixed-loss
    baselines can be trained with exactly the same optimiser."""
    if not isinstance(config, AutoBalanceConfig):
        raise TypeError(f"config must be an AutoBalanceConfig, got {type(config).__name__}")
    schedule = config.lower_learning_rate
    if config.lr_decay_steps:
        schedule = optax.piecewise_constant_schedule(
            config.lower_learning_rate, {b: config.lr_decay_factor for b in config.lr_decay_steps}
        )
    return optax.chain(
        optax.add_decayed_weights(config.lower_weight_decay),
        optax.sgd(schedule, momentum=config.lower_momentum or None),
    )


def check_labels_and_groups(labels, groups, *, num_classes: int, num_groups: int, name: str = "data") -> None:
    """Host-side check (a compiled step cannot raise on values): labels in ``[0, num_classes)``
    and group ids in ``[0, num_groups)``, else a ValueError saying how to fix it."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} labels must lie in [0, num_classes={num_classes}), got {int(labels.min())}..{int(labels.max())}"
        )
    if groups.size and (groups.min() < 0 or groups.max() >= num_groups):
        raise ValueError(
            f"{name} group ids must lie in [0, num_groups={num_groups}), got {int(groups.min())}..{int(groups.max())}; "
            "pass num_groups (or cell_counts with that many columns) covering every group"
        )


class AutoBalanceSolver(NamedTuple):
    """A :class:`fairopt.train.Solver` with the extra pure functions of the bilevel method.

    Attributes:
      init: ``init(key, params, hyperparams=None, *, hparams=None) -> AutoBalanceState``
        (``hyperparams``: an :class:`AutoBalanceHyperparams`, default ``config.hyperparams()``;
        ``hparams``: start from given raw loss hyperparameters, e.g. the searched ones for the
        retrain phase). Every argument may be batched with ``jax.vmap`` for a sweep.
      step: search phase: ``step(state, SearchBatch)``; retrain phase: ``step(state, Batch)``.
      predict: ``predict(state, x, key=None) -> probabilities [n, K]`` (plain softmax of the
        model; the loss adjustments act only during training).
      loss_params: ``loss_params(raw) -> LossParams`` (the effective ``[K]`` / ``[K, G]`` values).
      train_objective: ``train_objective(params, raw, x, y, groups, mask, noise) -> scalar``.
      val_objective: ``val_objective(params, x, y, groups, mask, hyperparams=None) -> scalar``.
      hypergradient: ``hypergradient(params, raw, train_rows, val_rows, noise, hyperparams=None)
        -> (AutoBalanceHparams, val objective)``, with ``train_rows`` / ``val_rows`` as
        :class:`Batch`; the search-space mask is applied (non-searched entries are zero).
      initial_hparams: ``initial_hparams(hyperparams=None) -> AutoBalanceHparams`` from ``init``
        / ``tau`` / ``augment_radius_init``.
      config: the :class:`AutoBalanceConfig`.
      class_counts, cell_counts, num_features: what the solver was built from (the retrain
        phase reuses them, :func:`retrain_solver`).
      lockstep_step: search phase only: ``lockstep_step(states, batches)``, ``jax.vmap(step)``
        for runs with a leading axis that take their steps together (a sweep), with the upper
        update decided once for all runs (a real branch rather than a per-run select);
        :func:`make_lockstep_search_epoch_fn` uses it.
    """

    init: Callable
    step: Callable
    predict: Callable
    loss_params: Callable
    train_objective: Callable
    val_objective: Callable
    hypergradient: Callable
    initial_hparams: Callable
    config: AutoBalanceConfig
    class_counts: np.ndarray
    cell_counts: np.ndarray | None
    num_features: int
    lockstep_step: Callable | None = None


def autobalance(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    config: AutoBalanceConfig,
    *,
    class_counts: Sequence[int],
    cell_counts: np.ndarray | None = None,
    num_features: int,
    search: bool = True,
    lower_optimizer=None,
    hparam_optimizer=None,
) -> AutoBalanceSolver:
    """Build the AutoBalance solver (search phase, or the frozen-loss retrain phase).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits [B, K]``.
      config: :class:`AutoBalanceConfig` (its static fields fix the program; its numbers are
        only the defaults of ``init``'s ``hyperparams``).
      class_counts: ``[K]`` training class counts of the split the loss is designed on (they set
        the clusters and the LA init).
      cell_counts: ``[K, G]`` (class, group) counts; required with ``config.per_group`` or with a
        group validation objective (``group_balanced_ce``, ``deo``, ``blend``); they give ``G``.
      num_features: input dimension ``d`` (for the augmentation noise).
      search: True for the search phase (upper steps after ``config.warmup_steps`` lower steps);
        False for the retrain phase (hyperparameters frozen, ``step`` consumes a plain
        :class:`fairopt.train.Batch`).
      lower_optimizer, hparam_optimizer: the model's and the loss hyperparameters' optimisers:
        None (SGD with ``lower_momentum`` / ``config.upper_optimizer``), a factory
        ``learning_rate -> optax.GradientTransformation`` such as ``optax.adam`` (it receives the
        traced, decayed learning rate of the step), or a ready transformation (used as it is).
        Weight decay (``lower_weight_decay`` / ``upper_weight_decay``) is chained before either.

    Returns:
      An :class:`AutoBalanceSolver`.

    Raises:
      ValueError: inconsistent counts or configuration (the message names the argument).
      TypeError: a wrong config or optimiser type.
    """
    if not isinstance(config, AutoBalanceConfig):
        raise TypeError(f"config must be an AutoBalanceConfig, got {type(config).__name__}")
    lower_factory = sweep.optimizer_factory(lower_optimizer, "lower_optimizer")
    upper_factory = sweep.optimizer_factory(hparam_optimizer, "hparam_optimizer")
    class_counts = np.asarray(class_counts)
    if class_counts.ndim != 1 or class_counts.size < 2:
        raise ValueError(f"class_counts must be a [K] vector with K >= 2, got shape {class_counts.shape}")
    num_classes = int(class_counts.size)
    needs_groups = config.per_group or config.val_objective in _GROUP_OBJECTIVES
    if cell_counts is not None:
        cell_counts = np.asarray(cell_counts)
        if cell_counts.ndim != 2 or cell_counts.shape[0] != num_classes:
            raise ValueError(f"cell_counts must be [K={num_classes}, G], got shape {cell_counts.shape}")
        num_groups = int(cell_counts.shape[1])
    elif needs_groups:
        raise ValueError(
            "cell_counts ([K, G] (class, group) counts) is required with per_group=True or a group "
            f"validation objective (val_objective={config.val_objective!r})"
        )
    else:
        num_groups = 1
    if config.per_group and num_groups < 2:
        raise ValueError(f"per_group=True needs cell_counts with G >= 2 groups, got G={num_groups}")
    if config.val_objective in ("deo", "blend") and num_groups < 2:
        raise ValueError(f"val_objective={config.val_objective!r} needs cell_counts with G >= 2 groups, got G={num_groups}")
    if config.cluster_size > num_classes:
        raise ValueError(f"config.cluster_size={config.cluster_size} exceeds the number of classes {num_classes}")
    if num_features < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features}")

    if config.init == "group_la" and not config.per_group:
        raise ValueError("init='group_la' (weights 1/pi_g, shift tau log pi_{k|g}) needs per_group=True ([K, G] parameters)")

    def search_space(tau: float):
        return hparams_lib.make_search_space(
            config.search_space,
            np.maximum(class_counts, 1),  # LA/CDT inits need positive counts
            init=config.init,
            cluster_size=config.cluster_size,
            num_groups=num_groups if config.per_group else None,
            cell_counts=cell_counts if config.init == "group_la" else None,
            tau=tau,
            gamma=config.gamma,
        )

    # The initial raw hyperparameters are affine in tau (l = tau log pi, projected linearly on
    # the clusters), so a traced tau is exact: h(tau) = h(0) + tau (h(1) - h(0)).
    space, space_at_zero = search_space(1.0), search_space(0.0)
    tau_slope = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float32) - np.asarray(b, np.float32),
                                       space.hparams, space_at_zero.hparams)
    clusters = jnp.asarray(space.dictionary.weight)  # [K, K'] frequency clusters
    num_clusters = int(clusters.shape[1])
    trainable = AutoBalanceHparams(space.trainable, config.augment)
    labels = jax.tree_util.tree_map(lambda keep: "train" if keep else "freeze", trainable)
    warmup_steps, boundaries = config.warmup_steps, config.lr_decay_steps

    def validation_for(h: AutoBalanceHyperparams):
        return losses.make_validation_objective(
            config.val_objective, num_classes=num_classes, num_groups=num_groups, lambda_val=h.lambda_val,
            reduce=config.deo_reduce, temperature=h.val_temperature,
        )

    def lower_optimizer_at(h: AutoBalanceHyperparams, step):
        lr = _decayed(h.lower_learning_rate, h.lr_decay_factor, step, boundaries)
        base = lower_factory(lr) if lower_factory is not None else optax.sgd(lr, momentum=h.lower_momentum)
        return optax.chain(optax.add_decayed_weights(h.lower_weight_decay), base)

    def upper_optimizer_at(h: AutoBalanceHyperparams, step):
        # Decays at the same lower-step counts as the lower level's learning rate.
        lr = _decayed(h.upper_learning_rate, h.lr_decay_factor, step, boundaries)
        if upper_factory is not None:
            base = upper_factory(lr)
        elif config.upper_optimizer == "sgd":
            base = optax.sgd(lr, momentum=h.upper_momentum)
        else:
            base = optax.adam(lr)
        return optax.partition(
            {"train": optax.chain(optax.add_decayed_weights(h.upper_weight_decay), base), "freeze": optax.set_to_zero()},
            labels,
        )

    def _hyperparams(hyperparams) -> AutoBalanceHyperparams:
        return sweep.as_hyperparams(hyperparams, AutoBalanceHyperparams, config.hyperparams())

    def initial_hparams(hyperparams: AutoBalanceHyperparams | None = None) -> AutoBalanceHparams:
        h = _hyperparams(hyperparams)
        loss = jax.tree_util.tree_map(lambda zero, slope: jnp.asarray(zero, jnp.float32) + h.tau * slope,
                                      space_at_zero.hparams, tau_slope)
        radius_raw = jnp.log(jnp.expm1(jnp.maximum(h.augment_radius_init, 1e-6)))  # softplus^{-1}
        return AutoBalanceHparams(loss, jnp.full((num_clusters,), radius_raw, jnp.float32))

    def loss_params(raw: AutoBalanceHparams) -> LossParams:
        kwargs = hparams_lib.to_loss_kwargs(raw.loss, space.dictionary)
        if config.augment:
            radius = jax.nn.softplus(hparams_lib.expand(raw.radius, clusters))
        else:
            radius = jnp.zeros((num_classes,), jnp.float32)
        return LossParams(weight=kwargs["weight"], shift=kwargs["shift"], scale=kwargs["scale"], radius=radius)

    def train_objective(params, raw: AutoBalanceHparams, x, y, groups, mask, noise):
        """Weighted mean ``sum_i w_i l_i / sum_i w_i`` of the parametric CE (2.2)/(4.2)."""
        loss = loss_params(raw)
        if config.augment:
            x = augment_lib.spherical_augment(x, y, loss.radius, noise)
        logits = apply_fn(params, x)
        if config.per_group:
            per_example = losses.vs_loss(
                logits, y, weight=loss.weight, shift=loss.shift, scale=loss.scale, groups=groups
            )
            row_weight = loss.weight[y, groups]
        else:
            per_example = losses.vs_loss(logits, y, weight=loss.weight, shift=loss.shift, scale=loss.scale)
            row_weight = loss.weight[y]
        mask = mask.astype(per_example.dtype)
        return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(row_weight * mask), 1e-12)

    def val_objective(params, x, y, groups, mask, hyperparams=None):
        """The validation objective ``config.val_objective`` of the plain cross-entropy."""
        per_example = losses.cross_entropy(apply_fn(params, x), y)
        return validation_for(_hyperparams(hyperparams))(per_example, y, groups, mask)

    def hypergradient(params, raw: AutoBalanceHparams, train_rows: Batch, val_rows: Batch, noise, hyperparams=None):
        h = _hyperparams(hyperparams)

        def inner(params, raw):
            l2 = 0.5 * h.lower_weight_decay * optax.tree.norm(params, squared=True)
            return train_objective(params, raw, train_rows.x, train_rows.y, train_rows.groups, train_rows.mask, noise) + l2

        # The validation rows are closed over rather than passed as ``outer_args``:
        # implicit_hypergradient differentiates its outer_args, which fails on integer labels.
        def outer(params, raw):
            del raw  # L_fair does not depend on alpha directly (paper §2.1)
            return val_objective(params, val_rows.x, val_rows.y, val_rows.groups, val_rows.mask, h)

        grads, _ = implicit.implicit_hypergradient(
            inner,
            outer,
            params,
            raw,
            (),
            inverse=config.inverse,
            alpha=h.neumann_alpha,
            num_terms=config.neumann_terms,
            cg_iters=config.cg_iters,
            damping=h.damping,
        )
        grads = AutoBalanceHparams(
            hparams_lib.freeze_gradients(grads.loss, space.trainable),
            grads.radius if config.augment else jnp.zeros_like(grads.radius),
        )
        value = val_objective(params, val_rows.x, val_rows.y, val_rows.groups, val_rows.mask, h)
        return grads, value

    def init(key, params, hyperparams: AutoBalanceHyperparams | None = None, *,
             hparams: AutoBalanceHparams | None = None) -> AutoBalanceState:
        h = _hyperparams(hyperparams)
        raw = initial_hparams(h) if hparams is None else jax.tree_util.tree_map(jnp.asarray, hparams)
        step = jnp.zeros((), jnp.int32)
        return AutoBalanceState(
            params=params,
            opt_state=lower_optimizer_at(h, step).init(params),
            hparams=raw,
            hparam_opt_state=upper_optimizer_at(h, step).init(raw),
            step=step,
            key=_key_data(key),
            hyperparams=h,
        )

    def _noise(key, shape):
        if not config.augment:
            return jnp.zeros(shape, jnp.float32)
        return augment_lib.unit_ball_noise(key, shape)

    def _sample_rows(key, x, y, groups, wanted):
        """``wanted`` rows drawn without replacement (or all rows if fewer)."""
        num_rows = x.shape[0]
        if num_rows <= wanted:
            return Batch(x, y, groups, jnp.ones((num_rows,), bool))
        rows = jax.random.permutation(key, num_rows)[:wanted]
        return Batch(x[rows], y[rows], groups[rows], jnp.ones((wanted,), bool))

    def upper_update(state: AutoBalanceState, data: HyperData, key, batch_size: int):
        h = state.hyperparams
        train_key, val_key, noise_key = jax.random.split(key, 3)
        train_rows = _sample_rows(train_key, data.train_x, data.train_y, data.train_groups,
                                  config.train_batches * batch_size)
        val_rows = _sample_rows(val_key, data.val_x, data.val_y, data.val_groups, config.val_batches * batch_size)
        noise = _noise(noise_key, train_rows.x.shape)
        grads, value = hypergradient(state.params, state.hparams, train_rows, val_rows, noise, h)
        norm = optax.tree.norm(grads)
        factor = jnp.minimum(1.0, h.max_hypergrad_norm / jnp.maximum(norm, 1e-12))  # None in the config: no clipping
        grads = jax.tree_util.tree_map(lambda g: g * factor, grads)
        updates, hparam_opt_state = upper_optimizer_at(h, state.step).update(grads, state.hparam_opt_state, state.hparams)
        hparams = within_trust_region(optax.apply_updates(state.hparams, updates), h)
        return hparams, hparam_opt_state, value, norm

    def within_trust_region(hparams: AutoBalanceHparams, h: AutoBalanceHyperparams) -> AutoBalanceHparams:
        """The projection of ``hparams`` onto ``{alpha : ||alpha - alpha_0||_2 <= h.trust_radius}``."""
        anchor = initial_hparams(h)
        offset = jax.tree_util.tree_map(jnp.subtract, hparams, anchor)
        factor = jnp.minimum(1.0, h.trust_radius / jnp.maximum(optax.tree.norm(offset), 1e-12))
        return jax.tree_util.tree_map(lambda a, d: a + factor * d, anchor, offset)

    def lower_update(state: AutoBalanceState, hparams: AutoBalanceHparams, batch: Batch, key):
        noise = _noise(key, batch.x.shape)
        frozen = jax.lax.stop_gradient(hparams)
        loss, grads = jax.value_and_grad(train_objective)(
            state.params, frozen, batch.x, batch.y, batch.groups, batch.mask, noise
        )
        optimizer = lower_optimizer_at(state.hyperparams, state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state, loss

    def check_search_input(state, batch):
        if not isinstance(batch, SearchBatch) or not isinstance(batch.train, Batch):
            hint = " (a Batch is the retrain phase's input: autobalance(..., search=False))" if isinstance(batch, Batch) else ""
            raise TypeError(
                "the AutoBalance search step takes fairopt.solvers.autobalance.SearchBatch(train=fairopt.train.Batch, "
                f"data=HyperData); got {type(batch).__name__}{hint}"
            )
        if not isinstance(state, AutoBalanceState):
            raise TypeError(f"the AutoBalance step takes an AutoBalanceState (from init), got {type(state).__name__}")

    def upper_due(step):
        return (step >= warmup_steps) & (step % config.iter_interval == 0)

    def search_step_at(state: AutoBalanceState, batch: SearchBatch, do_upper):
        key, upper_key, lower_key = jax.random.split(jax.random.wrap_key_data(state.key), 3)
        batch_size = batch.train.x.shape[0]

        def skip(state, data, key):
            del data, key
            return state.hparams, state.hparam_opt_state, jnp.float32(0.0), jnp.float32(0.0)

        hparams, hparam_opt_state, value, norm = jax.lax.cond(
            do_upper, functools.partial(upper_update, batch_size=batch_size), skip, state, batch.data, upper_key
        )
        params, opt_state, loss = lower_update(state, hparams, batch.train, lower_key)
        new_state = state._replace(params=params, opt_state=opt_state, hparams=hparams, hparam_opt_state=hparam_opt_state,
                                   step=state.step + 1, key=jax.random.key_data(key))
        metrics = {
            "loss": loss,
            "upper_steps": jnp.asarray(do_upper, jnp.float32),
            "val_objective_sum": jnp.where(do_upper, value, 0.0),
            "hypergrad_norm_sum": jnp.where(do_upper, norm, 0.0),
        }
        return new_state, metrics

    def search_step(state: AutoBalanceState, batch: SearchBatch):
        check_search_input(state, batch)
        return search_step_at(state, batch, upper_due(state.step))

    def lockstep_step(states: AutoBalanceState, batches: SearchBatch):
        """``jax.vmap(step)`` for runs in lockstep (leading run axis; equal step counts, as in a
        sweep): the upper update is decided once for all runs, so it stays a real branch
        (under ``jax.vmap`` a per-run ``lax.cond`` becomes a select that computes the
        hypergradient at every step)."""
        check_search_input(states, batches)
        return jax.vmap(search_step_at, in_axes=(0, 0, None))(states, batches, upper_due(states.step[0]))

    def retrain_step(state: AutoBalanceState, batch: Batch):
        if not isinstance(batch, Batch):
            hint = " (a SearchBatch is the search phase's input)" if isinstance(batch, SearchBatch) else ""
            raise TypeError(
                f"the AutoBalance retrain step takes a fairopt.train.Batch(x, y, groups, mask); got {type(batch).__name__}{hint}"
            )
        if not isinstance(state, AutoBalanceState):
            raise TypeError(f"the AutoBalance step takes an AutoBalanceState (from init), got {type(state).__name__}")
        key, lower_key = jax.random.split(jax.random.wrap_key_data(state.key))
        params, opt_state, loss = lower_update(state, state.hparams, batch, lower_key)
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1, key=jax.random.key_data(key)), {"loss": loss}

    def predict(state: AutoBalanceState, x, key=None):
        del key  # deterministic
        return jax.nn.softmax(apply_fn(state.params, x), axis=-1)

    return AutoBalanceSolver(
        init=init,
        step=search_step if search else retrain_step,
        predict=predict,
        loss_params=loss_params,
        train_objective=train_objective,
        val_objective=val_objective,
        hypergradient=hypergradient,
        initial_hparams=initial_hparams,
        config=config,
        class_counts=class_counts,
        cell_counts=cell_counts,
        num_features=int(num_features),
        lockstep_step=lockstep_step if search else None,
    )


SEARCH_METRICS = ("loss", "upper_steps", "val_objective", "hypergrad_norm")  # of a search epoch


def make_search_epoch_fn(step: Callable, *, num_rows: int, batch_size: int) -> Callable:
    """Compile one search epoch: shuffled minibatches of the search-train split, ``lax.scan``.

    Returns:
      ``run_epoch(state, data: HyperData, key) -> (state, metrics)`` (jitted) where metrics are
      the mean lower loss, the number of upper steps and the mean validation objective and
      hypergradient norm over those upper steps (NaN when there were none).
    """

    def run_epoch(state, data: HyperData, key):
        indices, mask = shuffled_batch_indices(key, num_rows, batch_size)

        def body(state, rows_and_mask):
            rows, rows_mask = rows_and_mask
            batch = Batch(data.train_x[rows], data.train_y[rows], data.train_groups[rows], rows_mask)
            return step(state, SearchBatch(batch, data))

        state, metrics = jax.lax.scan(body, state, (indices, mask))
        return state, _epoch_summary(metrics)

    return jax.jit(run_epoch)


def _epoch_summary(metrics):
    """Mean loss, number of upper steps and mean validation objective / hypergradient norm over
    the upper steps (NaN without any) of one epoch's per-step metrics."""
    upper_steps = jnp.sum(metrics["upper_steps"])
    safe = jnp.maximum(upper_steps, 1.0)
    nan = jnp.float32(jnp.nan)
    return {
        "loss": jnp.mean(metrics["loss"]),
        "upper_steps": upper_steps,
        "val_objective": jnp.where(upper_steps > 0, jnp.sum(metrics["val_objective_sum"]) / safe, nan),
        "hypergrad_norm": jnp.where(upper_steps > 0, jnp.sum(metrics["hypergrad_norm_sum"]) / safe, nan),
    }


def make_lockstep_search_epoch_fn(solver: AutoBalanceSolver, *, num_rows: int, batch_size: int) -> Callable:
    """One search epoch of many runs at once (a sweep over settings and seeds): the same values as
    ``jax.jit(jax.vmap(make_search_epoch_fn(solver.step, ...)))``, computed with
    ``solver.lockstep_step`` so that the hypergradient runs only at upper steps.

    Returns:
      ``run_epoch(states, data: HyperData, keys) -> (states, metrics)`` (jitted), every argument
      and output with a leading run axis.
    """
    if solver.lockstep_step is None:
        raise ValueError("make_lockstep_search_epoch_fn needs a search-phase solver (autobalance(..., search=True))")

    def run_epoch(states, data: HyperData, keys):
        indices, mask = jax.vmap(lambda key: shuffled_batch_indices(key, num_rows, batch_size))(keys)  # [R, S, B]

        def body(states, rows_and_mask):
            rows, rows_mask = rows_and_mask  # [R, B]
            batch = jax.vmap(lambda d, r, m: Batch(d.train_x[r], d.train_y[r], d.train_groups[r], m))(data, rows, rows_mask)
            return solver.lockstep_step(states, SearchBatch(batch, data))

        states, metrics = jax.lax.scan(body, states, (jnp.swapaxes(indices, 0, 1), jnp.swapaxes(mask, 0, 1)))
        return states, jax.vmap(_epoch_summary, in_axes=1)(metrics)

    return jax.jit(run_epoch)


def hparam_snapshot(solver: AutoBalanceSolver, hparams: AutoBalanceHparams) -> dict[str, np.ndarray]:
    """The effective loss parameters as numpy arrays (``weight``, ``shift``, ``delta``, ``radius``)."""
    loss = solver.loss_params(hparams)
    return {
        "weight": np.asarray(loss.weight),
        "shift": np.asarray(loss.shift),
        "delta": np.asarray(loss.scale),
        "radius": np.asarray(loss.radius),
    }


class SearchCheckpoint(NamedTuple):
    """What the search phase saves after an epoch, so that a resumed search also has the
    trajectory and the metrics of the epochs before the interruption.

    Attributes:
      state: the search state.
      trajectory: ``{name: [epochs + 1, ...]}`` effective loss parameters (:func:`hparam_snapshot`)
        after each epoch, row 0 at the init (rows after the last epoch done are zeros).
      history: ``{metric: [epochs]}`` the :data:`SEARCH_METRICS` of each epoch (NaN until done).
    """

    state: AutoBalanceState
    trajectory: dict
    history: dict


class AutoBalanceResult(NamedTuple):
    """Output of :func:`search_and_retrain`.

    Attributes:
      state: the retrained model's state (use with ``retrain.predict``).
      hparams: the searched raw hyperparameters ``alpha*``.
      search_solver, retrain_solver: the two solvers.
      trajectory: one dict per search epoch (``epoch`` from 0 = init, and the effective
        ``weight``, ``shift``, ``delta``, ``radius`` arrays) — the paper's Fig. 3 data.
      search_history, retrain_history: per-epoch metrics of the two phases (the retrain
        history holds only the epochs trained after the last restored checkpoint).
      search_state: the state at the end of the search phase (its model is trained on the
        search-train split only).
    """

    state: AutoBalanceState
    hparams: AutoBalanceHparams
    search_solver: AutoBalanceSolver
    retrain_solver: AutoBalanceSolver
    trajectory: list
    search_history: list
    retrain_history: list
    search_state: AutoBalanceState


def _arrays(dataset, name: str):
    for attribute in ("features", "labels", "groups"):
        if not hasattr(dataset, attribute):
            raise ValueError(f"{name} must have features, labels and groups (a fairopt.data.Dataset)")
    x = np.asarray(dataset.features, np.float32)
    y = np.asarray(dataset.labels, np.int32)
    g = np.asarray(dataset.groups, np.int32)
    if x.ndim != 2 or y.shape != (x.shape[0],) or g.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"{name} has inconsistent shapes: features {x.shape}, labels {y.shape}, groups {g.shape}")
    return x, y, g


def phase_config(config: AutoBalanceConfig, *, num_rows: int, epochs: int, batch_size: int,
                 warmup_epochs: int | None = None, lr_decay_fractions: Sequence[float] | None = None) -> AutoBalanceConfig:
    """``config`` with its step counts for a phase of ``epochs`` epochs over ``num_rows`` rows in
    batches of ``batch_size`` (``ceil(num_rows / batch_size)`` steps per epoch): ``warmup_steps``
    from ``warmup_epochs`` and ``lr_decay_steps`` from ``lr_decay_fractions`` of the phase's
    steps (:func:`decay_steps`); None keeps the config's value."""
    if num_rows < 1 or epochs < 1 or batch_size < 1:
        raise ValueError(f"num_rows, epochs and batch_size must be >= 1, got {num_rows}, {epochs}, {batch_size}")
    steps = max(1, math.ceil(num_rows / batch_size))
    changes = {}
    if warmup_epochs is not None:
        if not 0 <= warmup_epochs <= epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
        changes["warmup_steps"] = int(warmup_epochs) * steps
    if lr_decay_fractions is not None:
        if any(not 0.0 < f < 1.0 for f in lr_decay_fractions):
            raise ValueError(f"lr_decay_fractions must lie in (0, 1), got {tuple(lr_decay_fractions)}")
        changes["lr_decay_steps"] = decay_steps(lr_decay_fractions, epochs * steps)
    return dataclasses.replace(config, **changes) if changes else config


def search_and_retrain(
    apply_fn: Callable,
    init_params: Callable[[jax.Array], Any],
    config: AutoBalanceConfig,
    search_train,
    search_val,
    *,
    key: jax.Array,
    num_classes: int,
    num_groups: int = 1,
    epochs: int,
    batch_size: int,
    warmup_epochs: int | None = None,
    lr_decay_fractions: Sequence[float] | None = None,
    hyperparams: AutoBalanceHyperparams | None = None,
    retrain_data=None,
    retrain: bool = True,
    progress: Progress | None = None,
    cache: dict | None = None,
    checkpoints: CheckpointStore | None = None,
    run: str = "autobalance",
) -> AutoBalanceResult:
    """Algorithm 1 end to end: search ``alpha`` on (train, val), then retrain on train ∪ val.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits``.
      init_params: ``init_params(key) -> params`` (called once per phase: the retrain phase
        resets the model with a fresh initialisation, Alg. 1 line 11).
      config: :class:`AutoBalanceConfig`; its ``warmup_steps`` / ``lr_decay_steps`` are set per
        phase from ``warmup_epochs`` / ``lr_decay_fractions`` when those are given
        (:func:`phase_config`).
      search_train, search_val: the split of the training data (objects with ``features``,
        ``labels``, ``groups``, e.g. :class:`fairopt.data.Dataset`).
      key: PRNG key.
      num_classes, num_groups: ``K`` and ``G`` (the counts are taken from ``search_train``).
      epochs: epochs of each phase. batch_size: rows per lower step.
      warmup_epochs: search epochs before the first upper step (None: ``config.warmup_steps``).
      lr_decay_fractions: fractions of each phase's steps where both learning rates decay
        (official ``(220/300, 260/300)``; None: ``config.lr_decay_steps`` in both phases).
      hyperparams: the numbers (default ``config.hyperparams()``).
      retrain_data: data of the retrain phase (default: ``search_train ∪ search_val``).
      retrain: False to skip the retrain phase (then ``state`` is the search state).
      progress: optional printer, advanced once per epoch of either phase.
      cache: optional dict in which the solvers and compiled epochs are kept, keyed by
        ``(apply_fn, config, counts, shapes)``: runs with equal keys (e.g. other seeds of the same
        protocol, or other numbers) reuse the compiled functions instead of compiling again.
      checkpoints: optional :class:`fairopt.train.CheckpointStore` (e.g.
        ``experiments.common.Checkpointer``): each phase continues from its last checkpoint
        (runs ``<run>_search``, a :class:`SearchCheckpoint`, and ``<run>_retrain``) and offers
        one after every epoch, so an interrupted call repeated with the same arguments ends with
        the same result.
      run: the name prefix of this call's checkpoints.

    Returns:
      :class:`AutoBalanceResult`.

    Raises:
      ValueError: bad data or configuration (labels or group ids out of range included).
      fairopt.train.NonFiniteError: a non-finite loss or state.
    """
    train_x, train_y, train_g = _arrays(search_train, "search_train")
    val_x, val_y, val_g = _arrays(search_val, "search_val")
    for name, labels, groups in (("search_train", train_y, train_g), ("search_val", val_y, val_g)):
        check_labels_and_groups(labels, groups, num_classes=num_classes, num_groups=num_groups, name=name)
    class_counts = np.bincount(train_y, minlength=num_classes)
    cell_counts = np.zeros((num_classes, num_groups), np.int64)
    np.add.at(cell_counts, (train_y, train_g), 1)
    search_config = phase_config(config, num_rows=train_x.shape[0], epochs=epochs, batch_size=batch_size,
                                 warmup_epochs=warmup_epochs, lr_decay_fractions=lr_decay_fractions)
    hyperparams = config.hyperparams() if hyperparams is None else hyperparams
    search_key, retrain_key, init_key_1, init_key_2, epoch_key = jax.random.split(key, 5)
    cache = {} if cache is None else cache
    counts_key = (class_counts.tobytes(), cell_counts.tobytes(), cell_counts.shape)

    def build_search():
        solver = autobalance(
            apply_fn,
            search_config,
            class_counts=class_counts,
            cell_counts=cell_counts,
            num_features=train_x.shape[1],
            search=True,
        )
        return solver, make_search_epoch_fn(solver.step, num_rows=train_x.shape[0], batch_size=batch_size)

    search_cache_key = ("search", apply_fn, tuple(search_config.static_settings().items()), counts_key, train_x.shape, val_x.shape,
                        batch_size)
    if search_cache_key not in cache:
        cache[search_cache_key] = build_search()
    solver, epoch_fn = cache[search_cache_key]
    state = solver.init(search_key, init_params(init_key_1), hyperparams)
    data = HyperData(*(jnp.asarray(a) for a in (train_x, train_y, train_g, val_x, val_y, val_g)))
    initial = hparam_snapshot(solver, state.hparams)
    saved = SearchCheckpoint(
        state,
        {name: np.zeros((epochs + 1,) + value.shape, value.dtype) for name, value in initial.items()},
        {name: np.full(epochs, np.nan, np.float32) for name in SEARCH_METRICS},
    )
    for name, value in initial.items():
        saved.trajectory[name][0] = value
    done = 0
    if checkpoints is not None:
        done, saved = checkpoints.restore(f"{run}_search", saved)
    if progress is not None and done:
        progress.update(progress.done + done)
    state = saved.state
    trajectory = {name: np.array(value) for name, value in saved.trajectory.items()}  # writable copies
    history = {name: np.array(value) for name, value in saved.history.items()}
    for epoch in range(done + 1, epochs + 1):
        state, metrics = epoch_fn(state, data, jax.random.fold_in(epoch_key, epoch))
        metrics = {k: float(v) for k, v in metrics.items()}
        check_finite({"loss": metrics["loss"]}, what="search loss ", epoch=epoch)
        check_finite(state, what="search state ", epoch=epoch)
        for name, value in hparam_snapshot(solver, state.hparams).items():
            trajectory[name][epoch] = value
        for name in SEARCH_METRICS:
            history[name][epoch - 1] = metrics[name]
        if checkpoints is not None:
            checkpoints.save(f"{run}_search", epoch, SearchCheckpoint(state, trajectory, history))
        if progress is not None:
            progress.advance({k: v for k, v in metrics.items() if k in ("loss", "val_objective")})
    search_state = state
    trajectory = [
        dict(epoch=epoch, **{name: values[epoch] for name, values in trajectory.items()})
        for epoch in range(epochs + 1)
    ]
    history = [{name: float(values[epoch]) for name, values in history.items()} for epoch in range(epochs)]
    if not retrain:
        return AutoBalanceResult(state, state.hparams, solver, None, trajectory, history, [], search_state)

    if retrain_data is None:
        full = (np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]), np.concatenate([train_g, val_g]))
    else:
        full = _arrays(retrain_data, "retrain_data")
    check_labels_and_groups(full[1], full[2], num_classes=num_classes, num_groups=num_groups, name="retrain_data")
    retrain_config = phase_config(config, num_rows=full[0].shape[0], epochs=epochs, batch_size=batch_size,
                                  lr_decay_fractions=lr_decay_fractions)
    retrain_cache_key = ("retrain", apply_fn, tuple(retrain_config.static_settings().items()), counts_key, full[0].shape, batch_size)
    if retrain_cache_key not in cache:
        retrainer = retrain_solver(apply_fn, solver, config=retrain_config)
        cache[retrain_cache_key] = (
            retrainer,
            make_epoch_fn(retrainer.step, num_rows=full[0].shape[0], batch_size=batch_size),
        )
    retrainer, retrain_epoch_fn = cache[retrain_cache_key]
    retrain_state = retrainer.init(retrain_key, init_params(init_key_2), search_state.hyperparams,
                                   hparams=search_state.hparams)
    retrain_state, retrain_history = fit_resumable(
        retrainer,
        retrain_state,
        *full,
        checkpoints=checkpoints,
        run=f"{run}_retrain",
        progress=progress,
        epochs=epochs,
        batch_size=batch_size,
        key=jax.random.fold_in(epoch_key, epochs + 1),
        epoch_fn=retrain_epoch_fn,
    )
    return AutoBalanceResult(
        retrain_state, search_state.hparams, solver, retrainer, trajectory, history, retrain_history, search_state
    )


def retrain_solver(apply_fn: Callable, search: AutoBalanceSolver, *, config: AutoBalanceConfig | None = None,
                   **optimizers) -> AutoBalanceSolver:
    """The retrain phase (Alg. 1 lines 11–12): the searched loss, frozen.

    The class counts (clusters, priors) are those of the search phase, so the searched raw
    hyperparameters keep their meaning. ``config`` (default: the search's) may set other
    ``lr_decay_steps`` for the retrain data (:func:`phase_config`). Start it with
    ``init(key, fresh_params, hyperparams, hparams=alpha*)``; its ``step`` consumes a plain
    :class:`fairopt.train.Batch`, so :func:`fairopt.train.fit` drives it.
    """
    return autobalance(
        apply_fn,
        search.config if config is None else config,
        class_counts=search.class_counts,
        cell_counts=search.cell_counts,
        num_features=search.num_features,
        search=False,
        **optimizers,
    )
