"""Pruning: channels leave physically and consistently, the function and the optimizer state follow,
budgets hold exactly, tickets are Gamma's support, and `grow --from` continues from a saved network."""
import json

import pytest
import torch

import grow
import search_spaces
from grow.controller import GrowConfig, _Run, grow_network
from grow.cost import count_macs, measure_macs
from grow.errors import GrowError
from grow.morph import prune, units, widen
from grow.policy import Budget, lbi_param_groups
from grow.pruning import PruneConfig, keep_within, prune_network, ranking, within
from grow.spec import build
from tests.helpers import run_cli
from tests.test_morph import FAMILIES, MODELS, SHAPE, assert_same_function, trained_like


def readers(model, unit):
    """Names of the tensors that read `unit`'s channels (their dim 1 grows with it)."""
    wider = build(search_spaces.get(model.spec.family).widen_spec(model.spec, {unit.name: unit.width + 1}))
    old = model.state_dict()
    return [n for n, t in wider.state_dict().items() if t.dim() >= 2 and t.shape[1] != old[n].shape[1]]


def removed(unit):
    """Every other channel goes; the odd ones stay."""
    return [c for c in range(unit.width) if c % 2 == 0], [c for c in range(unit.width) if c % 2 == 1]


def assert_spec_matches_module(model):
    assert {k: v.shape for k, v in build(model.spec).state_dict().items()} == \
           {k: v.shape for k, v in model.state_dict().items()}
    assert count_macs(model.spec) == measure_macs(model)


def scale_outgoing(model, unit, channels, factor):
    with torch.no_grad():
        state = dict(model.named_parameters())
        for name in readers(model, unit):
            state[name][:, channels] *= factor


@pytest.mark.parametrize("spec", MODELS)
def test_prune_keeps_the_function_when_removed_channels_are_unread(spec):
    """Channels whose outgoing weights are zero carry nothing: removing them changes no output."""
    for unit in units(trained_like(spec)):
        model = trained_like(spec)
        gone, stay = removed(unit)
        scale_outgoing(model, unit, gone, 0.0)
        pruned = prune(model, {unit.name: stay})
        assert_same_function(model, pruned)
        assert {u.name: u.width for u in units(pruned)}[unit.name] == len(stay)
        assert_spec_matches_module(pruned)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_moves_the_function_by_what_the_removed_channels_carried(family):
    """Otherwise the logits move, in proportion to the removed channels' outgoing weights."""
    spec = search_spaces.get(family).seed(SHAPE, 10, normalization={"mean": [0.5] * 3, "std": [0.25] * 3})
    x = torch.rand(16, *SHAPE)
    moves = []
    for factor in (1.0, 0.1, 0.01):
        torch.manual_seed(0)
        model = trained_like(spec)
        unit = units(model)[1]
        gone, stay = removed(unit)
        scale_outgoing(model, unit, gone, factor)
        with torch.no_grad():
            moves.append(float((model(x) - prune(model, {unit.name: stay}).eval()(x)).abs().max()))
    assert moves[0] > 1e-5, "removing channels that are read must change the output"
    assert 3 < moves[0] / moves[1] < 30 and 3 < moves[1] / moves[2] < 30, moves


@pytest.mark.parametrize("family", ["resnet", "mobilenet"])
def test_coupled_stream_loses_the_same_channels_everywhere(family):
    f = search_spaces.get(family)
    model = trained_like(f.deepen_spec(f.deepen_spec(f.seed(SHAPE, 10), 0), 1))
    stream = next(u for u in units(model) if u.kind == "stream" and u.stage == 1)
    keep = [0, 3, 5, 6, 11]
    pruned = prune(model, {stream.name: keep})
    for name in stream.producers:
        old, new = model.get_submodule(name), pruned.get_submodule(name)
        assert torch.equal(new.weight, old.weight[keep]), name
        bn = name.rsplit(".", 1)[0] + ".bn"
        assert torch.equal(pruned.get_submodule(bn).running_mean, model.get_submodule(bn).running_mean[keep])
    for name in readers(model, stream):
        assert torch.equal(pruned.state_dict()[name], model.state_dict()[name][:, keep]), name
    assert pruned(torch.rand(2, *SHAPE)).shape == (2, 10)
    assert_spec_matches_module(pruned)
    assert {u.name: u.width for u in units(pruned)}[stream.name] == len(keep)


