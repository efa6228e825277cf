"""Sparsity policies: the swappable module that tells each block which heads and neurons a token uses.

A policy sees, in order, for each layer l: ``layer_input(l, x)`` (the residual stream entering block l), then
``heads(l, attn_in, attn, rope)`` and ``neurons(l, mlp_in, mlp, resid)``, each returning a
:class:`~dejavu.runtime.selection.Selection` (or None = dense for that layer).

Policies here:
  DensityPolicy   common base: per-layer densities, dense first/last layers, achieved-density accounting
  PredictorPolicy Deja Vu: low-rank predictors score heads/neurons (lookahead: layer l's input scores layer l+1)
  OraclePolicy    exact top-k by true importance (|activation|, head output norm): the upper bound a predictor chases
  TealPolicy      training-free baseline (TEAL): zero low-magnitude entries of each block's inputs and of the MLP
                  intermediate by per-layer magnitude thresholds (skipping the matching weight columns / rows)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .selection import Selection, threshold_selection, topk_selection

MODES = ("topk", "threshold")


def check_density(name: str, values: Sequence[float]):
    for i, v in enumerate(values):
        if not (0.0 < float(v) <= 1.0):
            raise ValueError(f"{name}[{i}] = {v}: densities must be in (0, 1] (1 = dense, 0.25 = keep a quarter)")


def per_layer(value, n_layers: int, name: str) -> list[float]:
    vals = [float(value)] * n_layers if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(vals) != n_layers:
        raise ValueError(f"{name} has {len(vals)} entries but the model has {n_layers} layers")
    check_density(name, vals)
    return vals


def k_for(density: float, n: int) -> int:
    return max(1, min(n, int(round(density * n))))


class SparsityPolicy(nn.Module):
    """Base: dense everywhere. Subclasses override heads/neurons."""

    def begin(self, batch: int, time: int):
        pass

    def layer_input(self, layer: int, x: torch.Tensor):
        pass

    def attn_input(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The normalized attention input; input-sparsity baselines (TEAL) zero entries here."""
        return x

    def mlp_input(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def heads(self, layer, attn_in, attn, rope) -> Selection | None:
        return None

    def neurons(self, layer, mlp_in, mlp, resid) -> Selection | None:
        return None


class DensityPolicy(SparsityPolicy):
    """Per-layer densities with achieved-density accounting (rows selected / rows available, per layer)."""

    def __init__(self, n_layers: int, n_heads: int, ffn_dim: int, mlp_density=1.0, head_density=1.0,
                 dense_layers: Sequence[int] = ()):
        super().__init__()
        self.n_layers, self.n_heads, self.ffn_dim = n_layers, n_heads, ffn_dim
        self.mlp_density = per_layer(mlp_density, n_layers, "mlp_density")
        self.head_density = per_layer(head_density, n_layers, "head_density")
        for l in dense_layers:
            if not -n_layers <= l < n_layers:
                raise ValueError(f"dense layer {l} out of range for a {n_layers}-layer model")
            self.mlp_density[l] = self.head_density[l] = 1.0
        self.reset_stats()

    def reset_stats(self):
        self.sel_rows = {"mlp": torch.zeros(self.n_layers, dtype=torch.float64),
                         "heads": torch.zeros(self.n_layers, dtype=torch.float64)}
        self.sel_tokens = {"mlp": torch.zeros(self.n_layers, dtype=torch.float64),
                           "heads": torch.zeros(self.n_layers, dtype=torch.float64)}

    def _account(self, kind: str, layer: int, sel: Selection | None, n_tokens: int, full: int):
        rows = float(sel.total()) if sel is not None else float(full * n_tokens)
        self.sel_rows[kind][layer] += rows
        self.sel_tokens[kind][layer] += n_tokens * full
        return sel

    def achieved(self) -> dict:
        """Achieved density per layer (fraction of heads / neurons computed), over everything seen since reset."""
        out = {}
        for kind in ("mlp", "heads"):
            tok = self.sel_tokens[kind].clamp(min=1)
            out[kind] = (self.sel_rows[kind] / tok).tolist()
        return out


class OraclePolicy(DensityPolicy):
    """Exact top-k by true importance, computed densely from the block's own input (an analysis upper bound).

    Head importance is computed over the tokens of the current call (full-sequence evaluation), not over a KV cache.
    """

    def __init__(self, *a, mode: str = "topk", mlp_threshold=None, **kw):
        super().__init__(*a, **kw)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode, self.mlp_threshold = mode, mlp_threshold

    def heads(self, layer, attn_in, attn, rope):
        B, T, _ = attn_in.shape
        if self.head_density[layer] >= 1.0:
            return self._account("heads", layer, None, B * T, self.n_heads)
        score = attn.head_output_norms(attn_in, rope).reshape(B * T, -1)
        return self._account("heads", layer, topk_selection(score, k_for(self.head_density[layer], self.n_heads)),
                             B * T, self.n_heads)

    def neurons(self, layer, mlp_in, mlp, resid):
        n = mlp_in.shape[0] * mlp_in.shape[1]
        if self.mlp_density[layer] >= 1.0 and self.mode == "topk":
            return self._account("mlp", layer, None, n, self.ffn_dim)
        score = mlp.activation(mlp_in).abs().reshape(n, -1)
        if self.mode == "threshold":
            sel = threshold_selection(score, self.mlp_threshold[layer])
        else:
            sel = topk_selection(score, k_for(self.mlp_density[layer], self.ffn_dim))
        return self._account("mlp", layer, sel, n, self.ffn_dim)


class PredictorPolicy(DensityPolicy):
    """Deja Vu: trained low-rank predictors choose each token's heads and neurons.

    Where a predictor reads from follows the predictors' ``input_scheme`` (see ``predictors/train.py``): with
    "lookahead" layer l+1's sets are scored from layer l's input (off the critical path on a GPU), with "half"
    (the paper's) neurons from the same layer's input and heads from the previous MLP's input, with "same" inline.
    ``mode="threshold"`` keeps every block whose predictor logit exceeds a per-layer threshold (calibrated to the
    target density), so easy tokens read fewer rows than hard ones.
    """

    def __init__(self, predictors, mlp_density=1.0, head_density=1.0, dense_layers=(), mode="topk",
                 mlp_threshold=None, head_threshold=None):
        meta = predictors.meta
        super().__init__(meta["n_layers"], meta["n_heads"], meta["ffn_dim"], mlp_density, head_density, dense_layers)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "threshold" and (mlp_threshold is None or head_threshold is None):
            raise ValueError("threshold mode needs per-layer mlp_threshold and head_threshold (see calibrate_thresholds)")
        self.predictors, self.mode = predictors, mode
        self.mlp_threshold, self.head_threshold = mlp_threshold, head_threshold
        self.scheme = predictors.input_scheme
        self._scores: dict[tuple[str, int], torch.Tensor] = {}

    def begin(self, batch, time):
        self._scores = {}

    def _score(self, kind, layer, x):
        if layer >= self.n_layers:
            return
        density = self.head_density[layer] if kind == "heads" else self.mlp_density[layer]
        if density >= 1.0 or (kind, layer) in self._scores:
            return
        fn = self.predictors.head_scores if kind == "heads" else self.predictors.neuron_scores
        self._scores[(kind, layer)] = fn(layer, x.reshape(-1, x.shape[-1]))

    def layer_input(self, layer, x):
        if self.scheme == "lookahead":
            for kind in ("heads", "mlp"):
                self._score(kind, layer, x)  # no-op unless this is the first block run (layer 0)
                self._score(kind, layer + 1, x)
        elif self.scheme == "half":
            self._score("heads", layer, x)  # only for the first block run; otherwise scored from the last MLP input
            self._score("mlp", layer, x)
        else:
            self._score("heads", layer, x)

    def _select(self, kind, layer, n, full):
        density = self.head_density[layer] if kind == "heads" else self.mlp_density[layer]
        scores = self._scores.pop((kind, layer), None)
        if density >= 1.0:
            return self._account(kind, layer, None, n, full)
        if scores is None:
            raise RuntimeError(f"no {kind} scores for layer {layer} (input scheme {self.scheme!r})")
        if self.mode == "threshold":
            thr = (self.head_threshold if kind == "heads" else self.mlp_threshold)[layer]
            sel = threshold_selection(scores, thr)
        else:
            sel = topk_selection(scores, k_for(density, full))
        return self._account(kind, layer, sel, n, full)

    def heads(self, layer, attn_in, attn, rope):
        return self._select("heads", layer, attn_in.shape[0] * attn_in.shape[1], self.n_heads)

    def neurons(self, layer, mlp_in, mlp, resid):
        if self.scheme == "same":
            self._score("mlp", layer, resid)
        elif self.scheme == "half":
            self._score("heads", layer + 1, resid)
        return self._select("mlp", layer, mlp_in.shape[0] * mlp_in.shape[1], self.ffn_dim)


class TealPolicy(SparsityPolicy):
    """TEAL-style magnitude thresholds, calibrated per layer so that ``density`` of entries survive on average.

    Sparsifies the normalized attention input (q/k/v columns), the normalized MLP input (fc1 / gate / up columns)
    and the MLP intermediate (fc2 / down rows). o_proj stays dense. The quality numbers come from zeroing those
    entries, which gives the same result as skipping the matching weight columns; it is a quality baseline, not
    a runtime mode of dejavu.
    """

    def __init__(self, thresholds: dict, density: float):
        super().__init__()
        check_density("teal density", [density])
        self.t, self.density = thresholds, density  # {"attn": [L], "mlp": [L], "inter": [L]}

    @staticmethod
    def _cut(x, t):
        return x * (x.abs() > t)

    def attn_input(self, layer, x):
        return self._cut(x, self.t["attn"][layer])

    def mlp_input(self, layer, x):
        return self._cut(x, self.t["mlp"][layer])

    def neurons(self, layer, mlp_in, mlp, resid):
        n = mlp_in.shape[0] * mlp_in.shape[1]
        return threshold_selection(mlp.activation(mlp_in).abs().reshape(n, -1), self.t["inter"][layer])
