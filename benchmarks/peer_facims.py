r"""Peer benchmark: one FACIMS epoch in fairopt (JAX) versus an eager PyTorch implementation.

The credit-card paper protocol (SPEC §7): the 400-200-100 ELU MLP on the credit data (22
features, 2 classes, 7 education groups resampled to 400 training rows each), batch 50 per
group, 10 middle steps, 5 upper steps, ``n_MC = 5``, Neumann series with 10 terms
(``alpha = 0.1``). fairopt runs ``facims(..., FacimsConfig(inverse="neumann", neumann_terms=10))``
jitted; the peer (:mod:`benchmarks._torch_facims`) has the official code's structure (Python
loops over groups, steps and Monte-Carlo draws; ``torch.autograd.grad`` HVPs with
``create_graph=True``) and does the same arithmetic: same objectives, shapes, step counts,
float32, the same number of Monte-Carlo draws in the hypergradient's Hessian
(``--hypergradient_samples``, default 5 = ``n_MC`` as in the official code; fairopt's own
default is 1).

Measured in one process, so load on this shared machine hits both:

* time to the first finished epoch: fairopt with the persistent compilation cache off (trace +
  lower + XLA compile + run) and again with the cache on (fairopt's experiment setting; a hit
  when an earlier run left the entry, else a compile that writes it); PyTorch's first epoch;
* ``--epochs`` steady-state epochs of each, alternating (fairopt, torch, torch at 1 thread, then
  the reverse order, ...), timed with ``jax.block_until_ready``; the median of each and the ratio
  torch / fairopt (also the median of the per-pair ratios, which cancels slow drifts of the load).
  PyTorch runs with ``torch.set_num_threads(--num_threads)`` (2: the cores JAX's thread pool
  uses) and, as the conservative baseline, also at 1 thread: on this shared, oversubscribed
  machine its 2-thread epochs are slower than its 1-thread ones (OpenMP barriers wait for
  descheduled threads; ``--omp_wait_policy`` PASSIVE, the default here, limits the damage);
* matmul FLOPs of one epoch: counted exactly in fairopt's traced program (every
  ``dot_general`` times the trip count of the ``scan`` loops around it), in PyTorch by
  ``torch.utils.flop_counter.FlopCounterMode`` over one epoch, and a rough analytic estimate;
  XLA's ``cost_analysis()['flops']`` is reported too but counts a loop body once (it is an
  undercount for a program made of loops); achieved GFLOP/s of each against the GFLOP/s of a
  2048 x 2048 float32 matmul (``jnp.dot`` and ``torch.mm``) measured in the same run;
* the projected wall time of the 5-seed credit reproduction (50 epochs x 5 seeds);
* a check that the PyTorch peer does fairopt's arithmetic: on a small MLP, one middle step and
  one group's implicit hypergradient from the same state, batch and noise, PyTorch versus
  ``fairopt.solvers.facims.facims_parts`` (relative error).

    python -m benchmarks.peer_facims                    # the full benchmark (several minutes)
    python -m benchmarks.peer_facims --epochs=1 --smoke # a small model and few steps: fast

Writes ``benchmarks/results/peer_facims.json`` (``--output``; written atomically) and prints a
Markdown table. Needs PyTorch (CPU build) from the optional extra: ``pip install -e .[bench]``.
This is a benchmark, not a test: nothing here is timed in the test suite.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "peer_facims.json"
flags.DEFINE_integer("epochs", 5, "Steady-state epochs timed per implementation (median reported).", lower_bound=1)
flags.DEFINE_integer("num_threads", 2, "Threads for PyTorch (torch.set_num_threads); fewer than the cores also "
                     "pins the whole process (JAX too) to that many cores.", lower_bound=1)
flags.DEFINE_string("output", None, f"JSON results path (default {DEFAULT_OUTPUT}, or peer_facims_smoke.json with --smoke).")
flags.DEFINE_integer("seed", 0, "Seed of the data split, the model initialisation and the random streams.", lower_bound=0)
flags.DEFINE_integer("hypergradient_samples", None, "Monte-Carlo draws inside the hypergradient's Hessian, both "
                     "implementations (default: n_MC, as the official code; fairopt's own default is 1).", lower_bound=1)
flags.DEFINE_string("compilation_cache", "", "Persistent compilation cache folder for the cache-on first epoch "
                    "('' = fairopt's default, $FAIROPT_CACHE_DIR or ~/.cache/fairopt/jax, skipped with --smoke; 'none' = skip).")
flags.DEFINE_bool("smoke", False, "Small MLP (32-16) and 2 middle / 1 upper / 2 Neumann steps, n_MC 2: a fast run.")
flags.DEFINE_bool("torch_single_thread", True, "Also time PyTorch at 1 thread (alternating with the others): "
                  "on a loaded machine its 2-thread epochs can be far slower than its 1-thread ones.")
flags.DEFINE_enum("omp_wait_policy", "PASSIVE", ["PASSIVE", "ACTIVE", "default"],
                 "OMP_WAIT_POLICY for PyTorch's OpenMP threads, set before torch is imported unless the environment "
                 "already sets it ('default': libgomp's spin-then-sleep). On this shared, oversubscribed 2-core "
                 "machine one 2-thread PyTorch epoch took 345 s with libgomp's default, 30-40 s with PASSIVE and "
                 "12 s at 1 thread (measured).")
flags.DEFINE_enum("group_mapping", "auto", ["vmap", "unroll", "map", "auto"],
                  "FacimsConfig.group_mapping of the fairopt round (auto: unroll on a CPU, as experiments.facims).")
flags.DEFINE_bool("check", True, "Compare one middle step and one hypergradient of both implementations first.")


@dataclasses.dataclass(frozen=True)
class Protocol:
    hidden: tuple[int, ...] = (400, 200, 100)
    batch_size: int = 50
    middle_steps: int = 10
    upper_steps: int = 5
    num_mc: int = 5
    inverse_terms: int = 10
    neumann_alpha: float = 0.1
    samples_per_group: int = 400
    reproduction_seeds: int = 5
    reproduction_epochs: int = 50


PAPER = Protocol()
SMOKE = Protocol(hidden=(32, 16), middle_steps=2, upper_steps=1, num_mc=2, inverse_terms=2)
from experiments.paper import PAPER_SEEDS  # noqa: E402


def _validate_flags(values):
    cores = os.cpu_count() or 1
    if values["num_threads"] > cores:
        raise flags.ValidationError(f"--num_threads={values['num_threads']} exceeds the {cores} cores of this machine")
    output = values["output"]
    if output is not None and not output.endswith(".json"):
        raise flags.ValidationError(f"--output must be a .json path, got {output!r}")
    protocol = SMOKE if values["smoke"] else PAPER
    if values["hypergradient_samples"] is not None and values["hypergradient_samples"] > protocol.num_mc:
        raise flags.ValidationError(
            f"--hypergradient_samples={values['hypergradient_samples']} exceeds n_MC={protocol.num_mc}"
        )
    return True


flags.register_multi_flags_validator(
    ["num_threads", "output", "smoke", "hypergradient_samples"], _validate_flags, message="invalid flags"
)

TORCH_MISSING = (
    "PyTorch is not installed: it is an optional extra of this benchmark. Install the CPU build with\n"
    "    pip install -e .[bench]\n"
    "(pyproject.toml pins torch==2.13.0) and run again."
)


# ---- FLOP counting ------------------------------------------------------------------------------


def jaxpr_matmul_flops(closed_jaxpr) -> tuple[int, int]:
    """``2 * M * N * K`` summed over every ``dot_general`` of a jaxpr, times enclosing scan lengths.

    Returns ``(flops, while_loops)``: a ``while`` loop's trip count is unknown, so its body is
    counted once and the number of such loops is returned (0 for the Neumann solver).
    """
    from jax.extend import core

    def walk(jaxpr) -> tuple[int, int]:
        flops = whiles = 0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs_shape = eqn.invars[0].aval.shape
                contracted = math.prod(lhs_shape[d] for d in lhs_contract)
                flops += 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
                continue
            subs = []
            for value in eqn.params.values():
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(item, core.ClosedJaxpr):
                        subs.append(item.jaxpr)
                    elif isinstance(item, core.Jaxpr):
                        subs.append(item)
            counts = [walk(sub) for sub in subs]
            if name == "cond":
                sub_flops = max((c[0] for c in counts), default=0)
                sub_whiles = max((c[1] for c in counts), default=0)
            else:
                sub_flops, sub_whiles = sum(c[0] for c in counts), sum(c[1] for c in counts)
            if name == "scan":
                sub_flops *= eqn.params["length"]
            if name == "while":
                sub_whiles += 1
            flops += sub_flops
            whiles += sub_whiles
        return flops, whiles

    return walk(closed_jaxpr.jaxpr)


def analytic_flops(protocol: Protocol, num_features: int, num_classes: int, num_groups: int, hs: int) -> float:
    """Rough matmul FLOPs of one epoch from the shapes: forward ``F = 2 B sum(in * out)``, a
    gradient ``3F`` (forward + backward), a Hessian-vector product ``2x`` a gradient, the mixed
    second derivative ``2x`` a gradient."""
    widths = (num_features, *protocol.hidden, num_classes)
    forward = 2 * protocol.batch_size * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    grad = 3 * forward
    mc = protocol.num_mc
    middle = num_groups * protocol.middle_steps * 2 * mc * grad  # SAM gradient + step gradient
    per_group_upper = mc * grad + hs * (grad + protocol.inverse_terms * 2 * grad + 2 * grad)
    upper = num_groups * protocol.upper_steps * per_group_upper
    return float(middle + upper)


# ---- helpers --------------------------------------------------------------------------------------


def prepare(dataset, seed: int, samples_per_group: int):
    """``experiments.facims.prepare`` (the paper protocol), repeated here because importing that
    module would define its absl flags a second time: label-stratified split, train-only
    standardisation, training set resampled per group. Returns ``(splits, original_train)``."""
    from fairopt import data

    splits = data.standardize(data.facims_split(dataset, seed=seed))
    original_train = splits.train
    if samples_per_group:
        splits = splits._replace(train=data.resample_per_group(original_train, samples_per_group, seed=seed))
    return splits, original_train


def median(values):
    return float(statistics.median(values))


def peak_matmul(jax, jnp, torch, size=2048, repeats=7):
    """GFLOP/s of a ``size x size`` float32 matmul in JAX and PyTorch, median of ``repeats``, interleaved."""
    import numpy as np

    rng = np.random.default_rng(0)
    a_np, b_np = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
    torch.mm(ta, tb)
    jax_times, torch_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        jax_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.mm(ta, tb)
        torch_times.append(time.perf_counter() - start)
    flops = 2.0 * size**3
    return flops / median(jax_times) / 1e9, flops / median(torch_times) / 1e9


def atomic_write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def source_info() -> dict:
    """Git commit of the work tree and a hash of the FACIMS solver file as run (it may be edited)."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parent.parent
    solver = root / "fairopt" / "solvers" / "facims.py"

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "git_head": git("rev-parse", "HEAD"),
        "facims_py_sha256": hashlib.sha256(solver.read_bytes()).hexdigest() if solver.exists() else None,
        "facims_py_modified_vs_head": bool(git("status", "--porcelain", "--", str(solver))),
    }


