"""dejavu: contextual sparsity (Deja Vu, Liu et al., ICML 2023) for faster LLM decoding.

    from dejavu import load_model, sparsify, PredictorSet
    lm = load_model()                                  # embedded SmolLM2-135M, or a HF dir / hub id / .gguf
    model = sparsify(lm.model, PredictorSet.load("runs/demo"))
    model.generate(ids, max_new_tokens=64)             # sparse decode
"""

from __future__ import annotations

__version__ = "0.1.0"

from .models.load import LoadedModel, load_model  # noqa: E402
from .predictors.model import PredictorSet  # noqa: E402


def sparsify(model, predictors, mlp_density=None, head_density=None, mode=None, dense_layers=(), kv_policy=None):
    """Attach a Deja Vu sparsity policy to ``model`` (in place) and return it.

    By default the operating point saved with the predictors is used; ``mlp_density`` / ``head_density`` (a float
    or one value per layer, in (0, 1]) override it with fixed top-k. ``sparsify(model, None)`` makes it dense again.
    """
    from .operating_point import policy_from_operating_point
    from .runtime.policy import PredictorPolicy

    if predictors is None:
        model.sparsity = None
        return model
    predictors.check_model(model.spec)
    predictors.to(model.device)
    op = predictors.meta.get("operating_point")
    if mlp_density is None and head_density is None and op is not None and mode in (None, op["mode"]):
        policy = policy_from_operating_point(predictors, op)
        if dense_layers:
            for l in dense_layers:
                policy.mlp_density[l] = policy.head_density[l] = 1.0
    else:
        policy = PredictorPolicy(predictors, 1.0 if mlp_density is None else mlp_density,
                                 1.0 if head_density is None else head_density, dense_layers=dense_layers,
                                 mode=mode or "topk")
    model.sparsity = policy
    if kv_policy is not None:
        model.kv_policy = kv_policy
    elif op is not None:
        model.kv_policy = op.get("kv_policy", "all")
    return model


__all__ = ["load_model", "LoadedModel", "PredictorSet", "sparsify", "__version__"]
