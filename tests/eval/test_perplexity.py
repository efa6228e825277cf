import math

import pytest
import torch

from dejavu.eval.perplexity import (c4_windows, perplexity, tokenize_text, window_nlls, window_token_ids,
                                    wikitext2_windows)

V = 11


def uniform(ids):
    return torch.zeros(*ids.shape, V)


def oracle(ids):
    """All mass on (x + 1) % V: perfect on the sequence 0, 1, 2, ..."""
    out = torch.full((*ids.shape, V), -1e4)
    out.scatter_(-1, ((ids + 1) % V)[..., None], 0.0)
    return out


class Recorder:
    def __init__(self, fn):
        self.fn, self.seen = fn, []

    def __call__(self, ids):
        self.seen.append(ids.clone())
        return self.fn(ids)


def test_windows_drop_and_keep_tail():
    ids = list(range(10))
    w = window_token_ids(ids, 4)
    assert [x.tolist() for x in w] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    w = window_token_ids(ids, 4, keep_tail=True)
    assert [x.tolist() for x in w] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(window_token_ids(ids, 3, keep_tail=True)) == 3  # 1-token tail predicts nothing: dropped
    assert len(window_token_ids(ids, 2, max_windows=2)) == 2
    assert window_token_ids(torch.arange(3), 4) == []
    assert all(x.dtype == torch.long for x in window_token_ids(ids, 5))
    with pytest.raises(ValueError):
        window_token_ids(ids, 1)


def test_uniform_ppl_is_vocab_size():
    wins = window_token_ids(torch.randint(0, V, (100,)), 16)
    r = perplexity({"u": uniform}, wins, progress=False)["u"]
    assert r["tokens"] == 6 * 15 and r["windows"] == 6
    assert r["ppl"] == pytest.approx(V, rel=1e-6)
    assert r["nll"] == pytest.approx(math.log(V), rel=1e-6)


def test_oracle_ppl_is_one():
    ids = torch.arange(200) % V
    r = perplexity(oracle, window_token_ids(ids, 32), progress=False)["model"]
    assert r["ppl"] == pytest.approx(1.0, abs=1e-6)


def test_known_per_token_loss():
    # oracle is right except when x + 1 wraps to 0 (we feed a sequence that never wraps on the first window)
    ids = torch.tensor([0, 1, 2, 3, 5, 6])  # 3 -> 5 is a miss: loss = 1e4 - log(...) ~ large
    r = window_nlls({"o": oracle}, [ids], progress=False)["o"]
    s, n = r[0]
    assert n == 5
    expected = -torch.log_softmax(oracle(ids[None])[0, 3], -1)[5].item()
    assert s == pytest.approx(expected, rel=1e-5)


def test_two_models_same_windows_and_batching():
    torch.manual_seed(0)
    table = torch.randn(V, V)

    def bigram(ids):
        return table[ids]

    ra, rb = Recorder(bigram), Recorder(uniform)
    ids = torch.randint(0, V, (103,))
    wins = window_token_ids(ids, 10, keep_tail=True)  # 10 full windows + a 3-token tail
    res = perplexity({"a": ra, "b": rb}, wins, batch_size=4, progress=False)
    assert len(ra.seen) == len(rb.seen) == 4  # 3 batches of 10-token windows (4+4+2) + tail alone
    for xa, xb in zip(ra.seen, rb.seen):
        assert torch.equal(xa, xb)
    assert res["a"]["tokens"] == res["b"]["tokens"] == 10 * 9 + 2
    assert res["b"]["ppl"] == pytest.approx(V, rel=1e-6)
    # hand computation of the bigram ppl
    tot, n = 0.0, 0
    for w in wins:
        lp = torch.log_softmax(table[w[:-1]].double(), -1)
        tot -= lp.gather(-1, w[1:, None]).sum().item()
        n += len(w) - 1
    assert res["a"]["ppl"] == pytest.approx(math.exp(tot / n), rel=1e-5)
    # batch size does not change results
    res1 = perplexity({"a": bigram}, wins, batch_size=1, progress=False)
    assert res1["a"]["nll_sum"] == pytest.approx(res["a"]["nll_sum"], rel=1e-6)


def test_bad_logits_shape():
    with pytest.raises(ValueError, match="expected \\[B, T, V\\]"):
        perplexity({"bad": lambda ids: torch.zeros(ids.shape[0], V)}, [torch.arange(5)], progress=False)
    with pytest.raises(ValueError):
        perplexity({"u": uniform}, [], progress=False)


def test_c4_windows_eos_separated(word_tok):
    docs = ["a b c", "d e", "f g h i"]
    wins = c4_windows(word_tok, docs, window=4)
    stream = word_tok.encode("a b c") + [2] + word_tok.encode("d e") + [2] + word_tok.encode("f g h i") + [2]
    assert len(stream) == 12
    assert [w.tolist() for w in wins] == [stream[0:4], stream[4:8], stream[8:12]]
    assert len(c4_windows(word_tok, docs, window=5)) == 2
    assert len(c4_windows(word_tok, docs, window=5, keep_tail=True)) == 3
    assert len(c4_windows(word_tok, docs, window=2, max_windows=2)) == 2


@pytest.mark.real
def test_real_wikitext_token_count(smollm2_tokenizer, data_dir):
    from dejavu.eval.data import load_wikitext2_test

    ids = tokenize_text(smollm2_tokenizer, load_wikitext2_test(data_dir))
    assert len(ids) == 301_948
    assert ids[0] != smollm2_tokenizer.bos_token_id  # no BOS added
    assert len(wikitext2_windows(smollm2_tokenizer, 1024, data_dir)) == 294


@pytest.mark.real
def test_real_matches_hf_loss(smollm2_model, smollm2_tokenizer, data_dir):
    """Our per-window NLL equals HF's own shifted cross-entropy (labels=input_ids) on the same windows."""
    from dejavu.eval.perplexity import hf_logits_fn

    wins = wikitext2_windows(smollm2_tokenizer, 128, data_dir, max_windows=3)
    ours = perplexity({"dense": hf_logits_fn(smollm2_model), "again": hf_logits_fn(smollm2_model)}, wins,
                      batch_size=2, progress=False)
    with torch.inference_mode():
        losses = [smollm2_model(w[None], labels=w[None]).loss.item() for w in wins]
    ref = math.exp(sum(losses) / len(losses))
    assert ours["dense"]["ppl"] == pytest.approx(ref, rel=1e-4)
    assert ours["again"]["ppl"] == pytest.approx(ours["dense"]["ppl"], rel=1e-5)
    assert 5 < ours["dense"]["ppl"] < 200
