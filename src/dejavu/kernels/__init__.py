"""Fused sparse kernels for Deja Vu decoding (Triton), each with a plain PyTorch reference.

Launchers (need Triton; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``):

* MLP: :func:`gather_up` (fc1 + bias + ReLU), :func:`gather_swiglu`, :func:`gather_down`
  (transposed ``w2t``, + bias + residual), and the whole block in one launch, :func:`sparse_mlp`; the up gathers
  (and ``head_gather_gemv``) can apply the norm before
  them in the same pass (:func:`fold_norm` -> ``norm=``);
* attention projections: :func:`head_gather_gemv`, :func:`head_gather_down`, and the latter with the MLP block
  after it in one launch, :func:`oproj_mlp`;
* attention: :func:`sparse_decode_attention` (selected query heads, GQA, flash-decoding) and
  :func:`qkv_decode_attention` (the same with the q/k/v finish fused: RoPE, cache write, hole mask);
* predictors: :func:`lowrank_gemv` (a factor, optional fused RMS norm), :func:`topk_select` (one-launch top-k),
  :func:`select_topk` (the decode step's choice between it, :func:`radix_select` for long 16-bit
  score vectors, and an unsorted ``torch.topk``).

Plain torch (no Triton needed): :func:`kv_heads_for`, :func:`predictor_bytes`, :func:`runs_as_product`,
:func:`fold_norm`, :func:`norm_ref` and every ``*_ref``.

``HAS_TRITON`` tells whether the launchers can run; without Triton they raise ``RuntimeError``.
All launchers check their inputs and raise ``ValueError`` naming the problem and the fix;
index range/duplicate checks sync with the device and run only with ``validate=True``
outside CUDA-graph capture.
"""

from ._checks import HAS_TRITON, MAX_BATCH
from .decode_attention import (
    qkv_decode_attention,
    qkv_decode_attention_ref,
    sparse_decode_attention,
    sparse_decode_attention_ref,
)
from .gather_mlp import (
    NormFold,
    XSum,
    fold_norm,
    gather_down,
    gather_down_ref,
    gather_swiglu,
    gather_swiglu_ref,
    gather_up,
    gather_up_ref,
    norm_ref,
    x_sum_ref,
    x_sum_write_ref,
)
from .head_sparse import (
    head_gather_down,
    head_gather_down_ref,
    head_gather_gemv,
    head_gather_gemv_ref,
    head_rows,
    kv_heads_for,
)
from .predictor_ops import (
    lowrank_gemv,
    lowrank_gemv_ref,
    predictor_bytes,
    radix_select,
    runs_as_product,
    radix_workspace,
    select_topk,
    topk_select,
    topk_select_ref,
)
from .mlp_block import mlp_workspace, sparse_mlp, sparse_mlp_ref
from .oproj_block import oproj_mlp, oproj_mlp_ref

__all__ = [
    "HAS_TRITON",
    "MAX_BATCH",
    "gather_up",
    "gather_up_ref",
    "gather_swiglu",
    "gather_swiglu_ref",
    "gather_down",
    "gather_down_ref",
    "sparse_mlp",
    "sparse_mlp_ref",
    "mlp_workspace",
    "oproj_mlp",
    "oproj_mlp_ref",
    "NormFold",
    "XSum",
    "x_sum_ref",
    "x_sum_write_ref",
    "fold_norm",
    "norm_ref",
    "head_gather_gemv",
    "head_gather_gemv_ref",
    "head_gather_down",
    "head_gather_down_ref",
    "head_rows",
    "kv_heads_for",
    "sparse_decode_attention",
    "sparse_decode_attention_ref",
    "qkv_decode_attention",
    "qkv_decode_attention_ref",
    "lowrank_gemv",
    "lowrank_gemv_ref",
    "select_topk",
    "radix_select",
    "radix_workspace",
    "topk_select",
    "topk_select_ref",
    "predictor_bytes",
    "runs_as_product",
]
