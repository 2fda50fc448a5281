r"""Group-axis scaling of the FACIMS round: the vmapped step against a Python loop over groups.

For each number of groups G, a synthetic problem with a fixed number of training rows per group
(so the work per group is constant) is solved with

* ``vmapped`` — ``jax.jit(facims(...).step)``: one compiled round, every per-group function
  ``jax.vmap``-ed over the group axis (the solver as shipped);
* ``loop`` — the same round driven from Python: the per-group functions of
  :func:`fairopt.solvers.facims.facims_parts` (``middle_step``, ``group_hypergradient``), each
  ``jax.jit``-ed once for ONE group, called group after group. The random draws reproduce the
  vmapped step's (same keys, same batches and noise), so both variants do the same work; the
  loop's first round is checked against the vmapped round from the same state
  (``rel_diff_first_round``, relative difference of the whole state; float32 round-off,
  amplified by the round — Adagrad's first steps move every coordinate by about its step size
  whatever the gradient's magnitude, so a gradient near 0 changes sign with its last bits — is
  1e-5 with a tiny MLP and ~1e-3 with the credit MLP; an unfaithful loop gives O(1)).

The loop reads the round's structure (key splits, draws, averaging, updates) from
``fairopt/solvers/facims.py`` as of this benchmark; if the solver's round changes, the check
above shows it.

Timing: compilation is reported separately (vmapped: ``lower + compile`` of the step; loop: the
first round, which compiles the per-group functions once — their shapes do not depend on G —
plus the small per-G draw / averaging functions). Then one untimed warm-up round each, and
``--steps`` timed rounds with the two variants alternating, so that both see the same machine
load; the table reports medians and the ratio of the medians. The machine is shared: absolute
seconds vary between runs, ratios measured side by side are the figures to compare.

    python -m benchmarks.group_scaling                              # G = 2 ... 64, credit MLP
    python -m benchmarks.group_scaling --groups=2,4 --steps=2 --middle_steps=2 --upper_steps=1

Writes ``<output_dir>/group_scaling.json`` and ``group_scaling.md`` and prints the table.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from fairopt import data, models, posterior
from fairopt.solvers.facims import FacimsConfig, FacimsState, facims, facims_parts

FLAGS = flags.FLAGS
flags.DEFINE_list("groups", ["2", "4", "8", "16", "32", "64"], "Numbers of groups G.")
flags.DEFINE_integer("rows_per_group", 400, "Training rows per group (the credit protocol's 400).", lower_bound=1)
flags.DEFINE_integer("val_rows_per_group", 200, "Validation rows per group.", lower_bound=1)
flags.DEFINE_integer("num_features", 22, "Input features (credit: 22).", lower_bound=1)
flags.DEFINE_list("hidden", ["400", "200", "100"], "MLP hidden widths (credit: 400,200,100).")
flags.DEFINE_integer("steps", 3, "Timed rounds per variant and G (median reported).", lower_bound=1)
flags.DEFINE_integer("middle_steps", 10, "FacimsConfig.middle_steps (both variants).", lower_bound=1)
flags.DEFINE_integer("upper_steps", 5, "FacimsConfig.upper_steps (both variants).", lower_bound=0)
flags.DEFINE_integer("num_mc", 5, "FacimsConfig.num_mc.", lower_bound=1)
flags.DEFINE_integer("batch_size", 50, "Train rows per group per middle step.", lower_bound=1)
flags.DEFINE_integer("val_batch_size", 50, "Validation rows per group per upper step.", lower_bound=1)
flags.DEFINE_enum("common_noise", "default", ["default", "true", "false"],
                  "FacimsConfig.common_noise (if the solver has it): one Monte-Carlo draw shared by the groups.")
flags.DEFINE_string("output_dir", "benchmarks/results", "Where to write group_scaling.{json,md}.")
flags.DEFINE_string("name", "group_scaling", "Output file stem.")


# ------------------------------------------------------------------------------- problem


def make_problem(num_groups: int, config: FacimsConfig, hidden, seed: int = 0):
    uniform = tuple(np.full(num_groups, 1.0 / num_groups))
    common = dict(num_features=FLAGS.num_features, class_proportions=(0.8, 0.2), group_proportions=uniform)
    train_set = data.synthetic_subgroups(FLAGS.rows_per_group * num_groups, seed=seed, **common)
    val_set = data.synthetic_subgroups(FLAGS.val_rows_per_group * num_groups, seed=seed + 1, **common)
    assert np.all(train_set.group_counts == FLAGS.rows_per_group), train_set.group_counts
    params, apply_fn = models.make_model("mlp", 2, FLAGS.num_features, jax.random.key(seed), hidden=tuple(hidden))
    kwargs = dict(class_counts=train_set.class_counts, group_counts=train_set.group_counts)
    solver = facims(apply_fn, config, batch_size=FLAGS.batch_size, val_batch_size=FLAGS.val_batch_size, **kwargs)
    parts = facims_parts(apply_fn, config, **kwargs)
    grouped = (data.group_arrays(train_set), data.group_arrays(val_set))
    return solver, parts, params, grouped


# ------------------------------------------------------------------------------- loop variant


def unstack(tree, num_groups):
    return [jax.tree_util.tree_map(lambda leaf: leaf[g], tree) for g in range(num_groups)]


def stack(trees):
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def to_loop_state(state: FacimsState, num_groups: int):
    return (
        state.global_posterior,
        unstack(state.local_posteriors, num_groups),
        state.vs_params,
        unstack(state.local_opt_state, num_groups),
        state.global_opt_state,
        state.hparam_opt_state,
        state.rounds,
        state.key,
    )


def to_facims_state(loop_state, like: FacimsState) -> FacimsState:
    global_q, local_qs, vs_params, local_opts, global_opt, hparam_opt, rounds, key = loop_state
    return like._replace(
        global_posterior=global_q, local_posteriors=stack(local_qs), vs_params=vs_params,
        local_opt_state=stack(local_opts), global_opt_state=global_opt, hparam_opt_state=hparam_opt,
        rounds=rounds, key=key,
    )


def make_group_functions(parts, config: FacimsConfig):
    """The loop variant's per-group functions, each ``jax.jit``-ed for ONE group.

    Built once and reused for every G: their inputs (one group's posterior, batch, noise key,
    radius) have shapes that do not depend on G, and ``parts``' functions depend on the problem
    only through the class prior of ``v_bar`` (the same for every G here: fixed class
    proportions) — the group's SAM radius is an argument.
    """

    @jax.jit
    def middle_group_drawing(local_q, opt_state, global_q, vs_params, batch, noise_key, group, radius, active):
        """Independent noise per group: the group's draw happens inside its call."""
        noise = posterior.standard_normal_like(noise_key, local_q, config.num_mc)
        return parts.middle_step(local_q, opt_state, global_q, vs_params, batch, noise, group, radius, active)

    @jax.jit
    def draw_noise(noise_key, q):
        return posterior.standard_normal_like(noise_key, q, config.num_mc)

    @jax.jit
    def hypergradient_noise(noise_key, local_q):
        noise = posterior.standard_normal_like(noise_key, local_q, config.num_mc)
        return jax.tree_util.tree_map(lambda leaf: leaf[: config.hypergradient_samples], noise)

    return dict(
        middle_group_drawing=middle_group_drawing,
        middle_group=jax.jit(parts.middle_step),  # common noise: drawn once per step, shared
        draw_noise=draw_noise,
        hypergradient_noise=hypergradient_noise,
        hypergradient_group=jax.jit(parts.group_hypergradient),
    )


