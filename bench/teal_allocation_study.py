"""Can TEAL input sparsity with a greedy per-layer density allocation skip >= 0.25 of block bytes at <= +1% ppl?

    python bench/teal_allocation_study.py --out results/quality

SmolLM2-135M (the embedded model), fp32, CPU, one thread. TEAL (training-free magnitude thresholds): zero the
entries of the normalized attention input (q/k/v columns), of the normalized MLP input (gate/up columns) and of the
MLP intermediate (down rows) whose magnitude is below a per-layer threshold; o_proj dense. The thresholds are
``dejavu.baselines.teal_thresholds`` ((1 - density) quantiles of |input|) from a dense pass over C4 docs 0..63
(never WikiText) at the levels {0.9, 0.8, 0.7, 0.6, 0.5, 0.4}; a per-layer allocation gives
``dejavu.runtime.policy.TealPolicy`` a thresholds dict whose layer-l entries come from layer l's level (density 1 =
threshold -1, i.e. dense, the convention of teal_thresholds).

Rows, all scored on the same WikiText-2 test windows (the first ``--windows`` windows of ``--window`` tokens,
CRLF -> LF), next to dense:
  uniform     every layer at one density (0.9, 0.8, 0.7, 0.6)
  greedy      single-layer sensitivities on C4 windows (paired NLL increase over dense when only layer l is at a
              level), then layers lowered cheapest marginal NLL increase per skipped byte first (a layer may jump
              several levels) until a block-bytes target (0.20, 0.25, 0.30) is reached
  conditional greedy (the refinement, run only when it fits the time budget): the same greedy, but every round the
              marginal cost of lowering each layer by one level is re-measured on the C4 windows with every other
              layer at its current level; the cheapest moves are applied (one per layer) until the round has added
              ``--refine-step`` of block bytes skipped, then it re-measures

Bytes: a block is q, k, v, o, gate, up, down. ``block_bytes_skipped`` (nominal) is the same accounting as
``teal_block_bytes_skipped``, per layer: layer l skips (1 - d_l) of its q, k, v and MLP bytes, summed over layers,
over all blocks' bytes. The achieved density (the fraction of entries above the thresholds on the WikiText tokens) is
also reported per site, with the block bytes it implies.

Evaluation: TealPolicy returns threshold Selections for the intermediate, which the model's gather path computes at
~60 s per 512-token window on one CPU thread. For speed, the rows use ``FastTeal``, a TealPolicy subclass with the
same thresholds and the same input cuts that hands the selected intermediate on as a dense masked tensor (the same
entries as threshold_selection); PyTorch module hooks then compute ``masked intermediate @ down`` in place of the MLP
call (the model code is untouched, the hooks are removed after each use). ``gather_check`` in the JSON compares the
plain TealPolicy on the gather path with this evaluation on a short window: replaying the gather run's cuts and
selections, and each path selecting on its own.
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

from dejavu.baselines import teal_block_bytes_skipped, teal_thresholds
from dejavu.eval.data import c4_sample_path, load_jsonl_texts, resolve_data_dir
from dejavu.eval.perplexity import c4_windows, perplexity, wikitext2_windows
from dejavu.models.load import load_model
from dejavu.runtime.policy import SparsityPolicy, TealPolicy
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
LEVELS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)  # LEVELS[0] = dense
UNIFORM = (0.9, 0.8, 0.7, 0.6)
TARGETS = (0.20, 0.25, 0.30)
KEYS = ("attn", "mlp", "inter")


# ---- thresholds and accounting -----------------------------------------------------------------------------------
def assemble(thr: dict, densities) -> dict:
    """Per-layer TealPolicy thresholds: layer l's entries from the level densities[l] (1.0 = dense, threshold -1)."""
    return {k: [thr[d][k][l] for l, d in enumerate(densities)] for k in KEYS}


def layer_skip(spec, d: float) -> float:
    """One layer's contribution to block_bytes_skipped at density d (teal_block_bytes_skipped, per layer)."""
    return teal_block_bytes_skipped(spec, d) / spec.n_layers


