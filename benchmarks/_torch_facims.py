"""An eager PyTorch FACIMS round with the structure of the official code (a peer for benchmarks).

Written for :mod:`benchmarks.peer_facims` only (not part of fairopt; needs the optional
``bench`` extra: ``pip install -e .[bench]``). It follows the official code's structure
(BojianHou/FACIMS, ``engine/fair_training.py``): a Python loop over the groups, and for each
group a Python loop over the middle steps with a Python loop over the Monte-Carlo draws; the
upper level builds ``d L_low / d post`` with ``torch.autograd.grad(..., create_graph=True)``
and takes the Neumann series and the mixed second derivative by further ``autograd.grad``
calls (reverse-over-reverse Hessian-vector products).

It does the arithmetic of :func:`fairopt.solvers.facims.facims` with
``FacimsConfig(inverse="neumann")`` (same objectives, same shapes and step counts), not the
official code's numbers: KL divergence, a per-group Hessian (the official code summed the
groups' Hessian-vector products), the SAM perturbation of the lower level, the VS loss with
``Delta = exp(log_scale)``, the global posterior's and ``v``'s updates and clipping exactly as
fairopt's module docstring describes. Parameter layout is fairopt's (``kernel [in, out]``), so
a flax parameter tree converts directly (:func:`from_flax_params`).

A posterior is a list ``[means..., log_stds...]`` of leaf tensors, one mean and one log-std per
weight tensor, in :data:`LAYER_ORDER` order (kernel, bias per layer).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class TorchFacimsConfig:
    """The FACIMS settings this implementation needs (names as in ``FacimsConfig``)."""

    alpha_low: float = 0.7
    alpha_up: float = 0.7
    sharpness: float = 0.05
    middle_steps: int = 10
    upper_steps: int = 5
    num_mc: int = 5
    hypergradient_samples: int = 5
    local_learning_rate: float = 0.4
    global_learning_rate: float = 0.1
    global_decay: float = 0.9
    hparam_learning_rate: float = 1e-3
    hparam_momentum: float = 0.9
    hparam_max_grad_norm: float = 1.0
    neumann_alpha: float = 0.1
    inverse_terms: int = 10
    init_std: float = 1.0
    noise_scale: float = 0.08
    log_std_range: tuple[float, float] = (-7.0, 2.0)
    tau: float = 1.0
    common_noise: bool = False  # every group uses the same Monte-Carlo noise in a middle step

    @classmethod
    def from_fairopt(cls, config) -> "TorchFacimsConfig":
        """The same values as a ``fairopt.solvers.facims.FacimsConfig`` (method "facims", Neumann)."""
        if config.method != "facims" or config.inverse != "neumann" or config.divergence != "kl":
            raise ValueError("the PyTorch peer implements method='facims', inverse='neumann', divergence='kl' only")
        if config.hparams_per_group or config.groups_per_step is not None or config.validation_loss != "vs_bar":
            raise ValueError("the PyTorch peer implements per-class v, all groups, validation_loss='vs_bar' only")
        if config.sharpness_scaling != "uniform":
            raise ValueError("the PyTorch peer implements sharpness_scaling='uniform' only")
        names = {f.name for f in dataclasses.fields(cls)} - {"common_noise"}
        values = {name: getattr(config, name) for name in names}
        # fairopt's option (independent draws per group before it existed)
        return cls(common_noise=bool(getattr(config, "common_noise", False)), **values)


LAYER_ORDER = ("kernel", "bias")


def from_flax_params(params) -> list[np.ndarray]:
    """Weight arrays of a fairopt ``mlp`` parameter tree, ``[kernel_0, bias_0, kernel_1, ...]``."""
    layers = sorted(params, key=lambda name: int(name.rsplit("_", 1)[1]))
    return [np.asarray(params[layer][part], np.float32) for layer in layers for part in LAYER_ORDER]


def to_flax_params(arrays: Sequence, like) -> dict:
    """Inverse of :func:`from_flax_params` (numpy arrays in the structure of ``like``)."""
    layers = sorted(like, key=lambda name: int(name.rsplit("_", 1)[1]))
    arrays = [np.asarray(a.detach().numpy() if torch.is_tensor(a) else a) for a in arrays]
    return {layer: {part: arrays[2 * i + j] for j, part in enumerate(LAYER_ORDER)} for i, layer in enumerate(layers)}


# ---- model and losses -------------------------------------------------------------------------


def mlp_forward(weights: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ELU MLP with fairopt's layout: ``x @ kernel + bias`` per layer, no activation on the last."""
    num_layers = len(weights) // 2
    for layer in range(num_layers):
        x = torch.addmm(weights[2 * layer + 1], x, weights[2 * layer])
        if layer < num_layers - 1:
            x = F.elu(x)
    return x


