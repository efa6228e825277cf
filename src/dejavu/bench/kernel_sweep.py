"""Kernel sweep: each sparse kernel vs. the dense GEMV of its layer vs. the HBM roofline.

For every layer shape (OPT-13B, OPT-30B) and density in ``DENSITIES`` it times

* the sparse kernel (``gather_up`` relu, ``gather_swiglu``, ``gather_down``,
  ``head_gather_gemv``, ``head_gather_down``, and ``sparse_mlp``, the whole OPT MLP block in one launch, which
  the runtime uses at batch <= 2 instead of the up / down pair) with ``triton.testing.do_bench`` (median);
* the dense torch GEMV of the same layer (``x @ W.T``; for SwiGLU both projections; for ``sparse_mlp`` fc1 + bias +
  ReLU + fc2 + residual);
* the roofline: bytes the kernel must move / copy bandwidth, the bandwidth measured in the
  same run by a large device-to-device copy (read + write bytes counted).

HBM, not L2: ``do_bench`` flushes L2 before every timed call, and on top of that each call
uses the next of several weight copies, enough that the copies' selected rows together are
several times the L2 size. A second timing replays the same rotation in a CUDA graph
(``do_bench_cudagraph``): no launch gaps, no flush; the decode runtime runs in graphs, so
both numbers are reported.

Two more numbers frame the ratios. The *launch floor*: a kernel that does nothing but the PDL wait, replayed the
same way over twice as many programs as SMs, is what any kernel of a dependent chain costs before it reads a byte.
And per kernel, a least-squares line through its graph times over the densities, ``time = fixed + bytes / rate``:
``fixed`` is what the kernel costs whatever it reads (ramp, dependent round trips, tail), ``rate`` the bandwidth its
extra bytes stream at.

Writes ``kernel_sweep.json``, ``kernel_sweep.md`` and (if matplotlib imports)
``kernel_sweep_<shape>.png`` to ``--out``; prints a short table last, with the
time / roofline ratio at density 0.1 (target: within 1.3x).

Usage (GPU only)::

    python -m dejavu.bench.kernel_sweep --out results/kernel_sweep [--shapes opt-13b opt-30b]
        [--dtype fp16] [--batch 1]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import write_json_atomic, write_text_atomic

DENSITIES = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
KERNELS = ("gather_up", "gather_swiglu", "gather_down", "head_gather_gemv", "head_gather_down", "sparse_mlp")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TARGET_RATIO = 1.3


@dataclass(frozen=True)
class LayerShape:
    d: int
    ffn: int
    heads: int
    head_dim: int


# SwiGLU is timed on the same d / ffn (OPT itself has no gated MLP).
SHAPES = {
    "opt-13b": LayerShape(d=5120, ffn=20480, heads=40, head_dim=128),
    "opt-30b": LayerShape(d=7168, ffn=28672, heads=56, head_dim=128),
}


def _kernels():
    from dejavu import kernels

    if not kernels.HAS_TRITON:
        sys.exit("kernel_sweep: Triton is not installed (pip install triton).")
    from dejavu.kernels import _checks, gather_mlp

    if _checks.is_interpreted(gather_mlp._gather_rows_kernel):
        sys.exit("kernel_sweep: TRITON_INTERPRET=1 is set; unset it to time the compiled kernels.")
    return kernels


def measure_copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write bytes."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3)


def _copies_needed(bytes_per_call: int, bytes_per_copy: int, l2_bytes: int, budget: int) -> int:
    """Weight copies to rotate over so that a full rotation streams >= 4x L2 of selected rows."""
    want = max(2, math.ceil(4 * l2_bytes / max(bytes_per_call, 1)) + 1)
    return max(2, min(want, budget // max(bytes_per_copy, 1)))


def _rotating(make_call, n: int):
    """A zero-argument callable that cycles through ``make_call(i)`` for i in 0..n-1."""
    calls = [make_call(i) for i in range(n)]
    state = {"i": 0}

    def fn():
        state["i"] = (state["i"] + 1) % n
        return calls[state["i"]]()

    return fn


def _time(fn):
    """(do_bench median, do_bench_cudagraph median) in microseconds; graph time may be None."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    t = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
    try:
        tg = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median") * 1e3
    except Exception as e:  # noqa: BLE001 - the graph timing is a bonus; report why it is missing
        print(f"  (cuda-graph timing unavailable: {type(e).__name__}: {e})", file=sys.stderr)
        tg = None
    return t, tg


