"""Plain-PyTorch sparse compute: per-token gathers of weight row blocks (the reference path, CPU and GPU).

Every token carries its own set of selected blocks (neurons, or heads of ``head_dim`` rows). We gather exactly those
rows of the weight and do the dot products on them, so the work done (and the weight rows read) is proportional to
the number of selected blocks, never to the full matrix. Chunking over tokens bounds the gathered-weight scratch.

Shapes: ``x [n, d]`` activations, ``w [G, r, d]`` weights viewed as G blocks of r rows (r = 1 for neurons,
r = head_dim for heads), ``idx [n, k]`` selected block indices per token, ``valid [n, k]`` (optional) False marks
padding in variable-size (threshold) selections; padded slots must hold an in-range index (0 is fine).
"""

from __future__ import annotations

import torch

_SCRATCH_ELEMS = {"cpu": 1 << 23, "cuda": 1 << 27}  # gathered weight elements per chunk (32 MB / 512 MB fp32)


def _chunks(n: int, per_token: int, device: torch.device):
    step = max(1, _SCRATCH_ELEMS.get(device.type, 1 << 23) // max(1, per_token))
    for s in range(0, n, step):
        yield s, min(n, s + step)


def gather_blocks_matvec(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[i, j, :] = w[idx[i, j]] @ x[i]  ->  [n, k, r]."""
    n, k = idx.shape
    _, r, d = w.shape
    out = x.new_empty(n, k, r)
    for s, e in _chunks(n, k * r * d, w.device):
        wg = w[idx[s:e]]  # (c, k, r, d): only the selected rows are read
        out[s:e] = torch.einsum("ckrd,cd->ckr", wg, x[s:e])
    return out


def gather_blocks_combine(h: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[i, :] = sum_j h[i, j, :] @ w[idx[i, j]]  ->  [n, d]  (w holds the transposed second matrix)."""
    n, k = idx.shape
    _, r, d = w.shape
    out = h.new_empty(n, d)
    for s, e in _chunks(n, k * r * d, w.device):
        wg = w[idx[s:e]]  # (c, k, r, d)
        out[s:e] = torch.einsum("ckr,ckrd->cd", h[s:e], wg)
    return out
