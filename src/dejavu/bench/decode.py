"""`dejavu bench`: end-to-end decode speed on one GPU: HF eager, HF compiled, ours-dense, ours-sparse, and the roofline.

Models: OPT-6.7B / 13B / 30B and a Llama-2-7B shape with *random* fp16 weights (decode time does not depend on the
values; built directly on the GPU, never on the CPU), and the real SmolLM2-135M (embedded GGUF) when it loads. The
predictors are random too (rank max(d/16, 128) for the MLP, d/16 for heads), so selections are random but of the
configured size, which is all the speed depends on. Per (model, batch):

  hf-eager     transformers ``generate`` (dynamic cache, eager)
  hf-compile   ``generate(cache_implementation="static")`` + torch.compile "reduce-overhead", in a subprocess
               with a time limit (see ``hf_baseline.py``)
  ours-dense   FastDecoder without predictors: dense GEMVs (at batch 1 the attention's projections and the MLP's up
               projection as our gathers over every row, the norms folded in, the down projection cuBLAS; cuBLAS
               above) + our decode attention, one CUDA graph per step
  ours-sparse  FastDecoder at (mlp, head) density points, kv_policy "selected" by default
  ours-sparse-int8  the same with the predictors' factors as int8 rows (``PredictorSet.quantize_int8``; half the
               predictor bytes of fp16), at the same points

Each row: median ms per decode step (one step = one token for each of the B sequences) and p10/p90 over all timed
steps, tokens/s, weight bytes per step (predictors included), the copy bandwidth measured in this run, the roofline
(bytes / copy bandwidth), speedups vs ours-dense and hf-eager, the ideal speedup (dense bytes / sparse bytes) and the
fraction of it achieved. Outputs: ``<out>/<gpu-slug>.json`` (rewritten atomically after every row, merged with rows
already there), ``.md`` and ``.png``. Work runs most important first (OPT-13B, batch 1, hf-eager, ours-dense,
ours-sparse (0.1, 0.5)) and stops starting new work when ``--budget-s`` runs out, so a timeout loses little.

    python -m dejavu.bench.decode --out results/bench --models opt-13b --batches 1,4,16
    python -m dejavu.bench.decode --merge results/a/*.json results/b/*.json --out results/bench
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from . import report
from .hf_baseline import build_hf, prompt_ids, run_compile, time_generate

MODES = ("hf-eager", "hf-compile", "ours-dense", "ours-sparse", "ours-sparse-int8")
SPARSE_MODES = ("ours-sparse", "ours-sparse-int8")
SPARSE_POINTS = ((0.1, 0.5), (0.5, 1.0), (0.25, 0.5), (0.1, 0.25), (1.0, 1.0))  # most important first
CHECK_POINT = (0.1, 0.5)  # the sparse configuration checked against the reference before timing
PRIORITY = ("opt-13b",)  # run first whatever the order given
SHAPES = {  # name: (arch, d, layers, heads, kv heads, ffn, vocab)
    "opt-6.7b": ("opt", 4096, 32, 32, 32, 16384, 50272),
    "opt-13b": ("opt", 5120, 40, 40, 40, 20480, 50272),
    "opt-30b": ("opt", 7168, 48, 56, 56, 28672, 50272),
    "llama-2-7b": ("llama", 4096, 32, 32, 32, 11008, 32000),
}
REAL = {"smollm2-135m"}
# where and how the models run; module-level so the CPU smoke test can point the plumbing at a tiny CPU model
DEVICE, DTYPE, BACKEND = "cuda", torch.float16, "triton"


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _gpu_name() -> str:
    return torch.cuda.get_device_name()


def bench_spec(name: str):
    from ..models.spec import ModelSpec

    arch, d, L, H, Hkv, N, V = SHAPES[name]
    if arch == "opt":
        return ModelSpec(arch="opt", vocab_size=V, d_model=d, n_layers=L, n_heads=H, n_kv_heads=Hkv, head_dim=d // H,
                         ffn_dim=N, mlp_kind="relu", norm_kind="layernorm", norm_eps=1e-5, pos_kind="learned",
                         max_positions=2048, attn_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
                         name=name)  # fmt: skip
    return ModelSpec(arch="llama", vocab_size=V, d_model=d, n_layers=L, n_heads=H, n_kv_heads=Hkv, head_dim=d // H,
                     ffn_dim=N, mlp_kind="swiglu", norm_kind="rmsnorm", norm_eps=1e-5, pos_kind="rope",
                     max_positions=4096, name=name)  # fmt: skip


def build_random_model(spec, device=None, dtype=None, seed: int = 0):
    """DecoderLM allocated and initialised on ``device`` in ``dtype`` (its constructor draws N(0, 0.02) weights
    there), so a 60 GB OPT-30B never touches the CPU. OPT ties the LM head to the embedding, as the real one."""
    from ..models.decoder import DecoderLM

    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype or DTYPE)
    try:
        with torch.device(device or DEVICE):
            model = DecoderLM(spec)
    finally:
        torch.set_default_dtype(prev)
    if spec.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval().requires_grad_(False)


def random_predictors(spec, device=None, dtype=None, seed: int = 1, mlp_rank=None):
    """Random predictors of the bench's ranks: max(d/16, 128) for the MLP (or ``mlp_rank``), d/16 for the heads."""
    from ..predictors.model import PredictorSet

    torch.manual_seed(seed)
    d = spec.d_model
    with torch.device(device or DEVICE):
        p = PredictorSet.for_model(spec, mlp_rank=mlp_rank or max(d // 16, 128), head_rank=max(d // 16, 1))
    return p.to(dtype or DTYPE).eval().requires_grad_(False)


def measure_copy_bw(device="cuda", nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device-to-device copy of ``nbytes`` (>= 2 GB); returns GB/s counting read + write bytes (median)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (report.quantile(times, 0.5) * 1e-3) / 1e9


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Bench:
    """Run state: options, the rows so far, the deadline, and the output files (rewritten after every row)."""

    def __init__(self, args, log):
        self.args, self._log, self.t0 = args, log, time.perf_counter()
        self.quick = bool(getattr(args, "quick", False))
        self.n_new = getattr(args, "n_new", None) or (32 if self.quick else 128)
        self.prompt_len = getattr(args, "prompt_len", None) or 128
        self.repeats = getattr(args, "repeats", None) or (1 if self.quick else 3)
        self.batches = [1] if self.quick else _ints(getattr(args, "batches", "1,4,16"))
        modes = getattr(args, "modes", None)
        self.modes = _list(modes) if modes else [m for m in MODES if not (self.quick and m == "hf-compile")]
        self.kv_policy = getattr(args, "kv_policy", None) or "selected"
        self.budget = float(getattr(args, "budget_s", None) or 540)
        self.compile_timeout = float(getattr(args, "hf_compile_timeout", None) or 300)
        self.compile_batches = _ints(getattr(args, "hf_compile_batches", None) or "1")
        self.check = not getattr(args, "no_check", False)
        self.out = Path(getattr(args, "out", None) or "results/bench")
        self.gpu = _gpu_name()
        self.broken = None  # set when a CUDA error poisons the context
        self.warmed = False  # a throwaway decoder has been built and run in this process (warm_up_ours)
        self.checks: dict[str, dict] = {}
        self.models = _order(_list(getattr(args, "models", None) or "opt-13b"))
        self.result = {"gpu": self.gpu, "copy_bw_gbps": None, "rows": [], "command": " ".join(sys.argv),
                       "notes": self._notes(), "torch": torch.__version__,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "config": {"prompt_len": self.prompt_len, "n_new": self.n_new, "repeats": self.repeats,
                                  "batches": self.batches, "modes": self.modes, "kv_policy": self.kv_policy}}
        old = self.out / (report.slug(self.gpu) + ".json")
        if old.is_file():  # an earlier invocation into the same directory: keep its rows, name its command too, and
            # keep its notes (each invocation's settings line names its models and batches)
            try:
                prev = json.loads(old.read_text())
                self.result["rows"] = prev.get("rows", [])
                cmds = [c for c in prev.get("command", "").split(" ; ") if c] + [self.result["command"]]
                self.result["command"] = " ; ".join(dict.fromkeys(cmds))
                self.result["notes"] = list(dict.fromkeys(prev.get("notes", []) + self.result["notes"]))
            except (OSError, ValueError):
                pass

    def _notes(self):
        return ["OPT/Llama-2 models use RANDOM fp16 weights with the real shapes (speed does not depend on values); "
                "smollm2-135m uses its real weights (dequantized GGUF). Predictors are random (rank max(d/16,128) "
                "MLP, d/16 heads): selection sizes are as configured, which is what speed depends on.",
                f"{', '.join(self.models)} at batch {', '.join(map(str, self.batches))}: prompt {self.prompt_len} "
                f"tokens, {self.n_new} new tokens (first from prefill, {self.n_new - 1} timed decode steps per run), "
                f"{self.repeats} timed runs after a warm-up run (each row's prompt_len, n_new, repeats).",
                "ms_per_token = median time of one decode step (it makes one token for each of the B sequences), "
                "p10/p90 over all steps.",
                "hf-*: per-step intervals between streamer callbacks (generate syncs every step anyway). "
                "hf-compile: generate(cache_implementation='static'), transformers' auto torch.compile "
                "(reduce-overhead), in a subprocess with a time limit.",
                "ours-*: CUDA-event time per graph replay incl. token copy-in and argmax. bytes_per_token = weight "
                "bytes per step (selected rows, dense parts, predictors run, LM head, biases, norms); KV reads in "
                "kv_bytes_per_token (mean context); roofline_ms = bytes_per_token / copy_bw (read+write counted). "
                "Each process first builds and runs a throwaway decoder (warm_up_ours): the first decoder of a "
                "process ran up to ~1% slower (bench/NOTES.md v21).",
                f"ours-sparse kv_policy={self.kv_policy!r}; lookahead predictors on a side stream inside the graph."]

    def log(self, msg):
        self._log(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - self.t0:5.0f}s] {msg}")

    def time_left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def add(self, row):
        row.setdefault("gpu", self.gpu)
        for key in ("prompt_len", "n_new", "repeats"):  # the invocation's settings (rows of several may merge)
            row.setdefault(key, getattr(self, key))
        row.setdefault("copy_bw_gbps", self.result["copy_bw_gbps"])
        self.result["rows"] = report.merge_rows(self.result["rows"], [row])
        report.write_outputs(self.result, self.out, png=False)
        ms = row.get("ms_per_token")
        self.log(f"  {row['model']} B={row['batch']} {row['mode']} ({row['mlp_density']:g}, {row['head_density']:g}): "
                 + (f"{ms:.3f} ms/step" if ms else f"ERROR {row.get('error', '')[:200]}"))

    def guarded(self, what: str, fn, fail_row: dict, need_s: float = 15.0):
        """Run one unit of work; on an exception (or no time / broken CUDA) record a row with the error and go on."""
        if self.broken:
            return self.add({**fail_row, "error": f"skipped: CUDA context broken earlier ({self.broken})"})
        if self.time_left() < need_s:
            return self.add({**fail_row, "error": f"skipped: time budget ({self.budget:.0f} s) used up"})
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one mode failing must not end the run
            self.log(f"  {what} failed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}")
            _free()
            try:
                torch.cuda.synchronize()
            except Exception as e2:  # noqa: BLE001
                self.broken = f"{type(e2).__name__}: {str(e2)[:100]}"
            return self.add({**fail_row, "error": f"{type(e).__name__}: {str(e)[:300]}"})


def _ints(s) -> list[int]:
    return [int(x) for x in str(s).split(",") if x.strip()]


def _list(s) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


# ---- ours ------------------------------------------------------------------------------------------------------------


def _ours_decoder(bench: Bench, model, preds, md, hd, batch):
    """The decoder a timed ours-* unit runs: ours-dense (preds None) keeps every KV head, ours-sparse the bench's
    kv_policy."""
    from ..runtime.fast_decode import FastDecoder

    kvp = "all" if preds is None else bench.kv_policy
    return FastDecoder(model, preds, md, hd, batch=batch, max_len=bench.prompt_len + bench.n_new, kv_policy=kvp,
                       backend=BACKEND)


def time_ours(bench: Bench, name, model, preds, md, hd, batch, weights):
    mode = "ours-dense" if preds is None else "ours-sparse-int8" if preds.int8 else "ours-sparse"
    dec = _ours_decoder(bench, model, preds, md, hd, batch)
    kvp = dec.kv_policy
    try:
        t = time.perf_counter()
        if dec.use_graph:
            dec.capture()
        capture_s = time.perf_counter() - t
        ids = prompt_ids(model.spec.vocab_size, batch, bench.prompt_len, DEVICE)
        runs = [dec.generate(ids, bench.n_new) for _ in range(1 + bench.repeats)]
        steps = [x for r in runs[1:] for x in r.step_ms]
        chk = bench.checks.get(name, {}).get(mode) if (batch == 1 and (preds is None or (md, hd) == CHECK_POINT)) \
            else None
        row = report.make_row(
            name, batch, mode, step_ms=steps, mlp_density=md, head_density=hd, kv_policy=kvp,
            bytes_per_token=dec.bytes_per_token(), dense_bytes_per_token=dec.dense_bytes_per_token(),
            kv_bytes_per_token=dec.kv_bytes(bench.prompt_len + bench.n_new // 2),
            copy_bw_gbps=bench.result["copy_bw_gbps"], gpu=bench.gpu, weights=weights, check=chk,
            capture_s=round(capture_s, 3), prefill_ms=report.quantile([r.prefill_ms for r in runs[1:]], 0.5),
            k_heads=dec.k_heads[0], k_mlp=dec.k_mlp[0], k_kv=dec.k_kv[0],
            predictors="none" if preds is None else "random, int8 rows" if preds.int8 else "random")  # fmt: skip
    finally:
        del dec
        _free()
    bench.add(row)


def warm_up_ours(bench: Bench, model, preds, md, hd, batch):
    """Build, capture and run a throwaway decoder of the first timed unit's configuration, then free it. In one
    process the first decoder built ran 0.2-1.1% slower than identical later ones (H200, bench/NOTES.md v21: with
    ``bench/profile_step.py``'s decoders side by side, and here, built and freed one at a time: OPT-13B ours-dense
    7.137 ms first, 7.073 / 7.068 ms for the next two dense decoders, with sparse ones between), so no timed row
    should be the process's first decoder. Sets ``bench.warmed`` once the throwaway decoder has run."""
    dec = _ours_decoder(bench, model, preds, md, hd, batch)
    try:
        if dec.use_graph:
            dec.capture()
        dec.generate(prompt_ids(model.spec.vocab_size, batch, bench.prompt_len, DEVICE), 4)
        bench.warmed = True
    finally:
        del dec
        _free()


@torch.no_grad()
def check_ours(bench: Bench, name, model, preds):
    """Correctness at batch 1 before timing (fp16): dense runtime vs model.forward with a cache; sparse graph vs
    sparse eager (same kernels, must agree exactly); sparse vs the reference PredictorPolicy given the same predictor
    weights in fp32 (same selections up to fp32 near-ties; the logits then differ by the fp16 kernels' rounding)."""
    from ..runtime.fast_decode import FastDecoder
    from ..runtime.policy import PredictorPolicy

    out = {}
    ids = prompt_ids(model.spec.vocab_size, 1, 32, DEVICE, seed=5)
    kw = dict(batch=1, max_len=48, backend=BACKEND)
    md, hd = CHECK_POINT

    def vs_model(dec, policy, kvp, steps=4):
        cache = model.new_cache(1, 48)
        ref = model(ids, 0, cache, sparsity=None)[:, -1]
        dec.prefill(ids)
        tok, errs, agree = ref.argmax(-1), [], 0
        for t in range(steps):
            r = model(tok[:, None], 32 + t, cache, sparsity=policy, kv_policy=kvp)[:, -1].float()
            g = dec.decode_step(tok).float()
            errs.append(((g - r).abs().max() / r.abs().max().clamp(min=1e-6)).item())
            agree += int((g.argmax(-1) == r.argmax(-1)).all())
            tok = r.argmax(-1)
        return f"rel {max(errs):.1e} top1 {agree}/{steps}"

    dense = FastDecoder(model, None, kv_policy="all", **kw)
    out["ours-dense"] = "vs model: " + vs_model(dense, None, "all")
    del dense
    if preds is not None:
        g = FastDecoder(model, preds, md, hd, kv_policy=bench.kv_policy, **kw)
        e = FastDecoder(model, preds, md, hd, kv_policy=bench.kv_policy, use_graph=False, **kw)
        same = bool((g.generate(ids, 12).tokens == e.generate(ids, 12).tokens).all())
        del g, e
        s = FastDecoder(model, preds, md, hd, kv_policy=bench.kv_policy, **kw)
        # the runtime scores in fp32 from the model-dtype predictor weights; the reference gets the same weights in
        # fp32 (exact upcast), so both rank the same scores: low-precision scores tie often among 10^4 neurons, and
        # with random weights every differently chosen neuron moves the logits
        ref_preds = copy.deepcopy(preds).to(model.dtype).float()
        ref = vs_model(s, PredictorPolicy(ref_preds, md, hd), bench.kv_policy)
        del ref_preds
        del s
        out["ours-sparse"] = f"graph{'==' if same else '!='}eager; (0.1,0.5) vs ref: {ref}"
    _free()
    bench.log(f"  checks: {out}")
    return out


def run_ours(bench: Bench, name, spec, real: bool):
    if real:
        from ..models.load import load_model

        model = load_model(None, dtype=DTYPE, device=DEVICE).model
    else:
        model = build_random_model(spec)
    weights = "real" if real else "random"
    preds = random_predictors(model.spec) if any(m in bench.modes for m in SPARSE_MODES) else None
    preds8 = copy.deepcopy(preds).quantize_int8() if "ours-sparse-int8" in bench.modes else None
    try:
        if bench.check:
            fail = report.make_row(name, 1, "check", gpu=bench.gpu, weights=weights)
            bench.checks[name] = bench.guarded("checks", lambda: check_ours(bench, name, model, preds), fail) or {}
        points = SPARSE_POINTS[:2] if bench.quick else SPARSE_POINTS
        for b in bench.batches:
            units = ([(None, 1.0, 1.0)] if "ours-dense" in bench.modes else []) + \
                    ([(preds, m, h) for m, h in points] if "ours-sparse" in bench.modes else []) + \
                    ([(preds8, m, h) for m, h in points] if preds8 is not None else [])
            if units and not bench.warmed:  # no timed row is the process's first decoder
                p0, m0, h0 = units[0]
                bench.guarded("warm-up", lambda mdl=model: warm_up_ours(bench, mdl, p0, m0, h0, b),
                              report.make_row(name, b, "ours-warm-up", gpu=bench.gpu, weights=weights))
            for p, m, h in units:
                mode = "ours-dense" if p is None else "ours-sparse-int8" if p.int8 else "ours-sparse"
                fail = report.make_row(name, b, mode, mlp_density=m, head_density=h, gpu=bench.gpu, weights=weights,
                                       kv_policy="all" if p is None else bench.kv_policy)
                bench.guarded(f"{mode} B={b} ({m},{h})",
                              lambda p=p, m=m, h=h, b=b: time_ours(bench, name, model, p, m, h, b, weights), fail)
    finally:
        del model, preds, preds8
        _free()


# ---- HF --------------------------------------------------------------------------------------------------------------


def run_hf_eager(bench: Bench, name, spec, real: bool, batches):
    weights = "real" if real else "random"
    fails = {b: report.make_row(name, b, "hf-eager", gpu=bench.gpu, weights=weights) for b in batches}
    holder = {}

    def build():
        holder["m"] = build_hf(spec, DEVICE, DTYPE, real=real)

    bench.guarded("hf build", build, fails[batches[0]])
    if "m" not in holder:
        for b in batches[1:]:
            bench.add({**fails[b], "error": "HF model build failed (see the first batch's row)"})
        return
    dense_bytes = _dense_bytes(spec)
    try:
        for b in batches:
            def one(b=b):
                ids = prompt_ids(spec.vocab_size, b, bench.prompt_len, DEVICE)
                r = time_generate(holder["m"], ids, bench.n_new, bench.repeats, warmup=1)
                bench.add(report.make_row(
                    name, b, "hf-eager", step_ms=r["step_ms"], bytes_per_token=dense_bytes,
                    dense_bytes_per_token=dense_bytes, copy_bw_gbps=bench.result["copy_bw_gbps"], gpu=bench.gpu,
                    weights=weights, new_tokens=r["new_tokens"],
                    prefill_ms=report.quantile(r["prefill_ms"], 0.5) if r["prefill_ms"] else None))  # fmt: skip
            bench.guarded(f"hf-eager B={b}", one, fails[b], need_s=20)
    finally:
        holder.clear()
        _free()


def run_hf_compile(bench: Bench, name, spec, real: bool):
    weights = "real" if real else "random"
    batches = [b for b in bench.batches if b in bench.compile_batches]
    if not batches:
        return
    if bench.time_left() < 60 or bench.broken:
        for b in batches:
            bench.add(report.make_row(name, b, "hf-compile", gpu=bench.gpu, weights=weights,
                                      error="skipped: time budget" if not bench.broken else "skipped: CUDA broken"))
        return
    timeout = min(bench.compile_timeout, bench.time_left() - 20)
    bench.log(f"  hf-compile B={batches} in a subprocess (limit {timeout:.0f} s)")
    job = {"spec": spec.to_json(), "real": real, "batches": batches, "prompt_len": bench.prompt_len,
           "n_new": bench.n_new, "repeats": bench.repeats}
    res = run_compile(job, timeout, bench.log)
    dense_bytes = _dense_bytes(spec)
    for b in batches:
        r = res[b]
        bench.add(report.make_row(
            name, b, "hf-compile", step_ms=r.get("step_ms", ()), bytes_per_token=dense_bytes,
            dense_bytes_per_token=dense_bytes, copy_bw_gbps=bench.result["copy_bw_gbps"], gpu=bench.gpu,
            weights=weights, error=r.get("error"), compile_s=r.get("compile_s"), compiled=r.get("compiled"),
            new_tokens=r.get("new_tokens")))  # fmt: skip


def _dense_bytes(spec) -> int:
    """Weight bytes of a dense decode step (same count as FastDecoder.dense_bytes_per_token), fp16."""
    nw = 2 if spec.norm_kind == "layernorm" else 1
    d = spec.d_model
    n = d * (2 if spec.pos_kind == "learned" else 1) + nw * d + spec.lm_head_params()
    a = spec.attn_param_counts()
    per = spec.block_params() + 2 * nw * d
    if spec.attn_bias:
        per += (a["q"] + a["k"] + a["v"]) // d
    per += (d if spec.out_bias else 0) + ((spec.ffn_dim + d) if spec.mlp_bias else 0)
    return 2 * (n + spec.n_layers * per)


# ---- driver ----------------------------------------------------------------------------------------------------------


def _order(models: list[str]) -> list[str]:
    return [m for m in PRIORITY if m in models] + [m for m in models if m not in PRIORITY]


def run_model(bench: Bench, name: str):
    real = name in REAL
    if not real and name not in SHAPES:
        return bench.add(report.make_row(name, 1, "load", error=f"unknown model {name!r}; choose from "
                                         f"{', '.join(list(SHAPES) + sorted(REAL))}"))  # fmt: skip
    if real:
        try:
            import gguf  # noqa: F401 - transformers needs it to read the GGUF

            spec = _real_spec()
        except Exception as e:  # noqa: BLE001
            return bench.add(report.make_row(name, 1, "load", weights="real", error=f"skipped: {e}"))
    else:
        spec = bench_spec(name)
    bench.log(f"== {name}: d={spec.d_model} L={spec.n_layers} H={spec.n_heads}/{spec.n_kv_heads} ffn={spec.ffn_dim} "
              f"V={spec.vocab_size} ({'real' if real else 'random'} weights)")
    first, rest = bench.batches[:1], bench.batches[1:]
    if "hf-eager" in bench.modes:
        run_hf_eager(bench, name, spec, real, first)
    if any(m in bench.modes for m in ("ours-dense", *SPARSE_MODES)):
        bench.guarded(f"{name} ours", lambda: run_ours(bench, name, spec, real),
                      report.make_row(name, 1, "ours-build", weights="real" if real else "random"), need_s=30)
    if "hf-eager" in bench.modes and rest:
        run_hf_eager(bench, name, spec, real, rest)
    if "hf-compile" in bench.modes:
        run_hf_compile(bench, name, spec, real)
    report.write_outputs(bench.result, bench.out)


def _real_spec():
    """The embedded SmolLM2's spec, read from its config (cheap: no weights)."""
    from transformers import AutoConfig

    from ..models.adapters import adapter_for
    from ..models.load import resolve

    where, kw = resolve(None)
    cfg = AutoConfig.from_pretrained(where, **kw)
    return adapter_for(cfg).spec(cfg, name="smollm2-135m")


def main(args, log=print) -> dict:
    """Entry point of ``dejavu bench`` (and ``python -m dejavu.bench.decode``)."""
    if getattr(args, "merge", None):
        paths = report.merge_files(args.merge, getattr(args, "out", None) or "results/bench")
        log(f"merged {len(args.merge)} files -> {paths}")
        return {"merged": paths}
    if not _has_cuda():
        raise SystemExit("dejavu bench: needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure "
                         "here. Run it on the GPU machine, or --merge existing result files.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("dejavu bench: TRITON_INTERPRET=1 is set; unset it to time the compiled kernels.")
    from .. import kernels

    if not kernels.HAS_TRITON:
        raise SystemExit("dejavu bench: Triton is not installed (pip install triton).")
    torch.set_grad_enabled(False)
    bench = Bench(args, log)
    models = bench.models
    bench.log(f"GPU {bench.gpu}; models {models}; batches {bench.batches}; modes {bench.modes}; "
              f"budget {bench.budget:.0f} s; out {bench.out}")
    bench.result["copy_bw_gbps"] = measure_copy_bw()
    bench.log(f"copy bandwidth {bench.result['copy_bw_gbps']:.0f} GB/s (2 GiB device copy, read+write)")
    for name in models:
        run_model(bench, name)
    if getattr(args, "kernels", False):
        if bench.time_left() > 60 and not bench.broken:
            from .kernel_sweep import run_kernel_sweep

            try:
                run_kernel_sweep(bench.out / "kernel_sweep")
            except Exception as e:  # noqa: BLE001
                bench.log(f"kernel sweep failed: {type(e).__name__}: {e}")
        else:
            bench.log("kernel sweep skipped: no time left")
    paths = report.write_outputs(bench.result, bench.out)
    mine = [r for r in bench.result["rows"] if r.get("gpu") == bench.gpu and r["model"] in models]
    log("\n" + report.short_table(mine))
    log(f"\nwrote {', '.join(paths.values())}  ({bench.gpu}, copy bw {bench.result['copy_bw_gbps']:.0f} GB/s)")
    return bench.result


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options (shared by ``dejavu bench`` and ``python -m dejavu.bench.decode``)."""
    p.add_argument("--out", default="results/bench")
    p.add_argument("--models", default="opt-13b,opt-6.7b,opt-30b,llama-2-7b,smollm2-135m")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--quick", action="store_true", help="smoke run: 32 new tokens, 1 repeat, batch 1, no hf-compile")
    p.add_argument("--json", action="store_true", help="print the result JSON on stdout (logs go to stderr)")
    p.add_argument("--modes", default=None, help=f"comma list of {','.join(MODES)} (default: all)")
    p.add_argument("--kv-policy", default="selected", choices=["selected", "all"])
    p.add_argument("--n-new", type=int, default=None, help="new tokens per run (default 128, quick 32)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 3, quick 1)")
    p.add_argument("--budget-s", type=float, default=540, help="start no new work after this many seconds")
    p.add_argument("--hf-compile-timeout", type=float, default=300)
    p.add_argument("--hf-compile-batches", default="1", help="batches to run hf-compile for (compiles per batch)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks before timing")
    p.add_argument("--kernels", action="store_true", help="also run the kernel sweep (kernel_sweep.py) at the end")
    p.add_argument("--merge", nargs="+", default=None, help="merge result JSON files into --out (no GPU needed)")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="python -m dejavu.bench.decode", description=__doc__.split("\n\n")[0]))


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    stream = sys.stderr if args.json else sys.stdout
    result = main(args, lambda *a: print(*a, file=stream, flush=True))
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
