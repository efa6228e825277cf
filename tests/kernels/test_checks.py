"""The shared plumbing: validation switches, import without Triton, sm_90 compilation."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kernel_helpers import DEVICE, make_gen, randn

from dejavu.kernels import _checks


def test_should_validate_respects_flag_and_graph_capture(monkeypatch):
    assert _checks.should_validate(True)
    assert not _checks.should_validate(False)
    monkeypatch.setattr(_checks, "capturing", lambda: True)
    assert not _checks.should_validate(True)


@pytest.mark.needs_kernels
def test_no_data_checks_while_capturing(monkeypatch):
    """Under (simulated) graph capture, duplicates are not looked for: no host sync."""
    pytest.importorskip("triton")
    from dejavu.kernels import gather_up

    monkeypatch.setattr(_checks, "capturing", lambda: True)
    g = make_gen("capture")
    x, w = randn(1, 16, gen=g), randn(10, 16, gen=g)
    idx = torch.tensor([3, 3], device=DEVICE)
    y = gather_up(x, w, idx, act="none")  # would raise "duplicated" outside capture
    assert torch.equal(y[:, 0], y[:, 1])


def test_use_pdl_switches(monkeypatch):
    """PDL on a Hopper device unless DEJAVU_PDL=0, inside pdl_suspended(), or for a kernel named in PDL_EXCLUDE;
    mode 1 (signal after the wait) unless the kernel is named in PDL_LATE (2) or PDL_MID (3)."""

    def compiled_kernel():  # stands in for a (not interpreted) Triton kernel
        pass

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_checks, "_cc_major", lambda index: 9)
    monkeypatch.delenv(_checks.PDL_ENV, raising=False)
    assert _checks.use_pdl(compiled_kernel, cuda)
    assert not _checks.use_pdl(compiled_kernel, torch.device("cpu"))
    with _checks.pdl_suspended():
        with _checks.pdl_suspended():
            assert not _checks.use_pdl(compiled_kernel, cuda)
        assert not _checks.use_pdl(compiled_kernel, cuda)  # nested: still suspended
    assert _checks.use_pdl(compiled_kernel, cuda) == 1
    monkeypatch.setattr(_checks, "PDL_LATE", {"compiled_kernel"})
    assert _checks.use_pdl(compiled_kernel, cuda) == 2
    monkeypatch.setattr(_checks, "PDL_MID", {"compiled_kernel"})
    assert _checks.use_pdl(compiled_kernel, cuda) == 3
    monkeypatch.setattr(_checks, "PDL_EXCLUDE", {"compiled_kernel"})  # no PDL wins over either
    assert not _checks.use_pdl(compiled_kernel, cuda)
    monkeypatch.setattr(_checks, "PDL_EXCLUDE", set())
    monkeypatch.setenv(_checks.PDL_ENV, "0")
    assert not _checks.use_pdl(compiled_kernel, cuda)
    monkeypatch.setattr(_checks, "_cc_major", lambda index: 8)  # before Hopper
    monkeypatch.delenv(_checks.PDL_ENV)
    assert not _checks.use_pdl(compiled_kernel, cuda)


@pytest.mark.needs_kernels
def test_noop_launch_touches_nothing():
    """The kernel sweep's launch floor: the no-op kernel runs (here in the interpreter) and leaves its flag as it was;
    a bad program count is named."""
    pytest.importorskip("triton")
    flag = torch.full((1,), 7, dtype=torch.int32, device=DEVICE)
    _checks.noop_launch(flag, 3)
    assert flag.item() == 7
    with pytest.raises(ValueError, match="programs must be a positive int"):
        _checks.noop_launch(flag, 0)


def test_programs_per_sm():
    """The occupancy arithmetic of bench/kernel_resources.py (sm_90: 64K registers, 64 warps, 228 KB per SM)."""
    from dejavu.kernels.offline import programs_per_sm

    assert programs_per_sm(144, 8, 54272) == {"by_regs": 1, "by_warps": 8, "by_smem": 4, "programs": 1}
    assert programs_per_sm(128, 8, 54272)["programs"] == 2
    assert programs_per_sm(40, 4, 0) == {"by_regs": 12, "by_warps": 16, "by_smem": 32, "programs": 12}


def test_error_messages_name_the_fix():
    x = torch.randn(2, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"cast one side, e\.g\. x\.to\(torch\.float32\)"):
        _checks.check_tensor("op", "x", x, ndim=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="chunks of at most 16"):
        _checks.check_batch("op", 17)
    with pytest.raises(ValueError, match="torch.unique"):
        _checks.check_index("op", "idx", torch.tensor([1, 1]), n=4, device=x.device, validate=True)
    with pytest.raises(ValueError, match="between 1 and 4"):
        _checks.check_index("op", "idx", torch.tensor([], dtype=torch.int32), n=4, device=x.device, validate=True)
    _checks.check_index("op", "idx", torch.tensor([3, 0, 2], dtype=torch.int32), n=4, device=x.device, validate=True)


def test_cpu_tensors_without_interpreter_are_rejected(monkeypatch):
    """A non-interpreted kernel on CPU tensors must raise, not crash or return garbage."""
    monkeypatch.setattr(_checks, "is_interpreted", lambda kernel: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _checks.check_launch_device("op", None, torch.zeros(1))


def _run(code, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=240)  # fmt: skip


def test_import_without_triton():
    """The package, the refs and the torch-only ops work without Triton; launchers say why not."""
    r = _run("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        import dejavu.kernels as K
        assert not K.HAS_TRITON
        x, w, i = torch.randn(2, 8), torch.randn(10, 8), torch.tensor([1, 4])
        assert K.gather_up_ref(x, w, i).shape == (2, 2)
        assert K.topk_select_ref(torch.randn(2, 10), 3).shape == (3,)
        for call in (lambda: K.gather_up(x, w, i), lambda: K.gather_down(x[:, :2], w, i)):
            try:
                call()
            except RuntimeError as e:
                assert "Triton is not installed" in str(e), e
            else:
                raise AssertionError("no RuntimeError")
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


_COMPILE_SCRIPT = """
import torch
from dejavu.kernels import gather_mlp as G, decode_attention as A, fused_ops as FO, predictor_ops as P, mlp_block as MB
from dejavu.kernels import oproj_block as OB
from dejavu.kernels.offline import compile_for
from dejavu.kernels import _checks
_checks.FMA_MAX_BATCH = 2  # B = 2 on the FMA paths too (an A/B knob; the runtime's default serves only B = 1 there)

