"""Which block size? THOR's block-diagonal approximation loses information as the blocks get
smaller and costs time as they get larger; this measures both on real factors and
recommends a block size.

    python python/examples/choose_block.py [--model autoencoder|resnet|both] [--device cpu|cuda]

For each model (the K-FAC papers' MNIST deep autoencoder 784-1000-500-250-30-250-500-1000-784,
and the small ResNet of train_mnist.py), trained for a few epochs with THOR on the bundled
MNIST subset, it gathers every layer's full Kronecker factors A (inputs, with a ones column
for a bias; a conv layer's patches) and G (per-example output gradients) over a batch of
training images, and the layer's gradient, in float64. For b in 32, 64, 128, 256 it reports:

- off-block share: the part of each factor's Frobenius norm outside its diagonal blocks,
  ``||F - blockdiag_b(F)|| / ||F||`` (0: nothing lost), the mean over A and G of all layers
  weighted by their squared norms;
- gradient error: how far THOR's preconditioned gradient with block-diagonal damped
  inverses is from the one with the full damped inverses,
  ``||Gb^-1 grad Ab^-1 - G^-1 grad A^-1|| / ||G^-1 grad A^-1||`` over all layers together
  (damping ``sqrt(damping)`` added to each factor, as the optimizer does), and the cosine
  between the two (1: the same direction);
- time: inverting every block of every factor (one batched call) and applying every layer's
  preconditioner, on the chosen backend (median of ``--reps``), through the library.

It recommends the fastest b whose gradient error is within ``--tolerance`` of the smallest
error measured, and says why.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_mnist import DATA, load, resnet  # noqa: E402

from thor_kernels import ops  # noqa: E402
from thor_kernels.torch import THOR  # noqa: E402

BLOCKS = (32, 64, 128, 256)


def autoencoder() -> torch.nn.Module:
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers, torch.nn.Sigmoid())


def loss_of(name, model, x, y):
    if name == "autoencoder":
        flat = x.flatten(1) * 0.3081 + 0.1307  # back to [0, 1] pixels
        return F.binary_cross_entropy(model(flat), flat, reduction="sum") / x.shape[0]
    return F.cross_entropy(model(x), y)


def train(name, model, xtr, ytr, epochs, batch=64):
    # The autoencoder's loss is summed over 784 pixels: a tighter KL clip (at 1e-2 it diverged).
    opt = THOR(model, lr=0.05 if name == "resnet" else 0.01, momentum=0.9, damping=0.03, interval=10, block=128,
               kl_clip=1e-2 if name == "resnet" else 1e-3)
    g = torch.Generator().manual_seed(2)
    for epoch in range(epochs):
        order = torch.randperm(len(xtr), generator=g)
        total = 0.0
        for i in range(len(xtr) // batch):
            idx = order[i * batch:(i + 1) * batch]
            opt.zero_grad()
            loss = loss_of(name, model, xtr[idx], ytr[idx])
            loss.backward()
            opt.step()
            total += loss.item()
        print(f"  {name} training epoch {epoch + 1}: loss {total / (len(xtr) // batch):.4f}", flush=True)
    opt.remove_hooks()


def gather(name, model, x, y):
    """Per layer: (name, A, G, gradient [out, in (+1)]) in float64, from one batch."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    rec = {}

    def fwd(m, inputs, out):
        rec[m] = [inputs[0].detach(), None]
        out.register_hook(lambda g, m=m: rec[m].__setitem__(1, g.detach()))

    handles = [m.register_forward_hook(fwd) for _, m in layers]
    model.zero_grad()
    loss_of(name, model, x, y).backward()
    for h in handles:
        h.remove()
    n = x.shape[0]
    out = []
    for lname, m in layers:
        a, g = rec[m]
        if isinstance(m, torch.nn.Conv2d):
            cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            a = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            g = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
        a, g = a.double(), (g * n).double()
        grad = m.weight.grad.reshape(m.weight.shape[0], -1).double()
        if m.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
            grad = torch.cat([grad, m.bias.grad.double().reshape(-1, 1)], 1)
        rows = a.shape[0]
        out.append((lname, a.T @ a / rows, g.T @ g / rows, grad))
    return out


def blockdiag(f, b):
    out = torch.zeros_like(f)
    for j in range(0, f.shape[0], b):
        k = min(j + b, f.shape[0])
        out[j:k, j:k] = f[j:k, j:k]
    return out


def damped_inverse(f, s, b=None):
    d = f.shape[0]
    if b is None or b >= d:
        return torch.linalg.inv(f + s * torch.eye(d, dtype=f.dtype))
    out = torch.zeros_like(f)
    for j in range(0, d, b):
        k = min(j + b, d)
        out[j:k, j:k] = torch.linalg.inv(f[j:k, j:k] + s * torch.eye(k - j, dtype=f.dtype))
    return out


