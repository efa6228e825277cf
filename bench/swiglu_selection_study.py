"""Can any byte-honest MLP neuron-selection scheme skip >= 0.25 of block bytes at <= +1% WikiText-2 ppl (SwiGLU)?

    python bench/swiglu_selection_study.py --out results/quality

SmolLM2-135M (the embedded model), fp32, CPU, one thread, heads dense. Every row is scored on the same WikiText-2
test windows (the first ``--windows`` windows of ``--window`` tokens, CRLF -> LF), next to dense. Schemes:

  (a) oracle     keep per token the top-k neurons by |silu(g) * u| (exact; needs g and u, so as a runnable scheme it
                 reads everything -- its "skip" is the ideal one of a free, perfect selector)
  (b) gate-first (CATS-style) g = W_gate x dense (1/3 of MLP bytes), keep the top-k by |silu(g)| (or every neuron above
                 a per-layer threshold calibrated on C4 docs 0..63), up/down only for those: reads 1/3 + 2/3 * density
  (b') the same bytes, score |silu(g_i)| * ||up_i|| * ||down_i|| (static norms, free): an extra, cheap variant
  (c) down-only  gate and up dense, exact top-k of |h| for down only: reads 2/3 + 1/3 * density (selection = oracle's)
  (d) greedy     the best (b)/(b') variant (interpolated ppl at 0.25 skipped) with per-layer densities: single-layer sensitivities measured on C4 docs
                 0..63 (never WikiText), least sensitive layers lowered first until a block-bytes target is reached

Bytes: a block is q, k, v, o (0.25 of its bytes here) + gate, up, down (0.75). ``block_bytes_skipped`` counts what
the scheme must read, from the per-layer densities achieved on the WikiText tokens (threshold rows vary per token).

The schemes are SparsityPolicy subclasses returning real Selections. For speed the script evaluates them with a
masked MLP (dense activation times a 0/1 mask built from the Selection, then down), which is what the gather path
computes; ``gather_check`` in the JSON compares both paths on a short window for every policy kind.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from dejavu.eval.data import c4_sample_path, load_jsonl_texts, resolve_data_dir
from dejavu.eval.perplexity import c4_windows, perplexity, wikitext2_windows
from dejavu.models.load import load_model
from dejavu.runtime.policy import DensityPolicy, OraclePolicy, SparsityPolicy, k_for
from dejavu.runtime.selection import Selection, threshold_selection, topk_selection
from study_common import (
    add_common_args,
    cpu_name,
    greedy_path,
    interp_increase_at,
    max_skip_within,
    md_cell,
    mlp_hooks,
    write_atomic,
)

TARGET_SKIP, TARGET_INCREASE = 0.25, 0.01


# ---- byte accounting -------------------------------------------------------------------------------------------
def mlp_read_fraction(method: str, density: float) -> float:
    """Fraction of one layer's MLP weight bytes the scheme reads at this (achieved) neuron density."""
    if density >= 1.0:
        return 1.0
    if method == "oracle":
        return density  # ideal: a free selector that already knows the top-k
    if method.startswith("gate_first"):
        return 1 / 3 + 2 / 3 * density  # gate dense, up + down for the kept neurons
    if method == "down_only":
        return 2 / 3 + 1 / 3 * density  # gate + up dense, down for the kept neurons
    raise ValueError(method)


def block_bytes_skipped(spec, method: str, densities) -> float:
    """Skipped fraction of all blocks' weight bytes (attention dense), from per-layer achieved densities."""
    mlp = spec.mlp_params()
    skipped = sum(mlp * (1 - mlp_read_fraction(method, d)) for d in densities)
    return skipped / (spec.n_layers * spec.block_params())


