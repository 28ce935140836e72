"""THOR with ``process_group=``: 2 to 4 processes on a gloo group (under
DistributedDataParallel, each with its share of every batch) end with the parameters of
one process trained on whole batches, and save the same, whole optimizer state."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _dist_common import STEPS, make_model, train

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(kind: str, world: int, tmp: Path) -> list[dict]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    outs = [tmp / f"rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(HERE / "_dist_worker.py"), kind, str(r), str(world), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r, out in enumerate(outs)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    return [torch.load(out, weights_only=True) for out in outs]


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_match_one_process_on_the_whole_batch(world, tmp_path):
    model = make_model()
    want_state = train("thor", model, model, slice(None))
    want = [p.detach() for p in model.parameters()]
    ranks = _run_ranks("thor", world, tmp_path)
    for r, got in enumerate(ranks):
        for i, (g, w) in enumerate(zip(got["params"], want)):
            assert _max_rel(g, w) < 1e-4, f"rank {r}, parameter {i}"
        # Every rank saves the same, whole state (statistics gathered by state_dict()).
        assert got["engines"] == ranks[0]["engines"], f"rank {r}"
        # The model's three layers (one param group, so one engine) observed together: at
        # most three collectives per statistics step (layer by layer two or three per layer).
        assert 2 * STEPS <= got["collectives"] <= 3 * STEPS, f"rank {r}: {got['collectives']} collectives"
    # That state holds the same statistics as the single process's (up to rounding): its
    # size and header agree, and loading it into a single-process optimizer works.
    from thor_kernels.torch import THOR
    single = bytes(want_state["thor"]["engines"][0].numpy())
    assert len(ranks[0]["engines"][0]) == len(single)
    opt = THOR(make_model(), lr=0.1, momentum=0.9, block=32, interval=1, damping=0.03, stat_decay=0.5)
    sd = dict(want_state)
    sd["thor"] = dict(want_state["thor"], engines={0: torch.frombuffer(bytearray(ranks[0]["engines"][0]),
                                                                       dtype=torch.uint8)})
    opt.load_state_dict(sd)


def test_the_preconditioner_on_ranks(tmp_path):
    model = make_model()
    train("pre", model, model, slice(None))
    want = [p.detach() for p in model.parameters()]
    for r, got in enumerate(_run_ranks("pre", 2, tmp_path)):
        for i, (g, w) in enumerate(zip(got["params"], want)):
            assert _max_rel(g, w) < 1e-4, f"rank {r}, parameter {i}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ranks_with_models_on_cuda_match_one_process_on_the_cpu(tmp_path):
    # The optimizer's state on the GPU, the collectives through gloo on host memory.
    model = make_model()
    train("thor", model, model, slice(None))
    want = [p.detach() for p in model.parameters()]
    ranks = _run_ranks("thor-cuda", 2, tmp_path)
    for r, got in enumerate(ranks):
        for i, (g, w) in enumerate(zip(got["params"], want)):
            assert _max_rel(g, w) < 1e-3, f"rank {r}, parameter {i}"
        assert got["engines"] == ranks[0]["engines"], f"rank {r}"


def test_a_layer_missing_on_another_rank_is_left_out_everywhere():
    # The decision logic alone, with a fake group in which another rank has no calls for
    # the second layer: that layer is not observed here either.
    from types import SimpleNamespace
    from thor_kernels.torch import _Hooks

    class FakeDist:
        class ReduceOp:
            MIN = "min"

        @staticmethod
        def all_reduce(t, op, group):
            assert op == "min" and group == "g" and t.tolist() == [1, 1, 0, 0]
            t[1] = 0  # the other rank lacks layer 1

    class Obj:  # hashable by identity, as the module's own layers and engines
        def __init__(self, **kw):
            self.__dict__.update(kw)

    engine = Obj(collectives=SimpleNamespace(dist=FakeDist, group="g"))
    local = Obj(collectives=None)
    layers = [Obj(engine=engine), Obj(engine=engine), Obj(engine=local), Obj(engine=engine)]
    call = SimpleNamespace(a=torch.zeros(3, 2))
    empty = SimpleNamespace(a=torch.zeros(0, 2))
    layers.append(Obj(engine=engine))
    done = {layers[0]: [call], layers[1]: [call], layers[2]: [call], layers[3]: [], layers[4]: [empty]}
    keep = _Hooks._present_everywhere(done)
    # Layer 1: missing on the other rank; layer 3: no call here; layer 4: no rows here.
    assert keep == {layers[0], layers[2]}