def lbi_after_steps(model, steps=3):
    opt = grow.DessiLBI(lbi_param_groups(model), lr=0.1, mu=2.0, kappa=1.0, momentum=0.9, weight_decay=5e-4)
    x, y = torch.rand(16, *SHAPE), torch.randint(0, 10, (16,))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("family", FAMILIES)
def test_optimizer_state_follows_the_kept_channels(family):
    model = build(search_spaces.get(family).seed(SHAPE, 10))
    opt = lbi_after_steps(model)
    unit = units(model)[0]
    keep = list(range(0, unit.width, 3))
    pruned, new_opt = prune(model, {unit.name: keep}, opt)
    assert type(new_opt) is grow.DessiLBI
    assert [(g["lr"], g["mu"], g["structure"]) for g in new_opt.param_groups] == \
           [(g["lr"], g["mu"], g["structure"]) for g in opt.param_groups]
    old_w, new_w = model.get_submodule(unit.producers[0]).weight, pruned.get_submodule(unit.producers[0]).weight
    for key in ("z", "gamma", "momentum_buffer"):
        assert torch.equal(new_opt.state[new_w][key], opt.state[old_w][key][keep]), key
    name = readers(model, unit)[0]
    old_r, new_r = dict(model.named_parameters())[name], dict(pruned.named_parameters())[name]
    assert torch.equal(new_opt.state[new_r]["z"], opt.state[old_r]["z"][:, keep])
    assert torch.equal(new_opt.selected(new_w), opt.selected(old_w)[keep])
    lbi_after_steps_with(pruned, new_opt)  # and it keeps training


