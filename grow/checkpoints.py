"""Round checkpoints: written whole or not at all, checked when read, and an earlier one used when damaged.

A round's folder `checkpoints/round-NNN/` holds the grown network (spec.json, model.safetensors), the
optimizer state it starts the next round with (optimizer.pt), the history so far, and state.json: where
the run stands and the sha256 of every other file. The folder is written under a temporary name and
renamed, then `checkpoint.json` (the pointer) moves to it. Every round's folder is kept, so when the
newest is damaged (a disk error, a hand edit) a resume says which file and goes on from the round before.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch

from grow.errors import GrowError
from grow.fileio import write_json

POINTER = "checkpoint.json"
STATE = "state.json"
_ROUND = re.compile(r"^round-(\d{3,})$")
T = TypeVar("T")


class Damaged(Exception):
    """A checkpoint file that cannot be used; the message names it and says why."""


@dataclass
class Pointer:
    """checkpoint.json: the round folder to resume from, and where the run stands."""

    path: str
    next_round: int
    growth_done: bool
    epoch: int
    finished: bool = False


@dataclass
class RoundState:
    """What a round's folder holds, read and checked (the model and optimizer are built by the caller)."""

    folder: Path
    spec: Any
    weights: dict
    optimizer: dict
    history: dict
    next_round: int
    growth_done: bool
    epoch: int


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_round(out: Path, next_round: int, growth_done: bool, epoch: int, *, spec_json: str,
                save_weights: Callable[[Path], None], optimizer_state: dict, history: dict) -> Path:
    """Write `checkpoints/round-NNN/` whole (temporary name, then rename) and move the pointer to it."""
    folder = out / "checkpoints" / f"round-{next_round:03d}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "spec.json").write_text(spec_json)
    save_weights(tmp / "model.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    write_json(tmp / "history.json", history)
    files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file() and not p.name.startswith(".")}
    write_json(tmp / STATE, {"next_round": next_round, "growth_done": growth_done, "epoch": epoch, "sha256": files})
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    write_json(out / POINTER, {"next_round": next_round, "growth_done": growth_done, "epoch": epoch,
                               "path": str(folder.relative_to(out))})
    return folder


def read_pointer(out: Path) -> Pointer:
    """checkpoint.json, checked; Damaged names what is wrong with it."""
    path = out / POINTER
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RecursionError) as err:
        raise Damaged(f"{path} is damaged ({_short(err)})") from None
    if not isinstance(data, dict):
        raise Damaged(f"{path} is damaged (not a JSON object)")
    try:
        pointer = Pointer(path=data["path"], next_round=data["next_round"], growth_done=data["growth_done"],
                          epoch=data["epoch"], finished=data.get("finished", False))
    except KeyError as err:
        raise Damaged(f"{path} is damaged (no {err.args[0]!r})") from None
    _check_position(path, pointer.next_round, pointer.growth_done, pointer.epoch)
    if not (isinstance(pointer.path, str) and _ROUND.match(Path(pointer.path).name)
            and Path(pointer.path).parent == Path("checkpoints")):
        raise Damaged(f"{path} is damaged ('path' must be checkpoints/round-NNN, got {pointer.path!r})")
    if not isinstance(pointer.finished, bool):
        raise Damaged(f"{path} is damaged ('finished' must be true or false, got {pointer.finished!r})")
    return pointer


def check_resumable(out: Path) -> None:
    """GrowError, before any data is read, when `out` cannot be resumed: no checkpoint yet, a finished
    run, or a damaged pointer with nothing to fall back on (a damaged one with round folders is
    left to `restore`, which names it and uses the newest intact round)."""
    try:
        pointer = read_pointer(out)
    except FileNotFoundError:
        raise GrowError(f"{out} holds no checkpoint to resume from: the run stopped before its first round "
                        f"finished; start it again with the same command, without --resume") from None
    except Damaged as err:
        if (out / "model.json").exists():
            raise GrowError(f"{err}; {out} holds a model.json, so the run may have finished: nothing to "
                            f"resume (start again with --overwrite to redo it)") from None
        if not round_folders(out):
            raise GrowError(f"{err}, and {out / 'checkpoints'} holds no round to fall back on; start the run "
                            f"again with --overwrite") from None
        return
    if pointer.finished:
        raise GrowError(f"{out} is a finished run; its model is {out / 'model.json'}")
    if not (out / pointer.path).is_dir() and not round_folders(out):
        raise GrowError(f"{out / pointer.path} is missing, and {out / 'checkpoints'} holds no earlier round to "
                        f"fall back on; start the run again with --overwrite")


def _check_position(path: Path, next_round: Any, growth_done: Any, epoch: Any) -> None:
    for key, value, ok in (("next_round", next_round, _int(next_round) and next_round >= 2),
                           ("growth_done", growth_done, isinstance(growth_done, bool)),
                           ("epoch", epoch, _int(epoch) and epoch >= 0)):
        if not ok:
            raise Damaged(f"{path} is damaged ({key!r} is {value!r})")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text if len(text) < 120 else text[:117] + "..."


