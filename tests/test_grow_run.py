"""A whole growth run on the synthetic set: grows, stays in budget, exports, loads, resumes."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import grow
from grow.controller import grow_network
from grow.errors import GrowError
from grow.recipe import weight_decay_for
from grow.report import Reporter
from tests.helpers import ROOT, run_cli, tiny_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = grow_network(tiny_config(out))
    return out, result


def test_run_grows_within_budget_and_exports(finished_run):
    out, result = finished_run
    history = json.loads((out / "history.json").read_text())
    rounds = history["rounds"]
    assert len(rounds) >= 2
    assert rounds[-1]["macs"] > rounds[0]["macs"], "the network grew"
    assert all(r["macs"] <= 2_000_000 for r in rounds)
    assert any(r["actions"] for r in rounds)
    for r in rounds:
        assert {"macs", "params", "widths", "actions", "val_accuracy", "epochs"} <= set(r)
        assert all(0 <= v <= 1 for v in r["epochs"][-1]["selection_ratio"].values())
    record = json.loads((out / "model.json").read_text())
    for key in ("format", "space", "input_shape", "num_classes", "macs", "params", "normalization", "metrics"):
        assert key in record
    assert record["macs"] == history["finetune"]["macs"] <= 2_000_000  # the network the fine-tune trained
    assert record["metrics"]["test_accuracy"] > 0.3, "well above 10% chance on the synthetic classes"
    for png in ("selection_ratio.png", "widths.png", "accuracy_macs.png"):
        assert (out / png).stat().st_size > 1000


def test_the_run_chooses_its_weight_decay_from_the_pictures_and_records_it(finished_run, tmp_path):
    """Without --weight-decay the run takes grow.recipe's value for its labelled pictures (the synthetic
    set's 20,000: below the 5e-4 of small sets) and says so in history.json; a given value is kept."""
    out, result = finished_run
    sizes = result.history["dataset"]
    assert sizes["train"] + sizes["val"] == 20_000
    assert result.history["weight_decay"] == weight_decay_for(20_000) == pytest.approx(2.5e-4)
    given = grow_network(tiny_config(tmp_path / "given", weight_decay=1e-3, train_subset=1000, max_rounds=1,
                                     finetune_epochs=0))
    assert given.history["weight_decay"] == 1e-3


def test_model_json_macs_match_flop_counter(finished_run):
    out, _ = finished_run
    model = grow.load_model(out / "model.json")
    record = json.loads((out / "model.json").read_text())
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.rand(1, *record["input_shape"]))
    assert abs(counter.get_total_flops() / 2 - record["macs"]) <= 0.01 * record["macs"]


def test_load_in_a_fresh_process_gives_the_same_logits(finished_run, tmp_path):
    out, result = finished_run
    x = torch.rand(4, *result.model.spec.input_shape)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch, grow\n"
        f"m = grow.load_model({str(out / 'model.json')!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        "assert type(m.spec).from_json(m.spec.to_json()) == m.spec\n"
        f"torch.save(m(x), {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    expected = result.model.cpu().eval()(x)
    assert torch.allclose(torch.load(tmp_path / "y.pt", weights_only=True), expected, atol=1e-5)


def test_weights_load_without_pickle(finished_run):
    from safetensors.torch import load_file
    out, result = finished_run
    state = load_file(str(out / "model.safetensors"))
    assert set(state) == set(result.model.state_dict())


class StopAtRound(Reporter):
    """Simulates Ctrl-C at the start of a given round."""

    def __init__(self, index):
        self.index = index

    def round_start(self, index, *args):
        if index == self.index:
            raise KeyboardInterrupt


def test_the_same_run_twice_gives_the_same_network_and_accuracy(finished_run, tmp_path):
    """A user re-running a command with the same seed on the same machine gets the same numbers:
    the same growth decisions, the same weights bit for bit, the same test accuracy."""
    out, first = finished_run
    again = grow_network(tiny_config(tmp_path / "again"))
    assert again.test_accuracy == first.test_accuracy
    assert [r["actions"] for r in again.history["rounds"]] == [r["actions"] for r in first.history["rounds"]]
    weights, weights_again = first.model.state_dict(), again.model.state_dict()
    assert weights.keys() == weights_again.keys()
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)