def loads(ptx):
    return "ld.global" in ptx or "cp.async" in ptx

def build(kernel, args, num_warps, num_stages, early=False, mode=1):
    args = dict(args, PDL=mode)  # the Hopper launch path: grid-dependency wait/launch_dependents compiled in
    k = compile_for(kernel, args, num_warps, num_stages, launch_pdl=True)
    ptx = k.asm["ptx"]
    assert "griddepcontrol.wait" in ptx, kernel.__name__
    wait = ptx.index("griddepcontrol.wait")
    assert early == loads(ptx[:wait]), kernel.__name__  # global loads before the wait: with PREWAIT only
    signal = ptx.find("griddepcontrol.launch_dependents")
    if mode == 2:  # use_pdl's modes: 2 signals nowhere (the programs' exit does)
        assert signal < 0, kernel.__name__
    else:  # 1 right after the wait, 3 after the kernel's own point (past loads of its main loop)
        assert signal > wait and loads(ptx[wait:signal]) == (mode == 3), (kernel.__name__, mode)
    if args.get("FENCE") and args.get("FINISH", True):  # the per-thread fence of the threadfence-reduction pattern
        assert "fence.acq_rel.gpu" in k.asm["ptx"], kernel.__name__
    return k

def mlp_args(dt, B, act, early, cfg):  # the MLP block's arguments (also the fused o_proj + MLP block's)
    return dict(x_ptr=dt, w1_ptr=dt, w3_ptr=dt, w2t_ptr=dt, idx_ptr=torch.int64,
                b1_ptr=torch.float32, b2_ptr=dt, res_ptr=dt, out_ptr=dt, acc_ptr=torch.float32, cnt_ptr=torch.int32,
                g_ptr=dt, rg_ptr=torch.float32, zero_ptr=torch.float32, xs_ptr=torch.float32, xb_ptr=dt, xr_ptr=dt,
                B=B, K=2048, D=5120, eps=1e-5, n_zero=5120, stride_xb=5120, stride_xd=1, stride_w1n=5120,
                stride_w3n=5120, stride_w2n=5120, stride_rb=5120, stride_ob=5120, stride_xr=5120, ACT=act, NORM=act,
                HAS_B1=act == 1, HAS_B2=act == 1, HAS_RES=True, DOT_FP32=dt == torch.float32, FENCE=True,
                FINISH=B != 1, ZERO=B <= 2, BLOCK_Z=64, X_SUM=B <= 2, HAS_XB=act == 1, PREWAIT=early, **cfg)

