"""FastDecoder against the reference DecoderLM: dense decode == model.forward with a cache; sparse decode at batch 1
== the reference PredictorPolicy (same selection); bad input is a ValueError. Triton kernels run under
TRITON_INTERPRET=1 on CPU (set in tests/conftest.py); the slow interpreter is used for a few steps only."""

import pytest
import torch

pytest.importorskip("triton")

from dejavu.accounting import bytes_summary, predictor_params  # noqa: E402
from dejavu.kernels import _checks as KC  # noqa: E402
from dejavu.predictors.model import PredictorSet  # noqa: E402
from dejavu.runtime.fast_decode import FastDecoder, distinct_streams  # noqa: E402
from dejavu.runtime.policy import PredictorPolicy  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
MLP_D, HEAD_D = [1.0, 0.5, 0.25], [0.2, 1.0, 0.5]  # per layer: dense / sparse mixes, GQA gathered + padded KV sets
TOL = 1e-4 if CUDA else 1e-5  # fp32; on a GPU cuBLAS / SDPA / the kernels sum in other orders


def _predictors(spec, lookahead=True, seed=0):
    torch.manual_seed(seed)
    p = PredictorSet.for_model(spec, mlp_rank=8, head_rank=4, input_scheme="lookahead" if lookahead else "same")
    return p.eval().requires_grad_(False).to(DEV)


