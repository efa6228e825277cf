"""CPU tests of the kernel sweep's plumbing (the timing itself needs a GPU): byte counts per kernel, the report
tables built from graph times, and a clear exit without CUDA."""

import pytest
import torch

from dejavu.bench import kernel_sweep as KS

SHAPE = KS.SHAPES["opt-13b"]


@pytest.mark.parametrize("kernel", KS.KERNELS)
def test_bytes_count_the_selected_weights_once(kernel):
    """Weights dominate: k selected rows (two matrices for SwiGLU and the MLP block; head_dim rows per head), and
    the count grows linearly in k."""
    k, B, elem = 8, 1, 2
    rows = SHAPE.head_dim if kernel.startswith("head") else 1
    mats = 2 if kernel in ("gather_swiglu", "sparse_mlp") else 1
    weights = mats * k * rows * SHAPE.d * elem
    n = KS._bytes(kernel, SHAPE, k, B, elem)
    assert weights <= n < weights + 4 * B * SHAPE.d * elem + 64 * k
    assert KS._bytes(kernel, SHAPE, 2 * k, B, elem) - n >= weights  # the weights of k more rows at least


def test_n_selected_clamps_to_one_and_all():
    assert KS._n_selected("gather_up", SHAPE, 0.0) == 1
    assert KS._n_selected("gather_up", SHAPE, 1.0) == SHAPE.ffn
    assert KS._n_selected("head_gather_down", SHAPE, 0.5) == SHAPE.heads // 2


def _record(kernel, density, graph):
    return dict(kernel=kernel, density=density, k=10, bytes=2e6, sparse_us=40.0, sparse_graph_us=graph,
                dense_us=60.0, dense_graph_us=None if graph is None else 30.0, roofline_us=5.0,
                ratio_roofline=(graph or 40.0) / 5.0, speedup_vs_dense=1.0, max_rel_err=1e-4)


def test_markdown_shows_both_timings_and_the_command():
    result = dict(device="Fake GPU", dtype="fp16", batch=1, copy_bw_GBps=3000.0, torch="t", triton="t",
                  shapes={"opt-13b": [_record("sparse_mlp", 0.1, 8.0), _record("gather_up", 0.1, None)]})
    md = KS._markdown(result)
    assert "python -m dejavu.bench.kernel_sweep" in md and "graph times" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| sparse_mlp") or ln.startswith("| gather_up")]
    assert lines[0].split("|")[6].strip() == "8.00" and lines[0].split("|")[9].strip() == "1.60"
    assert lines[1].split("|")[6].strip() == "-" and lines[1].split("|")[7].strip() == "-"  # no graph time
    assert "--densities" not in md  # the default sweep
    assert "kernel_sweep --out DIR --densities 0.1 1`" in KS._markdown(dict(result, densities=[0.1, 1.0]))


def test_fit_recovers_the_fixed_cost_and_the_rate():
    """A line through exact points (3 us + bytes at 2,000 GB/s) is recovered; records without a graph time are left
    out; a kernel timed at one byte count (or none) gets no fit; a flat line has no rate."""
    recs = [dict(kernel="gather_up", bytes=b, sparse_graph_us=3.0 + b / 2e12 * 1e6) for b in (1e6, 5e6, 2e7)]
    recs.append(dict(kernel="gather_up", bytes=4e7, sparse_graph_us=None))
    recs += [dict(kernel="sparse_mlp", bytes=1e6, sparse_graph_us=9.0), dict(kernel="sparse_mlp", bytes=1e6,
                                                                             sparse_graph_us=None)]  # fmt: skip
    recs += [dict(kernel="gather_down", bytes=b, sparse_graph_us=4.0) for b in (1e6, 2e6)]
    fits = KS.fit_fixed_cost(recs)
    assert fits["gather_up"]["fixed_us"] == pytest.approx(3.0) and fits["gather_up"]["points"] == 3
    assert fits["gather_up"]["rate_GBps"] == pytest.approx(2000.0)
    assert fits["sparse_mlp"] is None
    assert fits["gather_down"]["fixed_us"] == pytest.approx(4.0) and fits["gather_down"]["rate_GBps"] is None


def test_markdown_shows_the_launch_floor_and_the_fits():
    result = dict(device="Fake GPU", dtype="fp16", batch=1, copy_bw_GBps=3000.0, torch="t", triton="t",
                  launch_floor_us=1.87, launch_floor_programs=264, shapes={"opt-13b": [_record("gather_up", 0.1, 8.0)]},
                  fits={"opt-13b": {"gather_up": dict(fixed_us=2.5, rate_GBps=3500.0, points=6), "sparse_mlp": None}})
    md = KS._markdown(result)
    assert "Launch floor" in md and "1.87 us" in md and "264 programs" in md
    row = [ln for ln in md.splitlines() if ln.startswith("| gather_up | 2.50")]
    assert row and row[0].split("|")[3].strip() == "3500"
    assert "| sparse_mlp |" not in md  # no fit, no row
    assert "Launch floor" not in KS._markdown(dict(result, launch_floor_us=None))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_needs_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        KS.run_kernel_sweep(tmp_path)
