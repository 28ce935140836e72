"""thor-kernels: the THOR second-order optimizer's kernels (CUDA and CPU) from Python.

- :mod:`thor_kernels.torch`: ``THOR``, a ``torch.optim.Optimizer``, and
  ``ThorPreconditioner`` (needs PyTorch);
- :mod:`thor_kernels.ops`: the kernel ops on torch tensors (split, accumulate, invert,
  apply, traces, the trace rule);
- :func:`library_path`: which shared library is used (the wheel's own, ``THOR_KERNELS_LIB``,
  or a source checkout's build).

Importing the package never needs the shared library: the first call that does says how to
get it when it is missing.
"""

from ._lib import ABI_VERSION, LibraryNotFoundError, ThorError, library_path

__version__ = "0.1.0"
__all__ = ["ABI_VERSION", "LibraryNotFoundError", "ThorError", "library_path", "__version__"]