def nominal_skip(spec, densities) -> float:
    return sum(layer_skip(spec, d) for d in densities)


def achieved_skip(spec, ach) -> float:
    """Block bytes skipped implied by achieved per-layer, per-site densities
    (q/k/v: attn; gate/up: mlp; down: inter)."""
    a = spec.attn_param_counts()
    qkv, gu, down = a["q"] + a["k"] + a["v"], spec.mlp_params() * 2 / 3, spec.mlp_params() / 3
    sk = sum((1 - ach["attn"][l]) * qkv + (1 - ach["mlp"][l]) * gu + (1 - ach["inter"][l]) * down
             for l in range(spec.n_layers))
    return sk / (spec.n_layers * spec.block_params())


class MaskedInter:
    """What the evaluation hook multiplies by down: the intermediate with the below-threshold entries zeroed."""

    def __init__(self, h: torch.Tensor):
        self.h = h


class FastTeal(TealPolicy):
    """TealPolicy (its own attn_input / mlp_input cuts, its thresholds) whose MLP-intermediate selection is handed
    on as the masked intermediate itself instead of padded per-token index lists: the same set as
    ``threshold_selection(|h|, t)`` (entries above t, at least the largest one per token), consumed by
    :func:`masked_mlp`. Layers with threshold < 0 (density 1) return None (dense). Also counts, per layer and site,
    the fraction of entries kept (the achieved density)."""

    def __init__(self, thresholds, density, n_layers):
        super().__init__(thresholds, density)
        self.kept = {k: [0.0] * n_layers for k in KEYS}
        self.seen = {k: [0.0] * n_layers for k in KEYS}

    def _count(self, key, layer, kept, seen):
        self.kept[key][layer] += float(kept)
        self.seen[key][layer] += float(seen)

    def _counted_cut(self, key, layer, x, cut):
        """TealPolicy's input cut (none where the threshold is < 0, i.e. dense), counting the entries kept."""
        if self.t[key][layer] < 0:
            self._count(key, layer, x.numel(), x.numel())
            return x
        out = cut(layer, x)
        self._count(key, layer, (out != 0).sum(), x.numel())
        return out

    def attn_input(self, layer, x):
        return self._counted_cut("attn", layer, x, super().attn_input)

    def mlp_input(self, layer, x):
        return self._counted_cut("mlp", layer, x, super().mlp_input)

    def neurons(self, layer, mlp_in, mlp, resid):
        t = self.t["inter"][layer]
        n = mlp_in.shape[0] * mlp_in.shape[1] * mlp.ffn_dim
        if t < 0:
            self._count("inter", layer, n, n)
            return None
        h = mlp.activation(mlp_in)
        keep = h.abs() > t
        top1 = torch.zeros_like(keep).scatter_(-1, h.abs().argmax(-1, keepdim=True), True)
        keep = keep | (top1 & ~keep.any(-1, keepdim=True))  # min_k = 1, as threshold_selection
        self._count("inter", layer, keep.sum(), n)
        return MaskedInter(h * keep)

    def achieved(self):
        return {k: [self.kept[k][l] / max(1.0, self.seen[k][l]) for l in range(len(self.kept[k]))] for k in KEYS}


class RecordingTeal(TealPolicy):
    """The plain TealPolicy (gather path), keeping its input cuts and intermediate Selections for a replay."""

    def __init__(self, thresholds, density):
        super().__init__(thresholds, density)
        self.cuts, self.sels = {}, {}

    def attn_input(self, layer, x):
        out = super().attn_input(layer, x)
        self.cuts[("attn", layer)] = out != 0
        return out

    def mlp_input(self, layer, x):
        out = super().mlp_input(layer, x)
        self.cuts[("mlp", layer)] = out != 0
        return out

    def neurons(self, layer, mlp_in, mlp, resid):
        self.sels[layer] = super().neurons(layer, mlp_in, mlp, resid)
        return self.sels[layer]