def test_interrupted_run_resumes_without_losing_a_round(tmp_path):
    config = tiny_config(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        grow_network(config, StopAtRound(2))
    pointer = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert pointer["next_round"] == 2
    result = grow_network(config, resume=True)
    rounds = [r["round"] for r in result.history["rounds"]]
    assert rounds == list(range(1, len(rounds) + 1)) and len(rounds) >= 2
    assert (tmp_path / "run" / "model.json").exists()


def test_existing_run_folder_is_not_overwritten(finished_run):
    out, _ = finished_run
    with pytest.raises(GrowError, match="--overwrite"):
        grow_network(tiny_config(out))
    with pytest.raises(GrowError, match="finished run"):
        grow_network(tiny_config(out), resume=True)


def test_divergence_stops_with_a_clear_error(tmp_path):
    with pytest.raises(GrowError, match="diverged"):
        grow_network(tiny_config(tmp_path / "nan", lr=1e6))


def test_seed_above_budget_is_reported(tmp_path):
    with pytest.raises(GrowError, match="budget"):
        grow_network(tiny_config(tmp_path / "small", budget_macs=1000))


def test_a_seed_above_the_budget_is_narrowed_and_grows(tmp_path):
    import search_spaces
    from grow.cost import count_macs
    budget = count_macs(search_spaces.get("resnet").seed((3, 16, 16), 10)) // 2
    out = tmp_path / "narrow"
    grow_network(tiny_config(out, space="resnet", budget_macs=budget, max_rounds=2, train_subset=1000))
    history = json.loads((out / "history.json").read_text())
    assert history["rounds"][0]["macs"] <= budget / 3 < history["finetune"]["macs"] <= budget


@pytest.mark.slow
def test_sigkill_in_second_round_then_resume(tmp_path):
    out = tmp_path / "killed"
    args = ["grow", "--dataset", "synthetic", "--budget-flops", "2M", "--out", str(out), "--epochs-per-round", "2",
            "--max-rounds", "3", "--finetune-epochs", "1", "--log-format", "json",
            "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:  # wait for the second round's first epoch: the run is mid-round
        event = json.loads(line)
        if event["event"] == "epoch" and event["epoch"] == 3:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.json").exists()
    done = run_cli("grow", "--resume", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == list(range(1, len(history["rounds"]) + 1))
    assert (out / "model.json").exists()


def test_growth_waits_while_the_gamma_path_is_still_moving(tmp_path):
    """After one round of the resnet seed nothing is saturated yet but selection ratios are rising:
    the run trains on and grows later instead of stopping with the seed."""
    # kappa 1 at lr 0.1 keeps this path slow enough that round 1 ends with nothing saturated.
    result = grow_network(tiny_config(tmp_path / "resnet", space="resnet", budget_macs=3_000_000, max_rounds=3,
                                      kappa=1.0, lr=0.1))
    first, second = result.history["rounds"][:2]
    assert not first["actions"] and "stop" not in first
    assert any("still moving" in note for note in first["notes"])
    assert second["actions"] and result.history["final"]["macs"] > first["macs"]


def test_fill_by_spends_the_rest_of_the_budget_and_ends_growth(tmp_path):
    """With --fill-by 1 the first round is the last growth round: whatever budget growth left, every
    layer widens by one factor into it, the run stops growing, and the unused rounds go to the fine-tune."""
    result = grow_network(tiny_config(tmp_path / "fill", budget_macs=3_000_000, max_rounds=3, fill_by=1))
    rounds = result.history["rounds"]
    assert len(rounds) == 1 and "--fill-by 1" in rounds[0]["stop"]
    fills = [a for a in rounds[0]["actions"] if "every layer x" in a["reason"]]
    assert fills and all(a["kind"] == "widen" and a["after"] > a["before"] for a in fills)
    final = result.history["final"]
    assert final["macs"] <= 3_000_000
    assert final["macs"] > 0.85 * 3_000_000  # the budget is spent, up to the rounding of one factor
    finetune, sizes = result.history["finetune"], result.history["dataset"]
    per_epoch = (sizes["train"] + sizes["val"]) // 128
    rounds_trained = sum(e["images"] for e in rounds[0]["epochs"]) // 128
    # the fine-tune trains the two unused rounds too: the run's batches are those of its 4 epochs
    assert finetune["steps"] == 4 * per_epoch - rounds_trained > 3 * per_epoch
    assert result.history["finetune"]["macs"] == final["macs"] > rounds[0]["macs"]


def test_round_steps_shortens_rounds_and_the_finetune_trains_what_they_left(tmp_path):
    """--round-steps 5 on a larger set: every round epoch trains 5 batches, Gamma's path is paced
    for 5 (mu), and the fine-tune trains the rest of the schedule, so the run trains as many batches as
    a fixed network given its epochs of train + validation would."""
    config = tiny_config(tmp_path / "short", train_subset=2000, round_steps=5, max_rounds=3, finetune_epochs=1)
    result = grow_network(config)
    rounds, finetune = result.history["rounds"], result.history["finetune"]
    sizes, batch = result.history["dataset"], config.batch_size
    per_epoch, finetune_per_epoch = sizes["train"] // batch, (sizes["train"] + sizes["val"]) // batch
    assert per_epoch > 5
    round_epochs = [e for r in rounds for e in r["epochs"]]
    assert round_epochs and all(e["images"] == 5 * batch for e in round_epochs)
    assert all(r["mu"] == pytest.approx(config.lr * 5 / config.path_per_round) for r in rounds)
    assert finetune["round_steps"] == 5 * len(round_epochs)
    assert finetune["steps"] == config.total_epochs() * finetune_per_epoch - 5 * len(round_epochs)
    assert sum(e["images"] for e in finetune["epochs"]) == finetune["steps"] * batch