def log(message: str) -> None:
    print(f"[peer_facims {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- the check: same arithmetic ----------------------------------------------------------------------


def check_same_arithmetic(jax, jnp, torch, tf, splits, original_train, protocol: Protocol, hs: int, seed: int):
    """One middle step and one group's hypergradient, PyTorch vs fairopt, same inputs (small MLP).

    Returns a dict of relative errors ``||torch - fairopt|| / ||fairopt||`` per quantity.
    """
    import numpy as np

    from fairopt import data, models, posterior
    from fairopt.solvers.facims import FacimsConfig, VSParams, facims_parts

    num_classes, num_features = splits.train.num_classes, splits.train.num_features
    params, apply_fn = models.make_model("mlp", num_classes, num_features, jax.random.key(seed), hidden=(16, 8))
    config = FacimsConfig(
        inverse="neumann", neumann_terms=protocol.inverse_terms, neumann_alpha=protocol.neumann_alpha,
        num_mc=protocol.num_mc, hypergradient_samples=hs,
    )
    parts = facims_parts(apply_fn, config, class_counts=original_train.class_counts,
                         group_counts=original_train.group_counts)
    keys = jax.random.split(jax.random.key(seed + 7), 8)
    normal = lambda key, q: jax.tree_util.tree_map(  # noqa: E731
        lambda leaf: leaf[0], posterior.standard_normal_like(key, q, 1)
    )
    # A state away from the initial point: perturbed means and log-stds, v away from v_bar.
    start = posterior.gaussian_init(params, init_std=config.init_std)
    add = lambda tree, noise, scale: jax.tree_util.tree_map(lambda a, n: a + scale * n, tree, noise)  # noqa: E731
    global_q = start._replace(log_std=add(start.log_std, normal(keys[0], start), 0.1))
    local_q = posterior.Gaussian(add(global_q.mean, normal(keys[1], start), 0.05),
                                 add(global_q.log_std, normal(keys[2], start), 0.1))
    vs = VSParams(parts.v_bar.shift + 0.1, jnp.linspace(-0.1, 0.05, num_classes, dtype=jnp.float32))
    train, val = data.group_arrays(splits.train), data.group_arrays(splits.val)
    group = 2
    batch = data.sample_group_batch(keys[3], train, protocol.batch_size)
    val_batch = data.sample_group_batch(keys[4], val, protocol.batch_size)
    x, y, mask = (leaf[group] for leaf in batch)
    xv, yv, maskv = (leaf[group] for leaf in val_batch)
    noise = posterior.standard_normal_like(keys[5], global_q, config.num_mc)
    global_noise = posterior.standard_normal_like(keys[6], global_q, config.num_mc)
    hyper_noise = jax.tree_util.tree_map(lambda leaf: leaf[:hs], noise)

    # fairopt
    opt_state = parts.local_optimizer.init(local_q)
    new_q, _, middle_loss = jax.jit(parts.middle_step)(
        local_q, opt_state, global_q, vs, (x, y, mask), noise, group, parts.sharpness[group], True
    )
    grad_global, grad_vs, value = jax.jit(parts.group_hypergradient)(
        local_q, global_q, vs, (x, y, mask), hyper_noise, (xv, yv, maskv), global_noise, group
    )

    # PyTorch, same inputs
    flat = lambda q: tf.from_flax_params(q.mean) + tf.from_flax_params(q.log_std)  # noqa: E731
    to_list = lambda q: [torch.tensor(a) for a in flat(q)]  # noqa: E731
    noise_list = lambda n, count: [[torch.tensor(a[i]) for a in tf.from_flax_params(n)] for i in range(count)]  # noqa: E731
    torch_config = tf.TorchFacimsConfig.from_fairopt(config)
    empty = [(torch.zeros(1, num_features), torch.zeros(1, dtype=torch.long))] * int(train.count.shape[0])
    peer = tf.TorchFacims(torch_config, tf.from_flax_params(params), original_train.class_counts, empty, empty)
    with torch.no_grad():
        for t, a in zip(peer.global_q, to_list(global_q)):
            t.copy_(a)
        peer.vs_params[0].copy_(torch.tensor(np.asarray(vs.shift)))
        peer.vs_params[1].copy_(torch.tensor(np.asarray(vs.log_scale)))
    torch_local = [t.requires_grad_(True) for t in to_list(local_q)]
    optimizer = torch.optim.Adagrad(torch_local, lr=torch_config.local_learning_rate, initial_accumulator_value=0.1,
                                    eps=1e-7)
    tx, ty = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y), dtype=torch.long)
    txv, tyv = torch.tensor(np.asarray(xv)), torch.tensor(np.asarray(yv), dtype=torch.long)
    torch_noise = noise_list(noise, config.num_mc)
    torch_global_noise = noise_list(global_noise, config.num_mc)
    local_before = [t.detach().clone() for t in torch_local]
    t_grad_global, t_grad_vs, t_value = peer.group_hypergradient(
        local_before, tx, ty, torch_noise[:hs], txv, tyv, torch_global_noise
    )
    t_middle_loss = peer.middle_step(torch_local, optimizer, tx, ty, torch_noise)

    def rel(torch_tensors, jax_arrays):
        a = np.concatenate([np.ravel(t.detach().numpy()) for t in torch_tensors])
        b = np.concatenate([np.ravel(np.asarray(j)) for j in jax_arrays])
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    return {
        "model": "MLP 16-8 (same code path as the benchmark's model)",
        "middle_step_loss": rel([t_middle_loss], [middle_loss]),
        "middle_step_new_local_posterior": rel(torch_local, flat(new_q)),
        "middle_step_update": rel([a - b for a, b in zip(torch_local, local_before)],
                                  [np.asarray(n) - np.asarray(o) for n, o in zip(flat(new_q), flat(local_q))]),
        "upper_objective_value": rel([t_value], [value]),
        "hypergradient_global": rel(t_grad_global, flat(grad_global)),
        "hypergradient_vs": rel(t_grad_vs, [grad_vs.shift, grad_vs.log_scale]),
    }