class ReplayTeal(SparsityPolicy):
    """Replays a RecordingTeal run through the masked evaluation (the Selection turned into the masked intermediate)."""

    def __init__(self, rec: RecordingTeal):
        super().__init__()
        self.rec = rec

    def attn_input(self, layer, x):
        return x * self.rec.cuts[("attn", layer)]

    def mlp_input(self, layer, x):
        return x * self.rec.cuts[("mlp", layer)]

    def neurons(self, layer, mlp_in, mlp, resid):
        sel = self.rec.sels[layer]
        h = mlp.activation(mlp_in)
        h2 = h.reshape(-1, h.shape[-1])
        mask = torch.zeros_like(h2).scatter_add_(1, sel.idx, sel.valid.to(h2.dtype))  # padded slots: weight 0
        return MaskedInter((h2 * mask).view_as(h))


# ---- evaluation: the masked MLP (what the gather path computes) ------------------------------------------------
@contextmanager
def masked_mlp(model):
    """PyTorch module hooks on every MLP: when the policy hands a MaskedInter instead of a Selection, the pre-hook
    stashes it and gives the MLP an empty input (so its dense path costs nothing), and the forward hook returns
    ``masked intermediate @ down`` in the input's shape. Selections / None pass through untouched. The model code
    is not changed; the hooks are removed on exit."""
    stash = {}

    def pre(mod, args):
        x, sel = (args + (None,))[:2]
        if not isinstance(sel, MaskedInter):
            return None
        stash[id(mod)] = (x.shape, sel.h)
        return (x.new_empty(0, x.shape[-1]), None)

    def post(mod, args, out):
        if id(mod) not in stash:
            return out
        shape, h = stash.pop(id(mod))
        o = (h.reshape(-1, h.shape[-1]) @ mod.w2t).view(*shape[:-1], -1)
        return o + mod.b2 if mod.b2 is not None else o

    with mlp_hooks(model, pre, post):
        yield


