"""Shared plumbing for the sparse kernels: optional Triton import, input checks, small heuristics.

Every launcher in this package does three things: check its inputs with the helpers below,
allocate its output, launch. The checks exist so that a wrong call fails loudly with a
``ValueError`` that names the problem *and* the fix, instead of returning a silently wrong
answer (a Triton kernel happily reads out of bounds or mixes dtypes).

Two kinds of checks:

* metadata checks (dtype, device, rank, shape, contiguity, batch size, index dtype): free,
  always on;
* data checks on index tensors (range and duplicates): these read device memory, i.e. they
  synchronise the host with the GPU. They run only when ``validate=True`` *and* no CUDA graph
  is being captured on the current stream (a sync inside capture is an error). Runtimes that
  build their indices by construction (``select_topk``) pass ``validate=False``.

Triton is optional: without it the package still imports, the ``*_ref`` functions work, and
the launchers raise a ``RuntimeError`` saying how to get Triton.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

try:  # Triton is optional: the refs and the package import must work without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by a subprocess test
    triton = None
    HAS_TRITON = False

    class _MissingTritonLanguage:
        """Stands in for ``triton.language`` so kernel signatures (``tl.constexpr``) still parse."""

        constexpr = None

    tl = _MissingTritonLanguage()


MAX_BATCH = 16
"""Largest decode batch the kernels are designed (and tested) for: memory-bound GEMV regime."""

FMA_MAX_BATCH = 1
"""Largest batch the gathers and the MLP block serve on their CUDA-core FMA paths; above it they take the tensor-core
paths (the batch padded to 16). The decode runtime's features built on the FMA paths (folded norms, the one-launch MLP
block, deferred finishes, the fused q/k/v finish) follow it. Read at launch time by the kernels' configurations and
when a ``FastDecoder`` is built (A/B knob: ``bench/profile_step.py``'s ``fma_max_2``; bench/NOTES.md v15)."""

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
DEFAULT_NUM_SMS = 132  # H100 SXM; used when no CUDA device can be queried (interpreter).


def jit(fn):
    """``triton.jit`` when Triton is installed, otherwise the plain function (never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (numpy interpreter).

    Triton decides this once, when the ``@triton.jit`` decorator runs (module import), so we ask
    the kernel object rather than the environment.
    """
    return type(kernel).__name__ == "InterpretedFunction"


def capturing() -> bool:
    """True while a CUDA graph is being captured on the current stream (no syncs allowed)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def should_validate(validate: bool) -> bool:
    """Run the data-dependent (syncing) checks only when asked and when it is legal."""
    return bool(validate) and not capturing()


@functools.lru_cache(maxsize=None)
def _num_sms_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Number of SMs of ``device`` (cached); a sensible H100 default off-GPU."""
    if device.type == "cuda":
        return _num_sms_cached(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_NUM_SMS


PDL_ENV = "DEJAVU_PDL"
"""Set to ``0`` to launch every kernel without programmatic dependent launch (A/B timing, debugging)."""


@functools.cache
def _cc_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


_PDL_SUSPENDED = [0]
PDL_EXCLUDE: set[str] = set()
"""Names of kernels that launch without PDL (read at launch time; A/B knob of bench/profile_step.py)."""
PDL_LATE: set[str] = set()
"""Names of kernels launched in PDL mode 2 (see :func:`use_pdl`; read at launch time; A/B knob of
bench/profile_step.py)."""
PDL_MID: set[str] = set()
"""Names of kernels launched in PDL mode 3 (see :func:`use_pdl`; A/B knob of bench/profile_step.py)."""


@contextlib.contextmanager
def pdl_suspended():
    """Launches made inside this block use no programmatic dependent launch (read at launch, so also while a CUDA
    graph is captured)."""
    _PDL_SUSPENDED[0] += 1
    try:
        yield
    finally:
        _PDL_SUSPENDED[0] -= 1


def use_pdl(kernel, device: torch.device) -> int:
    """How ``kernel`` launches on ``device``, as the PDL mode its ``PDL`` constexpr takes (the launch option is
    ``launch_pdl=pdl > 0``):

    * 0: without programmatic dependent launch (PDL);
    * 1: with PDL, its programs signalling the next kernel's launch right after their wait (:func:`pdl_sync`);
    * 2: with PDL, no signal: the next kernel launches as this one's programs exit, so its programs never sit
      beside this kernel's (kernels named in :data:`PDL_LATE`);
    * 3: with PDL, the signal at a point the kernel chooses (:func:`pdl_trigger`; kernels named in
      :data:`PDL_MID`, or a launcher's own choice, e.g. ``mlp_block.SIGNAL_AFTER_UP``).

    The next kernel's wait always waits for this one to complete, so where the signal sits changes only when the
    next kernel's programs are placed, never what they read.

    PDL (Hopper and later, compute capability >= 9) lets a kernel's programs be scheduled while the previous kernel
    in the stream is still finishing; each of our kernels then blocks in :func:`pdl_sync` until that kernel has
    completed and its writes are visible, so the launch latency and the ramp overlap the predecessor's tail
    instead of following it. CUDA graphs keep the launches' programmatic edges. Off for the interpreter, off-GPU,
    before Hopper, when ``DEJAVU_PDL=0``, inside :func:`pdl_suspended` and for kernels named in :data:`PDL_EXCLUDE`.
    """
    if device.type != "cuda" or is_interpreted(kernel) or os.environ.get(PDL_ENV, "1") == "0" or _PDL_SUSPENDED[0] \
            or getattr(kernel, "__name__", None) in PDL_EXCLUDE:
        return 0
    if _cc_major(device.index if device.index is not None else torch.cuda.current_device()) < 9:
        return 0
    name = getattr(kernel, "__name__", None)
    if name in PDL_MID:
        return 3
    return 2 if name in PDL_LATE else 1


@jit
def pdl_sync(PDL: tl.constexpr):
    """First statement of every kernel: with PDL, wait for the previous kernel in the stream to complete (its
    writes visible), then allow the next one to launch. Waiting *before* signalling makes the chain transitive:
    once a kernel lets its successor start, everything before it has completed. Modes 2 and 3 (see
    :func:`use_pdl`): wait only. Without PDL: nothing."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        if PDL == 1:
            tl.extra.cuda.gdc_launch_dependents()


@jit
def pdl_trigger(PDL: tl.constexpr):
    """PDL mode 3: signal the next kernel's launch here, where the kernel calls it (after its wait). Other modes:
    nothing (:func:`pdl_sync` has signalled, or the programs' exit will)."""
    if PDL == 3:
        tl.extra.cuda.gdc_launch_dependents()


@jit
def _noop_kernel(flag_ptr, PDL: tl.constexpr):
    """Nothing but :func:`pdl_sync`: one launch of a dependent chain with no reads and no writes (``flag_ptr`` is
    never touched)."""
    pdl_sync(PDL)


def noop_launch(flag: torch.Tensor, programs: int, num_warps: int = 4) -> None:
    """Launch :func:`_noop_kernel` on ``flag``'s device over ``programs`` programs, with PDL as the decode step's
    kernels launch. Replayed back to back in a CUDA graph, its time is the floor under any kernel of such a chain:
    the kernel sweep's launch floor (bench/NOTES.md v24)."""
    require_triton("noop_launch")
    if not isinstance(programs, int) or programs < 1:
        raise ValueError(f"noop_launch: programs must be a positive int, got {programs!r}.")
    check_launch_device("noop_launch", _noop_kernel, flag)
    pdl = use_pdl(_noop_kernel, flag.device)
    _noop_kernel[(programs,)](flag, PDL=pdl, launch_pdl=pdl > 0, num_warps=num_warps)


@jit
def fence_gpu(FENCE: tl.constexpr):
    """Every thread: ``fence.acq_rel.gpu``, so that its earlier writes and atomics are performed GPU-wide before
    anything after it. The per-thread ``__threadfence()`` of the threadfence-reduction pattern (fence, barrier, one
    acq_rel arrival; the last program to arrive reads what all wrote): without it the arriving thread's fence covers
    only its own writes, and the last program can read sums that other warps' atomics have not reached yet
    (measured: an MLP block over 16384 neurons 0.46 off in relative logit error). FENCE=False under the interpreter,
    which runs programs one at a time and has no inline PTX."""
    if FENCE:
        tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, $1;", "=r,r", [tl.full([128], 0, tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)  # 128 elements: every thread runs it


@jit
def zero_slice(zero_ptr, n_zero, prog, BLOCK_Z: tl.constexpr):
    """Program ``prog``'s share (BLOCK_Z fp32) of setting ``n_zero`` fp32 at ``zero_ptr`` to 0: sums an earlier
    launch left unfinished, whose consumer has completed once :func:`pdl_sync` has returned."""
    offs = prog * BLOCK_Z + tl.arange(0, BLOCK_Z)
    tl.store(zero_ptr + offs, tl.zeros([BLOCK_Z], dtype=tl.float32), mask=offs < n_zero)


@jit
def row_of(t, offs_b, b: tl.constexpr):
    """Row ``b`` (a sequence) of a [BLOCK_B, n] tile, as [n]: the FMA paths' per-sequence operand."""
    return tl.sum(tl.where(offs_b[:, None] == b, t, 0.0), axis=0)


@jit
def rows_of(r0, r1, offs_b):
    """[BLOCK_B, n] from per-sequence rows: r0 for sequence 0, r1 for sequence 1 (read only where BLOCK_B == 2)."""
    return tl.where(offs_b[:, None] == 0, r0[None, :], r1[None, :])


@jit
def sum_rows(a0, a1, offs_b, AXIS: tl.constexpr, BLOCK_B: tl.constexpr):
    """[BLOCK_B, n]: the FMA paths' per-sequence 2-D accumulators a0 (and a1 when BLOCK_B == 2) summed over AXIS.

    On the FMA path the gathers keep one [rows, d-chunk] fp32 accumulator per sequence instead of one 3-D [B, rows,
    d-chunk] product: a 2-D product takes the weight load's layout (8 contiguous fp16 a thread, 16-byte reads of the
    staged tile), while Triton gives the 3-D one its default layout, one fp16 a thread along d, read from shared
    memory two bytes at a time (SASS ``LDS.U16``; bench/NOTES.md v11)."""
    r0 = tl.sum(a0, axis=AXIS)
    r1 = r0
    if BLOCK_B == 2:
        r1 = tl.sum(a1, axis=AXIS)
    return rows_of(r0, r1, offs_b)


def check_zero(op: str, zero, own: torch.Tensor, own_name: str, programs: int) -> tuple[int, int]:
    """A launch's ``zero=`` argument (an fp32 contiguous 1-D tensor on ``own``'s device, not ``own`` itself) ->
    (n_zero, BLOCK_Z) for :func:`zero_slice` over ``programs`` programs; (0, 1) without one."""
    if zero is None:
        return 0, 1
    check_tensor(op, "zero", zero, ndim=1, dtype=torch.float32, device=own.device, contiguous=True)
    if zero.data_ptr() == own.data_ptr():
        raise ValueError(f"{op}: zero must not be this launch's own {own_name}.")
    return zero.numel(), next_pow2(cdiv(zero.numel(), programs))


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# checks (all raise ValueError naming the problem and the fix)
# --------------------------------------------------------------------------------------------


def require_triton(op: str) -> None:
    """Raise ``RuntimeError`` (not ``ValueError``: the call was fine, the install is not)."""
    if not HAS_TRITON:
        raise RuntimeError(
            f"{op}: Triton is not installed, so the fused kernel cannot run. Install it "
            f"(`pip install triton` or `pip install dejavu-llm[kernels]`) or use {op}_ref, the plain "
            f"PyTorch reference, which needs no Triton."
        )


def check_launch_device(op: str, kernel, t: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and is_interpreted(kernel):
        return
    raise ValueError(
        f"{op}: tensors are on {t.device}, but the Triton kernel needs CUDA tensors. Move them with "
        f".cuda(), use {op}_ref on CPU, or set TRITON_INTERPRET=1 before importing triton/dejavu."
    )


def check_tensor(
    op: str,
    name: str,
    t,
    *,
    ndim: int,
    dtype: torch.dtype | None = None,
    dtype_of: str = "the weights",
    device: torch.device | None = None,
    device_of: str = "the weights",
    shape: tuple | None = None,
    contiguous: bool = False,
    last_dim_contiguous: bool = False,
) -> None:
    """Rank / shape / dtype / device / layout checks for one tensor argument.

    ``shape`` entries may be ``None`` (any size). ``contiguous`` is for weights (the kernels
    assume packed rows); ``last_dim_contiguous`` for activations and caches, whose other
    strides are passed to the kernel.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dim() != ndim:
        raise ValueError(
            f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}. "
            f"Reshape it (e.g. x.view(-1, x.shape[-1]) for a single token per sequence)."
        )
    if shape is not None:
        for axis, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                raise ValueError(
                    f"{op}: {name} has shape {tuple(t.shape)} but dimension {axis} must be {want} "
                    f"(expected {tuple('*' if s is None else s for s in shape)}); check which matrix "
                    f"layout the op expects (see its docstring)."
                )
    if dtype is not None and t.dtype != dtype:
        raise ValueError(
            f"{op}: {name} has dtype {t.dtype} but {dtype_of} are {dtype}; cast one side, "
            f"e.g. {name}.to({dtype})."
        )
    if dtype is None and t.dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"{op}: {name} has dtype {t.dtype}; the kernels support float16, bfloat16 and float32. "
            f"Cast with .half()/.bfloat16()/.float() (or use {op}_ref for other dtypes)."
        )
    if device is not None and t.device != device:
        raise ValueError(
            f"{op}: {name} is on {t.device} but {device_of} are on {device}; move it with "
            f".to({str(device)!r})."
        )
    if contiguous and not t.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be contiguous (packed rows, stride {tuple(t.stride())} given); "
            f"store it once with .contiguous() when loading the model, not per call."
        )
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{op}: the last dimension of {name} must have stride 1 (got strides "
            f"{tuple(t.stride())}); call .contiguous() on it."
        )


def check_batch(op: str, batch: int) -> None:
    if batch < 1 or batch > MAX_BATCH:
        raise ValueError(
            f"{op}: batch size {batch} is outside 1..{MAX_BATCH}. These kernels target memory-bound "
            f"decoding; split the batch into chunks of at most {MAX_BATCH} rows, or use a dense "
            f"GEMM for large batches."
        )


def check_index(
    op: str,
    name: str,
    idx,
    *,
    n: int,
    device: torch.device,
    validate: bool,
    what: str = "rows",
) -> None:
    """Index tensors: 1-D, int32/int64, same device, contiguous, non-empty, and (synced) valid.

    ``n`` is the number of selectable items (rows, heads): valid entries are ``0 <= i < n``,
    without duplicates (a duplicate would read a row twice and, for the down projections,
    count it twice).
    """
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor of int32/int64 indices.")
    if idx.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"{op}: {name} has dtype {idx.dtype}; indices must be int32 or int64 "
            f"(e.g. {name}.to(torch.int32))."
        )
    if idx.dim() != 1:
        raise ValueError(
            f"{op}: {name} must be 1-D (the union of selected {what} for the whole batch), "
            f"got shape {tuple(idx.shape)}; flatten and de-duplicate it, e.g. with select_topk."
        )
    if idx.device != device:
        raise ValueError(
            f"{op}: {name} is on {idx.device} but the weights are on {device}; move it with .to({str(device)!r})."
        )
    if not idx.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; call {name}.contiguous().")
    if idx.numel() < 1 or idx.numel() > n:
        raise ValueError(
            f"{op}: {name} selects {idx.numel()} {what}, but it must select between 1 and {n} "
            f"(the number of {what} available)."
        )
    if not should_validate(validate):
        return
    # One host sync for all three statistics.
    ii = idx.long()
    dups = (ii.sort().values.diff() == 0).sum() if ii.numel() > 1 else ii.new_zeros(())
    lo, hi, n_dup = torch.stack([ii.min(), ii.max(), dups]).tolist()
    if lo < 0 or hi >= n:
        raise ValueError(
            f"{op}: {name} has entries in [{lo}, {hi}] but valid {what} are 0..{n - 1}; the kernel "
            f"would read out of bounds. Check the predictor output / head count."
        )
    if n_dup:
        raise ValueError(
            f"{op}: {name} contains {n_dup} duplicated entries; each selected {what[:-1]} must "
            f"appear once (torch.unique(idx) fixes it; select_topk never produces duplicates)."
        )


def check_out(op: str, out, *, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """Optional caller-provided output buffer (e.g. a static buffer inside a CUDA graph)."""
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype \
            or out.device != device or not out.is_contiguous():
        got = (tuple(out.shape), out.dtype, out.device) if isinstance(out, torch.Tensor) else type(out)
        raise ValueError(
            f"{op}: out must be a contiguous tensor of shape {tuple(shape)}, dtype {dtype} on {device}; "
            f"got {got}. Pass out=None to let the op allocate it."
        )
