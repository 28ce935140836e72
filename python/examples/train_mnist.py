"""A small ResNet-style CNN on the bundled 5,000-image MNIST subset, trained with THOR
(``thor_kernels.torch.THOR``), ``torch.optim.SGD`` (momentum) and ``torch.optim.AdamW`` on the
same batches from the same initial weights.

    pip install dist/thor_kernels-*.whl tqdm matplotlib   # tqdm, matplotlib: optional
    python python/examples/train_mnist.py [--device cpu|cuda] [--epochs 10] [--plot mnist.png]

Prints per-epoch training loss and test accuracy, then a table: epochs and seconds to the
target test accuracy, time per step and the final accuracy; draws the test accuracy against
epochs and against seconds (with matplotlib, when it is installed). The split is fixed and
stratified: 400 training and 100 test images of each digit.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from thor_kernels.torch import THOR

try:
    from tqdm import tqdm
except ImportError:  # a plain counter instead of a progress bar
    tqdm = None

DATA = Path(__file__).resolve().parents[2] / "data" / "mnist5k" / "mnist_5k.csv.gz"


def load(path: Path):
    rows = torch.tensor([[int(v) for v in line.split(",")] for line in gzip.open(path, "rt") if line.strip()])
    x, y = rows[:, :784].float().div_(255.0).reshape(-1, 1, 28, 28), rows[:, 784]
    x = (x - 0.1307) / 0.3081
    g = torch.Generator().manual_seed(0)
    train, test = [], []
    for digit in range(10):
        idx = (y == digit).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        train.append(idx[:400])
        test.append(idx[400:500])
    train, test = torch.cat(train), torch.cat(test)
    return x[train], y[train], x[test], y[test]


class Block(torch.nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)
        self.c2, self.b2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


def resnet() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        Block(16),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        Block(32),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))


def accuracy(model, x, y, device) -> float:
    model.eval()
    with torch.no_grad():
        right = sum((model(x[i:i + 500].to(device)).argmax(1).cpu() == y[i:i + 500]).sum().item()
                    for i in range(0, len(x), 500))
    model.train()
    return right / len(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--sgd-lr", type=float, default=0.05)
    ap.add_argument("--adamw-lr", type=float, default=2e-3)
    ap.add_argument("--thor-lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--target", type=float, default=0.97, help="test accuracy the table times")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--plot", default="mnist_optimizers.png", help="where to draw the curves ('' for none)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    xtr, ytr, xte, yte = load(DATA)
    steps_per_epoch = len(xtr) // args.batch
    g = torch.Generator().manual_seed(1)
    orders = [torch.randperm(len(xtr), generator=g) for _ in range(args.epochs)]
    torch.manual_seed(0)
    init = resnet()

    optimizers = {
        "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=args.sgd_lr, momentum=0.9, weight_decay=5e-4),
        "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=args.adamw_lr, weight_decay=5e-4),
        "THOR": lambda m: THOR(m, lr=args.thor_lr, momentum=0.9, weight_decay=5e-4, damping=0.03, interval=20, block=128,
                               kl_clip=1e-2, steps_per_epoch=steps_per_epoch),
    }
    results = {}
    for name, make in optimizers.items():
        model = copy.deepcopy(init).to(device)
        opt = make(model)
        # The same schedule for all: cosine decay of the learning rate over the run.
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
        curve, seconds, elapsed, steps = [], [], 0.0, 0
        bar = tqdm(total=args.epochs * steps_per_epoch, desc=f"{name:>5}", unit="step",
                   disable=None) if tqdm else None
        for epoch in range(args.epochs):
            start = time.perf_counter()
            total = 0.0
            for i in range(steps_per_epoch):
                idx = orders[epoch][i * args.batch:(i + 1) * args.batch]
                x, y = xtr[idx].to(device), ytr[idx].to(device)
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item()
                steps += 1
                if bar:
                    bar.update()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - start
            acc = accuracy(model, xte, yte, device)
            curve.append(acc)
            seconds.append(elapsed)
            line = f"{name:>5} epoch {epoch + 1}: train loss {total / steps_per_epoch:.4f}, test accuracy {100 * acc:.1f}%"
            if bar:
                bar.write(line)
            else:
                print(line, flush=True)
        if bar:
            bar.close()
        hit = next((e for e, a in enumerate(curve) if a >= args.target), None)
        results[name] = dict(curve=curve, seconds=seconds, step_ms=1e3 * elapsed / steps,
                             epochs_to=None if hit is None else hit + 1,
                             seconds_to=None if hit is None else seconds[hit])

    print(f"\nResNet-style CNN, MNIST 4,000 train / 1,000 test, batch {args.batch}, {args.epochs} epochs, "
          f"{device}:")
    print(f"{'optimizer':>9} | {'epochs to ' + format(args.target, '.0%'):>16} | {'seconds to it':>13} | "
          f"{'ms / step':>9} | {'final accuracy':>14}")
    for name, r in results.items():
        ep = "-" if r["epochs_to"] is None else str(r["epochs_to"])
        sec = "-" if r["seconds_to"] is None else f"{r['seconds_to']:.1f}"
        print(f"{name:>9} | {ep:>16} | {sec:>13} | {r['step_ms']:>9.2f} | {100 * r['curve'][-1]:>13.1f}%")

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot")
            return
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for name, r in results.items():
            epochs = list(range(1, len(r["curve"]) + 1))
            a.plot(epochs, [100 * v for v in r["curve"]], marker="o", label=name)
            b.plot(r["seconds"], [100 * v for v in r["curve"]], marker="o", label=name)
        for ax, xl in ((a, "epoch"), (b, "seconds of training")):
            ax.set_xlabel(xl)
            ax.set_ylabel("test accuracy (%)")
            ax.axhline(100 * args.target, color="grey", linestyle=":")
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