def draws_like_fairopt(jax, torch, tf, state, train, val, config, batch_size: int):
    """The batches and noise that ``facims(...).step(state, (train, val))`` draws, as torch tensors.

    Mirrors the key streams of ``fairopt.solvers.facims`` (round key -> middle / upper keys ->
    per step (batch key, noise key)); if fairopt changes them, the round check below reports a
    large error without any arithmetic being wrong.
    """
    import numpy as np

    from fairopt import posterior
    from fairopt.data.batching import sample_group_batch

    num_groups = int(train.count.shape[0])
    _, round_key = jax.random.split(state.key)
    middle_key, upper_key, _, _ = jax.random.split(round_key, 4)
    middle_keys = jax.random.split(middle_key, (config.middle_steps, 2))
    upper_keys = jax.random.split(upper_key, (config.upper_steps, 2))
    one_group_q = jax.tree_util.tree_map(lambda leaf: leaf[0], state.local_posteriors)
    common = getattr(config, "common_noise", False)
    tensor = lambda a, dtype=torch.float32: torch.tensor(np.asarray(a), dtype=dtype)  # noqa: E731
    draws_list = lambda noise: [[tensor(a[i]) for a in tf.from_flax_params(noise)] for i in range(config.num_mc)]  # noqa: E731
    middle = []
    for m in range(config.middle_steps):
        batch = sample_group_batch(middle_keys[m, 0], train, batch_size)
        if common:
            noises = [draws_list(posterior.standard_normal_like(middle_keys[m, 1], one_group_q, config.num_mc))] * num_groups
        else:
            stacked = jax.vmap(lambda k: posterior.standard_normal_like(k, one_group_q, config.num_mc))(
                jax.random.split(middle_keys[m, 1], num_groups)
            )
            noises = [draws_list(jax.tree_util.tree_map(lambda leaf: leaf[g], stacked)) for g in range(num_groups)]
        middle.append([(tensor(batch.x[g]), tensor(batch.y[g], torch.long), noises[g]) for g in range(num_groups)])
    upper = []
    for u in range(config.upper_steps):
        batch = sample_group_batch(upper_keys[u, 0], val, batch_size)
        noise = posterior.standard_normal_like(upper_keys[u, 1], state.global_posterior, config.num_mc)
        upper.append(([(tensor(batch.x[g]), tensor(batch.y[g], torch.long)) for g in range(num_groups)], draws_list(noise)))
    return {"middle": middle, "upper": upper}


