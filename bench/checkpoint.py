"""What checking checkpoints costs: writing a round's folder (with the sha256 of every file) and reading it
back checked, for a VGG-11 on 32x32 inputs (9.2M parameters; weights plus DessiLBI state).

    python bench/checkpoint.py
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grow  # noqa: E402
import search_spaces  # noqa: E402
from grow import checkpoints  # noqa: E402
from grow.export import save_weights  # noqa: E402
from grow.optim import DessiLBI  # noqa: E402
from grow.policy import lbi_param_groups  # noqa: E402


def median_seconds(call, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    spec = search_spaces.get("vgg").classic("vgg11", (3, 32, 32), 10)
    model = grow.build(spec)
    optimizer = DessiLBI(lbi_param_groups(model), lr=0.1, kappa=1.0, mu=20.0, momentum=0.9)
    torch.nn.functional.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
    optimizer.step()  # momentum, Z and Gamma exist
    history = {"rounds": [{"epochs": [{}], "stop": "bench"}]}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)

        def write():
            checkpoints.write_round(out, 2, True, 1, spec_json=spec.to_json(),
                                    save_weights=lambda path: save_weights(model, path),
                                    optimizer_state=optimizer.state_dict(), history=history)

        t_write = median_seconds(write)
        folder = out / "checkpoints" / "round-002"
        size = sum(p.stat().st_size for p in folder.iterdir())
        t_hash = median_seconds(lambda: [checkpoints.sha256(p) for p in folder.iterdir()])
        t_read = median_seconds(lambda: checkpoints.read_round(folder))
    print(f"VGG-11 round checkpoint, {size / 1e6:.1f} MB on disk, {torch.get_num_threads()} thread(s), median of 5:")
    print(f"  write (spec, safetensors, optimizer, history, sha256, rename): {t_write:.3f} s")
    print(f"  of which sha256 of every file:                                  {t_hash:.3f} s "
          f"({t_hash / t_write:.0%})")
    print(f"  read back checked (sha256, safetensors, optimizer, spec):      {t_read:.3f} s")


if __name__ == "__main__":
    main()