cpu = torch.device("cpu")
for dt in (torch.float16, torch.bfloat16, torch.float32):
    for B, act in ((1, 1), (2, 2), (16, 1), (16, 2)):
        cfg = G._rows_config(B, 2048, 5120, act == 2, cpu); nw = cfg.pop("num_warps"); cfg.pop("maxnreg", None)
        for norm in (0, act):  # act 1 (OPT) with a folded layernorm, act 2 (SwiGLU) with a folded rmsnorm
            build(G._gather_rows_kernel, dict(x_ptr=dt, w_ptr=dt, w2_ptr=dt, idx_ptr=torch.int32, bias_ptr=dt,
                  out_ptr=dt, g_ptr=dt, rg_ptr=torch.float32, xs_ptr=torch.float32, xb_ptr=dt, xr_ptr=dt, xo_ptr=dt,
                  xob_ptr=dt, B=B,
                  n_out=2048, D=5120, eps=1e-5, stride_xb=5120, stride_xd=1, stride_wn=5120, stride_w2n=5120,
                  stride_ob=2048, stride_xr=5120, ROWS_PER_IDX=1 if act == 2 else 128, ACT=act, NORM=norm,
                  HAS_BIAS=act == 1, DOT_FP32=dt == torch.float32, X_SUM=B <= 2 and norm != 0, HAS_XB=True,
                  X_OUT2=B <= 2 and norm != 0 and act == 1, HAS_XOB=B == 1,
                  PREWAIT=B <= 2 and norm != 0, **cfg), nw, cfg["NUM_STAGES"], early=B <= 2 and norm != 0)
    for i, (B, split, fn, acc) in enumerate(((1, None, G._down_config, False), (2, None, G._down_config, False),
                              (16, 4, G._down_config, False), (1, None, G._down_config_v1, False),
                              (16, 4, G._down_config_v1, False), (1, None, G._down_config, True))):
        cfg = fn(B, 2048, 5120, cpu, split)  # acc: the unfinished o_proj (atomics into fp32 sums, zeroing another)
        nw, s, rps, fused = cfg.pop("num_warps"), cfg.pop("splits"), cfg.pop("rows_per_split"), cfg.pop("fused")
        part = s > 1 and not acc
        build(G._gather_down_kernel, dict(h_ptr=dt, w_ptr=dt, idx_ptr=torch.int64, bias_ptr=dt, res_ptr=dt,
              out_ptr=torch.float32 if acc else dt, out2_ptr=dt, bias2_ptr=dt, part_ptr=torch.float32,
              cnt_ptr=torch.int32,
              zero_ptr=torch.float32, B=B, n_in=2048, D=5120, rows_per_split=rps, n_splits=s, n_zero=5120,
              stride_hb=2048, stride_hg=128, stride_hr=1, stride_wn=5120, stride_rb=5120, stride_ob=5120,
              stride_o2b=5120, ROWS_PER_IDX=128, HAS_BIAS=not acc, HAS_RES=not acc, OUT2=not acc,
              HAS_BIAS2=not acc and B == 1, WRITE_PARTIAL=part, FUSED_REDUCE=fused and part,
              FENCE=fused and part, ACCUMULATE=acc, ZERO=acc, BLOCK_Z=64, PREWAIT=acc or B == 16,
              BLOCK_S=1 if cfg["USE_DOT"] else 16, BLOCK_R=min(cfg["BLOCK_B"], 4),
              DOT_FP32=dt == torch.float32, **cfg), nw, cfg["NUM_STAGES"], early=acc or B == 16,
              mode=(1, 2, 3)[i % 3])  # the three PDL modes (use_pdl) over the configurations
    # the whole MLP block; OPT with a folded layernorm (B = 1: one loop, as the rule picks at these shapes, and two
    # loops, which read early), SwiGLU with a folded rmsnorm
    for B, act, one in ((1, 1, True), (1, 1, False), (2, 2, None), (16, 1, None)):
        MB.ONE_LOOP = one
        cfg = MB._mlp_config(B, 2048, 5120, act == 2, cpu); nw = cfg.pop("num_warps")
        early = B <= 2 and not cfg["ONE_LOOP"]
        build(MB._sparse_mlp_kernel, mlp_args(dt, B, act, early, cfg), nw, cfg["NUM_STAGES"], early=early,
              mode=3 if act == 1 else 1)  # 3: the runtime's, signal after the up phase
    MB.ONE_LOOP = None
    for ln in (True, False):
        build(FO._norm_kernel, dict(x_ptr=dt, w_ptr=dt, b_ptr=dt, y_ptr=dt, rb_ptr=dt, init_ptr=dt, D=5120, eps=1e-5,
              stride_x=5120, stride_y=5120, stride_i=5120, IS_LN=ln, HAS_W=True, HAS_B=ln, HAS_INIT=True,
              HAS_RB=True, ROUND_MID=True, BLOCK=8192), 8, 1)
    build(FO._qkv_post_kernel, dict(qkv_ptr=dt, cos_ptr=dt, sin_ptr=dt, q_out_ptr=dt, k_ptr=dt, v_ptr=dt,
          kvidx_ptr=torch.int64, pos_ptr=torch.int64, valid_ptr=torch.uint8, hidx_ptr=torch.int64, KQ=4, KKV=4,
          HD=128, H_KV=32, group=1, s_qb=1536, s_qh=128, s_cb=128, s_oqb=512, s_oqh=128, s_kb=32 * 256 * 128,
          s_kh=256 * 128, s_ks=128, s_vb=32 * 256 * 128, s_vh=256 * 128, s_vs=128, s_mb=32 * 256, s_mh=256,
          HAS_ROPE=True, WRITE_Q=True, HAS_VALID=True, BLOCK_H=128, BLOCK_KV=32, BLOCK_KQ=16), 1, 1)
    for pos in (1, 2):  # learned positions added; a RoPE table's row copied
        build(FO._embed_kernel, dict(tok_ptr=torch.int64, pos_ptr=torch.int64, wte_ptr=dt, wpe_ptr=dt, out_ptr=dt,
              pout_ptr=dt, V=50272, D=5120, DP=5120 if pos == 1 else 256, stride_te=5120, stride_pe=5120,
              stride_o=5120, stride_po=256, POS=pos, BLOCK=1024), 4, 1)
    # qkv: with the q/k/v finish fused
    for splits, qkv, s_max in ((1, False, 2048), (8, False, 2048), (1, True, 2048), (8, True, 2048), (4, True, 256),
                               (4, False, 256)):  # the last two: one tile a split, unpipelined
        cfg = A._attn_config(1, 4, s_max, 128, dt.itemsize, cpu, splits); nw = cfg.pop("num_warps")
        build(A._decode_attn_kernel, dict(q_ptr=dt, k_ptr=dt, v_ptr=dt, seq_lens_ptr=torch.int32,
              head_idx_ptr=torch.int64, out_ptr=dt, part_o_ptr=torch.float32, part_lse_ptr=torch.float32,
              valid_ptr=torch.uint8, kvidx_ptr=torch.int64, cos_ptr=dt, sin_ptr=dt, KH=4, KKV=2,
              NJ=4, H_KV=8, HD=128, group_size=4, qk_scale=0.1, stride_qb=1024, stride_qh=128, stride_kb=2048 * 128 * 8,
              stride_kh=2048 * 128, stride_ks=128, stride_vb=2048 * 128 * 8, stride_vh=2048 * 128, stride_vs=128,
              stride_ob=512, stride_oh=128, stride_mb=8 * 2048, stride_mh=2048, stride_cb=128, BLOCK_KV=16,
              BLOCK_KQ=16, HAS_VALID=splits > 1, FROM_QKV=qkv, HAS_ROPE=qkv and splits > 1, PREWAIT=qkv, **cfg), nw,
              cfg["NUM_STAGES"], early=qkv)
