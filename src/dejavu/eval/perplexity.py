"""Perplexity of one or more models on exactly the same token windows.

Convention (reproduces the reference SmolLM2-135M-Instruct WikiText-2 numbers: with this code the whole
test file, 301,948 tokens, at 1024-token windows gives 294 windows, 300,762 predicted tokens, ppl 24.9837 --
reference 24.984; keeping the 892-token tail instead would give 24.9865.  At 512: 589 windows, ppl 29.9955 --
reference 29.996; with the tail 29.9983.  At 2048: 147 windows, ppl 21.9674 -- reference 21.968 (a 3e-5
relative gap, fp32 numerics; with the tail it would be 21.9782)):

* the text is tokenized once, whole, with plain ``tokenizer(text)["input_ids"]`` (no BOS is added by the
  SmolLM2 tokenizer, and none is inserted here);
* it is cut into non-overlapping windows of ``window`` tokens; the ragged tail (``len(ids) % window`` tokens)
  is dropped by default (``keep_tail=True`` keeps it as a last, shorter window);
* in each window every token after the first is predicted from the tokens before it in the same window
  (``window - 1`` predictions per window, no context carried across windows);
* ``ppl = exp(sum of NLL / number of predicted tokens)``; with equal windows this equals the common
  ``exp(mean over windows of the window's mean NLL)``.

Models are ``LogitsFn`` callables: ``input_ids [B, T] (long) -> logits [B, T, V]``.  For every batch every
model is called on the same input, so dense and sparse variants are scored on identical tokens.  Log-softmax
is taken in fp32, one row at a time, and logits are dropped right after, to keep peak memory bounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def hf_logits_fn(model) -> LogitsFn:
    """Wrap a Hugging Face causal LM as a :data:`LogitsFn` (no attention mask: inputs are never left-padded)."""

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        return model(input_ids.to(device)).logits

    return fn


def as_models(models: Mapping[str, LogitsFn] | LogitsFn) -> dict[str, LogitsFn]:
    """Accept a single LogitsFn (named ``"model"``) or a name -> LogitsFn mapping."""
    if callable(models) and not isinstance(models, Mapping):
        return {"model": models}
    if not models:
        raise ValueError("no models to score")
    return dict(models)


def tokenize_text(tokenizer, text: str) -> list[int]:
    """Plain ``tokenizer(text)["input_ids"]`` (the reference convention; no BOS for SmolLM2)."""
    return list(tokenizer(text)["input_ids"])


def window_token_ids(
    ids: Sequence[int] | torch.Tensor,
    window: int,
    max_windows: int | None = None,
    keep_tail: bool = False,
) -> list[torch.Tensor]:
    """Cut a token sequence into non-overlapping windows of ``window`` tokens (1-D LongTensors).

    The ragged tail is dropped unless ``keep_tail`` (a tail of a single token predicts nothing and is always
    dropped).  ``max_windows`` keeps only the first windows.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n_full = t.numel() // window
    out = [t[i * window:(i + 1) * window] for i in range(n_full)]
    tail = t.numel() - n_full * window
    if keep_tail and tail >= 2:
        out.append(t[n_full * window:])
    if max_windows is not None:
        out = out[:max_windows]
    return out


def c4_windows(
    tokenizer,
    docs: Iterable[str],
    window: int,
    max_windows: int | None = None,
    keep_tail: bool = False,
) -> list[torch.Tensor]:
    """Token windows for C4 perplexity.

    Convention: each document is tokenized on its own (plain ``tokenizer(doc)["input_ids"]``) and followed by
    the tokenizer's EOS token; the documents are concatenated in the given order into one stream, which is cut
    into non-overlapping windows like :func:`window_token_ids` (ragged tail dropped by default).  Windows may
    thus span document boundaries, with the EOS marking the boundary, and no document text is wasted.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id to separate C4 documents")
    stream: list[int] = []
    need = None if max_windows is None else max_windows * window
    for doc in docs:
        stream.extend(tokenize_text(tokenizer, doc))
        stream.append(eos)
        if need is not None and len(stream) >= need:
            break
    return window_token_ids(stream, window, max_windows=max_windows, keep_tail=keep_tail)


def wikitext2_windows(tokenizer, window: int, data_dir=None, max_windows: int | None = None,
                      keep_tail: bool = False) -> list[torch.Tensor]:
    """Windows of the whole WikiText-2 test file (CRLF -> LF, tokenized at once)."""
    from .data import load_wikitext2_test

    ids = tokenize_text(tokenizer, load_wikitext2_test(data_dir))
    return window_token_ids(ids, window, max_windows=max_windows, keep_tail=keep_tail)


def checked_logits(name: str, fn: LogitsFn, x: torch.Tensor) -> torch.Tensor:
    """fn(x), with a clear error when a model does not return [B, T, V] logits for x [B, T]."""
    logits = fn(x)
    if logits.dim() != 3 or logits.shape[:2] != x.shape:
        raise ValueError(f"model {name!r} returned logits of shape {tuple(logits.shape)} for input "
                         f"{tuple(x.shape)}; expected [B, T, V]")
    return logits


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL ``-log softmax(logits)[target]`` computed in fp32.  logits [T, V], targets [T] -> [T]."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _batches(windows: Sequence[torch.Tensor], batch_size: int) -> list[list[int]]:
    """Index batches; only windows of the same length share a batch (the tail goes alone)."""
    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        by_len.setdefault(int(w.numel()), []).append(i)
    out = []
    for idx in by_len.values():
        out += [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]
    return sorted(out, key=lambda b: b[0])


@torch.inference_mode()
def window_nlls(
    models: Mapping[str, LogitsFn] | LogitsFn,
    windows: Sequence[torch.Tensor],
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict[str, list[tuple[float, int]]]:
    """Per-window ``(sum of NLL in nats, number of predicted tokens)`` for every model, in window order."""
    models = as_models(models)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    res: dict[str, list[tuple[float, int] | None]] = {n: [None] * len(windows) for n in models}
    batches = _batches(windows, batch_size)
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, unit="batch")
    for b in it:
        x = torch.stack([windows[i] for i in b]).long()
        targets = x[:, 1:]
        for name, fn in models.items():
            logits = checked_logits(name, fn, x)
            for r, i in enumerate(b):
                nll = token_nll(logits[r, :-1], targets[r].to(logits.device))
                res[name][i] = (float(nll.double().sum()), int(nll.numel()))
            del logits
    return res  # type: ignore[return-value]


def perplexity(
    models: Mapping[str, LogitsFn] | LogitsFn,
    windows: Sequence[torch.Tensor],
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict[str, dict[str, float]]:
    """Perplexity of every model on the same windows.

    Returns ``{name: {"ppl", "nll", "nll_sum", "tokens", "windows"}}`` where ``nll`` is the mean NLL per
    predicted token (nats), ``tokens`` the number of predicted tokens (``window - 1`` per window) and
    ``ppl = exp(nll)``.
    """
    if len(windows) == 0:
        raise ValueError("no windows to score")
    per = window_nlls(models, windows, batch_size=batch_size, progress=progress, desc=desc)
    out = {}
    for name, rows in per.items():
        s = math.fsum(r[0] for r in rows)
        n = sum(r[1] for r in rows)
        nll = s / n
        out[name] = {"ppl": math.exp(nll), "nll": nll, "nll_sum": s, "tokens": n, "windows": len(rows)}
    return out
