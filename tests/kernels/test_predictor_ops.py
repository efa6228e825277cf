"""predictor_bytes (plain torch: runs without Triton). The predictor kernels: test_predictor_kernels.py."""

import torch

from dejavu.kernels import predictor_bytes


def test_predictor_bytes():
    assert predictor_bytes(5120, 1024, 20480) == (5120 * 1024 + 1024 * 20480 + 20480) * 2
    assert predictor_bytes(8, 2, 4, torch.float32, bias=False) == (16 + 8) * 4
    assert predictor_bytes(8, 2, 4, "bf16") == (16 + 8 + 4) * 2
    # int8 rows: a byte a weight, an fp32 scale a row of either factor (r + N), the bias at dtype
    assert predictor_bytes(5120, 320, 20480, int8=True) == 5120 * 320 + 320 * 20480 + 4 * (320 + 20480) + 2 * 20480
    assert predictor_bytes(8, 2, 4, torch.float32, bias=False, int8=True) == 16 + 8 + 4 * 6
