"""Where does one graphed decode step spend its time? (GPU diagnostic for bench/NOTES.md)

For OPT-13B-shaped random fp16 weights at batch 1: ours-dense and ours-sparse (0.1, 0.5), plus two sparse variants
that isolate the predictors: ``nopred`` (selections fixed, predictor calls skipped) and ``inline`` (lookahead
predictors on the main stream, no side stream), and ``sparse_high_priority`` (the side stream created with
priority -1). Per variant: median graph-replay time, and a torch.profiler trace of
graph replays, reduced to the kernel time per step by kernel name and stream, and the gap (span minus busy time) on
the main stream.

    PYTHONPATH=src python bench/profile_step.py --out $OUT/profile [--model opt-13b]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from dejavu.bench.decode import build_random_model, random_predictors
from dejavu.bench.hf_baseline import prompt_ids
from dejavu.runtime.fast_decode import FastDecoder


def replay_ms(dec: FastDecoder, n: int = 60) -> float:
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    tok = torch.zeros(dec.batch, dtype=torch.long, device="cuda")
    pos0 = dec._pos.clone()
    for i in range(n):
        dec._pos.copy_(pos0)
        ev[i].record()
        dec._graph.replay()
    ev[n].record()
    torch.cuda.synchronize()
    del tok
    return statistics.median(a.elapsed_time(b) for a, b in zip(ev, ev[1:]))


def trace(dec: FastDecoder, steps: int = 5) -> dict:
    pos0 = dec._pos.clone()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec._pos.copy_(pos0)
            dec._graph.replay()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    prof.export_chrome_trace(path)
    with open(path) as f:
        ev = json.load(f)["traceEvents"]
    os.unlink(path)
    ks = [e for e in ev if e.get("cat") == "kernel"]
    if not ks:
        return {"error": "no kernel events in the trace"}
    ks.sort(key=lambda e: e["ts"])
    by_stream = defaultdict(list)
    for e in ks:
        by_stream[e.get("args", {}).get("stream", -1)].append(e)
    main = max(by_stream, key=lambda s: len(by_stream[s]))
    per_name = defaultdict(lambda: [0.0, 0])
    for e in ks:
        key = f"{'main' if e['args'].get('stream') == main else 'side'}:{e['name'][:60]}"
        per_name[key][0] += e["dur"] / steps
        per_name[key][1] += 1 / steps
    m = by_stream[main]
    span = (m[-1]["ts"] + m[-1]["dur"] - m[0]["ts"]) / steps
    busy = sum(e["dur"] for e in m) / steps
    gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(m, m[1:])]
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:25]
    return {"main_span_us": span, "main_busy_us": busy, "main_kernels": len(m) / steps,
            "side_busy_us": sum(e["dur"] for s, es in by_stream.items() if s != main for e in es) / steps,
            "median_gap_us": statistics.median(gaps) if gaps else 0.0,
            "kernels": [{"name": k, "us_per_step": round(v[0], 2), "count": round(v[1], 1)} for k, v in top]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="opt-13b")
    ap.add_argument("--point", default="0.1,0.5")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from dejavu.bench.decode import bench_spec

    md, hd = (float(v) for v in args.point.split(","))
    spec = bench_spec(args.model)
    model = build_random_model(spec)
    preds = random_predictors(model.spec)
    ids = prompt_ids(spec.vocab_size, 1, 128, "cuda")
    res = {"gpu": torch.cuda.get_device_name(), "model": args.model, "point": [md, hd]}
    variants = {
        "dense": dict(predictors=None, mlp_density=1.0, head_density=1.0, kv_policy="all"),
        "sparse": dict(predictors=preds, mlp_density=md, head_density=hd),
        "nopred": dict(predictors=preds, mlp_density=md, head_density=hd),
        "inline": dict(predictors=preds, mlp_density=md, head_density=hd, overlap=False),
        "sparse_high_priority": dict(predictors=preds, mlp_density=md, head_density=hd),
    }
    for name, kw in variants.items():
        dec = FastDecoder(model, batch=1, max_len=200, **kw)
        if name == "nopred":
            dec._predict = lambda *a, **k: None
        if name == "sparse_high_priority":  # A/B: schedule the predictors' blocks ahead of the main stream's
            dec._side = torch.cuda.Stream(dec.device, priority=-1)
        dec.prefill(ids)
        dec.capture()
        ms = replay_ms(dec)
        t = trace(dec)
        res[name] = {"replay_ms": ms, "bytes": dec.bytes_per_token(), **t}
        print(f"== {name}: replay {ms:.3f} ms; main span {t.get('main_span_us', 0):.0f} us, busy "
              f"{t.get('main_busy_us', 0):.0f} us, {t.get('main_kernels', 0):.0f} kernels, median gap "
              f"{t.get('median_gap_us', 0):.2f} us; side busy {t.get('side_busy_us', 0):.0f} us", flush=True)
        for k in t.get("kernels", [])[:14]:
            print(f"   {k['us_per_step']:9.1f} us  x{k['count']:<6} {k['name']}")
        del dec
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, f"profile_{args.model}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
