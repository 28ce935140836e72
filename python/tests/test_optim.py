"""thor_kernels.torch.THOR as a torch.optim.Optimizer: its step against THOR written out with
torch, the plain update against torch.optim.SGD, state_dict resume, LR schedulers,
GradScaler, eval / no_grad, gradient accumulation, layers called twice, frozen biases,
padding modes, hooks, and bad input (a clear exception, nothing changed)."""

import copy
import gc
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from _reference import preconditioned, rel_err
from thor_kernels import LibraryNotFoundError, ThorError
from thor_kernels.torch import THOR, Decision

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def mlp(seed=0, bias=True):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 40, bias=bias), torch.nn.Tanh(), torch.nn.Linear(40, 4, bias=bias))


def batch(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def plain_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def train(model, opt, steps, seed=10, n=16):
    for s in range(steps):
        plain_step(model, opt, *batch(seed + s, n))


def assert_steps_as_plain(variant, exact=True, steps=3):
    """Trains twin models, one with plain steps and one with ``variant(model, opt, x, y, s)``
    on the same batches; their parameters must agree (bit for bit when ``exact``)."""
    a, b = mlp(), mlp()
    oa, ob = THOR(a, lr=0.1, interval=1, block=32), THOR(b, lr=0.1, interval=1, block=32)
    for s in range(steps):
        x, y = batch(s)
        plain_step(a, oa, x, y)
        variant(b, ob, x, y, s)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q) if exact else torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    return b, ob


def first_step_reference(model, x, y, lr, damping, b):
    """THOR's first step (momentum 0) on an MLP, written out: the layers' inputs and
    per-example output gradients recorded by hand, then ``p - lr G^-1 grad A^-1``."""
    ref = copy.deepcopy(model)
    acts, outs = [], []
    h = x
    for m in ref:
        if isinstance(m, torch.nn.Linear):
            acts.append(h.detach())
            h = m(h)
            h.retain_grad()
            outs.append(h)
        else:
            h = m(h)
    F.cross_entropy(h, y).backward()
    want = []
    for m, a, o in zip([m for m in ref if isinstance(m, torch.nn.Linear)], acts, outs):
        rows = torch.cat([a, torch.ones(a.shape[0], 1)], 1)
        full = torch.cat([m.weight.grad, m.bias.grad.reshape(-1, 1)], 1)
        d = preconditioned(full, rows, o.grad * x.shape[0], damping, b)
        new = torch.cat([m.weight.detach(), m.bias.detach().reshape(-1, 1)], 1).double() - lr * d
        want += [new[:, :-1], new[:, -1]]
    return want


@pytest.mark.parametrize("b", [32, 64])
def test_first_step_is_thor_written_out(b):
    """One step preconditions every Linear's gradient with its damped block-diagonal inverse
    factors (G of the first layer and A of the second, 40 and 41 wide, in two blocks at
    b = 32 and one at b = 64) and moves by -lr times it."""
    model = mlp()
    x, y = batch()
    want = first_step_reference(model, x, y, lr=0.1, damping=0.05, b=b)
    opt = THOR(model, lr=0.1, momentum=0.0, damping=0.05, block=b, interval=5)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for p, w in zip(model.parameters(), want):
        assert rel_err(p.detach(), w) < 1e-5
    st = opt.layer_state(model[0])
    assert st["statistics"] == 1 and st["updates"] == 1 and st["decision"] is Decision.UPDATE
    assert opt.layers == [model[0], model[2]]


