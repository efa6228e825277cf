"""Helpers shared by the CPU quality studies in bench/ (swiglu_selection_study.py, teal_allocation_study.py):
atomic writes, the machine's name, interpolation over (block bytes skipped, ppl increase) points, the per-layer
greedy allocation, and Markdown table cells. Imported by the scripts as a sibling module (run them as
``python bench/<study>.py``)."""

from __future__ import annotations

import platform
from contextlib import contextmanager

from dejavu.atomic import write_text_atomic

write_atomic = write_text_atomic  # the studies' name for it


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def interp_increase_at(points, skip):
    """Linear interpolation of the ppl increase at a block-bytes-skipped value, over (skip, increase) points."""
    pts = sorted(points)
    for (s0, i0), (s1, i1) in zip(pts, pts[1:]):
        if s0 <= skip <= s1 and s1 > s0:
            return i0 + (i1 - i0) * (skip - s0) / (s1 - s0)
    return None


def max_skip_within(points, budget):
    """Largest skip at which the (linearly interpolated) increase stays <= budget, starting from dense (0, 0)."""
    pts = sorted([(0.0, 0.0)] + list(points))
    best = 0.0
    for (s0, i0), (s1, i1) in zip(pts, pts[1:]):
        if i1 <= budget:
            best = max(best, s1)
        elif i0 <= budget:
            best = max(best, s0 + (s1 - s0) * (budget - i0) / (i1 - i0))
            break
        else:
            break
    return best


def greedy_path(levels, cost, skip_of):
    """Per-layer greedy allocation. cost[l][i]: single-layer NLL increase at levels[i] (levels[0] = 1.0, cost 0);
    skip_of(d): one layer's block-bytes-skipped contribution at density d. Each step moves the layer whose move to
    any lower level costs least per byte skipped. -> [(nominal skip, predicted additive dNLL, densities)]."""
    L = len(cost)
    state, path = [0] * L, []
    while True:
        best = None
        for l in range(L):
            s = state[l]
            for j in range(s + 1, len(levels)):
                gain = skip_of(levels[j]) - skip_of(levels[s])
                r = (cost[l][j] - cost[l][s]) / gain
                if best is None or r < best[0]:
                    best = (r, l, j)
        if best is None:
            return path
        state[best[1]] = best[2]
        dens = [levels[i] for i in state]
        path.append((sum(skip_of(d) for d in dens), sum(cost[l][state[l]] for l in range(L)), dens))


def md_cell(text) -> str:
    """A Markdown table cell: '|' (as in |silu(g)|) would end the cell."""
    return str(text).replace("|", "\\|")


@contextmanager
def mlp_hooks(model, pre, post):
    """Install ``pre`` (forward pre-hook) and ``post`` (forward hook) on every block's MLP -- PyTorch's own extension
    points, so the model's code stays as it is -- and remove them on exit."""
    handles = [h for blk in model.layers
               for h in (blk.mlp.register_forward_pre_hook(pre), blk.mlp.register_forward_hook(post))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def add_common_args(ap, name: str):
    """The options every study shares: output folder, data, the WikiText-2 windows, the C4 calibration docs."""
    ap.add_argument("--out", required=True, help=f"folder for {name}.{{json,md}}")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows (the first ones of the file)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--c4-docs", type=int, default=64, help="C4 docs 0..N-1: thresholds and sensitivities")
    ap.add_argument("--threads", type=int, default=1)
