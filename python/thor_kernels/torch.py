"""THOR for PyTorch.

- :class:`THOR`, a ``torch.optim.Optimizer``: built from a model, it hooks the model's
  ``Linear`` and ``Conv2d`` layers, preconditions their gradients with THOR and updates every
  parameter with momentum SGD (the other parameters with plain momentum SGD).
- :class:`ThorPreconditioner`: the same preconditioning for a loop that keeps its own
  optimizer; it rewrites the layers' ``.grad`` in place before ``optimizer.step()``.

Statistics. On a statistics step (every ``interval`` steps) the layers' inputs are recorded
by forward hooks and the gradients of their outputs by hooks on those outputs, only while
the model is in training mode with gradients enabled. A layer called several times in one
forward contributes the rows of every call; several forward / backward passes before one
``step()`` (gradient accumulation) contribute all their rows; ``zero_grad()`` drops what a
step that was not taken recorded (so a step that a ``GradScaler`` skipped leaves no
statistics), but not the latest forward's records still waiting for their backward (so
``forward, zero_grad, backward, step`` works). Output gradients are turned into per-example
gradients by multiplying them by the number of samples of the forward passes that
contributed (the first dimension of the model's first tensor argument), which is right for
a loss averaged over the batch (with gradient accumulation: each micro-batch's mean loss
divided by the number of micro-batches, as usual), and divided by the ``GradScaler``'s
scale when one is given (without it, G would come out scaled by the square of the loss
scale). Recorded inputs are not copied: an input modified in place between its forward and
the step is refused. Layers whose forward is not called (``MultiheadAttention``'s
projections) are left out.

A convolution's input and output gradient go to the library as they are (NCHW or channels
last, no ``unfold`` patch matrix); string paddings and padding modes other than zeros are
applied to the recorded input first (as ``Conv2d`` itself does). Grouped convolutions are
not supported: leave them out with ``exclude``, they then get the plain update.

Devices. The optimizer runs where the hooked layers are: for a model on a CUDA device its
state (statistics, inverses, the trace rule, counters) lives on that device and its work is
queued on the CUDA stream that is current when the optimizer is made; for a model on the CPU
on the library's CPU backend.

Many processes. With ``process_group=`` (a ``torch.distributed`` group whose backend takes
CPU tensors, such as gloo; the model on the CPU or on a CUDA device, where the optimizer's
state stays on the device and each collective goes through host memory) every process is one rank of a data-parallel
run (for example under ``DistributedDataParallel``): each statistics step pools the factors of
every rank's local batch, every block of every factor is owned by one rank, which keeps its
statistics and inverts it, and the inverses are shared, so every rank preconditions with the
inverses one process would compute from the union of the batches. torch.distributed moves the
bytes, the library does the math; every rank must make the optimizer the same way and step
together. A layer is observed on a statistics step only where every rank recorded it. A
failed collective raises on that rank and every later step, precondition and save of the
engine raises too; the other ranks fail when their collective times out (the group's
``timeout``). ``state_dict()`` and ``load_state_dict()`` are then collectives (they gather every
rank's statistics first): call them on every rank (``if rank == 0: opt.state_dict()`` waits
for the others until the timeout), save from any.
"""

from __future__ import annotations

import ctypes
import functools
import math
import numbers
import os
import tempfile
import warnings
import weakref
from ctypes import c_float, c_int32, c_void_p
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from ._lib import (ConvTensors, Counters, LayerStep, OptimizerConfig, ThorAllGatherFn, ThorAllReduceFn, ThorError,
                   ThorReduceScatterFn, check, lib)
from .ops import Decision, _Context, _ptr

__all__ = ["THOR", "ThorPreconditioner", "Decision", "ThorError"]

#: The settings of a param group that configure its THOR engine; fixed once the group exists.
ENGINE_SETTINGS = ("block", "damping", "damping_decay", "damping_every", "stat_decay", "interval", "w1", "w2",
                   "kl_clip")
_CONV_NORMS = {"position": 0, "kfc": 1}
_STATE_VERSION = 1


