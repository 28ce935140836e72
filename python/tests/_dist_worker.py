"""One rank of test_distributed.py's runs: ``_dist_worker.py KIND RANK WORLD OUT`` (with
MASTER_ADDR and MASTER_PORT set; KIND ``thor`` or ``pre``, ``-cuda`` appended for a model
on the GPU) trains the shared model under DistributedDataParallel
with a gloo group and saves its parameters and optimizer state to OUT."""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist_common import BATCH, COLLECTIVES, make_model, train  # noqa: E402


def main() -> None:
    kind, rank, world, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    # KIND-cuda: the model (and so the optimizer's state) on the GPU.
    kind, on_cuda = kind.removesuffix("-cuda"), kind.endswith("-cuda")
    model = make_model().to("cuda" if on_cuda else "cpu")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    per = BATCH // world
    state = train(kind, model, ddp, slice(rank * per, (rank + 1) * per), process_group=dist.group.WORLD)
    engines = {i: bytes(t.numpy()) for i, t in state.get("thor", {}).get("engines", {}).items()}
    torch.save({"params": [p.detach().cpu().clone() for p in model.parameters()], "engines": engines,
                "collectives": COLLECTIVES.get("calls", 0)}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
