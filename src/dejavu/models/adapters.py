"""Per-architecture adapters: Hugging Face config + state dict -> (ModelSpec, canonical state dict).

Canonical layout (what :class:`dejavu.models.decoder.DecoderLM` holds), per layer ``i``::

    layers.i.norm1.{weight,bias}                       pre-attention norm
    layers.i.attn.{wq,wk,wv}  [heads*hd, d]            rows grouped per head (head-sparse gathers take row blocks)
    layers.i.attn.{bq,bk,bv}  [heads*hd]               optional
    layers.i.attn.wo_t        [n_heads*hd, d]          o_proj.weight TRANSPOSED: one row block per head
    layers.i.attn.bo          [d]                      optional
    layers.i.norm2.{weight,bias}
    layers.i.mlp.w1           [ffn, d]                 fc1 (ReLU) or gate (SwiGLU): one row per neuron
    layers.i.mlp.w3           [ffn, d]                 up (SwiGLU only)
    layers.i.mlp.w2t          [ffn, d]                 fc2/down TRANSPOSED: one row per neuron
    layers.i.mlp.{b1,b2}                               optional (OPT)

The second matrices are stored transposed *instead of* the original so that a sparse step reads only the rows of the
selected neurons/heads, and the dense path uses the same tensors (no second copy).
"""

from __future__ import annotations

from typing import Callable

import torch

from .spec import ModelSpec


class UnsupportedModelError(ValueError):
    pass


def _cfg(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


class Adapter:
    """Maps one HF architecture family onto the canonical layout."""

    family: str = ""

    def spec(self, config, name: str = "unnamed") -> ModelSpec:  # pragma: no cover - interface
        raise NotImplementedError

    def convert(self, spec: ModelSpec, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - interface


class OPTAdapter(Adapter):
    family = "opt"

    def spec(self, config, name="unnamed") -> ModelSpec:
        if not getattr(config, "do_layer_norm_before", True):
            raise UnsupportedModelError("OPT with post-layer-norm blocks (opt-350m) is not supported; use another OPT size")
        if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
            raise UnsupportedModelError("OPT with a projected embedding (word_embed_proj_dim != hidden_size) is not supported")
        if getattr(config, "activation_function", "relu") != "relu":
            raise UnsupportedModelError(f"OPT activation {config.activation_function!r} is not supported (only relu)")
        bias = bool(getattr(config, "enable_bias", True))
        n_heads = config.num_attention_heads
        return ModelSpec(
            arch="opt", vocab_size=config.vocab_size, d_model=config.hidden_size, n_layers=config.num_hidden_layers,
            n_heads=n_heads, n_kv_heads=n_heads, head_dim=config.hidden_size // n_heads, ffn_dim=config.ffn_dim,
            mlp_kind="relu", norm_kind="layernorm", norm_eps=1e-5, pos_kind="learned",
            max_positions=config.max_position_embeddings, attn_bias=bias, out_bias=bias, mlp_bias=bias,
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)), name=name,
        )

    def convert(self, spec, hf):
        p = "model.decoder."
        out = {"embed.weight": hf[p + "embed_tokens.weight"],
               "pos_embed.weight": hf[p + "embed_positions.weight"][2:],  # OPT offsets positions by 2
               "norm_f.weight": hf[p + "final_layer_norm.weight"], "norm_f.bias": hf[p + "final_layer_norm.bias"],
               "lm_head.weight": hf.get("lm_head.weight", hf[p + "embed_tokens.weight"])}
        for i in range(spec.n_layers):
            s, t = f"{p}layers.{i}.", f"layers.{i}."
            a = s + "self_attn."
            out.update({
                t + "norm1.weight": hf[s + "self_attn_layer_norm.weight"], t + "norm1.bias": hf[s + "self_attn_layer_norm.bias"],
                t + "norm2.weight": hf[s + "final_layer_norm.weight"], t + "norm2.bias": hf[s + "final_layer_norm.bias"],
                t + "attn.wq": hf[a + "q_proj.weight"], t + "attn.wk": hf[a + "k_proj.weight"],
                t + "attn.wv": hf[a + "v_proj.weight"], t + "attn.wo_t": hf[a + "out_proj.weight"].t(),
                t + "mlp.w1": hf[s + "fc1.weight"], t + "mlp.w2t": hf[s + "fc2.weight"].t(),
            })
            if spec.attn_bias:
                out.update({t + "attn.bq": hf[a + "q_proj.bias"], t + "attn.bk": hf[a + "k_proj.bias"],
                            t + "attn.bv": hf[a + "v_proj.bias"], t + "attn.bo": hf[a + "out_proj.bias"]})
            if spec.mlp_bias:
                out.update({t + "mlp.b1": hf[s + "fc1.bias"], t + "mlp.b2": hf[s + "fc2.bias"]})
        return out


