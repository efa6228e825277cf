"""dejavu.atomic: a write either lands whole or leaves the old file (and no temporary file) behind."""

import json
import stat

import pytest

from dejavu.atomic import atomic_path, write_json_atomic, write_text_atomic


def test_text_and_json_land_whole(tmp_path):
    p = write_text_atomic(tmp_path / "sub" / "a.md", "hello\n")
    assert p.read_text() == "hello\n" and stat.S_IMODE(p.stat().st_mode) == 0o644
    j = write_json_atomic(tmp_path / "a.json", {"x": 1, "p": tmp_path})
    assert json.loads(j.read_text()) == {"x": 1, "p": str(tmp_path)}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.json", "sub"]  # no temporaries left


def test_failure_keeps_the_old_file(tmp_path):
    target = write_text_atomic(tmp_path / "r.json", "old")
    with pytest.raises(ValueError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise ValueError("boom")
    assert target.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(TypeError):  # a tuple key is not JSON (default=str converts values, not keys)
        write_json_atomic(target, {(1, 2): 3})
    assert target.read_text() == "old"
