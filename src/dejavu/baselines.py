"""Training-free baselines on the same model: TEAL-style magnitude thresholds, and the oracle.

TEAL (Liu et al., 2024) keeps, per layer, only the entries of each linear layer's input whose magnitude is above
a threshold set from the activation distribution, and skips the matching weight columns. Here the thresholds are the
(1 - density) quantiles of |input| measured by a dense pass over held-apart text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .models.decoder import DecoderLM
from .models.spec import ModelSpec
from .runtime.policy import OraclePolicy, SparsityPolicy, TealPolicy

_MAX_SAMPLES = 1 << 22


class _MagnitudeRecorder(SparsityPolicy):
    def __init__(self):
        super().__init__()
        self.vals: dict[tuple[str, int], list[torch.Tensor]] = {}

    def _keep(self, key, layer, x):
        v = x.detach().abs().flatten().float()
        if v.numel() > _MAX_SAMPLES:
            v = v[torch.randint(0, v.numel(), (_MAX_SAMPLES,), device=v.device)]
        self.vals.setdefault((key, layer), []).append(v.cpu())

    def attn_input(self, layer, x):
        self._keep("attn", layer, x)
        return x

    def mlp_input(self, layer, x):
        self._keep("mlp", layer, x)
        return x

    def neurons(self, layer, mlp_in, mlp, resid):
        self._keep("inter", layer, mlp.activation(mlp_in))
        return None


@torch.no_grad()
def teal_thresholds(model: DecoderLM, ids: torch.Tensor, densities: Sequence[float]) -> dict[float, dict]:
    """ids (W, T) held-apart tokens -> {density: {"attn": [L], "mlp": [L], "inter": [L]}}."""
    rec = _MagnitudeRecorder()
    for w in ids:
        model(w[None], sparsity=rec)
    L = model.spec.n_layers
    out = {}
    for dens in densities:
        out[dens] = {}
        for key in ("attn", "mlp", "inter"):
            ts = []
            for l in range(L):
                v = torch.cat(rec.vals[(key, l)])
                if v.numel() > 1 << 24:
                    v = v[torch.randperm(v.numel())[: 1 << 24]]
                ts.append(float(torch.quantile(v, 1 - dens)) if dens < 1 else -1.0)
            out[dens][key] = ts
    return out


def teal_policy(thresholds: dict, density: float) -> TealPolicy:
    return TealPolicy(thresholds[density], density)


def teal_block_bytes_skipped(spec: ModelSpec, density: float) -> float:
    """TEAL reads `density` of q, k, v, and of every MLP matrix; o_proj stays dense."""
    a = spec.attn_param_counts()
    sparse_part = a["q"] + a["k"] + a["v"] + spec.mlp_params()
    return (1 - density) * sparse_part / spec.block_params()


def teal_density_for(spec: ModelSpec, block_bytes_skipped: float) -> float:
    """The uniform TEAL density that skips the same fraction of block bytes."""
    a = spec.attn_param_counts()
    frac = (a["q"] + a["k"] + a["v"] + spec.mlp_params()) / spec.block_params()
    return float(min(1.0, max(0.05, 1 - block_bytes_skipped / frac)))


def oracle_policy(spec: ModelSpec, mlp_density, head_density) -> OraclePolicy:
    return OraclePolicy(spec.n_layers, spec.n_heads, spec.ffn_dim, mlp_density=mlp_density, head_density=head_density)