def _check_settings(s: dict) -> None:
    """Python-side checks of a group's engine settings, naming the setting (the library
    checks ranges again)."""
    if s["block"] not in (32, 64, 128, 256):
        raise ValueError(f"block must be 32, 64, 128 or 256, got {s['block']!r}")
    if not isinstance(s["interval"], numbers.Integral) or isinstance(s["interval"], bool) or s["interval"] < 1:
        raise ValueError(f"interval must be an integer >= 1, got {s['interval']!r}")
    for name in ("damping", "damping_decay", "damping_every", "stat_decay", "w1", "w2", "kl_clip"):
        v = s[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if s["damping"] <= 0:
        raise ValueError(f"damping must be > 0, got {s['damping']!r}")
    if not 0 < s["damping_decay"] <= 1:
        raise ValueError(f"damping_decay must be in (0, 1], got {s['damping_decay']!r}")
    if s["damping_every"] <= 0:
        raise ValueError(f"damping_every must be > 0, got {s['damping_every']!r}")
    if not 0 <= s["stat_decay"] < 1:
        raise ValueError(f"stat_decay must be in [0, 1), got {s['stat_decay']!r}")


def _check_update(group: dict) -> None:
    """Checks a group's update settings (naming the setting): THOR's update is
    ``torch.optim.SGD``'s with momentum, without its other options."""
    for name in ("lr", "momentum", "weight_decay"):
        v = group[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    for name in ("nesterov", "dampening", "maximize"):
        if group.get(name):
            raise ValueError(f"{name} is not supported: THOR's update is momentum SGD without it")


class _Layer:
    """A hooked layer: its engine, its index there, and what was recorded since the last step."""

    def __init__(self, module: torch.nn.Module, name: str, engine: "_Engine", index: int, bias: bool):
        self.module, self.name, self.engine, self.index, self.bias = module, name, engine, index, bias
        self.conv = isinstance(module, torch.nn.Conv2d)
        # An explicit padding of the recorded input (string paddings, non-zero padding modes).
        self.pad = None
        if self.conv and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            self.pad = (tuple(module._reversed_padding_repeated_twice), mode)
        #: One ``[input, output gradient]`` pair per call since the last step.
        self.calls: list[list] = []


class _Collectives:
    """torch.distributed moving a distributed engine's bytes: the three callbacks of
    ``thor_v1_optimizer_create_distributed``. The reduce-scatter is an all-reduce of the
    whole buffer (gloo has no reduce-scatter), the all-gather pads every rank's part to the
    longest, and the small f64 all-reduce gathers every rank's vector and sums them in rank
    order (so that every rank gets the same bits, whatever the backend's reduction order).
    A failure is kept (``error``) and reported to the library as a non-zero status."""

    def __init__(self, group):
        import torch.distributed as dist
        self.dist, self.group = dist, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.error: BaseException | None = None
        self.calls = 0  # collectives run through the callbacks so far
        # The ctypes callbacks must live as long as the engine.
        self.reduce_scatter = ThorReduceScatterFn(self._guard(self._reduce_scatter))
        self.all_reduce = ThorAllReduceFn(self._guard(self._all_reduce))
        self.all_gather = ThorAllGatherFn(self._guard(self._all_gather))

    def _guard(self, fn):
        def call(*args):
            self.calls += 1
            try:
                fn(*args)
                return 0
            except BaseException as e:  # never unwind into the library
                self.error = e
                return 1
        return call

    def _counts(self, counts) -> list[int]:
        return [int(counts[r]) for r in range(self.world)]

    def _reduce_scatter(self, _user, send, counts, recv) -> None:
        c = self._counts(counts)
        buf = torch.empty(sum(c), dtype=torch.float32)
        ctypes.memmove(buf.data_ptr(), send, buf.numel() * 4)
        self.dist.all_reduce(buf, group=self.group)
        start = sum(c[:self.rank])
        ctypes.memmove(recv, buf.data_ptr() + 4 * start, 4 * c[self.rank])

    def _all_gather(self, _user, send, counts, recv) -> None:
        c = self._counts(counts)
        longest = max(c)
        mine = torch.zeros(longest, dtype=torch.float32)
        ctypes.memmove(mine.data_ptr(), send, 4 * c[self.rank])
        parts = [torch.empty(longest, dtype=torch.float32) for _ in range(self.world)]
        self.dist.all_gather(parts, mine, group=self.group)
        recv_addr = ctypes.cast(recv, c_void_p).value
        at = 0
        for part, n in zip(parts, c):
            ctypes.memmove(recv_addr + 4 * at, part.data_ptr(), 4 * n)
            at += n

    def _all_reduce(self, _user, buf, n) -> None:
        mine = torch.empty(n, dtype=torch.float64)
        ctypes.memmove(mine.data_ptr(), buf, 8 * n)
        parts = [torch.empty(n, dtype=torch.float64) for _ in range(self.world)]
        self.dist.all_gather(parts, mine, group=self.group)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        ctypes.memmove(buf, total.data_ptr(), 8 * n)

    def check(self, status: int) -> None:
        """``check`` that raises with the failed collective's own error as the cause."""
        if status != 0 and self.error is not None:
            e, self.error = self.error, None
            try:
                check(status)
            except ThorError as t:
                raise t from e
        check(status)


class _Engine:
    """One optimizer handle of the library: the layers of one param group."""

    def __init__(self, device: torch.device, settings: dict, conv_norm: str, process_group=None):
        _check_settings(settings)
        cfg = OptimizerConfig()
        check(lib().thor_v1_optimizer_config_default(ctypes.byref(cfg)))
        cfg.block, cfg.interval = int(settings["block"]), int(settings["interval"])
        cfg.damping_l0, cfg.damping_decay = float(settings["damping"]), float(settings["damping_decay"])
        cfg.damping_every, cfg.stat_decay = float(settings["damping_every"]), float(settings["stat_decay"])
        cfg.w1, cfg.w2, cfg.kl_clip = float(settings["w1"]), float(settings["w2"]), float(settings["kl_clip"])
        self.device, self.settings = device, dict(settings)
        ctx = _Context(device)
        self.stream = ctx.stream
        # The stream object too, so that a torch.cuda.ExternalStream outlives the engine.
        self._stream_obj = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.ptr = c_void_p()
        self.collectives = None
        if process_group is not None:
            self.collectives = _Collectives(process_group)
            c = self.collectives
            check(lib().thor_v1_optimizer_create_distributed_on(ctx.ptr, ctypes.byref(cfg), c.rank, c.world, None,
                                                                c.reduce_scatter, c.all_reduce, c.all_gather,
                                                                ctypes.byref(self.ptr)))
        else:
            check(lib().thor_v1_optimizer_create_on(ctx.ptr, ctypes.byref(cfg), ctypes.byref(self.ptr)))
        self._finalizer = weakref.finalize(self, lib().thor_v1_optimizer_destroy, self.ptr)
        check(lib().thor_v1_optimizer_set_conv_norm(self.ptr, _CONV_NORMS[conv_norm]))
        self.stats = self.needs_statistics()

    def add(self, module: torch.nn.Module, name: str, bias: bool) -> _Layer:
        lid = c_int32()
        if isinstance(module, torch.nn.Linear):
            check(lib().thor_v1_optimizer_add_linear(self.ptr, module.in_features, module.out_features, int(bias),
                                                     ctypes.byref(lid)))
        else:
            kh, kw = module.kernel_size
            check(lib().thor_v1_optimizer_add_conv2d(self.ptr, module.in_channels, module.out_channels, kh, kw,
                                                     int(bias), ctypes.byref(lid)))
        return _Layer(module, name, self, lid.value, bias)

    def needs_statistics(self) -> bool:
        v = c_int32()
        check(lib().thor_v1_optimizer_needs_statistics(self.ptr, ctypes.byref(v)))
        return bool(v.value)

    def check_stream(self) -> None:
        if self.device.type == "cuda":
            now = torch.cuda.current_stream(self.device).cuda_stream or 1
            if now != self.stream:
                raise RuntimeError(
                    "the current CUDA stream is not the one that was current when the optimizer was made: "
                    "step on that stream (or make the optimizer under the stream you train on)")

    def observe(self, items: list) -> None:
        """One statistics step of the layers in ``items`` (``(layer, a, g)`` each) in one call:
        on a distributed engine their collectives are joined, three for all of them."""
        if not items:
            return
        check_ = self.collectives.check if self.collectives is not None else check
        steps = (LayerStep * len(items))()
        convs = []  # kept alive for the call
        for s, (layer, a, g) in zip(steps, items):
            s.layer, s.acts, s.out_grads = layer.index, _ptr(a), _ptr(g)
            if not layer.conv:
                s.rows = a.shape[0]
                continue
            m = layer.module
            t = ConvTensors()
            t.batch, t.h, t.w = a.shape[0], a.shape[2], a.shape[3]
            t.stride[:], t.dilation[:] = list(m.stride), list(m.dilation)
            t.padding[:] = [0, 0] if layer.pad is not None else list(m.padding)
            t.input_strides[:], t.grad_strides[:] = list(a.stride()), list(g.stride())
            convs.append(t)
            s.conv = ctypes.pointer(t)
        check_(lib().thor_v1_optimizer_observe_layers(self.ptr, len(items), steps, None))

    def precondition(self, layer: _Layer, full: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(full)
        check(lib().thor_v1_optimizer_precondition(self.ptr, layer.index, _ptr(full), _ptr(out)))
        return out

    def kl_clip_factor(self, lr: float, done: list) -> float:
        """K-FAC's KL clip factor over ``done`` (``(layer, gradient, update)`` triples)."""
        n = len(done)
        if n == 0 or self.settings["kl_clip"] <= 0:
            return 1.0
        ids = (c_int32 * n)(*[layer.index for layer, _, _ in done])
        grads = (c_void_p * n)(*[g.data_ptr() for _, g, _ in done])
        updates = (c_void_p * n)(*[u.data_ptr() for _, _, u in done])
        factor = c_float()
        check(lib().thor_v1_optimizer_kl_clip_factor(self.ptr, float(lr), n, ids, grads, updates,
                                                     ctypes.byref(factor)))
        return factor.value

    def finish_step(self) -> None:
        check(lib().thor_v1_optimizer_finish_step(self.ptr))
        self.stats = self.needs_statistics()

    def set_epoch(self, epoch: float) -> None:
        check(lib().thor_v1_optimizer_set_epoch(self.ptr, float(epoch)))

    def counters(self, layer: _Layer) -> dict:
        c = Counters()
        check(lib().thor_v1_optimizer_counters(self.ptr, layer.index, ctypes.byref(c)))
        return {n: getattr(c, n) for n, _ in Counters._fields_}

    def decision(self, layer: _Layer) -> Decision:
        d = c_int32()
        check(lib().thor_v1_optimizer_last_decision(self.ptr, layer.index, ctypes.byref(d)))
        return Decision(d.value)

    def save(self) -> bytes:
        """The engine's state; on a distributed engine every rank's statistics are gathered
        first (a collective), so that the state is whole."""
        if self.collectives is not None:
            self.collectives.check(lib().thor_v1_optimizer_gather_statistics(self.ptr))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "thor.state")
            check(lib().thor_v1_optimizer_save(self.ptr, path.encode()))
            return Path(path).read_bytes()

    def load(self, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "thor.state")
            Path(path).write_bytes(data)
            check(lib().thor_v1_optimizer_load(self.ptr, path.encode()))
        self.stats = self.needs_statistics()


def _first_batch_dim(args, kwargs) -> int | None:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    return None


def _model_pre_hook(hooks, module, args, kwargs):
    if module.training and torch.is_grad_enabled():
        hooks.forward += 1
        hooks.samples[hooks.forward] = _first_batch_dim(args, kwargs)


def _layer_hook(hooks, module, inputs, out):
    hooks.record(module, inputs, out)


class _Hook:
    """A module hook that reaches its owner through a weak reference (a dropped optimizer
    leaves no live hook behind) and pickles, with the model, as a hook that does nothing."""

    def __init__(self, fn, ref):
        self.fn, self.ref = fn, ref

    def __call__(self, *args):
        hooks = self.ref() if self.ref is not None else None
        if hooks is not None:
            self.fn(hooks, *args)

    def __getstate__(self):
        return {"fn": self.fn, "ref": None}


class _Call:
    """One call of a hooked layer on a statistics step: its input (as recorded), the
    gradient of its output once backward has reached it, the model forward it belongs to,
    and the input's version counter when it shares the input's memory."""

    __slots__ = ("a", "g", "forward", "src", "version")

    def __init__(self, a: torch.Tensor, forward: int, src: torch.Tensor):
        self.a, self.g, self.forward = a, None, forward
        shared = a.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()
        self.src, self.version = (src, src._version) if shared else (None, 0)


def _grad_hook(call, g):
    call.g = g.detach()


#: The hooks on each hooked model (kept beside the model, not on it, so that the model
#: pickles as before).
_OWNERS: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


class _Hooks:
    """The hooks on a model: which layers are THOR layers, what they recorded since the last
    step, how many samples the model saw. Removed when the owner goes (or by ``remove``)."""

    def __init__(self, model: torch.nn.Module, candidates: list):
        owner = _OWNERS.get(model)
        if owner is not None and owner() is not None:
            raise ValueError("this model is already hooked by another THOR optimizer or preconditioner: call its "
                             "remove_hooks() first (or drop it)")
        self.layers: dict[torch.nn.Module, _Layer] = {}
        #: The model's forward passes in training mode (a counter) and each one's batch size.
        self.forward = 0
        self.samples: dict[int, int | None] = {}
        self._warned = False
        ref = weakref.ref(self)
        handles = [model.register_forward_pre_hook(_Hook(_model_pre_hook, ref), with_kwargs=True)]
        handles += [m.register_forward_hook(_Hook(_layer_hook, ref)) for _, m in candidates]
        self._model = weakref.ref(model)
        _OWNERS[model] = ref
        self._finalizer = weakref.finalize(self, _remove_handles, handles, self._model)

    def remove(self) -> None:
        self._finalizer()
        self.layers.clear()

    def record(self, module, inputs, out) -> None:
        layer = self.layers.get(module)
        if layer is None or not layer.engine.stats:
            return
        if not (module.training and torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad):
            return
        src = inputs[0].detach()
        a = src
        if a.device != layer.engine.device:
            raise ValueError(f"layer {layer.name!r}: its input is on {a.device}, the optimizer on "
                             f"{layer.engine.device} (the model's device when it was made)")
        if layer.conv:
            if a.dim() != 4:
                raise ValueError(f"layer {layer.name!r}: a Conv2d input of shape {tuple(a.shape)}; only batched "
                                 "[N, C, H, W] inputs are supported")
            if layer.pad is not None:
                a = F.pad(a, layer.pad[0], mode=layer.pad[1])
            if layer.calls and layer.calls[0].a.shape[1:] != a.shape[1:]:
                raise ValueError(f"layer {layer.name!r}: called on inputs of spatial sizes {tuple(a.shape[2:])} "
                                 f"and {tuple(layer.calls[0].a.shape[2:])} in one step; the statistics of a conv "
                                 "layer need one input size per step")
            a = a if a.dtype == torch.float32 else a.float()
        else:
            a = a.reshape(-1, a.shape[-1]).float()
        call = _Call(a, self.forward, src)
        layer.calls.append(call)
        out.register_hook(functools.partial(_grad_hook, call))

    def clear(self) -> None:
        """Drops everything recorded (after a step)."""
        for layer in self.layers.values():
            layer.calls.clear()
        self.samples.clear()

    def drop_finished(self) -> None:
        """Drops what ``zero_grad`` makes stale: the calls whose backward has run (a step
        that was skipped) and those of earlier forwards, but not the latest forward's calls
        still waiting for their backward (``zero_grad`` between forward and backward)."""
        for layer in self.layers.values():
            layer.calls = [c for c in layer.calls if c.g is None and c.forward == self.forward]
        self.samples = {k: v for k, v in self.samples.items() if k == self.forward}

    def check_inputs(self) -> None:
        """Raises when a recorded input that shares memory with the layer's input was
        modified in place after the forward (its statistics would be wrong)."""
        for layer in self.layers.values():
            for c in layer.calls:
                if c.g is not None and c.src is not None and c.src._version != c.version:
                    raise RuntimeError(f"layer {layer.name!r}: its input was modified in place after the forward "
                                       "(its statistics would be wrong); pass a new tensor to each forward")

    def observe(self, grad_scale: float) -> None:
        """Hands every layer's recorded statistics to its engine (statistics steps only)."""
        done = {l: [c for c in l.calls if c.g is not None] for l in self.layers.values() if l.engine.stats}
        forwards = {c.forward for calls in done.values() for c in calls}
        sizes = [self.samples.get(f) for f in forwards]
        known = sum(sizes) if sizes and None not in sizes else None
        missing = [l.name for l, calls in done.items() if not calls and l.module.weight.grad is not None]
        if missing and len(missing) < len(done) and not self._warned:
            self._warned = True
            warnings.warn(f"THOR layers {missing} got gradients but their forward was never seen on this statistics "
                          "step (a module that uses their weights without calling them?): they keep the identity "
                          "preconditioner until it is; pass them in exclude=[...] to silence this", stacklevel=3)
        # Distributed engines: a layer is observed only where every rank has its calls (a
        # forward skipped on one rank would otherwise leave the ranks' collectives out of step).
        everywhere = self._present_everywhere(done)
        by_engine = {}
        for layer, calls in done.items():
            if layer not in everywhere:
                continue
            n = known if known is not None else calls[0].g.shape[0]
            scale = n / grad_scale
            if layer.conv:
                a = calls[0].a if len(calls) == 1 else torch.cat([c.a for c in calls])
                g = calls[0].g if len(calls) == 1 else torch.cat([c.g for c in calls])
                g = g.float() * scale
            else:
                a = torch.cat([c.a for c in calls]).contiguous()
                g = torch.cat([c.g.reshape(-1, c.g.shape[-1]) for c in calls]).float() * scale
                g = g.contiguous()
            if layer.engine.collectives is None:
                layer.engine.observe([(layer, a, g)])  # one at a time: less memory held
            else:
                by_engine.setdefault(layer.engine, []).append((layer, a, g))
        # A distributed engine's layers in one call: their collectives joined.
        for engine, items in by_engine.items():
            engine.observe(sorted(items, key=lambda item: item[0].index))


    @staticmethod
    def _present_everywhere(done: dict) -> set:
        """The layers of ``done`` with calls on every rank of their engine's group (every
        layer with calls for an engine that is not distributed): one small all-reduce per
        distributed engine."""
        keep = {layer for layer, calls in done.items() if calls and any(c.a.shape[0] > 0 for c in calls)}
        engines = {}
        for layer in done:
            if layer.engine.collectives is not None:
                engines.setdefault(layer.engine, []).append(layer)
        for engine, layers in engines.items():
            c = engine.collectives
            have = torch.tensor([1 if layer in keep else 0 for layer in layers], dtype=torch.int32)
            c.dist.all_reduce(have, op=c.dist.ReduceOp.MIN, group=c.group)
            for layer, h in zip(layers, have.tolist()):
                if not h:
                    keep.discard(layer)
        return keep


def _remove_handles(handles, model_ref):
    for h in handles:
        h.remove()
    model = model_ref()
    if model is not None:
        _OWNERS.pop(model, None)


def _candidate_layers(model: torch.nn.Module, exclude: Iterable[torch.nn.Module]) -> list:
    """The (name, module) of every Linear and Conv2d layer THOR can precondition."""
    skip = {id(m) for m in exclude}
    # MultiheadAttention uses its out_proj's weight without calling it: no statistics.
    for m in model.modules():
        if isinstance(m, torch.nn.MultiheadAttention):
            skip |= {id(c) for c in m.modules()}
    out = []
    for name, m in model.named_modules():
        if id(m) in skip or not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if not m.weight.requires_grad:
            continue
        if isinstance(m, torch.nn.Conv2d) and m.groups != 1:
            raise ValueError(f"layer {name!r}: a grouped convolution (groups={m.groups}) is not supported; pass it "
                             "in exclude=[...] to give it the plain momentum-SGD update")
        out.append((name, m))
    return out


def _layer_gradient(layer: _Layer, weight_decay: float) -> torch.Tensor:
    """The layer's gradient as the library's ``[outputs, inputs (+1)]`` f32 matrix, weight
    decay included."""
    m = layer.module
    w = m.weight.grad.reshape(m.weight.shape[0], -1).float()
    if weight_decay:
        w = w + weight_decay * m.weight.detach().reshape(w.shape).float()
    if layer.bias:
        b = m.bias.grad if m.bias.grad is not None else torch.zeros_like(m.bias)
        b = b.float()
        if weight_decay:
            b = b + weight_decay * m.bias.detach().float()
        w = torch.cat([w, b.reshape(-1, 1)], dim=1)
    return w.contiguous()


def _preconditioned(engine: _Engine, layers: list, weight_decay: float, lr: float):
    """The preconditioned gradients of the ``layers`` with a gradient, scaled by the KL clip
    factor at ``lr``: ``([(layer, weight part shaped as the weight, bias part or None)],
    factor)``."""
    done = []
    for layer in layers:
        if layer.module.weight.grad is not None:
            full = _layer_gradient(layer, weight_decay)
            done.append((layer, full, engine.precondition(layer, full)))
    factor = engine.kl_clip_factor(lr, done)
    out = []
    for layer, full, u in done:
        if factor != 1.0:
            u.mul_(factor)
        w = layer.module.weight
        n_w = full.shape[1] - int(layer.bias)
        out.append((layer, u[:, :n_w].reshape(w.shape), u[:, -1] if layer.bias else None))
    return out, factor


def _check_finite(named: list) -> None:
    """Raises (naming the first) when a gradient holds a NaN or an infinity."""
    if not named:
        return
    flags = torch.stack([torch.isfinite(g).all() for _, g in named]).tolist()
    for (name, _), ok in zip(named, flags):
        if not ok:
            raise FloatingPointError(f"the gradient of {name!r} holds a NaN or an infinity: nothing was updated")


class THOR(torch.optim.Optimizer):
    """THOR as a ``torch.optim.Optimizer``.

    ::

        opt = THOR(model, lr=0.05, momentum=0.9, damping=0.03, interval=20)
        for x, y in data:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    The gradient of each hooked layer (weight and bias together) gets weight decay added,
    is preconditioned with the layer's block-diagonal inverse factors
    ``G^-1 grad A^-1`` (scaled by K-FAC's KL clip factor when ``kl_clip`` > 0), and then goes
    through the momentum-SGD update of ``torch.optim.SGD`` (``buf = momentum * buf + d``,
    ``p -= lr * buf``); every other parameter gets that update on its plain gradient.

    Args:
        model: the module whose Linear and Conv2d layers are preconditioned.
        params: parameters or param groups (default ``model.parameters()``); a hooked layer's
            weight and trainable bias must be in one group.
        lr, momentum, weight_decay: as in ``torch.optim.SGD`` (per group; read at every step,
            so LR schedulers work).
        damping: the damping ``l0`` added to both factors; it decays as
            ``l0 * damping_decay ** (epoch / damping_every)``, with the epoch from
            ``steps_per_epoch`` or :meth:`set_epoch` (``damping_decay`` 1, the default, keeps it
            constant).
        stat_decay: 0 uses each statistics step's factors, else an exponential average.
        interval: steps between statistics steps (the first step is one).
        block: the diagonal block size (32, 64, 128 or 256).
        w1, w2: the trace rule's thresholds (recompute the inverses above ``w1``, freeze a
            layer below ``w2``).
        kl_clip: K-FAC's KL clip bound over each group's hooked layers (0: none).
        conv_norm: ``"position"`` (conv factors divided by ``N * Ho * Wo``) or ``"kfc"``
            (A divided by ``N``).
        steps_per_epoch: lets the optimizer count epochs for the damping schedule.
        grad_scaler: the ``torch.amp.GradScaler`` the loop uses, if any: recorded output
            gradients are unscaled with its scale.
        exclude: modules left out of preconditioning (they get the plain update).
        process_group: a ``torch.distributed`` group that moves CPU tensors (gloo; with a
            model on a GPU under an NCCL process group, make a second group for THOR with
            ``torch.distributed.new_group(backend="gloo")``) when every process
            is one rank of a data-parallel run: the statistics of every rank's batch are
            pooled and every rank gets the same inverses (see the module's documentation).
            ``state_dict()`` is then a collective.

    ``damping``, ``damping_decay``, ``damping_every``, ``stat_decay``, ``interval``, ``block``,
    ``w1``, ``w2`` and ``kl_clip`` may differ between groups (each group with hooked layers
    has an engine of its own) but cannot change once a group exists.
    """

    def __init__(self, model: torch.nn.Module, params=None, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, damping: float = 0.03, damping_decay: float = 1.0,
                 damping_every: float = 10.0, stat_decay: float = 0.0, interval: int = 20, block: int = 128,
                 w1: float = 0.01, w2: float = 0.0, kl_clip: float = 0.0, conv_norm: str = "position",
                 steps_per_epoch: int | None = None, grad_scaler=None, exclude: Iterable[torch.nn.Module] = (),
                 process_group=None):
        if conv_norm not in _CONV_NORMS:
            raise ValueError(f"conv_norm must be one of {sorted(_CONV_NORMS)}, got {conv_norm!r}")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping,
                        damping_decay=damping_decay, damping_every=damping_every, stat_decay=stat_decay,
                        interval=interval, block=block, w1=w1, w2=w2, kl_clip=kl_clip)
        _check_settings(defaults)
        _check_update(defaults)
        candidates = _candidate_layers(model, exclude)
        self._names = {p: n for n, p in model.named_parameters()}
        self._candidates = candidates
        self._conv_norm = conv_norm
        self._steps_per_epoch = steps_per_epoch
        self._grad_scaler = grad_scaler
        self._process_group = process_group
        self._epoch: float | None = None
        self._steps = 0
        self._engines: dict[int, _Engine] = {}
        self._hooks = _Hooks(model, candidates)
        try:
            super().__init__(model.parameters() if params is None else params, defaults)
        except BaseException:
            self._hooks.remove()
            raise

    def _agree(self, ok: bool) -> bool:
        """Whether every rank of the process group says ``ok`` (one small all-reduce; just
        ``ok`` without a group): a rank that fails tells the others here, so that they do
        not wait for it in a later collective."""
        if self._process_group is None:
            return ok
        import torch.distributed as dist
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._process_group)
        return bool(flag.item())

    def __getstate__(self):
        raise TypeError("a THOR optimizer holds native state and cannot be pickled or copied: save its "
                        "state_dict() and load it into a new THOR made on the model")

    # -- groups and layers ---------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the group's hooked layers get an
        engine made with its settings."""
        super().add_param_group(param_group)
        try:
            self._setup_group(len(self.param_groups) - 1)
        except BaseException:
            self.param_groups.pop()
            raise

    def _setup_group(self, index: int) -> None:
        group = self.param_groups[index]
        _check_update(group)
        ids = {id(p) for p in group["params"]}
        mine = [(n, m) for n, m in self._candidates if id(m.weight) in ids]
        if not mine:
            return
        _check_settings(group)
        devices = {m.weight.device for _, m in mine} | {e.device for e in self._engines.values()}
        if len(devices) > 1:
            raise ValueError(f"the hooked layers are on more than one device: {sorted(map(str, devices))}")
        engine = _Engine(next(iter(devices)), {k: group[k] for k in ENGINE_SETTINGS}, self._conv_norm,
                         self._process_group)
        layers = []
        for name, m in mine:
            bias = m.bias is not None and m.bias.requires_grad
            if bias and id(m.bias) not in ids:
                raise ValueError(f"layer {name!r}: its weight and its bias are in different param groups; THOR "
                                 "preconditions them together")
            layers.append(engine.add(m, name, bias))
        self._engines[index] = engine
        for layer in layers:
            self._hooks.layers[layer.module] = layer

    @property
    def layers(self) -> list[torch.nn.Module]:
        """The preconditioned layers, in the model's order."""
        return [m for _, m in self._candidates if m in self._hooks.layers]

    def layer_state(self, module: torch.nn.Module) -> dict:
        """A preconditioned layer's counters (``statistics``, ``updates``, ``reuses``,
        ``freezes``, ``skipped``, ``failed_inversions``) and ``decision``, the
        :class:`Decision` of its last statistics step."""
        layer = self._hooks.layers.get(module)
        if layer is None:
            raise KeyError("not a layer this optimizer preconditions")
        return dict(layer.engine.counters(layer), decision=layer.engine.decision(layer))

    def remove_hooks(self) -> None:
        """Removes the hooks from the model; the optimizer then updates every parameter with
        the plain momentum-SGD step."""
        self._hooks.remove()

    def set_epoch(self, epoch: float) -> None:
        """Sets the training position in (fractional) epochs for the damping schedule (from
        now on in place of the count from ``steps_per_epoch``)."""
        if not math.isfinite(epoch) or epoch < 0:
            raise ValueError(f"epoch must be finite and >= 0, got {epoch!r}")
        self._epoch = float(epoch)

    # -- the step ------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; also drops the statistics of a step that
        was not taken (those whose backward ran; a forward still waiting for its backward
        keeps its own)."""
        self._hooks.drop_finished()
        super().zero_grad(set_to_none=set_to_none)

    def _current_epoch(self) -> float:
        if self._epoch is not None:
            return self._epoch
        if self._steps_per_epoch is not None:
            return self._steps / self._steps_per_epoch
        if any(e.settings["damping_decay"] != 1 for e in self._engines.values()):
            raise ValueError("damping_decay < 1 decays the damping with the epoch: pass steps_per_epoch to THOR "
                             "or call set_epoch(epoch)")
        return 0.0

    @torch.no_grad()
    def step(self, closure=None):
        """One THOR step: statistics (on statistics steps), preconditioning, the update.
        Checks every gradient first: a NaN or infinity, or a hooked layer on another device
        than the optimizer, raises with nothing changed."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        named = [(self._names.get(p, "<param>"), p.grad) for g in self.param_groups for p in g["params"]
                 if p.grad is not None]
        for layer in self._hooks.layers.values():
            for what in ("weight", "bias") if layer.bias else ("weight",):
                p = getattr(layer.module, what)
                if p.device != layer.engine.device:
                    raise ValueError(f"parameter '{layer.name}.{what}' is on {p.device}, the optimizer on "
                                     f"{layer.engine.device}: make the optimizer after moving the model")
        for group in self.param_groups:
            _check_update(group)
        self._hooks.check_inputs()
        for index, engine in self._engines.items():
            for k in ENGINE_SETTINGS:
                if self.param_groups[index][k] != engine.settings[k]:
                    raise ValueError(f"param group {index}: {k} changed from {engine.settings[k]!r} to "
                                     f"{self.param_groups[index][k]!r}; THOR's engine settings are fixed once "
                                     "the group exists (lr, momentum and weight_decay may change)")
        _check_finite(named)
        epoch = self._current_epoch()
        for engine in self._engines.values():
            engine.check_stream()
        scale = 1.0
        if self._grad_scaler is not None and self._grad_scaler.is_enabled():
            scale = float(self._grad_scaler.get_scale())
        for engine in self._engines.values():
            engine.set_epoch(epoch)
        if any(e.stats for e in self._engines.values()):
            self._hooks.observe(scale)
        updates: dict[torch.nn.Parameter, torch.Tensor] = {}
        for index, engine in self._engines.items():
            group = self.param_groups[index]
            layers = [l for l in self._hooks.layers.values() if l.engine is engine]
            done, _ = _preconditioned(engine, layers, group["weight_decay"], group["lr"])
            for layer, w, b in done:
                m = layer.module
                updates[m.weight] = w.to(m.weight.dtype)
                if b is not None:
                    updates[m.bias] = b.to(m.bias.dtype)
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = updates.get(p)
                if d is None:
                    d = p.grad if not wd else p.grad.add(p, alpha=wd)
                if momentum:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d).detach()
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        for engine in self._engines.values():
            engine.finish_step()
        self._hooks.clear()
        self._steps += 1
        return loss

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """As ``torch.optim.Optimizer.state_dict`` (momentum buffers, param groups), plus a
        ``"thor"`` entry: the step count, the epoch, and each engine's state (statistics,
        inverses, trace-rule state, counters) as a uint8 tensor."""
        sd = super().state_dict()
        sd["thor"] = {
            "version": _STATE_VERSION,
            "steps": self._steps,
            "epoch": self._epoch,
            "engines": {i: torch.frombuffer(bytearray(e.save()), dtype=torch.uint8) for i, e in self._engines.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a :meth:`state_dict` of an optimizer made the same way on the same model;
        training resumes bit-exact. On error nothing changes. With a ``process_group`` a
        collective: every rank loads, and a failure on any rank fails (and rolls back) all."""
        agree = self._agree
        try:
            state_dict = dict(state_dict)
            thor = state_dict.pop("thor", None)
            if thor is None:
                raise ValueError("not a THOR state dict: it has no 'thor' entry")
            if thor.get("version") != _STATE_VERSION:
                raise ValueError(f"a THOR state dict of version {thor.get('version')!r}; this version reads "
                                 f"{_STATE_VERSION}")
            engines = thor.get("engines", {})
            if set(engines) != set(self._engines):
                raise ValueError(f"the state dict has engines for groups {sorted(engines)}, this optimizer for "
                                 f"{sorted(self._engines)}")
            groups = state_dict.get("param_groups", [])
            for i, e in self._engines.items():
                if i >= len(groups):
                    raise ValueError(f"the state dict has {len(groups)} param groups, this optimizer more")
                for k in ENGINE_SETTINGS:
                    if groups[i].get(k) != e.settings[k]:
                        raise ValueError(f"param group {i}: the state dict's {k} is {groups[i].get(k)!r}, this "
                                         f"optimizer's {e.settings[k]!r}; make the optimizer with the saved "
                                         "settings")
            steps, epoch = int(thor["steps"]), thor["epoch"]
        except Exception:
            agree(False)
            raise
        if not agree(True):
            raise RuntimeError("another rank of the process group could not load its THOR state (see its error); "
                               "nothing changed")
        before = super().state_dict()
        # The state to put back if loading fails (on a distributed engine a collective).
        saved = {i: e.save() for i, e in self._engines.items()}
        super().load_state_dict(state_dict)
        loaded = []
        error = None
        try:
            for i, e in self._engines.items():
                e.load(_as_bytes(engines[i]))
                loaded.append(i)
        except Exception as e:
            error = e
        if not agree(error is None):
            for i in loaded:
                self._engines[i].load(saved[i])
            super().load_state_dict(before)
            if error is not None:
                raise error
            raise RuntimeError("another rank failed to load its THOR state: this rank's load was undone")
        self._steps, self._epoch = steps, epoch
        self._hooks.clear()


def _as_bytes(data) -> bytes:
    if isinstance(data, torch.Tensor):
        t = data.detach().to("cpu", torch.uint8).contiguous()
        return ctypes.string_at(t.data_ptr(), t.numel()) if t.numel() else b""
    return bytes(data)


class ThorPreconditioner:
    """THOR's preconditioning for a loop that keeps its own optimizer.

    ::

        pre = ThorPreconditioner(model, block=128, interval=20)
        for x, y in data:
            opt.zero_grad()
            pre.zero_grad()            # drops statistics of a step that was not taken
            loss_fn(model(x), y).backward()
            pre.step(epoch, lr=lr)     # preconditions .grad in place (lr: for kl_clip)
            opt.step()

    The damping is ``damping * damping_decay ** (epoch / damping_every)`` with the epoch
    given to :meth:`step` (required when ``damping_decay`` < 1). Statistics, devices,
    convolutions and ``process_group`` as for :class:`THOR` (see the module's documentation).
    """

    def __init__(self, model: torch.nn.Module, block: int = 128, interval: int = 20, damping: float = 0.03,
                 stat_decay: float = 0.0, w1: float = 0.01, w2: float = 0.0, kl_clip: float = 0.0,
                 conv_norm: str = "position", damping_decay: float = 0.87, damping_every: float = 10.0,
                 exclude: Iterable[torch.nn.Module] = (), process_group=None):
        if conv_norm not in _CONV_NORMS:
            raise ValueError(f"conv_norm must be one of {sorted(_CONV_NORMS)}, got {conv_norm!r}")
        settings = dict(block=block, interval=interval, damping=damping, damping_decay=damping_decay,
                        damping_every=damping_every, stat_decay=stat_decay, w1=w1, w2=w2, kl_clip=kl_clip)
        _check_settings(settings)
        candidates = _candidate_layers(model, exclude)
        devices = {m.weight.device for _, m in candidates}
        if len(devices) > 1:
            raise ValueError(f"the hooked layers are on more than one device: {sorted(map(str, devices))}")
        self.device = next(iter(devices)) if devices else torch.device("cpu")
        self._engine = _Engine(self.device, settings, conv_norm, process_group)
        self._hooks = _Hooks(model, candidates)
        #: ``(module, index)`` of every hooked layer, in the model's order.
        self.layers = []
        self._layers = []
        for name, m in candidates:
            bias = m.bias is not None and m.bias.requires_grad
            layer = self._engine.add(m, name, bias)
            self._hooks.layers[m] = layer
            self._layers.append(layer)
            self.layers.append((m, layer.index))
        #: The KL clip factor of the last step (1.0 until a clipped step ran).
        self.last_kl_clip_factor = 1.0

    def counters(self, layer_index: int) -> dict:
        """Counters of the ``layer_index``-th hooked layer (see :meth:`THOR.layer_state`)."""
        return self._engine.counters(self._layers[layer_index])

    def zero_grad(self) -> None:
        """Drops the statistics of a step that was not taken (see :meth:`THOR.zero_grad`)."""
        self._hooks.drop_finished()

    def remove_hooks(self) -> None:
        """Removes the hooks from the model; :meth:`step` then leaves ``.grad`` alone."""
        self._hooks.remove()

    @torch.no_grad()
    def step(self, epoch: float | None = None, lr: float | None = None, grad_scale: float = 1.0) -> bool:
        """Feeds the recorded statistics (on statistics steps) and preconditions every hooked
        layer's ``.grad`` in place; returns True. With ``kl_clip`` set, ``lr`` (this step's
        learning rate) is required. ``grad_scale``: the loss scale of a ``GradScaler``
        (``scaler.get_scale()``; the gradients must be unscaled already, with
        ``scaler.unscale_(opt)``): the recorded output gradients are unscaled with it, and a
        step whose gradients overflowed is skipped (statistics dropped, ``.grad`` left for
        the scaler to skip) and returns False. Without a scale a NaN or infinite gradient
        raises ``FloatingPointError``. Nothing changes when it raises. With a
        ``process_group``, every rank must pass the same ``epoch`` (it sets the damping)."""
        engine = self._engine
        if engine.settings["kl_clip"] > 0 and (lr is None or not math.isfinite(lr) or lr < 0):
            raise ValueError(f"kl_clip is set: pass this step's learning rate (finite, >= 0), step(epoch, lr=...); "
                             f"got {lr!r}")
        if epoch is None and engine.settings["damping_decay"] != 1:
            raise ValueError("damping_decay < 1 decays the damping with the epoch: pass step(epoch)")
        if epoch is not None and (not math.isfinite(epoch) or epoch < 0):
            raise ValueError(f"epoch must be finite and >= 0, got {epoch!r}")
        if not math.isfinite(grad_scale) or grad_scale <= 0:
            raise ValueError(f"grad_scale must be finite and > 0, got {grad_scale!r}")
        layers = list(self._hooks.layers.values())
        named = []
        for layer in layers:
            for what in ("weight", "bias") if layer.bias else ("weight",):
                g = getattr(layer.module, what).grad
                if g is not None:
                    if g.device != self.device:
                        raise ValueError(f"parameter '{layer.name}.{what}': a gradient on {g.device}, the "
                                         f"preconditioner on {self.device}: make the preconditioner after moving "
                                         "the model")
                    named.append((f"{layer.name}.{what}", g))
        if grad_scale != 1.0 and named and not torch.stack([torch.isfinite(g).all() for _, g in named]).all():
            self._hooks.clear()
            return False
        _check_finite(named)
        self._hooks.check_inputs()
        engine.check_stream()
        engine.set_epoch(0.0 if epoch is None else epoch)
        if engine.stats:
            self._hooks.observe(grad_scale)
        done, self.last_kl_clip_factor = _preconditioned(engine, layers, 0.0, lr or 0.0)
        for layer, w, b in done:
            m = layer.module
            m.weight.grad.copy_(w)
            if b is not None:
                if m.bias.grad is None:
                    m.bias.grad = torch.zeros_like(m.bias)
                m.bias.grad.copy_(b)
        engine.finish_step()
        self._hooks.clear()
        return True
