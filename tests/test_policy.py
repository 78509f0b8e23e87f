"""Growth decisions: saturated layers widen, unsaturated ones do not, the budget is never exceeded."""
import pytest
import torch

import search_spaces
from grow import morph
from grow.cost import count_macs, count_params
from grow.policy import FORCED_STAGE_SHARE, Budget, fill_budget, paced, plan_growth
from grow.spec import build


@pytest.fixture(params=["vgg", "resnet", "mobilenet"])
def model(request):
    spec = search_spaces.get(request.param).seed((3, 32, 32), 10)
    return build(spec)


def ratios_for(model, saturated=(), value=1.0, rest=0.3):
    return {u.name: (value if u.name in saturated else rest) for u in morph.units(model)}


def plan(model, ratios, budget=Budget(), **kw):
    kw = {"tau": 0.9, "widen_ratio": 0.5, "widen_min": 4, **kw}
    return plan_growth(model, ratios, budget, generator=torch.Generator().manual_seed(0), **kw)


def test_saturated_layer_widens_and_unsaturated_does_not(model):
    first = morph.units(model)[0]
    grown, actions, _ = plan(model, ratios_for(model, saturated={first.name}))
    widths = {u.name: u.width for u in morph.units(grown)}
    assert [a.target for a in actions if a.kind == "widen"] == [first.name]
    assert widths[first.name] == first.width + max(4, -(-first.width // 2))
    for u in morph.units(model)[1:]:
        assert widths[u.name] == u.width


def test_nothing_saturated_means_no_growth(model):
    grown, actions, notes = plan(model, ratios_for(model))
    assert actions == [] and notes == []
    assert grown.spec == model.spec


def test_budget_is_never_exceeded_and_steps_shrink_to_fit(model):
    names = {u.name for u in morph.units(model)}
    macs = count_macs(model.spec)
    budget = Budget(macs=int(macs * 1.3))
    grown, actions, _ = plan(model, ratios_for(model, saturated=names))
    assert count_macs(grown.spec) > budget.macs, "the unbounded plan must need more than this budget"
    grown, actions, _ = plan(model, ratios_for(model, saturated=names), budget)
    assert actions, "some growth fits in 30% more MACs"
    assert count_macs(grown.spec) <= budget.macs
    assert all(a.macs <= budget.macs for a in actions)


def test_params_budget_is_respected(model):
    names = {u.name for u in morph.units(model)}
    budget = Budget(params=int(count_params(model.spec) * 1.2))
    grown, actions, _ = plan(model, ratios_for(model, saturated=names), budget)
    assert count_params(grown.spec) <= budget.params


def test_nothing_fits_stops_with_a_reason(model):
    names = {u.name for u in morph.units(model)}
    budget = Budget(macs=count_macs(model.spec))
    grown, actions, notes = plan(model, ratios_for(model, saturated=names), budget)
    assert actions == []
    assert notes and all("budget" in n for n in notes)
    assert grown.spec == model.spec


def test_a_new_stage_is_not_left_out_for_cheaper_widenings():
    """Under a tight budget the round's cheap widenings would take every MAC before the new stage's
    turn; the stage goes first then, and the widenings take what is left. With room for every step
    the cost order stands (the stage is not the cheapest step, so it does not come first)."""
    model = build(search_spaces.get("vgg").seed((3, 32, 32), 10))
    everything = {u.name: 1.0 for u in morph.units(model)}
    grown, actions, _ = plan(model, everything, Budget(macs=2_000_000), order="cost", extend_stages=True)
    tight = [a.kind for a in actions]
    assert tight[0] == "extend" and "widen" in tight
    assert count_macs(grown.spec) <= 2_000_000 and len(morph.deepenable(grown)) == len(morph.deepenable(model)) + 1
    roomy = [a.kind for a in plan(model, everything, Budget(macs=20_000_000), order="cost", extend_stages=True)[1]]
    assert "extend" in roomy and roomy[0] == "widen"


def test_a_new_stage_that_would_take_most_of_the_budget_does_not_go_first():
    """Under a parameter budget the 2x2 stage is the dearest step: at 100K parameters it would take
    three quarters of the budget, so the cheaper widenings go first and the stage waits for room."""
    model = build(search_spaces.get("vgg").seed((3, 32, 32), 10))
    everything = {u.name: 1.0 for u in morph.units(model)}
    budget = Budget(params=100_000)
    stage = morph.extended_spec(model)
    assert budget.fits(stage) and budget.step_cost(model.spec, stage) > FORCED_STAGE_SHARE
    grown, actions, _ = plan(model, everything, budget, order="cost", extend_stages=True)
    assert [a.kind for a in actions][0] == "widen" and "extend" not in [a.kind for a in actions]
    assert count_params(grown.spec) <= 100_000 and len(morph.deepenable(grown)) == len(morph.deepenable(model))


def test_a_deepened_stage_keeps_the_width_it_widened_to():
    """At 96x96 pixels a new narrow layer costs less than widening stage 0, so the cost order once
    deepened first and the new layer kept the old width: every round left a narrower layer at the end
    of stage 0, a bottleneck before stage 1. The deepening now follows its stage's widenings."""
    model = build(search_spaces.get("vgg").seed((3, 96, 96), 10))
    for _ in range(3):
        everything = {u.name: 1.0 for u in morph.units(model)}
        model, actions, _ = plan(model, everything, Budget(macs=100_000_000), order="cost", max_deepen=1)
        assert "deepen" in [a.kind for a in actions]
    first_stage = [u.width for u in morph.units(model) if u.stage == 0]
    assert len(first_stage) == 4 and len(set(first_stage)) == 1


def test_fully_saturated_stage_deepens(model):
    stage = morph.deepenable(model)[0]
    in_stage = {u.name for u in morph.units(model) if u.stage == stage}
    grown, actions, _ = plan(model, ratios_for(model, saturated=in_stage))
    deepen = [a for a in actions if a.kind == "deepen"]
    assert [a.target for a in deepen] == [f"stage {stage}"]
    assert deepen[0].after == deepen[0].before + 1
    assert count_macs(grown.spec) > count_macs(model.spec)


def test_cost_order_spends_a_tight_budget_on_the_cheapest_asked_for_step():
    model = build(search_spaces.get("vgg").seed((3, 32, 32), 10))
    names = [u.name for u in morph.units(model)]
    first, last = names[0], names[-1]
    # The first (32x32) layer is the most saturated, the last (4x4) one barely saturated; room for one step.
    ratios = {**ratios_for(model), first: 1.0, last: 0.95}
    macs = count_macs(model.spec)
    widen_first = count_macs(morph.widened_spec(model, {first: 12})) - macs   # 8 -> 12 at 32x32
    widen_last = count_macs(morph.widened_spec(model, {last: 96})) - macs     # 64 -> 96 at 4x4
    assert widen_last < widen_first
    budget = Budget(macs=macs + widen_first)  # room for the expensive step alone
    cheap_first = [a.target for a in plan(model, ratios, budget, order="cost")[1]]
    by_ratio = [a.target for a in plan(model, ratios, budget, order="ratio")[1]]
    assert by_ratio[0] == first
    assert cheap_first[0] == last
    # A low-resolution filter costs less: the cost order ends with more filters for the same budget.
    grown_cost, _, _ = plan(model, ratios, budget, order="cost")
    grown_ratio, _, _ = plan(model, ratios, budget, order="ratio")
    assert count_macs(grown_cost.spec) <= budget.macs and count_macs(grown_ratio.spec) <= budget.macs
    assert sum(u.width for u in morph.units(grown_cost)) > sum(u.width for u in morph.units(grown_ratio))


def test_cost_order_under_a_parameter_budget_takes_what_is_cheap_in_parameters():
    # A 32x32 filter costs 16x the MACs of a 8x8 one and far fewer parameters: with both layers
    # saturated and room for one step, a MAC budget widens the low-resolution layer, a parameter
    # budget the high-resolution one.
    model = build(search_spaces.get("vgg").seed((3, 32, 32), 10))
    names = [u.name for u in morph.units(model)]
    first, last = names[0], names[-1]
    ratios = {**ratios_for(model), first: 1.0, last: 1.0}
    macs, params = count_macs(model.spec), count_params(model.spec)
    wide_first, wide_last = morph.widened_spec(model, {first: 12}), morph.widened_spec(model, {last: 96})
    assert count_macs(wide_last) < count_macs(wide_first) and count_params(wide_first) < count_params(wide_last)
    by_macs = Budget(macs=count_macs(wide_first) + 1)
    by_params = Budget(params=count_params(wide_last) - 1)  # not room for both
    assert [a.target for a in plan(model, ratios, by_macs, order="cost")[1]][0] == last
    taken = plan(model, ratios, by_params, order="cost")[1]
    assert taken[0].target == first and taken[0].after == 12
    assert by_params.step_cost(model.spec, wide_first) < by_params.step_cost(model.spec, wide_last)
    # With both limits a step costs its larger share of them.
    both = Budget(macs=2 * macs, params=2 * params)
    assert both.step_cost(model.spec, wide_first) == max((count_macs(wide_first) - macs) / (2 * macs),
                                                         (count_params(wide_first) - params) / (2 * params))


def test_pacing_spreads_the_remaining_budget_over_the_rounds_left():
    model = build(search_spaces.get("vgg").seed((3, 32, 32), 10))
    macs, params = count_macs(model.spec), count_params(model.spec)
    budget = Budget(macs=macs + 4_000_000, params=params + 400_000)
    assert paced(budget, model, 4) == Budget(macs + 1_000_000, params + 100_000)
    assert paced(budget, model, 1) == budget
    assert paced(Budget(macs=macs + 4_000_000), model, 2) == Budget(macs + 2_000_000, None)
    # Every layer saturated: a paced round spends at most its share, an unpaced one nearly all.
    ratios = ratios_for(model, saturated={u.name for u in morph.units(model)})
    paced_grown, _, _ = plan(model, ratios, paced(budget, model, 4), order="cost")
    assert macs < count_macs(paced_grown.spec) <= macs + 1_000_000


def test_a_stage_deepens_only_after_its_layers_were_widened_and_saturate_again():
    model = build(search_spaces.get("vgg").seed((3, 32, 32), 10))
    everything = ratios_for(model, saturated={u.name for u in morph.units(model)})
    first_round = [a.kind for a in plan(model, everything, widened=set())[1]]
    assert "deepen" not in first_round and first_round.count("widen") == len(morph.units(model))
    stage0 = {u.name for u in morph.units(model) if u.stage == 0}
    deepened = [a.target for a in plan(model, everything, widened=stage0)[1] if a.kind == "deepen"]
    assert deepened == ["stage 0"]
    # Without the record of earlier widenings (the older rule) every saturated stage deepens at once.
    assert len([a for a in plan(model, everything)[1] if a.kind == "deepen"]) == len(morph.deepenable(model))


def test_a_saturated_last_stage_is_followed_by_a_new_stage_where_the_image_allows():
    model = build(search_spaces.get("vgg").seed((3, 32, 32), 10))
    last = {u.name for u in morph.units(model) if u.stage == 3}
    grown, actions, _ = plan(model, ratios_for(model, saturated=last), extend_stages=True, order="cost")
    extended = [a for a in actions if a.kind == "extend"]
    assert len(extended) == 1 and extended[0].target == "stage 4"
    assert len(grown.spec.body["stages"]) == 5 and grown.spec.body["stages"][-1] == [2 * grown.spec.body["stages"][3][-1]]
    # Not asked for while the last stage has room, and not without the option.
    assert not [a for a in plan(model, ratios_for(model, saturated={"stages.0.0.conv"}), extend_stages=True)[1]
                if a.kind == "extend"]
    assert not [a for a in plan(model, ratios_for(model, saturated=last))[1] if a.kind == "extend"]
    # A budget too small for the new stage keeps the network at four stages, with a note.
    tight = Budget(macs=count_macs(model.spec) + 1000)
    grown, actions, notes = plan(model, ratios_for(model, saturated=last), tight, extend_stages=True)
    assert len(grown.spec.body["stages"]) == 4 and any("new stage exceeds the budget" in n for n in notes)



def test_at_most_the_asked_number_of_stages_deepen_in_a_round_the_cheapest_first():
    model = build(search_spaces.get("vgg").seed((3, 32, 32), 10))
    everything = ratios_for(model, saturated={u.name for u in morph.units(model)})
    costs = {s: count_macs(morph.deepened_spec(model, s)) for s in morph.deepenable(model)}
    deepened = [a.target for a in plan(model, everything, max_deepen=1)[1] if a.kind == "deepen"]
    assert deepened == [f"stage {min(costs, key=costs.get)}"]
    assert len([a for a in plan(model, everything, max_deepen=2)[1] if a.kind == "deepen"]) == 2
    assert len([a for a in plan(model, everything)[1] if a.kind == "deepen"]) == len(costs)


def test_fill_budget_widens_every_layer_by_one_factor_within_the_budget():
    """The fill keeps the grown shape's proportions (one factor for every unit), stays within the
    budget, and is the widest such step: one more filter everywhere would not fit."""
    model = build(search_spaces.get("vgg").seed((3, 32, 32), 10))
    before = {u.name: u.width for u in morph.units(model)}
    budget = Budget(macs=4 * count_macs(model.spec))
    grown, actions = fill_budget(model, budget, {}, reason="test")
    after = {u.name: u.width for u in morph.units(grown)}
    assert budget.fits(grown) and {a.target for a in actions} == set(before)
    factors = [after[n] / before[n] for n in before]
    assert max(factors) - min(factors) < 0.1
    assert not budget.fits(morph.widened_spec(model, {n: w + 1 for n, w in after.items()}))
    # With nothing left to spend, or less than `minimum` filters' worth, nothing changes.
    same, none = fill_budget(grown, Budget(macs=count_macs(grown.spec)), {}, reason="test")
    assert same is grown and none == []
    one_more = fill_budget(grown, Budget(macs=int(count_macs(grown.spec) * 1.02)), {}, reason="test")[1]
    assert one_more and max(a.after - a.before for a in one_more) < 4
    same, none = fill_budget(grown, Budget(macs=int(count_macs(grown.spec) * 1.02)), {}, reason="test", minimum=4)
    assert same is grown and none == []


def _twin_share(weight: torch.Tensor) -> float:
    """Share of a layer's filters with a near-twin (cosine similarity above 0.99) among the others."""
    w = torch.nn.functional.normalize(weight.detach().flatten(1), dim=1)
    cos = w @ w.T
    cos.fill_diagonal_(-1)
    return float((cos.max(dim=1).values > 0.99).float().mean())


def test_growth_by_default_adds_new_filters_not_copies_of_old_ones():
    """Copied filters never fully part and waste the width they cost (bench/RESULTS.md, seventh wave):
    a run with the default settings widens with filters of their own."""
    from grow.controller import GrowConfig
    init = GrowConfig().widen_init
    for family in ("vgg", "resnet", "mobilenet"):
        model = build(search_spaces.get(family).seed((3, 32, 32), 10))
        grown, _ = fill_budget(model, Budget(macs=2 * count_macs(model.spec)), ratios_for(model), reason="test",
                               generator=torch.Generator().manual_seed(0), widen_init=init)
        for unit in morph.units(grown):
            weight = grown.get_submodule(unit.producers[0]).weight
            assert _twin_share(weight) == 0.0, (family, unit.name)
        copied, _ = fill_budget(model, Budget(macs=2 * count_macs(model.spec)), ratios_for(model), reason="test",
                                generator=torch.Generator().manual_seed(0), widen_init="split")
        assert max(_twin_share(copied.get_submodule(u.producers[0]).weight) for u in morph.units(copied)) > 0.3
