"""bench/saturation.py: how often Gamma left a layer unsaturated at the end of a round."""
from __future__ import annotations

import json

from tests.helpers import load_bench


def _history(*ends: dict[str, float]) -> dict:
    return {"config": {"tau": 0.9},
            "rounds": [{"epochs": [{"selection_ratio": {"a": 0.0}}, {"selection_ratio": end}]} for end in ends]}


def test_counts_rounds_that_ended_with_every_layer_saturated(tmp_path, capsys, monkeypatch):
    run = tmp_path / "seed-0" / "grown"
    (run / "checkpoints" / "round-002").mkdir(parents=True)
    (run / "history.json").write_text(json.dumps(_history({"a": 1.0, "b": 0.95}, {"a": 1.0, "b": 0.5})))
    # a checkpoint's copy of the history is not another run
    (run / "checkpoints" / "round-002" / "history.json").write_text(json.dumps(_history({"a": 0.1})))
    saturation = load_bench("saturation")
    summary = saturation.summary(saturation.histories(tmp_path))
    assert summary == {"runs": 1, "rounds": 2, "all_saturated": 1, "lowest_ratio": 0.5}
    monkeypatch.setattr("sys.argv", ["saturation.py", str(tmp_path)])
    saturation.main()
    assert f"| {tmp_path} | 1 | 2 | 1 | 0.50 |" in capsys.readouterr().out
