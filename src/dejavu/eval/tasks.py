"""Zero/k-shot multiple-choice task scoring with lm-evaluation-harness definitions.

Tasks: ``copa``, ``cb``, ``rte`` (lm-eval's SuperGLUE ``sglue_rte``), ``piqa``, ``openbookqa``, read from
``<data_dir>/tasks`` (see :mod:`dejavu.eval.data`).  The prompt templates, choice strings and metrics follow
lm-evaluation-harness 0.4.x task configs (checked against lm_eval 0.4.13):

=========== =============================================================== ==================================
task        context (``doc_to_text``)                                       choices (``doc_to_choice``)
=========== =============================================================== ==================================
copa        premise without its final char + " because" / " therefore"      " " + choice with lowercased 1st
                                                                             char (so the continuation, after
                                                                             the target delimiter, starts with
                                                                             two spaces, exactly as lm-eval)
cb          "{premise}\\nQuestion: {hypothesis}. True, False, or Neither?    "True", "False", "Neither"
            \\nAnswer:"                                                      (entailment, contradiction,
                                                                             neutral)
rte         "{premise}\\nQuestion: {hypothesis} True or False?\\nAnswer:"     "True", "False"
                                                                             (entailment, not_entailment)
piqa        "Question: {goal}\\nAnswer:"                                     sol1, sol2
openbookqa  question_stem                                                   the 4 choice texts (A-D)
=========== =============================================================== ==================================

Each choice is scored as the continuation ``" " + choice`` (lm-eval's target delimiter) of the context.

Loglikelihood of a continuation (lm-eval ``HFLM`` convention): trailing whitespace of the context is moved to
the front of the continuation; ``whole = encode(context + continuation)``, ``ctx = encode(context)``, the
continuation tokens are ``whole[len(ctx):]``; the model input is ``(ctx + cont)[:-1]`` (left-truncated to
``max_length`` if given) and the score is the sum of ``log_softmax`` (fp32) of the continuation tokens.
``encode`` is ``tokenizer.encode(s)`` with the tokenizer's default special tokens (no BOS for SmolLM2), as
lm-eval does when ``add_bos_token`` is not set.

Metrics, as lm-eval: ``acc`` = argmax of loglikelihood is the gold choice; ``acc_norm`` = argmax of
loglikelihood / ``len(choice)`` -- lm-eval 0.4 normalises by the *character* length of the choice string
(without the delimiter); ``acc_bytes`` = argmax of loglikelihood / utf-8 byte length of the choice (lm-eval's
``acc_bytes``).  They differ only for choices with non-ASCII text (62 of the PIQA solutions).  argmax ties go
to the first choice (numpy convention).

Few-shot (``num_fewshot=k``): k solved examples ``text + " " + gold choice`` each followed by ``"\\n\\n"``,
then the query.  The examples are drawn without replacement from ``train32`` (COPA, CB, RTE) or, for PIQA and
OpenBookQA (no train split here), from the evaluated split excluding the current doc.  The draw for doc ``i``
uses ``random.Random(f"{seed}:{task}:{i}")`` so a doc's prompt does not depend on ``limit`` or on other docs
(lm-eval instead draws from one ``Random(1234)`` stream over the real train split, so few-shot numbers are
comparable in spirit, not bit for bit).

Batching: requests are sorted by length (longest first) and right-padded to the longest in the batch; only
real positions are scored, so with a causal model the padding cannot change a score.  Every model is run on
each batch.  Note: a model whose computation couples the rows of a batch (e.g. a sparse runtime choosing one
neuron set per batch) should be scored with ``batch_size=1``.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import DataError, _require_file, load_jsonl, resolve_data_dir
from .perplexity import LogitsFn, as_models, checked_logits

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
DEFAULT_TASKS = ("copa", "cb", "rte", "piqa", "openbookqa")
DEFAULT_FEWSHOT_SEED = 1234

CB_LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2}
RTE_LABELS = {"entailment": 0, "not_entailment": 1}


@dataclass(frozen=True)
class TaskDoc:
    """One multiple-choice doc: the query text, the choice strings (no delimiter) and the gold index."""

    text: str
    choices: tuple[str, ...]
    gold: int
    doc_id: str = ""
    raw: dict = field(default_factory=dict, compare=False, repr=False)


# ---------------------------------------------------------------------------------------------- templates
def _lower_first(s: str) -> str:
    return s[0].lower() + s[1:]


def copa_doc(d: dict) -> TaskDoc:
    connector = {"cause": "because", "effect": "therefore"}[d["question"]]
    text = d["premise"].strip()[:-1] + f" {connector}"  # drop the final period
    choices = (" " + _lower_first(d["choice1"]), " " + _lower_first(d["choice2"]))
    return TaskDoc(text, choices, int(d["label"]), str(d.get("idx", "")), d)


def cb_doc(d: dict) -> TaskDoc:
    text = f"{d['premise']}\nQuestion: {d['hypothesis']}. True, False, or Neither?\nAnswer:"
    return TaskDoc(text, ("True", "False", "Neither"), _label(d, CB_LABELS, "cb"), str(d.get("idx", "")), d)


def rte_doc(d: dict) -> TaskDoc:
    text = f"{d['premise']}\nQuestion: {d['hypothesis']} True or False?\nAnswer:"
    return TaskDoc(text, ("True", "False"), _label(d, RTE_LABELS, "rte"), str(d.get("idx", "")), d)


def piqa_doc(d: dict) -> TaskDoc:
    return TaskDoc(f"Question: {d['goal']}\nAnswer:", (d["sol1"], d["sol2"]), int(d["label"]),
                   str(d.get("idx", "")), d)


def openbookqa_doc(d: dict) -> TaskDoc:
    labels = list(d["choices"]["label"])
    return TaskDoc(d["question_stem"], tuple(d["choices"]["text"]), labels.index(d["answerKey"].lstrip()),
                   str(d.get("id", "")), d)


def _label(d: dict, mapping: dict[str, int], task: str) -> int:
    lab = d["label"]
    if isinstance(lab, int):
        return lab
    if lab not in mapping:
        raise DataError(f"{task}: unknown label {lab!r} (expected one of {list(mapping)})")
    return mapping[lab]


# ----------------------------------------------------------------------------------------------- loaders
_OBQA_CHOICE = re.compile(r"\(([A-Z])\) ")


def parse_obqa_choices(s: str) -> tuple[list[str], list[str]]:
    """``"(A) x (B) y (C) z (D) w"`` -> (["A","B","C","D"], ["x","y","z","w"])."""
    marks = list(_OBQA_CHOICE.finditer(s))
    if not marks or marks[0].start() != 0:
        raise DataError(f"openbookqa: cannot parse choices {s!r}")
    labels, texts = [], []
    for j, m in enumerate(marks):
        end = marks[j + 1].start() - 1 if j + 1 < len(marks) else len(s)  # -1: the space before "(B)"
        if j + 1 < len(marks) and s[end] != " ":
            raise DataError(f"openbookqa: cannot parse choices {s!r}")
        labels.append(m.group(1))
        texts.append(s[m.end():end])
    if labels != [chr(ord("A") + i) for i in range(len(labels))]:
        raise DataError(f"openbookqa: unexpected choice labels {labels} in {s!r}")
    return labels, texts


def load_openbookqa(path: str | Path) -> list[dict]:
    """OpenBookQA test.tsv (ID, Question Stem, Choices, Complete Question, Answer Key) -> HF-style dicts."""
    path = _require_file(Path(path), "OpenBookQA file")
    with open(path, encoding="utf-8", newline="") as f:
        lines = [ln.rstrip("\r\n") for ln in f]
    lines = [ln for ln in lines if ln.strip()]
    if len(lines) < 2:
        raise DataError(f"{path}: file is empty")
    header = lines[0].split("\t")
    if header[:3] != ["ID", "Question Stem", "Choices"] or "Answer Key" not in header:
        raise DataError(f"{path.name}: unexpected header {header}")
    ak = header.index("Answer Key")
    docs = []
    for lineno, ln in enumerate(lines[1:], start=2):
        cols = ln.split("\t")
        if len(cols) != len(header):
            raise DataError(f"{path.name} line {lineno}: {len(cols)} columns, expected {len(header)}")
        labels, texts = parse_obqa_choices(cols[2])
        docs.append({"id": cols[0], "question_stem": cols[1], "choices": {"text": texts, "label": labels},
                     "answerKey": cols[ak]})
    return docs


def load_piqa(data_dir: Path) -> list[dict]:
    docs = load_jsonl(data_dir / "tasks" / "piqa" / "valid.jsonl")
    lab_path = _require_file(data_dir / "tasks" / "piqa" / "valid-labels.lst", "PIQA labels file")
    labels = lab_path.read_text().split()
    if len(labels) != len(docs):
        raise DataError(f"piqa: {len(docs)} docs but {len(labels)} labels in {lab_path}")
    return [{**d, "label": int(lab), "idx": i} for i, (d, lab) in enumerate(zip(docs, labels))]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    to_doc: Callable[[dict], TaskDoc]
    load_eval: Callable[[Path], list[dict]]
    load_fewshot: Callable[[Path], list[dict]] | None  # None: same split, excluding the current doc


TASKS: dict[str, TaskSpec] = {
    "copa": TaskSpec("copa", copa_doc, lambda d: load_jsonl(d / "tasks/copa/val.jsonl"),
                     lambda d: load_jsonl(d / "tasks/copa/train32.jsonl")),
    "cb": TaskSpec("cb", cb_doc, lambda d: load_jsonl(d / "tasks/cb/val.jsonl"),
                   lambda d: load_jsonl(d / "tasks/cb/train32.jsonl")),
    "rte": TaskSpec("rte", rte_doc, lambda d: load_jsonl(d / "tasks/rte/val.jsonl"),
                    lambda d: load_jsonl(d / "tasks/rte/train32.jsonl")),
    "piqa": TaskSpec("piqa", piqa_doc, load_piqa, None),
    "openbookqa": TaskSpec("openbookqa", openbookqa_doc, lambda d: load_openbookqa(d / "tasks/openbookqa/test.tsv"),
                           None),
}


def _spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    return TASKS[task]


def load_task_docs(task: str, data_dir=None, split: str = "eval") -> list[TaskDoc]:
    """Docs of ``task`` (``split`` "eval" or "fewshot"; fewshot is train32 for COPA/CB/RTE)."""
    spec, d = _spec(task), resolve_data_dir(data_dir)
    if split == "eval":
        rows = spec.load_eval(d)
    elif split == "fewshot":
        if spec.load_fewshot is None:
            raise ValueError(f"{task} has no separate few-shot split (examples come from the eval split)")
        rows = spec.load_fewshot(d)
    else:
        raise ValueError(f"split must be 'eval' or 'fewshot', got {split!r}")
    return [spec.to_doc(r) for r in rows]


# ------------------------------------------------------------------------------------------- prompting
def format_example(doc: TaskDoc) -> str:
    """A solved few-shot example: text + target delimiter + gold choice."""
    return doc.text + TARGET_DELIMITER + doc.choices[doc.gold]


def build_context(doc: TaskDoc, fewshot: Sequence[TaskDoc] = ()) -> str:
    return "".join(format_example(f) + FEWSHOT_DELIMITER for f in fewshot) + doc.text


def sample_fewshot(task: str, i: int, k: int, pool: Sequence[TaskDoc], exclude_self: bool,
                   seed: int = DEFAULT_FEWSHOT_SEED) -> list[TaskDoc]:
    """k examples for doc ``i`` drawn without replacement from ``pool`` (minus ``pool[i]`` if exclude_self)."""
    if k <= 0:
        return []
    n = len(pool) - (1 if exclude_self else 0)
    if k > n:
        raise ValueError(f"{task}: num_fewshot={k} but only {n} few-shot examples available")
    rng = random.Random(f"{seed}:{task}:{i}")
    picks = rng.sample(range(n), k)
    if exclude_self:
        picks = [j + 1 if j >= i else j for j in picks]
    return [pool[j] for j in picks]


@dataclass(frozen=True)
class Request:
    doc_index: int
    choice_index: int
    context: str
    continuation: str


def build_requests(task: str, docs: Sequence[TaskDoc], num_fewshot: int = 0, fewshot_pool=None,
                   seed: int = DEFAULT_FEWSHOT_SEED, n_docs: int | None = None) -> list[Request]:
    """One request per (doc, choice) for the first ``n_docs`` docs.  ``fewshot_pool`` None: use ``docs``."""
    exclude_self = fewshot_pool is None
    pool = docs if fewshot_pool is None else fewshot_pool
    n = len(docs) if n_docs is None else min(n_docs, len(docs))
    reqs = []
    for i in range(n):
        ctx = build_context(docs[i], sample_fewshot(task, i, num_fewshot, pool, exclude_self, seed))
        for c, choice in enumerate(docs[i].choices):
            reqs.append(Request(i, c, ctx, TARGET_DELIMITER + choice))
    return reqs


# ---------------------------------------------------------------------------------------- tokenization
def tok_encode(tokenizer, s: str, add_special_tokens: bool | None = None) -> list[int]:
    if add_special_tokens is None:
        return list(tokenizer.encode(s))
    return list(tokenizer.encode(s, add_special_tokens=add_special_tokens))


def encode_pair(tokenizer, context: str, continuation: str,
                add_special_tokens: bool | None = None) -> tuple[list[int], list[int]]:
    """Context / continuation token ids as lm-eval's HFLM (causal) splits them.

    Trailing whitespace of the context moves to the continuation; the continuation tokens are the tail of the
    encoding of the whole string past the encoding of the context.  An empty context becomes the tokenizer's
    BOS (else EOS) token, as lm-eval's ``prefix_token_id``.
    """
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tok_encode(tokenizer, continuation, add_special_tokens=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation, add_special_tokens)
    ctx = tok_encode(tokenizer, context, add_special_tokens)
    return ctx, whole[len(ctx):]


# ------------------------------------------------------------------------------------------- scoring
@torch.inference_mode()
def loglikelihoods(
    models: Mapping[str, LogitsFn] | LogitsFn,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    max_length: int | None = None,
    pad_id: int = 0,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> dict[str, list[float]]:
    """Sum of log p(continuation tokens | context) for each ``(ctx_ids, cont_ids)`` pair, for every model.

    The model input is ``(ctx + cont)[:-1]`` (left-truncated to ``max_length`` tokens if given); pairs are
    sorted longest-first and right-padded with ``pad_id`` to the batch's longest input.
    """
    models = as_models(models)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    inputs, conts = [], []
    for ctx, cont in pairs:
        if len(cont) == 0:
            raise ValueError("empty continuation (nothing to score)")
        full = list(ctx) + list(cont)
        if max_length is not None:
            if len(cont) > max_length:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length={max_length}")
            full = full[-(max_length + 1):]
        inputs.append(full[:-1])
        conts.append(list(cont))
    order = sorted(range(len(pairs)), key=lambda i: (-len(inputs[i]), i))
    batches = [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
    out: dict[str, list[float]] = {n: [math.nan] * len(pairs) for n in models}
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, unit="batch")
    for b in it:
        width = max(len(inputs[i]) for i in b)
        x = torch.full((len(b), width), pad_id, dtype=torch.long)
        for r, i in enumerate(b):
            x[r, :len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
        for name, fn in models.items():
            logits = checked_logits(name, fn, x)
            for r, i in enumerate(b):
                L, n = len(inputs[i]), len(conts[i])
                lp = torch.log_softmax(logits[r, L - n:L].float(), dim=-1)
                tgt = torch.tensor(conts[i], dtype=torch.long, device=lp.device)
                out[name][i] = float(lp.gather(-1, tgt[:, None]).double().sum())
            del logits
    return out


def _argmax(xs: Sequence[float]) -> int:
    best = 0
    for j, v in enumerate(xs):
        if v > xs[best]:
            best = j
    return best


def choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict:
    """Per-doc acc / acc_norm / acc_bytes and the three predictions (lm-eval definitions)."""
    pred = _argmax(lls)
    pred_norm = _argmax([ll / len(c) for ll, c in zip(lls, choices)])
    pred_bytes = _argmax([ll / len(c.encode("utf-8")) for ll, c in zip(lls, choices)])
    return {"pred": pred, "pred_norm": pred_norm, "pred_bytes": pred_bytes, "gold": gold,
            "acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "acc_bytes": float(pred_bytes == gold)}


def score_task(
    models: Mapping[str, LogitsFn] | LogitsFn,
    tokenizer,
    task: str,
    data_dir=None,
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    fewshot_seed: int = DEFAULT_FEWSHOT_SEED,
    max_length: int | None = None,
    add_special_tokens: bool | None = None,
    progress: bool = True,
    return_details: bool = False,
    docs: Sequence[TaskDoc] | None = None,
    fewshot_pool: Sequence[TaskDoc] | None = None,
) -> dict[str, dict]:
    """Score one task for every model: ``{model: {"acc", "acc_norm", "acc_bytes", "n"}}``.

    With ``return_details`` each model entry also has ``"docs"``: per doc the choice loglikelihoods,
    predictions and gold.  ``docs`` / ``fewshot_pool`` override the loaded data (tests).
    """
    models = as_models(models)
    spec = _spec(task)
    if docs is None:
        docs = load_task_docs(task, data_dir, "eval")
        if num_fewshot > 0 and spec.load_fewshot is not None:
            fewshot_pool = load_task_docs(task, data_dir, "fewshot")
    reqs = build_requests(task, docs, num_fewshot, fewshot_pool, fewshot_seed, limit)
    pairs = [encode_pair(tokenizer, r.context, r.continuation, add_special_tokens) for r in reqs]
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    lls = loglikelihoods(models, pairs, batch_size=batch_size, max_length=max_length, pad_id=pad_id,
                         progress=progress, desc=f"{task} ({num_fewshot}-shot)")
    n_docs = (reqs[-1].doc_index + 1) if reqs else 0
    result = {}
    for name in models:
        per_doc: list[list[float]] = [[] for _ in range(n_docs)]
        for r, ll in zip(reqs, lls[name]):
            per_doc[r.doc_index].append(ll)
        details = []
        for i in range(n_docs):
            m = choice_metrics(per_doc[i], docs[i].choices, docs[i].gold)
            details.append({"doc_index": i, "doc_id": docs[i].doc_id, "lls": per_doc[i], **m})
        n = len(details)
        res = {k: (sum(d[k] for d in details) / n if n else math.nan) for k in ("acc", "acc_norm", "acc_bytes")}
        res["n"] = n
        if return_details:
            res["docs"] = details
        result[name] = res
    return result


def evaluate_tasks(
    models: Mapping[str, LogitsFn] | LogitsFn,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    data_dir=None,
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    fewshot_seed: int = DEFAULT_FEWSHOT_SEED,
    max_length: int | None = None,
    progress: bool = True,
    return_details: bool = False,
) -> dict[str, dict[str, dict]]:
    """Score every task for every model on identical requests: ``{task: {model: {"acc", "acc_norm", "n", ...}}}``."""
    if isinstance(tasks, str):
        tasks = (tasks,)
    for t in tasks:
        _spec(t)
    data_dir = resolve_data_dir(data_dir)
    return {
        t: score_task(models, tokenizer, t, data_dir=data_dir, num_fewshot=num_fewshot, limit=limit,
                      batch_size=batch_size, fewshot_seed=fewshot_seed, max_length=max_length,
                      progress=progress, return_details=return_details)
        for t in tasks
    }
