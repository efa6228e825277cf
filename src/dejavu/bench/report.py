"""Rows, tables and plots of the decode benchmark (plain Python: no GPU, testable on fake timings).

A row is one (model, batch, mode, densities) measurement. ``make_row`` turns raw step times and byte counts into the
reported numbers; ``finalize`` adds the cross-row ratios (vs ours-dense and vs hf-eager of the same model and batch);
``write_outputs`` writes ``<slug>.json`` (atomically), ``<slug>.md`` and ``<slug>.png``.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

from ..atomic import write_json_atomic, write_text_atomic

KEY = ("gpu", "model", "batch", "mode", "mlp_density", "head_density", "kv_policy")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def quantile(xs, q: float) -> float:
    """Linear-interpolated quantile of a non-empty list."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize_ms(samples) -> dict:
    """Median and spread (p10 / p90) of per-step times in ms."""
    samples = [float(x) for x in samples if x is not None and math.isfinite(x)]
    if not samples:
        return {"ms_per_token": None, "ms_p10": None, "ms_p90": None, "ms_mean": None, "n_samples": 0}
    return {"ms_per_token": statistics.median(samples), "ms_p10": quantile(samples, 0.1),
            "ms_p90": quantile(samples, 0.9), "ms_mean": statistics.fmean(samples), "n_samples": len(samples)}


def make_row(model: str, batch: int, mode: str, *, step_ms=(), mlp_density=1.0, head_density=1.0,
             kv_policy="all", bytes_per_token=None, dense_bytes_per_token=None, kv_bytes_per_token=None,
             copy_bw_gbps=None, gpu="", dtype="fp16", weights="random", error=None, **extra) -> dict:
    """One measurement. ``step_ms``: times of single decode steps (each step makes ``batch`` tokens)."""
    row = {"model": model, "batch": int(batch), "mode": mode, "mlp_density": float(mlp_density),
           "head_density": float(head_density), "kv_policy": kv_policy, **summarize_ms(step_ms)}
    ms = row["ms_per_token"]
    bw = copy_bw_gbps * 1e9 if copy_bw_gbps else None
    row.update({
        "tokens_per_s": batch * 1e3 / ms if ms else None,
        "bytes_per_token": bytes_per_token, "dense_bytes_per_token": dense_bytes_per_token,
        "kv_bytes_per_token": kv_bytes_per_token, "copy_bw_gbps": copy_bw_gbps,
        "effective_gbps": bytes_per_token / (ms * 1e-3) / 1e9 if (ms and bytes_per_token) else None,
        "roofline_ms": bytes_per_token / bw * 1e3 if (bw and bytes_per_token) else None,
        "roofline_kv_ms": ((bytes_per_token + (kv_bytes_per_token or 0)) / bw * 1e3
                           if (bw and bytes_per_token) else None),
        "ideal_speedup": (dense_bytes_per_token / bytes_per_token
                          if (bytes_per_token and dense_bytes_per_token) else None),
        "speedup_vs_dense": None, "speedup_vs_hf_eager": None, "fraction_of_ideal": None,
        "gpu": gpu, "dtype": dtype, "weights": weights, "error": error,
    })
    row.update(extra)
    return row


