import json
from pathlib import Path

import pytest

from dejavu.eval import data as D
from dejavu.eval.data import DataError, c4_ranges, default_data_dir, load_jsonl, load_jsonl_texts, split_c4


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ data dir
def test_default_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DEJAVU_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path.resolve()


def test_default_data_dir_env_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("DEJAVU_DATA", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="DEJAVU_DATA"):
        default_data_dir()


def test_default_data_dir_cwd(tmp_path, monkeypatch):
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.delenv("DEJAVU_DATA", raising=False)
    monkeypatch.chdir(tmp_path / "repo")
    assert default_data_dir() == (tmp_path / "shared" / "data").resolve()


def test_default_data_dir_not_found(tmp_path, monkeypatch):
    monkeypatch.delenv("DEJAVU_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(D, "repo_root", lambda: tmp_path / "somewhere")
    with pytest.raises(FileNotFoundError, match=r"DEJAVU_DATA.*--data-dir"):
        default_data_dir()


def test_repo_root():
    assert (D.repo_root() / "pyproject.toml").is_file()


# --------------------------------------------------------------------------------------------- jsonl
def test_jsonl_texts_ok(tmp_path):
    p = write_jsonl(tmp_path / "c4.jsonl", [{"text": "a"}, "", {"text": "b", "url": "u"}])
    assert load_jsonl_texts(p) == ["a", "b"]
    assert load_jsonl_texts(p, field="text") == ["a", "b"]


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        load_jsonl_texts(tmp_path / "nothere.jsonl")
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        load_jsonl(tmp_path / "nothere.jsonl")


def test_jsonl_empty_file(tmp_path):
    p = tmp_path / "c4.jsonl"
    p.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_jsonl_texts(p)
    p.write_text("\n  \n")
    with pytest.raises(DataError, match="empty"):
        load_jsonl(p)


def test_jsonl_bad_line_named(tmp_path):
    rows = [{"text": str(i)} for i in range(16)] + ['{"text": "x"'] + [{"text": "y"}]
    p = write_jsonl(tmp_path / "c4.jsonl", rows)
    with pytest.raises(DataError, match=r"^c4\.jsonl line 17: invalid JSON: "):
        load_jsonl_texts(p)
    with pytest.raises(DataError, match=r"^c4\.jsonl line 17: invalid JSON: "):
        load_jsonl(p)


def test_jsonl_missing_field(tmp_path):
    p = write_jsonl(tmp_path / "c4.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(DataError, match=r"c4\.jsonl line 2: missing field 'text'"):
        load_jsonl_texts(p)
    p = write_jsonl(tmp_path / "c4.jsonl", [{"text": 3}])
    with pytest.raises(DataError, match=r"line 1: field 'text' is int"):
        load_jsonl_texts(p)
    p = write_jsonl(tmp_path / "c4.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match="line 1"):
        load_jsonl(p)


# ---------------------------------------------------------------------------------------------- c4 split
def test_c4_ranges():
    r = c4_ranges(1000, 500, 100, n_holdout=50)
    assert r == {"calib": (0, 500), "holdout": (850, 900), "eval": (900, 1000)}
    with pytest.raises(ValueError, match="overlap"):
        c4_ranges(1000, 900, 101)
    with pytest.raises(ValueError):
        c4_ranges(10, -1, 1)


def test_split_c4_disjoint_deterministic(tmp_path):
    p = write_jsonl(tmp_path / "c4.jsonl", [{"text": f"doc{i}"} for i in range(20)])
    s = split_c4(p, n_calib=8, n_eval=5, seed=3, n_holdout=4)
    assert s.calib_range == (0, 8) and s.holdout_range == (11, 15) and s.eval_range == (15, 20)
    assert sorted(s.calib_indices) == list(range(8))
    assert sorted(s.holdout_indices) == list(range(11, 15))
    assert sorted(s.eval_indices) == list(range(15, 20))
    assert not (set(s.calib) & set(s.eval)) and not (set(s.calib) & set(s.holdout))
    assert not (set(s.holdout) & set(s.eval))
    assert s.calib == [f"doc{i}" for i in s.calib_indices]
    s2 = split_c4(p, n_calib=8, n_eval=5, seed=3, n_holdout=4)
    assert s2.calib == s.calib and s2.eval == s.eval and s2.holdout == s.holdout
    s3 = split_c4(p, n_calib=8, n_eval=5, seed=None)
    assert s3.calib == [f"doc{i}" for i in range(8)] and s3.eval == [f"doc{i}" for i in range(15, 20)]
    assert s3.holdout == []
    # eval docs do not depend on n_calib
    assert sorted(split_c4(p, 2, 5, seed=None).eval) == sorted(s3.eval)
    d = s.describe()
    assert d["calib_range"] == [0, 8] and d["eval_range"] == [15, 20] and d["n_docs"] == 20
    json.dumps(d)


# ------------------------------------------------------------------------------------------- real data
def test_real_wikitext(data_dir):
    text = D.load_wikitext2_test(data_dir)
    assert "\r" not in text
    assert text.startswith(" = Robert Boulter = \n Robert Boulter is")
    assert text.count("\n") == 2891


def test_real_c4_split(data_dir):
    s = split_c4(D.c4_sample_path(data_dir), n_calib=500, n_eval=100, seed=0, n_holdout=100)
    assert s.n_docs == 1000 and len(s.calib) == 500 and len(s.eval) == 100 and len(s.holdout) == 100
    assert s.eval_range == (900, 1000) and s.holdout_range == (800, 900)