def test_other_parameters_get_torch_sgd():
    """Parameters outside Linear / Conv2d layers, and excluded layers, get exactly
    torch.optim.SGD's update (momentum, weight decay)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    twin = copy.deepcopy(model)
    opt = THOR(model, lr=0.05, momentum=0.9, weight_decay=1e-3, interval=2, block=32, exclude=[model[2]])
    ref = torch.optim.SGD([twin[1].weight, twin[1].bias, twin[2].weight, twin[2].bias], lr=0.05, momentum=0.9,
                          weight_decay=1e-3, foreach=False)
    for s in range(4):
        x, y = batch(s)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        for name in ("1.weight", "1.bias", "2.weight", "2.bias"):
            assert torch.equal(dict(model.named_parameters())[name], dict(twin.named_parameters())[name]), name
        twin[0].load_state_dict(model[0].state_dict())  # the preconditioned layer differs, by design
    assert opt.layers == [model[0]]


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_resumes_bit_exact(device):
    """Saving after 7 steps (statistics every 3, averaged statistics, momentum) and loading
    into a fresh model and optimizer continues exactly as the run that did not stop."""
    def make():
        model = mlp().to(device)
        return model, THOR(model, lr=0.1, momentum=0.9, weight_decay=1e-4, damping=0.05, damping_decay=0.5,
                           damping_every=1.0, steps_per_epoch=4, stat_decay=0.5, interval=3, block=32, kl_clip=1e-2)

    def run(model, opt, steps, start):
        for s in range(start, start + steps):
            x, y = batch(s)
            opt.zero_grad()
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()

    model, opt = make()
    run(model, opt, 7, 0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run(model, opt, 8, 7)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2 = make()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    run(model2, opt2, 8, 7)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt.layer_state(model[0]) == opt2.layer_state(model2[0])


def test_a_damaged_state_dict_changes_nothing():
    model, x = mlp(), batch()[0]
    opt = THOR(model, interval=1, block=32)
    train(model, opt, 2)
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["thor"]["engines"][0] = bad["thor"]["engines"][0][:100]
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ThorError, match="INVALID_ARGUMENT"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert torch.equal(after["thor"]["engines"][0], before["thor"]["engines"][0])
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k]["momentum_buffer"], v["momentum_buffer"])
    with pytest.raises(ValueError, match="'thor'"):
        opt.load_state_dict({k: v for k, v in sd.items() if k != "thor"})


def test_lr_schedulers_drive_the_step():
    """A scheduler's lr is the lr of the step: lr 0.2 halved by LambdaLR steps as lr 0.1."""
    a, b = mlp(), mlp()
    oa = THOR(a, lr=0.2, interval=2, block=32, kl_clip=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(oa, lambda step: 0.5)
    ob = THOR(b, lr=0.1, interval=2, block=32, kl_clip=1e-3)
    for s in range(5):
        for m, o in ((a, oa), (b, ob)):
            x, y = batch(s)
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        sched.step()
    assert oa.param_groups[0]["lr"] == pytest.approx(0.1)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_grad_scaler_unscales_statistics_and_skipped_steps_record_none():
    """With a GradScaler the statistics are those of the unscaled loss (the run equals the
    run without scaling), and a step the scaler skips (an infinite loss) adds none."""
    plain, scaled = mlp(), mlp()
    op = THOR(plain, lr=0.1, interval=1, block=32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    os_ = THOR(scaled, lr=0.1, interval=1, block=32, grad_scaler=scaler)
    for s in range(4):
        x, y = batch(s)
        op.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        op.step()
        os_.zero_grad()
        loss = F.cross_entropy(scaled(x), y)
        if s == 2:
            # An overflowing step: the scaler skips it; its statistics must not count.
            os_.zero_grad()
            scaler.scale(loss * float("inf")).backward()
            scaler.step(os_)
            scaler.update()
            os_.zero_grad()
            loss = F.cross_entropy(scaled(x), y)
        scaler.scale(loss).backward()
        scaler.step(os_)
        scaler.update()
    for p, q in zip(plain.parameters(), scaled.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert os_.layer_state(scaled[0])["statistics"] == 4


def test_eval_and_no_grad_record_no_statistics():
    def variant(b, ob, x, y, s):
        ob.zero_grad()
        b.eval()
        F.cross_entropy(b(batch(50 + s)[0]), y).backward()  # eval mode, gradients on: no statistics
        ob.zero_grad()
        b.train()
        with torch.no_grad():
            b(batch(60 + s)[0])
        F.cross_entropy(b(x), y).backward()
        with torch.no_grad():
            b(batch(70 + s)[0])  # a validation pass between backward and step
        ob.step()

    assert_steps_as_plain(variant)


def test_gradient_accumulation_uses_every_micro_batch():
    """Two micro-batches of 8 (each mean loss halved) step as one batch of 16."""
    def variant(b, ob, x, y, s):
        ob.zero_grad()
        for part in (slice(0, 8), slice(8, 16)):
            (F.cross_entropy(b(x[part]), y[part]) / 2).backward()
        ob.step()

    assert_steps_as_plain(variant, exact=False)


def test_a_layer_called_twice_uses_the_rows_of_both_calls():
    """A layer applied twice in one forward: its factors hold the rows of both calls, each
    paired with its own output gradient."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 5)
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
    x, y = torch.randn(12, 5), torch.randint(0, 5, (12,))
    ref = copy.deepcopy(lin)
    h1 = ref(x)
    h1.retain_grad()
    z = torch.tanh(h1)
    h2 = ref(z)
    h2.retain_grad()
    F.cross_entropy(h2, y).backward()
    ones = torch.ones(12, 1)
    a = torch.cat([torch.cat([x, ones], 1), torch.cat([z.detach(), ones], 1)])
    g = torch.cat([h1.grad, h2.grad]) * 12
    full = torch.cat([ref.weight.grad, ref.bias.grad.reshape(-1, 1)], 1)
    want = torch.cat([ref.weight.detach(), ref.bias.detach().reshape(-1, 1)], 1).double() - 0.1 * preconditioned(
        full, a, g, 0.05, 32)
    opt = THOR(model, lr=0.1, momentum=0.0, damping=0.05, block=32, interval=1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    got = torch.cat([lin.weight.detach(), lin.bias.detach().reshape(-1, 1)], 1)
    assert rel_err(got, want) < 1e-5
    assert len(opt.layers) == 1


def test_a_frozen_bias_is_left_out_of_the_factors():
    """A bias with requires_grad=False: no crash, the bias stays, the weight is
    preconditioned with the factor of the inputs alone (no ones column)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4))
    model[0].bias.requires_grad_(False)
    bias = model[0].bias.detach().clone()
    x, y = batch()
    ref = copy.deepcopy(model)
    out = ref(x)
    out.retain_grad()
    F.cross_entropy(out, y).backward()
    want = ref[0].weight.detach().double() - 0.1 * preconditioned(ref[0].weight.grad, x, out.grad * 16, 0.05, 32)
    opt = THOR(model, lr=0.1, momentum=0.0, damping=0.05, block=32, interval=1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert rel_err(model[0].weight.detach(), want) < 1e-5
    assert torch.equal(model[0].bias, bias)


def test_conv_models_train_and_channels_last_matches():
    def run(fmt):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), torch.nn.ReLU(),
                                    torch.nn.Conv2d(4, 4, 3, stride=2), torch.nn.Flatten(),
                                    torch.nn.Linear(16, 3)).to(memory_format=fmt)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(32, 1, 6, 6, generator=g).to(memory_format=fmt)
        y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
        opt = THOR(model, lr=0.1, interval=2, block=32, damping=0.1, kl_clip=1e-2)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return model, opt, losses

    model, opt, losses = run(torch.contiguous_format)
    assert losses[-1] < 0.5 * losses[0]
    assert opt.layer_state(model[0])["statistics"] == 15
    _, _, cl = run(torch.channels_last)
    assert cl == pytest.approx(losses, rel=1e-3)


