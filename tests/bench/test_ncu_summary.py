"""bench/ncu_step.py --summarize: ncu's CSV exports reduced to JSON (no GPU, no ncu: small hand-made exports)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "ncu_step.py"
STALL = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"


def _write(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_summarize_raw_and_sass_exports(tmp_path):
    raw, sass, out = tmp_path / "raw.csv", tmp_path / "sass_k.csv", tmp_path / "s.json"
    hdr = ["ID", "Kernel Name", "gpu__time_duration.sum", "smsp__inst_executed.sum", STALL.format("barrier"),
           STALL.format("long_scoreboard"), STALL.format("wait")]
    _write(raw, [hdr, ["", "", "us", "inst", "inst", "inst", "inst"],
                 ["0", "_gather_rows_kernel", "25.31", "6,731,040", "1.0", "7.5", "0.5"],
                 ["1", "_sparse_mlp_kernel", "18.02", "4,596,736", "1.25", "1.75", "0.0"]])
    _write(sass, [["Kernel Name", "_sparse_mlp_kernel"], ["Address", "Source", "Instructions Executed"],
                  ["0x0", "      LDS.U16 R24, [R34+0xd800]", "30"], ["0x10", "      FFMA R1, R2, R3, R1", "60"],
                  ["0x20", "  @!P0  BRA 0x7fdb1184c240", "10"], ["0x30", "", ""]])
    r = subprocess.run([sys.executable, str(SCRIPT), "--summarize", str(raw), str(sass), "--out", str(out),
                        "--note", "hand-made"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["note"] == "hand-made" and [x["kernel"] for x in res["launches"]] == ["_gather_rows_kernel",
                                                                                   "_sparse_mlp_kernel"]
    g = res["launches"][0]
    assert g["duration_us"] == 25.31 and g["warp_instructions"] == 6731040 and g["cycles_per_issue"] == 9.0
    assert list(g["top_stalls_per_issue"]) == ["long_scoreboard", "barrier", "wait"]
    (s,) = res["sass"]
    assert s["kernel"] == "_sparse_mlp_kernel" and s["warp_instructions"] == 100
    assert s["top_opcodes_share"] == {"FFMA": 0.6, "LDS.U16": 0.3, "BRA": 0.1}  # predicated opcodes counted by name


def test_summarize_needs_an_output(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--summarize", str(tmp_path / "x.csv")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--summarize needs --out" in r.stderr