def make_loop_round(group_fns, parts, config: FacimsConfig, num_groups: int, batch_size: int, val_batch_size: int):
    """One FACIMS round (``facims(...).step``) as a Python loop over groups of per-group jitted calls.

    Mirrors ``step`` in fairopt/solvers/facims.py: the same key splits and draws (so the same
    numbers), the middle level group after group for each middle step, then per upper step each
    group's hypergradient, their active-weighted average and the global / hyperparameter update.
    The per-group functions (``group_fns``, :func:`make_group_functions`) compile once for all
    G; only the cheap draw and averaging functions, whose outputs are G-long lists, compile per G.
    """
    if not config.has_validation_level:
        raise ValueError("the loop benchmark covers methods with a validation level (not 'fams')")
    if config.groups_per_step is not None:
        raise ValueError("the loop benchmark samples all groups (groups_per_step=None)")
    groups = list(range(num_groups))
    common_noise = getattr(config, "common_noise", False)  # one draw shared by all groups
    hypergradient_group = group_fns["hypergradient_group"]

    @jax.jit
    def round_keys(key):
        key, round_key = jax.random.split(key)
        middle_key, upper_key, active_key, _ = jax.random.split(round_key, 4)
        return (
            key,
            jax.random.split(middle_key, (config.middle_steps, 2)),
            jax.random.split(upper_key, (config.upper_steps, 2)),
            active_key,
        )

    @jax.jit
    def active_groups(train_count):
        present = train_count > 0
        return [present[g] for g in groups], present.astype(jnp.float32) / jnp.maximum(jnp.sum(present), 1)

    @jax.jit
    def group_draws(step_keys, grouped):
        """A middle step's batch for every group and the per-group noise keys, as G-lists."""
        batch_key, noise_key = step_keys[0], step_keys[1]
        batch = data.sample_group_batch(batch_key, grouped, batch_size)
        noise_keys = jax.random.split(noise_key, num_groups)
        return unstack(batch, num_groups), [noise_keys[g] for g in groups]

    @jax.jit
    def val_draws(step_keys, grouped, global_q):
        val_key, noise_key = step_keys[0], step_keys[1]
        batch = data.sample_group_batch(val_key, grouped, val_batch_size)
        return unstack(batch, num_groups), posterior.standard_normal_like(noise_key, global_q, config.num_mc)

    @jax.jit
    def upper_update(global_q, vs_params, global_opt_state, hparam_opt_state, grads_global, grads_vs, weight, rounds):
        average = lambda trees: jax.tree_util.tree_map(  # noqa: E731
            lambda *leaves: jnp.tensordot(weight, jnp.stack(leaves), axes=1), *trees
        )
        grad_global, grad_vs = average(grads_global), average(grads_vs)
        global_optimizer = optax.adagrad(config.global_learning_rate * config.global_decay ** rounds.astype(jnp.float32))
        updates, global_opt_state = global_optimizer.update(grad_global, global_opt_state, global_q)
        global_q = parts.clip_log_std(optax.apply_updates(global_q, updates))
        if config.learns_hparams:
            updates, hparam_opt_state = parts.hparam_optimizer.update(grad_vs, hparam_opt_state, vs_params)
            vs_params = optax.apply_updates(vs_params, updates)
        return global_q, vs_params, global_opt_state, hparam_opt_state

    group_ids = [jnp.asarray(g, jnp.int32) for g in groups]
    radii = [parts.sharpness[g] for g in groups]

    def loop_round(loop_state, batches):
        global_q, local_qs, vs_params, local_opts, global_opt, hparam_opt, rounds, key = loop_state
        train, val = batches
        key, middle_keys, upper_keys, _ = round_keys(key)
        active, weight = active_groups(train.count)
        local_qs, local_opts = list(local_qs), list(local_opts)
        for m in range(config.middle_steps):
            batch, noise_keys = group_draws(middle_keys[m], train)
            if common_noise:
                noise = group_fns["draw_noise"](middle_keys[m][1], local_qs[0])
                for g in groups:
                    local_qs[g], local_opts[g], _ = group_fns["middle_group"](
                        local_qs[g], local_opts[g], global_q, vs_params, batch[g], noise, group_ids[g], radii[g], active[g]
                    )
            else:
                for g in groups:
                    local_qs[g], local_opts[g], _ = group_fns["middle_group_drawing"](
                        local_qs[g], local_opts[g], global_q, vs_params, batch[g], noise_keys[g], group_ids[g], radii[g],
                        active[g],
                    )
        # the hypergradient is taken at the last middle step's draw (as in the solver)
        last_batch = batch
        if common_noise:
            shared = jax.tree_util.tree_map(lambda leaf: leaf[: config.hypergradient_samples], noise)
            last_noise = [shared] * num_groups
        else:
            last_noise = [group_fns["hypergradient_noise"](noise_keys[g], local_qs[g]) for g in groups]
        for u in range(config.upper_steps):
            val_batch, global_noise = val_draws(upper_keys[u], val, global_q)
            grads_global, grads_vs = [], []
            for g in groups:
                grad_global, grad_vs, _ = hypergradient_group(
                    local_qs[g], global_q, vs_params, last_batch[g], last_noise[g], val_batch[g], global_noise, group_ids[g]
                )
                grads_global.append(grad_global)
                grads_vs.append(grad_vs)
            global_q, vs_params, global_opt, hparam_opt = upper_update(
                global_q, vs_params, global_opt, hparam_opt, grads_global, grads_vs, weight, rounds
            )
        return (global_q, local_qs, vs_params, local_opts, global_opt, hparam_opt, rounds + 1, key)

    return loop_round


