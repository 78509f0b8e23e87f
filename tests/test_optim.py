"""DessiLBI: the paper's equations exactly, the defaults, the readouts, and resumable state."""
import io

import pytest
import torch
from torch import nn

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


def test_forty_steps_match_the_equations():
    lr, kappa, mu, momentum = 0.5, 0.5, 0.5, 0.9  # some filters of the second conv switch on, not all
    data = batches(40)
    ours, ref = small_model(), small_model()
    opt = DessiLBI(ours.parameters(), lr=lr, kappa=kappa, mu=mu, momentum=momentum)
    for x, y in data:
        opt.zero_grad()
        loss_of(ours, x, y).backward()
        opt.step()
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
    for x, y in data[:10]:
        opt_a.zero_grad()
        loss_of(a, x, y).backward()
        opt_a.step()
    b = small_model()
    b.load_state_dict(a.state_dict())
    opt_b = DessiLBI(b.parameters(), lr=0.3, mu=2.0)
    saved = io.BytesIO()  # through a file, as a resumed run does (state_dict() shares live tensors)
    torch.save(opt_a.state_dict(), saved)
    saved.seek(0)
    opt_b.load_state_dict(torch.load(saved, weights_only=True))
    for model, opt in ((a, opt_a), (b, opt_b)):
        for x, y in data[10:]:
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
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
    for x, y in batches(5):
        for m, o in ((model, opt), (twin, sgd)):
            o.zero_grad()
            loss_of(m, x, y).backward()
            o.step()
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
    for x, y in batches(30):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
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
    x, y = batches(1)[0]
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    fixed = DessiLBI(twin.parameters(), lr=0.4, mu=5.0)
    fixed.zero_grad()
    loss_of(twin, x, y).backward()
    fixed.step()
    fixed.param_groups[0]["lr"] = 0.2
    for m, o in ((model, opt), (twin, fixed)):
        o.zero_grad()
        loss_of(m, x, y).backward()
        o.step()
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