def vs_loss(logits, labels, shift, log_scale):
    """Mean VS loss ``CE(exp(log_scale) * f + shift, y)`` (fairopt.losses.vs_loss, all rows real)."""
    return F.cross_entropy(logits * torch.exp(log_scale) + shift, labels)


def kl(q: Sequence[torch.Tensor], p: Sequence[torch.Tensor]) -> torch.Tensor:
    """``KL(q || p)`` summed over all weights (fairopt.posterior.kl)."""
    half = len(q) // 2
    total = 0.0
    for mean_q, log_std_q, mean_p, log_std_p in zip(q[:half], q[half:], p[:half], p[half:]):
        variance_ratio = torch.exp(2.0 * (log_std_q - log_std_p))
        scaled_square = torch.square(mean_q - mean_p) * torch.exp(-2.0 * log_std_p)
        total = total + torch.sum(log_std_p - log_std_q + 0.5 * (variance_ratio + scaled_square) - 0.5)
    return total


def sample(q: Sequence[torch.Tensor], noise: Sequence[torch.Tensor], noise_scale: float, shift=None):
    """``mean (+ shift) + noise_scale * exp(log_std) * xi`` for one Monte-Carlo draw ``xi``."""
    half = len(q) // 2
    means = q[:half] if shift is None else [m + s for m, s in zip(q[:half], shift)]
    return [m + noise_scale * torch.exp(s) * xi for m, s, xi in zip(means, q[half:], noise)]


def mc_loss(q, noises, x, y, shift, log_scale, noise_scale, perturbation=None):
    """Monte-Carlo mean of the VS loss: a Python loop over the draws (the official code's loop)."""
    total = 0.0
    for noise in noises:
        total = total + vs_loss(mlp_forward(sample(q, noise, noise_scale, perturbation), x), y, shift, log_scale)
    return total / len(noises)


# ---- the solver -------------------------------------------------------------------------------


