"""Choose per-layer MLP and head densities that skip the most weight bytes within a quality budget.

1. Sensitivity: on held-apart text, make one layer's MLP (or heads) sparse at each candidate density, everything
   else dense, and record the loss increase. Blocks before the probed layer are not re-run: their dense output is
   cached once.
2. Greedy order: repeatedly take the move (one layer one density level down) with the most bytes saved per unit of
   (single-layer) loss increase, until every layer is at its sparsest level.
3. Measure, not add: per-layer increases are far from additive (and single-layer probes are noisy), so binary
   search the longest prefix of that order whose *measured* loss, all chosen layers sparse at once, stays within
   ``log(1 + max_ppl_increase)``.

In threshold mode each (layer, level) gets a logit threshold: the (1 - level) quantile of the predictor's scores on
the held-out tokens, so that on average ``level`` of the blocks pass and each token keeps as many as its scores say.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .accounting import bytes_summary, layer_params_read, predictor_params
from .models.decoder import DecoderLM
from .predictors.model import PredictorSet
from .runtime.policy import PredictorPolicy

DEFAULT_MLP_LEVELS = (0.8, 0.65, 0.5, 0.4, 0.3, 0.2)


def default_head_levels(n_heads: int, steps: int = 4) -> tuple[float, ...]:
    ks = sorted({max(1, round(n_heads * f)) for f in (0.75, 0.5, 0.35, 0.25)[:steps]}, reverse=True)
    return tuple(k / n_heads for k in ks if k < n_heads)


def _loss(model, x0, rope, ids, policy, first=0, kv_policy="all") -> float:
    with torch.no_grad():
        if policy is not None:
            policy.begin(*ids.shape)
        x = model.run_blocks(x0, rope, policy=policy, first=first, kv_policy=kv_policy)
        logits = model.lm_head(model.norm_f(x))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).item()


@torch.no_grad()
def score_thresholds(model: DecoderLM, predictors: PredictorSet, ids: torch.Tensor, levels_mlp, levels_heads):
    """Per layer, the predictor-logit threshold that keeps ``level`` of blocks on average over ``ids``' tokens."""
    from .calibrate import Recorder
    from .predictors.train import input_source

    rec = Recorder(torch.arange(ids.numel(), device=ids.device))
    model(ids, sparsity=rec)
    out = {"mlp": [], "heads": []}
    for l in range(model.spec.n_layers):
        for kind, fn, levels in (("mlp", predictors.neuron_scores, levels_mlp), ("heads", predictors.head_scores, levels_heads)):
            key, src = input_source(l, kind, predictors.input_scheme)
            s = fn(l, rec.rec[f"{key}.{src}"].to(model.device, model.dtype)).flatten()
            if s.numel() > 1 << 24:
                s = s[torch.randperm(s.numel(), device=s.device)[: 1 << 24]]
            out[kind].append({lv: float(torch.quantile(s.float(), 1 - lv)) for lv in levels if lv < 1})
    return out


def _policy(predictors, mlp_d, head_d, mode, thresholds):
    if mode == "threshold":
        mt = [thresholds["mlp"][l].get(mlp_d[l]) for l in range(len(mlp_d))]
        ht = [thresholds["heads"][l].get(head_d[l]) for l in range(len(head_d))]
        return PredictorPolicy(predictors, mlp_d, head_d, mode="threshold", mlp_threshold=mt, head_threshold=ht)
    return PredictorPolicy(predictors, mlp_d, head_d)


