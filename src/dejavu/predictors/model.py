"""Low-rank predictors (d -> r -> heads or neurons), one pair per layer, saved as one safetensors file + JSON.

Files (in a predictor directory):
  predictors.safetensors  all layers' weights; its header metadata repeats the JSON below (self-describing)
  predictors.json         model identity and shapes, ranks, label rules, calibration source, training metrics,
                          and (after ``dejavu calibrate``'s operating-point search) the chosen per-layer densities
Both are written to a temp file and renamed, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_path, write_json_atomic
from ..kernels.predictor_ops import predictor_bytes
from ..models.spec import ModelSpec

WEIGHTS, META = "predictors.safetensors", "predictors.json"
FORMAT_VERSION = 1


class PredictorFileError(ValueError):
    pass


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: ``w[n] ~ q[n] * scale[n]`` with ``scale[n] = max|w[n]| / 127`` (1 for a zero
    row). Returns ``(q, scale)``: int8 and fp32, contiguous, on w's device. Rows already of that form (``q * scale``)
    come back as the same q."""
    wf = w.detach().float()
    scale = wf.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class LowRank(nn.Module):
    """score = B(A(rmsnorm(x))) + b: a rank-r factorization of a d x out linear map on the normalized stream."""

    def __init__(self, d: int, r: int, out: int):
        super().__init__()
        self.a = nn.Linear(d, r, bias=False)
        self.b = nn.Linear(r, out, bias=True)

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.b(self.a(xf.to(self.a.weight.dtype))).float()


class PredictorSet(nn.Module):
    """Per-layer neuron and head predictors plus the metadata that ties them to one model."""

    def __init__(self, meta: dict):
        super().__init__()
        self.meta = meta
        d, L = meta["d_model"], meta["n_layers"]
        self.neuron = nn.ModuleList(LowRank(d, meta["mlp_rank"], meta["ffn_dim"]) for _ in range(L))
        self.head = nn.ModuleList(LowRank(d, meta["head_rank"], meta["n_heads"]) for _ in range(L))

    @classmethod
    def for_model(cls, spec: ModelSpec, mlp_rank: int, head_rank: int, input_scheme: str = "lookahead", **extra):
        meta = {"format_version": FORMAT_VERSION, "model": spec.identity(), "model_name": spec.name,
                "d_model": spec.d_model, "n_layers": spec.n_layers, "n_heads": spec.n_heads,
                "ffn_dim": spec.ffn_dim, "mlp_rank": int(mlp_rank), "head_rank": int(head_rank),
                "input": input_scheme, "lookahead": input_scheme != "same", **extra}
        return cls(meta)

    @property
    def input_scheme(self) -> str:
        return self.meta.get("input", "lookahead" if self.meta.get("lookahead", True) else "same")

    def neuron_scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.neuron[layer](x)

    def head_scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.head[layer](x)

    @property
    def int8(self) -> bool:
        """Whether the factors hold int8 rows (``quantize_int8``): the GPU decode then reads them as int8."""
        return self.meta.get("weights") == "int8"

    def quantize_int8(self) -> "PredictorSet":
        """Round every factor's rows to int8 in place (``quantize_rows``) and mark the set (``meta["weights"]``).

        The weights keep their dtype and hold ``q * scale``, so quality runs score with the values the GPU decode
        reads: ``FastDecoder`` stores a marked set's factors as int8 rows and fp32 scales (half the predictor bytes of
        fp16) and its GEMVs multiply the scale in. Saved and loaded with the mark; idempotent. Returns self."""
        with torch.no_grad():
            for mod in (*self.neuron, *self.head):
                for lin in (mod.a, mod.b):
                    q, s = quantize_rows(lin.weight)
                    lin.weight.copy_((q.float() * s[:, None]).to(lin.weight.dtype))
        self.meta["weights"] = "int8"
        return self

    def bytes_per_token(self, dtype=torch.float16, mlp=True, heads=True) -> int:
        """Weight bytes the predictors read per decode step (all layers), at ``dtype`` (int8 factors if marked), as the
        batch-1 decode reads them: a predictor that reads fewer bytes as its factors' product (a head predictor,
        ``kernels.runs_as_product``) counted as that product (``FastDecoder`` keeps factors above
        ``fast_decode.PRODUCTS_MAX_BATCH``)."""
        m, n = self.meta, 0
        for on, r, out in ((mlp, m["mlp_rank"], m["ffn_dim"]), (heads, m["head_rank"], m["n_heads"])):
            if on:
                n += m["n_layers"] * predictor_bytes(m["d_model"], r, out, dtype, int8=self.int8)
        return n

    def check_model(self, spec: ModelSpec):
        want, have = self.meta.get("model", {}), spec.identity()
        if want != have:
            diff = {k: (want.get(k), have[k]) for k in have if want.get(k) != have[k]}
            raise PredictorFileError(
                f"these predictors were made for another model ({self.meta.get('model_name')!r}); mismatched "
                f"fields (file, model): {diff}. Run `dejavu calibrate --model ...` for this model.")

    # ---- persistence ------------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike):
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(d / WEIGHTS) as tmp:
            save_file(state, str(tmp), metadata={"dejavu": json.dumps(self.meta)})
        write_json_atomic(d / META, self.meta)

    @classmethod
    def load(cls, directory: str | os.PathLike, spec: ModelSpec | None = None) -> "PredictorSet":
        d = Path(directory)
        if not (d / WEIGHTS).is_file() or not (d / META).is_file():
            raise PredictorFileError(f"{d} holds no predictors ({WEIGHTS} + {META}); make them with `dejavu calibrate`")
        try:
            meta = json.loads((d / META).read_text())
        except json.JSONDecodeError as e:
            raise PredictorFileError(f"{d / META} is corrupt ({e}); re-run `dejavu calibrate`") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise PredictorFileError(f"{d / META}: unsupported format_version {meta.get('format_version')!r}")
        try:
            state = load_file(str(d / WEIGHTS))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise PredictorFileError(f"{d / WEIGHTS} is truncated or corrupt ({e}); re-run `dejavu calibrate`") from None
        ps = cls(meta)
        if spec is not None:
            ps.check_model(spec)
        try:
            ps.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise PredictorFileError(f"{d / WEIGHTS} does not match {META}: {str(e)[:300]}") from None
        return ps.eval().requires_grad_(False)
