"""int8 predictor rows: quantize_rows and PredictorSet.quantize_int8 (plain torch)."""

import pytest
import torch

from dejavu.models.spec import ModelSpec
from dejavu.predictors.model import PredictorSet, quantize_rows


def test_quantize_rows_error_and_form():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 33, generator=g) * torch.logspace(-3, 1, 50)[:, None]  # rows of very different scales
    w[7] = 0.0
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == w.shape and s.shape == (50,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.equal(q[7], torch.zeros(33, dtype=torch.int8)) and s[7] == 1.0  # a zero row stays exact
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-5)).all())  # round to nearest: half a step at most
    q2, s2 = quantize_rows(q.float() * s[:, None])  # already of that form: the same rows again
    assert torch.equal(q2, q) and torch.allclose(s2, s, rtol=1e-6, atol=0)


def _tiny_spec():
    return ModelSpec(arch="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                     ffn_dim=48, mlp_kind="swiglu", norm_kind="rmsnorm", norm_eps=1e-5, pos_kind="rope",
                     max_positions=128, name="t")


def test_quantize_int8_set(tmp_path):
    torch.manual_seed(0)
    p = PredictorSet.for_model(_tiny_spec(), mlp_rank=8, head_rank=4)
    fp = {k: v.clone() for k, v in p.state_dict().items()}
    assert not p.int8
    # the head predictor (4 heads, rank 4) reads fewer bytes as its 4 x 32 product (runs_as_product) than as factors
    assert p.bytes_per_token(torch.float16) == 2 * 2 * (32 * 8 + 8 * 48 + 48 + 4 * 32 + 4)
    assert p.quantize_int8() is p and p.int8
    # int8 factors (1 byte a weight, 4 a row's scale), biases still 2 bytes; the head product stays at fp16 (256
    # bytes) against 128 + 16 + 32 of int8 factors and scales, so that predictor keeps its factors
    assert p.bytes_per_token(torch.float16) == 2 * (32 * 8 + 8 * 48 + 4 * (8 + 48) + 2 * 48
                                                    + 32 * 4 + 4 * 4 + 4 * (4 + 4) + 2 * 4)  # fmt: skip
    after = p.state_dict()
    for k, v in after.items():
        if k.endswith("bias"):
            assert torch.equal(v, fp[k])  # biases are not rounded
        else:
            q, s = quantize_rows(fp[k])
            assert torch.equal(v, q.float() * s[:, None])
            assert 0 < (v - fp[k]).abs().max() <= s.max() / 2 * (1 + 1e-5)
    p.quantize_int8()  # idempotent
    for k, v in p.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=1e-6, atol=0)
    p.save(tmp_path)
    back = PredictorSet.load(tmp_path)
    assert back.int8 and all(torch.equal(v, p.state_dict()[k]) for k, v in back.state_dict().items())


@pytest.mark.parametrize("mlp,heads", [(True, False), (False, True)])
def test_bytes_per_token_parts(mlp, heads):
    p = PredictorSet.for_model(_tiny_spec(), mlp_rank=8, head_rank=4).quantize_int8()
    both = p.bytes_per_token(torch.bfloat16)
    part = p.bytes_per_token(torch.bfloat16, mlp=mlp, heads=heads)
    other = p.bytes_per_token(torch.bfloat16, mlp=not mlp, heads=not heads)
    assert 0 < part < both and part + other == both
