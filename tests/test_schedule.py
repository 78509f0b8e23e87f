"""bench/schedule.py: the shape the growth schedule alone grows, without training."""
from grow.controller import GrowConfig
from grow.cost import count_macs
from grow.policy import Budget
from tests.helpers import load_bench


def test_scheduled_shape_fills_the_budget_and_follows_the_order():
    schedule = load_bench("schedule")
    budget = Budget(macs=3_000_000)
    by_cost = schedule.scheduled_shape((1, 28, 28), 10, budget, rounds=3)
    by_ratio = schedule.scheduled_shape((1, 28, 28), 10, budget, rounds=3, config=GrowConfig(order="ratio"))
    for spec in (by_cost, by_ratio):
        assert 0.95 * budget.macs <= count_macs(spec) <= budget.macs
    seed_depth = 4
    assert sum(len(s) for s in by_cost.body["stages"]) > seed_depth  # it deepened
    assert by_cost.body["stages"] != by_ratio.body["stages"]  # the order decides the shape
