"""Calibration (the paper's Algorithm 1, data side): run the dense model, record what predictors learn from.

Per layer l and recorded token we keep (fp16):
  x_in.l    the residual stream entering block l (attention input, before its norm)     [n, d]
  mlp_in.l  the residual stream entering the MLP of block l (after attention)             [n, d]
  act.l     |MLP activation| per neuron (ReLU output for OPT, |silu(gate) * up| SwiGLU)   [n, ffn]
  heads.l   output norm of each query head's contribution (after o_proj)                 [n, heads]

Recording streams to ``DIR/shard_00000.safetensors, ...`` with bounded memory (one shard's worth of tokens in RAM).
``DIR/manifest.json`` is rewritten atomically after each shard, at a document boundary, so an interrupted run
resumes after the last finished shard with nothing corrupt or counted twice. A finished run has ``complete: true``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .atomic import atomic_path, write_json_atomic
from .models.decoder import DecoderLM
from .runtime.generate import generate
from .runtime.policy import SparsityPolicy

KEYS = ("x_in", "mlp_in", "act", "heads")
MANIFEST = "manifest.json"

GENERIC_PROMPTS = [
    "The history of the city begins", "In this article we explain how", "Scientists have discovered that",
    "Here is a simple recipe for", "The main reasons for the economic", "Once upon a time, in a small village,",
    "The following guide describes the installation", "According to the latest report,", "My favourite book is",
    "The court ruled on Tuesday that", "Photosynthesis is the process by which", "Welcome to our website! We offer",
    "The team won the championship after", "To solve this equation, first", "The museum's new exhibition",
    "Climate change affects agriculture because",
]


class CalibrationError(ValueError):
    pass


class Recorder(SparsityPolicy):
    """A dense 'policy' that records block inputs, MLP activations and head norms at chosen token positions."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.keep = keep  # flat (batch*time) positions to record
        self.rec: dict[str, torch.Tensor] = {}

    def _put(self, key, layer, t):
        self.rec[f"{key}.{layer}"] = t.reshape(-1, t.shape[-1])[self.keep].to(torch.float16).cpu()

    def layer_input(self, layer, x):
        self._put("x_in", layer, x)

    def heads(self, layer, attn_in, attn, rope):
        self._put("heads", layer, attn.head_output_norms(attn_in, rope))
        return None

    def neurons(self, layer, mlp_in, mlp, resid):
        self._put("mlp_in", layer, resid)
        self._put("act", layer, mlp.activation(mlp_in).abs())
        return None


@dataclass
class CalibrationSource:
    kind: str  # "file" | "generated"
    texts: list[str]
    path: str | None = None
    doc_range: tuple[int, int] | None = None

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "doc_range": self.doc_range, "n_docs": len(self.texts)}


def generated_source(model: DecoderLM, tokenizer, n_docs: int, length: int = 160, seed: int = 0,
                     progress: bool = True) -> CalibrationSource:
    """Calibration text the model writes itself from generic prompts (no corpus needed)."""
    texts = []
    prompts = [GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)] for i in range(n_docs)]
    bs = 8
    for s in tqdm(range(0, n_docs, bs), desc="generating calibration text", disable=not progress):
        batch = prompts[s:s + bs]
        enc = [tokenizer(p)["input_ids"] for p in batch]
        width = min(len(e) for e in enc)  # same-length prompt prefixes: no padding needed
        ids = torch.tensor([e[:width] for e in enc], device=model.device)
        res = generate(model, ids, length, temperature=0.8, top_k=50, seed=seed + s)
        texts += tokenizer.batch_decode(res.tokens, skip_special_tokens=True)
    return CalibrationSource("generated", texts)


def _settings(max_len, tokens_per_doc, shard_tokens, seed):
    return {"max_len": max_len, "tokens_per_doc": tokens_per_doc, "shard_tokens": shard_tokens, "seed": seed}


