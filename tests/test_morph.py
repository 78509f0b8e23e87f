"""Growth keeps the function: widened and deepened networks compute what the old one did."""
import pytest
import torch

import grow
import search_spaces
from grow.cost import count_macs, measure_macs
from grow.morph import deepen, deepenable, move_optimizer_state, stage_depth, units, widen, widenable
from grow.spec import build

FAMILIES = ["vgg", "resnet", "mobilenet"]
SHAPE = (3, 16, 16)


def trained_like(spec):
    """A model whose BatchNorm statistics and weights are not the fresh defaults."""
    model = build(spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def models():
    for family in FAMILIES:
        f = search_spaces.get(family)
        seed = f.seed(SHAPE, 10, normalization={"mean": [0.5] * 3, "std": [0.25] * 3})
        yield pytest.param(seed, id=f"{family}-seed")
        yield pytest.param(f.deepen_spec(f.deepen_spec(seed, 0), 1), id=f"{family}-deeper")


MODELS = list(models())


def assert_carried(old, new):
    """Every old tensor keeps its name and sits in the leading slice of the new one; the new spec
    describes the new module exactly."""
    new_state = new.state_dict()
    for name, tensor in old.state_dict().items():
        assert torch.equal(new_state[name][tuple(slice(0, n) for n in tensor.shape)], tensor), name
    assert {k: v.shape for k, v in build(new.spec).state_dict().items()} == {k: v.shape for k, v in new_state.items()}


def assert_same_function(old, new):
    x = torch.rand(8, *SHAPE)
    with torch.no_grad():
        a, b = old.eval()(x), new.eval()(x)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max().clamp_min(1e-6)


@pytest.mark.parametrize("spec", MODELS)
def test_widen_every_unit_keeps_the_function(spec):
    model = trained_like(spec)
    for unit in units(model):
        grown = widen(model, {unit.name: unit.width + 4})
        assert_same_function(model, grown)
        assert_carried(model, grown)
        assert {u.name: u.width for u in units(grown)}[unit.name] == unit.width + 4
        assert count_macs(grown.spec) == measure_macs(grown)


def source_rows(old_w, new_w):
    """For every new filter, the index of the old filter it equals (None if none)."""
    flat_old = old_w.flatten(1)
    return [next((i for i, row in enumerate(flat_old) if torch.equal(row, new_row[: row.numel()])), None)
            for new_row in new_w[old_w.shape[0]:].flatten(1)]


@pytest.mark.parametrize("spec", MODELS)
def test_split_every_unit_keeps_the_function_with_copied_filters(spec):
    model = trained_like(spec)
    for unit in units(model):
        grown = widen(model, {unit.name: unit.width + 4}, generator=torch.Generator().manual_seed(0), init="split")
        assert_same_function(model, grown)
        assert {u.name: u.width for u in units(grown)}[unit.name] == unit.width + 4
        for producer in unit.producers:
            old_w, new_w = model.get_submodule(producer).weight, grown.get_submodule(producer).weight
            assert torch.equal(new_w[: old_w.shape[0], : old_w.shape[1]], old_w)
            assert None not in source_rows(old_w, new_w), f"{producer}: every new filter copies an old one"


@pytest.mark.parametrize("family", FAMILIES)
def test_split_copies_part_from_their_originals(family):
    """Unequal shares of the outgoing weights give original and copy different gradients."""
    model = build(search_spaces.get(family).seed(SHAPE, 10))
    unit = units(model)[1]
    grown = widen(model, {unit.name: unit.width + 4}, generator=torch.Generator().manual_seed(0), init="split")
    w = grown.get_submodule(unit.producers[0]).weight
    sources = source_rows(model.get_submodule(unit.producers[0]).weight, w)
    three_sgd_steps(grown)
    for k, j in enumerate(sources):
        assert not torch.allclose(w[unit.width + k], w[j]), f"copy {k} still equals filter {j}"


@pytest.mark.parametrize("spec", MODELS)
def test_deepen_every_stage_keeps_the_function(spec):
    model = trained_like(spec)
    for stage in deepenable(model):
        grown = deepen(model, stage)
        assert_same_function(model, grown)
        assert_carried(model, grown)
        assert stage_depth(grown, stage) == stage_depth(model, stage) + 1
        assert count_macs(grown.spec) == measure_macs(grown) > count_macs(model.spec)
        assert len(list(grown.parameters())) > len(list(model.parameters()))


def three_sgd_steps(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(32, *SHAPE), torch.randint(0, 10, (32,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
        opt.step()


def every_unit():
    for family in FAMILIES:
        model = build(search_spaces.get(family).seed(SHAPE, 10))
        for unit in units(model):
            yield pytest.param(family, unit.name, id=f"{family}-{unit.name}")


@pytest.mark.parametrize("family, name", list(every_unit()))
def test_new_filters_learn_within_three_steps(family, name):
    """Zero outgoing weights do not trap new filters: within three steps every producer's new
    filters have moved."""
    model = build(search_spaces.get(family).seed(SHAPE, 10))
    unit = next(u for u in units(model) if u.name == name)
    grown = widen(model, {unit.name: unit.width + 4})
    weights = [grown.get_submodule(p).weight for p in unit.producers]
    before = [w[unit.width:].detach().clone() for w in weights]
    three_sgd_steps(grown)
    for producer, w, b in zip(unit.producers, weights, before):
        assert not torch.allclose(w[unit.width:], b), producer


@pytest.mark.parametrize("family", FAMILIES)
def test_deepened_block_learns(family):
    model = build(search_spaces.get(family).seed(SHAPE, 10))
    grown = deepen(model, 1)
    new_names = set(dict(grown.named_parameters())) - set(dict(model.named_parameters()))
    before = {n: p.detach().clone() for n, p in grown.named_parameters() if n in new_names}
    three_sgd_steps(grown)
    changed = [n for n, p in grown.named_parameters() if n in new_names and not torch.equal(p, before[n])]
    assert any(n.endswith("conv.weight") for n in changed), changed


def test_widen_rejects_bad_requests():
    model = build(search_spaces.get("vgg").seed(SHAPE, 10))
    with pytest.raises(ValueError, match="not a growable layer"):
        widen(model, {"classifier": 20})
    name = widenable(model)[0]
    with pytest.raises(ValueError, match="filters"):
        widen(model, {name: 1})
    with pytest.raises(ValueError, match="cannot deepen"):
        deepen(model, 7)


def test_coupled_resnet_stream_grows_as_one():
    model = build(search_spaces.get("resnet").seed(SHAPE, 10))
    stream = next(u for u in units(model) if u.kind == "stream" and u.stage == 0)
    assert "stem.conv" in stream.producers and len(stream.producers) >= 2
    assert widenable(model).count(stream.name) == 1
    grown = widen(model, {stream.name: stream.width + 4})
    for name in stream.producers:
        assert grown.get_submodule(name).out_channels == stream.width + 4


def vgg_after_lbi_steps(steps, **options):
    """The vgg seed and its DessiLBI optimizer after `steps` steps on one batch."""
    model = build(search_spaces.get("vgg").seed(SHAPE, 10))
    opt = grow.DessiLBI(model.parameters(), **options)
    x, y = torch.rand(16, *SHAPE), torch.randint(0, 10, (16,))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def test_optimizer_state_moves_with_growth():
    model, opt = vgg_after_lbi_steps(3, lr=0.1, mu=5)
    name = widenable(model)[0]
    grown = widen(model, {name: 12})
    new_opt = grow.DessiLBI(grown.parameters(), lr=0.1, mu=5)
    move_optimizer_state(model, opt, grown, new_opt)
    old_w, new_w = model.get_submodule(name).weight, grown.get_submodule(name).weight
    for key in ("z", "gamma", "momentum_buffer"):
        assert torch.equal(new_opt.state[new_w][key][:8], opt.state[old_w][key])
        assert not new_opt.state[new_w][key][8:].any()
    consumer_old = model.get_submodule("stages.1.0.conv").weight
    consumer_new = grown.get_submodule("stages.1.0.conv").weight
    assert torch.equal(new_opt.state[consumer_new]["z"][:, :8], opt.state[consumer_old]["z"])
    assert not new_opt.state[consumer_new]["z"][:, 8:].any()


def test_split_shares_the_readers_state_like_their_weights():
    """After a split, W - Gamma of a reader summed over an old column and its copies is the old
    column's, so DessiLBI does not pull the shared weights back; copies' momentum is the original's."""
    model, opt = vgg_after_lbi_steps(20, lr=0.5, mu=0.5)
    name = widenable(model)[0]
    grown = widen(model, {name: 12}, generator=torch.Generator().manual_seed(0), init="split")
    new_opt = grow.DessiLBI(grown.parameters(), lr=0.5, mu=0.5)
    move_optimizer_state(model, opt, grown, new_opt)
    sources = source_rows(model.get_submodule(name).weight, grown.get_submodule(name).weight)
    old_r, new_r = model.get_submodule("stages.1.0.conv").weight, grown.get_submodule("stages.1.0.conv").weight
    old_gap = (old_r - opt.state[old_r]["gamma"]).detach()
    new_gap = (new_r - new_opt.state[new_r]["gamma"]).detach()
    assert opt.state[old_r]["gamma"].any(), "the reader has selected filters"
    summed = new_gap[:, :8].clone()
    for k, j in enumerate(sources):
        summed[:, j] += new_gap[:, 8 + k]
        assert torch.equal(new_opt.state[new_r]["momentum_buffer"][:, 8 + k], opt.state[old_r]["momentum_buffer"][:, j])
    assert torch.allclose(summed, old_gap, atol=1e-6)
    assert grown._split_log == []


def test_sgd_momentum_moves_with_growth():
    model = build(search_spaces.get("resnet").seed(SHAPE, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(16, *SHAPE), torch.randint(0, 10, (16,))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    stream = next(u for u in units(model) if u.kind == "stream" and u.stage == 1)
    grown = deepen(widen(model, {stream.name: stream.width + 4}), 1)
    new_opt = torch.optim.SGD(grown.parameters(), lr=0.1, momentum=0.9)
    move_optimizer_state(model, opt, grown, new_opt)
    old_params = dict(model.named_parameters())
    for name, p in grown.named_parameters():
        if name not in old_params:
            assert p not in new_opt.state, name
            continue
        old = opt.state[old_params[name]]["momentum_buffer"]
        new = new_opt.state[p]["momentum_buffer"]
        lead = tuple(slice(0, n) for n in old.shape)
        assert torch.equal(new[lead], old), name
        rest = new.clone()
        rest[lead] = 0
        assert not rest.any(), name
    new_opt.step()  # the carried state is usable as it is


def test_extend_adds_a_half_resolution_stage_that_starts_as_the_old_features():
    """A new last stage, twice as wide, after one more pooling: what the classifier saw is pooled once
    more (so not exact), the old features pass through the new conv unchanged, and the new filters
    are not yet read by the classifier."""
    spec = search_spaces.get("vgg").seed((3, 32, 32), 10)
    model = trained_like(spec)
    grown = grow.morph.extend(model)
    assert grown.spec.body["stages"] == spec.body["stages"] + [[2 * spec.body["stages"][-1][-1]]]
    assert_carried(model, grown)
    assert count_macs(grown.spec) == measure_macs(grown)
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        features = model.normalize(x)
        for layers, pool in zip(model.stages, model.pools):
            features = layers[0](features)
            features = torch.nn.functional.max_pool2d(features, 2) if pool else features
        pooled = torch.nn.functional.max_pool2d(features, 2)  # the grown network pools the old last stage
        through = grown.eval().stages[-1][0](pooled)
    old_width = spec.body["stages"][-1][-1]
    assert torch.allclose(through[:, :old_width], pooled, atol=1e-5)
    assert torch.all(grown.classifier.weight[:, old_width:] == 0)
    # Another stage would see one pixel: refused.
    assert grow.morph.extended_spec(grown) is None
    with pytest.raises(ValueError, match="another stage"):
        grow.morph.extend(grown)
    # Families without stages to add say so.
    assert grow.morph.extended_spec(build(search_spaces.get("mobilenet").seed((3, 32, 32), 10))) is None


def test_resnet_extend_adds_a_stride_2_stage_whose_shortcut_passes_the_old_stream():
    """A ResNet's new stage is one block twice as wide at half the resolution; it starts as its
    shortcut alone, which passes the old stream's channels through (at every other pixel), and the
    classifier does not read its new channels yet. Stages stop at 2 pixels a side."""
    spec = search_spaces.get("resnet").seed((3, 32, 32), 10)
    model = trained_like(spec)
    grown = grow.morph.extend(model)
    width = spec.body["stages"][-1]["width"]
    assert grown.spec.body["stages"] == spec.body["stages"] + [{"width": 2 * width, "blocks": [2 * width]}]
    assert_carried(model, grown)
    assert count_macs(grown.spec) == measure_macs(grown)
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        features = model.stem(model.normalize(x))
        for blocks in model.stages:
            for block in blocks:
                features = block(features)
        through = grown.eval().stages[-1][0](features)
    assert through.shape[-1] == 4
    assert torch.allclose(through[:, :width], features[:, :, ::2, ::2], atol=1e-5)
    assert torch.all(grown.classifier.weight[:, width:] == 0)
    assert grow.morph.extended_spec(grown) is not None  # 4x4 -> 2x2
    smallest = grow.morph.extend(grown)
    assert grow.morph.extended_spec(smallest) is None  # 2x2 -> 1x1: refused
