"""One decoder-only LM for every supported architecture (OPT, Llama family), dense and sparse on one code path.

The blocks hold weights in dejavu's canonical layout (see ``adapters.py``). Sparsity is a swappable module,
``DecoderLM.sparsity`` (a :class:`dejavu.runtime.policy.SparsityPolicy`, or None for dense): at each block it
says which query heads and which MLP neurons each token uses, and the attention and MLP modules then gather and
compute only those rows. With no policy, or a selection of every row, the result equals the dense model.

KV-cache policy for heads a token skips (``kv_policy``):
  "all"      (default) K and V are computed for every KV head at every token, so the cache is always complete and a
             later token that selects a head sees the whole history. Costs the K/V projection bytes every step.
  "selected" K/V are computed only for the KV heads that the token's selected query heads need; positions whose K/V
             were skipped are masked out for later queries of that KV head (a hole in the cache). Cheaper, lossier.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.gather import gather_blocks_combine, gather_blocks_matvec
from ..runtime.selection import Selection
from .spec import ModelSpec

KV_POLICIES = ("all", "selected")


class Norm(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.kind, self.eps = spec.norm_kind, spec.norm_eps
        self.weight = nn.Parameter(torch.ones(spec.d_model))
        self.bias = nn.Parameter(torch.zeros(spec.d_model)) if self.kind == "layernorm" else None

    def forward(self, x):
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _param(*shape, bias=False):
    return nn.Parameter(torch.zeros(*shape) if bias else torch.empty(*shape).normal_(0, 0.02))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache(nn.Module):
    """Static KV cache (gpt-fast style): fixed [B, Hkv, S_max, hd] buffers, written in place."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # which (kv head, position) entries hold real K/V (only ever False under kv_policy="selected")
        self.register_buffer("valid", torch.ones(shape[:3], dtype=torch.bool, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        H, Hk, hd, d = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.d_model
        self.n_heads, self.n_kv_heads, self.head_dim, self.group = H, Hk, hd, spec.group_size
        self.wq, self.wk, self.wv = _param(H * hd, d), _param(Hk * hd, d), _param(Hk * hd, d)
        self.wo_t = _param(H * hd, d)  # o_proj transposed: one row block per query head
        self.bq = _param(H * hd, bias=True) if spec.attn_bias else None
        self.bk = _param(Hk * hd, bias=True) if spec.attn_bias else None
        self.bv = _param(Hk * hd, bias=True) if spec.attn_bias else None
        self.bo = _param(d, bias=True) if spec.out_bias else None
        self.rows_read = 0  # weight rows gathered by the sparse path (q + o), for accounting and tests

    def _kv(self, x, B, T):
        k = F.linear(x, self.wk, self.bk).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = F.linear(x, self.wv, self.bv).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v  # (B, Hkv, T, hd)

    def forward(self, x, rope, start: int, cache: KVCache | None, sel: Selection | None, kv_policy: str = "all"):
        """x (B, T, d) normalized input; rope = (cos, sin) each (B, T, hd) or None; start = position of x[:, 0]."""
        B, T, d = x.shape
        H, hd = self.n_heads, self.head_dim
        k, v = self._kv(x, B, T)  # (B, Hkv, T, hd)
        if sel is None:
            q = F.linear(x, self.wq, self.bq).view(B, T, H, hd)  # (B, T, H, hd)
        else:  # only the selected heads' rows of wq are read
            x2 = x.reshape(B * T, d)
            qs = gather_blocks_matvec(x2, self.wq.view(H, hd, d), sel.idx)  # (n, kh, hd)
            if self.bq is not None:
                qs = qs + self.bq.view(H, hd)[sel.idx]
            q = x.new_zeros(B * T, H, hd)
            q.scatter_(1, sel.idx[..., None].expand(-1, -1, hd), qs)
            q = q.view(B, T, H, hd)
        q = q.transpose(1, 2)  # (B, H, T, hd)
        if rope is not None:
            cos, sin = rope[0][:, None], rope[1][:, None]  # (B, 1, T, hd)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin

        kv_valid = self._kv_valid(sel, B, T, x.device) if kv_policy == "selected" else None
        if cache is not None:
            cache.k[:, :, start:start + T] = k
            cache.v[:, :, start:start + T] = v
            cache.valid[:, :, start:start + T] = True if kv_valid is None else kv_valid
            k, v = cache.k[:, :, :start + T], cache.v[:, :, :start + T]
            kv_valid = cache.valid[:, :, :start + T] if kv_policy == "selected" else None
        S = k.shape[2]
        k = k.repeat_interleave(self.group, dim=1)  # (B, H, S, hd)
        v = v.repeat_interleave(self.group, dim=1)
        qpos = torch.arange(start, start + T, device=x.device)[:, None]
        mask = torch.arange(S, device=x.device)[None, :] <= qpos  # (T, S) causal
        if kv_valid is not None:  # holes left by skipped K/V; a token always sees itself (keeps rows finite)
            hole = kv_valid.repeat_interleave(self.group, dim=1)[:, :, None, :]  # (B, H, 1, S)
            mask = (mask & hole) | (torch.arange(S, device=x.device)[None, :] == qpos)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        o = o.transpose(1, 2).reshape(B * T, H, hd)
        if sel is None:
            out = o.reshape(B * T, H * hd) @ self.wo_t
        else:  # only the selected heads' row blocks of o_proj^T are read
            os_ = torch.gather(o, 1, sel.idx[..., None].expand(-1, -1, hd))  # (n, kh, hd)
            if sel.valid is not None:
                os_ = os_ * sel.valid[..., None]
            out = gather_blocks_combine(os_, self.wo_t.view(H, hd, d), sel.idx)
            self.rows_read += 2 * hd * int(sel.total())
        if self.bo is not None:
            out = out + self.bo
        return out.view(B, T, d)

    def _kv_valid(self, sel: Selection | None, B, T, device):
        """(B, Hkv, T) bool: the KV heads each token's selected query heads need."""
        if sel is None:
            return torch.ones(B, self.n_kv_heads, T, dtype=torch.bool, device=device)
        need = torch.zeros(B * T, self.n_kv_heads, dtype=torch.bool, device=device)
        groups = sel.idx // self.group
        src = torch.ones_like(groups, dtype=torch.bool) if sel.valid is None else sel.valid
        need.scatter_(1, groups, src)
        return need.view(B, T, self.n_kv_heads).transpose(1, 2)

    def head_output_norms(self, x, rope) -> torch.Tensor:
        """Norm of each query head's contribution to the block output, (B, T, H): the oracle's head importance."""
        B, T, d = x.shape
        H, hd = self.n_heads, self.head_dim
        q = F.linear(x, self.wq, self.bq).view(B, T, H, hd).transpose(1, 2)
        k, v = self._kv(x, B, T)
        if rope is not None:
            cos, sin = rope[0][:, None], rope[1][:, None]
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(self.group, 1), v.repeat_interleave(self.group, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # (B, T, H, hd)
        contrib = torch.einsum("bthr,hrd->bthd", o, self.wo_t.view(H, hd, d))
        return contrib.norm(dim=-1)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        N, d = spec.ffn_dim, spec.d_model
        self.kind, self.ffn_dim = spec.mlp_kind, N
        self.w1 = _param(N, d)  # fc1 or gate
        self.w3 = _param(N, d) if self.kind == "swiglu" else None  # up
        self.w2t = _param(N, d)  # fc2/down transposed: one row per neuron
        self.b1 = _param(N, bias=True) if spec.mlp_bias else None
        self.b2 = _param(d, bias=True) if spec.mlp_bias else None
        self.rows_read = 0

    def activation(self, x) -> torch.Tensor:
        """The dense intermediate activation (ReLU(fc1 x) or silu(gate x) * up x), (..., N)."""
        if self.kind == "relu":
            return F.relu(F.linear(x, self.w1, self.b1))
        return F.silu(F.linear(x, self.w1)) * F.linear(x, self.w3)

    def forward(self, x, sel: Selection | None = None):
        if sel is None:
            out = self.activation(x) @ self.w2t
        else:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            N, d = self.w1.shape
            a = gather_blocks_matvec(x2, self.w1.view(N, 1, d), sel.idx)[..., 0]  # (n, k)
            if self.kind == "relu":
                if self.b1 is not None:
                    a = a + self.b1[sel.idx]
                h = F.relu(a)
            else:
                h = F.silu(a) * gather_blocks_matvec(x2, self.w3.view(N, 1, d), sel.idx)[..., 0]
            if sel.valid is not None:
                h = h * sel.valid
            out = gather_blocks_combine(h[..., None], self.w2t.view(N, 1, d), sel.idx).view(shape)
            self.rows_read += (3 if self.kind == "swiglu" else 2) * int(sel.total())
        return out + self.b2 if self.b2 is not None else out


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = Norm(spec), Attention(spec), Norm(spec), MLP(spec)

    def forward(self, x, layer: int, rope, start, cache, policy, kv_policy):
        a_in = self.norm1(x)
        if policy is not None:
            a_in = policy.attn_input(layer, a_in)
        heads = policy.heads(layer, a_in, self.attn, rope) if policy is not None else None
        x = x + self.attn(a_in, rope, start, cache, heads, kv_policy)
        m_in = self.norm2(x)
        if policy is not None:
            m_in = policy.mlp_input(layer, m_in)
        neurons = policy.neurons(layer, m_in, self.mlp, x) if policy is not None else None
        return x + self.mlp(m_in, neurons)


_DEFAULT = object()


class DecoderLM(nn.Module):
    """Embeddings -> blocks -> final norm -> LM head. ``forward(ids) -> logits``."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model)
        self.pos_embed = nn.Embedding(spec.max_positions, spec.d_model) if spec.pos_kind == "learned" else None
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.n_layers))
        self.norm_f = Norm(spec)
        self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        if spec.pos_kind == "rope":
            hd = spec.head_dim
            inv = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            self.register_buffer("rope_inv_freq", inv, persistent=True)
        self.sparsity = None  # a SparsityPolicy module, or None for dense
        self.kv_policy = "all"

    @property
    def device(self):
        return self.embed.weight.device

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def rope(self, pos: torch.Tensor, dtype):
        if self.spec.pos_kind != "rope":
            return None
        freqs = pos[..., None].float() * self.rope_inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, ids: torch.Tensor, start: int = 0, cache: list[KVCache] | None = None, sparsity=_DEFAULT,
                kv_policy: str | None = None):
        """ids (B, T) -> logits (B, T, V). ``start``: position of ids[:, 0] (for decoding with a cache).

        ``sparsity``: override the model's policy for this call (None = dense).
        """
        policy = self.sparsity if sparsity is _DEFAULT else sparsity
        kv_policy = kv_policy or self.kv_policy
        if kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy must be one of {KV_POLICIES}, got {kv_policy!r}")
        B, T = ids.shape
        if start + T > self.spec.max_positions and self.pos_embed is not None:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's {self.spec.max_positions} positions")
        x, rope = self.embed_positions(ids, start)  # (B, T, d)
        if policy is not None:
            policy.begin(B, T)
        x = self.run_blocks(x, rope, start, cache, policy, kv_policy)
        return self.lm_head(self.norm_f(x))

    def run_blocks(self, x, rope, start=0, cache=None, policy=None, kv_policy="all", first: int = 0,
                   record: list | None = None):
        """Blocks ``first..L-1`` on the residual stream x (B, T, d). ``record`` collects each block's input."""
        for i in range(first, len(self.layers)):
            if record is not None:
                record.append(x)
            if policy is not None:
                policy.layer_input(i, x)
            x = self.layers[i](x, i, rope, start, None if cache is None else cache[i], policy, kv_policy)
        return x

    def embed_positions(self, ids: torch.Tensor, start: int = 0):
        """ids (B, T) -> (residual stream entering block 0, rope or None)."""
        B, T = ids.shape
        pos = torch.arange(start, start + T, device=ids.device).expand(B, T)
        x = self.embed(ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(pos)
        return x, self.rope(pos, x.dtype)

    def generate(self, ids: torch.Tensor, max_new_tokens: int = 32, **kw):
        """Dense prefill + decode with this model's sparsity policy. -> token ids (B, T + new)."""
        from ..runtime.generate import generate

        return generate(self, ids, max_new_tokens, **kw).tokens

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        s = self.spec
        return [KVCache(batch, s.n_kv_heads, max_len, s.head_dim, self.dtype, self.device) for _ in range(s.n_layers)]

    def reset_counters(self):
        for blk in self.layers:
            blk.attn.rows_read = 0
            blk.mlp.rows_read = 0


def init_random_(model: DecoderLM, seed: int = 0, std: float = 0.02) -> DecoderLM:
    """Random weights (for speed benchmarks and tests): latency does not depend on the values."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm_f.weight")):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std / math.sqrt(max(1.0, p.shape[-1] / 64)))
    return model
