"""The sparse reference path: density 1 == dense, fewer rows read, and equal to a dense computation restricted to
the same rows."""

import copy

import pytest
import torch

from dejavu.runtime.policy import OraclePolicy, SparsityPolicy
from dejavu.runtime.selection import Selection


class FixedPolicy(SparsityPolicy):
    """Every token of every layer uses the given heads / neurons."""

    def __init__(self, heads=None, neurons=None):
        super().__init__()
        self.h, self.n = heads, neurons

    def heads(self, layer, attn_in, attn, rope):
        if self.h is None:
            return None
        n = attn_in.shape[0] * attn_in.shape[1]
        return Selection(torch.tensor(self.h).expand(n, -1).contiguous())

    def neurons(self, layer, mlp_in, mlp, resid):
        if self.n is None:
            return None
        n = mlp_in.shape[0] * mlp_in.shape[1]
        return Selection(torch.tensor(self.n).expand(n, -1).contiguous())


def test_full_selection_equals_dense(tiny):
    _, model = tiny
    s = model.spec
    ids = torch.randint(0, s.vocab_size, (2, 9))
    pol = FixedPolicy(heads=list(range(s.n_heads)), neurons=list(range(s.ffn_dim)))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, sparsity=pol), model(ids, sparsity=None), atol=1e-5, rtol=1e-5)
        oracle = OraclePolicy(s.n_layers, s.n_heads, s.ffn_dim, mlp_density=1.0, head_density=1.0)
        torch.testing.assert_close(model(ids, sparsity=oracle), model(ids, sparsity=None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_policy", ["all", "selected"])
def test_sparse_equals_dense_restricted_to_same_rows(tiny, kv_policy):
    """Zeroing the weights of unselected heads/neurons in a dense copy gives the same logits as gathering."""
    _, model = tiny
    s = model.spec
    heads = [0, s.group_size] if kv_policy == "all" else [0, 1]  # 'selected': heads of KV group 0 only
    neurons = list(range(0, s.ffn_dim, 3))
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for blk in ref.layers:
            keep_n = torch.zeros(s.ffn_dim, dtype=torch.bool)
            keep_n[neurons] = True
            for w in (blk.mlp.w1, blk.mlp.w2t, blk.mlp.w3):
                if w is not None:
                    w[~keep_n] = 0
            keep_h = torch.zeros(s.n_heads, dtype=torch.bool)
            keep_h[heads] = True
            rows = keep_h.repeat_interleave(s.head_dim)
            blk.attn.wq[~rows] = 0
            blk.attn.wo_t[~rows] = 0
            if blk.attn.bq is not None:
                blk.attn.bq[~rows] = 0
    ids = torch.randint(0, s.vocab_size, (2, 7))
    model.reset_counters()
    with torch.no_grad():
        out = model(ids, sparsity=FixedPolicy(heads, neurons), kv_policy=kv_policy)
        want = ref(ids, sparsity=None)
    if kv_policy == "all":  # under "selected" the holes make the zeroed-weights model a different function
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    n_tok = ids.numel()
    mats = 3 if s.mlp_kind == "swiglu" else 2
    assert sum(b.mlp.rows_read for b in model.layers) == s.n_layers * n_tok * mats * len(neurons)
    assert sum(b.attn.rows_read for b in model.layers) == s.n_layers * n_tok * 2 * s.head_dim * len(heads)
    dense_rows = s.n_layers * n_tok * (mats * s.ffn_dim + 2 * s.n_heads * s.head_dim)
    assert sum(b.mlp.rows_read + b.attn.rows_read for b in model.layers) < 0.6 * dense_rows


def test_kv_selected_differs_only_through_cache_holes(tiny):
    """With every KV group needed by every token, 'selected' leaves no hole and equals 'all'."""
    _, model = tiny
    s = model.spec
    heads = list(range(0, s.n_heads, s.group_size))  # one query head per KV group
    ids = torch.randint(0, s.vocab_size, (1, 8))
    with torch.no_grad():
        a = model(ids, sparsity=FixedPolicy(heads=heads), kv_policy="all")
        b = model(ids, sparsity=FixedPolicy(heads=heads), kv_policy="selected")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_sparse_decode_with_cache_matches_full_sequence(tiny):
    _, model = tiny
    s = model.spec
    # the oracle's head scores look at the current call's tokens only, so heads use a fixed selection here
    class Pol(OraclePolicy):
        def heads(self, layer, attn_in, attn, rope):
            return FixedPolicy(heads=[1, s.n_heads - 1]).heads(layer, attn_in, attn, rope)

    pol = Pol(s.n_layers, s.n_heads, s.ffn_dim, mlp_density=0.5)
    ids = torch.randint(0, s.vocab_size, (2, 10))
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        full = model(ids, sparsity=pol)
        model(ids[:, :6], cache=cache, sparsity=pol)
        steps = torch.cat([model(ids[:, t:t + 1], start=t, cache=cache, sparsity=pol) for t in range(6, 10)], 1)
    torch.testing.assert_close(steps, full[:, 6:], atol=1e-5, rtol=1e-4)


def test_bad_density_is_a_clear_error(tiny):
    _, model = tiny
    s = model.spec
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            OraclePolicy(s.n_layers, s.n_heads, s.ffn_dim, mlp_density=bad)
    with pytest.raises(ValueError, match="layers"):
        OraclePolicy(s.n_layers, s.n_heads, s.ffn_dim, mlp_density=[0.5] * (s.n_layers + 1))