def measure_launch_floor(device, programs: int) -> tuple:
    """(do_bench, graph) median us of one no-op launch (``_checks.noop_launch``: the PDL wait only) over ``programs``
    programs of 4 warps, the floor under any kernel of a dependent chain."""
    from dejavu.kernels import _checks

    flag = torch.zeros(1, dtype=torch.int32, device=device)
    return _time(lambda: _checks.noop_launch(flag, programs))


def fit_fixed_cost(records) -> dict:
    """Per kernel, the least-squares line ``graph us = fixed_us + bytes / rate`` through its records' graph times
    (None where fewer than two distinct byte counts have one): ``{kernel: {"fixed_us", "rate_GBps", "points"}}``."""
    fits = {}
    for kernel in dict.fromkeys(r["kernel"] for r in records):
        pts = [(r["bytes"], r["sparse_graph_us"]) for r in records
               if r["kernel"] == kernel and r["sparse_graph_us"] is not None]  # fmt: skip
        if len({b for b, _ in pts}) < 2:
            fits[kernel] = None
            continue
        n = len(pts)
        mb, mt = sum(b for b, _ in pts) / n, sum(t for _, t in pts) / n
        slope = sum((b - mb) * (t - mt) for b, t in pts) / sum((b - mb) ** 2 for b, _ in pts)  # us per byte
        fits[kernel] = dict(fixed_us=mt - slope * mb, rate_GBps=1e-3 / slope if slope > 0 else None, points=n)
    return fits


def _n_selected(kernel: str, shape: LayerShape, density: float) -> int:
    total = shape.heads if kernel.startswith("head") else shape.ffn
    return max(1, min(total, round(density * total)))


def _bytes(kernel: str, shape: LayerShape, k: int, batch: int, elem: int, idx_elem: int = 8) -> int:
    """Bytes the sparse kernel must move: selected weights + activations in/out + indices (+bias)."""
    d, hd = shape.d, shape.head_dim
    if kernel == "gather_up":  # rows, bias[idx], x in, h out
        return k * d * elem + k * elem + batch * d * elem + batch * k * elem + k * idx_elem
    if kernel == "gather_swiglu":
        return 2 * k * d * elem + batch * d * elem + batch * k * elem + k * idx_elem
    if kernel == "gather_down":  # rows, h in, y out
        return k * d * elem + batch * k * elem + batch * d * elem + k * idx_elem
    if kernel == "head_gather_gemv":
        return k * hd * d * elem + batch * d * elem + batch * k * hd * elem + k * idx_elem
    if kernel == "head_gather_down":
        return k * hd * d * elem + batch * k * hd * elem + batch * d * elem + k * idx_elem
    if kernel == "sparse_mlp":  # up and down rows, bias[idx], x in (also the residual), y out
        return 2 * k * d * elem + k * elem + 2 * batch * d * elem + k * idx_elem
    raise ValueError(kernel)


