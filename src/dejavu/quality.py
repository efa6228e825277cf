"""`dejavu eval`: dense and sparse (and baselines) scored on the same tokens in one run.

Rows: dense; sparse (the saved predictors at their operating point); oracle (exact top-k at the same per-layer
densities); teal (magnitude thresholds skipping the same fraction of block bytes). Also: achieved density per layer,
predictor recall against the oracle top-k of the same size, and a sweep of perplexity against skipped bytes for
predictors, oracle and TEAL (the plot).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .accounting import bytes_summary, predictor_params
from .baselines import oracle_policy, teal_block_bytes_skipped, teal_density_for, teal_policy, teal_thresholds
from .eval.data import load_jsonl_texts, resolve_data_dir, split_c4
from .eval.perplexity import c4_windows, perplexity, wikitext2_windows
from .eval.tasks import DEFAULT_TASKS, evaluate_tasks
from .models.load import LoadedModel
from .operating_point import policy_from_operating_point
from .predictors.model import PredictorSet
from .runtime.policy import PredictorPolicy

SWEEP_LEVELS = (0.8, 0.65, 0.5, 0.35)


@dataclass
class EvalConfig:
    window: int = 1024
    wikitext_windows: int | None = None  # None = the whole test file
    c4_docs: int = 100  # evaluation docs from the tail of the C4 file (never calibrated on)
    tasks: tuple[str, ...] = DEFAULT_TASKS
    task_limit: int | None = None
    num_fewshot: int = 0
    batch_size: int = 4
    baselines: bool = True
    int8_predictors: bool = False  # also score with the predictors rounded to int8 rows (a sparse_int8 column)
    sweep_windows: int = 8  # WikiText windows for the perplexity-vs-bytes sweep (0 = no sweep)
    fidelity_windows: int = 4
    data_dir: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)


class FidelityPolicy(PredictorPolicy):
    """The predictor policy that also measures, per layer, recall of the oracle top-k of the same size."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        L = self.n_layers
        self.hits = {"mlp": [0.0] * L, "heads": [0.0] * L}
        self.total = {"mlp": [0.0] * L, "heads": [0.0] * L}

    def _recall(self, kind, layer, sel, truth_scores):
        if sel is None:
            return
        k_t = sel.counts()  # (n,) blocks this token reads; the oracle gets the same number
        order = truth_scores.argsort(dim=1, descending=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        hit = rank.gather(1, sel.idx) < k_t[:, None]
        if sel.valid is not None:
            hit = hit & sel.valid
        self.hits[kind][layer] += float(hit.sum())
        self.total[kind][layer] += float(k_t.sum())

    def heads(self, layer, attn_in, attn, rope):
        sel = super().heads(layer, attn_in, attn, rope)
        n = attn_in.shape[0] * attn_in.shape[1]
        self._recall("heads", layer, sel, attn.head_output_norms(attn_in, rope).reshape(n, -1))
        return sel

    def neurons(self, layer, mlp_in, mlp, resid):
        sel = super().neurons(layer, mlp_in, mlp, resid)
        n = mlp_in.shape[0] * mlp_in.shape[1]
        self._recall("mlp", layer, sel, mlp.activation(mlp_in).abs().reshape(n, -1))
        return sel

    def recall(self) -> dict:
        return {k: [h / t if t else None for h, t in zip(self.hits[k], self.total[k])] for k in self.hits}


def _fn(model, policy, kv_policy=None):
    def f(ids):
        return model(ids.to(model.device), sparsity=policy, kv_policy=kv_policy)
    return f


def run_eval(lm: LoadedModel, predictors: PredictorSet, cfg: EvalConfig, log=print) -> dict:
    model, tok, spec = lm.model, lm.tokenizer, lm.model.spec
    predictors.check_model(spec)
    op = predictors.meta.get("operating_point")
    if op is None:
        raise ValueError("the predictor directory has no operating point; re-run `dejavu calibrate`")
    data_dir = resolve_data_dir(cfg.data_dir)
    md, hd = op["mlp_density"], op["head_density"]
    sparse = policy_from_operating_point(predictors, op)
    models = {"dense": _fn(model, None), "sparse": _fn(model, sparse)}
    int8 = copy.deepcopy(predictors).quantize_int8() if cfg.int8_predictors and not predictors.int8 else None
    if int8 is not None:  # the same operating point, its factors rounded to int8 rows (what the GPU decode reads)
        models["sparse_int8"] = _fn(model, policy_from_operating_point(int8, op))
    if cfg.baselines and op.get("kv_policy", "all") == "all" and min(hd) < 1:  # the other KV policy, same selections
        models["sparse_kv_selected"] = _fn(model, policy_from_operating_point(predictors, op), kv_policy="selected")
    pol_oracle = None
    teal_density = None
    op_bytes = bytes_summary(spec, md, hd, predictor_params=predictor_params(predictors.meta, md, hd))

    # held-apart C4 documents: the tail of the file, which calibration never used
    c4_path = data_dir / "c4" / "c4_train_sample.jsonl"
    n_c4 = len(load_jsonl_texts(c4_path))
    split_meta = predictors.meta.get("split", {})
    calib_end = (split_meta.get("calib_range") or [0, 0])[1] if split_meta.get("path") else 0
    c4_docs = min(cfg.c4_docs, n_c4 - calib_end)
    c4 = split_c4(c4_path, n_calib=0, n_eval=c4_docs, n_holdout=0, seed=None)
    holdout_texts = split_c4(c4_path, n_calib=0, n_eval=c4_docs, n_holdout=8, seed=None).holdout

    if cfg.baselines:
        pol_oracle = oracle_policy(spec, md, hd)
        models["oracle"] = _fn(model, pol_oracle)
        teal_density = teal_density_for(spec, op_bytes["block_bytes_skipped"])
        hold = c4_windows(tok, holdout_texts, 256, max_windows=8)
        ids = torch.stack(hold).to(model.device)
        teal_t = teal_thresholds(model, ids, sorted({teal_density, *SWEEP_LEVELS}))
        models["teal"] = _fn(model, teal_policy(teal_t, teal_density))

    wt = wikitext2_windows(tok, cfg.window, data_dir, max_windows=cfg.wikitext_windows)
    log(f"WikiText-2 test: {len(wt)} windows of {cfg.window} tokens; models: {', '.join(models)}")
    sparse.reset_stats()
    wiki = perplexity(models, wt, batch_size=cfg.batch_size, progress=cfg.progress, desc="wikitext-2")
    achieved = sparse.achieved()
    c4w = c4_windows(tok, c4.eval, cfg.window)
    log(f"C4 (docs {c4.eval_range[0]}..{c4.eval_range[1] - 1}, never calibrated on): {len(c4w)} windows")
    c4r = perplexity(models, c4w, batch_size=cfg.batch_size, progress=cfg.progress, desc="c4")
    task_models = {k: models[k] for k in ("dense", "sparse")}
    tasks = evaluate_tasks(task_models, tok, cfg.tasks, data_dir=data_dir, num_fewshot=cfg.num_fewshot,
                           limit=cfg.task_limit, batch_size=max(1, cfg.batch_size * 2), progress=cfg.progress)

    fids = {name: FidelityPolicy(p, md, hd, mode=op["mode"], mlp_threshold=op.get("mlp_threshold"),
                                 head_threshold=op.get("head_threshold"))
            for name, p in (("fp", predictors), ("int8", int8)) if p is not None}  # fmt: skip
    with torch.no_grad():
        for w in wt[: cfg.fidelity_windows]:
            for fid in fids.values():
                model(w[None].to(model.device), sparsity=fid)
    fid = fids["fp"]

    result = {
        "model": spec.name, "source": lm.source, "dtype": str(model.dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu",
        "window": cfg.window,
        "wikitext2": {"windows": len(wt), "tokens": wiki["dense"]["tokens"],
                      **{f"{k}_ppl": v["ppl"] for k, v in wiki.items()}},
        "c4": {"docs": list(c4.eval_range), "windows": len(c4w), "tokens": c4r["dense"]["tokens"],
               **{f"{k}_ppl": v["ppl"] for k, v in c4r.items()}},
        "tasks": {t: {m: r[m]["acc"] for m in r} | {f"{m}_acc_norm": r[m]["acc_norm"] for m in r} | {"n": r["dense"]["n"]}
                  for t, r in tasks.items()},
        "num_fewshot": cfg.num_fewshot,
        "block_bytes_skipped": op_bytes["block_bytes_skipped"],
        "mlp_density": op_bytes["mlp_density"], "head_density": op_bytes["head_density"],
        "bytes": op_bytes,
        **({"bytes_int8": bytes_summary(spec, md, hd, predictor_params=predictor_params(int8.meta, md, hd))}
           if int8 is not None else {}),
        "operating_point": {k: op[k] for k in ("mode", "kv_policy", "max_ppl_increase", "mlp_density", "head_density",
                                               "holdout_ppl_increase")},
        "achieved_density_per_layer": achieved,
        "predictor_recall_vs_oracle_topk": fid.recall(),
        **({"predictor_recall_vs_oracle_topk_int8": fids["int8"].recall()} if "int8" in fids else {}),
        "predictor_weights": "int8" if predictors.int8 else str(next(predictors.parameters()).dtype).removeprefix(
            "torch."),
        "teal_density": teal_density,
        "teal_block_bytes_skipped": teal_block_bytes_skipped(spec, teal_density) if teal_density else None,
        "predictors": {k: predictors.meta[k] for k in ("mlp_rank", "head_rank", "input", "labels", "calibration")},
        **cfg.extra,
    }
    if op["mode"] == "threshold":  # threshold mode: what tokens actually read, not the nominal level
        ach = bytes_summary(spec, achieved["mlp"], achieved["heads"])
        result["block_bytes_skipped_achieved"] = ach["block_bytes_skipped"]
    accs = [(v["dense"], v["sparse"]) for v in result["tasks"].values()]
    result["task_avg"] = {"dense": sum(a for a, _ in accs) / len(accs), "sparse": sum(b for _, b in accs) / len(accs)}
    if cfg.sweep_windows and cfg.baselines:
        result["sweep"] = sweep(lm, predictors, wt[: cfg.sweep_windows], teal_t, cfg, op_bytes, wiki, int8=int8)
    return result


def sweep(lm, predictors, windows, teal_t, cfg, op_bytes, wiki_full, int8=None) -> dict:
    """Perplexity against block bytes skipped, uniform densities, for predictors / oracle / TEAL (same windows), and
    the predictors rounded to int8 rows (``int8``, a quantized copy) where given."""
    model, spec = lm.model, lm.model.spec
    L = spec.n_layers
    models, points = {"dense": _fn(model, None)}, {}
    for lv in SWEEP_LEVELS:
        md, hd = [lv] * L, [1.0] * L
        models[f"predictor@{lv}"] = _fn(model, PredictorPolicy(predictors, md, hd))
        if int8 is not None:
            models[f"predictor_int8@{lv}"] = _fn(model, PredictorPolicy(int8, md, hd))
            points[f"predictor_int8@{lv}"] = bytes_summary(spec, md, hd)["block_bytes_skipped"]
        models[f"oracle@{lv}"] = _fn(model, oracle_policy(spec, md, hd))
        models[f"teal@{lv}"] = _fn(model, teal_policy(teal_t, lv))
        skipped = bytes_summary(spec, md, hd)["block_bytes_skipped"]
        points[f"predictor@{lv}"] = points[f"oracle@{lv}"] = skipped
        points[f"teal@{lv}"] = teal_block_bytes_skipped(spec, lv)
    res = perplexity(models, windows, batch_size=cfg.batch_size, progress=cfg.progress, desc="sweep")
    dense = res["dense"]["ppl"]
    rows = [{"method": name.split("@")[0], "density": float(name.split("@")[1]), "block_bytes_skipped": points[name],
             "ppl": r["ppl"], "ppl_increase": r["ppl"] / dense - 1} for name, r in res.items() if name != "dense"]
    return {"windows": len(windows), "dense_ppl": dense, "rows": rows,
            "operating_point": {"block_bytes_skipped": op_bytes["block_bytes_skipped"],
                                "ppl_increase_full_wikitext": wiki_full["sparse"]["ppl"] / wiki_full["dense"]["ppl"] - 1}}


def to_markdown(r: dict, command: str) -> str:
    w, c = r["wikitext2"], r["c4"]
    L = []
    L.append(f"# Quality: {r['model']}, dense vs sparse on the same tokens\n")
    L.append(f"Made by `{command}` on {r['device']} ({r['dtype']}).\n")
    L.append(f"Operating point: mode {r['operating_point']['mode']}, KV policy {r['operating_point']['kv_policy']}, "
             f"mean MLP density {r['mlp_density']:.3f}, mean head density {r['head_density']:.3f}, "
             f"**block bytes skipped {r['block_bytes_skipped']:.3f}** (predictors read "
             f"{100 * r['bytes']['predictor_fraction_of_blocks']:.1f}% of block bytes on top"
             + (f"; {100 * r['bytes_int8']['predictor_fraction_of_blocks']:.1f}% as int8 rows" if "bytes_int8" in r
                else "") + ").\n")
    names = [k[:-4] for k in w if k.endswith("_ppl")]
    L.append("| perplexity | " + " | ".join(names) + " | sparse vs dense |")
    L.append("|---|" + "---|" * (len(names) + 1))
    for label, d in ((f"WikiText-2 test ({w['tokens']} tokens, {r['window']}-token windows)", w),
                     (f"C4 held-apart docs {c['docs'][0]}..{c['docs'][1] - 1} ({c['tokens']} tokens)", c)):
        L.append(f"| {label} | " + " | ".join(f"{d[n + '_ppl']:.3f}" for n in names)
                 + f" | {100 * (d['sparse_ppl'] / d['dense_ppl'] - 1):+.2f}% |")
    L.append(f"\nsparse = learned predictors ({r.get('predictor_weights', 'float')} weights) at the chosen operating "
             "point (KV cache policy as listed above); "
             "sparse_kv_selected = the same selections with K/V computed only for the KV heads the selected query "
             "heads need (holes in the cache are masked for later tokens).")
    if "sparse_int8_ppl" in w:
        L.append("sparse_int8 = the same operating point with the predictors' factors rounded to int8 rows, one fp32 "
                 "scale a row (what the GPU decode reads with `--int8-predictors`: half the predictor bytes of fp16).")
    if r.get("teal_density") is not None:
        L.append(f"oracle = exact top-k at the same per-layer densities; teal = magnitude thresholds at density "
                 f"{r['teal_density']:.3f} (block bytes skipped {r['teal_block_bytes_skipped']:.3f}).")
    L.append("")
    L.append(f"| task ({r['num_fewshot']}-shot) | n | dense acc | sparse acc | dense acc_norm | sparse acc_norm |")
    L.append("|---|---|---|---|---|---|")
    for t, v in r["tasks"].items():
        L.append(f"| {t} | {v['n']} | {v['dense']:.4f} | {v['sparse']:.4f} | {v['dense_acc_norm']:.4f} | "
                 f"{v['sparse_acc_norm']:.4f} |")
    a = r["task_avg"]
    L.append(f"| **average** | | {a['dense']:.4f} | {a['sparse']:.4f} | | |")
    ad, rec = r["achieved_density_per_layer"], r["predictor_recall_vs_oracle_topk"]
    r8 = r.get("predictor_recall_vs_oracle_topk_int8")
    L.append("\n| layer | MLP density | head density | MLP recall vs oracle top-k | head recall |"
             + (" MLP recall, int8 | head recall, int8 |" if r8 else ""))
    L.append("|---|---|---|---|---|" + ("---|---|" if r8 else ""))
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for i in range(len(ad["mlp"])):
        L.append(f"| {i} | {ad['mlp'][i]:.3f} | {ad['heads'][i]:.3f} | {fmt(rec['mlp'][i])} | {fmt(rec['heads'][i])} |"
                 + (f" {fmt(r8['mlp'][i])} | {fmt(r8['heads'][i])} |" if r8 else ""))
    if "sweep" in r:
        s = r["sweep"]
        L.append(f"\nSweep ({s['windows']} WikiText-2 windows, uniform density, heads dense; dense ppl {s['dense_ppl']:.3f}):\n")
        L.append("| method | density | block bytes skipped | ppl | increase |")
        L.append("|---|---|---|---|---|")
        for row in sorted(s["rows"], key=lambda x: (x["method"], -x["density"])):
            L.append(f"| {row['method']} | {row['density']:.2f} | {row['block_bytes_skipped']:.3f} | {row['ppl']:.3f} | "
                     f"{100 * row['ppl_increase']:+.2f}% |")
    return "\n".join(L) + "\n"


def plot(r: dict, path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    s = r["sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"predictor": "learned predictors (uniform)", "predictor_int8": "the same, int8 rows",
              "oracle": "oracle top-k", "teal": "TEAL thresholds"}
    for method, style in (("predictor", "o-"), ("predictor_int8", "x-."), ("oracle", "s--"), ("teal", "^:")):
        rows = sorted((x for x in s["rows"] if x["method"] == method), key=lambda x: x["block_bytes_skipped"])
        if rows:
            ax.plot([x["block_bytes_skipped"] for x in rows], [100 * x["ppl_increase"] for x in rows], style,
                    label=labels[method])
    op = s["operating_point"]
    ax.plot([op["block_bytes_skipped"]], [100 * op["ppl_increase_full_wikitext"]], "r*", ms=14,
            label="chosen operating point (full WikiText-2)")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("fraction of attention+MLP weight bytes skipped per decode token")
    ax.set_ylabel("WikiText-2 perplexity increase (%)")
    ax.set_title(f"{r['model']}: quality vs bytes skipped")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
