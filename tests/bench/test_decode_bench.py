"""CPU smoke tests of the decode-benchmark plumbing: rows / JSON / Markdown / PNG on fake timings, merging, the
no-CUDA exit, byte counts, and one end-to-end pass of the driver on tiny CPU models (torch backend, fake GPU name)."""

import argparse
import json

import pytest
import torch

from dejavu.bench import decode, report
from dejavu.bench.hf_baseline import hf_config, run_compile, time_generate
from dejavu.runtime import fast_decode as FD

CUDA = torch.cuda.is_available()


def _rows():
    kw = dict(copy_bw_gbps=2000.0, gpu="Fake GPU 80GB", dense_bytes_per_token=int(20e9))
    return [
        report.make_row("opt-13b", 1, "hf-eager", step_ms=[30, 31, 29, 35], bytes_per_token=int(20e9), **kw),
        report.make_row("opt-13b", 1, "ours-dense", step_ms=[10.0, 10.2, 9.9], bytes_per_token=int(20e9), **kw),
        report.make_row("opt-13b", 1, "ours-sparse", step_ms=[2.5, 2.6, 2.4], mlp_density=0.1, head_density=0.5,
                        kv_policy="selected", bytes_per_token=int(4e9), **kw),
        report.make_row("opt-13b", 1, "ours-sparse", step_ms=[6.0], mlp_density=0.5, head_density=1.0,
                        kv_policy="selected", bytes_per_token=int(11e9), **kw),
        report.make_row("opt-13b", 4, "hf-compile", error="RuntimeError: compile failed\nmore", **kw),
    ]


def test_rows_and_ratios():
    rows = report.finalize(_rows())
    dense, sparse = rows[1], rows[2]
    assert dense["ms_per_token"] == pytest.approx(10.0) and dense["tokens_per_s"] == pytest.approx(100.0)
    assert dense["roofline_ms"] == pytest.approx(10.0)  # 20 GB at 2000 GB/s
    assert dense["effective_gbps"] == pytest.approx(2000.0)
    assert sparse["speedup_vs_dense"] == pytest.approx(4.0)
    assert sparse["speedup_vs_hf_eager"] == pytest.approx(30.5 / 2.5)
    assert sparse["ideal_speedup"] == pytest.approx(5.0) and sparse["fraction_of_ideal"] == pytest.approx(0.8)
    assert rows[0]["ms_p10"] <= rows[0]["ms_per_token"] <= rows[0]["ms_p90"]
    assert rows[4]["ms_per_token"] is None and rows[4]["speedup_vs_dense"] is None  # failed row stays a row


def test_outputs_and_merge(tmp_path):
    res = {"gpu": "Fake GPU 80GB", "copy_bw_gbps": 2000.0, "rows": _rows(), "command": "x", "notes": ["random"]}
    paths = report.write_outputs(res, tmp_path / "a")
    assert paths["json"].endswith("fake-gpu-80gb.json")
    back = json.loads(open(paths["json"]).read())
    assert len(back["rows"]) == 5 and back["rows"][2]["speedup_vs_dense"] == pytest.approx(4.0)
    md = open(paths["md"]).read()
    assert "| opt-13b | 1 | ours-sparse | 0.1 | 0.5 |" in md and "compile failed" in md
    pytest.importorskip("matplotlib")
    assert paths["png"].endswith(".png")
    # a second file (another GPU call) with a re-measured row and a new model: merged, later rows win
    res2 = dict(res, rows=[report.make_row("opt-13b", 1, "ours-dense", step_ms=[8.0], gpu="Fake GPU 80GB",
                                           bytes_per_token=int(20e9), dense_bytes_per_token=int(20e9)),
                           report.make_row("opt-30b", 1, "ours-dense", step_ms=[20.0], gpu="Fake GPU 80GB")])
    p2 = report.write_outputs(res2, tmp_path / "b", png=False)
    merged = report.merge_files([paths["json"], p2["json"]], tmp_path / "m")
    rows = json.loads(open(merged["json"]).read())["rows"]
    assert len(rows) == 6
    assert rows[2]["speedup_vs_dense"] == pytest.approx(8.0 / 2.5)  # recomputed against the newer dense row
    table = report.short_table(rows)
    assert "ours-sparse" in table and "ERROR RuntimeError: compile failed" in table


@pytest.mark.skipif(CUDA, reason="checks the no-CUDA message")
def test_main_without_cuda_exits_clearly(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), models="opt-13b", batches="1", quick=True, json=False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        decode.main(args, print)


