"""What a decoder-only LM looks like to dejavu: one small description shared by every architecture.

Adapters (``adapters.py``) turn a Hugging Face config and state dict into a :class:`ModelSpec` and a state dict in
dejavu's canonical layout; everything downstream (calibration, predictors, sparse runtime, kernels, benchmarks) only
ever sees this description.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class ModelSpec:
    arch: str  # "opt" | "llama" (adapter family)
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    mlp_kind: str  # "relu" (fc1 -> ReLU -> fc2) | "swiglu" (silu(gate) * up -> down)
    norm_kind: str  # "layernorm" | "rmsnorm"
    norm_eps: float
    pos_kind: str  # "learned" (OPT) | "rope"
    max_positions: int
    attn_bias: bool = False  # q/k/v biases (OPT, Qwen2)
    out_bias: bool = False  # o_proj bias (OPT)
    mlp_bias: bool = False  # fc1/fc2 biases (OPT)
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    name: str = "unnamed"
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.mlp_kind not in ("relu", "swiglu"):
            raise ValueError(f"mlp_kind must be 'relu' or 'swiglu', got {self.mlp_kind!r}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 = multi-head attention, >1 = grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ModelSpec":
        return cls(**d)

    def identity(self) -> dict:
        """What a predictor file must match to be used with this model (shapes and family, not the name)."""
        keys = ("arch", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "mlp_kind")
        return {k: getattr(self, k) for k in keys}

    # ---- weight bytes per decode token (what a batch-1 step must read) -------------------------------------------
    def attn_param_counts(self) -> dict:
        d, hd = self.d_model, self.head_dim
        return {"q": self.n_heads * hd * d, "k": self.n_kv_heads * hd * d, "v": self.n_kv_heads * hd * d,
                "o": self.n_heads * hd * d}

    def mlp_params(self) -> int:
        mats = 3 if self.mlp_kind == "swiglu" else 2
        return mats * self.ffn_dim * self.d_model

    def block_params(self) -> int:
        return sum(self.attn_param_counts().values()) + self.mlp_params()

    def lm_head_params(self) -> int:
        return self.vocab_size * self.d_model


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