@torch.no_grad()
def _compare(model, dec, policy, kv_policy, B, T=5, steps=3, seed=1):
    """Prefill both, then feed both the reference's greedy tokens; return max |logit diff| per step and the
    max |sparse - dense| (to show the sparse path is not secretly dense)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.spec.vocab_size, (B, T), generator=g).to(model.device)
    cache = model.new_cache(B, dec.max_len)
    ref = model(ids, 0, cache, sparsity=None)[:, -1]
    torch.testing.assert_close(dec.prefill(ids), ref, rtol=1e-5, atol=1e-5)
    tok, errs, gap = ref.argmax(-1), [], 0.0
    dense_cache = model.new_cache(B, dec.max_len)
    model(ids, 0, dense_cache, sparsity=None)
    for t in range(steps):
        r = model(tok[:, None], T + t, cache, sparsity=policy, kv_policy=kv_policy)[:, -1]
        dense = model(tok[:, None], T + t, dense_cache, sparsity=None)[:, -1]
        got = dec.decode_step(tok).clone()
        errs.append((got - r).abs().max().item())
        gap = max(gap, (r - dense).abs().max().item())
        tok = r.argmax(-1)
    return errs, gap


def test_dense_decode_equals_model(tiny):
    """(a) predictors=None: the Triton step equals model.forward with a KV cache, step by step (fp32)."""
    model = tiny[1].to(DEV)
    dec = FastDecoder(model, None, batch=2, max_len=16, backend="triton")
    errs, _ = _compare(model, dec, None, "all", B=2)
    assert max(errs) < TOL, errs


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dense_mlp", ["cublas", "up_gather"])
def test_dense_mlp_modes_equal_model(tiny, B, dense_mlp):
    """dense_mlp: "cublas" (norm kernel, GEMVs, activation kernels) and "up_gather" (at B = 1 the up projection is
    the row gather over every neuron with the norm folded in; cuBLAS above) both equal model.forward with a KV cache
    (fp32); up_gather runs fewer launches a layer at B = 1; a bad value is a ValueError."""
    model = tiny[1].to(DEV)
    dec = FastDecoder(model, None, batch=B, max_len=16, backend="triton", dense_mlp=dense_mlp)
    errs, _ = _compare(model, dec, None, "all", B=B, steps=2)
    assert max(errs) < TOL, errs
    assert dec.describe()["dense_mlp"] == dense_mlp
    assert any(dec._up_gather) == (dense_mlp == "up_gather" and B == 1)
    assert all(dec._cublas_mlp) == (not any(dec._up_gather))
    if dense_mlp == "up_gather" and B == 1:
        assert all(f is not None for f in dec._fold2)
        cublas = FastDecoder(model, None, batch=B, max_len=16, backend="torch", dense_mlp="cublas")
        assert all(a["main"] < b["main"] for a, b in zip(dec.kernels_per_layer(), cublas.kernels_per_layer()))
    with pytest.raises(ValueError, match="dense_mlp"):
        FastDecoder(model, None, batch=1, max_len=8, backend="torch", dense_mlp="gathers")


@pytest.mark.parametrize("B", [1, 3])
def test_dense_attn_qkv_gather_equals_model(tiny, B):
    """dense_attn="qkv_gather" (the default): at B = 1 the dense attention's projections are the sparse path's
    gathers over every head (norm folded into the q/k/v gather); the step equals model.forward with a KV cache (fp32)
    with one launch fewer a layer; cuBLAS above B = 1; a bad value is a ValueError."""
    model = tiny[1].to(DEV)
    dec = FastDecoder(model, None, batch=B, max_len=16, backend="triton", dense_attn="qkv_gather")
    errs, _ = _compare(model, dec, None, "all", B=B, steps=2)
    assert max(errs) < TOL, errs
    assert dec.describe()["dense_attn"] == "qkv_gather" and all(dec._qkv_gather) == (B == 1)
    assert [f is not None for f in dec._fold1] == [B == 1] * model.spec.n_layers
    if B == 1:
        cublas = FastDecoder(model, None, batch=B, max_len=16, backend="torch", dense_attn="cublas")
        assert all(a["main"] < b["main"] for a, b in zip(dec.kernels_per_layer(), cublas.kernels_per_layer()))
    with pytest.raises(ValueError, match="dense_attn"):
        FastDecoder(model, None, batch=1, max_len=8, backend="torch", dense_attn="gathers")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_oproj_writes_next_residual(tiny, backend):
    """At B = 1 the dense MLP part (up_gather) follows the o_proj gather over every head; finishing its own sums
    (defer_oproj_finish off), that o_proj's epilogue also writes x_next = mid + b2 for cuBLAS to add fc2 into: the
    step equals model.forward with a KV cache (fp32), as it does with that residual made by an elementwise launch
    (oproj_writes_next off), which is one launch more a layer."""
    model = tiny[1].to(DEV)
    on = FastDecoder(model, None, batch=1, max_len=16, backend=backend)
    off = FastDecoder(model, None, batch=1, max_len=16, backend=backend)
    on.defer_oproj_finish = off.defer_oproj_finish = False
    off.oproj_writes_next = False
    assert all(on._up_gather) and all(on._qkv_gather)
    assert on.describe()["oproj_writes_next"] and not off.describe()["oproj_writes_next"]
    cublas_attn = FastDecoder(model, None, batch=1, max_len=16, backend=backend, dense_attn="cublas")
    assert not cublas_attn.describe()["oproj_writes_next"]  # its o_proj is cuBLAS: the elementwise launch stays
    for dec in (on, off):
        errs, _ = _compare(model, dec, None, "all", B=1, steps=2)
        assert max(errs) < TOL, errs
    assert [a["main"] + 1 for a in on.kernels_per_layer()] == [b["main"] for b in off.kernels_per_layer()]


def test_dense_oproj_deferred_into_up_gather(tiny):
    """ours-dense at B = 1 (defer_oproj_finish, the default): the o_proj over every head adds its part into fp32
    sums and the up gather over every neuron makes the residual after attention from them (and writes it), and
    x_next = mid + b2 for cuBLAS's fc2: the step equals model.forward with a KV cache (fp32), with as many launches
    a layer as the finishing o_proj that writes x_next, and each o_proj clears the sums of the one before it."""
    model = tiny[1].to(DEV)
    dec = FastDecoder(model, None, batch=1, max_len=16, backend="triton")
    ref = FastDecoder(model, None, batch=1, max_len=16, backend="triton")
    ref.defer_oproj_finish = False
    L = model.spec.n_layers
    assert dec._deferred_o() == [True] * L and not any(ref._deferred_o())
    assert dec.describe()["defer_oproj_finish"] and not dec.describe()["oproj_writes_next"]
    errs, _ = _compare(model, dec, None, "all", B=1, steps=2)
    assert max(errs) < TOL, errs
    assert not any(dec._o_ws[l].any() for l in range(L - 1)) and dec._o_ws[L - 1].any()
    assert dec.kernels_per_layer() == ref.kernels_per_layer()
    for kw in ({"dense_attn": "cublas"}, {"dense_mlp": "cublas"}, {"batch": 3}):  # cuBLAS o_proj / no up gather
        assert not any(FastDecoder(model, None, **{"batch": 1, "max_len": 16, **kw})._deferred_o()), kw
    assert not any(FastDecoder(model, None, batch=1, max_len=16, backend="torch")._deferred_o())  # no sums buffer


@pytest.mark.parametrize("kv_policy", ["all", "selected"])
def test_sparse_batch1_equals_reference_policy(tiny, kv_policy):
    """(b) batch 1: the runtime's batch top-k is the reference's per-token top-k, so the logits agree."""
    model = tiny[1].to(DEV)
    p = _predictors(model.spec)
    dec = FastDecoder(model, p, MLP_D, HEAD_D, batch=1, max_len=16, kv_policy=kv_policy, backend="triton")
    errs, gap = _compare(model, dec, PredictorPolicy(p, MLP_D, HEAD_D), kv_policy, B=1)
    assert max(errs) < TOL, errs
    assert gap > 1e-3  # the sparse reference really differs from dense, so the match means something
    if kv_policy == "selected" and model.spec.group_size > 1:
        assert dec.k_kv == [1, model.spec.n_kv_heads, model.spec.n_kv_heads]  # gathered / dense-with-holes


def test_int8_predictors_equal_reference_policy(tiny):
    """A set rounded to int8 rows (PredictorSet.quantize_int8) is stored as int8 and scales, and the step's GEMVs,
    multiplying the scales in, select as the reference does from the rounded float weights."""
    model = tiny[1].to(DEV)
    p = _predictors(model.spec).quantize_int8()
    dec = FastDecoder(model, p, MLP_D, HEAD_D, batch=1, max_len=16, kv_policy="selected", backend="triton")
    assert dec.describe()["predictor_weights"] == "int8"
    for ent in filter(None, dec._pred):
        assert ent["a_t"].dtype == torch.int8 and ent["a_scale"].shape == (ent["a_t"].shape[0],)
        assert all(ent[kind][2].dtype == torch.int8 and ent[kind][4].dtype == torch.float32
                   for kind in ("head", "mlp") if kind in ent)  # fmt: skip
    errs, gap = _compare(model, dec, PredictorPolicy(p, MLP_D, HEAD_D), "selected", B=1)
    assert max(errs) < TOL, errs
    assert gap > 1e-3


@pytest.mark.parametrize("B", [1, 3, 5])
def test_predictor_products_equal_factors(tiny, monkeypatch, B):
    """A predictor that reads fewer bytes as its factors' product (kernels.runs_as_product: the head predictors here,
    rank 8 over 4 or 6 heads at d = 48) is scored from that product in one GEMV (fast_decode.PREDICTOR_PRODUCTS):
    the same selections and logits (fp32) as from its two factors, and fewer bytes, by exactly the difference. By
    default only up to batch 4 (PRODUCTS_MAX_BATCH); raised here for B = 5."""
    from dejavu.runtime import fast_decode as FD

    model = tiny[1].to(DEV)
    s = model.spec
    torch.manual_seed(0)
    p = PredictorSet.for_model(s, mlp_rank=8, head_rank=8).eval().requires_grad_(False).to(DEV)
    sparse_heads = [l for l, h in enumerate(HEAD_D) if h < 1]
    assert FD.PREDICTOR_PRODUCTS and FD.PRODUCTS_MAX_BATCH == 4
    if B > FD.PRODUCTS_MAX_BATCH:  # the default keeps the factors above it
        dec = FastDecoder(model, p, MLP_D, HEAD_D, batch=B, max_len=8, backend="triton")
        assert not dec.predictor_products and all(dec._pred[l]["head"][0] is not None for l in sparse_heads)
        monkeypatch.setattr(FD, "PRODUCTS_MAX_BATCH", B)
    ids = torch.randint(0, s.vocab_size, (B, 5), generator=torch.Generator().manual_seed(B)).to(DEV)
    decs, outs = {}, {}
    for on in (True, False):
        monkeypatch.setattr(FD, "PREDICTOR_PRODUCTS", on)
        dec = decs[on] = FastDecoder(model, p, MLP_D, HEAD_D, batch=B, max_len=12, backend="triton")
        tok = dec.prefill(ids).argmax(-1)
        outs[on] = []
        for _ in range(2):
            logits = dec.decode_step(tok).clone()
            outs[on].append((logits, [h.clone() for h in dec._hidx], [n.clone() for n in dec._nidx]))
            tok = outs[on][-1][0].argmax(-1)
    for (a, ha, na), (b, hb, nb) in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)
        assert all(torch.equal(x, y) for x, y in zip(ha + na, hb + nb))
    assert sparse_heads and all(decs[True]._pred[l]["head"][0] is None for l in sparse_heads)  # products
    assert decs[True].describe()["predictor_products"] == ["head"]
    assert decs[False].describe()["predictor_products"] == []
    assert all(decs[False]._pred[l]["head"][0] is not None for l in sparse_heads)
    assert all(decs[True]._pred[l]["mlp"][0] is not None for l in range(s.n_layers) if "mlp" in decs[True]._pred[l])
    d, H = s.d_model, s.n_heads
    assert decs[False].bytes_per_token() - decs[True].bytes_per_token() == 4 * len(sparse_heads) * (8 * (d + H) - H * d)


@pytest.mark.parametrize("kv_policy, which", [("all", True), ("selected", True), ("all", "rows"), ("selected", "rows"),
                                              ("all", "mlp")])
def test_prewait_gathers_equal_reference_policy(tiny, kv_policy, which):
    """prewait_gathers (A/B): the q/k/v gathers (but layer 0's) and the MLP blocks read their selection before their
    PDL wait. The per-layer densities here make layer 0's prediction end in its head top-k, the kernel right before
    layer 0's gather: read early there, the selection can be the previous step's (the likely cause of the GPU
    failures in bench/NOTES.md v12), so several steps must match the reference per token. Without PDL (CPU, the
    interpreter) prewait changes nothing and this equals the plain reference test; it is meant for the GPU run.
    ``which``: both kinds, the gathers only ("rows", the default) or the blocks only ("mlp")."""
    model = tiny[1].to(DEV)
    p = _predictors(model.spec)
    dec = FastDecoder(model, p, MLP_D, HEAD_D, batch=1, max_len=16, kv_policy=kv_policy, backend="triton")
    assert dec.prewait_gathers == "rows"
    dec.prewait_gathers = which
    errs, _ = _compare(model, dec, PredictorPolicy(p, MLP_D, HEAD_D), kv_policy, B=1, steps=5)
    assert max(errs) < TOL, errs
    assert dec.describe()["prewait_gathers"]


def _on_and_off(model, p, flag, B, seed, max_len=12):
    """Two decoders differing only in ``flag`` (on / off), two decode steps each from the same prompt: the logits
    agree (fp32); returns (on, off)."""
    ids = torch.randint(0, model.spec.vocab_size, (B, 5), generator=torch.Generator().manual_seed(seed))
    decs = {f: FastDecoder(model, p, MLP_D, HEAD_D, batch=B, max_len=max_len, backend="triton", **{flag: f})
            for f in (True, False)}
    outs = {}
    for f, dec in decs.items():
        tok = dec.prefill(ids.to(model.device)).argmax(-1)
        outs[f] = [dec.decode_step(tok).clone() for _ in range(2)]
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)
    return decs[True], decs[False]


def test_folded_norms_equal_separate_norm_kernels(tiny):
    """fuse_norm (the default): the sparse parts' norms run inside their gathers, and the final norm inside the LM
    head (a row gather over the vocabulary); same logits as with the norm kernels (fp32), two launches fewer per
    fully sparse layer and one at the end, and the fold's fp32 row constants are counted."""
    model = tiny[1].to(DEV)
    p = _predictors(model.spec)
    fused, plain = _on_and_off(model, p, "fuse_norm", B=1, seed=3)
    assert fused._fold_head() and not plain._fold_head()
    assert fused._kernel_summary()["main_total"] == plain._kernel_summary()["main_total"] - 1 - sum(
        (f1 is not None) + (f2 is not None) for f1, f2 in zip(fused._fold1, fused._fold2))
    # the attention norm also folds into a dense layer's q/k/v gather (dense_attn="qkv_gather", the default at B = 1)
    assert [f is not None for f in fused._fold1] == [kh < model.spec.n_heads or qg
                                                     for kh, qg in zip(fused.k_heads, fused._qkv_gather)]
    # the MLP norm also folds into a dense layer's up gather (dense_mlp="up_gather", the default at B = 1)
    assert [f is not None for f in fused._fold2] == [km < model.spec.ffn_dim or ug
                                                     for km, ug in zip(fused.k_mlp, fused._up_gather)]
    assert fused._up_gather == [km == model.spec.ffn_dim for km in fused.k_mlp]
    fewer = [b["main"] - a["main"] for a, b in zip(fused.kernels_per_layer(), plain.kernels_per_layer())]
    assert fewer == [(f1 is not None) + (f2 is not None) for f1, f2 in zip(fused._fold1, fused._fold2)]
    extra = fused.bytes_per_token() - plain.bytes_per_token()
    assert (extra > 0) == (model.spec.norm_kind == "layernorm")  # rmsnorm folds need no row constants
    assert fused.describe()["fuse_norm"] and not plain.describe()["fuse_norm"]
    wide = FastDecoder(model, p, MLP_D, HEAD_D, batch=3, max_len=12, backend="torch")  # tensor-core path: no fold
    assert not wide.fuse_norm and wide._fold1 == [None] * model.spec.n_layers


def test_side_stream_pdl_modes(tiny):
    """side_pdl names the parts of a side-stream prediction launched without PDL; inline predictions (main stream)
    always keep it."""
    from dejavu.runtime.fast_decode import SIDE_PDL_OFF

    model = tiny[1].to(DEV)
    dec = FastDecoder(model, _predictors(model.spec), MLP_D, HEAD_D, batch=1, max_len=12, backend="torch")
    wide = FastDecoder(model, _predictors(model.spec), MLP_D, HEAD_D, batch=4, max_len=12, backend="torch")
    assert (dec.fork_at, dec.side_pdl) == ("attn", "off") and (wide.fork_at, wide.side_pdl) == ("start", "on")
    for mode, off in SIDE_PDL_OFF.items():
        dec.side_pdl = mode
        for part in ("first", "heads", "scores", "select"):
            for side in (True, False):
                with dec._launch(side, part):
                    assert bool(KC._PDL_SUSPENDED[0]) == (side and part in off), (mode, part, side)
    assert SIDE_PDL_OFF["on"] == () and set(SIDE_PDL_OFF["off"]) == {"first", "heads", "scores", "select"}


def test_fused_mlp_block_equals_two_gathers(tiny):
    """fuse_mlp (the default at B = 1, kernels._checks.FMA_MAX_BATCH): a sparse MLP block is one sparse_mlp launch;
    same logits as the up and down gathers (fp32), one launch fewer per sparse MLP layer, and the shared workspace is
    left zeroed."""
    model = tiny[1].to(DEV)
    p = _predictors(model.spec)
    fused, plain = _on_and_off(model, p, "fuse_mlp", B=1, seed=4)
    assert fused._fused_mlp == [km < model.spec.ffn_dim for km in fused.k_mlp] and not any(plain._fused_mlp)
    fewer = [b["main"] - a["main"] for a, b in zip(fused.kernels_per_layer(), plain.kernels_per_layer())]
    assert fewer == [int(f) for f in fused._fused_mlp]
    assert not any(ws["acc"].any() or ws["cnt"].any() for ws in fused._mlp_ws)
    assert fused.describe()["fuse_mlp"] and not plain.describe()["fuse_mlp"]
    for B in (2, 3):  # the tensor-core paths: two launches
        wide = FastDecoder(model, p, MLP_D, HEAD_D, batch=B, max_len=12, backend="torch")
        assert not any(wide._fused_mlp)


def test_fused_attention_equals_post_and_attention_kernels(tiny, monkeypatch):
    """fuse_attn (the default): the q/k/v finish (RoPE, K/V cache write, hole mask) runs inside the decode attention;
    same logits, K/V caches and hole masks as qkv_post + attention (fp32), one launch fewer per layer."""
    from dejavu.kernels import decode_attention as DA

    cfg = DA._attn_config  # short caches get one split; force three (the current position in a later split)
    monkeypatch.setattr(DA, "_attn_config", lambda *a: cfg(*a[:-1], 3))
    model = tiny[1].to(DEV)
    p = _predictors(model.spec)
    fused, plain = _on_and_off(model, p, "fuse_attn", B=1, seed=5)
    for cf, cp in zip(fused.caches, plain.caches):
        n = 5 + 2  # prompt + two steps
        torch.testing.assert_close(cf.k[:, :, :n], cp.k[:, :, :n], rtol=TOL, atol=TOL)
        torch.testing.assert_close(cf.v[:, :, :n], cp.v[:, :, :n], rtol=TOL, atol=TOL)
        assert torch.equal(cf.valid[:, :, :n], cp.valid[:, :, :n])
    fewer = [b["main"] - a["main"] for a, b in zip(fused.kernels_per_layer(), plain.kernels_per_layer())]
    assert fewer == [1] * model.spec.n_layers
    assert fused.describe()["fuse_attn"] and not plain.describe()["fuse_attn"]
    for B in (2, 3):  # measured slower at B=4
        assert not FastDecoder(model, p, MLP_D, HEAD_D, batch=B, max_len=12, backend="torch").fuse_attn


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_radix_neuron_selection_16bit(arch):
    """16-bit model with N > SMALL_N: the neuron top-k is the radix select fed by the scores GEMV's histogram; each
    sparse layer's index holds the k best scores of its (stored) predictor output, and the workspace is clean."""
    from dejavu.bench.decode import build_random_model, random_predictors
    from dejavu.models.spec import ModelSpec

    kw = dict(opt=dict(mlp_kind="relu", norm_kind="layernorm", pos_kind="learned", attn_bias=True, out_bias=True,
                       mlp_bias=True, n_kv_heads=4),
              llama=dict(mlp_kind="swiglu", norm_kind="rmsnorm", pos_kind="rope", n_kv_heads=2))[arch]
    spec = ModelSpec(arch=arch, vocab_size=64, d_model=32, n_layers=2, n_heads=4, head_dim=8, ffn_dim=1100,
                     norm_eps=1e-5, max_positions=32, name=f"radix-{arch}", **kw)
    dt = torch.float16 if CUDA else torch.bfloat16  # bf16 matmuls are what the CPU runs well
    model = build_random_model(spec, device=DEV, dtype=dt)
    preds = random_predictors(spec, device=DEV, dtype=dt)
    dec = FastDecoder(model, preds, 0.25, 0.5, batch=1, max_len=12, backend="triton")
    assert dec._radix is not None
    if arch == "opt":  # the head first factor, head scores + select, the neuron scores from their product (rank 128
        # above d = 32: runs_as_product) + radix select (torch.topk: 13 more); layer 0's split prediction (GPU) has its
        # neuron half embed x0 itself
        assert dec._pred[0]["mlp"][0] is None and dec._pred[0]["head"][0] is not None
        assert [p["side"] for p in dec.kernels_per_layer()] == [5 + dec._split0(), 5]
    dec.prefill(torch.randint(0, 64, (1, 4), device=DEV))
    dec.decode_step(torch.zeros(1, dtype=torch.long, device=DEV))
    torch.cuda.synchronize() if CUDA else None
    sc, idx, k = dec._scores[spec.ffn_dim][0].float(), dec._nidx[-1], dec.k_mlp[-1]  # the last layer scored
    assert len(set(idx.tolist())) == k
    assert torch.equal(torch.sort(sc[idx], descending=True).values, torch.sort(sc, descending=True).values[:k])
    for ws in [dec._radix] + ([dec._bufs0["ws"]] if dec._split0() else []):
        assert int(ws["hist"].abs().sum()) == 0 and int(ws["counters"].abs().sum()) == 0
    wide = FastDecoder(model, preds, 0.25, 0.5, batch=3, max_len=12, backend="triton")  # B > 2: torch.topk
    assert wide._radix is None and wide._topk == "torch"


def test_sparse_without_lookahead_torch_backend(tiny):
    """Same-layer predictors (heads from the layer input, neurons from the residual after attention)."""
    model = tiny[1].to(DEV)
    p = _predictors(model.spec, lookahead=False)
    dec = FastDecoder(model, p, 0.5, 0.5, batch=1, max_len=16, kv_policy="selected", backend="torch")
    errs, gap = _compare(model, dec, PredictorPolicy(p, 0.5, 0.5), "selected", B=1, steps=4)
    assert max(errs) < TOL and gap > 1e-3, (errs, gap)


def test_batch_union_shapes_and_identical_rows(tiny):
    """batch > 1 selects one union per step: shapes and finiteness; identical rows give the batch-1 answer."""
    model = tiny[1].to(DEV)
    p = _predictors(model.spec)
    ids = torch.randint(0, model.spec.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3)).to(DEV)
    one = FastDecoder(model, p, 0.5, 0.5, batch=1, max_len=12, backend="torch").generate(ids, 4)
    four = FastDecoder(model, p, 0.5, 0.5, batch=4, max_len=12, backend="torch").generate(ids.expand(4, -1), 4)
    assert four.tokens.shape == (4, 10) and len(four.step_ms) == 3
    assert (four.tokens == one.tokens).all()
    mixed = FastDecoder(model, p, 0.25, 0.5, batch=3, max_len=12, backend="torch")
    logits = mixed.prefill(torch.randint(0, model.spec.vocab_size, (3, 6), device=DEV))
    out = mixed.decode_step(logits.argmax(-1))
    assert out.shape == (3, model.spec.vocab_size) and torch.isfinite(out).all()