def finalize(rows: list[dict]) -> list[dict]:
    """Fill speedup_vs_dense / speedup_vs_hf_eager / fraction_of_ideal from the rows of the same GPU, model, batch."""
    base = {}
    for r in rows:
        if r["mode"] in ("ours-dense", "hf-eager") and r.get("ms_per_token"):
            base[(r.get("gpu"), r["model"], r["batch"], r["mode"])] = r["ms_per_token"]
    for r in rows:
        ms = r.get("ms_per_token")
        dense = base.get((r.get("gpu"), r["model"], r["batch"], "ours-dense"))
        hf = base.get((r.get("gpu"), r["model"], r["batch"], "hf-eager"))
        r["speedup_vs_dense"] = dense / ms if (ms and dense) else None
        r["speedup_vs_hf_eager"] = hf / ms if (ms and hf) else None
        ideal = r.get("ideal_speedup")
        r["fraction_of_ideal"] = r["speedup_vs_dense"] / ideal if (r["speedup_vs_dense"] and ideal) else None
    return rows


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of ``new`` replace rows of ``old`` with the same key; order: old first, then the new ones."""
    idx = {tuple(r.get(k) for k in KEY): i for i, r in enumerate(old)}
    out = list(old)
    for r in new:
        k = tuple(r.get(k) for k in KEY)
        if k in idx:
            out[idx[k]] = r
        else:
            idx[k] = len(out)
            out.append(r)
    return out


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


COLUMNS = [  # (header, key, format)
    ("model", "model", "{}"), ("B", "batch", "{}"), ("mode", "mode", "{}"), ("mlp", "mlp_density", "{:g}"),
    ("head", "head_density", "{:g}"), ("ms/tok", "ms_per_token", "{:.3f}"), ("p10", "ms_p10", "{:.3f}"),
    ("p90", "ms_p90", "{:.3f}"), ("tok/s", "tokens_per_s", "{:.0f}"), ("GB/tok", "bytes_per_token", None),
    ("eff GB/s", "effective_gbps", "{:.0f}"), ("roof ms", "roofline_ms", "{:.3f}"),
    ("x dense", "speedup_vs_dense", "{:.2f}"), ("x hf", "speedup_vs_hf_eager", "{:.2f}"),
    ("ideal", "ideal_speedup", "{:.2f}"), ("frac", "fraction_of_ideal", "{:.2f}"),
]


def _cell(r, key, fmt):
    v = r.get(key)
    if key == "bytes_per_token":
        return _f(v / 1e9 if v else None, "{:.3f}")
    return _f(v, fmt)


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"# Decode benchmark on {result.get('gpu', '?')}", "",
             f"copy bandwidth {_f(result.get('copy_bw_gbps'), '{:.0f}')} GB/s (read+write). "
             f"Command: `{result.get('command', '')}`", ""]
    lines += [f"- {n}" for n in result.get("notes", [])] + [""]
    lines.append("| " + " | ".join(h for h, _, _ in COLUMNS) + " | check | error |")
    lines.append("|" + "---|" * (len(COLUMNS) + 2))
    for r in rows:
        cells = [_cell(r, k, f) for _, k, f in COLUMNS]
        err = (r.get("error") or "").replace("|", "/").replace("\n", " ")[:120]
        lines.append("| " + " | ".join(cells) + f" | {r.get('check') or ''} | {err} |")
    return "\n".join(lines) + "\n"


def short_table(rows: list[dict]) -> str:
    """The few columns that matter, fixed width, for the end of the log."""
    keys = [("model", "model", "{}"), ("B", "batch", "{}"), ("mode", "mode", "{}"), ("mlp", "mlp_density", "{:g}"),
            ("head", "head_density", "{:g}"), ("ms/tok", "ms_per_token", "{:.3f}"),
            ("roof", "roofline_ms", "{:.3f}"), ("xdense", "speedup_vs_dense", "{:.2f}"),
            ("xhf", "speedup_vs_hf_eager", "{:.2f}"), ("ideal", "ideal_speedup", "{:.2f}"),
            ("frac", "fraction_of_ideal", "{:.2f}")]
    table = [[h for h, _, _ in keys] + ["note"]]
    for r in rows:
        note = ("ERROR " + r["error"].splitlines()[0][:60]) if r.get("error") else (r.get("check") or "")
        table.append([_f(r.get(k), f) for _, k, f in keys] + [note])
    widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
    return "\n".join("  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     + "  " + row[-1] for row in table)


HEAD_COLORS = {1.0: "tab:blue", 0.5: "tab:orange", 0.25: "tab:green"}


def plot(result: dict, path) -> str | None:
    """ms/token against MLP density at batch 1, one panel per model: ours-sparse points (by head density),
    ours-dense and hf-eager lines, the roofline of each point (bytes / copy bandwidth) and the dense roofline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in result["rows"] if r["batch"] == 1 and r.get("ms_per_token")]
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    for ax, name in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == name]
        sparse = [r for r in rs if r["mode"] == "ours-sparse"]
        for hd in sorted({r["head_density"] for r in sparse}, reverse=True):
            pts = sorted((r["mlp_density"], r["ms_per_token"], r.get("roofline_ms")) for r in sparse
                         if r["head_density"] == hd)
            color = HEAD_COLORS.get(hd, "tab:gray")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=color, label=f"ours-sparse head {hd:g}")
            if all(p[2] for p in pts):
                ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=color, lw=0.8, alpha=0.7)
        for mode, style in (("ours-dense", "r-"), ("hf-eager", "g:"), ("hf-compile", "m-.")):
            m = [r for r in rs if r["mode"] == mode]
            if m:
                ax.axhline(m[0]["ms_per_token"], color=style[0], ls=style[1:], label=mode)
        dense = [r for r in rs if r["mode"] == "ours-dense" and r.get("roofline_ms")]
        if dense:
            ax.axhline(dense[0]["roofline_ms"], color="k", ls=":", lw=0.8, label="dense roofline")
        ax.plot([], [], "kx--", lw=0.8, label="roofline of each point (bytes / copy bw)")
        ax.set_xlim(0, 1.05)
        ax.set_title(f"{name} ({rs[0].get('weights', '')} weights)")
        ax.set_xlabel("MLP density")
        ax.set_ylabel("ms per token (batch 1)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"decode, {result.get('gpu', '')}, fp16")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def write_outputs(result: dict, out_dir, name: str | None = None, png: bool = True) -> dict:
    """Write <slug>.json (temp file + rename), <slug>.md and (optionally) <slug>.png; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / (name or slug(result.get("gpu", "gpu")))
    finalize(result["rows"])
    paths = {"json": str(base.with_suffix(".json")), "md": str(base.with_suffix(".md"))}
    write_json_atomic(base.with_suffix(".json"), result, indent=1)
    write_text_atomic(base.with_suffix(".md"), markdown(result))
    if png:
        try:
            p = plot(result, base.with_suffix(".png"))
        except Exception as e:  # noqa: BLE001 - a plot failure must not lose the numbers
            p = None
            result.setdefault("plot_error", repr(e))
        if p:
            paths["png"] = p
    return paths


def merge_files(files, out_dir) -> dict:
    """Merge result JSONs (e.g. one per model, from separate GPU calls) and rewrite JSON/MD/PNG in ``out_dir``."""
    results = [json.loads(Path(f).read_text()) for f in files]
    if not results:
        raise ValueError("nothing to merge")
    gpus = {r.get("gpu") for r in results}
    merged = dict(results[0])
    rows = []
    for r in results:
        rows = merge_rows(rows, r["rows"])
    merged["rows"] = rows
    merged["command"] = " ; ".join(dict.fromkeys(r.get("command", "") for r in results))
    merged["notes"] = list(dict.fromkeys(n for r in results for n in r.get("notes", [])))
    bws = [r["copy_bw_gbps"] for r in results if r.get("copy_bw_gbps")]
    merged["copy_bw_gbps"] = statistics.median(bws) if bws else None
    if len(gpus) > 1:
        merged["notes"].append(f"WARNING: merged results from different GPUs {sorted(map(str, gpus))}; "
                               "compare rows only within one gpu value")
        merged["gpu"] = "+".join(sorted(map(str, gpus)))
    return write_outputs(merged, out_dir)