def _bench_kernel(K, kernel, shape, densities, dtype, batch, device, copy_bw, l2_bytes, budget):
    """Time one kernel of one layer shape over all densities; returns a list of records."""
    elem = torch.empty((), dtype=dtype).element_size()
    d, hd, H = shape.d, shape.head_dim, shape.heads
    rows = H * hd if kernel.startswith("head") else shape.ffn
    n_mats = 2 if kernel in ("gather_swiglu", "sparse_mlp") else 1
    copy_bytes = n_mats * rows * d * elem
    min_call = _bytes(kernel, shape, _n_selected(kernel, shape, min(densities)), batch, elem)
    n_copies = _copies_needed(min_call, copy_bytes, l2_bytes, budget)
    gen = torch.Generator(device=device).manual_seed(0)
    mats = [[torch.randn(rows, d, device=device, dtype=dtype, generator=gen) * 0.02 for _ in range(n_mats)]
            for _ in range(n_copies)]  # fmt: skip
    bias = torch.randn(rows, device=device, dtype=dtype, generator=gen)
    x = torch.randn(batch, d, device=device, dtype=dtype, generator=gen)

    # dense baseline: the layer's full GEMV(s) in torch (cuBLAS), same weight copies
    if kernel in ("gather_up", "head_gather_gemv"):
        dense = _rotating(lambda i: (lambda: F.linear(x, mats[i][0])), n_copies)
    elif kernel == "gather_swiglu":
        dense = _rotating(lambda i: (lambda: F.silu(F.linear(x, mats[i][0])) * F.linear(x, mats[i][1])), n_copies)
    elif kernel == "sparse_mlp":  # mats[i] = (fc1 [N, d], fc2 transposed [N, d])
        dense = _rotating(lambda i: (lambda: torch.addmm(x, F.linear(x, mats[i][0], bias).relu_(), mats[i][1])),
                          n_copies)  # fmt: skip
    else:  # down projections: x_in [B, rows] @ w_t [rows, d] == F.linear(x_in, W) with W = w_t.T
        x_in = torch.randn(batch, rows, device=device, dtype=dtype, generator=gen)
        dense = _rotating(lambda i: (lambda: x_in @ mats[i][0]), n_copies)
    dense_us, dense_graph_us = _time(dense)
    dense_roof_us = (n_mats * rows * d * elem) / copy_bw * 1e6

    records = []
    for density in densities:
        k = _n_selected(kernel, shape, density)
        idx = torch.randperm(H if kernel.startswith("head") else shape.ffn, device=device, generator=gen)[:k]
        idx = idx.sort().values  # int64, ascending (the gathers take any order; sorted is the common case)
        if kernel == "gather_up":
            make = lambda i: (lambda: K.gather_up(x, mats[i][0], idx, bias, "relu", validate=False))  # noqa: E731
            ref = lambda: K.gather_up_ref(x.float(), mats[0][0].float(), idx, bias.float(), "relu")  # noqa: E731
        elif kernel == "gather_swiglu":
            make = lambda i: (lambda: K.gather_swiglu(x, mats[i][0], mats[i][1], idx, validate=False))  # noqa: E731
            ref = lambda: K.gather_swiglu_ref(x.float(), mats[0][0].float(), mats[0][1].float(), idx)  # noqa: E731
        elif kernel == "gather_down":
            h = torch.randn(batch, k, device=device, dtype=dtype, generator=gen)
            make = lambda i: (lambda: K.gather_down(h, mats[i][0], idx, None, x, validate=False))  # noqa: E731
            ref = lambda: K.gather_down_ref(h.float(), mats[0][0].float(), idx, None, x.float())  # noqa: E731
        elif kernel == "sparse_mlp":
            ws = K.mlp_workspace(d, device, batch)
            def make(i, ws=ws, idx=idx):
                return lambda: K.sparse_mlp(x, mats[i][0], mats[i][1], idx, bias, None, x, workspace=ws, validate=False)

            def ref(idx=idx):
                return K.sparse_mlp_ref(x.float(), mats[0][0].float(), mats[0][1].float(), idx, bias.float(), None,
                                        x.float())  # fmt: skip
        elif kernel == "head_gather_gemv":
            make = lambda i: (lambda: K.head_gather_gemv(x, mats[i][0], idx, hd, bias, validate=False))  # noqa: E731
            ref = lambda: K.head_gather_gemv_ref(x.float(), mats[0][0].float(), idx, hd, bias.float())  # noqa: E731
        else:
            a = torch.randn(batch, k, hd, device=device, dtype=dtype, generator=gen)
            make = lambda i: (lambda: K.head_gather_down(a, mats[i][0], idx, hd, None, x, validate=False))  # noqa: E731
            ref = lambda: K.head_gather_down_ref(a.float(), mats[0][0].float(), idx, hd, None, x.float())  # noqa: E731
        got, want = make(0)().float(), ref()
        rel_err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
        sparse_us, sparse_graph_us = _time(_rotating(make, n_copies))
        nbytes = _bytes(kernel, shape, k, batch, elem)
        roof_us = nbytes / copy_bw * 1e6
        # the ratios use the graph replay when there is one: the decode runtime runs every kernel inside a CUDA graph,
        # while do_bench times each call from the host (launch latency included: it dominated on one H200 host)
        graph = sparse_graph_us is not None and dense_graph_us is not None
        t, t_dense = (sparse_graph_us, dense_graph_us) if graph else (sparse_us, dense_us)
        records.append(dict(
            kernel=kernel, density=density, k=k, bytes=nbytes, sparse_us=sparse_us, sparse_graph_us=sparse_graph_us,
            dense_us=dense_us, dense_graph_us=dense_graph_us, roofline_us=roof_us, dense_roofline_us=dense_roof_us,
            ratio_timing="graph" if graph else "do_bench", ratio_roofline=t / roof_us, speedup_vs_dense=t_dense / t,
            max_rel_err=rel_err, weight_copies=n_copies,
        ))  # fmt: skip
        print(f"  {kernel:17s} density {density:4.2f} k={k:6d}  {sparse_us:8.2f} us (graph "
              f"{sparse_graph_us if sparse_graph_us is None else round(sparse_graph_us, 2)})  roofline "
              f"{roof_us:7.2f} us  dense {dense_us:8.2f} us  rel.err {rel_err:.1e}")  # fmt: skip
    del mats
    torch.cuda.empty_cache()
    return records


