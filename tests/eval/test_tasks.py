import math

import pytest
import torch

from dejavu.eval import tasks as T
from dejavu.eval.tasks import (TaskDoc, build_context, build_requests, cb_doc, choice_metrics, copa_doc,
                               encode_pair, evaluate_tasks, loglikelihoods, openbookqa_doc, parse_obqa_choices,
                               piqa_doc, rte_doc, sample_fewshot, score_task)

COPA = {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
        "choice2": "Water flowed from the spout.", "question": "effect", "label": 1, "idx": 0}
CB = {"premise": "It was raining.", "hypothesis": "the ground is wet", "label": "neutral", "idx": 1}
RTE = {"premise": "Dana died at 44.", "hypothesis": "Dana had an accident.", "label": "not_entailment", "idx": 0}
PIQA = {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin ",
        "label": 1}
OBQA = {"id": "1129", "question_stem": "There is most likely going to be fog around:",
        "choices": {"text": ["a marsh", "a tundra", "the plains", "a desert"], "label": ["A", "B", "C", "D"]},
        "answerKey": "A"}


# ------------------------------------------------------------------------------------------- templates
def test_copa_format():
    d = copa_doc(COPA)
    assert d.text == "The man turned on the faucet therefore"
    assert d.choices == (" the toilet filled with water.", " water flowed from the spout.")
    assert d.gold == 1
    reqs = build_requests("copa", [d])
    assert [(r.context, r.continuation) for r in reqs] == [
        ("The man turned on the faucet therefore", "  the toilet filled with water."),
        ("The man turned on the faucet therefore", "  water flowed from the spout.")]
    assert copa_doc({**COPA, "question": "cause"}).text == "The man turned on the faucet because"


def test_cb_format():
    d = cb_doc(CB)
    assert d.text == "It was raining.\nQuestion: the ground is wet. True, False, or Neither?\nAnswer:"
    assert d.choices == ("True", "False", "Neither")
    assert d.gold == 2
    assert cb_doc({**CB, "label": "entailment"}).gold == 0
    assert cb_doc({**CB, "label": "contradiction"}).gold == 1
    assert [r.continuation for r in build_requests("cb", [d])] == [" True", " False", " Neither"]


def test_rte_format():
    d = rte_doc(RTE)
    assert d.text == "Dana died at 44.\nQuestion: Dana had an accident. True or False?\nAnswer:"
    assert d.choices == ("True", "False")
    assert d.gold == 1
    assert rte_doc({**RTE, "label": "entailment"}).gold == 0  # entailment -> " True"
    with pytest.raises(ValueError, match="unknown label"):
        rte_doc({**RTE, "label": "maybe"})


def test_piqa_format():
    d = piqa_doc(PIQA)
    assert d.text == "Question: dresser\nAnswer:"
    assert d.choices == ("replace drawer with bobby pin ", "finish, woodgrain with  bobby pin ")
    assert d.gold == 1
    assert build_requests("piqa", [d])[1].continuation == " finish, woodgrain with  bobby pin "


def test_openbookqa_format():
    d = openbookqa_doc(OBQA)
    assert d.text == "There is most likely going to be fog around:"
    assert d.choices == ("a marsh", "a tundra", "the plains", "a desert") and d.gold == 0
    assert openbookqa_doc({**OBQA, "answerKey": "C"}).gold == 2


def test_parse_obqa_choices():
    assert parse_obqa_choices("(A) a marsh (B) a tundra (C) the plains (D) a desert") == (
        ["A", "B", "C", "D"], ["a marsh", "a tundra", "the plains", "a desert"])
    assert parse_obqa_choices("(A) x(y) (B) 3 (C) z") == (["A", "B", "C"], ["x(y)", "3", "z"])
    with pytest.raises(ValueError):
        parse_obqa_choices("A) x B) y")


def test_load_openbookqa_tsv(tmp_path):
    p = tmp_path / "test.tsv"
    p.write_text("ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n"
                 "1129\tFog around:\t(A) a marsh (B) a tundra\tFog around: (A) a marsh (B) a tundra\tB\n")
    (doc,) = T.load_openbookqa(p)
    assert doc == {"id": "1129", "question_stem": "Fog around:", "answerKey": "B",
                   "choices": {"text": ["a marsh", "a tundra"], "label": ["A", "B"]}}
    p.write_text("ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n1\tq\t(A) a\tq (A) a\n")
    with pytest.raises(ValueError, match="line 2: 4 columns"):
        T.load_openbookqa(p)