def test_hooks_belong_to_one_optimizer_at_a_time():
    model = mlp()
    opt = THOR(model, block=32)
    with pytest.raises(ValueError, match="already hooked"):
        THOR(model, block=32)
    opt.remove_hooks()
    opt2 = THOR(model, block=32, interval=1)
    del opt2
    gc.collect()
    opt3 = THOR(model, block=32, interval=1)  # the dropped optimizer's hooks went with it
    train(model, opt3, 1)
    assert opt3.layer_state(model[0])["statistics"] == 1
    torch.save(model, io.BytesIO())  # a hooked model still pickles


def test_nan_gradients_raise_and_change_nothing():
    model = mlp()
    opt = THOR(model, lr=0.1, interval=1, block=32)
    before = params(model)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    model[2].bias.grad[1] = float("nan")
    with pytest.raises(FloatingPointError, match="'2.bias'"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.layer_state(model[0])["statistics"] == 0 and not opt.state


def test_a_parameter_on_another_device_raises_and_changes_nothing():
    model = mlp()
    opt = THOR(model, lr=0.1, interval=1, block=32)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    model[2].to("meta")  # moved after the optimizer was made
    before = params(model[0])
    with pytest.raises(ValueError, match="'2.weight' is on meta"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), before))
    assert opt.layer_state(model[0])["statistics"] == 0


def test_bad_settings_and_layers_raise_clear_errors():
    model = mlp()
    with pytest.raises(ValueError, match="block"):
        THOR(model, block=48)
    with pytest.raises(ValueError, match="interval"):
        THOR(model, interval=0)
    with pytest.raises(ValueError, match="damping_decay"):
        THOR(model, damping_decay=1.5)
    with pytest.raises(ValueError, match="conv_norm"):
        THOR(model, conv_norm="sample")
    grouped = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="groups=2.*exclude"):
        THOR(grouped)
    opt = THOR(grouped, block=32, exclude=[grouped[0]])
    assert opt.layers == [grouped[2]]
    # The damping schedule needs to know the epoch.
    opt = THOR(model, block=32, damping_decay=0.5)
    F.cross_entropy(model(batch()[0]), batch()[1]).backward()
    before = params(model)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.set_epoch(1.5)
    opt.step()
    # Engine settings are fixed once the group exists; lr is not.
    opt.param_groups[0]["damping"] = 0.5
    with pytest.raises(ValueError, match="damping changed"):
        opt.step()
    # Weight and bias in different groups.
    model = mlp()
    opt_groups = [{"params": [model[0].weight, model[2].weight, model[2].bias]}, {"params": [model[0].bias]}]
    with pytest.raises(ValueError, match="'0'.*different param groups"):
        THOR(model, opt_groups, block=32)