def test_cli_merge_needs_no_gpu(tmp_path, capsys):
    res = {"gpu": "Fake", "copy_bw_gbps": 1.0, "rows": _rows(), "command": "x", "notes": []}
    p = report.write_outputs(res, tmp_path / "in", png=False)
    assert decode.cli(["--merge", p["json"], "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "fake.json").is_file()


def _tiny(arch):
    return (arch, 32, 2, 4, 4 if arch == "opt" else 2, 64, 97)


def test_dense_bytes_match_runtime():
    from dejavu.runtime.fast_decode import FastDecoder

    for arch in ("opt", "llama"):
        decode.SHAPES[f"tiny-{arch}"] = _tiny(arch)
        try:
            spec = decode.bench_spec(f"tiny-{arch}")
            model = decode.build_random_model(spec, "cpu", torch.float32)
            assert model.dtype == torch.float32 and (model.lm_head.weight is model.embed.weight) == (arch == "opt")
            dec = FastDecoder(model, None, batch=1, max_len=8, backend="torch")
            assert decode._dense_bytes(spec) // 2 * 4 == dec.dense_bytes_per_token()
            cfg = hf_config(spec)
            from dejavu.models.adapters import adapter_for

            again = adapter_for(cfg).spec(cfg, name=spec.name)
            assert again.identity() == spec.identity() and again.tie_embeddings == spec.tie_embeddings
        finally:
            decode.SHAPES.pop(f"tiny-{arch}")


def test_hf_timing_on_cpu():
    decode.SHAPES["tiny-opt"] = _tiny("opt")
    try:
        from dejavu.bench.hf_baseline import build_hf

        hf = build_hf(decode.bench_spec("tiny-opt"), "cpu", torch.float32)
        r = time_generate(hf, torch.randint(3, 97, (2, 5)), n_new=6, repeats=2)
    finally:
        decode.SHAPES.pop("tiny-opt")
    assert r["new_tokens"] == 6 and len(r["step_ms"]) == 2 * 5 and len(r["prefill_ms"]) == 2


def test_compile_subprocess_timeout_is_reported():
    res = run_compile({"spec": {}, "batches": [1, 4]}, timeout=0.2, log=lambda *a: None)
    assert set(res) == {1, 4} and all("timed out" in r["error"] or "exited" in r["error"] for r in res.values())


def test_driver_end_to_end_on_cpu(tmp_path, monkeypatch):
    """The whole driver on two tiny CPU models (torch backend): rows for every mode, checks, outputs."""
    monkeypatch.setattr(decode, "DEVICE", "cpu")
    monkeypatch.setattr(decode, "DTYPE", torch.float32)
    monkeypatch.setattr(decode, "BACKEND", "torch")
    monkeypatch.setattr(decode, "_has_cuda", lambda: True)
    monkeypatch.setattr(decode, "_gpu_name", lambda: "CPU Smoke")
    monkeypatch.setattr(decode, "measure_copy_bw", lambda: 100.0)
    monkeypatch.setattr(decode, "run_compile", lambda job, timeout, log: {
        b: {"batch": b, "step_ms": [1.0, 1.1], "compile_s": 3.0, "compiled": True} for b in job["batches"]})
    monkeypatch.setitem(decode.SHAPES, "tiny-opt", _tiny("opt"))
    monkeypatch.setitem(decode.SHAPES, "tiny-llama", _tiny("llama"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: thread hand-offs on a shared CPU cost more than the math
    args = argparse.Namespace(out=str(tmp_path), models="tiny-llama,tiny-opt,nope", batches="1,2", quick=False,
                              json=False, n_new=4, prompt_len=6, repeats=1, modes=None, kv_policy="selected",
                              budget_s=300, hf_compile_timeout=10, hf_compile_batches="1", no_check=False,
                              kernels=False, merge=None)  # fmt: skip
    logs, warm = [], []
    real_warm_up = decode.warm_up_ours
    monkeypatch.setattr(decode, "warm_up_ours", lambda bench, model, preds, md, hd, batch: (
        warm.append((preds is None, md, hd, batch)), real_warm_up(bench, model, preds, md, hd, batch)))
    try:
        result = decode.main(args, logs.append)
    finally:
        torch.set_num_threads(threads)
    rows = result["rows"]
    errors = [r for r in rows if r.get("error")]
    assert [r["model"] for r in errors] == ["nope"], errors
    assert warm == [(True, 1.0, 1.0, 1)]  # one throwaway decoder a process, of the first timed unit; no row of its own
    # ours (dense, sparse and sparse-int8 at each point) x batches, hf-eager x batches, hf-compile B=1
    per_model = 2 * (1 + 2 * len(decode.SPARSE_POINTS)) + 2 + 1
    assert len(rows) == 2 * per_model + 1
    for r in rows:  # int8 predictor rows: the same point, the predictors' factors at 1 byte a weight
        if r["mode"] == "ours-sparse-int8" and not r.get("error"):
            fp = next(x for x in rows if x["mode"] == "ours-sparse" and all(
                x[k] == r[k] for k in ("model", "batch", "mlp_density", "head_density")))
            assert r["predictors"] == "random, int8 rows" and fp["predictors"] == "random"
            # fewer bytes where a running predictor keeps its factors: the head predictors (rank 2), and the MLP ones
            # (rank 128 over d = 32) above fast_decode.PRODUCTS_MAX_BATCH; up to it those read their product, at the
            # model's dtype (runs_as_product)
            assert r["bytes_per_token"] <= fp["bytes_per_token"]
            factored = r["head_density"] < 1 or (r["mlp_density"] < 1 and r["batch"] > FD.PRODUCTS_MAX_BATCH)
            assert (r["bytes_per_token"] < fp["bytes_per_token"]) == factored
    sparse = [r for r in rows if r["mode"] == "ours-sparse" and r["batch"] == 1 and r["mlp_density"] == 0.1
              and r["head_density"] == 0.5]
    assert len(sparse) == 2 and all("graph==eager" in r["check"] and "top1 4/4" in r["check"] for r in sparse)
    assert all(r["check"] is None for r in rows if r["mode"] == "ours-sparse" and r["mlp_density"] == 0.5)
    assert all(r["speedup_vs_dense"] and r["ideal_speedup"] for r in sparse)  # (tiny: predictors outweigh savings)
    assert (tmp_path / "cpu-smoke.json").is_file() and (tmp_path / "cpu-smoke.md").is_file()
    assert "ours-sparse" in logs[-2]  # the short table comes last


def test_rerun_into_same_dir_keeps_rows_and_commands(tmp_path, monkeypatch):
    """A second invocation into the same --out merges its rows into the file and names both commands."""
    monkeypatch.setattr(decode, "_gpu_name", lambda: "CPU Smoke")
    prev = {"rows": _rows(), "command": "first run ; second run"}
    (tmp_path / "cpu-smoke.json").write_text(json.dumps(prev))
    bench = decode.Bench(argparse.Namespace(out=str(tmp_path), quick=True), print)
    assert bench.result["rows"] == prev["rows"]
    assert bench.result["command"].split(" ; ")[:2] == ["first run", "second run"]
    assert bench.result["command"].count(" ; ") == 2


def test_rerun_keeps_each_invocations_settings(tmp_path, monkeypatch):
    """Invocations with other settings into the same --out: the notes keep a settings line for each, naming its
    models and batches, and each row carries its own prompt_len, n_new and repeats."""
    monkeypatch.setattr(decode, "_gpu_name", lambda: "CPU Smoke")
    first = decode.Bench(argparse.Namespace(out=str(tmp_path), models="opt-13b", batches="1"), print)
    first.add(report.make_row("opt-13b", 1, "ours-dense", step_ms=[7.0]))
    report.write_outputs(first.result, tmp_path, png=False)
    second = decode.Bench(argparse.Namespace(out=str(tmp_path), models="opt-13b", batches="2,4", n_new=32, repeats=1),
                          print)  # fmt: skip
    second.add(report.make_row("opt-13b", 4, "ours-dense", step_ms=[7.5]))
    settings = [n for n in second.result["notes"] if "new tokens" in n]
    assert len(settings) == 2 and settings[0].startswith("opt-13b at batch 1: prompt 128 tokens, 128 new tokens")
    assert settings[1].startswith("opt-13b at batch 2, 4: prompt 128 tokens, 32 new tokens")
    assert "1 timed runs" in settings[1]
    rows = {r["batch"]: r for r in second.result["rows"]}
    assert (rows[1]["n_new"], rows[1]["repeats"], rows[4]["n_new"], rows[4]["repeats"]) == (128, 3, 32, 1)
    md = report.markdown(second.result)
    assert settings[0] in md and settings[1] in md
