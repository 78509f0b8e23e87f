"""A run folder belongs to one process at a time and never loses a result a user already has.

The owner holds an OS lock (flock) on `.grow.lock` in the folder for the whole run; the kernel drops it
when the process ends in any way (kill -9 included), so a stale lock never blocks a `--resume`. A new run
refuses a folder that holds a result (a model, weights, a history, a checkpoint) unless told to
`overwrite`, and then deletes only the files grow itself writes.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

from grow.errors import GrowError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not guarded against a second process
    fcntl = None

LOCK_NAME = ".grow.lock"
# What grow writes into a run folder (checkpoints/ too); --overwrite removes exactly these.
GROW_FILES = ("config.json", "history.json", "checkpoint.json", "model.json", "model.safetensors",
              "selection_ratio.png", "widths.png", "accuracy_macs.png")
RESULT_NAMES = ("model.json", "history.json", "checkpoint.json", "checkpoints", "best.json", "study.journal")
RESULT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".onnx", ".pte", ".tflite", ".bin", ".npz", ".h5")


class RunLock:
    """flock on `folder/.grow.lock`, holding the owner's pid so a refused process can name it."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self.handle = None

    def acquire(self) -> "RunLock":
        try:
            handle = open(self.path, "a+")
        except OSError as err:
            raise GrowError(f"cannot write to the run folder {self.path.parent}: {err.strerror}") from None
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                handle.close()
                raise GrowError(f"{self.path.parent} is in use by another grow process (pid {owner}); wait for it "
                                f"to finish or stop it, or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the descriptor drops the flock
            self.handle = None


def results_in(folder: Path) -> list[str]:
    """Names in `folder` that look like a result someone would miss: a model, weights, a history."""
    from grow.checkpoints import round_folders

    if not folder.is_dir():
        return []
    found = sorted(p.name for p in folder.iterdir()
                   if p.name in RESULT_NAMES or p.name in GROW_FILES[1:] or p.suffix.lower() in RESULT_SUFFIXES)
    if "checkpoints" in found and not round_folders(folder):  # only a round half written when the run died
        found.remove("checkpoints")
    return found


def make_folder(folder: Path, *, resume: bool) -> None:
    """Create the run folder; GrowError with the reason when the path cannot be one."""
    if folder.exists() and not folder.is_dir():
        raise GrowError(f"--out {folder} is a file, not a folder; choose a folder path")
    if resume and not folder.is_dir():
        raise GrowError(f"{folder} does not exist; nothing to resume")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GrowError(f"cannot create the run folder {folder}: {err.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GrowError(f"cannot write to the run folder {folder}: permission denied")


def clear_run(folder: Path) -> None:
    """Remove what an earlier grow run wrote (for --overwrite); other files stay."""
    for name in GROW_FILES:
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)


@contextlib.contextmanager
def claim(folder: Path, *, resume: bool, overwrite: bool = False) -> Iterator[RunLock]:
    """Own `folder` for a run: create it, lock it, and refuse to start over a result unless `overwrite`."""
    make_folder(folder, resume=resume)
    lock = RunLock(folder).acquire()
    try:
        if not resume:
            _refuse_results(folder, overwrite)
        yield lock
    finally:
        lock.release()


def _refuse_results(folder: Path, overwrite: bool) -> None:
    found = results_in(folder)
    if not found:
        return
    if overwrite:
        clear_run(folder)
        return
    pointer = read_json_or_none(folder / "checkpoint.json")
    if isinstance(pointer, dict) and pointer.get("finished"):
        what = f"a finished run (its model is {folder / 'model.json'})"
    elif pointer is not None:
        what = f"an unfinished run; continue it with --resume {folder}"
    else:
        what = ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")
    raise GrowError(f"{folder} already holds {what}; choose another --out, or replace grow's files there "
                    f"with --overwrite")


def read_json_or_none(path: Path) -> Optional[object]:
    """The JSON in `path`, or None when it is missing or unreadable (the caller decides what that means)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None


def load_run_config(folder: Path):
    """The GrowConfig saved in `folder/config.json`, checked; GrowError when missing or damaged."""
    from grow.controller import GrowConfig

    path = Path(folder) / "config.json"
    if Path(folder).exists() and not Path(folder).is_dir():
        raise GrowError(f"{folder} is a file; --resume takes a run folder")
    if not path.exists():
        raise GrowError(f"{folder} holds no grow run to resume (no config.json)")
    data = read_json_or_none(path)
    if not isinstance(data, dict):
        raise GrowError(f"{path} is damaged (not a JSON object); the run cannot be resumed with its settings")
    known = {k: v for k, v in data.items() if k in GrowConfig.__dataclass_fields__}
    known.setdefault("round_steps", 0)  # runs started before --round-steps trained whole-epoch rounds
    config = GrowConfig.from_dict(known)
    config.out = str(folder)
    try:
        config.check()
    except GrowError as err:
        raise GrowError(f"{path} is damaged: {err}") from None
    return config