# ------------------------------------------------------------------------------- timing


def block(tree):
    return jax.block_until_ready(tree)


def relative_difference(first: FacimsState, second: FacimsState) -> float:
    """``||first - second|| / ||second||`` over all floating leaves of the state (key excluded).

    A global norm, not a per-leaf maximum: some leaves are ~0 (e.g. the momentum of the VS shift,
    ~1e-10 with a clipped, nearly zero gradient), where any round-off is a large relative change.
    """
    diff = total = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(first._replace(key=None)), jax.tree_util.tree_leaves(second._replace(key=None))):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        diff += float(np.sum((a - b) ** 2))
        total += float(np.sum(b**2))
    return float(np.sqrt(diff / max(total, 1e-300)))


_GROUP_FUNCTIONS = {}


def measure(num_groups: int, config: FacimsConfig, hidden) -> dict:
    solver, parts, params, batches = make_problem(num_groups, config, hidden)
    if "fns" not in _GROUP_FUNCTIONS:  # compiled once, reused for every G (make_group_functions)
        _GROUP_FUNCTIONS["fns"] = make_group_functions(parts, config)
    state = solver.init(jax.random.key(1), params)
    row = {"G": num_groups}

    start = time.perf_counter()
    vmapped_step = jax.jit(solver.step).lower(state, batches).compile()
    row["vmapped_compile_s"] = time.perf_counter() - start

    loop_round = make_loop_round(_GROUP_FUNCTIONS["fns"], parts, config, num_groups, FLAGS.batch_size, FLAGS.val_batch_size)
    start = time.perf_counter()
    loop_state = block(loop_round(to_loop_state(state, num_groups), batches))
    row["loop_first_round_s"] = time.perf_counter() - start  # compiles the per-group functions
    # faithfulness: one vmapped round from the same state as the loop's first round
    vmapped_state, _ = block(vmapped_step(state, batches))
    row["rel_diff_first_round"] = relative_difference(to_facims_state(loop_state, vmapped_state), vmapped_state)

    # one more untimed round each (warm caches), then alternate timed rounds
    vmapped_state, _ = block(vmapped_step(vmapped_state, batches))
    loop_state = block(loop_round(loop_state, batches))
    vmapped_times, loop_times = [], []
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        vmapped_state, _ = block(vmapped_step(vmapped_state, batches))
        vmapped_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        loop_state = block(loop_round(loop_state, batches))
        loop_times.append(time.perf_counter() - start)
    row["vmapped_s_per_step"] = statistics.median(vmapped_times)
    row["loop_s_per_step"] = statistics.median(loop_times)
    row["ratio_loop_over_vmapped"] = row["loop_s_per_step"] / row["vmapped_s_per_step"]
    row["vmapped_times"] = vmapped_times
    row["loop_times"] = loop_times
    row["loadavg_1min_after"] = os.getloadavg()[0]
    return row