def compare_states(tf, peer, state) -> dict:
    """Relative errors of the PyTorch peer's state against a fairopt ``FacimsState``."""
    import numpy as np

    def rel(torch_tensors, arrays):
        a = np.concatenate([np.ravel(t.detach().numpy()) for t in torch_tensors])
        b = np.concatenate([np.ravel(np.asarray(x)) for x in arrays])
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    half = len(peer.global_q) // 2
    groups = range(len(peer.local_qs))
    local_mean = tf.from_flax_params(state.local_posteriors.mean)
    local_log_std = tf.from_flax_params(state.local_posteriors.log_std)
    return {
        "global_mean": rel(peer.global_q[:half], tf.from_flax_params(state.global_posterior.mean)),
        "global_log_std": rel(peer.global_q[half:], tf.from_flax_params(state.global_posterior.log_std)),
        "local_means": rel([t for q in peer.local_qs for t in q[:half]], [a[g] for g in groups for a in local_mean]),
        "local_log_stds": rel([t for q in peer.local_qs for t in q[half:]], [a[g] for g in groups for a in local_log_std]),
        "vs_params": rel(peer.vs_params, [state.vs_params.shift, state.vs_params.log_scale]),
    }


def compare_peers(reference, other) -> dict:
    """Relative differences of ``other``'s state from ``reference``'s (two PyTorch peers)."""
    import numpy as np

    def rel(a, b):
        a = np.concatenate([np.ravel(t.detach().numpy()) for t in a])
        b = np.concatenate([np.ravel(t.detach().numpy()) for t in b])
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    half = len(reference.global_q) // 2
    local = lambda peer, part: [t for q in peer.local_qs for t in (q[:half] if part == 0 else q[half:])]  # noqa: E731
    return {
        "global_mean": rel(other.global_q[:half], reference.global_q[:half]),
        "global_log_std": rel(other.global_q[half:], reference.global_q[half:]),
        "local_means": rel(local(other, 0), local(reference, 0)),
        "local_log_stds": rel(local(other, 1), local(reference, 1)),
    }