# ---- policies ----------------------------------------------------------------------------------------------------
class GateFirstPolicy(DensityPolicy):
    """CATS-style: score neurons by |silu(W_gate x)| (computed densely), keep the top-k, or every neuron above a
    per-layer threshold (``thresholds[l]``; the count then varies per token). Layers at density 1 stay dense.

    ``weighted``: score |silu(g_i)| * ||up_i|| * ||down_i|| instead (static per-neuron norms: N floats a layer, no
    extra weight reads), a bound-like proxy for |h_i| * ||down_i||."""

    def __init__(self, spec, mlp_density, thresholds=None, weighted=False):
        super().__init__(spec.n_layers, spec.n_heads, spec.ffn_dim, mlp_density=mlp_density)
        self.thresholds, self.weighted, self._norms = thresholds, weighted, {}

    def neurons(self, layer, mlp_in, mlp, resid):
        n = mlp_in.shape[0] * mlp_in.shape[1]
        if self.mlp_density[layer] >= 1.0:
            return self._account("mlp", layer, None, n, self.ffn_dim)
        score = F.silu(F.linear(mlp_in, mlp.w1)).abs().reshape(n, -1)  # (n, N): the gate read
        if self.weighted:
            if layer not in self._norms:
                self._norms[layer] = mlp.w3.norm(dim=1) * mlp.w2t.norm(dim=1)  # (N,)
            score = score * self._norms[layer]
        if self.thresholds is not None:
            sel = threshold_selection(score, self.thresholds[layer])
        else:
            sel = topk_selection(score, k_for(self.mlp_density[layer], self.ffn_dim))
        return self._account("mlp", layer, sel, n, self.ffn_dim)


class DownOnlyPolicy(DensityPolicy):
    """gate and up computed densely (so |h| is known exactly); only the down rows of the top-k |h| are read."""

    def neurons(self, layer, mlp_in, mlp, resid):
        n = mlp_in.shape[0] * mlp_in.shape[1]
        if self.mlp_density[layer] >= 1.0:
            return self._account("mlp", layer, None, n, self.ffn_dim)
        score = mlp.activation(mlp_in).abs().reshape(n, -1)  # (n, N) = |silu(g) * u|
        return self._account("mlp", layer, topk_selection(score, k_for(self.mlp_density[layer], self.ffn_dim)),
                             n, self.ffn_dim)


class Recording(SparsityPolicy):
    """Runs another policy and keeps the Selections it returns (heads stay dense)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.sels = inner, {}

    def neurons(self, layer, mlp_in, mlp, resid):
        self.sels[layer] = self.inner.neurons(layer, mlp_in, mlp, resid)
        return self.sels[layer]


class Replay(SparsityPolicy):
    def __init__(self, sels):
        super().__init__()
        self.sels = sels

    def neurons(self, layer, mlp_in, mlp, resid):
        return self.sels[layer]


class GateRecorder(DensityPolicy):
    """Dense pass that keeps a random sample of |silu(g)| per layer (for the per-layer thresholds)."""

    def __init__(self, spec, per_call: int, seed: int = 0):
        super().__init__(spec.n_layers, spec.n_heads, spec.ffn_dim)
        self.per_call, self.vals = per_call, [[] for _ in range(spec.n_layers)]
        self.gen = torch.Generator().manual_seed(seed)

    def neurons(self, layer, mlp_in, mlp, resid):
        v = F.silu(F.linear(mlp_in, mlp.w1)).abs().flatten()
        self.vals[layer].append(v[torch.randint(0, v.numel(), (self.per_call,), generator=self.gen)])
        return None

    def quantile_thresholds(self, density: float) -> list[float]:
        return [float(torch.quantile(torch.cat(v), 1 - density)) for v in self.vals]


# ---- evaluation: the masked MLP (what the gather path computes) ---------------------------------------------
def _masked_output(mlp, x, sel: Selection):
    """What the gather path computes, as a dense product: the activation of every neuron, zero where unselected."""
    a = mlp.activation(x)  # (..., N)
    a2 = a.reshape(-1, a.shape[-1])  # (n, N)
    src = torch.ones_like(sel.idx, dtype=a2.dtype) if sel.valid is None else sel.valid.to(a2.dtype)
    mask = torch.zeros_like(a2).scatter_add_(1, sel.idx, src)  # add: padded slots point at 0 with weight 0
    mlp.rows_read += 3 * int(sel.total())
    out = ((a2 * mask) @ mlp.w2t).view(*x.shape[:-1], -1)
    return out + mlp.b2 if mlp.b2 is not None else out


@contextmanager
def masked_mlp(model):
    """Evaluate every MLP's selection by masking (fast on a CPU) through PyTorch's module hooks: the pre-hook takes
    the Selection out of the call (the MLP then runs its dense path), the forward hook replaces the output by the
    masked product. The model's code is untouched; the hooks are removed on exit."""
    stash = {}

    def pre(mod, args):
        x, sel = (args + (None,))[:2]
        stash[id(mod)] = sel
        return (x, None)

    def post(mod, args, out):
        sel = stash.pop(id(mod))
        return out if sel is None else _masked_output(mod, args[0], sel)

    with mlp_hooks(model, pre, post):
        yield


