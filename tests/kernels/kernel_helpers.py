"""Helpers shared by the kernel tests (inputs, poisoned outputs, the comparison rule)."""

import zlib

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_gen(*key) -> torch.Generator:
    """Deterministic generator per test case (fresh inputs per parameter combination)."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr(key).encode()))
    return g


def randn(*shape, dtype=torch.float32, gen=None, scale=1.0):
    """Random normal inputs on DEVICE (never zeros), generated on CPU for reproducibility."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype=dtype, device=DEVICE)


def rand_index(n, k, *, gen, dtype=torch.int64):
    """k distinct indices out of n, in random (unsorted) order."""
    return torch.randperm(n, generator=gen)[:k].to(dtype=dtype, device=DEVICE)


def poisoned(shape, dtype):
    """Output buffer full of NaN: any element the kernel forgets to write fails the test."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_matches(out, ref_exact, ref_lowp=None, *, fp32_rtol=2e-5):
    """Compare a kernel output against references.

    * fp32 outputs: against the float64 reference, tight tolerance (relative to the output
      scale, since the kernels accumulate in fp32 in a different order than torch).
    * fp16 / bf16 outputs (flash-attention idiom): the kernel's max error against the exact
      reference must be at most 2x the error of torch's reference computed in the same low
      precision, plus a tiny epsilon.
    """
    assert torch.isfinite(out).all(), "kernel output has NaN/Inf (unwritten or wrong elements)"
    assert out.shape == ref_exact.shape, (out.shape, ref_exact.shape)
    exact = ref_exact.double().cpu()
    got = out.double().cpu()
    scale = max(1.0, exact.abs().max().item())
    err = (got - exact).abs().max().item()
    if out.dtype == torch.float32:
        assert err <= fp32_rtol * scale, f"fp32 max error {err:.3e} (scale {scale:.3g})"
        return
    assert ref_lowp is not None and ref_lowp.dtype == out.dtype
    err_torch = (ref_lowp.double().cpu() - exact).abs().max().item()
    assert err <= 2 * err_torch + 1e-5 * scale, (
        f"{out.dtype} kernel error {err:.3e} > 2 x torch error {err_torch:.3e} (+eps, scale {scale:.3g})"
    )


def check_against(op_out, ref_fn, args, kwargs=None, *, dtype):
    """Run ``ref_fn`` in float64 and in ``dtype`` on the same inputs and compare ``op_out``."""
    kwargs = kwargs or {}
    up = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    upk = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}
    exact = ref_fn(*up, **upk)
    lowp = ref_fn(*args, **kwargs) if dtype in LOW_PRECISION else None
    assert_matches(op_out, exact, lowp)
