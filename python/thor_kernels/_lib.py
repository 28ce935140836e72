"""The shared library and its C ABI through ctypes (``include/thor_kernels.h``), loaded on
first use so that importing the package never fails: a missing library is reported, with
how to get it, by the first call that needs it."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from ctypes import (CFUNCTYPE, POINTER, c_char_p, c_double, c_float, c_int32, c_int64, c_uint32, c_uint64,
                    c_void_p)
from pathlib import Path

#: The C ABI version these bindings are written for (``thor_v1_abi_version``).
ABI_VERSION = 1

STATUS = {0: "OK", 1: "INVALID_ARGUMENT", 2: "SHAPE", 3: "NOT_POSITIVE_DEFINITE", 4: "NO_DEVICE",
          5: "KERNEL_LOAD", 6: "DRIVER", 7: "NOT_SUPPORTED", 8: "INTERNAL",
          9: "OUT_OF_MEMORY", 10: "COMMUNICATION"}


class ThorError(RuntimeError):
    """A call into the library failed; ``status`` is the name of the status code
    (``"INVALID_ARGUMENT"``, ``"DRIVER"``, ...) and the message is the library's."""

    def __init__(self, status: int, message: str):
        self.status = STATUS.get(status, str(status))
        super().__init__(f"{self.status}: {message}")


class LibraryNotFoundError(ImportError):
    """The shared library was not found (or could not be loaded); the message says how to
    get it."""


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


class LayerStep(ctypes.Structure):
    _fields_ = [("layer", c_int32), ("acts", c_void_p), ("out_grads", c_void_p), ("rows", c_int64),
                ("conv", POINTER(ConvTensors))]


class Counters(ctypes.Structure):
    _fields_ = [(n, c_uint64) for n in ("statistics", "updates", "reuses", "freezes", "skipped", "failed_inversions")]


# The collectives of a distributed optimizer, implemented by the caller (the header's
# typedefs of the same names): they return 0 on success.
ThorReduceScatterFn = CFUNCTYPE(c_int32, c_void_p, POINTER(c_float), POINTER(c_int64), POINTER(c_float))
ThorAllReduceFn = CFUNCTYPE(c_int32, c_void_p, POINTER(c_double), c_int64)
ThorAllGatherFn = CFUNCTYPE(c_int32, c_void_p, POINTER(c_float), POINTER(c_int64), POINTER(c_float))

_NAMES = ("thor_kernels_capi", "libthor_kernels_capi")
_SUFFIXES = {"linux": ".so", "darwin": ".dylib", "win32": ".dll"}


def _candidates() -> list[Path]:
    """Where the library may be, in order: ``THOR_KERNELS_LIB``; inside this package (a
    wheel); the build tree of a source checkout (release, then debug)."""
    env = os.environ.get("THOR_KERNELS_LIB")
    if env:
        return [Path(env)]
    here = Path(__file__).resolve().parent
    found = sorted(p for n in _NAMES for p in here.glob(f"{n}*") if p.suffix in (".so", ".dylib", ".dll", ".pyd"))
    suffix = _SUFFIXES.get(sys.platform, ".so")
    root = here.parent.parent
    tree = [root / "target" / kind / f"libthor_kernels_capi{suffix}" for kind in ("release", "debug")]
    return found + [p for p in tree if p.is_file()]


_HOW = ("install the thor-kernels wheel (`pip install thor_kernels-*.whl`; build it with "
        "`pip wheel ./python -w dist` in a checkout), build the library in a checkout "
        "(`cargo build --release -p thor-kernels-capi`), or set THOR_KERNELS_LIB to the path "
        "of libthor_kernels_capi")

