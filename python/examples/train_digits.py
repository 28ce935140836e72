"""Trains a small MLP on the bundled 8x8 digits with torch's own SGD (momentum) on gradients
that ThorPreconditioner preconditions in place: THOR beside an optimizer you keep.

    python python/examples/train_digits.py"""

import gzip
from pathlib import Path

import torch

from thor_kernels.torch import ThorPreconditioner

root = Path(__file__).resolve().parents[2]
rows = [list(map(int, l.split(","))) for l in gzip.open(root / "data/digits/digits.csv.gz", "rt") if l.strip()]
data = torch.tensor(rows, dtype=torch.float32)
x, y = data[:, :64] / 16.0, data[:, 64].long()
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(42))
x, y = x[perm], y[perm]
xtr, ytr, xte, yte = x[:1438], y[:1438], x[1438:], y[1438:]

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
pre = ThorPreconditioner(model, block=128, interval=10, damping=0.1, kl_clip=1e-3)
opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
steps = 0
for epoch in range(5):
    for idx in torch.randperm(len(xtr)).split(32):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        pre.step(epoch + steps / 45, lr=0.03)  # precondition .grad in place
        opt.step()
        steps += 1
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    print(f"epoch {epoch + 1}: test accuracy {100 * acc:.1f}%")
print("layer 0 counters:", pre.counters(0))