def test_param_groups_have_engines_of_their_own():
    model = mlp()
    groups = [{"params": model[0].parameters(), "interval": 1, "lr": 0.05},
              {"params": model[2].parameters(), "interval": 3}]
    opt = THOR(model, groups, lr=0.1, block=32)
    train(model, opt, 4)
    assert opt.layer_state(model[0])["statistics"] == 4
    assert opt.layer_state(model[2])["statistics"] == 2


def test_importing_needs_no_library_and_its_absence_is_explained():
    code = ("import thor_kernels, thor_kernels.torch as t, torch\n"
            "try:\n"
            "    t.THOR(torch.nn.Linear(2, 2))\n"
            "except thor_kernels.LibraryNotFoundError as e:\n"
            "    print('missing:', e)\n")
    env = dict(os.environ, THOR_KERNELS_LIB="/nonexistent/libthor_kernels_capi.so")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "missing:" in out and "pip wheel" in out
    assert issubclass(LibraryNotFoundError, ImportError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_model_steps_on_the_gpu_as_on_the_cpu():
    a, b = mlp(), mlp().cuda()
    oa = THOR(a, lr=0.1, interval=2, block=32, kl_clip=1e-2)
    ob = THOR(b, lr=0.1, interval=2, block=32, kl_clip=1e-2)
    for s in range(5):
        x, y = batch(s)
        for m, o, dev in ((a, oa, "cpu"), (b, ob, "cuda")):
            o.zero_grad()
            F.cross_entropy(m(x.to(dev)), y.to(dev)).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert q.is_cuda
        assert torch.allclose(p, q.cpu(), rtol=1e-3, atol=1e-5)
    assert oa.layer_state(a[0]) == ob.layer_state(b[0])


def test_zero_grad_between_forward_and_backward_keeps_the_statistics():
    """forward, zero_grad, backward, step (Lightning's order) steps as zero_grad first."""
    def variant(b, ob, x, y, s):
        loss = F.cross_entropy(b(x), y)
        ob.zero_grad()
        loss.backward()
        ob.step()

    b, ob = assert_steps_as_plain(variant)
    assert ob.layer_state(b[0])["statistics"] == 3


def test_failed_construction_and_group_additions_leave_nothing_behind():
    model = mlp()
    with pytest.raises(ValueError, match="nesterov"):
        THOR(model, [{"params": model.parameters(), "nesterov": True}], block=32)
    opt = THOR(model, [{"params": model[0].parameters()}], block=32)  # the failed one left no hooks
    with pytest.raises(ValueError, match="block"):
        opt.add_param_group({"params": model[2].parameters(), "block": 48})
    assert len(opt.param_groups) == 1 and opt.layers == [model[0]]
    opt.add_param_group({"params": model[2].parameters(), "block": 64})
    assert opt.layers == [model[0], model[2]]
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(opt)


def test_a_bad_lr_raises_before_anything_changes():
    model = mlp()
    opt = THOR(model, lr=0.1, interval=1, block=32, kl_clip=1e-2)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    before = params(model)
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr must be"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.layer_state(model[0])["statistics"] == 0
    opt.param_groups[0]["lr"] = 0.1
    opt.step()
    assert opt.layer_state(model[0])["statistics"] == 1


def test_loading_a_state_dict_of_other_settings_is_refused():
    a, b = mlp(), mlp()
    oa = THOR(a, damping=0.05, block=32, interval=1)
    train(a, oa, 1)
    ob = THOR(b, damping=0.01, block=32, interval=1)
    with pytest.raises(ValueError, match="damping is 0.05"):
        ob.load_state_dict(oa.state_dict())
    train(b, ob, 1)  # still usable


def test_an_input_modified_in_place_after_the_forward_is_refused():
    model = mlp()
    opt = THOR(model, lr=0.1, interval=1, block=32)
    x, y = batch()
    buf = x.clone()
    F.cross_entropy(model(buf), y).backward()
    buf.mul_(2.0)  # the recorded activations would change under the statistics
    with pytest.raises(RuntimeError, match="modified in place"):
        opt.step()
    assert opt.layer_state(model[0])["statistics"] == 0


def test_multihead_attention_projections_are_left_out():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.att = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.att(x, x, x)[0].mean(1))

    net = Net()
    opt = THOR(net, block=32, interval=1)
    assert opt.layers == [net.head]
    x = torch.randn(4, 5, 8)
    F.cross_entropy(net(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