# ---- the study ---------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, "swiglu_selection_study")
    ap.add_argument("--sens-windows", type=int, default=4, help="C4 windows (spread over the docs) for sensitivities")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="only rewrite the .md (in --out) from a finished run's JSON; runs nothing")
    args = ap.parse_args()
    if args.render:
        write_atomic(Path(args.out) / "swiglu_selection_study.md", render_md(json.loads(Path(args.render).read_text())))
        return
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    t_start = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t_start:7.1f}s]", *a, flush=True)  # noqa: E731

    lm = load_model(None, dtype=torch.float32, device="cpu")
    model, spec, tok = lm.model, lm.spec, lm.tokenizer
    L, N = spec.n_layers, spec.ffn_dim
    data_dir = resolve_data_dir(args.data_dir)
    wt = wikitext2_windows(tok, args.window, data_dir=data_dir, max_windows=args.windows)
    docs = load_jsonl_texts(c4_sample_path(data_dir))[: args.c4_docs]
    c4 = c4_windows(tok, docs, args.window)
    log(f"loaded {spec.name}: {len(wt)} WikiText windows, {len(c4)} C4 windows from docs 0..{len(docs) - 1}")

    # -- per-layer |silu(g)| thresholds from a dense pass over the C4 calibration docs
    levels_all = (0.8, 0.65, 0.5, 0.35, 0.2, 0.1)
    rec = GateRecorder(spec, per_call=16384)
    for w in c4:
        model(w[None], sparsity=rec)
    thr = {d: rec.quantile_thresholds(d) for d in levels_all}
    del rec
    log("thresholds calibrated")

    def thresholds_for(densities):
        return [thr[d][l] if d < 1 else float("inf") for l, d in enumerate(densities)]

    def make(method, densities):
        if method == "oracle":
            return OraclePolicy(L, spec.n_heads, N, mlp_density=densities)
        if method == "gate_first_topk":
            return GateFirstPolicy(spec, densities)
        if method == "gate_first_threshold":
            return GateFirstPolicy(spec, densities, thresholds=thresholds_for(densities))
        if method == "gate_first_weighted_topk":
            return GateFirstPolicy(spec, densities, weighted=True)
        if method == "down_only":
            return DownOnlyPolicy(L, spec.n_heads, N, mlp_density=densities)
        raise ValueError(method)

    # -- the masked evaluation equals the gather path (short window, every policy kind): the gather run's
    # selections are replayed in the masked run ("replayed"); "free" lets each run select on its own, where
    # rounding-level differences can swap boundary neurons and the swaps then propagate through later layers
    x = wt[0][None, :128]
    gather_check = {}
    for method, d in (("oracle", 0.5), ("gate_first_topk", 0.5), ("gate_first_threshold", 0.5),
                      ("gate_first_weighted_topk", 0.5), ("down_only", 0.2)):
        rec_pol = Recording(make(method, [d] * L))
        ref = model(x, sparsity=rec_pol)
        with masked_mlp(model):
            rep = model(x, sparsity=Replay(rec_pol.sels))
            free = model(x, sparsity=make(method, [d] * L))
        scale = ref.abs().max()
        gather_check[method] = {"replayed": float((rep - ref).abs().max() / scale),
                                "free": float((free - ref).abs().max() / scale)}
    log("gather vs masked (max rel diff of logits):", gather_check)

    rows = []

    def evaluate(method, densities, label, extra=None):
        pol = make(method, densities) if method != "dense" else None
        t = time.perf_counter()
        with masked_mlp(model):
            r = perplexity({label: lambda ids: model(ids, sparsity=pol)}, wt, progress=False)[label]
        ach = pol.achieved()["mlp"] if pol is not None else [1.0] * L
        row = {"method": method, "label": label, "density": densities, "achieved_density": ach,
               "mean_achieved_density": sum(ach) / L,
               "block_bytes_skipped": 0.0 if pol is None else block_bytes_skipped(spec, method, ach),
               "ppl": r["ppl"], "nll": r["nll"], "tokens": r["tokens"], "seconds": time.perf_counter() - t}
        if rows:
            row["increase"] = row["ppl"] / rows[0]["ppl"] - 1
        else:
            row["increase"] = 0.0
        row.update(extra or {})
        rows.append(row)
        log(f"{label:42s} skip {row['block_bytes_skipped']:.4f}  ppl {row['ppl']:.4f}  {100 * row['increase']:+.2f}%"
            f"  ({row['seconds']:.0f}s)")
        return row

    evaluate("dense", [1.0] * L, "dense")
    for d in (0.8, 0.65, 0.5):
        evaluate("oracle", [d] * L, f"(a) oracle top-k |silu(g)*u| d={d}")
    for d in (0.8, 0.65, 0.5, 0.35):
        evaluate("gate_first_topk", [d] * L, f"(b) gate-first top-k d={d}")
    for d in (0.8, 0.65, 0.5, 0.35):
        evaluate("gate_first_threshold", [d] * L, f"(b) gate-first threshold d={d}")
    for d in (0.65, 0.5, 0.35):
        evaluate("gate_first_weighted_topk", [d] * L, f"(b') gate-first top-k |silu(g)|*|up|*|down| d={d}")
    for d in (0.65, 0.5, 0.2, 0.05):
        evaluate("down_only", [d] * L, f"(c) down-only top-k |h| d={d}")

    # -- (d): the better gate-first variant at the target, by interpolated increase at 0.25 skipped
    def pts(method):
        return [(r["block_bytes_skipped"], r["increase"]) for r in rows
                if r["method"] == method and "greedy_target" not in r]

    at_target = {m: interp_increase_at(pts(m), TARGET_SKIP)
                 for m in ("gate_first_topk", "gate_first_threshold", "gate_first_weighted_topk")}
    best = min(at_target, key=lambda m: math.inf if at_target[m] is None else at_target[m])
    log(f"(d) uses {best} (interpolated increase at skip {TARGET_SKIP}: {at_target})")

    # single-layer sensitivities on C4 (the docs the thresholds came from), paired NLL against dense
    step = max(1, len(c4) // args.sens_windows)
    sens_ids = [c4[i] for i in range(0, len(c4), step)][: args.sens_windows]
    sens_in, targets, dense_nll = [], [], 0.0
    n_tok = 0
    rope = None
    for w in sens_ids:
        x0, rope = model.embed_positions(w[None])
        rec_in: list[torch.Tensor] = []
        xl = model.run_blocks(x0, rope, record=rec_in)
        dense_nll += float(F.cross_entropy(model.lm_head(model.norm_f(xl))[0, :-1], w[1:], reduction="sum"))
        sens_in.append(rec_in)
        targets.append(w[1:])
        n_tok += w.numel() - 1
    sens_levels = [1.0, 0.65, 0.5, 0.35, 0.2, 0.1]
    cost = [[0.0] * len(sens_levels) for _ in range(L)]
    with masked_mlp(model):
        for l in range(L):
            for i, d in enumerate(sens_levels[1:], start=1):
                dens = [1.0] * L
                dens[l] = d
                pol = make(best, dens)
                s = 0.0
                for rec_in, tg in zip(sens_in, targets):
                    pol.begin(1, tg.numel() + 1)
                    xl = model.run_blocks(rec_in[l], rope, policy=pol, first=l)
                    s += float(F.cross_entropy(model.lm_head(model.norm_f(xl))[0, :-1], tg, reduction="sum"))
                cost[l][i] = (s - dense_nll) / n_tok
            log(f"sensitivity layer {l:2d}: " + " ".join(f"{d}:{c:+.4f}" for d, c in zip(sens_levels[1:], cost[l][1:])))

    mlp_frac = spec.mlp_params() / spec.block_params()
    path = greedy_path(sens_levels, cost, lambda d: mlp_frac * (1 - mlp_read_fraction(best, d)) / L)
    for target in (0.2, 0.25, 0.3):
        hit = next((p for p in path if p[0] >= target - 1e-9), None)
        if hit is None:
            continue
        skip, pred, dens = hit
        evaluate(best, dens, f"(d) greedy {best} target {target}",
                 {"greedy_target": target, "nominal_skip": skip, "predicted_c4_dnll": pred})

    # -- summary
    summary = {}
    for m in ("oracle", "gate_first_topk", "gate_first_threshold", "gate_first_weighted_topk", "down_only"):
        p = pts(m)
        summary[m] = {"max_skip_within_1pct": max_skip_within(p, TARGET_INCREASE),
                      "increase_at_0.25": interp_increase_at(p, TARGET_SKIP)}
    g = [r for r in rows if "greedy_target" in r]
    gp = [(r["block_bytes_skipped"], r["increase"]) for r in g]
    summary["greedy"] = {"method": best, "max_skip_within_1pct": max_skip_within(gp, TARGET_INCREASE),
                         "increase_at_0.25": interp_increase_at(gp, TARGET_SKIP)}
    reached = [r["label"] for r in rows if r["method"] not in ("dense", "oracle")
               and r["block_bytes_skipped"] >= TARGET_SKIP - 1e-9 and r["increase"] <= TARGET_INCREASE]
    oracle_reached = [r["label"] for r in rows if r["method"] == "oracle"
                      and r["block_bytes_skipped"] >= TARGET_SKIP - 1e-9 and r["increase"] <= TARGET_INCREASE]

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if os.environ.get("PYTHONPATH"):  # e.g. where the editable install points elsewhere
        command = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} {command}"
    machine = f"{cpu_name()} (CPU), float32, torch {torch.__version__}, {args.threads} thread(s)"
    result = {
        "command": command, "machine": machine, "model": spec.name,
        "wikitext": {"windows": len(wt), "window": args.window, "predicted_tokens": rows[0]["tokens"],
                     "convention": "first windows of wiki.test.raw, CRLF->LF, no context across windows"},
        "c4_calibration": {"docs": [0, len(docs) - 1], "windows": len(c4), "sensitivity_windows": len(sens_ids),
                           "sensitivity_tokens": n_tok, "sensitivity_levels": sens_levels[1:]},
        "block": {"mlp_fraction": mlp_frac, "attn_fraction": 1 - mlp_frac, "heads": "dense"},
        "targets": {"block_bytes_skipped": TARGET_SKIP, "max_ppl_increase": TARGET_INCREASE},
        "gather_check_max_rel_diff": gather_check,
        "gate_first_thresholds": {str(d): thr[d] for d in levels_all},
        "greedy": {"method": best, "chosen_by_interpolated_increase_at_0.25": at_target,
                   "single_layer_dnll": {str(d): [cost[l][i] for l in range(L)]
                                         for i, d in enumerate(sens_levels) if d < 1}},
        "rows": rows, "summary": summary, "target_reached_by": reached, "oracle_reaches_target": oracle_reached,
        "seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    write_atomic(out / "swiglu_selection_study.json", json.dumps(result, indent=1) + "\n")
    write_atomic(out / "swiglu_selection_study.md", render_md(result))
    log(f"wrote {out}/swiglu_selection_study.{{json,md}}")


def render_md(r) -> str:
    dense = r["rows"][0]
    w = r["wikitext"]
    lines = [
        "# SwiGLU neuron selection: can any byte-honest scheme skip 0.25 of block bytes at <= +1% ppl?", "",
        f"Made by `{r['command']}` on {r['machine']}. Model {r['model']}; heads dense everywhere.", "",
        f"All rows on the same tokens: the first {w['windows']} WikiText-2 test windows of {w['window']} tokens "
        f"(CRLF->LF, {w['predicted_tokens']} predicted tokens). Dense ppl **{dense['ppl']:.4f}**. "
        f"Thresholds and sensitivities: C4 docs {r['c4_calibration']['docs'][0]}..{r['c4_calibration']['docs'][1]} "
        "only. MLP = 0.75 of block bytes, attention 0.25.", "",
        "block_bytes_skipped counts what the scheme reads: (a) oracle = density (ideal: a free, perfect selector; "
        "computing |silu(g)*u| itself reads gate+up, i.e. (c)); (b) gate-first = 1/3 + 2/3 x density (gate read "
        "counted); (c) down-only = 2/3 + 1/3 x density; densities are the ones achieved on these tokens "
        "(threshold rows vary per token).", "",
        "| method | density | achieved mean density | block_bytes_skipped | ppl | vs dense |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        d = row["density"]
        dtxt = f"{d[0]:g}" if len(set(d)) == 1 else "per-layer: [" + ", ".join(f"{x:g}" for x in d) + "]"
        lines.append(f"| {md_cell(row['label'])} | {dtxt} | {row['mean_achieved_density']:.3f} | "
                     f"{row['block_bytes_skipped']:.4f} | {row['ppl']:.4f} | {100 * row['increase']:+.2f}% |")
    s = r["summary"]
    names = {"oracle": "(a) oracle (ideal bytes)", "gate_first_topk": "(b) gate-first top-k",
             "gate_first_threshold": "(b) gate-first threshold",
             "gate_first_weighted_topk": "(b') gate-first top-k, norm-weighted score", "down_only": "(c) down-only",
             "greedy": f"(d) greedy per-layer ({s['greedy']['method']})"}
    lines += ["", "| scheme | max block_bytes_skipped at <= +1% (interpolated) | ppl increase at 0.25 skipped "
              "(interpolated) |", "|---|---|---|"]
    for k, name in names.items():
        inc = s[k]["increase_at_0.25"]
        lines.append(f"| {md_cell(name)} | {s[k]['max_skip_within_1pct']:.3f} | "
                     f"{'not reached' if inc is None else f'{100 * inc:+.2f}%'} |")
    lines += ["", "## Reading", ""]
    if r["target_reached_by"]:
        lines.append("The target IS reached by: " + "; ".join(r["target_reached_by"]) + ".")
    else:
        lines.append("No byte-honest scheme measured here reaches 0.25 of block bytes skipped at <= +1% WikiText-2 "
                     "perplexity.")
    best_k = max((k for k in names if k != "oracle"), key=lambda k: s[k]["max_skip_within_1pct"])
    lines.append(f"Closest byte-honest scheme: {names[best_k]}, {s[best_k]['max_skip_within_1pct']:.3f} skipped "
                 "within +1%. The ideal oracle (bytes of a free perfect selector) "
                 + ("reaches" if r["oracle_reaches_target"] else "does not reach")
                 + f" the target (max {s['oracle']['max_skip_within_1pct']:.3f} within +1%), but computing its "
                 "selection reads gate and up, which makes it (c). Down-only (c) cannot pass 0.25 at any density "
                 "(0.25 needs density 0).")
    g = [row for row in r["rows"] if row.get("greedy_target") == TARGET_SKIP]
    if g:
        lines.append(f"The greedy per-layer allocation at {g[0]['block_bytes_skipped']:.3f} skipped measures "
                     f"{100 * g[0]['increase']:+.2f}% on WikiText-2, where the sum of its single-layer C4 "
                     f"sensitivities predicted {g[0]['predicted_c4_dnll']:+.3f} nats/token "
                     f"({100 * (math.exp(g[0]['predicted_c4_dnll']) - 1):+.1f}%)"
                     + (": the layers' errors compound rather than add." if
                        math.log1p(g[0]["increase"]) > g[0]["predicted_c4_dnll"] else "."))
    lines.append("Interpolated columns are linear between measured points, starting from dense at (0, 0).")
    chk = r["gather_check_max_rel_diff"]
    lines += ["", "Masked evaluation vs the gather path (128 tokens, max relative logit difference, gather run's "
              "selections replayed / each run selecting on its own): "
              + ", ".join(f"{k} {v['replayed']:.1e} / {v['free']:.1e}" for k, v in chk.items())
              + ". The masked path computes the same thing given the same selections; where the free number is "
              "large, rounding-level differences swap a few near-tied boundary neurons of a top-k and the change "
              "propagates through later layers (it averages out in perplexity).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
