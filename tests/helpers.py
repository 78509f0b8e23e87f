"""Small shared pieces for the tests: run the CLI in a subprocess, a tiny grow config."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_bench(name: str):
    """The module bench/<name>.py (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python cli.py ARGS` in a fresh process, one CPU thread, output captured."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_config(out, **overrides):
    """A growth run of a few seconds on the synthetic set."""
    from grow.controller import GrowConfig
    values = dict(dataset="synthetic", out=str(out), space="vgg", budget_macs=2_000_000, epochs_per_round=1,
                  max_rounds=3, finetune_epochs=1, seed=0, device="cpu")
    values.update(overrides)
    return GrowConfig(**values)