# ---- main ---------------------------------------------------------------------------------------


def main(argv):
    del argv
    protocol = SMOKE if FLAGS.smoke else PAPER
    output = Path(FLAGS.output) if FLAGS.output else (
        DEFAULT_OUTPUT.with_name("peer_facims_smoke.json") if FLAGS.smoke else DEFAULT_OUTPUT
    )
    if FLAGS.omp_wait_policy != "default":
        os.environ.setdefault("OMP_WAIT_POLICY", FLAGS.omp_wait_policy)
    try:
        import torch
    except ImportError:
        print(TORCH_MISSING, file=sys.stderr)
        return 1
    cores = os.cpu_count() or 1
    if FLAGS.num_threads < cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: FLAGS.num_threads])  # before JAX starts its pool
    torch.set_num_threads(FLAGS.num_threads)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src import compilation_cache

    from benchmarks import _torch_facims as tf
    from fairopt import data, models
    from fairopt.solvers.facims import FacimsConfig, facims

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    hs = FLAGS.hypergradient_samples or protocol.num_mc
    seed = FLAGS.seed

    log("loading the credit data (paper protocol split, 400 training rows per group)")
    dataset = data.load("credit")
    splits, original_train = prepare(dataset, seed, protocol.samples_per_group)
    train, val = data.group_arrays(splits.train), data.group_arrays(splits.val)
    num_groups, num_classes, num_features = splits.train.num_groups, splits.train.num_classes, splits.train.num_features
    # Does the 5-seed reproduction compile once or once per seed? (val groups are padded per seed)
    shapes = set()
    for s in PAPER_SEEDS[: protocol.reproduction_seeds]:
        seed_splits = splits if s == seed else prepare(dataset, s, protocol.samples_per_group)[0]
        shapes.add((data.group_arrays(seed_splits.train).x.shape, data.group_arrays(seed_splits.val).x.shape))
    reproduction_compiles = len(shapes)

    check = None
    if FLAGS.check:
        log("check: one middle step and one hypergradient, PyTorch vs fairopt, same inputs")
        check = check_same_arithmetic(jax, jnp, torch, tf, splits, original_train, protocol, hs, seed)
        log("check: " + ", ".join(f"{k}={v:.2e}" for k, v in check.items() if isinstance(v, float)))

    params, apply_fn = models.make_model("mlp", num_classes, num_features, jax.random.key(seed), hidden=protocol.hidden)
    config = FacimsConfig(
        inverse="neumann", neumann_terms=protocol.inverse_terms, neumann_alpha=protocol.neumann_alpha,
        middle_steps=protocol.middle_steps, upper_steps=protocol.upper_steps, num_mc=protocol.num_mc,
        hypergradient_samples=hs, group_mapping=FLAGS.group_mapping,
    )
    solver = facims(apply_fn, config, class_counts=original_train.class_counts, group_counts=original_train.group_counts,
                    batch_size=protocol.batch_size, val_batch_size=protocol.batch_size)
    state = solver.init(jax.random.key(seed + 1), params)
    batch_data = (train, val)

    def to_torch_groups(split):
        x, y, groups = split.features, split.labels, split.groups
        return [(torch.tensor(x[groups == g], dtype=torch.float32), torch.tensor(y[groups == g], dtype=torch.long))
                for g in range(num_groups)]

    peer = tf.TorchFacims(tf.TorchFacimsConfig.from_fairopt(config), tf.from_flax_params(params),
                          original_train.class_counts, to_torch_groups(splits.train), to_torch_groups(splits.val),
                          batch_size=protocol.batch_size, val_batch_size=protocol.batch_size, seed=seed)
    history = {"fairopt": [], "torch": []}

    def record(name, metrics, seconds, kind):
        row = {"round": len(history[name]) + 1, "kind": kind, "seconds": seconds,
               **{k: float(v) for k, v in metrics.items()}}
        history[name].append(row)
        log(f"{name} round {row['round']} ({kind}): {seconds:.2f}s " +
            " ".join(f"{k}={row[k]:.4g}" for k in ("middle_loss", "upper_loss", "divergence")))

    round_draws = draws_like_fairopt(jax, torch, tf, state, train, val, config, protocol.batch_size) if FLAGS.check else None

    # -- fairopt: first epoch, persistent cache off --
    log("fairopt: first epoch with the persistent compilation cache off (trace, lower, compile, run)")
    jax.clear_caches()
    start = time.perf_counter()
    lowered = jax.jit(solver.step).lower(state, batch_data)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    state, metrics = compiled(state, batch_data)
    jax.block_until_ready((state, metrics))
    finished = time.perf_counter()
    cold = {"trace_lower_s": lowered_at - start, "compile_s": compiled_at - lowered_at,
            "first_run_s": finished - compiled_at, "first_epoch_s": finished - start}
    record("fairopt", metrics, finished - compiled_at, "first (cache off)")
    if FLAGS.check:
        log("check: one full round of the PyTorch peer on fairopt's batches and noise, from the same initial state")
        round_peer = tf.TorchFacims(peer.config, tf.from_flax_params(params), original_train.class_counts,
                                    peer.train_groups, peer.val_groups, batch_size=protocol.batch_size,
                                    val_batch_size=protocol.batch_size, seed=seed)
        round_metrics = round_peer.epoch(draws=round_draws)
        check["round"] = {
            "what": "one round at the benchmark's shapes from the same initial state and the same draws: "
                    "relative error of the PyTorch state vs fairopt's",
            **compare_states(tf, round_peer, state),
            "fairopt_metrics": {k: float(v) for k, v in metrics.items()},
            "torch_metrics": round_metrics,
        }
        # Conditioning: the same PyTorch round from initial means perturbed by a relative 1e-7.
        perturbed_peer = tf.TorchFacims(peer.config, tf.from_flax_params(params), original_train.class_counts,
                                        peer.train_groups, peer.val_groups, seed=seed)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            half = len(perturbed_peer.global_q) // 2
            for t in perturbed_peer.global_q[:half]:
                t.mul_(1 + 1e-7 * torch.randn(t.shape, generator=generator))
            for q in perturbed_peer.local_qs:
                for t, source in zip(q, perturbed_peer.global_q):
                    t.copy_(source)
        perturbed_peer.epoch(draws=round_draws)
        check["round"]["conditioning"] = {
            "what": "PyTorch vs PyTorch from initial means perturbed by a relative 1e-7, same draws: the float32 "
                    "sensitivity of one round (differences of this size are rounding, not different arithmetic)",
            **compare_peers(round_peer, perturbed_peer),
        }
        check["torch_config"] = dataclasses.asdict(peer.config)
        log("check: round " + ", ".join(f"{k}={v:.2e}" for k, v in check["round"].items() if isinstance(v, float))
            + "; same round from a 1e-7 perturbation: "
            + ", ".join(f"{k}={v:.2e}" for k, v in check["round"]["conditioning"].items() if isinstance(v, float)))
        del round_peer, perturbed_peer, round_draws
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_cost_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    jaxpr_flops, while_loops = jaxpr_matmul_flops(jax.make_jaxpr(solver.step)(state, batch_data))

    # -- fairopt: first epoch, persistent cache on --
    cached = None
    if FLAGS.compilation_cache.lower() != "none" and not (FLAGS.smoke and not FLAGS.compilation_cache):
        from experiments import common

        cache_dir = common.enable_compilation_cache(FLAGS.compilation_cache or None)
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.reset_cache()
        jax.clear_caches()
        before = {p.name for p in cache_dir.iterdir()}
        log(f"fairopt: first epoch with the persistent compilation cache on ({cache_dir})")
        start = time.perf_counter()
        lowered = jax.jit(solver.step).lower(state, batch_data)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        compiled_at = time.perf_counter()
        state, metrics = compiled(state, batch_data)
        jax.block_until_ready((state, metrics))
        finished = time.perf_counter()
        written = sorted({p.name for p in cache_dir.iterdir()} - before)
        cached = {"cache_dir": str(cache_dir), "hit": not written, "trace_lower_s": lowered_at - start,
                  "compile_s": compiled_at - lowered_at, "first_run_s": finished - compiled_at,
                  "first_epoch_s": finished - start}
        record("fairopt", metrics, finished - compiled_at, "first (cache on, " + ("hit)" if not written else "miss)"))
        jax.config.update("jax_enable_compilation_cache", False)

    # -- PyTorch: first epoch --
    log(f"torch: first epoch ({torch.get_num_threads()} threads)")
    start = time.perf_counter()
    torch_metrics = peer.epoch()
    torch_first = time.perf_counter() - start
    record("torch", torch_metrics, torch_first, "first")

    # -- steady state, alternating --
    threads = FLAGS.num_threads
    single = FLAGS.torch_single_thread and threads != 1
    log(f"steady state: {FLAGS.epochs} epochs each, alternating"
        + (f" (torch at {threads} threads and at 1 thread)" if single else ""))
    fairopt_times, torch_times, single_times = [], [], []

    def fairopt_epoch():
        nonlocal state
        start = time.perf_counter()
        state, metrics = compiled(state, batch_data)
        jax.block_until_ready((state, metrics))
        seconds = time.perf_counter() - start
        record("fairopt", metrics, seconds, "steady")
        fairopt_times.append(seconds)

    def torch_epoch(num_threads, times):
        torch.set_num_threads(num_threads)
        start = time.perf_counter()
        metrics = peer.epoch()
        seconds = time.perf_counter() - start
        torch.set_num_threads(threads)
        record("torch", metrics, seconds, f"steady, {num_threads} thread(s)")
        times.append(seconds)

    order = [fairopt_epoch, lambda: torch_epoch(threads, torch_times)]
    if single:
        order.append(lambda: torch_epoch(1, single_times))
    for i in range(FLAGS.epochs):
        for run in order if i % 2 == 0 else reversed(order):
            run()
    pair_ratios = [t / f for t, f in zip(torch_times, fairopt_times)]
    single_ratios = [t / f for t, f in zip(single_times, fairopt_times)]

    # -- FLOPs of a PyTorch epoch (a separate instance, not timed) --
    log("torch: counting the matmul FLOPs of one epoch (FlopCounterMode)")
    from torch.utils.flop_counter import FlopCounterMode

    counter_peer = tf.TorchFacims(peer.config, tf.from_flax_params(params), original_train.class_counts,
                                  peer.train_groups, peer.val_groups, batch_size=protocol.batch_size,
                                  val_batch_size=protocol.batch_size, seed=seed + 1)
    torch.set_num_threads(1)  # FLOP counts do not depend on threads; 1 is the quicker under load
    with FlopCounterMode(display=False) as flop_counter:
        counter_peer.epoch()
    torch.set_num_threads(threads)
    torch_flops = float(flop_counter.get_total_flops())

    log("peak: 2048 x 2048 float32 matmul, JAX and PyTorch")
    jax_peak, torch_peak = peak_matmul(jax, jnp, torch)

    fairopt_steady, torch_steady = median(fairopt_times), median(torch_times)
    fairopt_gflops = jaxpr_flops / fairopt_steady / 1e9
    torch_gflops = torch_flops / torch_steady / 1e9
    runs = protocol.reproduction_seeds * protocol.reproduction_epochs
    compile_overhead = cold["first_epoch_s"] - fairopt_steady
    result = {
        "benchmark": "peer_facims",
        "protocol": {**dataclasses.asdict(protocol), "hypergradient_samples": hs, "num_groups": num_groups,
                     "num_features": num_features, "num_classes": num_classes, "dtype": "float32",
                     "smoke": FLAGS.smoke, "seed": seed,
                     "train_rows_per_group": [int(c) for c in np.asarray(train.count)]},
        "environment": {
            "cpu_count": cores, "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_num_threads": torch.get_num_threads(), "jax": jax.__version__, "torch": torch.__version__,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(libgomp default)"),
            "python": platform.python_version(), "load_average_at_end": list(os.getloadavg()),
            "note": "JAX/XLA uses its default CPU thread pool (one thread per schedulable core).",
        },
        "check": check,
        "fairopt_config": dataclasses.asdict(config),
        "source": source_info(),
        "fairopt": {
            "first_epoch_cache_off": cold,
            "first_epoch_cache_on": cached,
            "steady_epoch_s": fairopt_times,
            "steady_epoch_median_s": fairopt_steady,
            "matmul_flops_per_epoch_jaxpr": jaxpr_flops,
            "while_loops_counted_once": while_loops,
            "xla_cost_analysis_flops": xla_cost_flops,
            "achieved_gflops": fairopt_gflops,
            "peak_matmul_gflops": jax_peak,
            "fraction_of_peak": fairopt_gflops / jax_peak,
            "projected_reproduction_s": reproduction_compiles * compile_overhead + runs * fairopt_steady,
            "reproduction_compiles": reproduction_compiles,
        },
        "torch": {
            "first_epoch_s": torch_first,
            "steady_epoch_s": torch_times,
            "steady_epoch_median_s": torch_steady,
            "matmul_flops_per_epoch_counter": torch_flops,
            "achieved_gflops": torch_gflops,
            "peak_matmul_gflops": torch_peak,
            "fraction_of_peak": torch_gflops / torch_peak,
            "projected_reproduction_s": (torch_first - torch_steady) + runs * torch_steady,
        },
        "torch_1thread": {
            "steady_epoch_s": single_times,
            "steady_epoch_median_s": median(single_times),
            "achieved_gflops": torch_flops / median(single_times) / 1e9,
            "fraction_of_peak": torch_flops / median(single_times) / 1e9 / torch_peak,
            "projected_reproduction_s": runs * median(single_times),
            "ratio_torch_over_fairopt": median(single_times) / fairopt_steady,
            "ratio_paired_median": median(single_ratios),
        } if single else None,
        "analytic_matmul_flops_per_epoch": analytic_flops(protocol, num_features, num_classes, num_groups, hs),
        "ratio_torch_over_fairopt": torch_steady / fairopt_steady,
        "ratio_paired_median": median(pair_ratios),
        "target_ratio": 10.0,
        "history": history,
    }
    result["markdown"] = markdown_table(result)
    atomic_write_json(output, result)
    print(result["markdown"])
    log(f"wrote {output}")
    return 0


