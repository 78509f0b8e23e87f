"""bench/schedule.py: the shape the growth schedule alone grows, without training."""
import subprocess
import sys

from grow.controller import GrowConfig
from grow.cost import count_macs
from grow.policy import Budget
from tests.helpers import ROOT, load_bench


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


def test_schedule_command_takes_a_parameter_budget():
    script = ROOT / "bench" / "schedule.py"
    done = subprocess.run([sys.executable, str(script), "--input", "1,28,28", "--budget-params", "40K",
                           "--rounds", "2"], capture_output=True, text=True, check=True)
    params = int(done.stdout.split("MACs")[1].split("params")[0].replace(",", ""))
    assert 0.9 * 40_000 <= params <= 40_000
    neither = subprocess.run([sys.executable, str(script), "--rounds", "2"], capture_output=True, text=True)
    assert neither.returncode != 0 and "--budget-params" in neither.stderr
