"""THOR's step written out in float64 with torch, from the definition (DESIGN.md): the
factors of a layer's rows, damped block-diagonal inverses, the preconditioned gradient."""

import math

import torch


def blockdiag_inverse(f: torch.Tensor, b: int, damping: float) -> torch.Tensor:
    """The inverse of the block-diagonal part (blocks of ``b``) of ``f + sqrt(damping) I``."""
    d = f.shape[0]
    s = math.sqrt(damping)
    out = torch.zeros_like(f)
    for j in range(0, d, b):
        k = min(j + b, d)
        out[j:k, j:k] = torch.linalg.inv(f[j:k, j:k] + s * torch.eye(k - j, dtype=f.dtype))
    return out


def preconditioned(grad: torch.Tensor, a: torch.Tensor, g: torch.Tensor, damping: float, b: int) -> torch.Tensor:
    """``G^-1 grad A^-1`` for the rows ``a`` (inputs, with a ones column for a bias) and
    ``g`` (per-example output gradients): both factors divided by the row count."""
    a, g, grad = a.double(), g.double(), grad.double()
    rows = a.shape[0]
    return blockdiag_inverse(g.T @ g / rows, b, damping) @ grad @ blockdiag_inverse(a.T @ a / rows, b, damping)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()
