"""Evaluation / calibration data loaders.

The data lives outside the repository (read-only), by default in ``../shared/data`` beside the checkout
(see ``shared/README.md``).  Nothing here copies it.

Layout expected under the data directory::

    wikitext-2-raw/wiki.test.raw          WikiText-2 raw test split, CRLF line ends, empty rows dropped
    c4/c4_train_sample.jsonl              1000 C4-en train docs {"text","timestamp","url"}, original order
    tasks/{copa,cb,rte}/{val,train32}.jsonl
    tasks/piqa/valid.jsonl + valid-labels.lst
    tasks/openbookqa/test.tsv

C4 split convention (:func:`split_c4`)
--------------------------------------
Documents are assigned to roles by their *position in the file*, never by a random draw, so the roles can be
recorded as index ranges and can never overlap:

* calibration (predictor training data): docs ``[0, n_calib)`` -- the head of the file;
* C4 evaluation (perplexity): the last ``n_eval`` docs, ``[N - n_eval, N)``;
* operating-point holdout (e.g. for choosing sparsity thresholds): the ``n_holdout`` docs just before the eval
  docs, ``[N - n_eval - n_holdout, N - n_eval)``.

Heads and tails are disjoint as long as ``n_calib + n_holdout + n_eval <= N`` (checked).  ``seed`` only
shuffles the *order* of the documents inside each role (``seed=None`` keeps file order); membership is fixed.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

ENV_VAR = "DEJAVU_DATA"

WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"
C4_SAMPLE = "c4/c4_train_sample.jsonl"


class DataError(ValueError):
    """A data file is present but malformed (empty, bad JSON, missing field, ...)."""


def repo_root() -> Path:
    """The repository root, found from this file's location (``<root>/src/dejavu/eval/data.py``)."""
    return Path(__file__).resolve().parents[3]


def default_data_dir() -> Path:
    """Where the shared data lives.

    Order: the ``DEJAVU_DATA`` environment variable if set (it must exist), else the first existing of
    ``<cwd>/../shared/data`` and ``<repo root>/../shared/data``.  Raises :class:`FileNotFoundError` otherwise.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"{ENV_VAR}={env!r} is not a directory")
        return p.resolve()
    candidates = [Path.cwd() / ".." / "shared" / "data", repo_root() / ".." / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"evaluation data directory not found (tried {tried}); set the {ENV_VAR} environment variable "
        f"or pass --data-dir"
    )


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` as a Path, or :func:`default_data_dir` when None."""
    return default_data_dir() if data_dir is None else Path(data_dir)


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_wikitext2_test(data_dir: str | os.PathLike | None = None) -> str:
    """The whole WikiText-2 raw test file as one string, CRLF -> LF (nothing else changed).

    Tokenized with the SmolLM2 tokenizer (plain ``tokenizer(text)["input_ids"]``, which adds no BOS for that
    tokenizer) this is 301,948 tokens.
    """
    path = _require_file(resolve_data_dir(data_dir) / WIKITEXT2_TEST, "WikiText-2 test file")
    # newline="" keeps the raw line ends so that we do the CRLF -> LF conversion explicitly.
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text.replace("\r\n", "\n")