# ---- the study ---------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, "teal_allocation_study")
    ap.add_argument("--calib-windows", type=int, default=4,
                    help="C4 windows (evenly spread over the docs) for the thresholds")
    ap.add_argument("--sens-windows", type=int, default=4,
                    help="C4 windows (evenly spread, disjoint from the threshold windows) for sensitivities")
    ap.add_argument("--refine-windows", type=int, default=2,
                    help="conditional refinement: the first N sensitivity windows")
    ap.add_argument("--refine-step", type=float, default=0.045,
                    help="conditional greedy: block bytes skipped added per round between re-measurements")
    ap.add_argument("--budget-min", type=float, default=40.0,
                    help="run the conditional refinement only if the whole run is expected to stay under this")
    ap.add_argument("--no-refine", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    t_start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - t_start  # noqa: E731
    log = lambda *a: print(f"[{elapsed():7.1f}s]", *a, flush=True)  # noqa: E731

    lm = load_model(None, dtype=torch.float32, device="cpu")
    model, spec, tok = lm.model, lm.spec, lm.tokenizer
    L = spec.n_layers
    data_dir = resolve_data_dir(args.data_dir)
    wt = wikitext2_windows(tok, args.window, data_dir=data_dir, max_windows=args.windows)
    docs = load_jsonl_texts(c4_sample_path(data_dir))[: args.c4_docs]
    c4 = c4_windows(tok, docs, args.window)
    n_c4 = len(c4)
    calib_idx = [round(i * n_c4 / args.calib_windows) for i in range(args.calib_windows)]
    free = [i for i in range(n_c4) if i not in calib_idx]
    sens_idx = [free[round((i + 0.5) * len(free) / args.sens_windows)] for i in range(args.sens_windows)]
    log(f"loaded {spec.name}: {len(wt)} WikiText windows; {n_c4} C4 windows from docs 0..{len(docs) - 1}: "
        f"thresholds from windows {calib_idx}, sensitivities on windows {sens_idx}")

    # -- thresholds (C4 only)
    sparse_levels = [d for d in LEVELS if d < 1]
    thr = teal_thresholds(model, torch.stack([c4[i] for i in calib_idx]), sparse_levels)
    thr[1.0] = {k: [-1.0] * L for k in KEYS}
    log("thresholds calibrated")

    class Nudged(FastTeal):
        """FastTeal with block 0's attention input scaled by (1 + 1e-6): how far rounding-size changes carry."""

        def attn_input(self, layer, x):
            return super().attn_input(layer, x * (1 + 1e-6) if layer == 0 else x)

    def policy(densities):
        return FastTeal(assemble(thr, densities), sum(densities) / L, L)

    # -- the masked evaluation == the gather path with the plain TealPolicy (short window)
    x = wt[0][None, :128]
    gather_check = {}
    for name, dens in (("uniform 0.6", [0.6] * L),
                       ("mixed 1.0/0.9/.../0.4", [LEVELS[l % len(LEVELS)] for l in range(L)])):
        rec_pol = RecordingTeal(assemble(thr, dens), sum(dens) / L)
        ref = model(x, sparsity=rec_pol)
        with masked_mlp(model):
            rep = model(x, sparsity=ReplayTeal(rec_pol))
            own = model(x, sparsity=policy(dens))
            nudged = model(x, sparsity=Nudged(assemble(thr, dens), sum(dens) / L, L))
        nll = lambda lg: float(F.cross_entropy(lg[0, :-1], x[0, 1:]))  # noqa: E731
        scale = ref.abs().max()
        gather_check[name] = {"replayed": float((rep - ref).abs().max() / scale),
                              "free": float((own - ref).abs().max() / scale),
                              "masked_vs_nudged_masked": float((nudged - own).abs().max() / scale),
                              "nll_gather": nll(ref), "nll_masked_free": nll(own)}
    log("gather vs masked (max rel diff of logits):", gather_check)

    rows = []

    def evaluate(kind, densities, label, extra=None):
        pol = policy(densities) if kind != "dense" else None
        t = time.perf_counter()
        with masked_mlp(model):
            r = perplexity({label: lambda ids: model(ids, sparsity=pol)}, wt, progress=False)[label]
        ach = pol.achieved() if pol is not None else {k: [1.0] * L for k in KEYS}
        row = {"kind": kind, "label": label, "density": list(densities),
               "mean_density": sum(densities) / L,
               "block_bytes_skipped": nominal_skip(spec, densities),
               "achieved_density": ach,
               "achieved_mean_density": {k: sum(v) / L for k, v in ach.items()},
               "achieved_block_bytes_skipped": achieved_skip(spec, ach),
               "ppl": r["ppl"], "nll": r["nll"], "tokens": r["tokens"], "seconds": time.perf_counter() - t}
        row["increase"] = row["ppl"] / rows[0]["ppl"] - 1 if rows else 0.0
        row.update(extra or {})
        rows.append(row)
        log(f"{label:40s} skip {row['block_bytes_skipped']:.4f} (achieved {row['achieved_block_bytes_skipped']:.4f})"
            f"  ppl {row['ppl']:.4f}  {100 * row['increase']:+.2f}%  ({row['seconds']:.0f}s)")
        return row

    evaluate("dense", [1.0] * L, "dense")
    for d in UNIFORM:
        evaluate("uniform", [d] * L, f"uniform TEAL d={d}")
    t_eval = rows[-1]["seconds"]

    # -- single-layer sensitivities on C4 (paired NLL against dense, per predicted token)
    class Probe:
        """Fixed C4 windows: mean NLL of the model from any block's input, under per-block policies."""

        def __init__(self, windows):
            self.ids = torch.stack(windows)  # (W, T)
            self.targets = self.ids[:, 1:].reshape(-1)
            self.n_tok = self.targets.numel()
            self.x0, self.rope = model.embed_positions(self.ids)

        def nll(self, h):
            logits = model.lm_head(model.norm_f(h))[:, :-1]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.targets, reduction="sum")
            return float(nll) / self.n_tok

        def full(self, pol, record):
            with masked_mlp(model):
                return self.nll(model.run_blocks(self.x0, self.rope, policy=pol, record=record))

        def run_from(self, l, h, pol_l, pol_rest):
            """Block l under pol_l, blocks l+1.. under pol_rest, from block l's input h."""
            with masked_mlp(model):
                h = model.layers[l](h, l, self.rope, 0, None, pol_l, "all")
                return self.nll(model.run_blocks(h, self.rope, policy=pol_rest, first=l + 1))

    sens = Probe([c4[i] for i in sens_idx])
    rec: list[torch.Tensor] = []
    dense_nll = sens.full(None, rec)
    cost = [[0.0] * len(LEVELS) for _ in range(L)]
    t_sens = time.perf_counter()
    for l in range(L):
        for i, d in enumerate(LEVELS[1:], start=1):
            dens = [1.0] * L
            dens[l] = d
            cost[l][i] = sens.run_from(l, rec[l], policy(dens), None) - dense_nll
        log(f"sensitivity layer {l:2d}: " + " ".join(f"{d}:{c:+.4f}" for d, c in zip(LEVELS[1:], cost[l][1:])))
    t_sens = time.perf_counter() - t_sens
    del rec

    skip_of = lambda d: layer_skip(spec, d)  # noqa: E731
    path = greedy_path(LEVELS, cost, skip_of)
    for target in TARGETS:
        hit = next((p for p in path if p[0] >= target - 1e-9), None)
        if hit is None:
            continue
        skip, pred, dens = hit
        evaluate("greedy", dens, f"greedy (single-layer costs) target {target}",
                 {"greedy_target": target, "predicted_c4_dnll": pred})

    # -- refinement: conditional greedy with re-measured marginal costs (only if it fits the budget)
    n_ref = min(args.refine_windows, len(sens_idx))
    refine = {"run": False, "windows": sens_idx[:n_ref]}
    step_skip = layer_skip(spec, 0.9)  # one level (0.1) on one layer
    moves_per_round = max(1, round(args.refine_step / step_skip))
    n_rounds = math.ceil(max(TARGETS) / (moves_per_round * step_skip))
    per_cand = t_sens / (L * (len(LEVELS) - 1)) * n_ref / len(sens_idx) * 1.2  # other layers sparse: ~1.2x
    est_round = L * per_cand + 3 * per_cand
    est_total = elapsed() + n_rounds * est_round + len(TARGETS) * (t_eval + 3) + 10
    log(f"refinement: {n_rounds} rounds of {moves_per_round} moves on {n_ref} C4 windows, ~{est_round:.0f}s a "
        f"round; expected total {est_total / 60:.1f} min (budget {args.budget_min} min)")
    if not args.no_refine and est_total <= args.budget_min * 60:
        refine.update(run=True, moves_per_round=moves_per_round, rounds=[])
        probe = Probe([c4[i] for i in sens_idx[:n_ref]])
        base_nll = probe.full(None, None)
        state = [0] * L
        snapshots = {}
        while True:
            dens = [LEVELS[i] for i in state]
            cur_skip = nominal_skip(spec, dens)
            if cur_skip >= max(TARGETS) - 1e-9:
                break
            cur_pol = policy(dens)
            rec = []
            cur_nll = probe.full(cur_pol, rec)
            cands = []
            for l in range(L):
                if state[l] + 1 >= len(LEVELS):
                    continue
                cd = list(dens)
                cd[l] = LEVELS[state[l] + 1]
                marg = probe.run_from(l, rec[l], policy(cd), cur_pol) - cur_nll
                cands.append((marg / step_skip, l, marg))
            del rec
            if not cands:
                break
            cands.sort()
            applied = []
            for _, l, marg in cands[:moves_per_round]:
                state[l] += 1
                applied.append({"layer": l, "to": LEVELS[state[l]], "marginal_dnll": marg})
                s_now = nominal_skip(spec, [LEVELS[i] for i in state])
                for target in TARGETS:
                    if target not in snapshots and s_now >= target - 1e-9:
                        snapshots[target] = [LEVELS[i] for i in state]
            refine["rounds"].append({"skip_before": cur_skip, "c4_dnll_before": cur_nll - base_nll,
                                     "applied": applied})
            log(f"refine round {len(refine['rounds'])}: skip {cur_skip:.4f}, C4 dNLL {cur_nll - base_nll:+.4f}; "
                "moved " + ", ".join(f"L{m['layer']}->{m['to']}" for m in applied))
        for target in TARGETS:
            if target in snapshots:
                evaluate("conditional", snapshots[target], f"conditional greedy target {target}",
                         {"greedy_target": target})

    # -- summary
    def pts(kind, key="block_bytes_skipped"):
        return [(r[key], r["increase"]) for r in rows if r["kind"] == kind]

    summary = {}
    for kind in ("uniform", "greedy", "conditional"):
        if pts(kind):
            summary[kind] = {"max_skip_within_1pct": max_skip_within(pts(kind), TARGET_INCREASE),
                             "increase_at_0.25": interp_increase_at(pts(kind), TARGET_SKIP),
                             "achieved_max_skip_within_1pct":
                                 max_skip_within(pts(kind, "achieved_block_bytes_skipped"), TARGET_INCREASE)}
    reached = [r["label"] for r in rows if r["kind"] != "dense"
               and r["block_bytes_skipped"] >= TARGET_SKIP - 1e-9 and r["increase"] <= TARGET_INCREASE]

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if os.environ.get("PYTHONPATH"):
        command = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} {command}"
    machine = f"{cpu_name()} (CPU), float32, torch {torch.__version__}, {args.threads} thread(s)"
    a = spec.attn_param_counts()
    result = {
        "command": command, "machine": machine, "model": spec.name,
        "wikitext": {"windows": len(wt), "window": args.window, "predicted_tokens": rows[0]["tokens"],
                     "convention": "first windows of wiki.test.raw, CRLF->LF, no context across windows"},
        "c4_calibration": {"docs": [0, len(docs) - 1], "windows": n_c4, "threshold_windows": calib_idx,
                           "threshold_tokens": len(calib_idx) * args.window, "sensitivity_windows": sens_idx,
                           "sensitivity_tokens": sens.n_tok},
        "block": {"qkv_fraction": (a["q"] + a["k"] + a["v"]) / spec.block_params(),
                  "o_fraction": a["o"] / spec.block_params(), "mlp_fraction": spec.mlp_params() / spec.block_params(),
                  "teal_sparsifiable_fraction": teal_block_bytes_skipped(spec, 0.0)},
        "levels": list(LEVELS),
        "targets": {"block_bytes_skipped": TARGET_SKIP, "max_ppl_increase": TARGET_INCREASE},
        "gather_check_max_rel_diff": gather_check,
        "thresholds": {str(d): thr[d] for d in sparse_levels},
        "single_layer_dnll": {str(d): [cost[l][i] for l in range(L)] for i, d in enumerate(LEVELS) if d < 1},
        "dense_c4_nll": dense_nll,
        "greedy_path": [{"skip": s, "predicted_c4_dnll": p} for s, p, _ in path],
        "refinement": refine,
        "rows": rows, "summary": summary, "target_reached_by": reached,
        "seconds": elapsed(),
    }
    out = Path(args.out)
    write_atomic(out / "teal_allocation_study.json", json.dumps(result, indent=1) + "\n")
    write_atomic(out / "teal_allocation_study.md", render_md(result))
    log(f"wrote {out}/teal_allocation_study.{{json,md}}")


