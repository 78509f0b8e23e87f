"""DessiLBI: the paper's equations exactly, the defaults, the readouts, and resumable state."""
import io

import pytest
import torch
from torch import nn

from grow import fused
from grow.optim import DessiLBI


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double()


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (16,), generator=g))
            for _ in range(n)]


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()


def reference_run(model, data, lr, kappa, mu, momentum):
    """The equations of the issue, written out per parameter, independently of the optimizer."""
    state = {p: {"z": torch.zeros_like(p), "gamma": torch.zeros_like(p), "buf": None} for p in model.parameters()}
    for x, y in data:
        model.zero_grad()
        loss_of(model, x, y).backward()
        with torch.no_grad():
            for p in model.parameters():
                s = state[p]
                g = p.grad.clone()
                s["buf"] = g if s["buf"] is None else momentum * s["buf"] + g
                g = s["buf"]
                if p.dim() in (2, 4):
                    w_old = p.clone()
                    p -= lr * kappa * (g + (w_old - s["gamma"]) / mu)
                    s["z"] = s["z"] + lr / mu * (w_old - s["gamma"])
                    if p.dim() == 4:
                        norms = s["z"].flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                        prox = s["z"] * torch.clamp(1 - 1 / norms, min=0)
                    else:
                        prox = torch.sign(s["z"]) * torch.clamp(s["z"].abs() - 1, min=0)
                    s["gamma"] = kappa * prox
                else:
                    p -= lr * kappa * g
    return state


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-kernel", "foreach"])
def test_forty_steps_match_the_equations(fused):
    lr, kappa, mu, momentum = 0.5, 0.5, 0.5, 0.9  # some filters of the second conv switch on, not all
    data = batches(40)
    ours, ref = small_model(), small_model()
    opt = DessiLBI(ours.parameters(), lr=lr, kappa=kappa, mu=mu, momentum=momentum, fused=fused)
    train(ours, opt, data)
    ref_state = reference_run(ref, data, lr, kappa, mu, momentum)
    partly_selected = False
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-8, rtol=0)
        if p.dim() in (2, 4):
            assert torch.allclose(opt.state[p]["z"], ref_state[q]["z"], atol=1e-8, rtol=0)
            assert torch.allclose(opt.state[p]["gamma"], ref_state[q]["gamma"], atol=1e-8, rtol=0)
        if p.dim() == 4:
            on = int(opt.selected(p).sum())
            partly_selected |= 0 < on < p.shape[0]
    assert partly_selected, "choose lr/mu so that some, not all, filters of a conv are selected"


def test_state_dict_round_trip_continues_bit_for_bit():
    data = batches(20)
    a = small_model()
    opt_a = DessiLBI(a.parameters(), lr=0.3, mu=2.0)
    train(a, opt_a, data[:10])
    b = small_model()
    b.load_state_dict(a.state_dict())
    opt_b = DessiLBI(b.parameters(), lr=0.3, mu=2.0)
    saved = io.BytesIO()  # through a file, as a resumed run does (state_dict() shares live tensors)
    torch.save(opt_a.state_dict(), saved)
    saved.seek(0)
    opt_b.load_state_dict(torch.load(saved, weights_only=True))
    for model, opt in ((a, opt_a), (b, opt_b)):
        train(model, opt, data[10:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        for key in opt_a.state[p]:
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key])


def test_structure_follows_the_shape():
    model = small_model()
    opt = DessiLBI(model.parameters(), lr=0.1, kappa=2.0)
    conv, bias, linear = model[0].weight, model[0].bias, model[6].weight
    assert (opt.structure_of(conv), opt.structure_of(linear), opt.structure_of(bias)) == ("filter", "element", None)


def test_without_structure_it_is_sgd_with_lr_times_kappa():
    model, twin = small_model(), small_model()
    opt = DessiLBI(model.parameters(), lr=0.1, kappa=2.0, structure=None)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.2, momentum=0.9)
    for m, o in ((model, opt), (twin, sgd)):
        train(m, o, batches(5))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-12, rtol=0)


def test_groups_choose_their_structure():
    model = small_model()
    opt = DessiLBI([{"params": [model[0].weight], "structure": "filter"},
                    {"params": [p for p in model.parameters() if p is not model[0].weight], "structure": None}],
                   lr=0.1)
    assert opt.structure_of(model[2].weight) is None and opt.structure_of(model[0].weight) == "filter"
    with pytest.raises(ValueError, match="no structure"):
        opt.selected(model[2].weight)
    with pytest.raises(ValueError, match="structure"):
        DessiLBI([{"params": [model[0].weight], "structure": "rows"}], lr=0.1)


