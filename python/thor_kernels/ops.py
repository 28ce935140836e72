"""The library's kernel ops on torch tensors: each checks its tensors' dtype, device and
strides and passes raw pointers (and, for CUDA tensors, the current CUDA stream) to the
library. CPU tensors run on the library's CPU backend, CUDA tensors on the GPU."""

from __future__ import annotations

import ctypes
import enum
from ctypes import c_float, c_int32, c_int64, c_void_p

import torch

from ._lib import InvertPolicy, check, lib

__all__ = ["split", "merge", "traces", "accumulate", "GroupedAccumulate", "invert", "apply", "trace_rule", "Decision"]

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class _Context:
    """A library context for a device (and, on CUDA, the stream current at creation)."""

    def __init__(self, device: torch.device):
        self.ptr = c_void_p()
        #: The CUDA stream handle the context queues its work on (None on the CPU).
        self.stream = None
        if device.type == "cuda":
            ordinal = device.index if device.index is not None else torch.cuda.current_device()
            # PyTorch's default stream is the legacy NULL stream (handle 0): hand it over as
            # CU_STREAM_LEGACY (1), since NULL would give the context a stream of its own,
            # unordered with PyTorch's work.
            stream = torch.cuda.current_stream(ordinal).cuda_stream or 1
            self.stream = stream
            check(lib().thor_v1_context_create_cuda(ordinal, c_void_p(stream), ctypes.byref(self.ptr)))
        elif device.type == "cpu":
            check(lib().thor_v1_context_create_cpu(ctypes.byref(self.ptr)))
        else:
            raise ValueError(f"unsupported device {device}")

    def __del__(self):
        if getattr(self, "ptr", None) is not None and self.ptr.value:
            lib().thor_v1_context_destroy(self.ptr)
            self.ptr = None


_contexts: dict = {}


def _ctx_for(device: torch.device) -> c_void_p:
    if device.type == "cuda":
        key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = ("cpu",)
    if key not in _contexts:
        _contexts[key] = _Context(device)
    return _contexts[key].ptr


def _ctx(t: torch.Tensor) -> c_void_p:
    return _ctx_for(t.device)


def _ptr(t: torch.Tensor | None) -> c_void_p:
    return c_void_p(t.data_ptr()) if t is not None else c_void_p(None)


