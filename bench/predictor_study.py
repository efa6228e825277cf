"""Which predictor inputs and labels work on a SwiGLU model? Train variants on one calibration, score on WikiText-2.

    python bench/predictor_study.py --model M.gguf --activations DIR --out OUT.json   (DIR: `dejavu calibrate`'s)

Each variant is scored at uniform MLP densities (heads dense) and uniform head densities (MLP dense), next to the
oracle, on the same WikiText-2 windows; the JSON keeps every row. Used to choose dejavu's defaults (bench/NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dejavu.baselines import oracle_policy
from dejavu.calibrate import CalibrationSet
from dejavu.eval.perplexity import perplexity, wikitext2_windows
from dejavu.models.load import load_model
from dejavu.predictors.train import train_predictors
from dejavu.runtime.policy import PredictorPolicy

VARIANTS = [  # (input scheme, SwiGLU label fraction, MLP rank multiplier)
    ("lookahead", 0.5, 1), ("half", 0.5, 1), ("same", 0.5, 1), ("half", 0.75, 1), ("same", 0.75, 1), ("half", 0.75, 2),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--activations", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model(args.model, device="cuda")
    model, spec = lm.model, lm.spec
    cal = CalibrationSet(args.activations)
    wt = wikitext2_windows(lm.tokenizer, 1024, max_windows=args.windows)
    L, H = spec.n_layers, spec.n_heads
    mlp_levels, head_levels = (0.8, 0.65, 0.5), (6 / H if H == 9 else 0.66, 4 / H if H == 9 else 0.44)

    def fn(pol):
        return lambda ids: model(ids.cuda(), sparsity=pol)

    models = {"dense": fn(None)}
    for lv in mlp_levels:
        models[f"oracle mlp@{lv:.2f}"] = fn(oracle_policy(spec, [lv] * L, [1.0] * L))
    for lv in head_levels:
        models[f"oracle heads@{lv:.2f}"] = fn(oracle_policy(spec, [1.0] * L, [lv] * L))
    metrics = {}
    for scheme, frac, mult in VARIANTS:
        t = time.perf_counter()
        name = f"{scheme} frac={frac} rank={max(32, spec.d_model // 8) * mult}"
        ps = train_predictors(cal, spec, mlp_rank=max(32, spec.d_model // 8) * mult, input_scheme=scheme,
                              mlp_label_frac=frac, epochs=args.epochs, progress=False).cuda()
        m = ps.meta["metrics"]
        metrics[name] = {k: sum(r["recall_at_k"] for r in m[k]) / L for k in m}
        print(f"{name}: trained in {time.perf_counter() - t:.0f} s, mean recall@k {metrics[name]}", flush=True)
        for lv in mlp_levels:
            models[f"{name} mlp@{lv:.2f}"] = fn(PredictorPolicy(ps, [lv] * L, [1.0] * L))
        for lv in head_levels:
            models[f"{name} heads@{lv:.2f}"] = fn(PredictorPolicy(ps, [1.0] * L, [lv] * L))
    res = perplexity(models, wt, batch_size=8, progress=False)
    dense = res["dense"]["ppl"]
    rows = {k: {"ppl": v["ppl"], "increase": v["ppl"] / dense - 1} for k, v in res.items()}
    json.dump({"windows": len(wt), "dense_ppl": dense, "rows": rows, "recall_at_k": metrics,
               "device": torch.cuda.get_device_name()}, open(args.out, "w"), indent=1)
    for k, v in rows.items():
        print(f"{k:45s} {v['ppl']:9.3f} {100 * v['increase']:+8.2f}%")


if __name__ == "__main__":
    main()