def test_readouts_agree_with_the_state():
    model = small_model()
    opt = DessiLBI(model.parameters(), lr=0.5, mu=0.8)
    train(model, opt, batches(30))
    conv = model[2].weight
    gamma = opt.state[conv]["gamma"]
    norms = gamma.flatten(1).norm(dim=1)
    assert torch.allclose(opt.gamma_norms(conv), norms)
    assert torch.equal(opt.selected(conv), norms > 0)
    assert opt.selection_ratio(conv) == pytest.approx(float((norms > 0).float().mean()))
    star = opt.w_star(conv)
    assert torch.equal(star[norms > 0], conv[norms > 0].detach()) and not star[norms == 0].any()
    linear = model[6].weight
    assert opt.selected(linear).shape == linear.shape


def test_nothing_is_selected_at_the_start():
    model = small_model()
    opt = DessiLBI(model.parameters(), lr=0.1)
    assert opt.selection_ratio(model[0].weight) == 0.0


def test_lr_scheduler_drives_the_step():
    model, twin = small_model(), small_model()
    opt = DessiLBI(model.parameters(), lr=0.4, mu=5.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    data = batches(1)
    train(model, opt, data)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    fixed = DessiLBI(twin.parameters(), lr=0.4, mu=5.0)
    train(twin, fixed, data)
    fixed.param_groups[0]["lr"] = 0.2
    for m, o in ((model, opt), (twin, fixed)):
        train(m, o, data)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_weight_decay_is_added_to_every_gradient():
    model, twin = small_model(), small_model()
    decayed = DessiLBI(model.parameters(), lr=0.1, momentum=0.0, weight_decay=0.1)
    plain = DessiLBI(twin.parameters(), lr=0.1, momentum=0.0)
    for m in (model, twin):
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
    decayed.step()
    plain.step()
    # with zero loss gradient, weight decay alone shrinks every parameter by lr * kappa * wd
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q * (1 - 0.1 * 0.1), atol=1e-12) if p.dim() == 1 else not torch.equal(p, q)


def test_parameters_without_grad_are_skipped():
    model = small_model()
    opt = DessiLBI(model.parameters(), lr=0.1)
    before = model[0].weight.detach().clone()
    opt.step()
    assert torch.equal(model[0].weight, before)


def run_both_paths(make_model, steps=15, dtype=torch.float64, **options):
    """The same run through the fused CPU kernel and through the foreach path."""
    runs = []
    for fused in (True, False):
        model = make_model().to(dtype)
        opt = DessiLBI(model.parameters(), fused=fused, **options)
        for x, y in batches(steps):
            opt.zero_grad()
            loss_of(model, x.to(dtype).contiguous(memory_format=torch.channels_last), y).backward()
            opt.step()
        runs.append((model, opt))
    return runs


@pytest.mark.parametrize("options", [
    dict(lr=0.5, mu=0.5, kappa=0.5),
    dict(lr=0.2, mu=1.0, momentum=0.0),
    dict(lr=0.2, mu=1.0, nesterov=True),
    dict(lr=0.2, mu=1.0, dampening=0.3, weight_decay=0.01),
], ids=["momentum", "no-momentum", "nesterov", "dampening-and-decay"])
def test_fused_kernel_and_foreach_path_agree(options):
    (a, opt_a), (b, opt_b) = run_both_paths(small_model, **options)
    assert len(opt_a._fused._views) == len(list(a.parameters())), "every tensor went through the kernel"
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-10, rtol=0)
        for key in opt_b.state[q]:
            assert torch.allclose(opt_a.state[p][key], opt_b.state[q][key], atol=1e-10, rtol=0)


def test_channels_last_weights_take_the_kernel_and_match():
    (a, opt_a), (b, opt_b) = run_both_paths(lambda: small_model().to(memory_format=torch.channels_last),
                                            dtype=torch.float32, lr=0.5, mu=0.5)
    conv = a[2].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert conv in opt_a._fused._views
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4)
        if p.dim() == 4:
            assert torch.equal(opt_a.selected(p), opt_b.selected(q))


