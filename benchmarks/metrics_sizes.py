r"""Metrics at many row counts: compiled programs and time per call of ``fairopt.metrics``.

``metrics.report`` and the fairlearn-style entry points used to compile one XLA program per
distinct row count (1.2-1.5 s each on a 2-core CPU; 200 sizes in one process ran for ten minutes
and then aborted with ``LLVM ERROR: Unable to allocate section memory``). They now pad host-side
inputs to size buckets (``metrics.row_bucket``) with masked rows. This benchmark measures:

* ``sizes``: ``--num_sizes`` calls of ``report`` and ``equal_opportunity_difference`` with
  distinct row counts drawn from ``[1, --max_rows]``: wall time, and the programs compiled by
  each jitted core (``_cache_size()``) — bounded by the number of buckets;
* ``rows_<n>``: after a warm-up call, the median wall time of ``--repeats`` calls on ``n`` rows
  (``--rows``, default 10,000) of ``report`` (binary, 4 groups) and
  ``equal_opportunity_difference`` (string sensitive features).

    python -m benchmarks.metrics_sizes
    python -m benchmarks.metrics_sizes --num_sizes=50 --rows=1000,10000,100000

Writes ``<output_dir>/metrics_sizes.json`` and prints it.
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
import numpy as np
from absl import app, flags

from fairopt import metrics

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_sizes", 200, "Distinct row counts of the many-sizes run.", lower_bound=1)
flags.DEFINE_integer("max_rows", 20_000, "Largest row count of the many-sizes run.", lower_bound=1)
flags.DEFINE_list("rows", ["10000"], "Row counts of the per-call timings.")
flags.DEFINE_integer("repeats", 30, "Timed calls per row count (median reported).", lower_bound=1)
flags.DEFINE_string("output_dir", "benchmarks/results", "Folder of metrics_sizes.json.")


def _inputs(rng, n, num_groups=4):
    probs = rng.dirichlet(np.ones(2), n).astype(np.float32)
    labels = rng.integers(0, 2, n)
    groups = rng.integers(0, num_groups, n)
    return probs, labels, groups, np.array(["a", "b", "c", "d"])[groups]


def _cores():
    return {"report": metrics._report_arrays_jit, "equal_opportunity_difference": metrics._deo_gap_jit}


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    result = dict(
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__, backend=jax.default_backend()),
    )
    sizes = rng.choice(np.arange(1, FLAGS.max_rows + 1), size=min(FLAGS.num_sizes, FLAGS.max_rows), replace=False)
    before = {name: core._cache_size() for name, core in _cores().items()}
    start = time.perf_counter()
    for n in sizes:
        probs, labels, groups, names = _inputs(rng, int(n))
        metrics.report(probs, labels, groups, num_classes=2, num_groups=4)
        metrics.equal_opportunity_difference(labels, probs.argmax(1), sensitive_features=names)
    seconds = time.perf_counter() - start
    result["sizes"] = dict(
        calls=int(len(sizes)),
        max_rows=FLAGS.max_rows,
        buckets=len({metrics.row_bucket(int(n)) for n in sizes}),
        seconds=round(seconds, 2),
        compiled_programs={name: core._cache_size() - before[name] for name, core in _cores().items()},
    )
    print(json.dumps(result["sizes"]), file=sys.stderr, flush=True)
    for rows in (int(r) for r in FLAGS.rows):
        probs, labels, groups, names = _inputs(rng, rows)
        calls = {
            "report": lambda: metrics.report(probs, labels, groups, num_classes=2, num_groups=4),
            "equal_opportunity_difference": lambda: metrics.equal_opportunity_difference(
                labels, probs.argmax(1), sensitive_features=names
            ),
        }
        timings = {}
        for name, call in calls.items():
            call()  # warm-up (compiles this bucket if the run above did not)
            times = []
            for _ in range(FLAGS.repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            timings[name] = dict(median_ms=round(1000 * statistics.median(times), 2), max_ms=round(1000 * max(times), 2))
        result[f"rows_{rows}"] = dict(bucket=metrics.row_bucket(rows), **timings)
        print(json.dumps({f"rows_{rows}": result[f"rows_{rows}"]}), file=sys.stderr, flush=True)
    path = Path(FLAGS.output_dir) / "metrics_sizes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
