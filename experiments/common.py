"""Pieces shared by the experiment entry points: seeds, results files, summary tables.

Results are written atomically (a temporary file in the same folder, then ``os.replace``) so a
crash never leaves half a file, and an existing results file is never replaced unless the
caller passes ``overwrite=True``.

In a multi-process run (``--distributed``, :func:`start_distributed`) only process 0 touches the
files: it writes the results and the checkpoints (of the gathered state, so a checkpoint does
not depend on the number of processes), and what it reads (finished runs, a checkpoint, an
error) is broadcast to the other processes (:mod:`fairopt.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from fairopt import data, distributed

from experiments.paper import PAPER_SEEDS  # noqa: E402,F401  (re-exported)

# The binary fair-classification datasets of the FairALM experiments and the fairlearn benchmark,
# with the protected attribute of each (sex; Male for CelebA attributes, target Attractive).
FAIRNESS_LOADERS = {
    "adult": lambda: data.adult(group="sex"),
    "celeba_attributes": lambda: data.celeba_attributes(target="Attractive", group="Male"),
    "compas": lambda: data.compas(),
    "german": lambda: data.german(),
    "credit": lambda: data.credit(),
}


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path:
    """Keep compiled XLA programs on disk so that seeds, methods and later runs with the same
    shapes skip compilation (a nested FACIMS round takes minutes to compile on a 2-core CPU).

    The folder is ``directory``, else ``$FAIROPT_CACHE_DIR``, else ``~/.cache/fairopt/jax``.
    Every program is kept, however quick to compile: the few dozen small programs of data
    preparation and evaluation add up to seconds per process on a loaded CPU.
    """
    import jax

    path = Path(directory or os.environ.get("FAIROPT_CACHE_DIR") or Path.home() / ".cache" / "fairopt" / "jax")
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


DISTRIBUTED_FLAGS = ("distributed", "coordinator_address", "num_processes", "process_id", "heartbeat_timeout")
# Flags a resumed run may change; every other flag of an entry point must match its checkpoints.
# The process layout may change too: a checkpoint holds the gathered state of every run.
RUN_FLAGS = frozenset({"resume", "overwrite", "output_dir", "checkpoint_every", *DISTRIBUTED_FLAGS})


def define_distributed_flags(flag_values=None) -> tuple[str, ...]:
    """``--distributed`` and the coordinates of this process in a multi-process run."""
    from absl import flags

    flag_values = flag_values or flags.FLAGS
    module_name = _calling_module()
    flags.DEFINE_bool(
        "distributed", False, "Run as one of several processes (one per host) with jax.distributed: the sweep's runs "
        "(and with --shard_groups the groups) are split over every process's devices, process 0 writes the results. "
        "Implied by --coordinator_address or $JAX_COORDINATOR_ADDRESS.", flag_values=flag_values, module_name=module_name,
    )
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 (default $JAX_COORDINATOR_ADDRESS; found by JAX on "
        "SLURM / Open MPI).", flag_values=flag_values, module_name=module_name,
    )
    flags.DEFINE_integer("num_processes", None, "Processes in the run (found by JAX on SLURM / Open MPI).",
                         lower_bound=1, flag_values=flag_values, module_name=module_name)
    flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1 (found by JAX on SLURM / "
                         "Open MPI).", lower_bound=0, flag_values=flag_values, module_name=module_name)
    flags.DEFINE_integer(
        "heartbeat_timeout", 30, "Seconds after which a silent process counts as dead and the others stop with an "
        "error.", lower_bound=1, flag_values=flag_values, module_name=module_name,
    )
    return DISTRIBUTED_FLAGS


def start_distributed(flag_values) -> bool:
    """Call :func:`fairopt.distributed.initialize` if the flags (or ``$JAX_COORDINATOR_ADDRESS``)
    ask for a multi-process run; must come before any other JAX call. Returns whether it did."""
    wanted = (flag_values.distributed or flag_values.coordinator_address is not None
              or flag_values.num_processes is not None or flag_values.process_id is not None
              or bool(os.environ.get("JAX_COORDINATOR_ADDRESS")))
    if wanted:
        distributed.initialize(
            flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id,
            heartbeat_timeout_seconds=flag_values.heartbeat_timeout,
        )
    return wanted


@contextlib.contextmanager
def stop_together():
    """In a multi-process run, turn any failure into a clear error and an immediate exit.

    A process that fails (or sees another process fail: a collective then raises "Connection
    closed by peer") prints what happened and leaves at once with status 1, without JAX's exit
    barrier, which would wait for the dead process. Usage errors (the same in every process)
    pass through. Nothing is written after the failure: results only appear, atomically, once
    every run has finished.
    """
    import jax
    from absl import app

    try:
        yield
    except (app.UsageError, SystemExit, KeyboardInterrupt):
        raise
    except BaseException as error:
        if jax.process_count() == 1:
            raise
        traceback.print_exc()
        sys.stderr.write(
            f"Error: process {jax.process_index()} of {jax.process_count()} stopped: {type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}\n"
            "  A process of this distributed run failed or was killed (see its log); every process stops. Process 0 "
            "writes the results files only after every run has finished, and every file whole: start every process "
            "again with --resume to continue from the last checkpoint.\n"
        )
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)


_ERRORS = {error.__name__: error for error in (ValueError, TypeError, FileExistsError, FileNotFoundError)}


def on_primary(action):
    """``action()`` run by process 0 only, its JSON-able result given to every process; an error
    it raises (ValueError, TypeError, FileExistsError, FileNotFoundError) is raised in every
    process. A collective. With one process simply ``action()``."""
    outcome = None
    if distributed.is_primary():
        try:
            outcome = {"result": action()}
        except tuple(_ERRORS.values()) as error:
            if __import__("jax").process_count() == 1:
                raise
            outcome = {"error": type(error).__name__, "message": str(error)}
    outcome = distributed.broadcast_json(outcome)
    if "error" in outcome:
        raise _ERRORS[outcome["error"]](outcome["message"])
    return outcome["result"]


def open_checkpointer(flag_values, names: Iterable[str], stem: str) -> "Checkpointer":
    """The :class:`Checkpointer` of ``<output_dir>/checkpoints/<stem>``, whose config is the
    value of every flag in ``names`` except :data:`RUN_FLAGS` (what a resume must match)."""
    settings = {name: flag_values[name].value for name in sorted(set(names) - RUN_FLAGS)}
    return Checkpointer(
        Path(flag_values.output_dir) / "checkpoints" / stem,
        every=flag_values.checkpoint_every,
        config=settings,
        resume=flag_values.resume,
    )


def check_number_flags(flag_values, names: Iterable[str]) -> None:
    """Refuse NaN and infinite values of float flags (absl's bounds let ``nan`` through)."""
    for name in sorted(names):
        value = flag_values[name].value
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{name} must be a finite number, got {value}")


def parse_choices(name: str, values: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    """The values of a comma-separated flag ``--name``: each one of ``allowed``, none repeated."""
    unknown = [value for value in values if value not in allowed]
    if unknown:
        raise ValueError(f"--{name} has unknown {unknown}; choose from {', '.join(allowed)}")
    if not values:
        raise ValueError(f"--{name} is empty; choose from {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise ValueError(f"--{name} has repeated values: {list(values)}")
    return tuple(values)


def parse_numbers(name: str, values: Sequence[str], *, kind=float, valid=None, requirement: str = "numbers",
                  example: str = "", distinct: bool = False) -> tuple:
    """The values of a comma-separated number flag ``--name``, each converted with ``kind`` and
    accepted by ``valid``; the error names the flag, the requirement and an example."""
    hint = f" (e.g. --{name}={example})" if example else ""
    parsed = []
    for value in values:
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"--{name} must be {requirement}, got {value!r}{hint}") from None
        if (kind is float and not math.isfinite(number)) or (valid is not None and not valid(number)):
            raise ValueError(f"--{name} must be {requirement}, got {value!r}{hint}")
        parsed.append(number)
    if distinct and len(set(parsed)) != len(parsed):
        raise ValueError(f"--{name} has repeated values: {list(values)}")
    return tuple(parsed)


def parse_seeds(values: Sequence[str] | Sequence[int]) -> tuple[int, ...]:
    """Seeds from an absl list flag; each must be a non-negative integer, none repeated."""
    seeds = []
    for value in values:
        try:
            seed = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"--seeds must be integers, got {value!r} (e.g. --seeds=0,42,666)")
        if seed < 0:
            raise ValueError(f"--seeds must be >= 0, got {seed}")
        seeds.append(seed)
    if not seeds:
        raise ValueError("--seeds is empty; give at least one seed, e.g. --seeds=0")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds has repeated values: {seeds}")
    return tuple(seeds)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool) -> Path:
    """Write ``text`` to ``path`` atomically; refuse to replace an existing file unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it or choose another --output_dir")
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` through a temporary file and ``os.replace`` (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


class Checkpointer:
    """Training states and finished runs of an experiment, saved so ``--resume`` can continue.

    Layout under ``directory``: ``<run>.state`` (pickled leaves of the solver state after some
    epoch, typed PRNG keys stored as their key data), ``runs.json`` (the result rows of finished
    runs) and ``config.json`` (the settings; resuming with other settings is refused). Every
    file is written atomically, so a run killed at any moment (even with SIGKILL) leaves the
    last good checkpoint. Resuming restores the exact state, so on the same machine the resumed
    run ends with the same numbers as an uninterrupted one.
    """

    def __init__(self, directory: str | os.PathLike, *, every: int, config: Mapping, resume: bool):
        if every < 0:
            raise ValueError(f"checkpoint interval must be >= 0, got {every}")
        self.directory, self.every = Path(directory), every
        config_text = json.dumps(_jsonable(dict(config)), indent=2, sort_keys=True) + "\n"
        on_primary(lambda: self._open(config_text, resume))

    def _open(self, config_text: str, resume: bool) -> None:
        config_path = self.directory / "config.json"
        if resume and config_path.exists() and config_path.read_text() != config_text:
            raise ValueError(
                f"--resume: {config_path} was written with other settings; rerun with the same flags, "
                f"or drop --resume to start again"
            )
        if not resume and self.directory.exists():
            for stale in list(self.directory.glob("*.state")) + [self.directory / "runs.json"]:
                if stale.exists():
                    stale.unlink()
        for leftover in self.directory.glob(".*.tmp"):  # a write cut short by a kill
            leftover.unlink()
        atomic_write_text(config_path, config_text, overwrite=True)

    def _saved_rows(self) -> list:
        path = self.directory / "runs.json"
        return json.loads(path.read_text()) if path.exists() else []

    def finished_runs(self) -> list[dict]:
        """The rows given to :meth:`add_finished_run`, in order (NaN and inf come back as NaN)."""
        return _from_json(on_primary(self._saved_rows))

    def add_finished_run(self, row: Mapping) -> None:
        if not distributed.is_primary():
            return
        rows = self._saved_rows() + _jsonable([dict(row)])
        atomic_write_text(self.directory / "runs.json", json.dumps(rows, indent=2) + "\n", overwrite=True)

    def save(self, run: str, epoch: int, state, *, force: bool = False) -> None:
        """Save ``state`` after ``epoch`` if it is a multiple of ``every`` (or ``force``); in a
        multi-process run every process must call this (the state is gathered), process 0 writes."""
        import jax

        if not force and (self.every == 0 or epoch % self.every):
            return
        state = distributed.gather(state)
        if not distributed.is_primary():
            return
        leaves = []
        for leaf in jax.tree_util.tree_leaves(state):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaves.append(("prng_key", np.asarray(jax.random.key_data(leaf))))
            else:
                leaves.append(("array", np.asarray(leaf)))
        treedef = str(jax.tree_util.tree_structure(state))
        payload = pickle.dumps(dict(epoch=epoch, treedef=treedef, leaves=leaves), protocol=pickle.HIGHEST_PROTOCOL)
        atomic_write_bytes(self.directory / f"{run}.state", payload)

    def restore(self, run: str, like):
        """``(epoch, state)`` of the last checkpoint of ``run`` shaped like ``like``, or ``(0, like)``.

        In a multi-process run process 0 reads the file and broadcasts it (``like`` must be
        the same host-local state in every process)."""
        import jax

        loaded = {}

        def load():
            path = self.directory / f"{run}.state"
            if not path.exists():
                return 0
            saved = pickle.loads(path.read_bytes())
            like_leaves, treedef = jax.tree_util.tree_flatten(like)
            shapes = [np.shape(value) for _, value in saved["leaves"]]
            wanted = [np.shape(jax.random.key_data(leaf) if distributed._is_key(leaf) else leaf) for leaf in like_leaves]
            if saved["treedef"] != str(treedef) or shapes != wanted:
                raise ValueError(f"{path} does not match this solver's state (other settings, chunk size or shapes); "
                                 "delete it or drop --resume")
            leaves = []
            for (kind, value), reference in zip(saved["leaves"], like_leaves):
                if kind == "prng_key":
                    leaves.append(jax.random.wrap_key_data(value, impl=jax.random.key_impl(reference)))
                else:
                    leaves.append(jax.numpy.asarray(value, dtype=reference.dtype))
            loaded["state"] = jax.tree_util.tree_unflatten(treedef, leaves)
            return int(saved["epoch"])

        epoch = on_primary(load)
        if epoch == 0:
            return 0, like
        return epoch, distributed.broadcast(loaded.get("state", like))


def check_results_writable(output_dir: str | os.PathLike, stem: str, *, overwrite: bool) -> None:
    """Refuse early (before any training) if :func:`write_results` would refuse at the end
    (in a multi-process run: if process 0's would; the error is raised in every process)."""
    on_primary(lambda: _check_results_writable(output_dir, stem, overwrite=overwrite))


def _check_results_writable(output_dir, stem, *, overwrite):
    if overwrite:
        return
    existing = [
        str(p)
        for p in (Path(output_dir) / f"{stem}{suffix}" for suffix in (".json", ".csv", "_summary.csv", ".md"))
        if p.exists()
    ]
    if existing:
        raise FileExistsError(
            f"results exist: {', '.join(existing)}; pass --overwrite to replace them or choose another --output_dir"
        )


def _jsonable(value):
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _from_json(value):
    """Inverse of :func:`_jsonable` for result rows: ``null`` (a non-finite float) becomes NaN."""
    if value is None:
        return float("nan")
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def summarize(rows: Iterable[Mapping], *, by: str = "method", columns: Sequence[str]) -> pd.DataFrame:
    """Mean and standard deviation (ddof=0, like numpy) of ``columns`` per value of ``by``."""
    frame = pd.DataFrame(list(rows))
    present = [c for c in columns if c in frame.columns]
    grouped = frame.groupby(by, sort=False)[present]
    mean = grouped.mean()
    std = grouped.std(ddof=0).fillna(0.0)
    count = grouped.size().rename("runs")
    summary = pd.concat({"mean": mean, "std": std}, axis=1)
    summary.columns = [f"{column}_{stat}" for stat, column in summary.columns]
    return summary.join(count)


def markdown_table(
    summary: pd.DataFrame,
    columns: Sequence[str],
    *,
    paper: Mapping[str, Mapping[str, float]] | None = None,
    digits: int = 4,
    index_name: str = "method",
) -> str:
    """A Markdown table of ``mean ± std`` cells; with ``paper``, a ``(paper)`` column beside each
    column that the paper reports."""
    with_paper = {c for c in columns if paper is not None and any(c in row for row in paper.values())}
    header = [index_name]
    for column in columns:
        header.append(column)
        if column in with_paper:
            header.append(f"{column} (paper)")
    header = [h.replace("|", "\\|") for h in header]  # a group name such as sex=Female|race=Black
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in summary.iterrows():
        cells = [str(name).replace("|", "\\|")]
        for column in columns:
            mean, std = row.get(f"{column}_mean"), row.get(f"{column}_std")
            cells.append("" if mean is None or pd.isna(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}")
            if column in with_paper:
                value = paper.get(str(name), {}).get(column)
                cells.append("" if value is None else f"{value:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    output_dir: str | os.PathLike,
    stem: str,
    rows: Sequence[Mapping],
    summary: pd.DataFrame,
    markdown: str,
    *,
    config: Mapping | None = None,
    overwrite: bool,
) -> dict[str, Path]:
    """Write ``<stem>.json`` (config, per-run rows, summary), ``<stem>.csv`` (per-run rows),
    ``<stem>_summary.csv`` and ``<stem>.md``, each atomically. Checks every target first so
    that a refused overwrite writes nothing. In a multi-process run only process 0 writes (the
    others return the paths it writes)."""
    output_dir = Path(output_dir)
    targets = {
        "json": output_dir / f"{stem}.json",
        "csv": output_dir / f"{stem}.csv",
        "summary_csv": output_dir / f"{stem}_summary.csv",
        "markdown": output_dir / f"{stem}.md",
    }
    if not distributed.is_primary():
        return targets
    if not overwrite:
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing:
            raise FileExistsError(
                f"results exist: {', '.join(existing)}; pass --overwrite to replace them or choose another --output_dir"
            )
    payload = {
        "config": _jsonable(config or {}),
        "runs": _jsonable(list(rows)),
        "summary": _jsonable(summary.reset_index().to_dict(orient="records")),
    }
    atomic_write_text(targets["json"], json.dumps(payload, indent=2) + "\n", overwrite=True)
    atomic_write_text(targets["csv"], pd.DataFrame(list(rows)).to_csv(index=False), overwrite=True)
    atomic_write_text(targets["summary_csv"], summary.to_csv(), overwrite=True)
    atomic_write_text(targets["markdown"], markdown, overwrite=True)
    return targets


# ---- settings derived from config dataclasses, and sweeps -----------------------------------


def attribute_help(config_cls) -> dict[str, str]:
    """One-line help per field from the ``Attributes:`` section of a Google-style docstring.

    A line ``name: text`` (or ``a, b: text`` for several fields) starts an entry; indented
    continuation lines are joined to it; the first sentence is kept.
    """
    import re

    helps: dict[str, str] = {}
    lines = (config_cls.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return helps
    current: list[str] = []
    for line in lines[start + 1 :]:
        match = re.match(r"^\s{4,8}([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*): (.*)$", line)
        if match:
            current = match.group(1).split(", ")
            for name in current:
                helps[name] = match.group(2).strip()
        elif line.strip() and current:
            for name in current:
                helps[name] += " " + line.strip()
        elif not line.strip() and helps:
            current = []
    return {name: re.split(r"(?<=[.;])\s", text, maxsplit=1)[0] for name, text in helps.items()}


def _field_kind(annotation: str) -> tuple[str, bool]:
    """``(kind, optional)`` of a dataclass field annotation written as a string."""
    text = str(annotation).replace(" ", "")
    optional = text.endswith("|None") or text.startswith("None|")
    text = text.replace("|None", "").replace("None|", "")
    if text.startswith("tuple["):
        return "tuple", optional
    return text, optional


def _calling_module() -> str:
    """The module name absl files a flag under for the caller of the caller (``sys.argv[0]`` for
    ``__main__``, as absl does)."""
    import sys

    name = sys._getframe(2).f_globals.get("__name__", "")
    return sys.argv[0] if name == "__main__" else name


def define_config_flags(config_cls, *, skip: Sequence[str] = (), flag_values=None) -> tuple[str, ...]:
    """Define one absl flag per field of ``config_cls`` (a dataclass): the flag has the field's
    name, type and default, and its help comes from the class docstring (one source of truth).

    ``str`` fields listed in ``config_cls.CHOICES`` become enums; ``tuple[...]`` fields are
    comma-separated lists; ``X | None`` fields default to None. Returns the flag names.
    """
    import dataclasses

    from absl import flags

    flag_values = flag_values or flags.FLAGS
    module_name = _calling_module()  # so that --helpshort lists the flags under the entry point
    helps = attribute_help(config_cls)
    choices = getattr(config_cls, "CHOICES", {})
    names = []
    for field in dataclasses.fields(config_cls):
        if field.name in skip:
            continue
        kind, optional = _field_kind(field.type)
        default = field.default
        help_text = helps.get(field.name, field.name.replace("_", " "))
        name = field.name
        if name in choices:
            flags.DEFINE_enum(name, default, choices[name], help_text, flag_values=flag_values, module_name=module_name)
        elif kind == "bool":
            flags.DEFINE_bool(name, default, help_text, flag_values=flag_values, module_name=module_name)
        elif kind == "int":
            flags.DEFINE_integer(name, default, help_text, flag_values=flag_values, module_name=module_name)
        elif kind == "float":
            flags.DEFINE_float(name, default, help_text, flag_values=flag_values, module_name=module_name)
        elif kind == "str":
            flags.DEFINE_string(name, default, help_text, flag_values=flag_values, module_name=module_name)
        elif kind == "tuple":
            flags.DEFINE_list(name, None if default is None else [str(v) for v in default], help_text, flag_values=flag_values,
                              module_name=module_name)
        else:
            raise TypeError(f"{config_cls.__name__}.{name}: no flag type for annotation {field.type!r}")
        del optional
        names.append(name)
    return tuple(names)


def parse_field_value(config_cls, name: str, text: str):
    """A field value of ``config_cls`` from its command-line text (for ``--grid``)."""
    import dataclasses

    field = next((f for f in dataclasses.fields(config_cls) if f.name == name), None)
    if field is None:
        raise ValueError(f"{config_cls.__name__} has no setting {name!r}")
    kind, optional = _field_kind(field.type)
    text = text.strip()
    if optional and text.lower() == "none":
        return None
    choices = getattr(config_cls, "CHOICES", {})
    try:
        if name in choices:
            if text not in choices[name]:
                raise ValueError(f"choose one of {', '.join(choices[name])}")
            return text
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError("give true or false")
            return text.lower() in ("true", "1")
        if kind == "int":
            return int(text)
        if kind == "float":
            value = float(text)
            if not math.isfinite(value):
                raise ValueError("give a finite number")
            return value
        if kind == "tuple":
            return tuple(float(v) for v in text.split(":"))
        return text
    except ValueError as error:
        raise ValueError(f"--grid {name}={text!r}: {error}") from None


def config_from_flags(config_cls, flag_values, names: Sequence[str], **overrides):
    """``config_cls(**{name: --name for name in names}, **overrides)`` (validated by the class)."""
    import dataclasses

    kinds = {f.name: _field_kind(f.type)[0] for f in dataclasses.fields(config_cls)}
    values = {}
    for name in names:
        value = flag_values[name].value
        if kinds[name] == "tuple" and value is not None:
            value = tuple(float(v) for v in value)
        values[name] = value
    values.update(overrides)
    return config_cls(**values)


def define_sweep_flags(flag_values=None) -> tuple[str, ...]:
    """``--grid`` (repeatable ``NAME=v1,v2,...``), ``--grid_chunk`` and ``--select``."""
    from absl import flags

    flag_values = flag_values or flags.FLAGS
    module_name = _calling_module()
    flags.DEFINE_multi_string(
        "grid", [], "Sweep a setting: NAME=v1,v2,... (repeatable; the Cartesian product of all grids, times --seeds, "
        "runs as one compiled, vmapped program per method; a tuple value is written a:b).", flag_values=flag_values,
        module_name=module_name,
    )
    flags.DEFINE_integer(
        "grid_chunk", 0, "Runs (settings x seeds) per vmapped program; bounds memory (0: all at once).",
        lower_bound=0, flag_values=flag_values, module_name=module_name,
    )
    flags.DEFINE_string(
        "select", None, "Pick one setting per method on the validation split by this metric (e.g. "
        "val_balanced_accuracy; gaps, errors and losses are minimised; METRIC:max or METRIC:min overrides) and "
        "report its test numbers as a separate row.", flag_values=flag_values, module_name=module_name,
    )
    return ("grid", "grid_chunk", "select")


def parse_grid(values: Sequence[str], config_cls) -> dict[str, list]:
    """``{name: [values]}`` from ``--grid`` strings, each value parsed with the field's type."""
    grid: dict[str, list] = {}
    for item in values:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not text.strip():
            raise ValueError(f"--grid {item!r}: write NAME=v1,v2,... (e.g. --grid=alpha_low=0.1,0.7)")
        if name in grid:
            raise ValueError(f"--grid names {name!r} twice; give all its values in one --grid")
        try:
            parsed = [parse_field_value(config_cls, name, value) for value in text.split(",")]
        except ValueError as error:
            settable = ", ".join(f.name for f in __import__("dataclasses").fields(config_cls))
            raise ValueError(f"{error} (settings: {settable})" if "has no setting" in str(error) else str(error)) from None
        if len(set(map(repr, parsed))) != len(parsed):
            raise ValueError(f"--grid {name} has repeated values: {parsed}")
        grid[name] = parsed
    return grid


def setting_label(setting: Mapping) -> str:
    """``name=value,...`` of a grid setting ('' for the default setting)."""
    return ",".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}" for name, value in setting.items())


def metric_direction(spec: str) -> tuple[str, str]:
    """``(metric, 'max'|'min')`` of a ``--select`` value: an explicit ``:max`` / ``:min``, else
    metrics whose name says gap, error or loss are minimised and the others maximised."""
    metric, sep, direction = spec.partition(":")
    if sep:
        if direction not in ("max", "min"):
            raise ValueError(f"--select {spec!r}: the direction after ':' must be max or min")
        return metric, direction
    lowered = metric.lower()
    return metric, "min" if any(word in lowered for word in ("gap", "error", "loss")) else "max"


def select_on_validation(rows: Sequence[Mapping], spec: str, *, by: str = "method") -> list[dict]:
    """One row per value of ``by`` for the setting with the best mean of a validation metric.

    ``rows`` carry ``setting`` (the label of :func:`setting_label`), the validation metric named
    by ``spec`` (it must start with ``val_``: test numbers never choose) and the test metrics.
    Returns rows ``{by: "<value> (selected on <metric>)", "setting": ..., **means}`` whose
    ``selected_mean`` columns are the test means over the chosen setting's seeds.
    """
    metric, direction = metric_direction(spec)
    if not metric.startswith("val_"):
        raise ValueError(f"--select={spec}: choose with a validation metric (val_...), never a test one")
    frame = pd.DataFrame(list(rows))
    if metric not in frame.columns:
        available = sorted(c for c in frame.columns if c.startswith("val_"))
        raise ValueError(f"--select: no metric {metric!r}; validation metrics: {', '.join(available)}")
    chosen = []
    for value, part in frame.groupby(by, sort=False):
        means = part.groupby("setting", sort=False)[metric].mean()
        best = means.idxmax() if direction == "max" else means.idxmin()
        chosen.append((value, best, float(means[best])))
    return chosen
