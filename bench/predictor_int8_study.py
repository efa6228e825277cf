"""What do int8 predictor rows cost in quality? SmolLM2-135M, fp32 on the CPU, the same WikiText-2 tokens for every row.

    dejavu calibrate --device cpu --data ../shared/data/c4/c4_train_sample.jsonl --docs 200 --tokens-per-doc 64 \
        --holdout-windows 4 --holdout-len 512 --out PREDS
    python bench/predictor_int8_study.py --predictors PREDS --out results/quality

``PredictorSet.quantize_int8`` rounds each factor's rows to int8 with one fp32 scale a row (what the GPU decode reads
with ``--int8-predictors``, half the predictor bytes of fp16; bench/NOTES.md v26). Two measurements, fp32 predictors
against the same set rounded:

* selection agreement: on the dense model's own per-layer inputs (lookahead: layer l's set is scored from layer l-1's
  input, layer 0's from its own), the share of each token's top-k that the int8 predictors pick too, for every layer
  and the MLP densities 0.5 / 0.25 / 0.1 and head densities 0.5 / 0.25;
* perplexity: dense, the predictors' own operating point and a uniform MLP density of 0.5 (heads dense), each with
  fp32 and with int8 rows, on the first ``--windows`` windows of ``--window`` tokens (the reference gather path).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from dejavu.atomic import write_json_atomic, write_text_atomic
from dejavu.eval.perplexity import perplexity, wikitext2_windows
from dejavu.models.load import load_model
from dejavu.operating_point import policy_from_operating_point
from dejavu.predictors.model import PredictorSet
from dejavu.runtime.policy import PredictorPolicy, k_for

MLP_LEVELS = (0.5, 0.25, 0.1)
HEAD_LEVELS = (0.5, 0.25)


def agreement(model, fp: PredictorSet, q8: PredictorSet, windows) -> dict:
    """Mean share of each token's top-k (fp32 predictors) that the int8 predictors also pick, per kind, level, layer."""
    L, spec = model.spec.n_layers, model.spec
    sums = {f"{kind}@{lv}": [0.0] * L for kind, levels in (("mlp", MLP_LEVELS), ("heads", HEAD_LEVELS))
            for lv in levels}  # fmt: skip
    with torch.no_grad():
        for w in windows:
            x0, rope = model.embed_positions(w[None])
            inputs: list[torch.Tensor] = []
            model.run_blocks(x0, rope, record=inputs)
            for l in range(L):
                x = inputs[max(l - 1, 0)].reshape(-1, spec.d_model)  # the lookahead predictors' input
                for kind, levels, full in (("mlp", MLP_LEVELS, spec.ffn_dim), ("heads", HEAD_LEVELS, spec.n_heads)):
                    fn = "neuron_scores" if kind == "mlp" else "head_scores"
                    a, b = getattr(fp, fn)(l, x), getattr(q8, fn)(l, x)
                    for lv in levels:
                        k = k_for(lv, full)
                        picked = torch.zeros_like(a).scatter_(1, a.topk(k, dim=-1).indices, 1.0)
                        both = picked.gather(1, b.topk(k, dim=-1).indices).sum(-1) / k
                        sums[f"{kind}@{lv}"][l] += float(both.mean()) / len(windows)
    return {key: {"mean": sum(v) / L, "min_layer": min(v), "per_layer": [round(x, 4) for x in v]}
            for key, v in sums.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictors", required=True, help="a directory written by `dejavu calibrate` (embedded model)")
    ap.add_argument("--out", default="results/quality")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = load_model(None)
    model = lm.model
    fp = PredictorSet.load(args.predictors, model.spec)
    if fp.int8:
        raise SystemExit(f"error: {args.predictors} holds predictors already rounded to int8; give the float ones")
    q8 = copy.deepcopy(fp).quantize_int8()
    wt = wikitext2_windows(lm.tokenizer, args.window, max_windows=args.windows)
    agree = agreement(model, fp, q8, wt)
    print(f"agreement done ({time.perf_counter() - t0:.0f} s)", flush=True)

    op = fp.meta["operating_point"]
    L = model.spec.n_layers
    models = {"dense": None, "op_fp32": policy_from_operating_point(fp, op),
              "op_int8": policy_from_operating_point(q8, op),
              "mlp0.5_fp32": PredictorPolicy(fp, [0.5] * L, [1.0] * L),
              "mlp0.5_int8": PredictorPolicy(q8, [0.5] * L, [1.0] * L)}
    fns = {name: (lambda ids, p=pol: model(ids, sparsity=p)) for name, pol in models.items()}
    with torch.no_grad():
        ppl = perplexity(fns, wt, batch_size=1, progress=False, desc="wikitext-2")
    dense = ppl["dense"]["ppl"]
    rows = {name: {"ppl": r["ppl"], "vs_dense": r["ppl"] / dense - 1, "tokens": r["tokens"]} for name, r in ppl.items()}
    command = "python bench/predictor_int8_study.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    res = {"model": model.spec.name, "device": "cpu", "dtype": "float32", "command": command,
           "windows": len(wt), "window": args.window, "predictors": {k: fp.meta[k] for k in (
               "mlp_rank", "head_rank", "input", "calibration") if k in fp.meta},
           "operating_point": {"mlp_density_mean": sum(op["mlp_density"]) / L,
                               "head_density_mean": sum(op["head_density"]) / L},
           "predictor_bytes_fp16": fp.bytes_per_token(torch.float16), "predictor_bytes_int8": q8.bytes_per_token(
               torch.float16), "agreement": agree, "perplexity": rows, "seconds": round(time.perf_counter() - t0)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "predictor_int8_study.json", res)
    write_text_atomic(out / "predictor_int8_study.md", to_markdown(res))
    print(to_markdown(res))
    return 0


def to_markdown(r: dict) -> str:
    L = [f"# int8 predictor rows against fp32: {r['model']}, {r['windows']} WikiText-2 windows of {r['window']} "
         "tokens\n",
         f"Made by `{r['command']}` ({r['device']}, {r['dtype']}, {r['seconds']} s). Predictors: "
         f"{json.dumps(r['predictors'])}; their bytes per token {r['predictor_bytes_fp16'] / 1e6:.2f} MB at fp16, "
         f"{r['predictor_bytes_int8'] / 1e6:.2f} MB as int8 rows.\n",
         "Selection agreement: the share of each token's top-k (fp32 predictors) that the int8 rows also pick, on the "
         "dense model's own inputs: the mean over layers, and the lowest layer's.\n",
         "| set | agreement (mean) | lowest layer |", "|---|---|---|"]
    for key, v in r["agreement"].items():
        L.append(f"| {key} | {v['mean']:.4f} | {v['min_layer']:.4f} |")
    op = r["operating_point"]
    L += ["", f"Perplexity on the same tokens (operating point: mean MLP density {op['mlp_density_mean']:.3f}, head "
          f"density {op['head_density_mean']:.3f}; mlp0.5: every layer's MLP at 0.5, heads dense):\n",
          "| model | ppl | vs dense |", "|---|---|---|"]
    for name, v in r["perplexity"].items():
        L.append(f"| {name} | {v['ppl']:.3f} | {100 * v['vs_dense']:+.2f}% |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
