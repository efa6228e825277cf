"""predictor_bytes and runs_as_product (plain torch: runs without Triton). The predictor kernels:
test_predictor_kernels.py."""

import pytest
import torch

from dejavu.kernels import predictor_bytes, runs_as_product


def test_predictor_bytes():
    assert predictor_bytes(5120, 1024, 20480) == (5120 * 1024 + 1024 * 20480 + 20480) * 2
    assert predictor_bytes(8, 2, 4, torch.float32, bias=False) == (16 + 8) * 4
    assert predictor_bytes(8, 2, 4, "bf16") == (16 + 8 + 4) * 2
    # int8 rows: a byte a weight, an fp32 scale a row of either factor (r + N), the bias at dtype
    assert predictor_bytes(5120, 320, 20480, int8=True) == 5120 * 320 + 320 * 20480 + 4 * (320 + 20480) + 2 * 20480
    assert predictor_bytes(8, 2, 4, torch.float32, bias=False, int8=True) == 16 + 8 + 4 * 6


@pytest.mark.parametrize("int8", [False, True])
def test_head_predictor_as_product(int8):
    """OPT-13B's head predictor (40 heads, rank 320 = d/16): the 40 x 5120 product at fp16 reads fewer bytes than
    the factors, fp16 or int8; its MLP predictor (20480 neurons) does not. products=False counts the factors."""
    d, r, H, N = 5120, 320, 40, 20480
    assert runs_as_product(d, r, H, torch.float16, int8) and not runs_as_product(d, r, N, torch.float16, int8)
    assert predictor_bytes(d, r, H, int8=int8) == (H * d + H) * 2
    factors = d * r + r * H + 4 * (r + H) if int8 else (d * r + r * H) * 2
    assert predictor_bytes(d, r, H, int8=int8, products=False) == factors + 2 * H > predictor_bytes(d, r, H, int8=int8)


@pytest.mark.parametrize("d,r,n,dtype,int8,want", [
    (8, 2, 4, torch.float32, False, False),  # 32 product weights against 16 + 8
    (8, 4, 4, torch.float32, False, True),  # 32 against 32 + 16
    (48, 4, 4, torch.float32, True, False),  # 4-byte product (768) against int8 factors and scales (240)
    (48, 4, 4, torch.float32, False, True),  # the same at fp32: 768 against 832
    (32, 128, 1100, torch.float16, False, True),  # a rank above d: the product is always smaller
])
def test_runs_as_product_rule(d, r, n, dtype, int8, want):
    assert runs_as_product(d, r, n, dtype, int8) is want
