"""Property-based checks (hypothesis): random and mutated specs, model.json files, checkpoints and command
lines give either a working model or one clear error -- never another exception, never a traceback.

The default run tries a few dozen examples per property; GROW_HYPOTHESIS_EXAMPLES=500 tries more.
"""
import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import grow
import search_spaces
from grow import checkpoints
from grow.cli import main
from grow.cost import count_macs, count_params, parse_count
from grow.errors import GrowError, user_errors
from grow.export import save_model
from grow.optim import DessiLBI
from grow.policy import lbi_param_groups
from grow.report import Reporter
from grow.spec import ArchSpec, SpecError
from tests.helpers import tiny_config

EXAMPLES = int(os.environ.get("GROW_HYPOTHESIS_EXAMPLES", 30))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize="GROW_HYPOTHESIS_EXAMPLES" not in os.environ,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SEEDS = [search_spaces.get(f).seed((3, 16, 16), 10).to_dict() for f in ("vgg", "resnet", "mobilenet")]

# JSON values a hand edit, a bad merge or a damaged disk leaves behind
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 2, 3, 10**9, -1])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _paths(value, prefix=()):
    """Every place in a JSON value: a path of keys and indices."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, base):
    """`base` with a few places replaced by random values, or deleted."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return data


def _works_or_clear_error(call):
    """Run `call`; a user error is fine, anything else is a bug."""
    try:
        return call()
    except user_errors():
        return None


# --- specs ------------------------------------------------------------------------------------------
@SETTINGS
@given(st.sampled_from(SEEDS).flatmap(mutated))
def test_random_specs_build_a_working_model_or_say_why(data):
    spec = _works_or_clear_error(lambda: ArchSpec.from_dict(data))
    if spec is None or count_params(spec) > 5_000_000 or count_macs(spec) > 10**8:
        return
    model = grow.build(spec).eval()
    with torch.no_grad():
        out = model(torch.rand(1, *spec.input_shape))
    assert out.shape == (1, spec.num_classes)


@SETTINGS
@given(st.text(max_size=12) | st.sampled_from(["1e3M", "40M", "0.5", "-1", "1e400", "nan", "2.5K", " 3 m "]))
def test_budget_text_is_a_count_or_a_value_error(text):
    try:
        value = parse_count(text)
    except ValueError:
        return
    assert isinstance(value, int) and value >= 1


# --- model.json files -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    save_model(grow.build(ArchSpec.from_dict(SEEDS[0])), folder, metrics={"test_accuracy": 0.5})
    return folder


