
import pytest
import torch

from dejavu.calibrate import CalibrationError, CalibrationSet, CalibrationSource, record
from tests.conftest import CharTokenizer, random_docs


def _src(n=12):
    return CalibrationSource("file", random_docs(n, seed=3), path="synthetic", doc_range=(0, n))


def test_interrupted_calibration_resumes_without_loss(tiny_llama, tmp_path):
    model = tiny_llama
    tok = CharTokenizer(model.spec.vocab_size)
    full = tmp_path / "full"
    record(model, tok, _src(), full, max_len=48, tokens_per_doc=16, shard_tokens=40, progress=False)
    part = tmp_path / "part"
    m1 = record(model, tok, _src(), part, max_len=48, tokens_per_doc=16, shard_tokens=40, progress=False,
                stop_after_shards=2)
    assert not m1["complete"] and len(m1["shards"]) == 2
    with pytest.raises(CalibrationError, match="incomplete.*resume"):
        CalibrationSet(part)
    (part / "shard_00002.safetensors.tmp").write_bytes(b"half-written junk")  # a crash mid-write
    m2 = record(model, tok, _src(), part, max_len=48, tokens_per_doc=16, shard_tokens=40, progress=False)
    assert m2["complete"] and not list(part.glob("*.tmp"))
    a, b = CalibrationSet(full), CalibrationSet(part)
    assert a.n_tokens == b.n_tokens
    for key in ("x_in", "mlp_in", "act", "heads"):
        torch.testing.assert_close(a.get(key, 1), b.get(key, 1))


def test_resume_refuses_other_settings(tiny_llama, tmp_path):
    tok = CharTokenizer(tiny_llama.spec.vocab_size)
    record(tiny_llama, tok, _src(4), tmp_path, max_len=32, tokens_per_doc=8, progress=False)
    with pytest.raises(CalibrationError, match="another model, source or settings"):
        record(tiny_llama, tok, _src(4), tmp_path, max_len=32, tokens_per_doc=9, progress=False)


def test_recorded_shapes(tiny_calibration):
    model, cal = tiny_calibration
    s = model.spec
    n = cal.n_tokens
    assert cal.get("x_in", 0).shape == (n, s.d_model)
    assert cal.get("act", 2).shape == (n, s.ffn_dim)
    assert cal.get("heads", 1).shape == (n, s.n_heads)
    assert cal.manifest["source"]["kind"] == "file"


def test_empty_source_is_an_error(tiny_llama, tmp_path):
    with pytest.raises(CalibrationError, match="no documents"):
        record(tiny_llama, CharTokenizer(10), CalibrationSource("file", []), tmp_path, progress=False)