def read_round(folder: Path, pointer: Optional[Pointer] = None) -> RoundState:
    """Read and check every file of a round's folder; Damaged names the first bad file.

    Folders written before state.json existed are read on the pointer's word, without checksums."""
    from safetensors.torch import load_file

    from grow.spec import ArchSpec, SpecError

    if not folder.is_dir():
        raise Damaged(f"{folder} is missing")
    state_path = folder / STATE
    if state_path.exists():
        state = _read_json(state_path)
        sums = state.get("sha256") if isinstance(state, dict) else None
        if not isinstance(sums, dict):
            raise Damaged(f"{state_path} is damaged (no checksums)")
        _check_position(state_path, state.get("next_round"), state.get("growth_done"), state.get("epoch"))
        for name in ("spec.json", "model.safetensors", "optimizer.pt", "history.json"):
            if not (folder / name).is_file():
                raise Damaged(f"{folder / name} is missing")
            if sums.get(name) != sha256(folder / name):
                raise Damaged(f"{folder / name} is damaged (its sha256 does not match the one recorded)")
        position = (state["next_round"], state["growth_done"], state["epoch"])
    elif pointer is not None:
        position = (pointer.next_round, pointer.growth_done, pointer.epoch)
    else:
        raise Damaged(f"{state_path} is missing")
    try:
        spec = ArchSpec.load(folder / "spec.json")
    except SpecError as err:
        raise Damaged(str(err)) from None
    try:
        weights = load_file(str(folder / "model.safetensors"))
    except Exception as err:  # safetensors raises its own types for damaged files
        raise Damaged(f"{folder / 'model.safetensors'} is damaged ({_short(err)})") from None
    try:
        optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a pickle with disallowed globals, ...
        raise Damaged(f"{folder / 'optimizer.pt'} is damaged ({_short(err)})") from None
    history = _read_json(folder / "history.json")
    if not (isinstance(history, dict) and isinstance(history.get("rounds"), list)):
        raise Damaged(f"{folder / 'history.json'} is damaged (no list of rounds)")
    _check_consistent(folder, history, *position)
    return RoundState(folder, spec, weights, optimizer, history, *position)


def _check_consistent(folder: Path, history: dict, next_round: int, growth_done: bool, epoch: int) -> None:
    """The position agrees with the folder's name and its history (a plausible but edited number would
    otherwise resume from the wrong epoch or round)."""
    rounds = history["rounds"]
    try:
        epochs = sum(len(r["epochs"]) for r in rounds)
        stopped = bool(rounds) and "stop" in rounds[-1]
    except (KeyError, TypeError):
        raise Damaged(f"{folder / 'history.json'} is damaged (a round without its epochs)") from None
    if (next_round != _number(folder) or len(rounds) != next_round - 1 or epoch != epochs
            or growth_done != stopped):
        raise Damaged(f"{folder} is inconsistent (round {next_round}, epoch {epoch}, growth done {growth_done}, "
                      f"but its history holds {len(rounds)} rounds and {epochs} epochs)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise Damaged(f"{path} is damaged ({_short(err)})") from None


def round_folders(out: Path) -> list[Path]:
    """The run's finished round folders, newest first."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _ROUND.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def restore(out: Path, build: Callable[[RoundState], T], note: Callable[[str], None]) -> tuple[T, RoundState]:
    """Resume state from the pointer's round, or, when that is damaged, from the newest intact earlier one.

    `build` turns a RoundState into the caller's objects (model, optimizer) and may raise what loading
    state into them raises (a shape mismatch: RuntimeError, ValueError, KeyError); that counts as damage too.
    """
    try:
        pointer: Optional[Pointer] = read_pointer(out)
        first = out / pointer.path
        candidates = [first] + [p for p in round_folders(out) if _number(p) < _number(first)]
        problem = None
    except Damaged as err:
        pointer, candidates, problem = None, round_folders(out), str(err)
    for folder in candidates:
        try:
            state = read_round(folder, pointer if pointer and folder == out / pointer.path else None)
            built = build(state)
        except Damaged as err:
            problem = problem or str(err)
            continue
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            problem = problem or f"{folder} does not load ({_short(err)})"
            continue
        if problem:
            note(f"note: {problem}; resuming from the checkpoint in {folder.relative_to(out)} instead")
        return built, state
    raise GrowError(f"{problem or 'no round checkpoint found in ' + str(out / 'checkpoints')}, and no earlier "
                    f"round's checkpoint is intact; start the run again with --overwrite")


def _number(folder: Path) -> int:
    match = _ROUND.match(folder.name)
    return int(match.group(1)) if match else -1
