"""How much did Gamma discriminate in finished growth runs?

For every run folder under the given paths (a history.json outside checkpoints/), it counts
the rounds whose end found every growable layer saturated (selection ratio >= the run's tau), and the
lowest ratio any layer had at the end of a round. When every layer is saturated at the end of every
round, the growth decisions come from the order and the budget (grow.policy.plan_growth), not from
differences between layers' Gamma.

    python bench/saturation.py bench/out/c5-v8 bench/out/fm3-v8
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def round_ends(history: dict) -> list[dict[str, float]]:
    """The selection ratios of every layer at the end of each round."""
    return [r["epochs"][-1]["selection_ratio"] for r in history["rounds"] if r["epochs"]]


def histories(folder: Path) -> list[Path]:
    """The history.json of every run under `folder` (a checkpoint's copy is not another run)."""
    return sorted(p for p in folder.rglob("history.json") if "checkpoints" not in p.parts)


def summary(paths: list[Path]) -> dict:
    """Rounds, rounds with every layer saturated, and the lowest ratio at a round's end, over `paths`."""
    rounds = saturated = 0
    lowest = 1.0
    for path in paths:
        history = json.loads(path.read_text())
        tau = history["config"]["tau"]
        for ratios in round_ends(history):
            rounds += 1
            saturated += all(r >= tau for r in ratios.values())
            lowest = min(lowest, min(ratios.values()))
    return {"runs": len(paths), "rounds": rounds, "all_saturated": saturated, "lowest_ratio": lowest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    print("| runs under | runs | rounds | rounds with every layer saturated | lowest ratio at a round's end |")
    print("|---|---|---|---|---|")
    for folder in args.folders:
        s = summary(histories(folder))
        print(f"| {folder} | {s['runs']} | {s['rounds']} | {s['all_saturated']} | {s['lowest_ratio']:.2f} |")


if __name__ == "__main__":
    main()
