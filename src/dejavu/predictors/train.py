"""Train the per-layer predictors on recorded activations (the paper's Algorithm 1, learning side).

Labels, per token:
  MLP neuron   OPT (ReLU): active iff ReLU output > 0.  SwiGLU: in the top ``mlp_label_frac`` by |silu(gate)*up|.
  head         in the top ``head_label_frac`` of the block's heads by output norm.
Inputs (``input_scheme``; every scheme lets the predictor run before the rows it selects are needed):
  "lookahead"  layer l's heads and neurons are scored from layer l-1's block input (layer 0 from its own): a whole
               block ahead, fully off the critical path
  "half"       the paper's asynchronous scheme: layer l's neurons from layer l's block input (runs beside the
               attention), layer l's heads from the residual entering layer l-1's MLP (runs beside that MLP)
  "same"       heads from layer l's block input, neurons from the residual entering layer l's MLP (inline)
Loss: binary cross-entropy with per-class positive weights #neg/#pos (the paper's class-weighted BCE), so rare
positives are not drowned out. Metrics are measured on a held-out 10% of the recorded tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibrate import CalibrationSet
from ..models.spec import ModelSpec
from .model import PredictorSet


def labels_from(values: torch.Tensor, rule: str, frac: float) -> torch.Tensor:
    """values [n, G] (activation magnitudes or head norms) -> bool labels [n, G]."""
    if rule == "positive":
        return values > 0
    k = max(1, int(round(frac * values.shape[1])))
    top = values.float().topk(k, dim=1).indices
    return torch.zeros_like(values, dtype=torch.bool).scatter_(1, top, True)


INPUT_SCHEMES = ("lookahead", "half", "same")


def input_source(layer: int, kind: str, scheme: str) -> tuple[str, int]:
    """Which recorded stream (and of which layer) feeds the ``kind`` predictor of ``layer``."""
    if scheme == "lookahead":
        return "x_in", max(layer - 1, 0)
    if scheme == "half":
        return ("x_in", layer) if kind == "mlp" else (("mlp_in", layer - 1) if layer > 0 else ("x_in", 0))
    if scheme == "same":
        return ("x_in", layer) if kind == "heads" else ("mlp_in", layer)
    raise ValueError(f"input_scheme must be one of {INPUT_SCHEMES}, got {scheme!r}")


def predictor_input(cal: CalibrationSet, layer: int, kind: str, scheme: str) -> torch.Tensor:
    return cal.get(*input_source(layer, kind, scheme))


@torch.no_grad()
def selection_metrics(logits: torch.Tensor, labels: torch.Tensor, values: torch.Tensor | None = None) -> dict:
    """Recall, precision, true and predicted density (at logit > 0), and recall@k against the oracle top-k
    (k = each token's number of true labels, so this is the fixed-k deployment's coverage)."""
    pred = logits > 0
    tp = (pred & labels).sum().item()
    out = {"recall": tp / max(1, labels.sum().item()), "precision": tp / max(1, pred.sum().item()),
           "true_density": labels.float().mean().item(), "pred_density": pred.float().mean().item()}
    k = max(1, int(round(labels.float().sum(1).mean().item())))
    truth = (values if values is not None else labels.float()).float().topk(k, dim=1).indices
    guess = logits.topk(k, dim=1).indices
    hit = torch.zeros_like(labels).scatter_(1, truth, True).gather(1, guess)
    out["recall_at_k"] = hit.float().mean().item()
    return out


@torch.enable_grad()
def _fit(module, x, y, epochs, lr, batch, gen):
    n = x.shape[0]
    pos = y.float().mean(0).clamp(1e-4, 1 - 1e-4)
    pos_weight = ((1 - pos) / pos).clamp(max=50.0)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    module.train().requires_grad_(True)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch):
            i = perm[s:s + batch]
            loss = F.binary_cross_entropy_with_logits(module(x[i]), y[i].float(), pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    module.eval()


def train_predictors(cal: CalibrationSet, spec: ModelSpec, mlp_rank: int | None = None, head_rank: int | None = None,
                     input_scheme: str = "lookahead", mlp_label_frac: float = 0.5, head_label_frac: float = 0.5,
                     epochs: int = 12, lr: float = 3e-3, batch: int = 512, seed: int = 0, progress: bool = True) -> PredictorSet:
    """Fit every layer's neuron and head predictor; metrics per layer land in ``meta['metrics']``."""
    if cal.manifest["model"] != spec.identity():
        raise ValueError("this calibration was recorded on another model; calibrate this one first")
    for name, f in (("mlp_label_frac", mlp_label_frac), ("head_label_frac", head_label_frac)):
        if not 0 < f <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {f}")
    input_source(0, "mlp", input_scheme)  # validates the scheme name
    mlp_rank = mlp_rank or max(32, spec.d_model // 8)
    head_rank = head_rank or max(16, spec.d_model // 32)
    mlp_rule = "positive" if spec.mlp_kind == "relu" else "top_frac"
    ps = PredictorSet.for_model(
        spec, mlp_rank, head_rank, input_scheme,
        labels={"mlp": {"rule": mlp_rule, "frac": None if mlp_rule == "positive" else mlp_label_frac},
                "heads": {"rule": "top_frac", "frac": head_label_frac}},
        calibration={"source": cal.manifest["source"], "tokens": cal.n_tokens, "settings": cal.manifest["settings"]},
        training={"epochs": epochs, "lr": lr, "batch": batch, "seed": seed, "loss": "class-weighted BCE"})
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = cal.n_tokens
    perm = torch.randperm(n, generator=gen)
    n_val = max(1, n // 10)
    val, tr = perm[:n_val], perm[n_val:]
    metrics = {"mlp": [], "heads": []}
    for layer in tqdm(range(spec.n_layers), desc="training predictors", unit="layer", disable=not progress):
        for kind, module, key, rule, frac in (("mlp", ps.neuron[layer], "act", mlp_rule, mlp_label_frac),
                                              ("heads", ps.head[layer], "heads", "top_frac", head_label_frac)):
            x = predictor_input(cal, layer, kind, input_scheme).float()
            values = cal.get(key, layer)
            y = labels_from(values, rule, frac)
            _fit(module, x[tr], y[tr], epochs, lr, batch, gen)
            with torch.no_grad():
                m = selection_metrics(module(x[val]), y[val], values[val])
            metrics[kind].append({k: round(v, 4) for k, v in m.items()})
    ps.meta["metrics"] = metrics
    return ps.requires_grad_(False)
