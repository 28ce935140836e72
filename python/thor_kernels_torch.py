"""PyTorch bindings for thor-kernels through its C ABI (ctypes, no build step).

Load the shared library built by ``cargo build --release -p thor-kernels-capi``
(``target/release/libthor_kernels_capi.so``)
or the one named by ``THOR_KERNELS_LIB``. Every function takes torch tensors, checks their
dtype, device and strides, and passes raw pointers (and, for CUDA tensors, the current CUDA
stream) to the library. ``ThorPreconditioner`` hooks a model's Linear and Conv2d layers and
preconditions their ``.grad`` in place before the user's ``optimizer.step()``.
"""

from __future__ import annotations

import ctypes
import enum
import os
from ctypes import POINTER, c_char_p, c_double, c_float, c_int32, c_int64, c_uint32, c_uint64, c_void_p
from pathlib import Path

import torch

__all__ = [
    "ThorError", "lib", "split", "merge", "traces", "accumulate", "GroupedAccumulate", "invert", "apply",
    "trace_rule", "Decision", "ThorPreconditioner",
]

STATUS = {0: "OK", 1: "INVALID_ARGUMENT", 2: "SHAPE", 3: "NOT_POSITIVE_DEFINITE", 4: "NO_DEVICE",
          5: "KERNEL_LOAD", 6: "DRIVER", 7: "NOT_SUPPORTED", 8: "INTERNAL",
          9: "OUT_OF_MEMORY"}
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class ThorError(RuntimeError):
    """A call into the library failed; ``status`` is the name of the status code."""

    def __init__(self, status: int, message: str):
        self.status = STATUS.get(status, str(status))
        super().__init__(f"{self.status}: {message}")


class InvertPolicy(ctypes.Structure):
    _fields_ = [("max_retries", c_uint32), ("factor", c_float), ("floor", c_float)]


class OptimizerConfig(ctypes.Structure):
    _fields_ = [("block", c_int32), ("stat_decay", c_float), ("damping_l0", c_float),
                ("damping_decay", c_float), ("damping_every", c_float), ("interval", c_uint64),
                ("w1", c_double), ("w2", c_double), ("kl_clip", c_float), ("retry", c_int32)]


class ConvTensors(ctypes.Structure):
    _fields_ = [("batch", c_int64), ("h", c_int64), ("w", c_int64), ("stride", c_int64 * 2),
                ("padding", c_int64 * 2), ("dilation", c_int64 * 2), ("input_strides", c_int64 * 4),
                ("grad_strides", c_int64 * 4)]


class Counters(ctypes.Structure):
    _fields_ = [(n, c_uint64) for n in ("statistics", "updates", "reuses", "freezes", "skipped", "failed_inversions")]


def _find_library() -> Path:
    env = os.environ.get("THOR_KERNELS_LIB")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parent.parent
    for p in (root / "target/release/libthor_kernels_capi.so", root / "target/debug/libthor_kernels_capi.so"):
        if p.is_file():
            return p
    raise FileNotFoundError(
        "libthor_kernels_capi.so not found: run `cargo build --release -p thor-kernels-capi` or set THOR_KERNELS_LIB")


