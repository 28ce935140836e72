"""Every kernel op of the bindings against torch's own math, on CPU tensors and (where there
is a GPU) on CUDA tensors."""

import math

import pytest
import torch

from thor_kernels import ThorError
from thor_kernels import ops as tk

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GPU_OPS = {"split", "merge", "traces", "invert", "accumulate", "apply"}  # ops the CUDA context implements


def dev_or_skip(device, op):
    if device == "cuda" and op not in GPU_OPS:
        pytest.skip(f"{op} has no CUDA kernel in this version")
    return torch.device(device)


def ref_blocks(dense, b):
    d = dense.shape[0]
    nb = -(-d // b)
    out = torch.zeros(nb, b, b, dtype=torch.float64)
    for j in range(nb):
        w = min(b, d - j * b)
        out[j, :w, :w] = dense[j * b: j * b + w, j * b: j * b + w].double()
        out[j, w:, w:] = torch.eye(b - w, dtype=torch.float64)
    return out


def spd(nb, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(nb, 2 * b, b, generator=g, dtype=torch.float64)
    return (x.transpose(1, 2) @ x / (2 * b) + 0.1 * torch.eye(b, dtype=torch.float64)).float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,d", [(32, 1), (32, 33), (64, 64), (128, 200)])
def test_split_merge(device, b, d):
    dev = dev_or_skip(device, "split")
    dense = torch.randn(d, d + 3, device=dev)[:, :d]  # a row stride larger than d
    blocks = tk.split(dense, b)
    assert torch.equal(blocks.cpu().double(), ref_blocks(dense.cpu(), b))
    merged = tk.merge(blocks.contiguous(), d)
    want = torch.block_diag(*[blocks[j, : min(b, d - j * b), : min(b, d - j * b)].cpu() for j in range(blocks.shape[0])])
    assert torch.equal(merged.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_traces(device):
    dev = dev_or_skip(device, "traces")
    dims, b = [5, 64, 130], 64
    nb = sum(-(-d // b) for d in dims)
    blocks = torch.randn(nb, b, b, device=dev)
    bt, ft = tk.traces(blocks, dims)
    assert torch.allclose(bt.cpu(), torch.diagonal(blocks.cpu(), dim1=1, dim2=2).sum(1), atol=1e-4)
    diag = torch.diagonal(blocks.cpu(), dim1=1, dim2=2).reshape(-1)
    k, want = 0, []
    for d in dims:
        want.append(diag[k * b: k * b + d].sum())
        k += -(-d // b)
    assert torch.allclose(ft.cpu(), torch.stack(want), atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
def test_accumulate(device, dtype, tol):
    dev = dev_or_skip(device, "accumulate")
    b, d, n = 32, 70, 257
    x = torch.randn(n, d + 2)[:, :d].to(dtype)
    prev = spd(3, b)
    blocks = prev.clone().to(dev)
    tr = tk.accumulate(x.to(dev), blocks, 1.0 / n, 0.5)
    blocks, tr = blocks.cpu(), tr.cpu()
    xd = x.double()
    full = xd.T @ xd / n
    want = ref_blocks(full, b)
    want_prev = 0.5 * prev.double()
    for j in range(3):
        w = min(b, d - j * b)
        want[j, :w, :w] += want_prev[j, :w, :w]
    err = (blocks.double() - want).norm() / want.norm()
    assert err < tol
    assert torch.allclose(tr.double(), torch.diagonal(want, dim1=1, dim2=2).sum(1), rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b", [32, 64, 128, 256])
def test_invert(device, b):
    dev = dev_or_skip(device, "invert")
    s = spd(3, b, seed=b).to(dev)
    out, info, used = tk.invert(s, 0.01)
    assert info.tolist() == [0, 0, 0] and torch.allclose(used.cpu(), torch.full((3,), 0.01))
    want = torch.linalg.inv(s.cpu().double() + 0.01 * torch.eye(b, dtype=torch.float64))
    assert (out.cpu().double() - want).norm() / want.norm() < 1e-4
    assert torch.equal(out, out.transpose(1, 2))  # mirrored bit for bit


@pytest.mark.parametrize("device", DEVICES)
def test_invert_bad_blocks_mask_and_retry(device):
    dev = dev_or_skip(device, "invert")
    b = 32
    s = spd(4, b).to(dev)
    s[1, 3, 3] = -100.0
    s[2, 10, 4] = float("nan")
    before = torch.full_like(s, 7.0)
    out, info, _ = tk.invert(s, 0.0, out=before.clone())
    assert info.tolist() == [0, 4, 11, 0]
    assert torch.equal(out[1:3], before[1:3])
    mask = torch.tensor([1, 0, 0, 1], dtype=torch.uint8, device=dev)
    out, info, _ = tk.invert(s, 0.0, mask=mask, out=before.clone())
    assert info.tolist() == [0, -1, -1, 0]
    shifted = spd(1, b).to(dev) - 1.0 * torch.eye(b, device=dev)  # indefinite by about 0.8
    _, info, used = tk.invert(shifted, 0.01, retry=True)
    assert info.tolist() == [0] and abs(used.item() - 1.0) < 1e-6  # 0.01 -> 0.1 -> 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_apply(device):
    dev = dev_or_skip(device, "apply")
    b, o, i = 32, 40, 70
    g_inv, a_inv = spd(2, b, 1), spd(3, b, 2)
    grad = torch.randn(o, i)
    out = tk.apply(grad.to(dev), g_inv.to(dev), a_inv.to(dev), scale=0.5).cpu()
    G = torch.block_diag(g_inv[0], g_inv[1, : o - b, : o - b]).double()
    A = torch.block_diag(a_inv[0], a_inv[1], a_inv[2, : i - 2 * b, : i - 2 * b]).double()
    want = 0.5 * G @ grad.double() @ A
    assert (out.double() - want).norm() / want.norm() < 1e-5
    only_a = tk.apply(grad.to(dev), None, a_inv.to(dev)).cpu()
    assert (only_a.double() - grad.double() @ A).norm() / (grad.double() @ A).norm() < 1e-5


def test_trace_rule():
    assert tk.trace_rule(1.0, 1.5, 0.01, 0.001) is tk.Decision.UPDATE
    assert tk.trace_rule(1.0, 1.005, 0.01, 0.001) is tk.Decision.REUSE
    assert tk.trace_rule(1.0, 1.0001, 0.01, 0.001) is tk.Decision.FREEZE
    with pytest.raises(ThorError, match="INVALID_ARGUMENT.*cur.*finite"):
        tk.trace_rule(1.0, math.nan, 0.01, 0.001)
    with pytest.raises(ThorError):
        tk.trace_rule(1.0, 1.5, 0.001, 0.01)


def test_bad_input_raises_typed_errors():
    with pytest.raises(TypeError):
        tk.split(torch.zeros(4, 4, dtype=torch.float64), 32)
    with pytest.raises(ThorError, match="INVALID_ARGUMENT.*block"):
        tk.split(torch.zeros(4, 4), 48)
    with pytest.raises(ThorError, match="INVALID_ARGUMENT.*damping"):
        tk.invert(spd(1, 32), -1.0)
    bad = torch.zeros(40, 40)
    bad[3, 3] = float("nan")
    assert tk.split(bad, 32)[0, 3, 3].isnan(), "a pure copy: NaN goes through, as on the GPU"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tc,tol", [(torch.float32, False, 1e-5), (torch.float32, True, 5e-4),
                                          (torch.bfloat16, True, 1e-2)])
def test_grouped_accumulate(device, dtype, tc, tol):
    dev = dev_or_skip(device, "accumulate")
    b, dims, rows = 32, [70, 10, 33], [200, 200, 57]
    acc = tk.GroupedAccumulate(dims, rows, b, dtype=dtype, tensor_cores=tc, device=dev)
    xs = [torch.randn(n, d).to(dtype) for d, n in zip(dims, rows)]
    xs[2][5, 7] = float("nan")
    nb = sum(-(-d // b) for d in dims)
    prev = spd(nb, b)
    blocks = prev.clone().to(dev)
    bt, ft, st = acc([x.to(dev) for x in xs], blocks, [1.0 / n for n in rows], [0.5, 0.5, 0.5])
    blocks, st = blocks.cpu(), st.cpu()
    assert st.tolist() == [0, 0, 1]
    k = 0
    for f, (d, n) in enumerate(zip(dims, rows)):
        m = -(-d // b)
        if f == 2:
            assert torch.equal(blocks[k:k + m], prev[k:k + m]), "NaN factor left unchanged"
            k += m
            continue
        xd = xs[f].double()
        want = ref_blocks(xd.T @ xd / n, b)
        for j in range(m):
            w = min(b, d - j * b)
            want[j, :w, :w] += 0.5 * prev[k + j, :w, :w].double()
        err = (blocks[k:k + m].double() - want).norm() / want.norm()
        assert err < tol, (f, err)
        k += m
    with pytest.raises(ValueError):
        acc([x.to(dev) for x in xs[:2]], blocks.to(dev), [1.0] * 2, [0.0] * 2)
