"""The `dejavu` command: argument errors, bad files, and a short real run on the embedded SmolLM2."""

import json

import pytest

from dejavu.cli import main


@pytest.mark.parametrize("argv, message", [
    (["generate", "--mlp-density", "1.5"], "outside (0, 1]"),
    (["generate", "--mlp-density", "0"], "outside (0, 1]"),
    (["calibrate", "--out", "x", "--max-ppl-increase", "150%"], "between 0 and 100%"),
    (["calibrate", "--out", "x", "--dense-layers", "a,b"], "layer indices"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_file(tmp_path):
    with pytest.raises(SystemExit, match="file not found"):
        main(["calibrate", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")])


@pytest.mark.real
def test_real_calibrate_eval_generate(tmp_path, capsys):
    """A short end-to-end run on the embedded SmolLM2-135M (CPU): calibrate, eval, generate, all through the CLI."""
    pytest.importorskip("gguf")
    data = tmp_path / "docs.jsonl"
    bad = tmp_path / "bad.jsonl"
    from dejavu.eval.data import c4_sample_path, load_jsonl_texts

    texts = load_jsonl_texts(c4_sample_path())[:12]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    bad.write_text(json.dumps({"text": "fine"}) + "\n{oops\n")
    assert main(["calibrate", "--data", str(bad), "--docs", "1", "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "line 2" in capsys.readouterr().out

    out = tmp_path / "preds"
    rc = main(["calibrate", "--data", str(data), "--docs", "6", "--eval-docs", "2", "--holdout-docs", "2",
               "--max-len", "64", "--tokens-per-doc", "16", "--epochs", "2", "--holdout-windows", "1",
               "--holdout-len", "64", "--mlp-levels", "0.5", "--head-levels", "0.67", "--out", str(out),
               "--no-progress", "--json"])
    assert rc == 0
    cal = json.loads(capsys.readouterr().out)
    assert len(cal["operating_point"]["mlp_density"]) == 30
    assert (out / "predictors.safetensors").is_file() and (out / "activations" / "manifest.json").is_file()

    rc = main(["eval", "--predictors", str(out), "--window", "64", "--wikitext-windows", "1", "--c4-docs", "1",
               "--tasks", "copa", "--limit", "2", "--no-baselines", "--out", str(tmp_path / "q"), "--no-progress",
               "--int8-predictors", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["wikitext2"]["dense_ppl"] > 1 and r["wikitext2"]["sparse_ppl"] > 1
    # the int8 column: the same operating point, its predictors rounded to int8 rows (close, not identical)
    assert r["wikitext2"]["sparse_int8_ppl"] > 1 and r["c4"]["sparse_int8_ppl"] > 1
    assert abs(r["wikitext2"]["sparse_int8_ppl"] / r["wikitext2"]["sparse_ppl"] - 1) < 0.05
    assert len(r["predictor_recall_vs_oracle_topk_int8"]["mlp"]) == 30 and r["predictor_weights"] == "float32"
    # the int8 rows' byte summary: fewer predictor bytes than the float set's, the same block bytes
    assert 0 < r["bytes_int8"]["predictor_params"] < r["bytes"]["predictor_params"]
    assert r["bytes_int8"]["block_bytes_skipped"] == r["bytes"]["block_bytes_skipped"]
    assert set(r["tasks"]["copa"]) >= {"dense", "sparse", "n"}
    assert (tmp_path / "q.md").is_file() and (tmp_path / "q.json").is_file()
    assert "sparse_int8 =" in (tmp_path / "q.md").read_text()
    assert "as int8 rows)" in (tmp_path / "q.md").read_text()

    rc = main(["generate", "--predictors", str(out), "--mlp-density", "0.5", "--max-new-tokens", "4", "--json",
               "--int8-predictors"])
    assert rc == 0
    g = json.loads(capsys.readouterr().out)
    assert g["new_tokens"] >= 1 and abs(g["mlp_density"] - 0.5) < 0.01
