"""Text generation on a DecoderLM with a static KV cache: dense prefill, then (sparse) decode one token at a time.

Small functions in the gpt-fast manner: ``prefill``, ``decode_one_token``, ``generate``. Sparsity applies to decode
steps (the model's policy); prefill runs dense, as a serving system would (prompt tokens are processed in parallel,
where skipping rows per token saves nothing on a GPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: DecoderLM.generate imports this module, so no import back at run time
    from ..models.decoder import DecoderLM


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, generator=None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


@torch.no_grad()
def prefill(model: DecoderLM, ids: torch.Tensor, cache) -> torch.Tensor:
    """Dense forward over the prompt (B, T), filling the cache. -> last-position logits (B, V)."""
    return model(ids, start=0, cache=cache, sparsity=None)[:, -1]


@torch.no_grad()
def decode_one_token(model: DecoderLM, tok: torch.Tensor, pos: int, cache) -> torch.Tensor:
    """One step: tok (B,) at position ``pos`` -> logits (B, V), with the model's sparsity policy."""
    return model(tok[:, None], start=pos, cache=cache)[:, -1]


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (B, T_prompt + n_new)
    n_new: int
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens.shape[0] * self.n_new / max(self.decode_seconds, 1e-9)


@torch.no_grad()
def generate(model: DecoderLM, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, eos_id: int | None = None, seed: int = 0,
             on_token: Callable[[torch.Tensor], None] | None = None) -> GenerationResult:
    """Greedy or sampled continuation of ``ids`` (B, T). Stops early when every row has produced ``eos_id``."""
    B, T = ids.shape
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    limit = model.spec.max_positions if model.spec.pos_kind == "learned" else 1 << 30
    if T + max_new_tokens > limit:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's {limit} positions")
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    cache = model.new_cache(B, T + max_new_tokens)
    out = [ids]
    tok = sample(prefill(model, ids, cache), temperature, top_k, gen)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    t0 = time.perf_counter()
    n = 0
    for n in range(1, max_new_tokens + 1):
        out.append(tok[:, None])
        if on_token is not None:
            on_token(tok)
        if eos_id is not None:
            done |= tok == eos_id
            if bool(done.all()):
                break
        if n == max_new_tokens:
            break
        tok = sample(decode_one_token(model, tok, T + n - 1, cache), temperature, top_k, gen)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return GenerationResult(torch.cat(out, 1), n, time.perf_counter() - t0)
