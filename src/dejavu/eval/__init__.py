"""Evaluation: data loaders (:mod:`.data`), perplexity (:mod:`.perplexity`) and lm-eval-style zero/k-shot task
scoring (:mod:`.tasks`).  Every scorer takes ``models: dict[str, LogitsFn]`` (``input_ids [B, T] -> logits
[B, T, V]``) and runs all of them on exactly the same inputs, so dense and sparse variants are comparable."""

from .data import (C4Split, DataError, default_data_dir, load_jsonl, load_jsonl_texts, load_wikitext2_test,
                   split_c4)
from .perplexity import LogitsFn, c4_windows, hf_logits_fn, perplexity, window_token_ids, wikitext2_windows
from .tasks import DEFAULT_TASKS, evaluate_tasks, score_task

__all__ = [
    "C4Split", "DataError", "default_data_dir", "load_jsonl", "load_jsonl_texts", "load_wikitext2_test", "split_c4",
    "LogitsFn", "c4_windows", "hf_logits_fn", "perplexity", "window_token_ids", "wikitext2_windows",
    "DEFAULT_TASKS", "evaluate_tasks", "score_task",
]
