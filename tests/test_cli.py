"""The command line: bad input gets one clear line and a non-zero exit, never a traceback."""
import json

import pytest

from tests.helpers import run_cli


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_bad_budget_suffix():
    assert_one_line_error(run_cli("grow", "--dataset", "synthetic", "--budget-flops", "40Q"), "40Q")


def test_missing_cifar_folder(tmp_path):
    proc = run_cli("grow", "--dataset", "cifar10", "--data-dir", "/missing", "--no-download", "--budget-flops", "40M",
                   "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "/missing")


def test_unknown_space(tmp_path):
    proc = run_cli("grow", "--dataset", "synthetic", "--budget-flops", "2M", "--space", "transformer",
                   "--out", str(tmp_path / "r"))
    assert_one_line_error(proc, "transformer")


def test_budget_below_the_seed(tmp_path):
    proc = run_cli("grow", "--dataset", "synthetic", "--budget-flops", "1K", "--out", str(tmp_path / "r"))
    assert_one_line_error(proc, "budget")


def test_corrupt_model_json(tmp_path):
    bad = tmp_path / "model.json"
    bad.write_text('{"format": "grow.model/1", "arch": {"family": "vgg"')
    assert_one_line_error(run_cli("show", str(bad)), "model.json")


def test_resume_of_an_empty_folder(tmp_path):
    assert_one_line_error(run_cli("grow", "--resume", str(tmp_path)), str(tmp_path))


@pytest.mark.slow
def test_grow_show_eval_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("grow", "--dataset", "synthetic", "--budget-flops", "2M", "--out", str(out), "--epochs-per-round",
                   "1", "--max-rounds", "2", "--finetune-epochs", "1", "--log-format", "json")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "finish"
    show = run_cli("show", str(out / "model.json"))
    assert show.returncode == 0 and "MACs" in show.stdout and "ms" in show.stdout
    ev = run_cli("eval", str(out / "model.json"), "--dataset", "synthetic", "--log-format", "json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(events[-1]["test_accuracy"], abs=1e-6)


def test_a_run_at_another_image_size_is_evaluated_at_that_size(tmp_path):
    """--image-size on a fixed-size set: the model takes the size asked for, and eval re-reads the set at it."""
    out = tmp_path / "run"
    proc = run_cli("grow", "--dataset", "synthetic", "--image-size", "24", "--train-subset", "1024", "--budget-flops",
                   "2M", "--out", str(out),
                   "--epochs-per-round", "1", "--max-rounds", "1", "--finetune-epochs", "1", "--log-format", "json")
    assert proc.returncode == 0, proc.stderr
    model = json.loads((out / "model.json").read_text())
    assert model["input_shape"][1:] == [24, 24]
    ev = run_cli("eval", str(out / "model.json"), "--dataset", "synthetic", "--log-format", "json")
    assert ev.returncode == 0, ev.stderr
    final = json.loads(proc.stdout.splitlines()[-1])["test_accuracy"]
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(final, abs=1e-6)
    pruned = run_cli("prune", "--from", str(out / "model.json"), "--dataset", "synthetic", "--budget-flops", "300K",
                     "--epochs", "1", "--finetune-epochs", "1", "--train-subset", "512", "--out", str(tmp_path / "cut"),
                     "--quiet")
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads((tmp_path / "cut" / "model.json").read_text())["input_shape"][1:] == [24, 24]