def _f32(name: str, t: torch.Tensor, contiguous: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t


def _same_device(*ts: torch.Tensor) -> None:
    devs = {t.device for t in ts if t is not None}
    if len(devs) > 1:
        raise ValueError(f"tensors on different devices: {devs}")


def _blocks_for(dim: int, block: int) -> int:
    return -(-dim // block)


def split(dense: torch.Tensor, block: int) -> torch.Tensor:
    """The padded diagonal blocks ``[ceil(d/b), b, b]`` of a ``d x d`` factor (row stride allowed)."""
    _f32("dense", dense, contiguous=False)
    if dense.dim() != 2 or dense.shape[0] != dense.shape[1] or dense.stride(1) != 1:
        raise ValueError("dense must be a square matrix with unit column stride")
    d = dense.shape[0]
    out = torch.empty((_blocks_for(d, block), block, block), dtype=torch.float32, device=dense.device)
    check(lib().thor_v1_split(_ctx(dense), _ptr(dense), dense.stride(0), d, block, _ptr(out)))
    return out


def merge(blocks: torch.Tensor, dim: int) -> torch.Tensor:
    """The ``dim x dim`` block-diagonal matrix of padded blocks ``[nb, b, b]``."""
    _f32("blocks", blocks)
    b = blocks.shape[-1]
    out = torch.empty((dim, dim), dtype=torch.float32, device=blocks.device)
    check(lib().thor_v1_merge(_ctx(blocks), _ptr(blocks), dim, b, _ptr(out), dim))
    return out


def traces(blocks: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(trace of every block, trace of every factor) for factors of ``dims`` back to back."""
    _f32("blocks", blocks)
    b = blocks.shape[-1]
    nb = sum(_blocks_for(d, b) for d in dims)
    bt = torch.empty(nb, dtype=torch.float32, device=blocks.device)
    ft = torch.empty(len(dims), dtype=torch.float32, device=blocks.device)
    arr = (c_int64 * len(dims))(*dims)
    check(lib().thor_v1_traces(_ctx(blocks), _ptr(blocks), b, arr, len(dims), _ptr(bt), _ptr(ft)))
    return bt, ft


def accumulate(x: torch.Tensor, blocks: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """In place ``blocks <- beta blocks + alpha X_j^T X_j`` for ``x [N, d]`` (f32, f16 or bf16,
    unit column stride); returns the block traces. On CUDA tensors the call waits for the
    result (a NaN or Inf in x raises ThorError and leaves blocks unchanged)."""
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("x must be [N, d] with unit column stride")
    _f32("blocks", blocks)
    _same_device(x, blocks)
    b = blocks.shape[-1]
    tr = torch.empty(blocks.shape[0], dtype=torch.float32, device=blocks.device)
    check(lib().thor_v1_accumulate(_ctx(blocks), _ptr(x), DTYPES[x.dtype], x.shape[0], x.stride(0), x.shape[1], b,
                                  alpha, beta, _ptr(blocks), _ptr(tr)))
    return tr


class GroupedAccumulate:
    """Every factor of a model in one call (three kernel launches on a GPU): planned once for
    the factor dimensions ``dims`` (block size ``block``), the rows of each factor's input
    ``rows``, the input dtype and ``tensor_cores`` (TF32 on float32 input, f16 / bf16 products
    on 16-bit input; f32 arithmetic otherwise), on ``device``.

    ``__call__(xs, blocks, alphas, betas)`` updates ``blocks`` (all factors' blocks back to back,
    ``[total_blocks, b, b]`` float32) in place and returns ``(block_traces, factor_traces,
    status)``; ``status[f]`` is 1 where factor ``f``'s input held a NaN or Inf (that factor is
    left unchanged). On CUDA the work is queued on the current stream without waiting."""

    def __init__(self, dims: list[int], rows: list[int], block: int, dtype=torch.float32,
                 tensor_cores: bool = False, device="cpu"):
        if dtype not in DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        if len(dims) != len(rows) or not dims:
            raise ValueError("dims and rows need one entry per factor")
        self.device = torch.device(device)
        self.dims, self.rows, self.block, self.dtype = list(dims), list(rows), block, dtype
        self.total_blocks = sum(_blocks_for(d, block) for d in dims)
        self._ctx = _ctx_for(self.device)
        self.ptr = c_void_p()
        n = len(dims)
        check(lib().thor_v1_accumulate_plan_create(
            self._ctx, block, n, (c_int64 * n)(*dims), (c_int64 * n)(*rows), DTYPES[dtype],
            1 if tensor_cores else 0, ctypes.byref(self.ptr)))

    def __call__(self, xs: list[torch.Tensor], blocks: torch.Tensor, alphas: list[float],
                 betas: list[float]):
        n = len(self.dims)
        if len(xs) != n or len(alphas) != n or len(betas) != n:
            raise ValueError(f"need {n} inputs, alphas and betas")
        _f32("blocks", blocks)
        b = self.block
        if tuple(blocks.shape) != (self.total_blocks, b, b) or blocks.device != self.device:
            raise ValueError(f"blocks must be [{self.total_blocks}, {b}, {b}] on {self.device}")
        for f, (x, d, r) in enumerate(zip(xs, self.dims, self.rows)):
            if x.dtype != self.dtype or x.device != self.device:
                raise TypeError(f"xs[{f}] must be {self.dtype} on {self.device}")
            if x.dim() != 2 or x.shape[0] != r or x.shape[1] != d or x.stride(1) != 1:
                raise ValueError(f"xs[{f}] must be [{r}, {d}] with unit column stride")
        bt = torch.empty(self.total_blocks, dtype=torch.float32, device=self.device)
        ft = torch.empty(n, dtype=torch.float32, device=self.device)
        st = torch.empty(n, dtype=torch.int32, device=self.device)
        ptrs = (c_void_p * n)(*[x.data_ptr() for x in xs])
        lds = (c_int64 * n)(*[x.stride(0) for x in xs])
        check(lib().thor_v1_accumulate_grouped(
            self._ctx, self.ptr, ptrs, lds, (c_float * n)(*alphas), (c_float * n)(*betas),
            _ptr(blocks), _ptr(bt), _ptr(ft), _ptr(st)))
        return bt, ft, st

    def __del__(self):
        if getattr(self, "ptr", None) is not None and self.ptr.value:
            if self.device.type == "cuda":
                lib().thor_v1_context_synchronize(self._ctx)
            lib().thor_v1_accumulate_plan_destroy(self.ptr)
            self.ptr = None


def invert(blocks: torch.Tensor, damping, mask: torch.Tensor | None = None, retry: bool = False,
           out: torch.Tensor | None = None):
    """Batched damped Cholesky inverse of ``[nb, b, b]`` blocks. ``damping``: a float or a
    per-block tensor. Returns (inverses, info, damping used)."""
    _f32("blocks", blocks)
    nb, b = blocks.shape[0], blocks.shape[-1]
    out = torch.empty_like(blocks) if out is None else _f32("out", out)
    info = torch.empty(nb, dtype=torch.int32, device=blocks.device)
    used = torch.full((nb,), float("nan"), dtype=torch.float32, device=blocks.device)
    per_block = None
    if isinstance(damping, torch.Tensor):
        per_block = _f32("damping", damping)
        _same_device(blocks, per_block)
        damping = 0.0
    if mask is not None:
        if mask.dtype != torch.uint8 or not mask.is_contiguous():
            raise TypeError("mask must be a contiguous uint8 tensor")
        _same_device(blocks, mask)
    policy = ctypes.byref(InvertPolicy(3, 10.0, 1e-6)) if retry else None
    check(lib().thor_v1_invert(_ctx(blocks), b, nb, _ptr(blocks), _ptr(out), _ptr(per_block), float(damping),
                              _ptr(mask), policy, _ptr(info), _ptr(used)))
    return out, info, used


def apply(grad: torch.Tensor, g_inv: torch.Tensor | None, a_inv: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
    """``scale * blockdiag(G^-1) grad blockdiag(A^-1)`` for ``grad [out, in]``; the inverse
    blocks symmetric (as ``invert`` returns them). On CUDA tensors the call waits."""
    _f32("grad", grad)
    b = (g_inv if g_inv is not None else a_inv).shape[-1]
    for name, t in (("g_inv", g_inv), ("a_inv", a_inv)):
        if t is not None:
            _f32(name, t)
            _same_device(grad, t)
    out = torch.empty_like(grad)
    check(lib().thor_v1_apply(_ctx(grad), b, _ptr(g_inv), grad.shape[0], _ptr(grad), _ptr(a_inv), grad.shape[1],
                             scale, _ptr(out)))
    return out


class Decision(enum.IntEnum):
    """THOR's decision for a layer at a statistics step (the header's ``ThorDecision``)."""
    UPDATE = 0
    REUSE = 1
    FREEZE = 2
    FROZEN = 3
    SKIPPED = 4


def trace_rule(prev: float, cur: float, w1: float = 0.01, w2: float = 0.0) -> Decision:
    """THOR's trace rule: ``Decision.UPDATE``, ``REUSE`` or ``FREEZE``."""
    d = c_int32()
    check(lib().thor_v1_trace_rule(prev, cur, w1, w2, ctypes.byref(d)))
    return Decision(d.value)