class TorchFacims:
    """FACIMS state and one round (:meth:`epoch`) in eager PyTorch.

    Args:
      config: :class:`TorchFacimsConfig`.
      init_weights: ``[kernel_0, bias_0, ...]`` numpy arrays (e.g. :func:`from_flax_params`).
      class_counts: training rows per class (for ``v_bar``).
      train_groups, val_groups: per group ``(x [n_g, d] float32, y [n_g] int64)`` tensors.
      batch_size, val_batch_size: rows per group per middle / upper step.
      seed: torch generator seed (batches and Monte-Carlo noise).
    """

    def __init__(self, config, init_weights, class_counts, train_groups, val_groups, *, batch_size=50,
                 val_batch_size=50, seed=0):
        self.config = config
        self.train_groups = train_groups
        self.val_groups = val_groups
        self.num_groups = len(train_groups)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.generator = torch.Generator().manual_seed(seed)
        means = [torch.tensor(w, dtype=torch.float32) for w in init_weights]
        log_std = math.log(config.init_std)
        leaf = lambda t: t.clone().requires_grad_(True)  # noqa: E731
        self.global_q = [leaf(m) for m in means] + [leaf(torch.full_like(m, log_std)) for m in means]
        self.local_qs = [[leaf(t.detach()) for t in self.global_q] for _ in range(self.num_groups)]
        counts = np.asarray(class_counts, np.float64)
        v_bar_shift = torch.tensor(config.tau * np.log(counts / counts.sum()), dtype=torch.float32)
        self.v_bar = (v_bar_shift, torch.zeros_like(v_bar_shift))
        self.vs_params = [leaf(v_bar_shift), leaf(torch.zeros_like(v_bar_shift))]
        # optax.adagrad's defaults: initial accumulator 0.1, eps 1e-7.
        self.local_opts = [
            torch.optim.Adagrad(q, lr=config.local_learning_rate, initial_accumulator_value=0.1, eps=1e-7)
            for q in self.local_qs
        ]
        self.global_opt = torch.optim.Adagrad(
            self.global_q, lr=config.global_learning_rate, initial_accumulator_value=0.1, eps=1e-7
        )
        self.hparam_opt = torch.optim.SGD(self.vs_params, lr=config.hparam_learning_rate, momentum=config.hparam_momentum)
        self.rounds = 0

    # -- helpers --

    def _clip_log_std(self, q):
        low, high = self.config.log_std_range
        with torch.no_grad():
            for t in q[len(q) // 2 :]:
                t.clamp_(low, high)

    def _batch(self, group_data, size):
        x, y = group_data
        index = torch.randint(0, x.shape[0], (size,), generator=self.generator)
        return x[index], y[index]

    def _noise(self, q, count):
        half = len(q) // 2
        return [[torch.randn(t.shape, generator=self.generator) for t in q[:half]] for _ in range(count)]

    # -- the two levels, on explicit batches and noise (so tests can feed fairopt's) --

    def middle_step(self, local_q, optimizer, x, y, noises):
        """SAM perturbation (one gradient), then one Adagrad step of KL + MC VS loss. Returns the loss."""
        c = self.config
        half = len(local_q) // 2
        shift, log_scale = (t.detach() for t in self.vs_params)
        global_q = [t.detach() for t in self.global_q]
        if c.sharpness > 0:
            data_term = mc_loss(local_q, noises, x, y, shift, log_scale, c.noise_scale)
            grads = torch.autograd.grad(data_term, local_q[:half])
            norm = torch.sqrt(sum(torch.sum(g * g) for g in grads))
            perturbation = [(c.sharpness / (norm + 1e-12)) * g for g in grads]
        else:
            perturbation = None
        optimizer.zero_grad(set_to_none=True)
        loss = c.alpha_low * kl(local_q, global_q) + mc_loss(
            local_q, noises, x, y, shift, log_scale, c.noise_scale, perturbation
        )
        loss.backward()
        optimizer.step()
        self._clip_log_std(local_q)
        return loss.detach()

    def group_hypergradient(self, local_q, x, y, noises, xv, yv, global_noises):
        """One group's implicit hypergradient ``(d/d global, d/d v)`` and its upper objective value.

        ``v = grad_local F``; ``u = alpha sum_{j<=J} (I - alpha H)^j v`` from ``J`` autograd HVPs
        of ``grad_local G`` (built once with ``create_graph=True``); mixed term
        ``grad_(global, v) <grad_local G, u>``.
        """
        c = self.config
        local = [t.detach().requires_grad_(True) for t in local_q]
        # Outer objective F = alpha_up KL(local || global) + E_{w ~ global} L_vs(w; v_bar, V^a).
        outer = c.alpha_up * kl(local, self.global_q) + mc_loss(
            self.global_q, global_noises, xv, yv, *self.v_bar, c.noise_scale
        )
        grads = torch.autograd.grad(outer, local + self.global_q)
        v, direct_global = list(grads[: len(local)]), grads[len(local) :]
        # Inner objective G = alpha_low KL(local || global) + E_{w ~ local} L_vs(w; v, T^a).
        inner = c.alpha_low * kl(local, self.global_q) + mc_loss(local, noises, x, y, *self.vs_params, c.noise_scale)
        inner_grad = torch.autograd.grad(inner, local, create_graph=True)
        term, total = v, list(v)
        for _ in range(c.inverse_terms):
            curvature = torch.autograd.grad(inner_grad, local, grad_outputs=term, retain_graph=True)
            term = [p - c.neumann_alpha * hp for p, hp in zip(term, curvature)]
            total = [s + p for s, p in zip(total, term)]
        u = [c.neumann_alpha * s for s in total]
        mixed = torch.autograd.grad(inner_grad, self.global_q + self.vs_params, grad_outputs=u, allow_unused=True)
        mixed = [torch.zeros_like(p) if m is None else m for m, p in zip(mixed, self.global_q + self.vs_params)]
        grad_global = [d - m for d, m in zip(direct_global, mixed[: len(self.global_q)])]
        grad_vs = [-m for m in mixed[len(self.global_q) :]]
        return grad_global, grad_vs, outer.detach()

    # -- one round --

    def epoch(self, draws=None):
        """One round (fairopt's ``step``): middle steps per group, then upper steps. Returns metrics.

        ``draws`` (for checks) replaces the random batches and noise: ``draws["middle"][step][group]
        = (x, y, noises)`` and ``draws["upper"][step] = (val_batches [per group (x, y)], global_noises)``,
        with ``noises`` a list over Monte-Carlo draws of lists of tensors shaped like the weights.
        """
        c = self.config
        if draws is None and c.common_noise:  # one noise per middle step, shared by every group
            shared = [self._noise(self.global_q, c.num_mc) for _ in range(c.middle_steps)]
        middle_losses, last_draws = [], []
        for group in range(self.num_groups):  # the official code's loop over tasks
            local_q, optimizer = self.local_qs[group], self.local_opts[group]
            for step in range(c.middle_steps):
                if draws is not None:
                    x, y, noises = draws["middle"][step][group]
                else:
                    x, y = self._batch(self.train_groups[group], self.batch_size)
                    noises = shared[step] if c.common_noise else self._noise(local_q, c.num_mc)
                loss = self.middle_step(local_q, optimizer, x, y, noises)
            middle_losses.append(loss)
            last_draws.append((x, y, noises[: c.hypergradient_samples]))
        for group_opt in self.global_opt.param_groups:
            group_opt["lr"] = c.global_learning_rate * c.global_decay**self.rounds
        for step in range(c.upper_steps):
            if draws is not None:
                val_batches, global_noises = draws["upper"][step]
            else:
                global_noises = self._noise(self.global_q, c.num_mc)
            sum_global = [torch.zeros_like(t) for t in self.global_q]
            sum_vs = [torch.zeros_like(t) for t in self.vs_params]
            values = []
            for group in range(self.num_groups):
                if draws is not None:
                    xv, yv = val_batches[group]
                else:
                    xv, yv = self._batch(self.val_groups[group], self.val_batch_size)
                x, y, noises = last_draws[group]
                grad_global, grad_vs, value = self.group_hypergradient(
                    self.local_qs[group], x, y, noises, xv, yv, global_noises
                )
                sum_global = [s + g for s, g in zip(sum_global, grad_global)]
                sum_vs = [s + g for s, g in zip(sum_vs, grad_vs)]
                values.append(value)
            self.global_opt.zero_grad(set_to_none=True)
            for t, g in zip(self.global_q, sum_global):
                t.grad = g / self.num_groups
            self.global_opt.step()
            self._clip_log_std(self.global_q)
            self.hparam_opt.zero_grad(set_to_none=True)
            for t, g in zip(self.vs_params, sum_vs):
                t.grad = g / self.num_groups
            torch.nn.utils.clip_grad_norm_(self.vs_params, c.hparam_max_grad_norm)
            self.hparam_opt.step()
        self.rounds += 1
        with torch.no_grad():
            divergence = torch.stack([kl(q, self.global_q) for q in self.local_qs]).mean()
        return {
            "middle_loss": float(torch.stack(middle_losses).mean()),
            "upper_loss": float(torch.stack(values).mean()) if c.upper_steps else 0.0,
            "divergence": float(divergence),
        }