@st.composite
def damaged_bytes(draw, data: bytes):
    kind = draw(st.sampled_from(["truncate", "flip", "garbage"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "flip":
        raw = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
        return bytes(raw)
    return draw(st.binary(max_size=64))


@SETTINGS
@given(data=st.data())
def test_mutated_model_files_load_or_say_why(model_folder, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("mutated")
    shutil.copytree(model_folder, folder, dirs_exist_ok=True)
    target = data.draw(st.sampled_from(["model.json", "model.json bytes", "model.safetensors"]))
    if target == "model.json":
        record = json.loads((folder / "model.json").read_text())
        (folder / "model.json").write_text(json.dumps(data.draw(mutated(record))))
    else:
        name = target.split()[0]
        (folder / name).write_bytes(data.draw(damaged_bytes((folder / name).read_bytes())))
    model = _works_or_clear_error(lambda: grow.load_model(folder))
    if model is not None:
        with torch.no_grad():
            assert model(torch.rand(1, *model.spec.input_shape)).shape == (1, model.spec.num_classes)


# --- checkpoints ------------------------------------------------------------------------------------
class _StopAtRound(Reporter):
    def round_start(self, index, *args):
        if index == 3:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.raises(KeyboardInterrupt):
        grow.grow_network(tiny_config(out, train_subset=2000, max_rounds=4, path_per_round=6.0, fill_by=0),
                          _StopAtRound())
    return out


def _load(state):
    """What the controller does with a round's files: the model and DessiLBI with their state."""
    model = grow.build(state.spec)
    model.load_state_dict(state.weights)
    optimizer = DessiLBI(lbi_param_groups(model), lr=0.1, kappa=1.0, mu=20.0, momentum=0.9, weight_decay=5e-4)
    optimizer.load_state_dict(state.optimizer)
    return model


CHECKPOINT_FILES = ["checkpoint.json", "checkpoints/round-003/state.json", "checkpoints/round-003/spec.json",
                    "checkpoints/round-003/model.safetensors", "checkpoints/round-003/optimizer.pt",
                    "checkpoints/round-003/history.json", "checkpoints/round-002/model.safetensors"]


@SETTINGS
@given(data=st.data())
def test_damaged_checkpoints_resume_from_an_intact_round_or_say_why(stopped_run, tmp_path_factory, data):
    out = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(stopped_run, out)
    damaged = set()
    for name in data.draw(st.lists(st.sampled_from(CHECKPOINT_FILES), min_size=1, max_size=2, unique=True)):
        path = out / name
        if name.endswith(".json") and data.draw(st.booleans()):
            new = json.dumps(data.draw(mutated(json.loads(path.read_text()))))
        else:
            new = data.draw(damaged_bytes(path.read_bytes()))
        if new != (path.read_text() if isinstance(new, str) else path.read_bytes()):
            damaged.add(name)
        path.write_text(new) if isinstance(new, str) else path.write_bytes(new)
    assume(damaged)
    notes = []
    try:
        checkpoints.check_resumable(out)
        model, state = checkpoints.restore(out, _load, notes.append)
    except GrowError:
        return
    used = state.folder.relative_to(out).as_posix()
    hashed = ("spec.json", "model.safetensors", "optimizer.pt", "history.json")
    assert not any(name.startswith(used + "/") and name.endswith(hashed) for name in damaged), (used, damaged)
    assert state.next_round == int(used.split("-")[-1]) == len(state.history["rounds"]) + 1
    assert state.epoch == sum(len(r["epochs"]) for r in state.history["rounds"])
    with torch.no_grad():
        assert model(torch.rand(1, *state.spec.input_shape)).shape == (1, state.spec.num_classes)


# --- command lines ----------------------------------------------------------------------------------
FLAG_VALUES = {
    "--dataset": ["synthetic", "cifar10", "imagefolder", "", "mnist "], "--data-dir": ["/nonexistent", "", "."],
    "--budget-flops": ["2M", "0", "-1", "1e3M", "abc", "1e30", "inf"], "--budget-params": ["10K", "0", "x"],
    "--epochs-per-round": ["1", "0", "-2", "1.5", "x"], "--max-rounds": ["3", "0", "-1"],
    "--finetune-epochs": ["0", "-1", "x"], "--finetune-warmup": ["0.05", "1", "nan"],
    "--lr": ["0.1", "0", "-1", "nan", "inf", "x"],
    "--tau": ["0.9", "0", "2", "nan"], "--batch-size": ["64", "0", "-3"], "--space": ["vgg", "resnet", "lstm"],
    "--val-fraction": ["0.1", "0", "1", "-0.5", "x"], "--train-subset": ["100", "0", "-5"],
    "--widen-ratio": ["0.5", "-1"], "--widen-min": ["4", "0"], "--kappa": ["1", "0", "-1"], "--mu": ["20", "0", "-5"],
    "--device": ["cpu", "cuda:7", "tpu", ""], "--seed": ["0", "-1", "x"], "--params": ["/nonexistent.json"],
    "--resume": ["/nonexistent-run"], "--log-format": ["json", "xml"],
}


@SETTINGS
@given(st.lists(st.sampled_from(sorted(FLAG_VALUES)), max_size=5).flatmap(
    lambda flags: st.tuples(*[st.tuples(st.just(f), st.sampled_from(FLAG_VALUES[f])) for f in flags])))
def test_random_grow_command_lines_end_in_one_clear_line(tmp_path_factory, capsys, pairs):
    blocker = tmp_path_factory.mktemp("cli") / "a-file"
    blocker.write_text("not a folder")  # every command line that gets past its checks stops here, untrained
    argv = ["grow", "--budget-flops", "2M", *[x for pair in pairs for x in pair], "--out", str(blocker)]
    try:
        rc = main(argv)
    except SystemExit as stop:
        rc = stop.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (argv, err)
    assert blocker.read_text() == "not a folder"


@SETTINGS
@given(st.lists(st.text(alphabet="-abcdefghiklmnoprstuvwxyz0123456789./= ", max_size=12), max_size=6))
def test_random_words_after_a_command_end_in_one_clear_line(capsys, words):
    for command in ("show", "eval"):
        argv = [command, "/nonexistent/model.json", *[w for w in words if w not in ("-h", "--help")]]
        assume(not any(w.startswith("--h") for w in words))
        try:
            rc = main(argv)
        except SystemExit as stop:
            rc = stop.code
        err = capsys.readouterr().err
        assert rc == 2 and len([line for line in err.splitlines() if line.strip()]) == 1, (argv, err)