def markdown_table(r) -> str:
    f, t, p, s1 = r["fairopt"], r["torch"], r["protocol"], r["torch_1thread"]
    cold, cached = f["first_epoch_cache_off"], f["first_epoch_cache_on"]
    steady_range = lambda xs: f"{min(xs):.2f}–{max(xs):.2f}"  # noqa: E731
    hidden = "-".join(map(str, p["hidden"]))
    verdict = lambda ratio: f"{'met' if ratio >= r['target_ratio'] else 'NOT met'} ({ratio:.2f}x)"  # noqa: E731
    lines = [
        f"## FACIMS epoch: fairopt (JAX, jit) vs eager PyTorch{' — SMOKE (small model)' if p['smoke'] else ''}",
        "",
        f"Credit data, {p['num_groups']} groups x {p['train_rows_per_group'][0]} train rows, MLP "
        f"{p['num_features']}-{hidden}-{p['num_classes']} ELU, batch {p['batch_size']}/group, "
        f"{p['middle_steps']} middle + {p['upper_steps']} upper steps, n_MC {p['num_mc']}, "
        f"Neumann {p['inverse_terms']} terms (alpha {p['neumann_alpha']}), {p['hypergradient_samples']} MC draw(s) "
        f"in the Hessian, float32; torch threads {r['environment']['torch_num_threads']} "
        f"(OMP_WAIT_POLICY {r['environment']['OMP_WAIT_POLICY']}), "
        f"{r['environment']['cpu_count']} cores; {len(f['steady_epoch_s'])} steady epochs each, alternating; "
        f"load average at the end {', '.join(f'{x:.1f}' for x in r['environment']['load_average_at_end'])}.",
        "",
        "| | fairopt (JAX) | PyTorch (eager) | torch / fairopt |",
        "|---|---:|---:|---:|",
        f"| steady epoch, median (s) | {f['steady_epoch_median_s']:.3f} | {t['steady_epoch_median_s']:.3f} "
        f"| **{r['ratio_torch_over_fairopt']:.2f}x** |",
        f"| steady epoch, range (s) | {steady_range(f['steady_epoch_s'])} | {steady_range(t['steady_epoch_s'])} "
        f"| paired median {r['ratio_paired_median']:.2f}x |",
    ]
    if s1:
        lines += [
            f"| steady epoch, median (s), torch at 1 thread | | {s1['steady_epoch_median_s']:.3f} "
            f"({steady_range(s1['steady_epoch_s'])}) | **{s1['ratio_torch_over_fairopt']:.2f}x** "
            f"(paired {s1['ratio_paired_median']:.2f}x) |",
        ]
    lines += [
        f"| first epoch, persistent cache off (s) | {cold['first_epoch_s']:.1f} (trace+lower {cold['trace_lower_s']:.1f}, "
        f"compile {cold['compile_s']:.1f}, run {cold['first_run_s']:.2f}) | {t['first_epoch_s']:.2f} (no compile) | |",
    ]
    if cached:
        status = "hit" if cached["hit"] else "miss: compiled and written"
        lines.append(
            f"| first epoch, persistent cache on (s) | {cached['first_epoch_s']:.1f} ({status}; trace+lower "
            f"{cached['trace_lower_s']:.1f}, compile/load {cached['compile_s']:.1f}) | — | |"
        )
    lines += [
        f"| projected {p['reproduction_seeds']} seeds x {p['reproduction_epochs']} epochs (min) | "
        f"{f['projected_reproduction_s'] / 60:.1f} ({f['reproduction_compiles']} compile(s), cache off) | "
        f"{t['projected_reproduction_s'] / 60:.1f}"
        + (f" (1 thread: {s1['projected_reproduction_s'] / 60:.1f})" if s1 else "")
        + f" | {t['projected_reproduction_s'] / f['projected_reproduction_s']:.2f}x |",
        f"| matmul GFLOP per epoch | {f['matmul_flops_per_epoch_jaxpr'] / 1e9:.2f} (traced program) | "
        f"{t['matmul_flops_per_epoch_counter'] / 1e9:.2f} (FlopCounterMode) | analytic ≈ "
        f"{r['analytic_matmul_flops_per_epoch'] / 1e9:.2f} |",
        f"| achieved GFLOP/s | {f['achieved_gflops']:.2f} | {t['achieved_gflops']:.2f}"
        + (f" (1 thread: {s1['achieved_gflops']:.2f})" if s1 else "") + " | |",
        f"| 2048² float32 matmul GFLOP/s (same run) | {f['peak_matmul_gflops']:.1f} (jnp.dot) | "
        f"{t['peak_matmul_gflops']:.1f} (torch.mm) | |",
        f"| fraction of that peak | {f['fraction_of_peak']:.1%} | {t['fraction_of_peak']:.1%}"
        + (f" (1 thread: {s1['fraction_of_peak']:.1%})" if s1 else "") + " | |",
        "",
        f"XLA `cost_analysis()['flops']` of the compiled epoch: {f['xla_cost_analysis_flops'] / 1e9:.3f} GFLOP "
        "(it counts each loop body once, so it undercounts this program of nested loops; the GFLOP/s above use "
        "the traced count).",
        f"Target: fairopt >= {r['target_ratio']:.0f}x faster per epoch — against torch at "
        f"{r['environment']['torch_num_threads']} threads {verdict(r['ratio_torch_over_fairopt'])}"
        + (f"; against torch at 1 thread {verdict(s1['ratio_torch_over_fairopt'])}" if s1 else "") + ".",
    ]
    if r["check"]:
        c = r["check"]
        lines += [
            "",
            "Same-arithmetic check (" + c["model"] + ", same state, batch and noise; relative error "
            "torch vs fairopt): " + ", ".join(f"{k} {v:.1e}" for k, v in c.items() if isinstance(v, float)) + ".",
        ]
        if c.get("round"):
            lines += [
                "",
                f"Full-round check (benchmark shapes, same initial state, fairopt's batches and noise fed to PyTorch; "
                f"relative error of the state after one round): "
                + ", ".join(f"{k} {v:.1e}" for k, v in c["round"].items() if isinstance(v, float))
                + "; losses fairopt " + " / ".join(f"{c['round']['fairopt_metrics'][k]:.6g}" for k in ("middle_loss", "upper_loss"))
                + ", torch " + " / ".join(f"{c['round']['torch_metrics'][k]:.6g}" for k in ("middle_loss", "upper_loss"))
                + ". For scale, the same PyTorch round from initial means perturbed by a relative 1e-7 moves: "
                + ", ".join(f"{k} {v:.1e}" for k, v in c["round"]["conditioning"].items() if isinstance(v, float))
                + " (float32 rounding as amplified by one round).",
            ]
    lines += [
        "",
        "Losses per round (different random draws, same initial model; a sanity check, not a comparison):",
        "",
        "| round | fairopt middle / upper loss / KL | torch middle / upper loss / KL |",
        "|---:|---:|---:|",
    ]
    for fr, tr in zip(r["history"]["fairopt"], r["history"]["torch"]):
        lines.append(f"| {fr['round']} | {fr['middle_loss']:.4g} / {fr['upper_loss']:.4g} / {fr['divergence']:.4g} | "
                     f"{tr['middle_loss']:.4g} / {tr['upper_loss']:.4g} / {tr['divergence']:.4g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