# the o_proj and the MLP block in one launch: persistent (OPT, one loop), ticketed (SwiGLU, B = 2, two loops); its
# wait is inline PTX (one thread polling with ld.acquire.gpu and nanosleep), which only a real compile checks
for dt, B, act, pers in ((torch.float16, 1, 1, True), (torch.bfloat16, 2, 2, False)):
    cfg = MB._mlp_config(B, 2048, 5120, act == 2, cpu); nw = cfg.pop("num_warps")
    k = build(OB._oproj_mlp_kernel, dict(mlp_args(dt, B, act, False, cfg), a_ptr=dt, wo_ptr=dt, hidx_ptr=torch.int64,
              sums_ptr=torch.float32, zo_ptr=torch.float32, tick_ptr=torch.int32, n_in=2560, rows_per_split=208,
              n_od=10, n_o=130, n_zo=5120, stride_ab=2560, stride_ag=128, stride_ar=1, stride_won=5120, HEAD_DIM=128,
              BLOCK_J=16, BLOCK_DO=512, BLOCK_ZO=64, ZERO_O=True, STAGES_O=3, SPIN=True, PERSISTENT=pers),
              nw, cfg["NUM_STAGES"], mode=3)  # fmt: skip
    assert "ld.acquire.gpu" in k.asm["ptx"] and "nanosleep" in k.asm["ptx"]
