"""Weight bytes a decode token reads: the quantity batch-1 decode time is proportional to.

Per block, with MLP density m and head density h (fractions of neurons / query heads computed):
  MLP        m * (2 or 3) * ffn * d                (fc1+fc2, or gate+up+down; rows of the selected neurons)
  attention  h * (q + o) + kv * (k + v)            kv = 1 under kv_policy "all" (K/V always computed), else the
                                                   fraction of KV heads the selected query heads need
``block_bytes_skipped`` = 1 - read / dense over attention + MLP weights of all blocks (embeddings, LM head and the
predictors are reported separately, so the headline fraction is about the blocks the method sparsifies).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .kernels.predictor_ops import predictor_bytes
from .models.spec import ModelSpec


def layer_params_read(spec: ModelSpec, mlp_density: float, head_density: float, kv_fraction: float = 1.0) -> float:
    a = spec.attn_param_counts()
    return (mlp_density * spec.mlp_params() + head_density * (a["q"] + a["o"]) + kv_fraction * (a["k"] + a["v"]))


def bytes_summary(spec: ModelSpec, mlp_density: Sequence[float], head_density: Sequence[float],
                  kv_fraction: Sequence[float] | float = 1.0, predictor_params: int = 0, bytes_per_param: float = 2.0) -> dict:
    L = spec.n_layers
    kvf = [float(kv_fraction)] * L if isinstance(kv_fraction, (int, float)) else list(kv_fraction)
    read = sum(layer_params_read(spec, mlp_density[l], head_density[l], kvf[l]) for l in range(L))
    dense = L * spec.block_params()
    mlp_dense = L * spec.mlp_params()
    attn_dense = dense - mlp_dense
    mlp_read = sum(mlp_density[l] * spec.mlp_params() for l in range(L))
    head = spec.lm_head_params()
    return {
        "block_bytes_skipped": 1 - read / dense,
        "mlp_bytes_skipped": 1 - mlp_read / mlp_dense,
        "attn_bytes_skipped": 1 - (read - mlp_read) / attn_dense,
        "mlp_density": sum(mlp_density) / L,
        "head_density": sum(head_density) / L,
        "block_params_dense": dense,
        "block_params_read": read,
        "predictor_params": predictor_params,
        "predictor_fraction_of_blocks": predictor_params / dense,
        "lm_head_params": head,
        # everything a decode step reads (blocks + predictors + LM head), sparse over dense
        "step_bytes_ratio": (read + predictor_params + head) / (dense + head),
        "bytes_per_param": bytes_per_param,
    }


def predictor_params(meta: dict, mlp_density: Sequence[float], head_density: Sequence[float], dtype=torch.float16
                     ) -> float:  # fmt: skip
    """Predictor weights actually read, in parameters of ``dtype`` (bytes read / its size): a layer kept dense runs
    no predictor for that part; a set rounded to int8 rows (``meta["weights"] == "int8"``) counts its int8 bytes and
    scales; a predictor that reads fewer bytes as its factors' product is counted as that product
    (``kernels.predictor_bytes``, the decode runtime's count)."""
    d, rm, rh, N, H = meta["d_model"], meta["mlp_rank"], meta["head_rank"], meta["ffn_dim"], meta["n_heads"]
    int8 = meta.get("weights") == "int8"
    n = 0
    for m, h in zip(mlp_density, head_density):
        if m < 1:
            n += predictor_bytes(d, rm, N, dtype, int8=int8)
        if h < 1:
            n += predictor_bytes(d, rh, H, dtype, int8=int8)
    return n / torch.empty((), dtype=dtype).element_size()
