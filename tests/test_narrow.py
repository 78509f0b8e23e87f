"""Narrow networks train: every family's classic member scaled far below its width, as bench/suite.py
scales it to a small budget, runs training steps in grow's channels_last layout without crashing.

A ResNet-20 scaled to 3M MACs on 28x28 pictures has 5-channel stages, and torch 2.14's oneDNN weight
gradient of a 1x1 stride-2 conv on fewer than 8 channels (the projection shortcut) corrupted the heap:
the process died ('corrupted size vs. prev_size') or hung. The steps run in a child process, so a
crash fails this test instead of killing pytest.
"""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys, torch, search_spaces
    from grow.baselines import scale_to_budget
    from grow.policy import Budget
    from grow.spec import build
    from grow.train import train_epoch

    family, member, c, size, macs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    space = search_spaces.get(family)
    spec = scale_to_budget(space.classic(member, (c, size, size), 10), Budget(macs=int(macs)))
    torch.manual_seed(0)
    model = build(spec)
    narrowest = min(m.in_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > c)
    batches = [(torch.randn(64, c, size, size), torch.randint(0, 10, (64,))) for _ in range(12)]
    stats = train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), batches)
    print(narrowest, stats.loss)
""")


@pytest.mark.parametrize("family,member,channels,size,macs,threads", [
    ("resnet", "resnet20", 1, 28, 3e6, "1"),  # crashed
    ("resnet", "resnet20", 3, 32, 5e6, "2"),  # hung
    ("vgg", "vgg11", 1, 28, 3e6, "1"),
    ("mobilenet", "mobilenetv2", 3, 32, 5e6, "1"),
])
def test_a_classic_member_scaled_to_narrow_layers_trains(family, member, channels, size, macs, threads):
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    done = subprocess.run([sys.executable, "-c", SCRIPT, family, member, str(channels), str(size), str(macs)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, f"training crashed (exit {done.returncode}): {done.stderr[-500:]}"
    narrowest, loss = done.stdout.split()
    assert int(narrowest) < 8 or family != "resnet"  # the case the crash needed
    assert float(loss) == float(loss)  # finite training happened (a NaN would fail here)