def test_generate_is_greedy_decode(tiny_llama):
    model = tiny_llama.to(DEV)
    p = _predictors(model.spec)
    dec = FastDecoder(model, p, 0.5, 0.5, batch=2, max_len=12, backend="torch")
    ids = torch.randint(0, model.spec.vocab_size, (2, 4), device=DEV)
    res = dec.generate(ids, 5)
    assert res.tokens.shape == (2, 9) and len(res.step_ms) == 4 and res.prefill_ms > 0
    tok = dec.prefill(ids).argmax(-1)
    for t in range(4):
        assert (tok == res.tokens[:, 4 + t]).all()
        tok = dec.decode_step(tok).argmax(-1)
    assert (tok == res.tokens[:, 8]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_table_is_the_models_rope(tiny_llama, dtype):
    """The step's RoPE row comes from a table built once: bitwise the model's rope() at each position, and the step's
    embedding launch puts position p's row in place (cos, sin the two halves the attention reads)."""
    model = tiny_llama.to(DEV, dtype)
    dec = FastDecoder(model, None, batch=2, max_len=12, backend="triton")
    hd = model.spec.head_dim
    for p in (0, 5, 11):
        cos, sin = model.rope(torch.tensor([p], device=DEV), dtype)
        assert torch.equal(dec._rope_table[p], torch.cat((cos[0], sin[0])))
    pos, tok = torch.tensor([3, 7], device=DEV), torch.tensor([1, 2], device=DEV)
    dec.ops.embed(tok, model.embed.weight, pos, dec._rope_table, dec._x[0], dec._rope_row)
    cos, sin = model.rope(pos, dtype)
    assert torch.equal(dec._rope_row[:, :hd], cos) and torch.equal(dec._rope_row[:, hd:], sin)
    assert torch.equal(dec._x[0], model.embed.weight[tok])


def test_bad_input_is_a_value_error(tiny_llama):
    """(c) batch above 16, max_len exceeded, densities without predictors, wrong shapes, token ids out of range."""
    model = tiny_llama
    with pytest.raises(ValueError, match="batch=17"):
        FastDecoder(model, None, batch=17, max_len=8, backend="torch")
    with pytest.raises(ValueError, match="need predictors"):
        FastDecoder(model, None, 0.5, batch=1, max_len=8, backend="torch")
    with pytest.raises(ValueError, match="kv_policy"):
        FastDecoder(model, None, batch=1, max_len=8, kv_policy="some", backend="torch")
    dec = FastDecoder(model, None, batch=1, max_len=8, backend="torch")
    ids = torch.randint(0, model.spec.vocab_size, (1, 6))
    with pytest.raises(ValueError, match="exceeds max_len"):
        dec.generate(ids, 3)
    with pytest.raises(ValueError, match="no room"):
        dec.prefill(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="batch=1"):
        dec.prefill(torch.zeros(2, 3, dtype=torch.long))
    tok = dec.prefill(ids).argmax(-1)
    for bad in (-1, model.spec.vocab_size):  # a host tensor is checked (nothing decoded)
        with pytest.raises(ValueError, match="token ids must be in"):
            dec.decode_step(torch.tensor([bad]))
    tok = dec.decode_step(tok).argmax(-1)  # position 6
    dec.decode_step(tok)  # position 7: the last slot
    with pytest.raises(ValueError, match="cache full"):
        dec.decode_step(tok)
    with pytest.raises(ValueError, match="shape"):
        dec.decode_step(torch.zeros(2, dtype=torch.long))


def test_opt_learned_positions_limit(tiny):
    _, model = tiny
    if model.spec.pos_kind != "learned":
        pytest.skip("learned positions only")
    with pytest.raises(ValueError, match="learned positions"):
        FastDecoder(model, None, batch=1, max_len=model.spec.max_positions + 1, backend="torch")


def test_bytes_accounting(tiny):
    _, model = tiny
    s = model.spec
    p = _predictors(s)
    dense = FastDecoder(model, None, batch=1, max_len=8, backend="torch")
    weights = sum(t.numel() for name, t in model.named_parameters() if not name.startswith(("embed.", "pos_embed.")))
    if s.tie_embeddings:  # the tied LM head is read through lm_head, not as an embedding table
        weights += model.lm_head.weight.numel()
    extra = s.d_model * (2 if s.pos_kind == "learned" else 1)  # the embedding row(s) of one token
    # a folded layernorm's two fp32 constants per row: the final one into the LM head, each MLP norm into the dense up
    # gather (dense_mlp="up_gather") and each attention norm into the q/k/v gather (dense_attn="qkv_gather"), where
    # they replace the rows' bias
    qkv_rows = (s.n_heads + 2 * s.n_kv_heads) * s.head_dim
    fold = 8 * s.vocab_size + s.n_layers * (s.ffn_dim * (8 - 4 * s.mlp_bias) + qkv_rows * (8 - 4 * s.attn_bias)) \
        if s.norm_kind == "layernorm" else 0  # fmt: skip
    assert dense.describe()["fold_final_norm"] and all(dense._up_gather) and all(dense._qkv_gather)
    assert dense.dense_bytes_per_token() == dense.bytes_per_token() - fold == 4 * (weights + extra)
    sparse = FastDecoder(model, p, MLP_D, HEAD_D, batch=1, max_len=8, kv_policy="all", backend="torch")
    ref = bytes_summary(s, [k / s.ffn_dim for k in sparse.k_mlp], [k / s.n_heads for k in sparse.k_heads],
                        predictor_params=predictor_params(p.meta, MLP_D, HEAD_D, torch.float32), bytes_per_param=4)
    got = sparse.bytes_per_token() / sparse.dense_bytes_per_token()
    assert got == pytest.approx(ref["step_bytes_ratio"], rel=0.05)  # the accounting ignores biases and norms
    sel = FastDecoder(model, p, MLP_D, HEAD_D, batch=1, max_len=8, kv_policy="selected", backend="torch")
    assert sel.bytes_per_token() < sparse.bytes_per_token() < sparse.dense_bytes_per_token()
    assert sel.kv_bytes(10) == sum(sel.k_heads) * 10 * s.head_dim * 2 * 4
    # int8 predictor rows: 1 byte a weight instead of 4, plus an fp32 scale a row (r + n per predictor)
    q = FastDecoder(model, _predictors(s).quantize_int8(), MLP_D, HEAD_D, batch=1, max_len=8, kv_policy="all",
                    backend="torch")  # fmt: skip
    # (a predictor reads its fp32 product instead of its factors where that is fewer bytes: runs_as_product)
    d = s.d_model
    fp32 = {n: 4 * min(n * d, r * (d + n)) for n, r in ((s.n_heads, 4), (s.ffn_dim, 8))}
    int8 = {n: min(4 * n * d, r * (d + n) + 4 * (r + n)) for n, r in ((s.n_heads, 4), (s.ffn_dim, 8))}
    saved = sum(fp32[n] - int8[n] for l in range(s.n_layers)
                for k, n in ((q.k_heads[l], s.n_heads), (q.k_mlp[l], s.ffn_dim)) if k < n)  # fmt: skip
    assert saved > 0 and sparse.bytes_per_token() - q.bytes_per_token() == saved
    assert sparse.describe()["predictor_weights"] == "float32" and dense.describe()["predictor_weights"] is None


class _PoolStream:
    def __init__(self, handle):
        self.cuda_stream = handle


def test_distinct_streams_skips_pool_repeats():
    """torch.cuda.Stream() cycles through a pool: distinct_streams skips the streams it has handed out already and
    those in avoid, and says so when the pool has nothing else."""
    pool = [1, 2, 3, 4]
    drawn = []

    def make(prio):
        drawn.append(prio)
        return _PoolStream(pool[(len(drawn) - 1) % len(pool)])

    got = distinct_streams("cuda", 2, priority=-1, avoid=(_PoolStream(1), None, _PoolStream(3)), make=make)
    assert [s.cuda_stream for s in got] == [2, 4] and set(drawn) == {-1}
    again = distinct_streams("cuda", 3, avoid=(got[0],), make=make)  # the pool wraps around: 1, 3 then 4 (2 avoided)
    assert [s.cuda_stream for s in again] == [1, 3, 4]
    with pytest.raises(RuntimeError, match="distinct from 2 others"):
        distinct_streams("cuda", 3, avoid=(_PoolStream(1), _PoolStream(2)), make=make)


# ---- GPU: graph capture and timing ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_side_stream_ahead_only_with_a_capped_mlp_block(tiny, monkeypatch):
    """SIDE_PRIORITY: the side stream runs ahead of the step (a more urgent CUDA priority than the capture stream's)
    exactly where some MLP block launches its one loop with the register cap, here forced by a GPU of one SM (OPT's
    ReLU blocks; Llama's SwiGLU blocks run two loops); with SIDE_PRIORITY = 0 never."""
    from dejavu.kernels import mlp_block as MB
    from dejavu.runtime import fast_decode as FD

    _, model = tiny
    model = model.to(device="cuda", dtype=torch.float16)
    p = _predictors(model.spec)
    relu = model.spec.mlp_kind == "relu"
    for sms, prio in ((None, FD.SIDE_PRIORITY), (1, FD.SIDE_PRIORITY), (1, 0)):
        if sms:
            monkeypatch.setattr(MB, "num_sms", lambda device, n=sms: n)
        monkeypatch.setattr(FD, "SIDE_PRIORITY", prio)
        dec = FastDecoder(model, p, 0.5, 0.5, batch=1, max_len=16)
        dec.capture()
        ahead = dec._side.priority < dec._capture_stream.priority
        assert dec._capped_mlp() == (sms == 1 and relu)
        assert ahead == (dec._capped_mlp() and prio < 0), (sms, prio, dec._side.priority)
        del dec


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_decoders_never_capture_on_their_side_streams(tiny):
    """More decoders than torch's stream pool holds (32 a priority), one after another as the bench builds them:
    each captures on a stream that is neither of its side streams, else its lookahead predictors would run in series
    with the step (bench/NOTES.md v22)."""
    _, model = tiny
    model = model.to(device="cuda", dtype=torch.float16)
    p = _predictors(model.spec)
    for i in range(24):  # three pool streams a decoder (side, layer 0's side, capture): the pool wraps twice
        dec = FastDecoder(model, p, 0.5, 0.5, batch=1 + 3 * (i % 2), max_len=16)
        assert dec._side is not None and dec._side0 is not None
        dec.capture()
        handles = [s.cuda_stream for s in (dec._side, dec._side0, dec._capture_stream)]
        assert len(set(handles)) == 3, (i, handles)
        del dec


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_graph_replay_equals_eager_and_reference(tiny, dtype):
    _, model = tiny
    model = model.to(device="cuda", dtype=dtype)
    p = _predictors(model.spec)
    ids = torch.randint(0, model.spec.vocab_size, (1, 7), device="cuda")
    eager = FastDecoder(model, p, MLP_D, HEAD_D, batch=1, max_len=32, use_graph=False)
    graph = FastDecoder(model, p, MLP_D, HEAD_D, batch=1, max_len=32, use_graph=True)
    a, b = eager.generate(ids, 12), graph.generate(ids, 12)
    assert graph._graph is not None and (a.tokens == b.tokens).all()
    assert len(b.step_ms) == 11 and all(t > 0 for t in b.step_ms)
    b2 = graph.generate(ids, 12)  # the captured graph is reused across generations
    assert (b2.tokens == b.tokens).all()
    if dtype == torch.float32:
        errs, _ = _compare(model, FastDecoder(model, p, MLP_D, HEAD_D, batch=1, max_len=32), PredictorPolicy(
            p, MLP_D, HEAD_D), "selected", B=1, steps=4)
        assert max(errs) < 1e-3, errs


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_dense_graph_batch16_matches_model(tiny):
    _, model = tiny
    model = model.to(device="cuda", dtype=torch.float32)
    dec = FastDecoder(model, None, batch=16, max_len=24)
    errs, _ = _compare(model, dec, None, "all", B=16, steps=4)
    assert max(errs) < 1e-3, errs


def _gpu_pair(tiny, ref_attrs: dict, dec_attrs: dict, md=MLP_D, hd=HEAD_D):
    """Two graphed fp32 decoders on the GPU over the same model and predictors, attributes set before capture, and a
    prompt."""
    _, model = tiny
    model = model.to(device="cuda", dtype=torch.float32)
    p = _predictors(model.spec)
    pair = [FastDecoder(model, p, md, hd, batch=1, max_len=32) for _ in range(2)]
    for dec, attrs in zip(pair, (ref_attrs, dec_attrs)):
        for name, value in attrs.items():
            setattr(dec, name, value)
    return (*pair, torch.randint(0, model.spec.vocab_size, (1, 7), device="cuda"))


def _assert_same_generation(ref, dec, ids):
    """Same greedy tokens over 10 graphed steps, and the next step's logits within TOL."""
    a, b = ref.generate(ids, 10), dec.generate(ids, 10)
    assert (a.tokens == b.tokens).all()
    tok = a.tokens[:, -1]
    torch.testing.assert_close(dec.decode_step(tok), ref.decode_step(tok), rtol=TOL, atol=TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("fork_at", ["qkv", "attn", "oproj"])
def test_side_stream_fork_points_equal(tiny, fork_at):
    """fork_at moves where the side stream's prediction of layer l+1 starts within layer l; the graphed step's
    tokens and logits are those of the fork at the layer's start (fp32)."""
    ref, dec, ids = _gpu_pair(tiny, {"fork_at": "start"}, {"fork_at": fork_at})
    assert ref._side is not None
    _assert_same_generation(ref, dec, ids)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("B", [1, 4])
def test_split_first_prediction_equal(tiny, B):
    """split_first_prediction (the default): layer 0's neurons are chosen on a stream of their own while its heads
    are chosen, gathered and attended on the main stream; the graphed step's tokens and logits are those of the
    inline prediction (fp32), and match the reference policy per token at B = 1."""
    md, hd = [0.5, 1.0, 0.25], [0.5, 0.5, 1.0]  # layer 0 runs both predictors
    _, model = tiny
    model = model.to(device="cuda", dtype=torch.float32)
    p = _predictors(model.spec)
    ref, dec = (FastDecoder(model, p, md, hd, batch=B, max_len=32) for _ in range(2))
    ref.split_first_prediction = False
    assert dec._split0() and not ref._split0()
    # its neuron half's embedding, and a first factor of its own where both predictors are factored (not products)
    both = all(dec._pred[0][kind][0] is not None for kind in ("head", "mlp"))
    assert [k["side"] for k in dec.kernels_per_layer()][0] == [k["side"] for k in ref.kernels_per_layer()][0] + 1 + both
    _assert_same_generation(ref, dec, torch.randint(0, model.spec.vocab_size, (B, 7), device="cuda"))
    if B == 1:
        fresh = FastDecoder(model, p, md, hd, batch=1, max_len=32)
        errs, gap = _compare(model, fresh, PredictorPolicy(p, md, hd), "selected", B=1, steps=4)
        assert max(errs) < 1e-3 and gap > 1e-3, (errs, gap)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("fork_at", ["qkv", "attn"])
def test_deferred_mlp_finish_equal(tiny, fork_at):
    """defer_mlp_finish: a layer's MLP block leaves its sums and the next layer's q/k/v gather finishes them (and
    writes the residual stream); the graphed step's tokens and logits are those of the finished blocks (fp32), and
    both workspaces are clear after a step."""
    ref, dec, ids = _gpu_pair(tiny, {"fork_at": fork_at, "defer_mlp_finish": False},
                              {"fork_at": fork_at, "defer_mlp_finish": True})  # fmt: skip
    assert any(dec._deferred()) and not any(ref._deferred()) and dec.describe()["defer_mlp_finish"]
    _assert_same_generation(ref, dec, ids)
    torch.cuda.synchronize()
    assert not any(ws["acc"].any() or ws["cnt"].any() for ws in dec._mlp_ws)


def test_deferred_mlp_finish_where_it_applies(tiny):
    """On by default where it applies; never where x_{l+1} is read before layer l+1's gather (the side stream
    forking at the layer's start), nor without a side stream, nor for the last layer; off when switched off."""
    model = tiny[1].to(DEV)
    dec = FastDecoder(model, _predictors(model.spec), MLP_D, HEAD_D, batch=1, max_len=12, use_graph=False)
    assert dec.defer_mlp_finish
    got = dec._deferred()
    assert not got[-1]
    if dec._side is None:  # CPU: no side stream, nothing deferred
        assert not any(got)
    else:
        dec.fork_at = "start"
        assert not any(dec._deferred())
    dec.fork_at, dec.defer_mlp_finish = "attn", False
    assert not any(dec._deferred())


O_MLP_D, O_HEAD_D = [0.5, 0.25, 0.5], [0.5, 0.5, 1.0]  # o_proj deferred in layers 0 and 1, not in 2 (dense heads)


def _attr_on_and_off(model, p, md, hd, attr, B, max_len=12, steps=3, seed=11):
    """Two Triton decoders differing only in attribute ``attr`` (set before the first step: on, off), ``steps``
    decode steps each from the same prompt: the logits agree (fp32); returns (on, off)."""
    ids = torch.randint(0, model.spec.vocab_size, (B, 5), generator=torch.Generator().manual_seed(seed)).to(DEV)
    outs, decs = [], []
    for on in (True, False):
        dec = FastDecoder(model, p, md, hd, batch=B, max_len=max_len, backend="triton")
        setattr(dec, attr, on)
        tok = dec.prefill(ids).argmax(-1)
        outs.append([dec.decode_step(tok).clone() for _ in range(steps)])
        decs.append(dec)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)
    return decs


@pytest.mark.parametrize("B", [1, 2])
def test_deferred_oproj_finish_equal(tiny, B, monkeypatch):
    """defer_oproj_finish: o_proj adds its part into fp32 sums and the fused MLP block makes the residual after
    attention from them (and writes it); same logits as the finished o_projs over three steps (fp32), and each
    unfinished o_proj clears the sums of the one before it (so only the last one's are left after a step). B = 2 on
    the FMA paths by the knob kernels._checks.FMA_MAX_BATCH (by default B = 2 runs as B > 2)."""
    monkeypatch.setattr(KC, "FMA_MAX_BATCH", B)
    model = tiny[1].to(DEV)
    dec, ref = _attr_on_and_off(model, _predictors(model.spec), O_MLP_D, O_HEAD_D, "defer_oproj_finish", B)
    assert dec._deferred_o() == [True, True, False] and not any(ref._deferred_o())
    assert dec.describe()["defer_oproj_finish"] and not ref.describe()["defer_oproj_finish"]
    assert not dec._o_ws[0].any() and dec._o_ws[1].any() and not dec._o_ws[2].any()


@pytest.mark.parametrize("B", [1, 2])
def test_fused_oproj_mlp_equal(tiny, B, monkeypatch):
    """fuse_oproj_mlp: where the o_proj leaves its sums for the fused MLP block, both run as one launch
    (kernels.oproj_mlp); same logits as the two launches over three steps (fp32), one launch fewer in those layers,
    and the unfinished o_projs still clear each other's sums."""
    monkeypatch.setattr(KC, "FMA_MAX_BATCH", B)
    model = tiny[1].to(DEV)
    dec, ref = _attr_on_and_off(model, _predictors(model.spec), O_MLP_D, O_HEAD_D, "fuse_oproj_mlp", B)
    assert dec._fused_tail() == [True, True, False] and not any(ref._fused_tail())
    assert dec.describe()["fuse_oproj_mlp"] and not ref.describe()["fuse_oproj_mlp"]
    on, off = dec.kernels_per_layer(), ref.kernels_per_layer()
    assert [a["main"] + 1 for a in on[:2]] == [b["main"] for b in off[:2]] and on[2] == off[2]
    assert not dec._o_ws[0].any() and dec._o_ws[1].any() and not dec._o_ws[2].any()


def test_deferred_oproj_finish_where_it_applies(tiny):
    """On by default where it applies: the o_proj sparse and the MLP block fused with its norm folded, or the
    o_proj a gather and the dense MLP's up gather with its norm folded (test_dense_oproj_deferred_into_up_gather),
    at B <= 2, with lookahead predictors (the inline neuron predictor reads the residual after attention), and at
    least two such layers (each clears the one before it)."""
    model = tiny[1].to(DEV)
    p = _predictors(model.spec)

    def deferred(md, hd, preds=p, B=1):
        dec = FastDecoder(model, preds, md, hd, batch=B, max_len=12, use_graph=False)
        on = dec._deferred_o()
        dec.defer_oproj_finish = False
        assert not any(dec._deferred_o())
        return on

    assert deferred(O_MLP_D, O_HEAD_D) == [True, True, False]
    # layer 0's dense up gather after its sparse o_proj and layer 2's block; not layer 1 (its heads all dense)
    assert deferred(MLP_D, HEAD_D) == [True, False, True]
    assert deferred([0.5, 0.5, 0.5], [1.0, 1.0, 0.5]) == [False] * 3  # only layer 2 qualifies: one is not enough
    assert deferred(O_MLP_D, O_HEAD_D, preds=_predictors(model.spec, lookahead=False)) == [False] * 3
    assert deferred(O_MLP_D, O_HEAD_D, B=3) == [False] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_deferred_finishes_together_equal(tiny):
    """Both deferrals at once (the MLP block making mid from the o_proj's sums and leaving its own for the next
    q/k/v gather): the graphed step's tokens and logits are those of the finished kernels (fp32)."""
    knobs = {"defer_mlp_finish": True, "defer_oproj_finish": True}
    ref, dec, ids = _gpu_pair(tiny, {k: False for k in knobs}, knobs, md=O_MLP_D, hd=[0.5, 0.5, 0.5])
    assert dec._deferred() == [True, True, False] and all(dec._deferred_o())
    _assert_same_generation(ref, dec, ids)


def test_fork_point_and_side_pdl_checked(tiny):
    model = tiny[1].to(DEV)
    dec = FastDecoder(model, _predictors(model.spec), MLP_D, HEAD_D, batch=1, max_len=12, backend="torch",
                      use_graph=False)
    dec.prefill(torch.zeros(1, 3, dtype=torch.long, device=DEV))
    tok = torch.zeros(1, dtype=torch.long, device=DEV)
    dec.fork_at = "mlp"
    with pytest.raises(ValueError, match="fork_at must be one of"):
        dec.decode_step(tok)
    dec.fork_at, dec.side_pdl = "attn", "some"
    with pytest.raises(ValueError, match="side_pdl must be one of"):
        dec.decode_step(tok)
    dec.side_pdl, dec.prewait_gathers = "off", "row"
    with pytest.raises(ValueError, match="prewait_gathers must be one of"):
        dec.decode_step(tok)
