"""Which rows a token reads: the contract between a sparsity policy and the sparse modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Selection:
    """Per-token selected blocks (neurons of an MLP or query heads of an attention layer).

    idx   [n, k] long: block indices per token (n = batch * time, flattened in that order)
    valid [n, k] bool or None: False marks padding when tokens select different numbers of blocks (threshold mode)
    """

    idx: torch.Tensor
    valid: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return self.idx.shape[0]

    def counts(self) -> torch.Tensor:
        """Blocks read per token, [n]."""
        if self.valid is None:
            return torch.full((self.idx.shape[0],), self.idx.shape[1], device=self.idx.device)
        return self.valid.sum(-1)

    def total(self) -> torch.Tensor:
        return self.counts().sum()


def topk_selection(scores: torch.Tensor, k: int) -> Selection:
    """Fixed top-k per token (graph friendly). scores [n, G]."""
    k = max(1, min(int(k), scores.shape[-1]))
    return Selection(scores.topk(k, dim=-1, sorted=False).indices)


def threshold_selection(scores: torch.Tensor, threshold: float | torch.Tensor, min_k: int = 1) -> Selection:
    """Per-token variable size: every block whose score exceeds ``threshold`` (at least ``min_k``). scores [n, G]."""
    keep = (scores > threshold).sum(-1).clamp(min=min_k)  # (n,)
    kmax = int(keep.max())
    order = scores.topk(kmax, dim=-1, sorted=True).indices  # (n, kmax), best first
    valid = torch.arange(kmax, device=scores.device)[None, :] < keep[:, None]
    return Selection(torch.where(valid, order, torch.zeros_like(order)), valid)
