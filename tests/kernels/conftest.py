"""Shared setup for the kernel tests.

Without a GPU the Triton kernels run under Triton's numpy interpreter. Triton reads
TRITON_INTERPRET when a kernel is *decorated* (when dejavu.kernels is first imported), so it
is set here, before any test module imports triton or dejavu.kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_bf16_round_to_nearest():
    """Make the interpreter's fp32 -> bf16 cast round to nearest even, as GPUs do.

    Triton's numpy interpreter (3.x) converts fp32 to bf16 by dropping the low 16 bits
    (round toward zero), so every bf16 output would carry up to 1 ulp of extra error that
    the GPU does not have, and the "2x torch's error" rule would fail for a reason that has
    nothing to do with the kernels. Patched here, in the test harness, so the kernels
    themselves carry no interpreter-only code. No-op if the interpreter's internals differ.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    if original is None or getattr(original, "_dejavu_rtne", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            return interpreter.TensorHandle(rounded.astype(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._dejavu_rtne = True
    builder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_bf16_round_to_nearest()


def _why_kernels_cannot_run():
    """None if the Triton launchers can run here, else the reason (used to skip, not fail)."""
    if torch.cuda.is_available():
        return None
    try:
        import triton.language as tl

        from dejavu.kernels import HAS_TRITON, _checks, gather_mlp
    except ImportError:
        return None  # the modules themselves importorskip triton
    if not HAS_TRITON:
        return None
    # Triton decides interpreted-or-compiled when a function is decorated, its own standard
    # library (tl.zeros, tl.sum, ...) included, i.e. when triton is first imported. If
    # something imported it before this file could set TRITON_INTERPRET=1 (e.g. a root
    # conftest importing transformers -> torch._dynamo -> triton), the kernels cannot run on CPU.
    if not (_checks.is_interpreted(gather_mlp._gather_rows_kernel) and _checks.is_interpreted(tl.zeros)):
        return ("triton was imported before TRITON_INTERPRET=1 could be set (no GPU here); run "
                "`TRITON_INTERPRET=1 python -m pytest tests/kernels`, or set the variable at the top of "
                "tests/conftest.py before anything imports transformers/torch._dynamo")
    return None


def pytest_collection_modifyitems(config, items):
    reason = _why_kernels_cannot_run()
    if reason:
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if "needs_kernels" in item.keywords:
                item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_kernels: runs a Triton launcher (GPU or interpreter)")


@pytest.fixture
def fma_batch_2(monkeypatch):
    """B = 2 on the kernels' CUDA-core FMA paths (the A/B knob ``kernels._checks.FMA_MAX_BATCH``; by default only B = 1
    runs there), for tests of what only those paths do (X_SUM, unfinished sums, their tiles) at B = 2."""
    from dejavu.kernels import _checks

    monkeypatch.setattr(_checks, "FMA_MAX_BATCH", 2)