def test_fewshot_context_and_sampling():
    pool = [TaskDoc(f"q{i}", (" no", " yes"), i % 2) for i in range(6)]
    doc = TaskDoc("query", ("a", "b"), 0)
    assert build_context(doc, pool[:2]) == "q0  no\n\nq1  yes\n\nquery"
    s1 = sample_fewshot("t", 3, 2, pool, exclude_self=True, seed=1)
    assert s1 == sample_fewshot("t", 3, 2, pool, exclude_self=True, seed=1)  # deterministic
    assert len(set(s1)) == 2 and pool[3] not in s1
    for i in range(6):  # never the doc itself, whatever the draw
        assert pool[i] not in sample_fewshot("t", i, 5, pool, exclude_self=True)
    assert len(sample_fewshot("t", 0, 6, pool, exclude_self=False)) == 6
    with pytest.raises(ValueError):
        sample_fewshot("t", 0, 6, pool, exclude_self=True)
    reqs = build_requests("t", pool, num_fewshot=2, n_docs=3)
    assert len(reqs) == 6 and all(r.context.count("\n\n") == 2 and r.context.endswith(pool[r.doc_index].text)
                                  for r in reqs)
    # a doc's prompt does not depend on limit
    assert build_requests("t", pool, 2, n_docs=6)[:6] == reqs


# ----------------------------------------------------------------------------------------- tokenization
def test_encode_pair_moves_trailing_space(word_tok):
    ctx, cont = encode_pair(word_tok, "Answer: ", "yes")
    assert word_tok.decode(ctx) == "Answer:" and word_tok.tokens(word_tok.decode(cont)) == [" yes"]
    ctx, cont = encode_pair(word_tok, "Question: goal\nAnswer:", " True")
    assert ctx == word_tok.encode("Question: goal\nAnswer:")
    assert cont == [word_tok.vocab[" True"]]
    # whole = ctx + cont
    c, k = encode_pair(word_tok, "the faucet therefore", "  the toilet")
    assert c + k == word_tok.encode("the faucet therefore  the toilet")
    assert word_tok.decode(k) == "  the toilet"
    # empty context: prefix token (BOS, else EOS)
    c, k = encode_pair(word_tok, "", " x")
    assert c == [word_tok.eos_token_id]


@pytest.mark.real
def test_encode_pair_real(smollm2_tokenizer):
    tok = smollm2_tokenizer
    d = copa_doc(COPA)
    ctx, cont = encode_pair(tok, d.text, " " + d.choices[0])
    assert ctx + cont == tok.encode(d.text + "  " + d.choices[0][1:])
    assert tok.decode(cont) == "  the toilet filled with water."
    assert ctx == tok.encode(d.text) and ctx[0] != tok.bos_token_id
    ctx2, cont2 = encode_pair(tok, "Answer: ", "True")
    assert ctx2 == tok.encode("Answer:") and tok.decode(cont2) == " True"


# ---------------------------------------------------------------------------------------------- scoring
def test_choice_metrics():
    # choice 0 has the higher total loglik, choice 1 the higher per-character loglik
    m = choice_metrics([-4.0, -6.0], [" ab", " abcdefgh"], gold=1)
    assert (m["pred"], m["pred_norm"], m["acc"], m["acc_norm"]) == (0, 1, 0.0, 1.0)
    # acc_norm divides by characters (lm-eval), acc_bytes by utf-8 bytes
    m = choice_metrics([-3.0, -2.5], ["ééé", "abc"], gold=1)
    assert m["pred_norm"] == 1 and m["pred_bytes"] == 0
    assert choice_metrics([-1.0, -1.0], ["a", "a"], gold=0)["pred"] == 0  # ties -> first


class Bigram:
    """logits[b, t] = table[input[b, t]]: a known model whose scores can be computed by hand."""

    def __init__(self, vocab=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, vocab, generator=g) * 3
        self.calls = []

    def __call__(self, ids):
        self.calls.append(ids.clone())
        return self.table[ids]

    def loglik(self, ctx, cont):
        full = ctx + cont
        lp = torch.log_softmax(self.table.double(), -1)
        return sum(lp[full[j - 1], full[j]].item() for j in range(len(ctx), len(full)))


def test_loglikelihoods_padding_and_batching():
    m = Bigram()
    pairs = [([3, 4, 5], [6]), ([1], [2, 3, 4, 5]), ([7, 8], [9, 10]), ([11, 12, 13, 14, 15], [16])]
    expected = [m.loglik(c, k) for c, k in pairs]
    for bs in (1, 2, 3, 8):
        got = loglikelihoods({"m": m}, pairs, batch_size=bs, progress=False)["m"]
        assert got == pytest.approx(expected, abs=1e-4)
    # sorted longest first, right padded with pad_id
    m.calls.clear()
    loglikelihoods({"m": m}, pairs, batch_size=2, pad_id=63, progress=False)
    assert m.calls[0].tolist() == [[11, 12, 13, 14, 15], [1, 2, 3, 4, 63]]
    # max_length truncates from the left (ctx + cont)[-(max_length + 1):][:-1]
    got = loglikelihoods({"m": m}, [([1, 2, 3, 4, 5], [6])], max_length=2, progress=False)["m"]
    assert got[0] == pytest.approx(m.loglik([5], [6]), abs=1e-5)