def _load() -> ctypes.CDLL:
    so = ctypes.CDLL(str(_find_library()))
    P = c_void_p
    sigs = {
        "thor_v1_last_error_message": ([], c_char_p),
        "thor_v1_abi_version": ([], c_uint32),
        "thor_v1_context_create_cpu": ([POINTER(P)], c_int32),
        "thor_v1_context_create_cuda": ([c_int32, P, POINTER(P)], c_int32),
        "thor_v1_context_synchronize": ([P], c_int32),
        "thor_v1_context_destroy": ([P], None),
        "thor_v1_split": ([P, P, c_int64, c_int64, c_int32, P], c_int32),
        "thor_v1_merge": ([P, P, c_int64, c_int32, P, c_int64], c_int32),
        "thor_v1_traces": ([P, P, c_int32, POINTER(c_int64), c_int64, P, P], c_int32),
        "thor_v1_accumulate": ([P, P, c_int32, c_int64, c_int64, c_int64, c_int32, c_float, c_float, P, P], c_int32),
        "thor_v1_accumulate_plan_create": ([P, c_int32, c_int64, POINTER(c_int64), POINTER(c_int64), c_int32, c_int32, POINTER(P)], c_int32),
        "thor_v1_accumulate_plan_destroy": ([P], None),
        "thor_v1_accumulate_grouped": ([P, P, POINTER(P), POINTER(c_int64), POINTER(c_float), POINTER(c_float), P, P, P, P], c_int32),
        "thor_v1_invert": ([P, c_int32, c_int64, P, P, P, c_float, P, POINTER(InvertPolicy), P, P], c_int32),
        "thor_v1_apply": ([P, c_int32, P, c_int64, P, P, c_int64, c_float, P], c_int32),
        "thor_v1_trace_rule": ([c_double, c_double, c_double, c_double, POINTER(c_int32)], c_int32),
        "thor_v1_optimizer_config_default": ([POINTER(OptimizerConfig)], c_int32),
        "thor_v1_optimizer_create": ([POINTER(OptimizerConfig), POINTER(P)], c_int32),
        "thor_v1_optimizer_create_on": ([P, POINTER(OptimizerConfig), POINTER(P)], c_int32),
        "thor_v1_optimizer_last_decision": ([P, c_int32, POINTER(c_int32)], c_int32),
        "thor_v1_optimizer_destroy": ([P], None),
        "thor_v1_optimizer_add_linear": ([P, c_int64, c_int64, c_int32, POINTER(c_int32)], c_int32),
        "thor_v1_optimizer_add_conv2d": ([P, c_int64, c_int64, c_int64, c_int64, c_int32, POINTER(c_int32)], c_int32),
        "thor_v1_optimizer_set_epoch": ([P, c_double], c_int32),
        "thor_v1_optimizer_needs_statistics": ([P, POINTER(c_int32)], c_int32),
        "thor_v1_optimizer_observe": ([P, c_int32, P, P, c_int64, POINTER(c_int32)], c_int32),
        "thor_v1_optimizer_observe_conv": ([P, c_int32, P, P, POINTER(ConvTensors), POINTER(c_int32)], c_int32),
        "thor_v1_optimizer_set_conv_norm": ([P, c_int32], c_int32),
        "thor_v1_optimizer_precondition": ([P, c_int32, P, P], c_int32),
        "thor_v1_optimizer_kl_clip_factor": ([P, c_float, c_int64, POINTER(c_int32), POINTER(P), POINTER(P), POINTER(c_float)], c_int32),
        "thor_v1_optimizer_finish_step": ([P], c_int32),
        "thor_v1_optimizer_counters": ([P, c_int32, POINTER(Counters)], c_int32),
        "thor_v1_optimizer_save": ([P, c_char_p], c_int32),
        "thor_v1_optimizer_load": ([P, c_char_p], c_int32),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(so, name)
        fn.argtypes, fn.restype = args, res
    if so.thor_v1_abi_version() != 1:
        raise RuntimeError("thor-kernels ABI version mismatch")
    return so


lib = _load()


def _check(status: int) -> None:
    if status != 0:
        raise ThorError(status, lib.thor_v1_last_error_message().decode(errors="replace"))


class _Context:
    """A library context for a device (and, on CUDA, the stream current at creation)."""

    def __init__(self, device: torch.device):
        self.ptr = c_void_p()
        if device.type == "cuda":
            ordinal = device.index if device.index is not None else torch.cuda.current_device()
            # PyTorch's default stream is the legacy NULL stream (handle 0): hand it over as
            # CU_STREAM_LEGACY (1), since NULL would give the context a stream of its own,
            # unordered with PyTorch's work.
            stream = torch.cuda.current_stream(ordinal).cuda_stream or 1
            _check(lib.thor_v1_context_create_cuda(ordinal, c_void_p(stream), ctypes.byref(self.ptr)))
        elif device.type == "cpu":
            _check(lib.thor_v1_context_create_cpu(ctypes.byref(self.ptr)))
        else:
            raise ValueError(f"unsupported device {device}")

    def __del__(self):
        if getattr(self, "ptr", None) is not None and self.ptr.value:
            lib.thor_v1_context_destroy(self.ptr)
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
    _check(lib.thor_v1_split(_ctx(dense), _ptr(dense), dense.stride(0), d, block, _ptr(out)))
    return out


def merge(blocks: torch.Tensor, dim: int) -> torch.Tensor:
    """The ``dim x dim`` block-diagonal matrix of padded blocks ``[nb, b, b]``."""
    _f32("blocks", blocks)
    b = blocks.shape[-1]
    out = torch.empty((dim, dim), dtype=torch.float32, device=blocks.device)
    _check(lib.thor_v1_merge(_ctx(blocks), _ptr(blocks), dim, b, _ptr(out), dim))
    return out


def traces(blocks: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(trace of every block, trace of every factor) for factors of ``dims`` back to back."""
    _f32("blocks", blocks)
    b = blocks.shape[-1]
    nb = sum(_blocks_for(d, b) for d in dims)
    bt = torch.empty(nb, dtype=torch.float32, device=blocks.device)
    ft = torch.empty(len(dims), dtype=torch.float32, device=blocks.device)
    arr = (c_int64 * len(dims))(*dims)
    _check(lib.thor_v1_traces(_ctx(blocks), _ptr(blocks), b, arr, len(dims), _ptr(bt), _ptr(ft)))
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
    _check(lib.thor_v1_accumulate(_ctx(blocks), _ptr(x), DTYPES[x.dtype], x.shape[0], x.stride(0), x.shape[1], b,
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
        _check(lib.thor_v1_accumulate_plan_create(
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
        _check(lib.thor_v1_accumulate_grouped(
            self._ctx, self.ptr, ptrs, lds, (c_float * n)(*alphas), (c_float * n)(*betas),
            _ptr(blocks), _ptr(bt), _ptr(ft), _ptr(st)))
        return bt, ft, st

    def __del__(self):
        if getattr(self, "ptr", None) is not None and self.ptr.value:
            if self.device.type == "cuda":
                lib.thor_v1_context_synchronize(self._ctx)
            lib.thor_v1_accumulate_plan_destroy(self.ptr)
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
    _check(lib.thor_v1_invert(_ctx(blocks), b, nb, _ptr(blocks), _ptr(out), _ptr(per_block), float(damping),
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
    _check(lib.thor_v1_apply(_ctx(grad), b, _ptr(g_inv), grad.shape[0], _ptr(grad), _ptr(a_inv), grad.shape[1],
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
    _check(lib.thor_v1_trace_rule(prev, cur, w1, w2, ctypes.byref(d)))
    return Decision(d.value)


class ThorPreconditioner:
    """Preconditions the gradients of a model's Linear and Conv2d layers with THOR.

    Usage::

        pre = ThorPreconditioner(model, block=128, interval=20)
        for x, y in data:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            pre.step(epoch, lr=lr)     # preconditions .grad in place (lr: for kl_clip)
            opt.step()

    Activations are captured by forward hooks and output gradients by hooks on the layers'
    outputs, on statistics steps only; a convolution's input and output gradient go to the
    library as they are (NCHW or channels last, no ``unfold`` patch matrix, no transpose).
    ``conv_norm``: ``"position"`` (default) divides both conv factors by the number of
    output positions ``N * Ho * Wo``; ``"kfc"`` divides A by ``N`` only (KFC's convention;
    its preconditioned conv gradients are the default's times ``1 / (Ho * Wo)``). The optimizer runs
    where the model's parameters are: for a model on a CUDA device its state (statistics,
    inverses, the trace rule, counters) lives on that device and its work is queued on the
    CUDA stream current when the preconditioner is made, with no copies to the host; for a
    model on the CPU, on the library's CPU backend.
    """

    def __init__(self, model: torch.nn.Module, block: int = 128, interval: int = 20, damping: float = 0.03,
                 stat_decay: float = 0.0, w1: float = 0.01, w2: float = 0.0, kl_clip: float = 0.0,
                 conv_norm: str = "position"):
        cfg = OptimizerConfig()
        _check(lib.thor_v1_optimizer_config_default(ctypes.byref(cfg)))
        cfg.block, cfg.interval, cfg.damping_l0, cfg.stat_decay = block, interval, damping, stat_decay
        cfg.w1, cfg.w2, cfg.kl_clip = w1, w2, kl_clip
        norms = {"position": 0, "kfc": 1}
        if conv_norm not in norms:
            raise ValueError(f"conv_norm must be one of {sorted(norms)}, got {conv_norm!r}")
        self._kl_clip = kl_clip
        #: The KL clip factor of the last step (1.0 until a clipped step ran).
        self.last_kl_clip_factor = 1.0
        self._opt = c_void_p()
        params = list(model.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        if any(p.device != self.device for p in params):
            raise ValueError("the model's parameters are on more than one device")
        # The optimizer on the context of the model's device (and current stream): its
        # arrays are then device memory. The context may go after creation.
        ctx = _Context(self.device)
        _check(lib.thor_v1_optimizer_create_on(ctx.ptr, ctypes.byref(cfg), ctypes.byref(self._opt)))
        _check(lib.thor_v1_optimizer_set_conv_norm(self._opt, norms[conv_norm]))
        self.layers = []
        self._acts, self._grads = {}, {}
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                lid = c_int32()
                bias = int(m.bias is not None)
                if isinstance(m, torch.nn.Linear):
                    _check(lib.thor_v1_optimizer_add_linear(self._opt, m.in_features, m.out_features, bias, ctypes.byref(lid)))
                else:
                    if m.groups != 1:
                        raise ValueError("grouped convolutions are not supported")
                    kh, kw = m.kernel_size
                    _check(lib.thor_v1_optimizer_add_conv2d(self._opt, m.in_channels, m.out_channels, kh, kw, bias, ctypes.byref(lid)))
                self.layers.append((m, lid.value))
                m.register_forward_hook(self._capture)
        self._stats = self._needs_statistics()

    def __del__(self):
        if getattr(self, "_opt", None) is not None and self._opt.value:
            lib.thor_v1_optimizer_destroy(self._opt)
            self._opt = None

    def _on_device(self, what: str, t: torch.Tensor) -> None:
        if t.device != self.device:
            raise ValueError(
                f"{what} is on {t.device}, the preconditioner on {self.device} (the model's device when it "
                "was made): make the preconditioner after moving the model")

    def _needs_statistics(self) -> bool:
        v = c_int32()
        _check(lib.thor_v1_optimizer_needs_statistics(self._opt, ctypes.byref(v)))
        return bool(v.value)

    def _capture(self, m, inputs, out):
        if not (self._stats and torch.is_grad_enabled() and out.requires_grad):
            return
        a = inputs[0].detach()
        self._on_device("the layer's input", a)
        if isinstance(m, torch.nn.Conv2d):
            if a.dim() != 4:
                raise ValueError(f"a Conv2d input of shape {tuple(a.shape)}: only batched [N, C, H, W] inputs are supported")
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ValueError(f"Conv2d padding {m.padding!r} / padding_mode {m.padding_mode!r}: only numeric zero padding is supported")
            # The tensor as it is (NCHW or channels last): the library reads its patches.
            self._acts[m] = a if a.dtype == torch.float32 else a.float()
        else:
            self._acts[m] = a.float().contiguous()
        out.register_hook(lambda g, m=m: self._save_grad(m, g))

    def _save_grad(self, m, g):
        g = g.detach()
        n = g.shape[0]
        # Per-example gradients: the mean loss's gradient times the batch size. A conv
        # layer's stays [N, C_out, Ho, Wo] in its own layout (no transpose).
        g = (g * n).float()
        self._grads[m] = g if isinstance(m, torch.nn.Conv2d) else g.contiguous()

    def _observe(self, m, lid, a, g):
        if not isinstance(m, torch.nn.Conv2d):
            _check(lib.thor_v1_optimizer_observe(self._opt, lid, _ptr(a), _ptr(g), a.shape[0], None))
            return
        t = ConvTensors()
        t.batch, t.h, t.w = a.shape[0], a.shape[2], a.shape[3]
        t.stride[:], t.padding[:], t.dilation[:] = list(m.stride), list(m.padding), list(m.dilation)
        t.input_strides[:], t.grad_strides[:] = list(a.stride()), list(g.stride())
        _check(lib.thor_v1_optimizer_observe_conv(self._opt, lid, _ptr(a), _ptr(g), ctypes.byref(t), None))

    def counters(self, layer_index: int) -> dict:
        c = Counters()
        _check(lib.thor_v1_optimizer_counters(self._opt, self.layers[layer_index][1], ctypes.byref(c)))
        return {n: getattr(c, n) for n, _ in Counters._fields_}

    @torch.no_grad()
    def step(self, epoch: float = 0.0, lr: "float | None" = None) -> None:
        """Feeds the captured statistics (on statistics steps) and preconditions every hooked
        layer's ``.grad`` in place. With ``kl_clip`` set, ``lr`` (the learning rate of this
        step) is required: the preconditioned gradients are scaled by K-FAC's KL clip factor
        ``min(1, sqrt(kl_clip / (lr^2 * sum g . dW)))``."""
        if self._kl_clip > 0 and lr is None:
            raise ValueError("kl_clip is set: pass this step's learning rate, step(epoch, lr=...)")
        _check(lib.thor_v1_optimizer_set_epoch(self._opt, float(epoch)))
        if self._stats:
            for m, lid in self.layers:
                if m in self._acts and m in self._grads:
                    self._observe(m, lid, self._acts.pop(m), self._grads.pop(m))
        done = []
        for m, lid in self.layers:
            if m.weight.grad is None:
                continue
            self._on_device("a gradient", m.weight.grad)
            w = m.weight.grad.reshape(m.weight.shape[0], -1)
            full = torch.cat([w, m.bias.grad.reshape(-1, 1)], dim=1) if m.bias is not None else w
            full = full.float().contiguous()
            out = torch.empty_like(full)
            _check(lib.thor_v1_optimizer_precondition(self._opt, lid, _ptr(full), _ptr(out)))
            done.append((m, lid, full, out))
        if self._kl_clip > 0 and done:
            n = len(done)
            ids = (c_int32 * n)(*[lid for _, lid, _, _ in done])
            gp = (c_void_p * n)(*[_ptr(full) for _, _, full, _ in done])
            up = (c_void_p * n)(*[_ptr(out) for _, _, _, out in done])
            factor = c_float()
            _check(lib.thor_v1_optimizer_kl_clip_factor(self._opt, float(lr), n, ids, gp, up, ctypes.byref(factor)))
            self.last_kl_clip_factor = factor.value
            for _, _, _, out in done:
                out.mul_(factor.value)
        for m, _, full, out in done:
            out = out.to(m.weight.grad.device, m.weight.grad.dtype)
            m.weight.grad.copy_(out[:, : full.shape[1] - (m.bias is not None)].reshape(m.weight.shape))
            if m.bias is not None:
                m.bias.grad.copy_(out[:, -1])
        _check(lib.thor_v1_optimizer_finish_step(self._opt))
        self._stats = self._needs_statistics()
        self._acts.clear()
        self._grads.clear()