@torch.no_grad()
def record(model: DecoderLM, tokenizer, source: CalibrationSource, out_dir: str | os.PathLike, max_len: int = 512,
           tokens_per_doc: int = 64, shard_tokens: int = 8192, seed: int = 0, progress: bool = True,
           stop_after_shards: int | None = None) -> dict:
    """Record calibration activations for ``source`` into ``out_dir`` (resumable). Returns the manifest."""
    if not source.texts:
        raise CalibrationError("the calibration source has no documents")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(max_len, tokens_per_doc, shard_tokens, seed)
    man_path = out / MANIFEST
    manifest = {"version": 1, "model": model.spec.identity(), "model_name": model.spec.name,
                "source": json.loads(json.dumps(source.describe())), "settings": settings, "docs_done": 0, "tokens": 0, "shards": [],
                "complete": False}
    if man_path.is_file():
        old = json.loads(man_path.read_text())
        same = (old.get("model") == manifest["model"] and old.get("settings") == settings
                and old.get("source") == manifest["source"])
        if not same:
            raise CalibrationError(f"{out} already holds a calibration of another model, source or settings; "
                                   "choose a new --out directory (or delete this one)")
        manifest = old
        for f in out.glob("*.tmp"):  # a shard being written when we were interrupted
            f.unlink()
    if manifest["complete"]:
        return manifest
    buf: dict[str, list[torch.Tensor]] = {}
    n_buf, shards_written = 0, 0
    bar = tqdm(total=len(source.texts), initial=manifest["docs_done"], desc="calibrating", unit="doc",
               disable=not progress)

    def flush(doc_end: int):
        nonlocal buf, n_buf, shards_written
        name = f"shard_{len(manifest['shards']):05d}.safetensors"
        tensors = {k: torch.cat(v) for k, v in buf.items()}
        with atomic_path(out / name) as tmp:
            save_file(tensors, str(tmp))
        manifest["shards"].append({"file": name, "tokens": n_buf})
        manifest["docs_done"], manifest["tokens"] = doc_end, manifest["tokens"] + n_buf
        write_json_atomic(man_path, manifest)
        buf, n_buf = {}, 0
        shards_written += 1

    for i in range(manifest["docs_done"], len(source.texts)):
        ids = tokenizer(source.texts[i])["input_ids"][:max_len]
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)  # per-document: identical after a resume
        if len(ids) >= 2:
            T = len(ids)
            keep = torch.randperm(T, generator=g)[:tokens_per_doc].sort().values
            rec = Recorder(keep.to(model.device))
            model(torch.tensor([ids], device=model.device), sparsity=rec)
            for k, v in rec.rec.items():
                buf.setdefault(k, []).append(v)
            n_buf += len(keep)
        bar.update(1)
        if n_buf >= shard_tokens:
            flush(i + 1)
            if stop_after_shards is not None and shards_written >= stop_after_shards:
                bar.close()
                return manifest  # simulated interruption (tests)
    if n_buf:
        flush(len(source.texts))
    bar.close()
    if manifest["tokens"] == 0:
        raise CalibrationError("no document had two or more tokens: nothing was recorded")
    manifest["docs_done"] = len(source.texts)
    manifest["complete"] = True
    write_json_atomic(man_path, manifest)
    return manifest


class CalibrationSet:
    """Read side of a finished calibration directory."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        p = self.dir / MANIFEST
        if not p.is_file():
            raise CalibrationError(f"{self.dir} is not a calibration directory (no {MANIFEST})")
        self.manifest = json.loads(p.read_text())
        if not self.manifest.get("complete"):
            raise CalibrationError(f"calibration in {self.dir} is incomplete ({self.manifest['docs_done']} docs done): "
                                   "re-run the same `dejavu calibrate` command to resume it")

    @property
    def n_tokens(self) -> int:
        return self.manifest["tokens"]

    def get(self, key: str, layer: int) -> torch.Tensor:
        """All recorded rows of ``key`` ('x_in', 'mlp_in', 'act', 'heads') for ``layer``, fp16 [n, ...]."""
        parts = []
        for s in self.manifest["shards"]:
            with safe_open(str(self.dir / s["file"]), framework="pt") as f:
                parts.append(f.get_tensor(f"{key}.{layer}"))
        return torch.cat(parts)
