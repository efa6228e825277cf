"""Hugging Face baselines for the decode benchmark: eager ``generate`` and static cache + ``torch.compile``.

Timing (both modes): a streamer's ``put`` is called by ``generate`` once with the prompt and then once per new token,
after the token is on the host; we take a timestamp there (after a ``cuda.synchronize``, a no-op at that point).
Intervals between successive new tokens are the per-step decode times (the first interval, prompt -> first token, is
the prefill). ``generate`` on CUDA already waits for the device every step (its stopping check reads a device flag),
so the streamer adds no sync that was not there; it adds one tiny device-to-host copy.

``hf-compile`` is ``generate(cache_implementation="static")``: transformers then compiles the decoding forward with
its default ``CompileConfig`` (inductor, mode "reduce-overhead", i.e. CUDA graphs). Compilation can take minutes and
can fail, so it runs in a subprocess with a hard timeout (``run_compile``), which also frees its GPU memory on exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ..models.spec import ModelSpec

ROW_TAG = "@@HF_ROW "


def hf_config(spec: ModelSpec):
    """A transformers config with the shape of ``spec`` (OPT or Llama family)."""
    if spec.arch == "opt":
        from transformers import OPTConfig

        return OPTConfig(vocab_size=spec.vocab_size, hidden_size=spec.d_model, num_hidden_layers=spec.n_layers,
                         ffn_dim=spec.ffn_dim, num_attention_heads=spec.n_heads,
                         max_position_embeddings=spec.max_positions, word_embed_proj_dim=spec.d_model,
                         do_layer_norm_before=True, enable_bias=True, tie_word_embeddings=True, dropout=0.0,
                         pad_token_id=1, bos_token_id=2, eos_token_id=2)  # fmt: skip
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=spec.ffn_dim,
                       num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
                       num_key_value_heads=spec.n_kv_heads, head_dim=spec.head_dim,
                       max_position_embeddings=spec.max_positions, rms_norm_eps=spec.norm_eps,
                       tie_word_embeddings=spec.tie_embeddings, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)  # fmt: skip


def build_hf(spec: ModelSpec, device, dtype=torch.float16, real: bool = False):
    """Random-weight HF model built directly on ``device`` in ``dtype`` (no CPU copy), or the real embedded
    SmolLM2 (``real=True``: dequantized from its GGUF, then moved)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if real:
        from ..models.load import resolve

        where, kw = resolve(None)
        return AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw).to(device).eval().requires_grad_(False)
    cfg = hf_config(spec)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:  # older transformers spell it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    return model.eval().requires_grad_(False)


class StepClock:
    """Streamer that only records when each token reached the host."""

    def __init__(self):
        self.t: list[float] = []

    def put(self, value):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t.append(time.perf_counter())

    def end(self):
        pass


@torch.no_grad()
def time_generate(model, ids: torch.Tensor, n_new: int, repeats: int, warmup: int = 1, **gen_kw) -> dict:
    """Greedy generate of exactly n_new tokens, ``warmup`` untimed + ``repeats`` timed runs.

    -> {"step_ms": [...], "prefill_ms": [...], "new_tokens": n}: per-step decode intervals of the timed runs.
    """
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    mask = torch.ones_like(ids)
    steps, prefill, n = [], [], 0
    for r in range(warmup + repeats):
        clock = StepClock()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                             streamer=clock, pad_token_id=pad, **gen_kw)  # fmt: skip
        n = out.shape[1] - ids.shape[1]
        if r >= warmup and len(clock.t) >= 2:
            prefill.append((clock.t[1] - clock.t[0]) * 1e3)
            steps += [(b - a) * 1e3 for a, b in zip(clock.t[1:], clock.t[2:])]
    return {"step_ms": steps, "prefill_ms": prefill, "new_tokens": n}


def prompt_ids(vocab: int, batch: int, length: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


# ---- torch.compile baseline in a subprocess -------------------------------------------------------------------------


def compile_worker(job: dict):
    """Subprocess body: build the HF model, then per batch compile (warm-up runs) and time; one tagged JSON line per
    batch on stdout, flushed, so a timeout still leaves the finished batches."""
    spec = ModelSpec.from_json(job["spec"])
    model = build_hf(spec, "cuda", torch.float16, real=job.get("real", False))
    for b in job["batches"]:
        res = {"batch": b}
        try:
            ids = prompt_ids(spec.vocab_size, b, job["prompt_len"], "cuda")
            t0 = time.perf_counter()
            time_generate(model, ids, job["n_new"], repeats=0, warmup=2, cache_implementation="static")
            res["compile_s"] = time.perf_counter() - t0
            res.update(time_generate(model, ids, job["n_new"], repeats=job["repeats"], warmup=0,
                                     cache_implementation="static"))  # fmt: skip
            res["compiled"] = hasattr(model, "_compiled_call")
        except Exception as e:  # noqa: BLE001 - report and go on with the next batch
            res["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            traceback.print_exc()
        print(ROW_TAG + json.dumps(res), flush=True)


def run_compile(job: dict, timeout: float, log=print) -> dict:
    """Run ``compile_worker`` in a fresh process (own process group) with a hard timeout.

    -> {batch: result dict}; batches that did not finish get {"error": ...}.
    """
    src = str(Path(__file__).resolve().parents[2])  # the directory holding the dejavu package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    with tempfile.TemporaryDirectory() as tmp:
        jf, of, ef = Path(tmp, "job.json"), Path(tmp, "out.txt"), Path(tmp, "err.txt")
        jf.write_text(json.dumps(job))
        with open(of, "w") as out, open(ef, "w") as err:
            p = subprocess.Popen([sys.executable, "-m", "dejavu.bench.hf_baseline", "--worker", str(jf)],
                                 stdout=out, stderr=err, env=env, start_new_session=True)  # fmt: skip
            why = None
            try:
                rc = p.wait(timeout=max(1.0, timeout))
                if rc:
                    why = f"worker exited with code {rc}"
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # the worker and its inductor compile workers
                p.wait()
                why = f"timed out after {timeout:.0f} s (compile + timing)"
        results = {}
        for line in of.read_text().splitlines():
            if line.startswith(ROW_TAG):
                r = json.loads(line[len(ROW_TAG):])
                results[r["batch"]] = r
        tail = " | ".join(ef.read_text().strip().splitlines()[-3:])[-400:]
    for b in job["batches"]:
        if b not in results:
            results[b] = {"batch": b, "error": f"{why or 'no result'}; stderr: {tail}"}
    if why:
        log(f"  hf-compile: {why}")
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        compile_worker(json.loads(Path(sys.argv[2]).read_text()))
    else:
        sys.exit("internal: python -m dejavu.bench.hf_baseline --worker JOB.json (started by dejavu bench)")
