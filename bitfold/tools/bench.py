"""Latency comparison of several runnables: interleaved rounds, medians, ratios to the first (the baseline).

ONNX Runtime sessions in one process each keep a spinning thread pool; timing them back to back lets one pool's
spinning steal the cores of another. Sessions compared here are built with spinning off and timed in interleaved
rounds (A B C A B C ...), and results are reported as medians and as ratios to the first model.

Every results file also records its ``provenance``: the command that wrote it, the commit and the machine.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bitfold.backends import Runnable, latency_stats


def compare(
    runnables: Sequence[Runnable],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    warmup: int = 5,
    rounds: int = 10,
    iters: int = 10,
) -> list[dict[str, float]]:
    """Latency stats (ms) per runnable plus ``ratio`` = its p50 / the first runnable's p50."""
    for runnable, feed in zip(runnables, feeds, strict=True):
        runnable.times(feed, warmup)
    times: list[list[float]] = [[] for _ in runnables]
    for _ in range(rounds):
        for index, (runnable, feed) in enumerate(zip(runnables, feeds, strict=True)):
            times[index].extend(runnable.times(feed, iters))
    stats = [latency_stats(t) for t in times]
    for s in stats:
        s["ratio"] = s["p50"] / stats[0]["p50"]
    return stats


def merge_rows(previous: Sequence[dict], rows: Sequence[dict], order: Sequence[str] = ()) -> list[dict]:
    """Result rows of a rerun merged into an earlier table: new rows replace those with the same (model, variant),
    the rest stay; with ``order`` (variant labels), rows are sorted by model, then by their place in it."""
    fresh = {(r["model"], r["variant"]) for r in rows}
    merged = [r for r in previous if (r["model"], r["variant"]) not in fresh] + list(rows)
    if order:
        rank = {label: i for i, label in enumerate(order)}
        merged.sort(key=lambda r: (r["model"], rank.get(r["variant"], len(rank))))
    return merged


def provenance(argv: Sequence[str] | None = None) -> dict[str, str | None]:
    """What produced a results file: ``command`` (``python <script relative to its repository> <arguments>``),
    ``commit`` (short hash of the script's repository, ``+dirty`` when tracked files differ from it; None without
    git) and ``machine`` (CPU model, CPUs available to the process, memory, OS, onnxruntime and tvm versions).

    ``argv`` defaults to ``sys.argv``."""
    argv = list(sys.argv if argv is None else argv) or [""]
    script = Path(argv[0] or "-").resolve()
    root = _git(script.parent, "rev-parse", "--show-toplevel")
    shown = script.relative_to(root).as_posix() if root and script.is_relative_to(root) else argv[0]
    commit = _git(script.parent, "rev-parse", "--short", "HEAD")
    if commit and _git(script.parent, "status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {"command": shlex.join(["python", shown, *argv[1:]]), "commit": commit, "machine": _machine()}


def _git(cwd: Path, *args: str) -> str | None:
    """``git args`` run in ``cwd``: its stripped output, or None where git or the repository is missing."""
    try:
        run = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip()


def _machine() -> str:
    """``"<CPU model>, <n> CPUs, <m> GB memory, <OS> <release>, onnxruntime <v>, tvm <v>"``."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine() or "unknown CPU"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [cpu, f"{cpus} CPUs"]
    try:
        parts.append(f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9:.0f} GB memory")
    except (AttributeError, ValueError, OSError):
        pass
    parts.append(f"{platform.system()} {platform.release()}".strip())
    parts += [f"{name} {version}" for name in ("onnxruntime", "tvm") if (version := _version(name))]
    return ", ".join(parts)


def _version(module: str) -> str | None:
    """The module's ``__version__``, or None where importing it fails."""
    try:
        return str(__import__(module).__version__)
    except Exception:  # an optional package can fail to import in many ways (missing libraries, ABI mismatches)
        return None


def run_measured(command: Sequence[str], *, poll: float = 0.05, env: Mapping[str, str] | None = None) -> dict:
    """Run ``command`` in its own process; return its wall time, exit code, peak resident memory and the resident
    memory sampled every ``poll`` seconds (``trace``: [seconds, bytes] pairs) for plots.

    The peak is the kernel's high-water mark of the process's own memory since it started its program (``VmHWM``),
    read at every sample: a peak between two samples is still counted, only one in the last ``poll`` seconds before
    exit could be missed. (``ru_maxrss`` from ``wait4`` is not used: it also counts the memory of this process at
    the fork.) Its stderr goes to a temporary file (a pipe nobody reads would block a chatty child); the last 2,000
    characters come back."""
    import tempfile
    import time

    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(list(command), env=None if env is None else {**os.environ, **env},
                                   stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
        trace: list[list[float]] = []
        peak = 0
        try:
            while process.poll() is None:
                rss, hwm = _memory(process.pid)
                peak = max(peak, hwm)
                trace.append([round(time.perf_counter() - start, 2), rss])
                time.sleep(poll)
        finally:
            if process.returncode is None:  # interrupted: the child does not outlive us
                process.kill()
                process.wait()
        wall = time.perf_counter() - start
        stderr.seek(0)
        tail = stderr.read().decode(errors="replace")[-2000:]
    return {"wall_s": round(wall, 2), "returncode": process.returncode, "peak_rss_bytes": peak, "trace": trace,
            "stderr_tail": tail}  # fmt: skip


def _memory(pid: int) -> tuple[int, int]:
    """(resident bytes now, high-water mark of resident bytes) of process ``pid``; zeros once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0
    kb = {k: int(v.split()[0]) * 1024 for k, v in fields.items()}
    return kb.get("VmRSS", 0), kb.get("VmHWM", 0)
