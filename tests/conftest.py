import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on the numpy interpreter; must be set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from dejavu.models.load import from_hf


def tiny_hf(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "opt":
        cfg = OPTConfig(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, ffn_dim=96,
                        max_position_embeddings=64, word_embed_proj_dim=48, do_layer_norm_before=True)
        hf = OPTForCausalLM(cfg)
    else:
        cfg = LlamaConfig(vocab_size=101, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                          num_key_value_heads=2, intermediate_size=80, max_position_embeddings=64,
                          tie_word_embeddings=False)
        hf = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms and biases so that a wrong mapping cannot pass
        for n, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return hf.eval()


@pytest.fixture(params=["opt", "llama"])
def tiny(request):
    hf = tiny_hf(request.param)
    return hf, from_hf(hf, name=f"tiny-{request.param}")


class CharTokenizer:
    """Offline stand-in for a HF tokenizer: one id per byte (mod vocab)."""

    def __init__(self, vocab: int):
        self.vocab, self.eos_token_id = vocab, 0

    def __call__(self, text):
        return {"input_ids": [1 + b % (self.vocab - 1) for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + i % 90) for i in ids)

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(r) for r in rows]


def random_docs(n, length=120, seed=0):
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "seven", "blue", "market", "the", "of"]
    return [" ".join(rng.choice(words) for _ in range(length // 5)) for _ in range(n)]


@pytest.fixture
def tiny_llama():
    return from_hf(tiny_hf("llama"), name="tiny-llama")


@pytest.fixture(scope="session")
def tiny_calibration(tmp_path_factory):
    """A recorded calibration of the tiny Llama on synthetic documents (shared by several tests)."""
    from dejavu.calibrate import CalibrationSet, CalibrationSource, record

    model = from_hf(tiny_hf("llama"), name="tiny-llama")
    out = tmp_path_factory.mktemp("cal")
    src = CalibrationSource("file", random_docs(60), path="synthetic", doc_range=(0, 60))
    record(model, CharTokenizer(model.spec.vocab_size), src, out, max_len=64, tokens_per_doc=32, shard_tokens=300,
           progress=False)
    return model, CalibrationSet(out)
