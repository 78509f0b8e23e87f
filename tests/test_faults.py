"""Fault injection: kill -9 a run at random moments (training, a checkpoint write, the export), resume,
and repeat; the run must always end with the architecture an uninterrupted run grows.

Slow (minutes): `python -m pytest -m slow tests/test_faults.py`. GROW_FAULT_SEED=N replays a sequence
of kills; GROW_FAULT_KILLS=N asks for more of them (default 20).
"""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

FLAGS = ["--dataset", "synthetic", "--budget-flops", "2M", "--epochs-per-round", "1", "--max-rounds", "4",
         "--finetune-epochs", "1", "--train-subset", "2000", "--path-per-round", "6", "--device", "cpu",
         "--log-format", "json"]
MOMENTS = ("training", "checkpoint write", "export", "any time")


def _start(args):
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    events, errors = [], []

    def read(stream, into, parse):
        for line in stream:
            into.append(parse(line))

    threads = [threading.Thread(target=read, args=(proc.stdout, events, json.loads), daemon=True),
               threading.Thread(target=read, args=(proc.stderr, errors, str.rstrip), daemon=True)]
    for t in threads:
        t.start()
    return proc, events, errors, threads


def _writing_checkpoint(out: Path) -> bool:
    folder = out / "checkpoints"
    return folder.is_dir() and any(p.name.endswith(".tmp") for p in folder.iterdir())


def _exporting(out: Path) -> bool:
    if any(p.name.startswith(".model.") for p in out.iterdir()):  # the atomic writes' temporary files
        return True
    pointer = out / "checkpoint.json"
    return (out / "model.safetensors").exists() and pointer.exists() and '"finished"' not in pointer.read_text()


def _run_and_maybe_kill(args, out: Path, moment: str, rng: random.Random):
    """Run once; SIGKILL it at `moment` (None: never) if it comes. Returns (returncode, stderr lines, killed)."""
    proc, events, errors, threads = _start(args)
    epochs_before_kill = rng.randint(1, 5)
    delay = rng.uniform(0.0, 0.4)
    deadline = time.time() + rng.uniform(1.0, 10.0)
    trigger_at = None
    while proc.poll() is None:
        if trigger_at is None and moment is not None:
            epochs = sum(1 for e in events if e.get("event") == "epoch")
            hit = {"training": epochs >= epochs_before_kill,
                   "checkpoint write": out.is_dir() and _writing_checkpoint(out),
                   "export": out.is_dir() and _exporting(out),
                   "any time": time.time() >= deadline}[moment]
            if hit:
                trigger_at = time.time() + (delay if moment == "training" else 0.0)
        if trigger_at is not None and time.time() >= trigger_at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    proc.wait(timeout=300)
    for t in threads:
        t.join(timeout=10)
    return proc.returncode, errors, proc.returncode == -signal.SIGKILL


def _architecture(out: Path) -> dict:
    return json.loads((out / "model.json").read_text())["arch"]["body"]


@pytest.mark.slow
def test_random_kills_never_change_the_grown_architecture(tmp_path):
    seed = int(os.environ.get("GROW_FAULT_SEED", random.randrange(10**6)))
    wanted = int(os.environ.get("GROW_FAULT_KILLS", 20))
    rng = random.Random(seed)
    reference = tmp_path / "reference"
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "grow", *FLAGS, "--out", str(reference)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    expected = _architecture(reference)

    kills, log, runs = 0, [], 0
    while kills < wanted:
        runs += 1
        out = tmp_path / f"run-{runs}"
        for attempt in range(3 * wanted):
            resumable = (out / "checkpoint.json").exists()
            args = ["grow", "--resume", str(out)] if resumable else ["grow", *FLAGS, "--out", str(out)]
            moment = rng.choice(MOMENTS) if kills < wanted else None
            rc, errors, killed = _run_and_maybe_kill(args, out, moment, rng)
            log.append(f"run {runs} attempt {attempt}: {'resume' if resumable else 'start'}, kill at {moment}: "
                       f"{'killed' if killed else rc}")
            context = f"seed {seed}; " + "; ".join(log[-6:]) + " | " + " / ".join(errors[-3:])
            if killed:
                kills += 1
                continue
            if rc == 2 and any("is a finished run" in e for e in errors):
                break  # killed after the run had marked itself finished: nothing left to do
            assert rc == 0 and not any("Traceback" in e for e in errors), context
            break
        else:
            pytest.fail(f"run {runs} never finished; seed {seed}; " + "; ".join(log[-10:]))
        assert _architecture(out) == expected, f"seed {seed}; " + "; ".join(log)
        assert not list((out / "checkpoints").glob("*.tmp")) or (out / "checkpoint.json").exists()
    print(f"{kills} kills over {runs} runs (seed {seed}):\n" + "\n".join(log))
