"""Run an entry point's ``main`` several times in processes forked from one interpreter that
imported it once (what ``python -m <module>`` runs after its imports), optionally SIGKILLing a run
once a checkpoint holds a given epoch. Shared by the command-line tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_DRIVER = r"""
import importlib, json, os, pickle, signal, sys, time, traceback
from experiments import cli

name, steps = sys.argv[1], json.loads(sys.argv[2])
module = importlib.import_module(name)


def checkpoint_epoch(path):
    return pickle.loads(open(path, "rb").read())["epoch"] if os.path.exists(path) else -1


results = []
for step in steps:
    pid = os.fork()
    if pid == 0:  # the run: stdout and stderr to the step's file, its exit code as python's would be
        output = os.open(step["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(output, 1)
        os.dup2(output, 2)
        code = 0
        try:
            cli.run(module.main, argv=[name, *step["argv"]])
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    kill, killed, deadline = step.get("kill"), False, time.time() + 300
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if (kill and not killed and checkpoint_epoch(kill[0]) >= kill[1]) or time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.01)
    results.append(dict(
        code=os.waitstatus_to_exitcode(status),
        killed_at=checkpoint_epoch(kill[0]) if kill else None,
        exists=[os.path.exists(path) for path in step.get("exists", [])],
    ))
print(json.dumps(results))
"""


def drive(module: str, steps: list[dict], directory: Path) -> list[dict]:
    """Run ``steps`` of ``module`` one after the other, each in its own process. A step is
    ``dict(argv=[...])`` plus optionally ``kill=(checkpoint file, epoch)`` (SIGKILL the run once
    that checkpoint holds at least that epoch) and ``exists=[paths]`` (checked after the run).

    Returns per step: ``code`` (exit code; -9 if killed), ``killed_at`` (the epoch of the
    checkpoint left by a kill), ``exists`` and ``output`` (stdout + stderr)."""
    directory.mkdir(parents=True, exist_ok=True)
    steps = [dict(step, output=str(directory / f"step{i}.log"), kill=step.get("kill") and [str(step["kill"][0]),
                  step["kill"][1]], exists=[str(p) for p in step.get("exists", [])]) for i, step in enumerate(steps)]
    completed = subprocess.run(
        [sys.executable, "-c", _DRIVER, module, json.dumps(steps)],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    for result, step in zip(results, steps):
        result["output"] = Path(step["output"]).read_text()
    return results
