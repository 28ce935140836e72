"""THOR in data-parallel training: the ResNet-style CNN of ``train_mnist.py`` on the bundled
MNIST subset, under ``DistributedDataParallel`` on a gloo group (CPU), with
``THOR(..., process_group=...)``: every rank trains on its share of each batch, the
statistics of all shares are pooled, and every rank preconditions with the same inverses.

    python python/examples/train_ddp.py --ranks 2 [--epochs 3]    # starts the ranks itself
    torchrun --nproc_per_node 2 python/examples/train_ddp.py       # or under torchrun
    python python/examples/train_ddp.py --ranks 2 --device cuda    # rank r on GPU r % count

With ``--device cuda`` each rank's model and THOR state live on a GPU (rank r on GPU
r modulo the GPUs there are); the gradients and THOR's collectives still go through the gloo
group (host memory).

Rank 0 prints per-epoch loss and test accuracy and, at the end, the size of the optimizer
state (whole on every rank after ``state_dict()``); every rank checks that its parameters
equal rank 0's bit for bit. The global batch (``--batch``) is split evenly over the ranks;
THOR's statistics pool every rank's share, but the model's BatchNorm layers normalise each
share on its own (no SyncBatchNorm), so runs on different numbers of ranks differ by more
than rounding.

Across machines, use one process per machine (or per core group) with the usual
``MASTER_ADDR`` / ``MASTER_PORT`` / ``RANK`` / ``WORLD_SIZE`` variables (``torchrun --nnodes``).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_mnist import DATA, accuracy, load, resnet  # noqa: E402

from thor_kernels.torch import THOR  # noqa: E402


def train(rank: int, world: int, args) -> None:
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not a multiple of the {world} ranks")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    torch.set_num_threads(max(1, args.threads))
    xtr, ytr, xte, yte = load(DATA)
    local = args.batch // world
    steps_per_epoch = len(xtr) // args.batch
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        xtr, ytr = xtr.to(device), ytr.to(device)  # the test set moves in chunks
    torch.manual_seed(0)
    model = resnet().to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = THOR(model, lr=args.lr, momentum=0.9, weight_decay=5e-4, damping=0.03, interval=20, block=128,
               kl_clip=1e-2, steps_per_epoch=steps_per_epoch, process_group=dist.group.WORLD)
    g = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(xtr), generator=g).to(device)
        total = torch.zeros(1, device=device)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch:(i + 1) * args.batch][rank * local:(rank + 1) * local]
            opt.zero_grad()
            loss = F.cross_entropy(ddp(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            total += loss.detach()
        dist.all_reduce(total)
        acc = accuracy(model, xte, yte, device)
        if rank == 0:
            print(f"epoch {epoch + 1}: train loss {total.item() / world / steps_per_epoch:.4f}, "
                  f"test accuracy {100 * acc:.1f}% ({time.perf_counter() - start:.1f} s)", flush=True)
    # Every rank holds the same parameters, bit for bit (BatchNorm's running statistics are
    # buffers, synchronised by DDP at each forward, not compared here).
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    same = torch.tensor([int(torch.equal(flat, ref))], device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)  # every rank learns it, none is left waiting
    if not same.item():
        raise SystemExit(f"rank {rank}: the ranks' parameters differ")
    state = opt.state_dict()  # a collective: every rank calls it
    if rank == 0:
        size = sum(len(t) for t in state["thor"]["engines"].values())
        print(f"{world} ranks, parameters identical on every rank; THOR state {size / 1e6:.2f} MB, "
              f"whole on any rank", flush=True)
    dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(rank, world, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2, help="processes to start (ignored under torchrun)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="global batch, split evenly over the ranks")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where each rank's model and THOR state live (gloo moves the bytes either way)")
    args = ap.parse_args()
    if "RANK" in os.environ:  # torchrun (or another launcher) started this process
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    if args.ranks < 1:
        raise SystemExit("--ranks must be at least 1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(args.ranks, port, args), nprocs=args.ranks)


if __name__ == "__main__":
    main()
