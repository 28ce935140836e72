"""The block-size tool's measures (python/examples/choose_block.py): nothing is lost when the
factors are block diagonal at b, something when they are not; its timings run the library."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import choose_block as cb  # noqa: E402


def spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * d, d, generator=g, dtype=torch.float64)
    return x.T @ x / (2 * d)


def test_block_diagonal_factors_lose_nothing_and_dense_ones_do():
    d = 70
    a = cb.blockdiag(spd(d, 1), 32)  # block diagonal at b = 32
    g = spd(20, 2)
    grad = torch.randn(20, d, dtype=torch.float64)
    info = cb.information([("l", a, g, grad)], damping=0.01)
    assert max(info[32][:2]) < 1e-12 and abs(info[32][2] - 1) < 1e-12
    # b = 128 >= both sizes: the full factors, nothing lost.
    assert max(info[128][:2]) < 1e-12 and max(info[256][:2]) < 1e-12
    dense = cb.information([("l", spd(d, 3), g, grad)], damping=0.01)
    off32, err32, cos32 = dense[32]
    assert off32 > 0.1 and err32 > 0.01 and cos32 < 1 - 1e-6
    assert dense[64][1] < err32  # larger blocks lose less


def test_timings_run_every_block_size():
    factors = [("l", spd(40, 4), spd(10, 5), torch.randn(10, 40, dtype=torch.float64))]
    t = cb.timing(factors, 0.01, torch.device("cpu"), reps=1)
    assert sorted(t) == list(cb.BLOCKS)
    assert all(ti > 0 and ta > 0 and retried == 0 for ti, ta, retried in t.values())