def render_md(r) -> str:
    dense = r["rows"][0]
    w, c = r["wikitext"], r["c4_calibration"]
    lines = [
        "# TEAL with a greedy per-layer density allocation: 0.25 of block bytes skipped at <= +1% ppl?", "",
        f"Made by `{r['command']}` on {r['machine']}, {r['seconds'] / 60:.1f} min. Model {r['model']}.", "",
        f"All rows on the same tokens: the first {w['windows']} WikiText-2 test windows of {w['window']} tokens "
        f"(CRLF->LF, {w['predicted_tokens']} predicted tokens). Dense ppl **{dense['ppl']:.4f}**. "
        f"Thresholds (`teal_thresholds`, levels {', '.join(f'{d:g}' for d in r['levels'][1:])}) from "
        f"{len(c['threshold_windows'])} windows ({c['threshold_tokens']} tokens) evenly spread over the "
        f"{c['windows']} {w['window']}-token windows of C4 docs {c['docs'][0]}..{c['docs'][1]}; single-layer "
        f"sensitivities on {len(c['sensitivity_windows'])} other windows of the same docs "
        f"({c['sensitivity_tokens']} predicted tokens; the conditional refinement's marginal costs on the first "
        f"{len(r['refinement']['windows'])} of them). Never WikiText.", "",
        f"TEAL sparsifies the inputs of q/k/v and of gate/up and the MLP intermediate (down rows); o_proj dense. "
        f"q/k/v + MLP = {r['block']['teal_sparsifiable_fraction']:.3f} of block bytes, so block_bytes_skipped = "
        f"{r['block']['teal_sparsifiable_fraction']:.3f} x (1 - density), per layer (the accounting of "
        "`teal_block_bytes_skipped`), averaged over layers, from the nominal level densities. \"achieved\" = the "
        "same from the fraction of entries actually above the thresholds on these WikiText tokens, per site "
        "(q/k/v from the attention input, gate/up from the MLP input, down from the intermediate).", "",
        "| allocation | density | mean density | block_bytes_skipped | achieved skipped | ppl | vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        d = row["density"]
        dtxt = f"{d[0]:g}" if len(set(d)) == 1 else "per-layer: [" + ", ".join(f"{x:g}" for x in d) + "]"
        lines.append("| " + " | ".join(md_cell(s) for s in (
            row["label"], dtxt, f"{row['mean_density']:.3f}", f"{row['block_bytes_skipped']:.4f}",
            f"{row['achieved_block_bytes_skipped']:.4f}", f"{row['ppl']:.4f}",
            f"{100 * row['increase']:+.2f}%")) + " |")
    s = r["summary"]
    names = {"uniform": "uniform TEAL", "greedy": "greedy per-layer (single-layer C4 costs)",
             "conditional": "conditional greedy (re-measured C4 marginal costs)"}
    lines += ["", "| allocation | max block_bytes_skipped at <= +1% (interpolated) | same, achieved bytes | "
              "ppl increase at 0.25 skipped (interpolated) |", "|---|---|---|---|"]
    for k, name in names.items():
        if k not in s:
            continue
        inc = s[k]["increase_at_0.25"]
        lines.append(f"| {md_cell(name)} | {s[k]['max_skip_within_1pct']:.3f} | "
                     f"{s[k]['achieved_max_skip_within_1pct']:.3f} | "
                     f"{'not reached' if inc is None else f'{100 * inc:+.2f}%'} |")
    lines += ["", "## Reading", ""]
    if r["target_reached_by"]:
        lines.append("The target IS reached by: " + "; ".join(r["target_reached_by"]) + ".")
    else:
        lines.append("No TEAL allocation measured here reaches 0.25 of block bytes skipped at <= +1% WikiText-2 "
                     "perplexity.")
    best_k = max(s, key=lambda k: s[k]["max_skip_within_1pct"])
    lines.append(f"Most skipped within +1% (interpolated): {names[best_k]}, {s[best_k]['max_skip_within_1pct']:.3f}"
                 f" (uniform: {s['uniform']['max_skip_within_1pct']:.3f}).")
    g = [row for row in r["rows"] if row["kind"] == "greedy" and row.get("greedy_target") == TARGET_SKIP]
    if g:
        lines.append(f"The single-layer greedy allocation at {g[0]['block_bytes_skipped']:.3f} skipped measures "
                     f"{100 * g[0]['increase']:+.2f}% on WikiText-2; the sum of its single-layer C4 sensitivities "
                     f"predicted {g[0]['predicted_c4_dnll']:+.4f} nats/token "
                     f"({100 * (math.exp(g[0]['predicted_c4_dnll']) - 1):+.2f}%).")
    ref = r["refinement"]
    if not ref["run"]:
        lines.append("The conditional refinement was not run (it would not have fit the time budget).")
    else:
        last = ref["rounds"][-1]
        cg = {row["greedy_target"]: row for row in r["rows"] if row["kind"] == "conditional"}
        lines.append(f"The conditional refinement re-measured every layer's one-level marginal cost on C4 windows "
                     f"{ref['windows']} with all other layers at their current levels, and applied the "
                     f"{ref['moves_per_round']} cheapest moves per round ({len(ref['rounds'])} rounds); on those "
                     f"windows its allocation at {last['skip_before']:.3f} skipped cost "
                     f"{last['c4_dnll_before']:+.4f} nats/token ("
                     f"{100 * (math.exp(last['c4_dnll_before']) - 1):+.2f}%), while on WikiText-2 its allocations "
                     "measure " + ", ".join(f"{100 * row['increase']:+.2f}% at {row['block_bytes_skipped']:.3f}"
                                            for row in cg.values()) + ".")
    neg = sum(c < 0 for v in r["single_layer_dnll"].values() for c in v)
    tot = sum(len(v) for v in r["single_layer_dnll"].values())
    beats = [names[k] for k in ("greedy", "conditional")
             if k in s and s[k]["max_skip_within_1pct"] > s["uniform"]["max_skip_within_1pct"]]
    lines.append(f"{neg} of the {tot} single-layer C4 costs are negative (sparsifying one layer lowered the C4 NLL): "
                 f"many per-layer differences are at the level of what {r['c4_calibration']['sensitivity_tokens']} "
                 "calibration tokens can resolve, so a "
                 "greedy on them ranks layers partly by noise. "
                 + ("Allocations that beat uniform within +1%: " + "; ".join(beats) + "." if beats else
                    "Neither greedy allocation beats the uniform density within +1% on WikiText-2."))
    below = [row for row in r["rows"] if row["kind"] == "uniform" and row["increase"] < 0]
    if below:
        lines.append("Uniform " + ", ".join(f"d={row['density'][0]:g}" for row in below) + " measure below dense "
                     "on these WikiText-2 tokens, which helps the uniform curve.")
    first_over = [names[k] for k in s
                  if min((row for row in r["rows"] if row["kind"] == k),
                         key=lambda row: row["block_bytes_skipped"])["increase"] > TARGET_INCREASE]
    lines.append("Interpolated columns are linear between measured points, starting from dense at (0, 0)"
                 + (f"; for {', '.join(first_over)} the first measured point is already above +1%, so its "
                    "interpolated maximum is a lower bound, not a measurement." if first_over else "."))
    chk = r["gather_check_max_rel_diff"]
    lines += ["", "Masked evaluation vs the model's gather path with the plain TealPolicy (first 128 WikiText tokens, "
              "max relative logit difference, gather run's cuts and selections replayed / each path selecting on its "
              "own / masked vs masked with block 0's input scaled by 1 + 1e-6; mean NLL gather / masked): "
              + ", ".join(f"{md_cell(k)} {v['replayed']:.1e} / {v['free']:.1e} / {v['masked_vs_nudged_masked']:.1e} "
                          f"(NLL {v['nll_gather']:.4f} / {v['nll_masked_free']:.4f})" for k, v in chk.items())
              + ". Given the same cuts the two paths agree to rounding. Selecting on their own, rounding-level "
              "differences flip a few entries that sit at a threshold, and a flipped entry (of magnitude ~ the "
              "threshold) changes the next layers' inputs, so the logits drift apart; a 1e-6 nudge of the input "
              "does the same within one path. This is a property of hard thresholds, not of the evaluation path.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