def _jsonl_objects(path: str | os.PathLike):
    """Yield (line number, parsed value) for the non-blank lines of a JSON-lines file; errors name file and line."""
    path = Path(path)
    _require_file(path, "JSON-lines file")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path.name} line {lineno}: invalid JSON: {e}") from None


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file into a list of dicts, with errors that name the file and line.

    Blank lines are skipped.  Raises FileNotFoundError (missing file) or :class:`DataError` (empty file, a
    line that is not valid JSON, a line that is not a JSON object).
    """
    path = Path(path)
    rows: list[dict] = []
    for lineno, obj in _jsonl_objects(path):
        if not isinstance(obj, dict):
            raise DataError(f"{path.name} line {lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    if not rows:
        raise DataError(f"{path}: file is empty (no JSON lines)")
    return rows


def load_jsonl_texts(path: str | os.PathLike, field: str = "text") -> list[str]:
    """The string ``field`` of every line of a JSON-lines file (see :func:`load_jsonl` for the errors).

    A line without the field, or with a non-string value, raises :class:`DataError` naming file and line.
    """
    path = Path(path)
    texts: list[str] = []
    for lineno, obj in _jsonl_objects(path):
        if not isinstance(obj, dict) or field not in obj:
            raise DataError(f"{path.name} line {lineno}: missing field {field!r}")
        val = obj[field]
        if not isinstance(val, str):
            raise DataError(f"{path.name} line {lineno}: field {field!r} is {type(val).__name__}, not a string")
        texts.append(val)
    if not texts:
        raise DataError(f"{path}: file is empty (no JSON lines)")
    return texts


@dataclass
class C4Split:
    """Disjoint C4 document roles.  Ranges are half-open ``(start, stop)`` indices into the source file."""

    path: str
    n_docs: int
    seed: int | None
    calib_range: tuple[int, int]
    holdout_range: tuple[int, int]
    eval_range: tuple[int, int]
    calib: list[str] = field(repr=False, default_factory=list)
    holdout: list[str] = field(repr=False, default_factory=list)
    eval: list[str] = field(repr=False, default_factory=list)
    calib_indices: list[int] = field(repr=False, default_factory=list)
    holdout_indices: list[int] = field(repr=False, default_factory=list)
    eval_indices: list[int] = field(repr=False, default_factory=list)

    def describe(self) -> dict:
        """JSON-able record of the split (no texts), for results files."""
        return {
            "path": self.path,
            "n_docs": self.n_docs,
            "seed": self.seed,
            "convention": "calib = head [0, n_calib); eval = last n_eval docs; holdout = the n_holdout docs "
                          "just before eval; seed shuffles order within a role only",
            "calib_range": list(self.calib_range),
            "holdout_range": list(self.holdout_range),
            "eval_range": list(self.eval_range),
        }


def c4_ranges(n_docs: int, n_calib: int, n_eval: int, n_holdout: int = 0) -> dict[str, tuple[int, int]]:
    """Index ranges of :func:`split_c4` for a file of ``n_docs`` documents (raises if they would overlap)."""
    for name, v in (("n_calib", n_calib), ("n_eval", n_eval), ("n_holdout", n_holdout)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if n_calib + n_holdout + n_eval > n_docs:
        raise ValueError(
            f"n_calib + n_holdout + n_eval = {n_calib} + {n_holdout} + {n_eval} > {n_docs} documents: "
            f"calibration and evaluation documents would overlap"
        )
    return {
        "calib": (0, n_calib),
        "holdout": (n_docs - n_eval - n_holdout, n_docs - n_eval),
        "eval": (n_docs - n_eval, n_docs),
    }


def split_c4(
    path: str | os.PathLike,
    n_calib: int,
    n_eval: int,
    seed: int | None = 0,
    n_holdout: int = 0,
    field_name: str = "text",
) -> C4Split:
    """Split a C4 JSON-lines sample into calibration / holdout / eval documents (see module docstring).

    Deterministic: membership depends only on the counts; ``seed`` (None = keep file order) shuffles the
    order of documents within each role.
    """
    texts = load_jsonl_texts(path, field=field_name)
    r = c4_ranges(len(texts), n_calib, n_eval, n_holdout)
    idx = {k: list(range(*v)) for k, v in r.items()}
    if seed is not None:
        for k in idx:
            random.Random(f"{seed}:{k}").shuffle(idx[k])
    return C4Split(
        path=str(path),
        n_docs=len(texts),
        seed=seed,
        calib_range=r["calib"],
        holdout_range=r["holdout"],
        eval_range=r["eval"],
        calib=[texts[i] for i in idx["calib"]],
        holdout=[texts[i] for i in idx["holdout"]],
        eval=[texts[i] for i in idx["eval"]],
        calib_indices=idx["calib"],
        holdout_indices=idx["holdout"],
        eval_indices=idx["eval"],
    )


def c4_sample_path(data_dir: str | os.PathLike | None = None) -> Path:
    """``<data_dir>/c4/c4_train_sample.jsonl``."""
    return resolve_data_dir(data_dir) / C4_SAMPLE
