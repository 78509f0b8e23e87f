"""The fast path on CPU: bf16 / fp16 autocast, channels_last, torch.compile rebuilt per network."""
import pytest
import torch
from torch import nn

import search_spaces
from grow.data import Batches, load_dataset
from grow.optim import DessiLBI
from grow.policy import lbi_param_groups
from grow.spec import build
from grow.train import Accelerated, evaluate, grad_scaler, resolve_precision, train_epoch


@pytest.fixture(scope="module")
def data():
    splits = load_dataset("synthetic", train_subset=1024)
    return splits, Batches(splits.train, 64, info=splits.info, train=True, augment=False)


def seed_model(splits):
    torch.manual_seed(0)
    return build(search_spaces.get("vgg").seed(splits.info.input_shape, splits.info.num_classes))


def conv_output_dtypes(model):
    seen = set()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o: seen.add((o.dtype, o.is_contiguous(memory_format=torch.channels_last))))
    return seen


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_autocast_trains_in_channels_last_on_cpu(data, name, dtype):
    splits, batches = data
    model = seed_model(splits)
    optimizer = DessiLBI(lbi_param_groups(model), lr=0.1, kappa=0.25, mu=2.0)
    precision = resolve_precision(name, torch.device("cpu"))
    scaler = grad_scaler(precision, torch.device("cpu"))
    assert precision == dtype and (scaler is not None) == (dtype == torch.float16)
    seen = conv_output_dtypes(model)
    first = train_epoch(model, optimizer, batches, precision=precision, scaler=scaler)
    second = train_epoch(model, optimizer, batches, precision=precision, scaler=scaler)
    assert seen == {(dtype, True)}, "convolutions ran in half precision on NHWC tensors"
    assert second.loss < first.loss and second.accuracy > 0.3
    assert all(p.dtype == torch.float32 for p in model.parameters()), "weights stay float32"
    assert all(t.dtype == torch.float32 for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    assert all(optimizer.z(p).abs().sum() > 0 for p in model.parameters() if p.dim() == 4), "the path moved"
    loss, accuracy = evaluate(model, Batches(splits.val, 256, info=splits.info, train=False), precision=precision)
    assert accuracy > 0.3 and loss == loss


def test_auto_precision_is_float32_on_cpu():
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("fp32", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", torch.device("cpu"))


def test_nchw_when_channels_last_is_off(data):
    splits, batches = data
    model = seed_model(splits)
    seen = conv_output_dtypes(model)
    train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.05), batches, channels_last=False)
    assert seen == {(torch.float32, False)}


@pytest.mark.slow
def test_compile_is_rebuilt_for_a_new_network_and_timed_apart(data):
    splits, batches = data
    accelerated = Accelerated(compile=True)
    model = seed_model(splits)
    shape = (64, *splits.info.input_shape)
    net = accelerated(model, shape)
    assert accelerated.take_compile_seconds() > 0 and accelerated.take_compile_seconds() == 0
    assert accelerated(model, shape) is net, "the same network reuses its compiled module"
    x = torch.rand(8, *splits.info.input_shape).contiguous(memory_format=torch.channels_last)
    assert torch.allclose(net.eval()(x), model.eval()(x), atol=1e-4)
    stats = train_epoch(net, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), batches)
    assert stats.accuracy > 0.2
    other = seed_model(splits)
    assert accelerated(other, shape) is not net and accelerated.take_compile_seconds() > 0