def markdown_table(rows) -> str:
    base = rows[0]["vmapped_s_per_step"]
    lines = [
        f"| G | vmapped s/step | loop s/step | ratio loop/vmap | vmapped rel. to G={rows[0]['G']} | G / {rows[0]['G']} "
        "| vmapped compile s | loop 1st round s | loop-vmap rel. diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['G']} | {row['vmapped_s_per_step']:.3f} | {row['loop_s_per_step']:.3f} "
            f"| {row['ratio_loop_over_vmapped']:.2f} | {row['vmapped_s_per_step'] / base:.2f} | {row['G'] / rows[0]['G']:.0f} "
            f"| {row['vmapped_compile_s']:.1f} | {row['loop_first_round_s']:.1f} | {row['rel_diff_first_round']:.1e} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    group_counts = [int(g) for g in FLAGS.groups]
    hidden = [int(h) for h in FLAGS.hidden]
    options = dict(middle_steps=FLAGS.middle_steps, upper_steps=FLAGS.upper_steps, num_mc=FLAGS.num_mc)
    if FLAGS.common_noise != "default":
        if not hasattr(FacimsConfig(), "common_noise"):
            raise app.UsageError("this FacimsConfig has no common_noise option")
        options["common_noise"] = FLAGS.common_noise == "true"
    config = FacimsConfig(**options)
    meta = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
        "rows_per_group": FLAGS.rows_per_group,
        "val_rows_per_group": FLAGS.val_rows_per_group,
        "num_features": FLAGS.num_features,
        "hidden": hidden,
        "batch_size": FLAGS.batch_size,
        "val_batch_size": FLAGS.val_batch_size,
        "timed_steps": FLAGS.steps,
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_1min_start": os.getloadavg()[0],
        "command": " ".join(sys.argv),
    }
    print(f"FACIMS round, group scaling: {json.dumps(meta)}", flush=True)
    rows = []
    output = Path(FLAGS.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    for num_groups in group_counts:
        row = measure(num_groups, config, hidden)
        rows.append(row)
        print(
            f"G={num_groups}: vmapped {row['vmapped_s_per_step']:.3f} s, loop {row['loop_s_per_step']:.3f} s, "
            f"ratio {row['ratio_loop_over_vmapped']:.2f}, compile {row['vmapped_compile_s']:.1f} s, "
            f"loop first round {row['loop_first_round_s']:.1f} s, rel diff {row['rel_diff_first_round']:.1e}",
            flush=True,
        )
        # write after every G so that a long run leaves partial results
        (output / f"{FLAGS.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown_table(rows)
    (output / f"{FLAGS.name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    app.run(main)