_SIGNATURES = {
    "thor_v1_last_error_message": ([], c_char_p),
    "thor_v1_abi_version": ([], c_uint32),
    "thor_v1_context_create_cpu": ([POINTER(c_void_p)], c_int32),
    "thor_v1_context_create_cuda": ([c_int32, c_void_p, POINTER(c_void_p)], c_int32),
    "thor_v1_context_synchronize": ([c_void_p], c_int32),
    "thor_v1_context_destroy": ([c_void_p], None),
    "thor_v1_split": ([c_void_p, c_void_p, c_int64, c_int64, c_int32, c_void_p], c_int32),
    "thor_v1_merge": ([c_void_p, c_void_p, c_int64, c_int32, c_void_p, c_int64], c_int32),
    "thor_v1_traces": ([c_void_p, c_void_p, c_int32, POINTER(c_int64), c_int64, c_void_p, c_void_p], c_int32),
    "thor_v1_accumulate": ([c_void_p, c_void_p, c_int32, c_int64, c_int64, c_int64, c_int32, c_float, c_float, c_void_p, c_void_p], c_int32),
    "thor_v1_accumulate_plan_create": ([c_void_p, c_int32, c_int64, POINTER(c_int64), POINTER(c_int64), c_int32, c_int32, POINTER(c_void_p)], c_int32),
    "thor_v1_accumulate_plan_destroy": ([c_void_p], None),
    "thor_v1_accumulate_grouped": ([c_void_p, c_void_p, POINTER(c_void_p), POINTER(c_int64), POINTER(c_float), POINTER(c_float), c_void_p, c_void_p, c_void_p, c_void_p], c_int32),
    "thor_v1_invert": ([c_void_p, c_int32, c_int64, c_void_p, c_void_p, c_void_p, c_float, c_void_p, POINTER(InvertPolicy), c_void_p, c_void_p], c_int32),
    "thor_v1_apply": ([c_void_p, c_int32, c_void_p, c_int64, c_void_p, c_void_p, c_int64, c_float, c_void_p], c_int32),
    "thor_v1_trace_rule": ([c_double, c_double, c_double, c_double, POINTER(c_int32)], c_int32),
    "thor_v1_optimizer_config_default": ([POINTER(OptimizerConfig)], c_int32),
    "thor_v1_optimizer_create": ([POINTER(OptimizerConfig), POINTER(c_void_p)], c_int32),
    "thor_v1_optimizer_create_on": ([c_void_p, POINTER(OptimizerConfig), POINTER(c_void_p)], c_int32),
    "thor_v1_optimizer_create_distributed": ([POINTER(OptimizerConfig), c_int32, c_int32, c_void_p,
                                              ThorReduceScatterFn, ThorAllReduceFn, ThorAllGatherFn,
                                              POINTER(c_void_p)], c_int32),
    "thor_v1_optimizer_create_distributed_on": ([c_void_p, POINTER(OptimizerConfig), c_int32, c_int32, c_void_p,
                                                 ThorReduceScatterFn, ThorAllReduceFn, ThorAllGatherFn,
                                                 POINTER(c_void_p)], c_int32),
    "thor_v1_optimizer_gather_statistics": ([c_void_p], c_int32),
    "thor_v1_optimizer_last_decision": ([c_void_p, c_int32, POINTER(c_int32)], c_int32),
    "thor_v1_optimizer_destroy": ([c_void_p], None),
    "thor_v1_optimizer_add_linear": ([c_void_p, c_int64, c_int64, c_int32, POINTER(c_int32)], c_int32),
    "thor_v1_optimizer_add_conv2d": ([c_void_p, c_int64, c_int64, c_int64, c_int64, c_int32, POINTER(c_int32)], c_int32),
    "thor_v1_optimizer_set_epoch": ([c_void_p, c_double], c_int32),
    "thor_v1_optimizer_needs_statistics": ([c_void_p, POINTER(c_int32)], c_int32),
    "thor_v1_optimizer_observe": ([c_void_p, c_int32, c_void_p, c_void_p, c_int64, POINTER(c_int32)], c_int32),
    "thor_v1_optimizer_observe_conv": ([c_void_p, c_int32, c_void_p, c_void_p, POINTER(ConvTensors), POINTER(c_int32)], c_int32),
    "thor_v1_optimizer_observe_layers": ([c_void_p, c_int64, POINTER(LayerStep), POINTER(c_int32)], c_int32),
    "thor_v1_optimizer_set_conv_norm": ([c_void_p, c_int32], c_int32),
    "thor_v1_optimizer_precondition": ([c_void_p, c_int32, c_void_p, c_void_p], c_int32),
    "thor_v1_optimizer_kl_clip_factor": ([c_void_p, c_float, c_int64, POINTER(c_int32), POINTER(c_void_p), POINTER(c_void_p), POINTER(c_float)], c_int32),
    "thor_v1_optimizer_finish_step": ([c_void_p], c_int32),
    "thor_v1_optimizer_counters": ([c_void_p, c_int32, POINTER(Counters)], c_int32),
    "thor_v1_optimizer_save": ([c_void_p, c_char_p], c_int32),
    "thor_v1_optimizer_load": ([c_void_p, c_char_p], c_int32),
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def library_path() -> Path:
    """The path of the shared library these bindings load (raises
    :class:`LibraryNotFoundError`, saying how to get it, when there is none)."""
    found = _candidates()
    if not found:
        raise LibraryNotFoundError(f"the thor-kernels shared library was not found: {_HOW}")
    return found[0]


def lib() -> ctypes.CDLL:
    """The loaded library, with every function's signature declared (loaded once)."""
    global _lib
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            path = library_path()
            try:
                so = ctypes.CDLL(str(path))
            except OSError as e:
                raise LibraryNotFoundError(f"could not load {path}: {e}; {_HOW}") from e
            for name, (args, res) in _SIGNATURES.items():
                try:
                    fn = getattr(so, name)
                except AttributeError as e:
                    raise LibraryNotFoundError(f"{path} has no {name}: a library of another version; {_HOW}") from e
                fn.argtypes, fn.restype = args, res
            version = so.thor_v1_abi_version()
            if version != ABI_VERSION:
                raise LibraryNotFoundError(
                    f"{path} speaks C ABI version {version}, these bindings version {ABI_VERSION}; {_HOW}")
            _lib = so
    return _lib


def check(status: int) -> None:
    """Raises :class:`ThorError` with the library's message when ``status`` is not OK."""
    if status != 0:
        raise ThorError(status, lib().thor_v1_last_error_message().decode(errors="replace"))
