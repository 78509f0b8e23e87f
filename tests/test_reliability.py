"""Nothing a user has is lost, and bad input ends in one line and exit 2, never a traceback (issue 12).

Each test is one thing a user did wrong or one way a run can be stopped; the CLI runs in this process
(grow.cli.main) where a subprocess is not the point, so the file stays fast.
"""
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import grow
import search_spaces
from grow import checkpoints
from grow.cli import invoked_name, main
from grow.controller import grow_network
from grow.errors import GrowError, mask_secrets
from grow.export import save_model
from grow.report import Reporter, RichReporter, layer_table
from grow.rundir import RunLock
from grow.spec import ArchSpec, SpecError
from tests.helpers import ROOT, run_cli, tiny_config

# A run that grows for four one-epoch rounds in about four seconds (no deadline: every round may grow).
SMALL = dict(train_subset=2000, max_rounds=4, path_per_round=6.0, fill_by=0)
SMALL_FLAGS = ["--dataset", "synthetic", "--budget-flops", "2M", "--epochs-per-round", "1", "--max-rounds", "4",
               "--finetune-epochs", "1", "--train-subset", "2000", "--path-per-round", "6", "--fill-by", "0",
               "--device", "cpu"]


def one_line_error(capsys, argv, *fragments, code=2):
    """Run the CLI in this process; it must end with exit `code` and exactly one line on stderr."""
    try:
        rc = main(argv)
    except SystemExit as stop:  # argparse's usage errors
        rc = stop.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


class StopAtRound(Reporter):
    def __init__(self, index):
        self.index = index

    def round_start(self, index, *args):
        if index == self.index:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped at the start of round 3: checkpoints of rounds 1 and 2 (round-002, round-003)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.raises(KeyboardInterrupt):
        grow_network(tiny_config(out, **SMALL), StopAtRound(3))
    assert [p.name for p in checkpoints.round_folders(out)] == ["round-003", "round-002"]
    return out


