"""ThorPreconditioner: THOR's preconditioning of a model's gradients for a loop with its own
optimizer, against torch's own math."""

import math

import pytest
import torch

from _reference import preconditioned, rel_err
from thor_kernels.torch import ThorPreconditioner

def test_preconditioner_trains_a_small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    )
    x = torch.randn(64, 1, 6, 6)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    pre = ThorPreconditioner(model, block=32, interval=2, damping=0.1, kl_clip=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = None
    for step in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        raw = model[3].weight.grad.clone()
        pre.step(step / 10, lr=0.1)
        if step == 0:
            first = loss.item()
            assert not torch.equal(raw, model[3].weight.grad), "gradient was not preconditioned"
        opt.step()
    assert loss.item() < 0.5 * first
    c = pre.counters(0)
    assert c["statistics"] == 15 and c["updates"] >= 1


def test_kl_clip_scales_the_preconditioned_gradients():
    def run(kl_clip, lr=0.1):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        pre = ThorPreconditioner(model, block=32, interval=1, damping=0.1, kl_clip=kl_clip)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        raw = [p.grad.clone() for p in model.parameters()]
        pre.step(0.0, lr=lr)
        return pre, raw, [p.grad.clone() for p in model.parameters()]

    _, raw, free = run(0.0)
    pre, _, clipped = run(1e-6)
    f = pre.last_kl_clip_factor
    assert 0.0 < f < 1.0, f
    # The factor is K-FAC's: the clipped step's lr^2 * sum g . dW is exactly the bound.
    vg = sum((g.double() * d.double()).sum() for g, d in zip(raw, free)) * 0.1**2
    assert abs(f - min(1.0, (1e-6 / vg.item()) ** 0.5)) < 1e-5 * f
    for a, b in zip(clipped, free):
        assert torch.allclose(a, f * b, rtol=1e-5, atol=1e-8)
    # A loose clip leaves the gradients alone.
    pre, _, loose = run(1e6)
    assert pre.last_kl_clip_factor == 1.0
    assert all(torch.equal(a, b) for a, b in zip(loose, free))
    with pytest.raises(ValueError, match="learning rate"):
        run(1e-6, lr=None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_preconditioner_on_cuda_matches_the_cpu():
    """A model on the GPU is preconditioned on the GPU (state resident there, no host
    copies) with the same results as its copy on the CPU."""
    import copy

    torch.manual_seed(0)
    cpu_model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    )
    gpu_model = copy.deepcopy(cpu_model).cuda()
    x = torch.randn(32, 1, 6, 6)
    y = (x.mean((1, 2, 3)) > 0).long()
    pc = ThorPreconditioner(cpu_model, block=32, interval=1, damping=0.1)
    pg = ThorPreconditioner(gpu_model, block=32, interval=1, damping=0.1)
    assert pg.device.type == "cuda"
    for step in range(3):
        for model, xx, yy in ((cpu_model, x, y), (gpu_model, x.cuda(), y.cuda())):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(xx), yy).backward()
        pc.step(step / 10)
        pg.step(step / 10)
        for a, b in zip(cpu_model.parameters(), gpu_model.parameters()):
            assert b.grad.is_cuda
            assert torch.allclose(a.grad, b.grad.cpu(), rtol=1e-3, atol=1e-5), f"step {step}"
    for i in range(len(pc.layers)):
        assert pc.counters(i) == pg.counters(i)


def _conv_step(memory_format, conv_norm="position", seed=3):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 5, 3, stride=(2, 1), padding=1, dilation=(1, 2)).to(memory_format=memory_format)
    x = torch.randn(4, 3, 9, 8).to(memory_format=memory_format)
    pre = ThorPreconditioner(conv, block=32, interval=1, damping=0.05, conv_norm=conv_norm)
    conv(x).square().sum().backward()
    pre.step(0.0)
    return conv, x, [p.grad.clone() for p in conv.parameters()]


