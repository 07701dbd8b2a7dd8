"""Benchmark tables merge reruns into earlier results, and every results file records what produced it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bitfold.tools.bench import merge_rows, provenance

ROOT = Path(__file__).parent.parent.parent


def test_merge_replaces_same_rows_keeps_the_rest_and_orders():
    old = [{"model": "a", "variant": "x", "value": 1}, {"model": "a", "variant": "y", "value": 2}, {"model": "b", "variant": "x", "value": 3}]
    new = [{"model": "a", "variant": "x", "value": 9}]
    assert merge_rows(old, new) == old[1:] + new
    assert [r["value"] for r in merge_rows(old, new, ["x", "y"])] == [9, 2, 3]


def _git(*args: str) -> str:
    try:
        run = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except OSError:
        pytest.skip("git is not installed")
    if run.returncode:
        pytest.skip(f"{ROOT} is not a git checkout")
    return run.stdout.strip()


def test_provenance_records_command_commit_and_machine():
    head = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    stamp = provenance([str(ROOT / "benchmarks" / "quant_table.py"), "--only", "W4 g128"])
    assert set(stamp) == {"command", "commit", "machine"}
    assert all(isinstance(v, str) and v for v in stamp.values()), stamp
    assert stamp["command"] == "python benchmarks/quant_table.py --only 'W4 g128'"
    assert stamp["commit"] == head + ("+dirty" if dirty else "")
    assert "CPUs" in stamp["machine"] and "onnxruntime " in stamp["machine"], stamp["machine"]


def test_provenance_reads_sys_argv_by_default(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "sparse_table.py"), "--skip-done"])
    assert provenance()["command"] == "python benchmarks/sparse_table.py --skip-done"


def test_provenance_without_a_repository_has_no_commit(tmp_path):
    stamp = provenance([str(tmp_path / "run.py")])
    assert stamp["commit"] is None
    assert stamp["command"] == f"python {tmp_path / 'run.py'}"


def test_run_measured_reports_the_child_peak_memory_and_exit_code():
    """The kernel's high-water mark for the child: a 300 MB array held for an instant is seen even between samples,
    and the parent's own memory is not counted."""
    import sys

    from bitfold.tools.bench import run_measured

    import numpy as np

    ballast = np.ones(800_000_000 // 8)  # this process is large: the child's figure must not include it
    code = "import numpy as np, time; a = np.ones(300_000_000 // 8); time.sleep(0.01); del a; time.sleep(0.5); raise SystemExit(3)"
    result = run_measured([sys.executable, "-c", code], poll=0.2)
    del ballast
    assert result["returncode"] == 3
    assert 300e6 < result["peak_rss_bytes"] < 1e9
    assert result["trace"] and result["wall_s"] > 0.3
    chatty = run_measured([sys.executable, "-c", "import sys; sys.stderr.write('x' * 500_000 + 'end')"], poll=0.05)
    assert chatty["returncode"] == 0 and chatty["stderr_tail"].endswith("end")  # a full pipe would have blocked it
