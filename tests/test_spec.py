"""Architectures as data: exact JSON round trips, clear errors, and costs that match torch's counter."""
import json

import pytest

import search_spaces
from grow.cost import count_macs, count_params, measure_macs, parse_count
from grow.spec import ArchSpec, SpecError, build

CLASSICS = [("vgg", "vgg16", 313.2e6), ("vgg", "vgg11", None), ("resnet", "resnet20", 40.8e6),
            ("resnet", "resnet56", 125.7e6), ("mobilenet", "mobilenetv2", None)]


@pytest.mark.parametrize("family", search_spaces.names())
def test_json_round_trip_is_exact(family):
    spec = search_spaces.get(family).seed((3, 32, 32), 10, normalization={"mean": [0.1, 0.2, 0.3], "std": [1, 2, 3]})
    text = spec.to_json()
    again = ArchSpec.from_json(text)
    assert again == spec and again.to_json() == text
    assert build(spec).spec == spec


@pytest.mark.parametrize("family, name, expected", CLASSICS)
def test_classic_members_cost_what_the_literature_says(family, name, expected):
    spec = search_spaces.get(family).classic(name, (3, 32, 32), 10)
    model = build(spec)
    assert count_macs(spec) == measure_macs(model)
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    if expected:
        assert count_macs(spec) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("family", search_spaces.names())
def test_seed_costs_match_the_counter(family):
    for shape in [(1, 28, 28), (3, 32, 32), (3, 16, 16)]:
        spec = search_spaces.get(family).seed(shape, 10)
        assert count_macs(spec) == measure_macs(build(spec))


@pytest.mark.parametrize("text, fragment", [
    ('{"family": "vgg"', "not valid JSON"),
    ('{"family": "vgg", "input_shape": [3, 32, 32], "num_classes": 10}', "'body'"),
    ('{"family": "vgg", "input_shape": [3, 32], "num_classes": 10, "body": {"stages": [[8]]}}', "input_shape"),
    ('{"family": "vgg", "input_shape": [3, 32, 32], "num_classes": 10, "body": {"stages": [[8, -2]]}}', "stages[0][1]"),
    ('{"family": "transformer", "input_shape": [3, 32, 32], "num_classes": 10, "body": {}}', "unknown network family"),
    ('{"family": "resnet", "input_shape": [3, 32, 32], "num_classes": 10, "body": {"stages": [{"width": 8}]}}', "stages[0]"),
    ('{"family": "vgg", "input_shape": [3, 32, 32], "num_classes": 10, "body": {"stages": [[8]]},'
     ' "normalization": {"mean": [0.5], "std": [0.2]}}', "normalization"),
])
def test_broken_files_give_one_clear_error(text, fragment):
    with pytest.raises(SpecError) as err:
        ArchSpec.from_json(text)
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_save_and_load(tmp_path):
    spec = search_spaces.get("resnet").classic("resnet20", (3, 32, 32), 10)
    spec.save(tmp_path / "arch.json")
    assert ArchSpec.load(tmp_path / "arch.json") == spec
    assert json.loads((tmp_path / "arch.json").read_text())["format"] == ArchSpec.FORMAT
    with pytest.raises(SpecError, match="cannot read"):
        ArchSpec.load(tmp_path / "missing.json")


@pytest.mark.parametrize("text, value", [("40M", 40_000_000), ("2.5m", 2_500_000), ("300k", 300_000),
                                         ("1G", 10**9), ("12345", 12345), (" 3M ", 3_000_000)])
def test_budgets_take_suffixes(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["40Q", "", "M", "-3M", "0", "abc"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(ValueError, match="budget"):
        parse_count(text)


def test_scale_keeps_depth_and_scales_widths():
    f = search_spaces.get("resnet")
    spec = f.classic("resnet20", (3, 32, 32), 10)
    half = f.scale(spec, 0.5)
    assert [len(s["blocks"]) for s in half.body["stages"]] == [3, 3, 3]
    assert [s["width"] for s in half.body["stages"]] == [8, 16, 32]
    assert count_macs(half) < count_macs(spec) / 3
