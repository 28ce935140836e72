"""The model, data and training loop shared by test_distributed.py and the ranks it starts
(_dist_worker.py): the same run on one process and on several."""

from __future__ import annotations

import torch
import torch.nn.functional as F

BATCH = 12
STEPS = 4


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 5))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 1, 6, 6, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def make_optimizer(kind: str, model: torch.nn.Module, process_group=None):
    """``(step function, state function)`` of THOR or of ThorPreconditioner + SGD."""
    from thor_kernels.torch import THOR, ThorPreconditioner
    settings = dict(block=32, interval=1, damping=0.03, stat_decay=0.5)
    if kind == "thor":
        opt = THOR(model, lr=0.1, momentum=0.9, process_group=process_group, **settings)
        COLLECTIVES["engines"] = opt._engines

        def state():
            sd = opt.state_dict()
            # Loading it back is a collective too, and changes nothing.
            opt.load_state_dict(sd)
            again = opt.state_dict()
            assert all(bytes(a.numpy()) == bytes(b.numpy())
                       for a, b in zip(sd["thor"]["engines"].values(), again["thor"]["engines"].values()))
            return sd
        return opt.zero_grad, opt.step, state
    pre = ThorPreconditioner(model, damping_decay=1.0, process_group=process_group, **settings)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def zero():
        sgd.zero_grad()
        pre.zero_grad()

    def step():
        pre.step()
        sgd.step()
    return zero, step, lambda: {}


# The last THOR optimizer's engines, and the collectives its engines ran in training.
COLLECTIVES: dict = {}


def train(kind: str, model: torch.nn.Module, forward, rows: slice, process_group=None):
    """STEPS steps on rows ``rows`` of each batch; ``forward`` runs the model (a DDP wrapper
    averages the gradients over the ranks). Returns the optimizer's state dict; leaves the
    number of collectives the steps ran (before the state dict's) in COLLECTIVES["calls"]."""
    COLLECTIVES.clear()
    zero, step, state = make_optimizer(kind, model, process_group)
    device = next(model.parameters()).device
    for k in range(STEPS):
        x, y = (t.to(device) for t in batch(k))
        zero()
        F.cross_entropy(forward(x[rows]), y[rows]).backward()
        step()
    COLLECTIVES["calls"] = sum(e.collectives.calls for e in COLLECTIVES.get("engines", {}).values()
                               if e.collectives is not None)
    return state()