def lbi_after_steps_with(model, opt):
    x, y = torch.rand(16, *SHAPE), torch.randint(0, 10, (16,))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model.train()(x), y).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sgd_momentum_follows_too():
    model = build(search_spaces.get("resnet").seed(SHAPE, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    torch.nn.functional.cross_entropy(model(torch.rand(4, *SHAPE)), torch.zeros(4, dtype=torch.long)).backward()
    opt.step()
    pruned, new_opt = prune(model, {"stages.0": [1, 2, 7]}, opt)
    assert type(new_opt) is torch.optim.SGD and new_opt.param_groups[0]["nesterov"]
    old, new = model.stem.conv.weight, pruned.stem.conv.weight
    assert torch.equal(new_opt.state[new]["momentum_buffer"], opt.state[old]["momentum_buffer"][[1, 2, 7]])


def test_prune_refuses_bad_requests():
    model = build(search_spaces.get("vgg").seed(SHAPE, 10))
    name = units(model)[0].name
    for keep, message in (({"classifier": [0]}, "not a prunable layer"), ({name: []}, "at least one"),
                          ({name: [0, 0]}, "twice"), ({name: [99]}, "cannot keep"), ({name: [0.5]}, "integer")):
        with pytest.raises(ValueError, match=message):
            prune(model, keep)


@pytest.mark.parametrize("budget", [Budget(macs=20_000_000), Budget(params=100_000), Budget(7_000_000, 90_000)])
def test_keep_within_meets_the_budget_exactly(budget):
    """At or below the budget, and maximal: no channel left out fits back in."""
    spec = search_spaces.get("resnet").classic("resnet20", (3, 32, 32), 10)
    model = build(spec)
    order = [(u.name, c) for u in units(model) for c in range(u.width)]
    order = [order[i] for i in torch.randperm(len(order), generator=torch.Generator().manual_seed(0))]
    keep = keep_within(spec, order, budget)
    pruned = prune(model, keep)
    assert budget.fits(pruned) and count_macs(pruned.spec) == measure_macs(pruned)
    family = search_spaces.get("resnet")
    widths = {name: len(channels) for name, channels in keep.items()}
    for u in units(model):
        if widths[u.name] < u.width:
            assert not within(budget, family.widen_spec(spec, {**widths, u.name: widths[u.name] + 1})), u.name


def test_keep_within_refuses_a_budget_below_one_filter_per_layer():
    spec = search_spaces.get("vgg").seed(SHAPE, 10)
    order = [(u.name, 0) for u in units(build(spec))]
    with pytest.raises(GrowError, match="one filter per layer"):
        keep_within(spec, order, Budget(macs=100))


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_then_widen_round_trips_widths(family):
    model = trained_like(search_spaces.get(family).seed(SHAPE, 10))
    widths = {u.name: u.width for u in units(model)}
    pruned = prune(model, {name: list(range(0, w, 2)) for name, w in widths.items()})
    assert {u.name: u.width for u in units(pruned)} == {n: (w + 1) // 2 for n, w in widths.items()}
    back = widen(pruned, widths, generator=torch.Generator().manual_seed(0), init="split")
    assert back.spec == model.spec
    assert_same_function(pruned, back)


# --- whole runs on the synthetic set ---------------------------------------------------------

def saved_seed(tmp_path, family="vgg"):
    """A saved (untrained) seed network for the synthetic set's 3x16x16 inputs."""
    torch.manual_seed(0)
    model = build(search_spaces.get(family).seed(SHAPE, 10))
    return grow.save_model(model, tmp_path / "source"), model


def small(tmp_path, **overrides):
    values = dict(dataset="synthetic", train_subset=2048, epochs=2, finetune_epochs=1, device="cpu",
                  out=str(tmp_path / "pruned"), val_fraction=0.2, path=6.0)
    return PruneConfig(**{**values, **overrides})


def test_prune_network_writes_a_smaller_model_that_loads_alone(tmp_path):
    source, model = saved_seed(tmp_path)
    budget = count_macs(model.spec) // 2
    result = prune_network(small(tmp_path, from_model=str(source), budget_macs=budget))
    record = json.loads((result.out / "model.json").read_text())
    assert record["macs"] <= budget and record["macs"] == count_macs(result.model.spec)
    assert record["pruned"]["macs_before"] == count_macs(model.spec)
    assert 0 <= record["metrics"]["unpruned_test_accuracy"] <= 1 and 0 <= record["metrics"]["test_accuracy"] <= 1
    loaded = grow.load_model(result.out / "model.json")
    assert measure_macs(loaded) == record["macs"]
    history = json.loads((result.out / "history.json").read_text())
    cut = history["cut"]
    kept = {name: len(channels) for name, channels in cut["keep"].items()}
    assert kept == cut["widths_after"] == {u.name: u.width for u in units(loaded)}
    for name, sel in history["selection"].items():  # within a layer, the kept filters are its earliest
        key = [((t if t is not None else float("inf")), -g, -z)
               for t, g, z in zip(sel["since_step"], sel["gamma_norm"], sel["z_norm"])]
        kept, dropped = [key[c] for c in cut["keep"][name]], [key[c] for c in range(len(key)) if c not in cut["keep"][name]]
        assert not dropped or max(kept) <= min(dropped), name
    for png in ("prune_path.png", "widths.png"):
        assert (result.out / png).stat().st_size > 0


def test_prune_trains_whole_epochs_and_paces_the_path_by_them(tmp_path):
    """Growth's --round-steps does not cut prune's DessiLBI epochs: 8 epochs of 12 batches is more
    than 64 batches, and every epoch still trains all 12, with mu set for 96 steps."""
    source, model = saved_seed(tmp_path)
    config = small(tmp_path, from_model=str(source), budget_macs=count_macs(model.spec) // 2, epochs=8)
    history = prune_network(config).history
    batches = history["dataset"]["train"] // 128
    assert batches * config.epochs > 64
    epochs = history["rounds"][0]["epochs"]
    assert len(epochs) == 8 and all(e["images"] == batches * 128 for e in epochs)
    assert history["rounds"][0]["mu"] == pytest.approx(config.lr * batches * 8 / config.path)
    fixed = (history["dataset"]["train"] + history["dataset"]["val"]) // 128
    assert history["finetune"]["steps"] == config.finetune_epochs * fixed  # its own epochs, not growth's schedule


def test_ticket_structure_is_the_gamma_support_at_its_epoch(tmp_path):
    source, model = saved_seed(tmp_path)
    config = small(tmp_path, from_model=str(source), budget_macs=count_macs(model.spec) - 1, ticket=True,
                   ticket_epoch=3, epochs=4, path=8.0)
    result = prune_network(config)
    history = result.history
    assert result.ticket_epoch == 3 == history["cut"]["epoch"]
    assert len(history["rounds"][0]["epochs"]) == 3, "the path stops at the ticket"
    support = history["support"][2]["channels"]
    assert any(support.values()) and not all(len(v) == u.width for u, v in zip(units(model), support.values()))
    for name, channels in history["cut"]["keep"].items():
        assert channels == support[name] or (not support[name] and len(channels) == 1), name
    assert json.loads((result.out / "model.json").read_text())["metrics"]["ticket_epoch"] == 3


def test_automatic_ticket_takes_the_last_support_within_the_budget(tmp_path):
    source, model = saved_seed(tmp_path)
    budget = Budget(macs=count_macs(model.spec) // 3)
    result = prune_network(small(tmp_path, from_model=str(source), budget_macs=budget.macs, ticket=True, epochs=4,
                                 path=12.0))
    family = search_spaces.get("vgg")
    fits = [within(budget, family.widen_spec(model.spec, {k: max(1, len(v)) for k, v in s["channels"].items()}))
            for s in result.history["support"]]
    e = result.ticket_epoch
    assert fits[e - 1] or e == 1
    assert e == len(fits) or not fits[e], "the epoch after the ticket's outgrew the budget"


def test_grow_from_a_saved_model_starts_from_its_weights(tmp_path):
    source, model = saved_seed(tmp_path, "resnet")
    config = GrowConfig(dataset="synthetic", train_subset=256, from_model=str(source), out=str(tmp_path / "g"),
                        budget_macs=2 * count_macs(model.spec), device="cpu")
    start = _Run(config, grow.controller.NullReporter()).seed_model()
    assert start.spec == model.spec
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), model.state_dict().values()))
    config.budget_macs = count_macs(model.spec) - 1
    with pytest.raises(GrowError, match="above the budget"):
        _Run(config, grow.controller.NullReporter()).seed_model()


@pytest.mark.slow
def test_grow_from_continues_to_a_larger_budget(tmp_path):
    source, model = saved_seed(tmp_path, "resnet")
    budget = 2 * count_macs(model.spec)
    result = grow_network(GrowConfig(dataset="synthetic", train_subset=512, from_model=str(source), space="vgg",
                                     out=str(tmp_path / "g"), budget_macs=budget, epochs_per_round=1, max_rounds=2,
                                     finetune_epochs=1, path_per_round=8.0, device="cpu"))
    assert result.history["config"]["space"] == "resnet", "the family is the model's"
    assert result.history["rounds"][0]["spec"] == model.spec.to_dict()
    assert count_macs(model.spec) <= result.history["final"]["macs"] <= budget


def write_unknown_family(tmp_path):
    source = tmp_path / "source" / "model.json"
    record = json.loads(source.read_text())
    record["arch"]["family"] = "transformer"
    source.write_text(json.dumps(record))
    return source


@pytest.mark.parametrize("case, message", [
    ("above", "already within the budget"),
    ("family", "unknown network family 'transformer'"),
    ("both", "not both"),
    ("none", "say which network"),
])
def test_bad_input_gets_one_clear_line(tmp_path, case, message):
    source, model = saved_seed(tmp_path)
    if case == "family":
        source = write_unknown_family(tmp_path)
    args = {"above": ["--from", str(source), "--budget-flops", "1G"],
            "family": ["--from", str(source), "--budget-flops", "100K"],
            "both": ["--from", str(source), "--space", "resnet", "--arch", "resnet20", "--budget-flops", "1M"],
            "none": ["--budget-flops", "1M"]}[case]
    done = run_cli("prune", "--dataset", "synthetic", "--out", str(tmp_path / "out"), *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "out" / "model.json").exists()


def fake_snapshot(model, seed=0):
    """Selection times and norms as a DessiLBI path might leave them (random, a third never selected)."""
    g = torch.Generator().manual_seed(seed)
    since, gamma, z = {}, {}, {}
    for u in units(model):
        t = torch.randint(1, 500, (u.width,), generator=g)
        t[torch.rand(u.width, generator=g) < 0.3] = -1
        since[u.name], z[u.name] = t, torch.rand(u.width, generator=g)
        gamma[u.name] = torch.where(t >= 0, torch.rand(u.width, generator=g), torch.zeros(u.width))
    return {"since": since, "gamma": gamma, "z": z}


def test_rankings_order_by_selection_time_and_layer_rank_cuts_layers_alike():
    spec = search_spaces.get("resnet").classic("resnet20", (3, 32, 32), 10)
    model = build(spec)
    snap = fake_snapshot(model)
    order = ranking(snap)
    times = [int(snap["since"][n][c]) for n, c in order]
    selected = [t for t in times if t >= 0]
    assert selected == sorted(selected) and times[: len(selected)] == selected, "selected first, earliest first"
    keep = keep_within(spec, ranking(snap, "layer"), Budget(macs=count_macs(spec) // 2))
    shares = [len(keep[u.name]) / u.width for u in units(model)]
    assert max(shares) - min(shares) <= 0.2, shares
    for u in units(model):  # each layer keeps its own earliest
        own = [c for n, c in order if n == u.name]
        assert sorted(own[: len(keep[u.name])]) == keep[u.name]