build(G._reduce_splits_kernel, dict(part_ptr=torch.float32, bias_ptr=torch.float16, res_ptr=torch.float16,
      out_ptr=torch.float16, out2_ptr=torch.float16, bias2_ptr=torch.float16, B=2, D=5120, splits=4, stride_rb=5120,
      stride_ob=5120, stride_o2b=5120, HAS_BIAS=True, HAS_RES=True, OUT2=True, HAS_BIAS2=True, BLOCK_D=256), 2, 1)
build(_checks._noop_kernel, dict(flag_ptr=torch.int32), 4, 1)
build(A._decode_attn_combine_kernel, dict(part_o_ptr=torch.float32, part_lse_ptr=torch.float32, out_ptr=torch.bfloat16,
      KH=4, HD=128, stride_ob=512, stride_oh=128, NUM_SPLITS=8, BLOCK_SPLITS=8, BLOCK_H=128), 4, 1)
# (a first factor; the neuron scores at B = 16 and B = 1, OPT-13B's 32 rows a program; a head predictor's product on
# x: norm, bias and batch max together)
for B, n, d, norm, bias, bmax, loop in ((1, 640, 5120, True, False, False, False),
                                        (16, 20480, 320, False, True, True, False),
                                        (1, 20480, 320, False, True, True, True), (3, 40, 5120, True, True, True, False)):
    cfg = P._gemv_config(B, n, d); nw = cfg.pop("num_warps")
    for wt in (torch.float16, torch.int8):  # int8: a predictor's int8 rows and their fp32 scales
        build(P._lowrank_gemv_kernel, dict(x_ptr=torch.float16, w_ptr=wt, scale_ptr=torch.float32,
              bias_ptr=torch.float16, out_ptr=torch.float16, hist_ptr=torch.int32, B=B, N=n, D=d, stride_xb=d,
              stride_wn=d, stride_ob=n, eps=1e-6, NORM=norm, SCALE=wt == torch.int8, HAS_BIAS=bias,
              BATCH_MAX=bmax, HIST=False, LOOP=loop, **cfg), nw, cfg["NUM_STAGES"])  # fmt: skip
build(P._topk_select_kernel, dict(s_ptr=torch.float16, out_ptr=torch.int64, B=1, N=40, k=20, stride_sb=40,
      copy_off=40, COPIES=3, BLOCK=64), 1, 1)
for dt in (torch.float16, torch.bfloat16):
    build(P._lowrank_gemv_kernel, dict(x_ptr=torch.float32, w_ptr=dt, scale_ptr=torch.float32, bias_ptr=dt,
          out_ptr=dt, hist_ptr=torch.int32, B=1, N=20480, D=320, stride_xb=640, stride_wn=320, stride_ob=20480,
          eps=1e-6, NORM=False, SCALE=False, HAS_BIAS=True,
          BATCH_MAX=True, HIST=True, BLOCK_B=1, BLOCK_N=16, BLOCK_D=512, NUM_STAGES=3, LOOP=False), 4, 3)
    build(P._radix_select_kernel, dict(s_ptr=dt, hist_ptr=torch.int32, cnt_ptr=torch.int32, out_ptr=torch.int64,
          N=20480, k=2048, copy_off=0, n_prog=20, COPIES=1, BINS=P.HIST_BINS, SUB=16, CHUNK=1024, SHARE=256), 4, 1)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile and run for real")
def test_kernels_compile_for_sm90():
    """Interpreter runs skip Triton's compiler; make sure the real sm_90 compile path works too.

    Compiles every kernel (TTIR -> PTX -> cubin with the bundled ptxas, no GPU needed) for the
    heuristic configurations of OPT-13B-sized layers, in a subprocess without TRITON_INTERPRET.
    """
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no offline compile API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=280)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr):
        pytest.skip("no ptxas bundled with this Triton")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-4000:]