def choose_operating_point(model: DecoderLM, predictors: PredictorSet, ids: torch.Tensor, max_ppl_increase: float = 0.01,
                           mode: str = "topk", mlp_levels: Sequence[float] = DEFAULT_MLP_LEVELS,
                           head_levels: Sequence[float] | None = None, dense_layers: Sequence[int] = (),
                           kv_policy: str = "all", progress: bool = True) -> dict:
    """ids (W, T): held-apart token windows. Returns the operating point (JSON-able)."""
    if not 0 < max_ppl_increase < 1:
        raise ValueError(f"max_ppl_increase must be a fraction in (0, 1) (0.01 = +1%), got {max_ppl_increase}")
    spec = model.spec
    L = spec.n_layers
    head_levels = tuple(head_levels) if head_levels is not None else default_head_levels(spec.n_heads)
    levels = {"mlp": (1.0, *sorted(mlp_levels, reverse=True)), "heads": (1.0, *sorted(head_levels, reverse=True))}
    dense_set = {l % L for l in dense_layers}
    thresholds = score_thresholds(model, predictors, ids, levels["mlp"], levels["heads"]) if mode == "threshold" else None

    x0, rope = model.embed_positions(ids)
    inputs: list[torch.Tensor] = []
    with torch.no_grad():
        model.run_blocks(x0, rope, record=inputs)
    base = _loss(model, x0, rope, ids, None)

    # 1. sensitivity of each (layer, kind, level) alone
    sens = {k: [[0.0] * len(levels[k]) for _ in range(L)] for k in levels}
    jobs = [(l, k, j) for l in range(L) if l not in dense_set for k in levels for j in range(1, len(levels[k]))]
    for l, kind, j in tqdm(jobs, desc="layer sensitivity", disable=not progress):
        md, hd = [1.0] * L, [1.0] * L
        (md if kind == "mlp" else hd)[l] = levels[kind][j]
        first = max(l - 1, 0)
        pol = _policy(predictors, md, hd, mode, thresholds)
        sens[kind][l][j] = _loss(model, inputs[first], rope, ids, pol, first, kv_policy) - base

    def params_at(l, mi, hi):
        return layer_params_read(spec, levels["mlp"][mi], levels["heads"][hi])

    # 2. greedy order: every move (one layer, one level down) ranked by bytes saved per predicted loss
    budget = math.log1p(max_ppl_increase)
    cum = {k: [[max(0.0, max(sens[k][l][: j + 1])) for j in range(len(levels[k]))] for l in range(L)] for k in levels}
    state = {"mlp": [0] * L, "heads": [0] * L}
    moves: list[tuple[int, str]] = []
    while True:
        best_move, best_ratio = None, -1.0
        for l in range(L):
            if l in dense_set:
                continue
            mi, hi = state["mlp"][l], state["heads"][l]
            for kind in levels:
                j = state[kind][l]
                if j + 1 >= len(levels[kind]):
                    continue
                cost = cum[kind][l][j + 1] - cum[kind][l][j]
                saved = params_at(l, mi, hi) - (params_at(l, mi + 1, hi) if kind == "mlp" else params_at(l, mi, hi + 1))
                ratio = saved / max(cost, 1e-6)
                if ratio > best_ratio:
                    best_move, best_ratio = (l, kind), ratio
        if best_move is None:
            break
        state[best_move[1]][best_move[0]] += 1
        moves.append(best_move)

    def densities(n_moves):
        st = {"mlp": [0] * L, "heads": [0] * L}
        for l, kind in moves[:n_moves]:
            st[kind][l] += 1
        return ([levels["mlp"][st["mlp"][l]] for l in range(L)], [levels["heads"][st["heads"][l]] for l in range(L)])

    # 3. measure, not add: binary search the longest prefix of that order whose measured loss fits the budget
    history = []
    best = ([1.0] * L, [1.0] * L, 0.0, 0.0, None)
    lo, hi_ = 0, len(moves)
    while lo < hi_:
        mid = (lo + hi_ + 1) // 2
        md, hd = densities(mid)
        pol = _policy(predictors, md, hd, mode, thresholds)
        measured = _loss(model, x0, rope, ids, pol, 0, kv_policy) - base
        skipped = bytes_summary(spec, md, hd)["block_bytes_skipped"]
        history.append({"moves": mid, "of": len(moves), "measured_nats": measured, "block_bytes_skipped": skipped})
        if measured <= budget:
            lo = mid
            best = (md, hd, skipped, measured, pol.achieved())
        else:
            hi_ = mid - 1
    md, hd, skipped, measured, achieved = best
    op = {
        "mode": mode, "kv_policy": kv_policy, "max_ppl_increase": max_ppl_increase,
        "mlp_density": md, "head_density": hd, "dense_layers": sorted(dense_set),
        "holdout_ppl_dense": math.exp(base), "holdout_ppl_sparse": math.exp(base + measured),
        "holdout_ppl_increase": math.expm1(measured), "holdout_tokens": int(ids.numel()),
        "achieved_density": achieved,
        "levels": levels, "sensitivity_nats": sens, "search": history,
        "bytes": bytes_summary(spec, md, hd, predictor_params=predictor_params(predictors.meta, md, hd)),
    }
    if mode == "threshold":
        op["mlp_threshold"] = [thresholds["mlp"][l].get(md[l]) for l in range(L)]
        op["head_threshold"] = [thresholds["heads"][l].get(hd[l]) for l in range(L)]
    return op


def policy_from_operating_point(predictors: PredictorSet, op: dict) -> PredictorPolicy:
    if op["mode"] == "threshold":
        return PredictorPolicy(predictors, op["mlp_density"], op["head_density"], mode="threshold",
                               mlp_threshold=op["mlp_threshold"], head_threshold=op["head_threshold"])
    return PredictorPolicy(predictors, op["mlp_density"], op["head_density"])