def test_score_task_fake_model(word_tok):
    docs = [TaskDoc(f"Q{i}: pick", ("yes", "no", "maybe so"), i % 3) for i in range(7)]
    m = Bigram(vocab=128, seed=1)
    other = Bigram(vocab=128, seed=2)
    res = score_task({"m": m, "o": other}, word_tok, "copa", docs=docs, batch_size=4, progress=False,
                     return_details=True)
    assert set(res) == {"m", "o"} and res["m"]["n"] == 7
    for name, model in (("m", m), ("o", other)):
        acc = accn = 0
        for i, d in enumerate(docs):
            lls = [model.loglik(*encode_pair(word_tok, d.text, " " + c)) for c in d.choices]
            det = res[name]["docs"][i]
            assert det["lls"] == pytest.approx(lls, abs=1e-4)
            pred = max(range(3), key=lambda j: lls[j])
            pred_n = max(range(3), key=lambda j: lls[j] / len(d.choices[j]))
            assert det["pred"] == pred and det["pred_norm"] == pred_n and det["gold"] == d.gold
            acc += pred == d.gold
            accn += pred_n == d.gold
        assert res[name]["acc"] == pytest.approx(acc / 7) and res[name]["acc_norm"] == pytest.approx(accn / 7)
    # both models saw exactly the same batches
    assert len(m.calls) == len(other.calls) and all(torch.equal(a, b) for a, b in zip(m.calls, other.calls))
    # limit
    assert score_task({"m": m}, word_tok, "copa", docs=docs, limit=2, progress=False)["m"]["n"] == 2


def test_score_task_known_preferences(word_tok):
    """A model that always prefers the token ' yes' gets acc 1 on docs whose gold is 'yes'."""
    docs = [TaskDoc(f"Q{i}:", ("yes", "no"), 0) for i in range(3)] + [TaskDoc("Q9:", ("yes", "no"), 1)]
    for d in docs:
        word_tok.encode(d.text + " yes no")
    yes = word_tok.vocab[" yes"]

    def likes_yes(ids):
        out = torch.zeros(*ids.shape, 200)
        out[..., yes] = 5.0
        return out

    r = score_task({"y": likes_yes}, word_tok, "cb", docs=docs, progress=False)["y"]
    assert r["acc"] == 0.75 and r["n"] == 4


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_tasks({"m": lambda x: x}, None, tasks=("hellaswag",), data_dir=".")


# ------------------------------------------------------------------------------------------- real data
@pytest.mark.parametrize("task,n,n_choices", [("copa", 100, 2), ("cb", 56, 3), ("rte", 277, 2), ("piqa", 1838, 2),
                                              ("openbookqa", 500, 4)])
def test_real_task_docs(data_dir, task, n, n_choices):
    docs = T.load_task_docs(task, data_dir)
    assert len(docs) == n and all(len(d.choices) == n_choices and 0 <= d.gold < n_choices for d in docs)
    if task in ("copa", "cb", "rte"):
        assert len(T.load_task_docs(task, data_dir, "fewshot")) == 32


def test_real_first_docs(data_dir):
    copa = T.load_task_docs("copa", data_dir)[0]
    assert copa.text == "The man turned on the faucet therefore" and copa.gold == 1
    rte = T.load_task_docs("rte", data_dir)[1]
    assert rte.text.endswith("\nQuestion: Bacteria is winning the war against antibiotics. True or False?\nAnswer:")
    assert rte.gold == 0
    cb = T.load_task_docs("cb", data_dir)[1]
    assert cb.text == ("``Who knows? The point is, do we go with it or not?'' Do we assume there is a shipment?"
                       "\nQuestion: there is a shipment. True, False, or Neither?\nAnswer:") and cb.gold == 2
    piqa = T.load_task_docs("piqa", data_dir)[1]
    assert piqa.text == "Question: dresser\nAnswer:" and piqa.gold == 1
    obqa = T.load_task_docs("openbookqa", data_dir)[1]
    assert obqa.text == "There is most likely going to be fog around:"
    assert obqa.choices == ("a marsh", "a tundra", "the plains", "a desert") and obqa.gold == 0


@pytest.mark.real
def test_real_evaluate_tasks_smoke(smollm2_model, smollm2_tokenizer, data_dir):
    from dejavu.eval.perplexity import hf_logits_fn

    fn = hf_logits_fn(smollm2_model)
    res = evaluate_tasks({"dense": fn, "copy": fn}, smollm2_tokenizer, tasks=("copa", "openbookqa"),
                         data_dir=data_dir, limit=4, batch_size=4, progress=False, return_details=True)
    for t in ("copa", "openbookqa"):
        assert res[t]["dense"]["n"] == 4
        a = [d["lls"] for d in res[t]["dense"]["docs"]]
        b = [d["lls"] for d in res[t]["copy"]["docs"]]
        assert a == b and all(math.isfinite(x) and x < 0 for row in a for x in row)
    one = evaluate_tasks({"dense": fn}, smollm2_tokenizer, tasks=("copa",), data_dir=data_dir, limit=4,
                         batch_size=1, num_fewshot=2, progress=False)
    assert one["copa"]["dense"]["n"] == 4
