import pytest
import torch

from dejavu.models.adapters import UnsupportedModelError, adapter_for


def test_dense_matches_hf(tiny):
    hf, model = tiny
    ids = torch.randint(0, model.spec.vocab_size, (2, 17))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_cached_decode_matches_full(tiny):
    _, model = tiny
    ids = torch.randint(0, model.spec.vocab_size, (2, 12))
    cache = model.new_cache(2, 32)
    with torch.no_grad():
        full = model(ids)
        pre = model(ids[:, :8], cache=cache)
        steps = [model(ids[:, t:t + 1], start=t, cache=cache) for t in range(8, 12)]
    torch.testing.assert_close(pre, full[:, :8], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 8:], atol=1e-5, rtol=1e-4)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config
    with pytest.raises(UnsupportedModelError, match="supports: .*llama.*opt"):
        adapter_for(GPT2Config())