def information(factors, damping):
    """Per b: (off-block share, gradient error, cosine between the block-diagonal and the
    full preconditioned gradient) over all layers."""
    s = math.sqrt(damping)
    full = [damped_inverse(g, s) @ grad @ damped_inverse(a, s) for _, a, g, grad in factors]
    norm2 = sum(u.square().sum().item() for u in full)
    fnorm2 = sum(a.square().sum().item() + g.square().sum().item() for _, a, g, _ in factors)
    out = {}
    for b in BLOCKS:
        off2 = sum((a - blockdiag(a, b)).square().sum().item() + (g - blockdiag(g, b)).square().sum().item()
                   for _, a, g, _ in factors)
        ub = [damped_inverse(g, s, b) @ grad @ damped_inverse(a, s, b) for _, a, g, grad in factors]
        err2 = sum((v - u).square().sum().item() for v, u in zip(ub, full))
        dot = sum((v * u).sum().item() for v, u in zip(ub, full))
        cos = dot / math.sqrt(sum(v.square().sum().item() for v in ub) * norm2)
        out[b] = (math.sqrt(off2 / fnorm2), math.sqrt(err2 / norm2), cos)
    return out


def timing(factors, damping, device, reps):
    """Per b: (inversion ms, apply ms, blocks that needed more damping), medians, every
    factor of every layer."""
    s = math.sqrt(damping)
    out = {}
    for b in BLOCKS:
        dense = [f.float().to(device) for _, a, g, _ in factors for f in (a, g)]
        blocks = torch.cat([ops.split(f, b) for f in dense])
        grads = [grad.float().to(device).contiguous() for *_, grad in factors]
        inv_t, app_t = [], []
        inv, retried = None, 0
        for _ in range(reps):
            t0 = time.perf_counter()
            inv, info, _ = ops.invert(blocks, s, retry=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            inv_t.append(time.perf_counter() - t0)
            retried = int(info.ne(0).sum())
            # Each layer's inverse blocks, A then G, back to back as split them.
            k, per_layer = 0, []
            for f in dense:
                nb = -(-f.shape[0] // b)
                per_layer.append(inv[k:k + nb])
                k += nb
            t0 = time.perf_counter()
            for i, grad in enumerate(grads):
                ops.apply(grad, per_layer[2 * i + 1].contiguous(), per_layer[2 * i].contiguous())
            if device.type == "cuda":
                torch.cuda.synchronize()
            app_t.append(time.perf_counter() - t0)
        out[b] = (1e3 * statistics.median(inv_t), 1e3 * statistics.median(app_t), retried)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="both", choices=["autoencoder", "resnet", "both"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--train-epochs", type=int, default=2, help="THOR epochs before the factors are taken")
    ap.add_argument("--samples", type=int, default=1000, help="training images the factors are gathered over")
    ap.add_argument("--damping", type=float, default=0.03)
    ap.add_argument("--tolerance", type=float, default=0.05,
                    help="gradient error allowed above the smallest measured")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    xtr, ytr, _, _ = load(DATA)
    names = ["autoencoder", "resnet"] if args.model == "both" else [args.model]
    for name in names:
        torch.manual_seed(0)
        model = autoencoder() if name == "autoencoder" else resnet()
        print(f"{name}: training {args.train_epochs} epochs with THOR (b = 128) ...", flush=True)
        train(name, model, xtr, ytr, args.train_epochs)
        factors = gather(name, model, xtr[:args.samples], ytr[:args.samples])
        dims = sorted({f.shape[0] for _, a, g, _ in factors for f in (a, g)})
        print(f"{name}: {len(factors)} layers, factor sizes {dims}, over {args.samples} images", flush=True)
        info = information(factors, args.damping)
        times = timing(factors, args.damping, device, args.reps)
        best = min(e for _, e, _ in info.values())
        ok = [b for b in BLOCKS if info[b][1] <= best + args.tolerance]
        total = {b: times[b][0] + times[b][1] for b in BLOCKS}
        pick = min(ok, key=lambda b: total[b])
        print(f"\n{name}, damping {args.damping}, {device}:")
        print("| b | off-block share | gradient error | cosine to full | invert ms | apply ms | total ms | "
              "blocks retried |")
        print("|---|---|---|---|---|---|---|---|")
        for b in BLOCKS:
            (off, err, cos), (ti, ta, retried) = info[b], times[b]
            print(f"| {b} | {off:.3f} | {err:.3f} | {cos:.3f} | {ti:.2f} | {ta:.2f} | {ti + ta:.2f} | {retried} |")
        err_pick, t_pick = info[pick][1], total[pick]
        lossy = [str(b) for b in BLOCKS if b not in ok]
        faster = [b for b in ok if b != pick]
        why = (f"the fastest of {', '.join(map(str, ok))} (" + ", ".join(
            f"{total[b] / t_pick:.1f}x the time at b = {b}" for b in faster) + ")") if faster else \
            "the only one within the tolerance"
        print(f"recommended b = {pick}: gradient error {err_pick:.3f} (smallest measured {best:.3f}, tolerance "
              f"{args.tolerance}), {t_pick:.2f} ms per inversion and apply, {why}"
              + (f"; b = {', '.join(lossy)} lose more than the tolerance" if lossy else "") + ".\n", flush=True)


if __name__ == "__main__":
    main()
