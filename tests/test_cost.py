"""Costs: the closed form agrees with torch's counter, with the literature, and with the model itself."""
import pytest
import torch

import search_spaces
from grow.cost import count_macs, count_params, layer_costs, measure_macs, parse_count
from grow.spec import build

# MACs of one 3x32x32 image, 10 classes, as the growing and pruning literature quotes them
CLASSICS = [("vgg", "vgg16", 313.2e6), ("vgg", "vgg11", 152.8e6), ("resnet", "resnet20", 40.8e6),
            ("resnet", "resnet32", 69.1e6), ("resnet", "resnet56", 125.7e6), ("mobilenet", "mobilenetv2", None)]


@pytest.mark.parametrize("family, name, expected", CLASSICS)
def test_classic_members_cost_what_the_literature_says(family, name, expected):
    spec = search_spaces.get(family).classic(name, (3, 32, 32), 10)
    model = build(spec)
    assert count_macs(spec) == measure_macs(model)
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    if expected:
        assert count_macs(spec) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("family", search_spaces.names())
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 16, 16), (3, 5, 7), (1, 1, 1)])
def test_seed_costs_match_the_counter(family, shape):
    spec = search_spaces.get(family).seed(shape, 10)
    model = build(spec)
    assert count_macs(spec) == measure_macs(model)
    assert count_params(spec) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", search_spaces.names())
def test_layer_rows_describe_the_real_layers(family):
    """Each row names a module of the model and states its channels, kernel, stride and output size."""
    spec = search_spaces.get(family).seed((3, 16, 16), 10)
    model = build(spec)
    outputs = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, tuple(o.shape[2:])))
    model.eval()(torch.rand(1, *spec.input_shape))
    rows = layer_costs(spec)
    assert {row["name"] for row in rows} == set(outputs)
    for row in rows:
        module = model.get_submodule(row["name"])
        if row["kind"] == "linear":
            assert (row["in"], row["out"]) == (module.in_features, module.out_features)
            continue
        assert (row["in"], row["out"]) == (module.in_channels, module.out_channels)
        assert (row["kernel"], row["stride"]) == (module.kernel_size[0], module.stride[0])
        assert row["output"] == "x".join(map(str, outputs[row["name"]]))
        assert row["macs"] == module.weight.numel() * outputs[row["name"]][0] * outputs[row["name"]][1]


def test_measuring_leaves_the_model_as_it_was():
    model = build(search_spaces.get("resnet").seed((3, 16, 16), 10)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_macs(model)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("text, value", [("40M", 40_000_000), ("2.5m", 2_500_000), ("300k", 300_000),
                                         ("1G", 10**9), ("12345", 12345), (" 3M ", 3_000_000), ("1e6", 10**6),
                                         (2_000_000, 2_000_000), (2.5e6, 2_500_000)])
def test_budgets_take_suffixes(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["40Q", "", "M", "-3M", "0", "abc", "1e400", float("inf"), -5])
def test_bad_budgets_are_refused(text):
    with pytest.raises(ValueError, match="budget") as err:
        parse_count(text)
    assert "\n" not in str(err.value)