def test_tensors_the_kernel_cannot_take_still_follow_the_equations():
    """A non-contiguous weight and a gradient laid out unlike its weight go the foreach way."""
    def model():
        net = small_model()
        net[6].weight = nn.Parameter(net[6].weight.detach().t().contiguous().t())  # column-major
        return net
    (a, opt_a), (b, _) = run_both_paths(model, lr=0.5, mu=0.5)
    assert a[6].weight not in opt_a._fused._views and a[0].weight in opt_a._fused._views
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-10, rtol=0)


def test_loading_state_into_a_running_optimizer_takes_effect():
    data = batches(12)
    a, b = small_model(), small_model()
    opt_a = DessiLBI(a.parameters(), lr=0.3, mu=2.0)
    opt_b = DessiLBI(b.parameters(), lr=0.3, mu=2.0)
    for model, opt in ((a, opt_a), (b, opt_b)):
        train(model, opt, data[:4])
    saved = io.BytesIO()
    torch.save((a.state_dict(), opt_a.state_dict()), saved)
    train(a, opt_a, data[4:8])  # a runs on; then both rewind to the saved point
    saved.seek(0)
    weights, state = torch.load(saved, weights_only=True)
    a.load_state_dict(weights)
    opt_a.load_state_dict(state)
    for model, opt in ((a, opt_a), (b, opt_b)):
        train(model, opt, data[8:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert all(torch.equal(opt_a.state[p][k], opt_b.state[q][k]) for k in opt_b.state[q])


def test_state_follows_a_model_that_turns_channels_last():
    """Growth carries state over, then the model goes channels_last: the kernel still takes it."""
    runs = []
    for fused in (True, False):
        model = small_model()
        opt = DessiLBI(model.parameters(), lr=0.5, mu=0.5, fused=fused)
        for i, (x, y) in enumerate(batches(10)):
            if i == 5:
                model.to(memory_format=torch.channels_last)
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
        runs.append((model, opt))
    (a, opt_a), (b, _) = runs
    conv = a[2].weight
    assert conv in opt_a._fused._views and opt_a.state[conv]["z"].stride() == conv.stride()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-10, rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-kernel", "foreach"])
def test_grad_scaler_unscales_and_skips_overflowing_steps(fused):
    """Under torch.amp: a scaled run equals the unscaled one, an inf gradient skips the step."""
    data = batches(6)
    plain_model, scaled_model = small_model().float(), small_model().float()
    plain = DessiLBI(plain_model.parameters(), lr=0.5, mu=0.5, fused=fused)
    scaled = DessiLBI(scaled_model.parameters(), lr=0.5, mu=0.5, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for x, y in data[:5]:
        plain.zero_grad()
        loss_of(plain_model, x.float(), y).backward()
        plain.step()
        scaled.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            scaler.scale(loss_of(scaled_model, x.float(), y)).backward()
        scaler.step(scaled)
        scaler.update()
    for p, q in zip(plain_model.parameters(), scaled_model.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5)
    before = {k: v.clone() for k, v in scaled_model.state_dict().items()}
    gamma = scaled.gamma(scaled_model[2].weight).clone()
    scaled.zero_grad()
    x, y = data[5]
    scaler.scale(loss_of(scaled_model, x.float(), y)).backward()
    scaled_model[0].weight.grad[0, 0, 0, 0] = float("inf")
    scaler.step(scaled)
    scaler.update()
    assert all(torch.equal(before[k], v) for k, v in scaled_model.state_dict().items())
    assert torch.equal(scaled.gamma(scaled_model[2].weight), gamma)


def test_bfloat16_autocast_trains_float32_weights_through_the_kernel():
    model = small_model().float()
    opt = DessiLBI(model.parameters(), lr=0.5, kappa=0.5, mu=0.5)
    first = None
    for x, y in batches(40):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, x.float(), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert model[0].weight in opt._fused._views
    assert loss.item() < first and opt.selection_ratio(model[2].weight) > 0


def wide_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 5))


def test_large_tensors_split_over_threads_give_the_same_step():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        (a, opt_a), (b, opt_b) = run_both_paths(wide_model, steps=8, lr=0.5, mu=0.5)
    finally:
        torch.set_num_threads(threads)
    big = a[2].weight
    assert big.numel() >= fused.PARALLEL_MIN and big in opt_a._fused._views and True in fused._kernels
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-10, rtol=0)
        for key in opt_b.state[q]:
            assert torch.allclose(opt_a.state[p][key], opt_b.state[q][key], atol=1e-10, rtol=0)
