"""One eager sparse decode step, bracketed for Nsight Compute (GPU diagnostic for bench/NOTES.md).

Builds a random-weight model of a bench shape cut to ``--layers`` layers (so that the middle layers run the same
kernels and launch configurations as the full model's), prefills 128 tokens, warms the step up (Triton JIT), then
runs one more step between ``cudaProfilerStart`` / ``cudaProfilerStop``. Under
``ncu --profile-from-start off`` only that step's kernels are profiled::

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section WarpStateStats \\
        -k 'regex:_sparse_mlp|_gather_rows|_decode_attn|_gather_down' \\
        python bench/ncu_step.py --model opt-13b --layers 4

Without ncu it just runs (a smoke test of the script). ncu serialises the kernels and replays each one with its
memory restored, so its durations are each kernel alone from a cold L2, not the overlapped graph step that
``bench/profile_step.py`` times.

``--summarize`` (no GPU) reduces ncu's CSV exports to a small JSON: per profiled kernel its duration, warp
instructions, issue rate, registers and the leading stall reasons (from ``ncu -i R --page raw --csv``), and per
SASS export (``ncu -i R --page source --csv --print-source sass``, one kernel a file) the executed-instruction mix::

    python bench/ncu_step.py --summarize raw.csv [sass_*.csv ...] --out summary.json --note "what was profiled"
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import os

from dejavu.atomic import write_json_atomic

STALL = "smsp__average_warps_issue_stalled_"
RAW = {"duration_us": "gpu__time_duration.sum", "warp_instructions": "smsp__inst_executed.sum",
       "issue_per_cycle": "smsp__issue_active.avg.per_cycle_active", "registers": "launch__registers_per_thread",
       "sm_active_cycles": "sm__cycles_active.avg"}  # fmt: skip


def _num(v: str) -> float:
    return float(v.replace(",", ""))


def _rows(path: str) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def summarize_raw(path: str) -> list[dict]:
    """One record per profiled kernel launch of an ``ncu --page raw --csv`` export."""
    rows = _rows(path)
    hdr, data = rows[0], rows[2:]  # row 1 holds the units
    out = []
    for r in data:
        rec = {"kernel": r[hdr.index("Kernel Name")]}
        rec.update({k: _num(r[hdr.index(m)]) for k, m in RAW.items() if m in hdr})
        stalls = {h[len(STALL):-len("_per_issue_active.ratio")]: _num(r[i]) for i, h in enumerate(hdr)
                  if h.startswith(STALL) and h.endswith("_per_issue_active.ratio")}  # fmt: skip
        rec["cycles_per_issue"] = round(sum(stalls.values()), 2)
        rec["top_stalls_per_issue"] = {k: round(v, 2) for k, v in sorted(stalls.items(), key=lambda kv: -kv[1])[:6]}
        out.append(rec)
    return out


def summarize_sass(path: str) -> dict:
    """Executed-instruction mix of one kernel's ``--page source --print-source sass`` export."""
    rows = _rows(path)
    kernel, hdr = rows[0][1], rows[1]
    src, ex = hdr.index("Source"), hdr.index("Instructions Executed")
    mix = collections.Counter()
    for r in rows[2:]:
        if len(r) != len(hdr) or not r[src].split():
            continue
        words = r[src].split()
        mix[words[1] if words[0].startswith("@") else words[0]] += int(_num(r[ex] or "0"))
    total = sum(mix.values())
    return {"kernel": kernel, "file": os.path.basename(path), "warp_instructions": total,
            "top_opcodes_share": {k: round(v / total, 3) for k, v in mix.most_common(8)}}


def _is_sass(path: str) -> bool:
    """A source-page export (its second row names the SASS columns) rather than a raw-page one."""
    rows = _rows(path)
    return len(rows) > 1 and "Source" in rows[1] and "Address" in rows[1]


def summarize(args) -> None:
    sass = [p for p in args.summarize if _is_sass(p)]
    res = {"note": args.note, "launches": [r for p in args.summarize if p not in sass for r in summarize_raw(p)],
           "sass": [summarize_sass(p) for p in sass]}
    write_json_atomic(args.out, res, indent=1)
    print(f"wrote {args.out}: {len(res['launches'])} launches, {len(res['sass'])} SASS exports")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="opt-13b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--point", default="0.1,0.5", help="mlp_density,head_density")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--summarize", nargs="+", metavar="CSV", help="ncu CSV exports to reduce (no GPU); see above")
    ap.add_argument("--out", help="--summarize: the JSON to write")
    ap.add_argument("--note", default="", help="--summarize: what was profiled, with which command")
    args = ap.parse_args()
    if args.summarize:
        if not args.out:
            ap.error("--summarize needs --out FILE.json")
        return summarize(args)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("ncu_step.py runs a decode step on a CUDA GPU (under ncu); --summarize needs none")
    from dejavu.bench.decode import bench_spec, build_random_model, random_predictors
    from dejavu.bench.hf_baseline import prompt_ids
    from dejavu.runtime.fast_decode import FastDecoder

    md, hd = (float(v) for v in args.point.split(","))
    spec = dataclasses.replace(bench_spec(args.model), n_layers=args.layers)
    model = build_random_model(spec)
    dec = FastDecoder(model, random_predictors(spec), mlp_density=md, head_density=hd, batch=args.batch,
                      max_len=200, use_graph=False)  # fmt: skip
    dec.prefill(prompt_ids(spec.vocab_size, args.batch, 128, "cuda"))
    tok = torch.zeros(args.batch, dtype=torch.long, device="cuda")
    for _ in range(2):
        dec.decode_step(tok)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    dec.decode_step(tok)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"ncu_step: {args.model} x {args.layers} layers, point {md},{hd}, batch {args.batch}: "
          f"{dec.describe()}")


if __name__ == "__main__":
    main()
