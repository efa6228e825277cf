"""predictor_bytes (plain torch: runs without Triton). The predictor kernels: test_predictor_kernels.py."""

import torch

from dejavu.kernels import predictor_bytes


def test_predictor_bytes():
    assert predictor_bytes(5120, 1024, 20480) == (5120 * 1024 + 1024 * 20480 + 20480) * 2
    assert predictor_bytes(8, 2, 4, torch.float32, bias=False) == (16 + 8) * 4
    assert predictor_bytes(8, 2, 4, "bf16") == (16 + 8 + 4) * 2