class LlamaAdapter(Adapter):
    """Llama family: RMSNorm, RoPE, grouped-query attention, SwiGLU. Also Mistral and Qwen2 layouts."""

    family = "llama"

    def spec(self, config, name="unnamed") -> ModelSpec:
        act = _cfg(config, "hidden_act", default="silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"Llama-family MLP activation {act!r} is not supported (only silu/SwiGLU)")
        n_heads = config.num_attention_heads
        rope = _cfg(config, "rope_parameters", "rope_scaling", default=None) or {}
        theta = rope.get("rope_theta", None) or _cfg(config, "rope_theta", default=10000.0)
        bias = bool(_cfg(config, "attention_bias", default=False)) or config.model_type == "qwen2"
        return ModelSpec(
            arch="llama", vocab_size=config.vocab_size, d_model=config.hidden_size,
            n_layers=config.num_hidden_layers, n_heads=n_heads,
            n_kv_heads=_cfg(config, "num_key_value_heads", default=n_heads),
            head_dim=_cfg(config, "head_dim", default=config.hidden_size // n_heads),
            ffn_dim=config.intermediate_size, mlp_kind="swiglu", norm_kind="rmsnorm",
            norm_eps=float(_cfg(config, "rms_norm_eps", default=1e-6)), pos_kind="rope",
            max_positions=_cfg(config, "max_position_embeddings", default=4096), attn_bias=bias,
            rope_theta=float(theta), tie_embeddings=bool(_cfg(config, "tie_word_embeddings", default=False)),
            name=name, extra={"rope_type": rope.get("rope_type", rope.get("type", "default"))},
        )

    def convert(self, spec, hf):
        out = {"embed.weight": hf["model.embed_tokens.weight"], "norm_f.weight": hf["model.norm.weight"],
               "lm_head.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])}
        for i in range(spec.n_layers):
            s, t = f"model.layers.{i}.", f"layers.{i}."
            a, m = s + "self_attn.", s + "mlp."
            out.update({
                t + "norm1.weight": hf[s + "input_layernorm.weight"],
                t + "norm2.weight": hf[s + "post_attention_layernorm.weight"],
                t + "attn.wq": hf[a + "q_proj.weight"], t + "attn.wk": hf[a + "k_proj.weight"],
                t + "attn.wv": hf[a + "v_proj.weight"], t + "attn.wo_t": hf[a + "o_proj.weight"].t(),
                t + "mlp.w1": hf[m + "gate_proj.weight"], t + "mlp.w3": hf[m + "up_proj.weight"],
                t + "mlp.w2t": hf[m + "down_proj.weight"].t(),
            })
            if spec.attn_bias:
                out.update({t + "attn.bq": hf[a + "q_proj.bias"], t + "attn.bk": hf[a + "k_proj.bias"],
                            t + "attn.bv": hf[a + "v_proj.bias"]})
        return out


ADAPTERS: dict[str, Callable[[], Adapter]] = {
    "opt": OPTAdapter,
    "llama": LlamaAdapter,
    "mistral": LlamaAdapter,
    "qwen2": LlamaAdapter,
}


def adapter_for(config) -> Adapter:
    mt = getattr(config, "model_type", None)
    if mt not in ADAPTERS:
        raise UnsupportedModelError(
            f"model_type {mt!r} is not supported; dejavu supports: {', '.join(sorted(ADAPTERS))} "
            "(OPT, and the Llama family incl. Mistral and Qwen2 layouts)")
    return ADAPTERS[mt]()