def _command(result) -> str:
    """The command line that regenerates ``result`` (options other than the defaults spelled out)."""
    cmd = "python -m dejavu.bench.kernel_sweep --out DIR"
    densities = list(result.get("densities", DENSITIES))
    if densities != list(DENSITIES):
        cmd += " --densities " + " ".join(f"{d:g}" for d in densities)
    return cmd


def _markdown(result) -> str:
    lines = [
        f"# Kernel sweep on {result['device']}",
        "",
        f"dtype {result['dtype']}, batch {result['batch']}, copy bandwidth {result['copy_bw_GBps']:.0f} GB/s "
        f"(read+write), torch {result['torch']}, triton {result['triton']}. Times are medians in us: `do_bench` "
        f"(one call at a time from the host, L2 flushed) and `graph` (CUDA-graph replay of rotating weight copies, "
        f"as the decode runtime runs them); `x roof` and `speedup vs dense` use the graph times (`do_bench` where "
        f"a graph time is missing). Command: `{_command(result)}`.",
        "",
    ]
    if result.get("launch_floor_us") is not None:
        lines += [f"Launch floor (a no-op kernel, the PDL wait only, {result.get('launch_floor_programs')} programs, "
                  f"graph replay): {result['launch_floor_us']:.2f} us.", ""]  # fmt: skip
    for shape, recs in result["shapes"].items():
        lines += [f"## {shape}", "", "| kernel | density | k | MB | sparse do_bench us | sparse graph us "
                  "| dense graph us | roofline us | x roof | speedup vs dense |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in recs:
            g = "-" if r["sparse_graph_us"] is None else f"{r['sparse_graph_us']:.2f}"
            dg = "-" if r["dense_graph_us"] is None else f"{r['dense_graph_us']:.2f}"
            lines.append(f"| {r['kernel']} | {r['density']:.2f} | {r['k']} | {r['bytes'] / 1e6:.2f} | "
                         f"{r['sparse_us']:.2f} | {g} | {dg} | {r['roofline_us']:.2f} | "
                         f"{r['ratio_roofline']:.2f} | {r['speedup_vs_dense']:.2f} |")  # fmt: skip
        lines.append("")
        fits = result.get("fits", {}).get(shape)
        if fits:
            lines += ["Least-squares line through the graph times over the densities: graph us = fixed + bytes / rate.",
                      "", "| kernel | fixed us | rate GB/s | points |", "|---|---|---|---|"]  # fmt: skip
            for kernel, f in fits.items():
                if f is not None:
                    rate = "-" if f["rate_GBps"] is None else f"{f['rate_GBps']:.0f}"
                    lines.append(f"| {kernel} | {f['fixed_us']:.2f} | {rate} | {f['points']} |")
            lines.append("")
    return "\n".join(lines)


def _plot(result, out_dir: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for shape, recs in result["shapes"].items():
        kernels = list(dict.fromkeys(r["kernel"] for r in recs))
        fig, axes = plt.subplots(1, len(kernels), figsize=(4 * len(kernels), 3.6), squeeze=False)
        for ax, kernel in zip(axes[0], kernels):
            rs = [r for r in recs if r["kernel"] == kernel]
            dens = [r["density"] for r in rs]
            ax.plot(dens, [r["sparse_us"] for r in rs], "o-", label="sparse (do_bench)")
            if all(r["sparse_graph_us"] is not None for r in rs):
                ax.plot(dens, [r["sparse_graph_us"] for r in rs], "s--", label="sparse (graph)")
            ax.plot(dens, [r["roofline_us"] for r in rs], "k:", label="roofline")
            dense_t = rs[0]["dense_graph_us"] if rs[0]["dense_graph_us"] is not None else rs[0]["dense_us"]
            ax.axhline(dense_t, color="r", label="dense torch (graph)")
            if rs[0].get("dense_roofline_us"):
                ax.axhline(rs[0]["dense_roofline_us"], color="r", ls=":", label="dense roofline")
            ax.set_title(kernel)
            ax.set_xlabel("density")
            ax.set_ylabel("us")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{shape}: {result['device']}, {result['dtype']}, batch {result['batch']}")
        fig.tight_layout()
        path = out_dir / f"kernel_sweep_{shape}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(str(path))
    return paths


def run_kernel_sweep(out_dir, shapes=("opt-13b", "opt-30b"), dtype=torch.float16, batch=1, densities=DENSITIES,
                     kernels=KERNELS, mem_budget_gb: float = 16.0):  # fmt: skip
    """Run the sweep on the current CUDA device; write JSON / Markdown / PNG to ``out_dir``."""
    if not torch.cuda.is_available():
        sys.exit("kernel_sweep: needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure here.")
    K = _kernels()
    import triton

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
    free, _ = torch.cuda.mem_get_info()
    budget = int(min(mem_budget_gb * 2**30, 0.6 * free))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    print(f"device: {torch.cuda.get_device_name()}  ({props.multi_processor_count} SMs, L2 {l2_bytes >> 20} MiB)")
    copy_bw = measure_copy_bandwidth(device)
    print(f"copy bandwidth (read+write): {copy_bw / 1e9:.0f} GB/s")
    floor_programs = 2 * props.multi_processor_count
    floor_us, floor_graph_us = measure_launch_floor(device, floor_programs)
    print(f"launch floor (no-op kernel): {floor_us:.2f} us (graph {floor_graph_us})")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  dtype=dtype_name, batch=batch, copy_bw_GBps=copy_bw / 1e9, l2_bytes=l2_bytes,
                  launch_floor_us=floor_graph_us, launch_floor_do_bench_us=floor_us,
                  launch_floor_programs=floor_programs, densities=list(densities),
                  started=time.strftime("%Y-%m-%d %H:%M:%S"), shapes={}, fits={})  # fmt: skip
    for name in shapes:
        shape = SHAPES[name]
        print(f"{name}: {shape}")
        recs = []
        for kernel in kernels:
            recs += _bench_kernel(K, kernel, shape, densities, dtype, batch, device, copy_bw, l2_bytes, budget)
        result["shapes"][name] = recs
        result["fits"][name] = fit_fixed_cost(recs)
    write_json_atomic(out_dir / "kernel_sweep.json", result, indent=2)
    write_text_atomic(out_dir / "kernel_sweep.md", _markdown(result))
    result["plots"] = _plot(result, out_dir)

    print(f"\nwrote {out_dir / 'kernel_sweep.json'}, {out_dir / 'kernel_sweep.md'} {' '.join(result['plots'])}")
    print(f"\ngraph time / roofline at density 0.1 (target <= {TARGET_RATIO}x), {result['device']}, {dtype_name}, "
          f"batch {batch}")
    print(f"{'shape':8s} {'kernel':17s} {'us':>8s} {'graph us':>9s} {'roof us':>8s} {'ratio':>6s} {'vs dense':>8s} "
          f"{'fixed us':>8s}")  # fmt: skip
    for name, recs in result["shapes"].items():
        for r in recs:
            if abs(r["density"] - 0.1) < 1e-9:
                g = "-" if r["sparse_graph_us"] is None else f"{r['sparse_graph_us']:.2f}"
                flag = "ok" if r["ratio_roofline"] <= TARGET_RATIO else "SLOW"
                fit = result["fits"][name].get(r["kernel"])
                fixed = "-" if fit is None else f"{fit['fixed_us']:.2f}"
                print(f"{name:8s} {r['kernel']:17s} {r['sparse_us']:8.2f} {g:>9s} {r['roofline_us']:8.2f} "
                      f"{r['ratio_roofline']:6.2f} {r['speedup_vs_dense']:7.2f}x {fixed:>8s} {flag}")  # fmt: skip
    g = "-" if floor_graph_us is None else f"{floor_graph_us:.2f}"
    print(f"launch floor (no-op kernel, graph): {g} us")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--shapes", nargs="+", default=["opt-13b", "opt-30b"], choices=sorted(SHAPES))
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    args = p.parse_args(argv)
    run_kernel_sweep(args.out, tuple(args.shapes), DTYPES[args.dtype], args.batch, tuple(args.densities),
                     tuple(args.kernels))  # fmt: skip


if __name__ == "__main__":
    main()