@pytest.fixture
def copy_of(stopped_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two exported models of different widths, as a user's folders hold them."""
    base = tmp_path_factory.mktemp("models")
    narrow = ArchSpec("vgg", (3, 16, 16), 10, {"stages": [[8], [16]]})
    wide = ArchSpec("vgg", (3, 16, 16), 10, {"stages": [[12], [16]]})
    save_model(grow.build(narrow), base / "narrow")
    save_model(grow.build(wide), base / "wide")
    return base


# --- --out and the run folder ------------------------------------------------------------------
def test_out_naming_a_file(capsys, tmp_path):
    (tmp_path / "taken").write_text("mine")
    one_line_error(capsys, ["grow", *SMALL_FLAGS, "--out", str(tmp_path / "taken")], "is a file")
    assert (tmp_path / "taken").read_text() == "mine"


def test_out_below_a_file_and_in_an_impossible_place(capsys, tmp_path):
    (tmp_path / "taken").write_text("mine")
    one_line_error(capsys, ["grow", *SMALL_FLAGS, "--out", str(tmp_path / "taken" / "run")], "cannot create")
    one_line_error(capsys, ["grow", *SMALL_FLAGS, "--out", "/proc/grow-run"], "cannot create")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_an_unwritable_folder(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    one_line_error(capsys, ["grow", *SMALL_FLAGS, "--out", str(locked / "run")], "Permission denied")
    one_line_error(capsys, ["grow", *SMALL_FLAGS, "--out", str(locked)], "cannot write")


def test_a_second_process_on_the_same_folder_is_told_who_owns_it(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(out).acquire()  # what a running grow holds, with the config.json it wrote
    (out / "config.json").write_text(json.dumps(tiny_config(out, **SMALL).to_dict()))
    before = (out / "config.json").read_text()
    try:
        one_line_error(capsys, ["grow", *SMALL_FLAGS, "--seed", "1", "--out", str(out)], f"pid {os.getpid()}")
        one_line_error(capsys, ["grow", "--resume", str(out)], f"pid {os.getpid()}")
    finally:
        lock.release()
    assert (out / "config.json").read_text() == before, "the refused runs wrote nothing"


def test_an_exported_model_is_never_overwritten(capsys, exported, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(exported / "narrow", folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    line = one_line_error(capsys, ["grow", *SMALL_FLAGS, "--out", str(folder)], "model.json", "--overwrite")
    assert "model.safetensors" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".grow.lock"} == before


def test_overwrite_replaces_grows_files_and_keeps_the_rest(tmp_path, exported):
    folder = tmp_path / "model"
    shutil.copytree(exported / "narrow", folder)
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(GrowError, match="--overwrite"):
        grow_network(tiny_config(folder, **SMALL))
    result = grow_network(tiny_config(folder, train_subset=500, max_rounds=1, finetune_epochs=0), overwrite=True)
    assert grow.load_model(folder).spec == result.model.spec
    assert (folder / "notes.txt").read_text() == "keep me"


# --- files follow the umask --------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        grow_network(tiny_config(out, train_subset=500, max_rounds=1, finetune_epochs=0))
    finally:
        os.umask(old)
    for name in ("model.json", "model.safetensors", "history.json", "config.json", "checkpoint.json"):
        assert (out / name).stat().st_mode & 0o777 == mode, name
    for path in (out / "checkpoints").rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == mode, path


# --- --resume with damaged state ---------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b'{"next_round": 3, "growth', b"\x00\xff\xfe PK\x03\x04 binary",
                                     b"[1, 2]", b'{"next_round": "3", "growth_done": false, "epoch": 2, '
                                                b'"path": "checkpoints/round-003"}',
                                     b'{"next_round": 3, "growth_done": "no", "epoch": 2, '
                                     b'"path": "checkpoints/round-003"}'])
def test_resume_with_a_damaged_pointer_names_it(capsys, tmp_path, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(tiny_config(out, **SMALL).to_dict()))
    (out / "checkpoint.json").write_bytes(content)
    one_line_error(capsys, ["grow", "--resume", str(out)], "checkpoint.json")


def test_resume_with_every_checkpoint_folder_deleted(capsys, copy_of):
    shutil.rmtree(copy_of / "checkpoints")
    one_line_error(capsys, ["grow", "--resume", str(copy_of)], "round-003", "--overwrite")


def test_resume_with_a_config_value_of_the_wrong_type_fails_before_training(capsys, copy_of):
    config = json.loads((copy_of / "config.json").read_text())
    config["epochs_per_round"] = "1"
    (copy_of / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    one_line_error(capsys, ["grow", "--resume", str(copy_of)], "config.json", "epochs-per-round")
    assert time.perf_counter() - start < 5
    (copy_of / "config.json").write_bytes(b"\x89PNG\r\n")
    one_line_error(capsys, ["grow", "--resume", str(copy_of)], "config.json")


def test_a_run_saved_before_round_steps_resumes_with_whole_epoch_rounds(tmp_path):
    """A config.json written before --round-steps existed describes whole-epoch rounds, and the rest of
    that run must train them too (the default of 64 would change its rounds' length and mu mid-run)."""
    from grow.rundir import load_run_config
    out = tmp_path / "old"
    out.mkdir()
    old = {k: v for k, v in tiny_config(out, **SMALL).to_dict().items() if k != "round_steps"}
    (out / "config.json").write_text(json.dumps(old))
    assert load_run_config(out).round_steps == 0
    (out / "config.json").write_text(json.dumps({**old, "round_steps": 32}))
    assert load_run_config(out).round_steps == 32


@pytest.mark.parametrize("damage", ["truncate weights", "flip a byte of the optimizer", "delete the folder",
                                    "bad spec"])
def test_a_damaged_round_is_named_and_the_round_before_used(copy_of, damage):
    newest = copy_of / "checkpoints" / "round-003"
    if damage == "truncate weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "flip a byte of the optimizer":
        data = bytearray((newest / "optimizer.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / "optimizer.pt").write_bytes(bytes(data))
    elif damage == "delete the folder":
        shutil.rmtree(newest)
    else:
        (newest / "spec.json").write_text('{"family": "vgg", "input_shape": [3, 16, 16], "num_classes": 10, '
                                          '"body": {"stages": [[1000000000]]}}')
    notes = []
    state_holder = []

    def build(state):
        state_holder.append(state)
        return state.spec

    spec, state = checkpoints.restore(copy_of, build, notes.append)
    assert state.folder.name == "round-002" and state.next_round == 2
    assert len(notes) == 1 and "round-003" in notes[0] and "round-002" in notes[0], notes
    if damage != "delete the folder":
        assert "damaged" in notes[0] or "beyond" in notes[0]


def test_resume_after_a_damaged_round_finishes_the_run(copy_of, capsys):
    data = (copy_of / "checkpoints" / "round-003" / "model.safetensors").read_bytes()
    (copy_of / "checkpoints" / "round-003" / "model.safetensors").write_bytes(data[:100])
    assert main(["grow", "--resume", str(copy_of), "--log-format", "json"]) == 0
    out = capsys.readouterr().out
    messages = [json.loads(line)["text"] for line in out.splitlines() if '"message"' in line]
    assert any("round-003/model.safetensors is damaged" in m and "round-002" in m for m in messages), messages
    history = json.loads((copy_of / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == list(range(1, len(history["rounds"]) + 1))
    assert grow.load_model(copy_of).spec.to_dict() == history["final"]["spec"]


def test_resume_before_the_first_round_finished_says_so(capsys, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        grow_network(tiny_config(out, **SMALL), StopAtRound(1))
    one_line_error(capsys, ["grow", "--resume", str(out)], "before its first round", "without --resume")
    assert main(["grow", *SMALL_FLAGS, "--max-rounds", "1", "--finetune-epochs", "0", "--out", str(out),
                 "--quiet"]) == 0, "the same command starts the run again"


# --- show / eval --------------------------------------------------------------------------------
def test_show_and_eval_with_another_models_weights(capsys, exported, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(exported / "narrow", folder)
    shutil.copy(exported / "wide" / "model.safetensors", folder / "model.safetensors")
    one_line_error(capsys, ["show", str(folder)], "does not match", "another model")
    one_line_error(capsys, ["eval", str(folder), "--dataset", "synthetic"], "does not match")


@pytest.mark.parametrize("width", [10**9, 2**40, 70_000])
def test_a_model_json_with_an_absurd_width_is_refused_before_allocating(capsys, exported, tmp_path, width):
    folder = tmp_path / "huge"
    shutil.copytree(exported / "narrow", folder)
    record = json.loads((folder / "model.json").read_text())
    record["arch"]["body"]["stages"][0][0] = width
    (folder / "model.json").write_text(json.dumps(record))
    start = time.perf_counter()
    one_line_error(capsys, ["show", str(folder / "model.json")], "beyond any real network")
    assert time.perf_counter() - start < 5


def test_model_json_that_is_binary_a_folder_or_missing(capsys, tmp_path):
    (tmp_path / "bin.json").write_bytes(b"\xff\xd8\xff\xe0 jpeg")
    one_line_error(capsys, ["show", str(tmp_path / "bin.json")], "bin.json")
    one_line_error(capsys, ["show", str(tmp_path)], "model.json")
    one_line_error(capsys, ["eval", str(tmp_path / "none.json"), "--dataset", "synthetic"], "none.json")


def test_show_fits_80_columns_without_cutting_names(exported):
    from rich.console import Console

    from grow.cost import count_macs, layer_costs

    for spec in (ArchSpec("vgg", (3, 32, 32), 10, {"stages": [[64], [128], [256, 256]]}),
                 search_spaces.get("mobilenet").classic("mobilenetv2", (3, 32, 32), 10),
                 search_spaces.get("resnet").classic("resnet56", (3, 32, 32), 10)):
        info = {"space": spec.family, "input_shape": list(spec.input_shape), "num_classes": spec.num_classes,
                "macs": count_macs(spec), "layers": layer_costs(spec)}
        console = Console(file=io.StringIO(), width=80)
        console.print(layer_table(info, 80))
        text = console.file.getvalue()
        assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
        assert "…" not in text
        for row in info["layers"]:
            assert row["name"].removesuffix(".conv") in text, row["name"]
    wide = Console(file=io.StringIO(), width=200)
    wide.print(layer_table(info, 200))
    assert "share of MACs" in wide.file.getvalue() and "stages.2.8.conv2.conv" in wide.file.getvalue()


def test_show_json_has_full_names(capsys, exported):
    assert main(["show", str(exported / "narrow"), "--format", "json", "--batch-size", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in info["layers"]] == ["stages.0.0.conv", "stages.1.0.conv", "classifier"]


def test_the_final_line_keeps_model_and_its_path_together():
    from rich.console import Console

    console = Console(file=io.StringIO(), width=40)
    path = "/a/rather/long/path/to/the/run/folder/model.json"
    history = {"rounds": [], "final": {"macs": 10**6, "params": 10**4, "model_json": path}}
    RichReporter(console=console).finish(history, {"test_accuracy": 0.9, "epochs": 3})
    assert f"model: {path}" in console.file.getvalue()



def test_a_signal_inside_the_live_display_start_still_closes_cleanly(monkeypatch):
    """SIGTERM can land inside rich's Live.start(), after it counts as started but before its render
    hook is pushed: closing the reporter must give the cursor back, not raise."""
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=80)
    reporter = RichReporter(console=console)

    def interrupted(hook):
        raise KeyboardInterrupt

    monkeypatch.setattr(console, "push_render_hook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reporter.epoch_start("round 1 epoch 1/1", 10)
    reporter.close()
    assert console.file.getvalue().endswith("\x1b[?25h")

# --- flags and values ---------------------------------------------------------------------------
@pytest.mark.parametrize("content, fragment", [('{"params": {"lr": "abc"}}', "lr"), ('{"lr": [1]}', "lr"),
                                               ("[0.1, 1.0]", "JSON object"), ('{"kappa": null}', "kappa"),
                                               ('{"out": "/elsewhere"}', "out"), ("not json", "not a JSON"),
                                               ('{"epochs_per_round": 1.5}', "epochs-per-round")])
def test_params_with_values_of_the_wrong_type(capsys, tmp_path, content, fragment):
    (tmp_path / "best.json").write_text(content)
    one_line_error(capsys, ["grow", *SMALL_FLAGS, "--params", str(tmp_path / "best.json"),
                            "--out", str(tmp_path / "run")], fragment)


@pytest.mark.parametrize("flags, fragment", [
    (["--epochs-per-round", "-1"], "epochs-per-round"), (["--max-rounds", "0"], "max-rounds"),
    (["--finetune-epochs", "-3"], "finetune-epochs"), (["--lr", "nan"], "lr"), (["--lr", "-0.1"], "lr"),
    (["--tau", "1.5"], "tau"), (["--batch-size", "0"], "batch-size"), (["--budget-flops", "-5"], "-5"),
    (["--finetune-warmup", "1"], "finetune-warmup"),
    (["--budget-flops", "inf"], "inf"), (["--epochs-per-round", "two"], "two"), (["--space", "lstm"], "lstm"),
    (["--dataset", "imagenet"], "imagenet"), (["--device", "tpu"], "tpu"), (["--val-fraction", "1"], "validation"),
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent"], "/nonexistent"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent", "--no-download"], "/nonexistent"),
    (["--seed", "-1"], "seed"), (["--seed", "99999999999999999999"], "seed"), (["--out", ""], "out"),
    (["--params", "/"], "Is a directory"), (["--overwrite", "--resume", "/nonexistent"], "give one of them"),
])
def test_bad_flag_values(capsys, tmp_path, flags, fragment):
    one_line_error(capsys, ["grow", *SMALL_FLAGS, "--out", str(tmp_path / "run"), *flags], fragment)


def test_no_budget_and_absurd_budgets(capsys, tmp_path):
    flags = [f for f in SMALL_FLAGS if f not in ("--budget-flops", "2M")]
    one_line_error(capsys, ["grow", *flags, "--out", str(tmp_path / "a")], "no budget", "--budget-flops")
    one_line_error(capsys, ["grow", *flags, "--budget-flops", "1e30", "--out", str(tmp_path / "b")],
                   "beyond any network")
    one_line_error(capsys, ["grow", *flags, "--budget-params", "1e3G", "--out", str(tmp_path / "c")],
                   "--budget-params")


def test_budget_numbers_read_as_documented():
    from grow.cost import parse_count
    assert parse_count("1e3M") == 10**9 and parse_count("40M") == 40 * 10**6 and parse_count("2.5K") == 2500


def test_one_class_data_is_refused(capsys, tmp_path):
    from PIL import Image
    for i in range(12):
        (tmp_path / "data" / "cat").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / "data" / "cat" / f"{i}.png")
    one_line_error(capsys, ["grow", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"),
                            "--budget-flops", "1M", "--out", str(tmp_path / "run")], "class")


def test_tiny_data_gets_a_note(capsys, tmp_path):
    assert main(["grow", *SMALL_FLAGS, "--train-subset", "30", "--max-rounds", "1", "--finetune-epochs", "0",
                 "--out", str(tmp_path / "run"), "--log-format", "json"]) == 0
    texts = [json.loads(line).get("text", "") for line in capsys.readouterr().out.splitlines()]
    assert any("only 30 training images" in t and "noise" in t for t in texts), texts


def test_quiet_still_shows_notes(capsys, tmp_path):
    assert main(["grow", *SMALL_FLAGS, "--train-subset", "30", "--max-rounds", "1", "--finetune-epochs", "0",
                 "--batch-size", "64", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "only 30 training images" in captured.err and len(captured.out.splitlines()) == 1
    assert "--batch-size 64 is more than the 30 training images" in captured.err


def test_tune_sampler_seed_out_of_range(capsys, tmp_path):
    one_line_error(capsys, ["tune", "--dataset", "synthetic", "--budget-flops", "1M", "--sampler-seed", "-3",
                            "--out", str(tmp_path / "tune")], "--sampler-seed")


def test_secrets_in_urls_are_masked():
    line = "cannot open Optuna storage 'postgresql+psycopg://grow:s3cr@t!@db.example:5432/grow': refused"
    assert "s3cr" not in mask_secrets(line) and "grow:***@db.example:5432" in mask_secrets(line)
    assert mask_secrets("sqlite:///study.db") == "sqlite:///study.db"
    assert "hunter2" not in mask_secrets("mysql://root:hunter2@localhost/x?password=hunter2")


def test_every_error_line_hides_passwords(capsys):
    import argparse

    from grow.cli import run_command

    def fails(args):
        raise GrowError("cannot open Optuna storage 'postgresql://alice:hunter2@db/grow'")

    assert run_command(fails, argparse.Namespace(command="tune")) == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err and "alice:***@db" in err


@pytest.mark.slow
def test_tune_error_line_hides_the_password(capsys, tmp_path):
    line = one_line_error(capsys, ["tune", "--dataset", "synthetic", "--budget-flops", "1M", "--trials", "1",
                                   "--storage", "bogus+driver://alice:hunter2@127.0.0.1:1/db",
                                   "--out", str(tmp_path / "tune")], "alice:***@")
    assert "hunter2" not in line


def test_usage_names_the_command_typed():
    assert invoked_name("/usr/local/bin/grow") == "grow"
    assert invoked_name("cli.py") == "python cli.py"
    assert invoked_name("/x/grow/__main__.py") == "python -m grow"
    proc = run_cli("grow", "--epochs-per-round", "x")
    assert proc.returncode == 2 and "python " in proc.stderr and "cli.py grow --help" in proc.stderr


# --- signals ------------------------------------------------------------------------------------
def _pty_run(args, until, timeout=120):
    """Start `python cli.py ARGS` on a pseudo-terminal (so rich draws its live display); once `until`
    appears in its output, return (process, master fd, output so far)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, stdin=slave, stdout=slave,
                            stderr=slave, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"})
    os.close(slave)
    seen, deadline = b"", time.time() + timeout
    while until not in _plain(seen) and time.time() < deadline and proc.poll() is None:
        try:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536)
        except OSError:  # the process closed the terminal: it ended
            break
    assert until in _plain(seen), _plain(seen).decode(errors="replace")[-2000:]
    return proc, master, seen


def _plain(output: bytes) -> bytes:
    """Terminal output without its colour and cursor escapes."""
    return re.sub(rb"\x1b\[[0-9;?]*[a-zA-Z]", b"", output)


def _drain(proc, master, seen):
    while True:
        try:
            ready = select.select([master], [], [], 1.0)[0]
            chunk = os.read(master, 65536) if ready else b""
        except OSError:
            break
        if not chunk and proc.poll() is not None:
            break
        seen += chunk
    proc.wait(timeout=60)
    os.close(master)
    return seen.decode(errors="replace")


def test_sigterm_stops_like_ctrl_c(tmp_path):
    out = tmp_path / "run"
    proc, master, seen = _pty_run(["grow", *SMALL_FLAGS, "--out", str(out)],
                                  until=b"round 2/4")  # round 2 is training: round 1's checkpoint exists
    proc.send_signal(signal.SIGTERM)
    text = _drain(proc, master, seen)
    assert proc.returncode == 143, text[-2000:]
    assert "Traceback" not in text
    assert "stopped by SIGTERM; continue with:" in text and f"grow --resume {out}" in text
    assert text.rfind("\x1b[?25h") > text.rfind("\x1b[?25l"), "the cursor is shown again"
    assert checkpoints.read_pointer(out).next_round >= 2, "round 1's checkpoint is intact"


@pytest.mark.slow
def test_ctrl_c_before_the_first_round_does_not_suggest_resume(tmp_path):
    out = tmp_path / "run"
    full_data = [f for f in SMALL_FLAGS if f not in ("--train-subset", "2000")]  # round 1 takes seconds
    proc, master, seen = _pty_run(["grow", *full_data, "--out", str(out)], until=b"round 1/4")
    proc.send_signal(signal.SIGINT)
    text = _drain(proc, master, seen)
    assert proc.returncode == 130
    assert "--resume" not in text and "nothing to resume" in text