def test_conv_tensors_give_the_factors_of_the_unfolded_rows():
    """The library reads a convolution's patches from its input tensor: the preconditioned
    gradient equals THOR's on the explicit unfold rows (computed here with torch), NCHW
    and channels last alike; KFC's normalisation divides it by the output positions."""
    conv, x, got = _conv_step(torch.contiguous_format)
    _, _, got_cl = _conv_step(torch.channels_last)
    for a, b in zip(got, got_cl):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    # The reference: factors from unfold rows, damped block inverses (one block per factor
    # here: d_A = 3 * 9 + 1 <= 32, d_G = 5).
    conv2 = torch.nn.Conv2d(3, 5, 3, stride=(2, 1), padding=1, dilation=(1, 2))
    conv2.load_state_dict(conv.state_dict())
    out = conv2(x.contiguous())
    out.retain_grad()
    out.square().sum().backward()
    n = x.shape[0]
    cols = torch.nn.functional.unfold(x.contiguous(), 3, dilation=(1, 2), padding=1, stride=(2, 1))
    a = torch.cat([cols.transpose(1, 2).reshape(-1, 27), torch.ones(cols.shape[0] * cols.shape[2], 1)], 1).double()
    g = (out.grad * n).permute(0, 2, 3, 1).reshape(-1, 5).double()
    rows = a.shape[0]
    s = math.sqrt(0.05)
    A = a.T @ a / rows + s * torch.eye(28, dtype=torch.float64)
    G = g.T @ g / rows + s * torch.eye(5, dtype=torch.float64)
    full = torch.cat([conv2.weight.grad.reshape(5, -1), conv2.bias.grad.reshape(5, 1)], 1).double()
    want = torch.linalg.solve(G, full) @ torch.linalg.inv(A)
    err = (torch.cat([got[0].reshape(5, -1), got[1].reshape(5, 1)], 1).double() - want).norm() / want.norm()
    assert err < 1e-4, err
    _, _, kfc = _conv_step(torch.contiguous_format, conv_norm="kfc")
    assert not torch.allclose(kfc[0], got[0])
    with pytest.raises(ValueError, match="conv_norm"):
        ThorPreconditioner(conv, conv_norm="sample")


@pytest.mark.parametrize("padding,mode", [(1, "reflect"), (2, "circular"), ("same", "zeros"), (1, "replicate")])
def test_conv_padding_modes_use_the_padded_input(padding, mode):
    """Padding modes other than zeros (and string paddings) are applied to the recorded
    input, as Conv2d itself does: the factors are those of the padded input's patches."""
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(2, 3, 3, padding=padding, padding_mode=mode)
    x = torch.randn(3, 2, 6, 5)
    pre = ThorPreconditioner(conv, block=32, interval=1, damping=0.05)
    out = conv(x)
    out.retain_grad()
    out.square().sum().backward()
    full = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad.reshape(3, 1)], 1).clone()
    g = (out.grad * x.shape[0]).permute(0, 2, 3, 1).reshape(-1, 3)
    pre.step(0.0)
    pad = conv._reversed_padding_repeated_twice
    xp = torch.nn.functional.pad(x, pad, mode="constant" if mode == "zeros" else mode)
    cols = torch.nn.functional.unfold(xp, 3).transpose(1, 2).reshape(-1, 18)
    a = torch.cat([cols, torch.ones(cols.shape[0], 1)], 1)
    want = preconditioned(full, a, g, 0.05, 32)
    got = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad.reshape(3, 1)], 1)
    assert rel_err(got, want) < 1e-4


def test_remove_hooks_detaches_and_an_overflowed_scaled_step_is_skipped():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    pre = ThorPreconditioner(model, block=32, interval=1, damping_decay=1.0)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("inf")
    raw = model[0].weight.grad.clone()
    assert pre.step(grad_scale=2.0**16) is False  # as GradScaler would skip it
    assert torch.equal(model[0].weight.grad, raw) and pre.counters(0)["statistics"] == 0
    with pytest.raises(FloatingPointError, match="'0.weight'"):
        pre.step()
    pre.remove_hooks()
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    raw = model[0].weight.grad.clone()
    assert pre.step() is True
    assert torch.equal(model[0].weight.grad, raw) and pre.counters(0)["statistics"] == 0
