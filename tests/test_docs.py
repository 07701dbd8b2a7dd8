"""The documentation: the site builds, generated pages and tables are current, and every number traces to a result.

What counts as a measured number (``test_every_docs_number_traces_to_a_results_file``), in README.md and
docs/**/*.md outside generated text:

- Generated text is not scanned: the blocks ``<!-- table: NAME -->`` … ``<!-- /table: NAME -->`` and the pages
  benchmarks/docs_pages.py writes. Their numbers come from a script by construction, and
  ``test_generated_tables_are_current`` / ``test_pass_reference_is_current`` prove the committed text is what the
  script prints from the results files now.
- Inputs are not scanned: inline code spans, fenced code blocks with a language (``toml``, ``python``, …; a fence
  without one, such as sample output, is scanned), link targets and HTML comments.
- A number is a measurement when it is written with a decimal part (``29.07``, ``6.1e-7``), with thousands
  separators (``8,176``), or followed by a unit or ratio sign: ``%``, ``×`` (not ``4096×4096``), ``ms``, ``µs``,
  ``s``, ``min``, ``KB``, ``MB``, ``GB``, ``GB/s``, ``GFLOP/s``, ``tok/s``. A bare integer is a count or size
  given as a protocol parameter (windows, tokens, bits, cores) and is not checked.
- Not measurements either: part of a name (``W4``, ``g128``, ``b1.58``, ``Q4_0``, ``1x3x224x224``), a version
  (two dots, or right after a package name: ``ORT 1.31``), a tolerance written as a power of ten without a
  decimal mantissa (``1e-5``, ``5e-2``), a bound after a comparison (``> 1.8 GB``, ``over 2 GB``), and a value
  right after a parameter name in ``PARAMETERS`` (``α 0.5``, ``clip 0.9``, ``damp 0.003``).
- In a range (``26–30 GB/s``) both ends carry the unit.

Each remaining number must equal, at its displayed precision, a value in a results file: a JSON number (or a
number inside a JSON string) in benchmarks/results/, scaled by the unit (``%``: ×1 or ×100, ``MB``: bytes/1e6,
``ms``: ms or s·1e3, …), in one of the results files the number's section (the text up to the next heading)
names: a ``benchmarks/results/X.json`` path, a ``benchmarks/X.py`` script that writes one, or a generated table's
stamp. A section that names no results file has none to trace to, so every measured number in it is reported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
sys.path.append(str(BENCH))  # after site-packages: a benchmark script never shadows an installed module

import docs_pages  # noqa: E402
import docs_tables  # noqa: E402

#: Words after which a number is a parameter the docs set, not a result.
PARAMETERS = ("α", "alpha", "clip", "damp", "lr", "max_error", "ρ", "σ", "tolerance", "rtol", "ratio", "percentile")
#: Words after which a number is a version.
PACKAGES = ("ORT", "onnxruntime", "ONNX Runtime", "TVM", "apache-tvm", "torch", "transformers", "ONNX", "opset", "Python",
            "llama.cpp", "mkdocs", "mkdocs-material", "onnxruntime-genai")  # fmt: skip
UNITS = {"%": (1, 100), "×": (1,), "ms": (1, 1e3), "µs": (1, 1e6), "s": (1,), "min": (1, 1 / 60), "KB": (1e-3,),
         "MB": (1e-6, 1), "GB": (1e-9, 1), "GB/s": (1,), "GFLOP/s": (1,), "tok/s": (1,), "": (1,)}  # fmt: skip

NUMBER = re.compile(
    r"(?:(?<![\w.,/])[-−+]|(?<![\w.,/\-−+]))(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d+))?(?:e(?P<exp>[-+]?\d+))?"
    r"(?![\w]|\.\w|,\d{3})"
    r"(?P<unit>\s?(?:%|×(?!\s*\d)|ms\b|µs\b|s\b|min\b|KB\b|MB\b|GB/s|GB\b|GFLOP/s|tok/s))?"
)
RANGE_END = re.compile(r"\s?[–-]\s?[\d.,]+(?P<unit>\s?(?:%|×|ms\b|µs\b|s\b|min\b|KB\b|MB\b|GB/s|GB\b|GFLOP/s|tok/s))")
BOUNDS = (">", "<", "≥", "≤", "over", "under", "at least", "at most")
FENCE = re.compile(r"^```(?P<lang>\S*)[^\n]*\n.*?^```\s*$", re.M | re.S)
HEADING = re.compile(r"^#{1,6} .*$", re.M)
CITES = re.compile(r"benchmarks/results/(?P<file>[\w/]+\.json)|benchmarks/(?P<script>\w+\.py)")


def pages() -> list[Path]:
    generated = {docs_pages.OUT}
    return [ROOT / "README.md", *(p for p in sorted((ROOT / "docs").rglob("*.md")) if p not in generated)]


@cache
def results_values(name: str) -> tuple[float, ...]:
    values: list[float] = []

    def walk(x):
        if isinstance(x, bool) or x is None:
            return
        if isinstance(x, (int, float)):
            values.append(abs(float(x)))
        elif isinstance(x, str):
            values.extend(abs(float(m.replace(",", ""))) for m in re.findall(r"\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?(?:e[-+]?\d+)?", x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(json.loads((RESULTS / name).read_text()))
    return tuple(v for v in values if v == v and v not in (float("inf"),))


def results_files() -> list[str]:
    return sorted(str(p.relative_to(RESULTS)) for p in RESULTS.rglob("*.json") if not any(s.startswith(".") for s in p.relative_to(RESULTS).parts))


@cache
def shown(name: str, unit: str, frac: int | None, sig: int | None) -> frozenset[str]:
    """Every value of results file ``name`` as the docs would print it with this unit and precision."""
    out = set()
    for v in results_values(name):
        for scale in UNITS[unit]:
            x = v * scale
            out.add(f"{x:.{sig - 1}e}" if sig else f"{x:.{frac}f}")
    return frozenset(out)


def _display(m: re.Match) -> tuple[str, int | None, int | None]:
    """The number as a canonical string, its decimals (fixed notation) or significant digits (exponent notation)."""
    integer = m["int"].replace(",", "")
    if m["exp"] is not None:
        mantissa = integer + (m["frac"] or "")
        sig = len(mantissa.lstrip("0")) or 1
        value = float(f"{integer}.{m['frac'] or 0}e{m['exp']}")
        return f"{value:.{sig - 1}e}", None, sig
    frac = len(m["frac"] or "")
    return f"{float(integer + '.' + (m['frac'] or '0')):.{frac}f}", frac, None


def measurements(text: str):
    """(line number, number as written, unit, canonical, decimals, significant digits) of each measured number."""
    for m in NUMBER.finditer(text):
        unit = (m["unit"] or "").strip()
        if not unit:
            tail = RANGE_END.match(text, m.end())
            unit = (tail["unit"] or "").strip() if tail else ""
        if not (m["frac"] or "," in m["int"] or unit):
            continue  # a bare integer: a count or size set by the protocol
        if m["exp"] is not None and m["frac"] is None:
            continue  # 1e-5: a tolerance
        line_start = text.rfind("\n", 0, m.start()) + 1
        before = text[line_start : m.start()].rstrip(" =:(")
        if before.endswith(PARAMETERS) or before.endswith(PACKAGES) or before.endswith(BOUNDS):
            continue
        canonical, frac, sig = _display(m)
        yield text.count("\n", 0, m.start()) + 1, m.group(0).strip(), unit, canonical, frac, sig


def scannable(text: str) -> str:
    """The page with generated blocks, fenced code with a language, code spans, link targets and comments blanked
    (newlines kept, so line numbers stay right)."""

    def blank(m: re.Match) -> str:
        return re.sub(r"[^\n]", " ", m.group(0))

    text = docs_tables.BLOCK.sub(blank, text)
    text = FENCE.sub(lambda m: blank(m) if m["lang"] else m.group(0), text)
    text = re.sub(r"<!--.*?-->", blank, text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", blank, text)
    text = re.sub(r"\]\([^)\s]*\)", blank, text)
    return text


def untraced(text: str, files: list[str] | None = None) -> list[str]:
    """Measured numbers of ``text`` that no results file its section names holds (or none of ``files``, when
    given), as 'line N: number' strings."""
    everything = results_files()
    found = []
    clean = scannable(text)
    starts = [m.start() for m in HEADING.finditer(clean)] + [len(text)]
    sections = [(0, starts[0])] + list(zip(starts, starts[1:]))
    for start, end in sections:
        cited = files
        if cited is None:
            cited = []
            for c in CITES.finditer(text[start:end]):
                if c["file"]:
                    cited.append(c["file"])
                else:
                    cited += [f for f, s in docs_tables.WRITERS.items() if s == c["script"]]
            cited = [f for f in cited if f in everything]
        offset = text.count("\n", 0, start)
        for line, written, unit, canonical, frac, sig in measurements(clean[start:end]):
            value = canonical.lstrip("-−+")
            if not any(value in shown(f, unit, frac, sig) for f in cited):
                found.append(f"line {offset + line}: {written}")
    return found


@pytest.fixture
def fake_results(tmp_path, monkeypatch):
    """Two results files in a temporary results folder: rule_a.json (a perplexity table) and rule_b.json (cosines)."""
    (tmp_path / "rule_a.json").write_text(json.dumps({
        "protocol": "windows 0-15 (8,176 scored)", "rows": [{"ppl": 39.3236, "bytes": 546208392, "ratio": 0.94891}]}))  # fmt: skip
    (tmp_path / "rule_b.json").write_text(json.dumps({"rows": [{"cosine": 0.947311}]}))
    monkeypatch.setattr(sys.modules[__name__], "RESULTS", tmp_path)


def test_number_rule_flags_untraced_numbers_and_skips_parameters(fake_results):
    files = ["rule_a.json"]
    text = "RTN W4 g128 gives 39.32 (g128 is a name), and 39.33 is made up; α 0.5 and `damp = 0.003` are parameters.\n"
    assert untraced(text, files) == ["line 1: 39.33"]
    text = "ORT 1.31, within 1e-5, 4096×4096, 546 MB, 547 MB, 94.9 %, 8,176 tokens, 8,177 tokens, 12 windows\n"
    assert untraced(text, files) == ["line 1: 547 MB", "line 1: 8,177"]
    fenced = "```toml\nratio = 0.123\n```\n```\nspeedup 9.87×\n```\n"
    assert untraced(fenced, files) == ["line 5: 9.87×"]


def test_number_rule_scopes_a_section_to_the_results_it_cites(fake_results):
    text = "## A\n`benchmarks/results/rule_b.json`: cosine 0.9473\n## B\n`benchmarks/results/rule_a.json`: 39.32\n"
    assert untraced(text) == []
    assert untraced(text.replace("0.9473", "39.32", 1)) == ["line 2: 39.32"]
    assert untraced("## C\nperplexity 39.32, 26–30 GB/s, > 1.8 GB\n") == ["line 2: 39.32", "line 2: 26", "line 2: 30 GB/s"]


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in pages()])
def test_every_docs_number_traces_to_a_results_file(page):
    problems = untraced((ROOT / page).read_text())
    assert not problems, (
        f"{page}: numbers that no results file named in their section holds at the shown precision "
        f"(quote them from a generated table and name its results file, or remove them):\n" + "\n".join(problems)
    )


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in pages()])
def test_every_table_has_a_header_row(page):
    """A run of table rows must start with a header and a |---| separator: a blank line inside a table splits it
    and the rows after it render as plain text."""
    text = FENCE.sub("", (ROOT / page).read_text())
    runs = re.findall(r"(?:^\|.*\n?)+", text, re.M)
    broken = [run.splitlines()[0][:60] for run in runs if len(run.splitlines()) < 2 or not re.match(r"^\|[\s:-]*-{3}", run.splitlines()[1])]
    assert not broken, f"{page}: table rows without a header and separator, starting at: {broken}"


def test_generated_tables_are_current():
    stale = [str(p.relative_to(ROOT)) for p in docs_tables.pages() if docs_tables.update(p.read_text()) != p.read_text()]
    assert not stale, f"generated tables differ from the results files in {stale}; run `python benchmarks/docs_tables.py`"


def test_gap_closed_compares_a_row_with_rtn_on_its_own_grid():
    rows = [{"variant": "FP32", "ppl": 10.0, "ppl_heldout": 20.0},
            {"variant": "RTN W4 g128", "ppl": 30.0, "ppl_heldout": 40.0},
            {"variant": "GPTQ W4 g128", "ppl": 20.0, "ppl_heldout": 35.0},
            {"variant": "GPTQ W4 g128 asym", "ppl": 15.0, "ppl_heldout": 25.0},
            {"variant": "ShiftAddLLM (GPTQ) q3 g128", "ppl": 15.0, "ppl_heldout": 25.0}]  # fmt: skip
    assert docs_tables._gap_closed(rows[2], rows) == "50 % / 25 %"
    assert docs_tables._gap_closed(rows[1], rows) == "-"  # RTN against itself
    assert docs_tables._gap_closed(rows[3], rows) == "-"  # no RTN row on the asymmetric grid
    assert docs_tables._gap_closed(rows[4], rows) == "-"  # no integer grid


def test_every_results_file_has_a_table_and_a_writer():
    for name in results_files():
        assert name in docs_tables.WRITERS, f"{name} has no entry in docs_tables.WRITERS"
    cited = {c["file"] or c["script"] for p in docs_tables.pages() for c in CITES.finditer(p.read_text())}
    for name, script in docs_tables.WRITERS.items():
        source = (BENCH / script).read_text()
        assert Path(name).stem in source or Path(name).parent.name in source, f"{script} does not write {name}"
        assert name in cited or script in cited, f"no docs page names {name} or {script}"


def test_every_benchmark_script_has_a_results_file_and_a_docs_section():
    scripts = {p.name for p in BENCH.glob("*.py")}
    for script in sorted(scripts - docs_tables.GENERATORS):
        assert script in docs_tables.WRITERS.values(), f"benchmarks/{script} has no results file in docs_tables.WRITERS"
        assert script in docs_tables.SECTIONS, f"benchmarks/{script} has no docs section in docs_tables.SECTIONS"
    in_bench = docs_tables.make_bench_scripts()
    assert in_bench, "no benchmark script found under the Makefile's bench target"
    assert in_bench <= scripts, f"`make bench` runs scripts that do not exist: {sorted(in_bench - scripts)}"


def test_pass_reference_is_current():
    assert docs_pages.OUT.read_text() == docs_pages.render(), "docs/reference/passes.md is stale; run `python benchmarks/docs_pages.py`"


def test_pass_reference_lists_every_pass_with_its_parameters():
    from bitfold.passes import describe, registered

    page = docs_pages.render()
    for cls in registered().values():
        info = describe(cls)
        assert f"## `{info['name']}`" in page
        for param in info["params"]:
            assert f"| `{param['name']}` |" in page, f"{info['name']}.{param['name']} is missing"


def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "reference" / "passes" / "index.html").exists()
    assert (tmp_path / "site" / "benchmarks" / "results" / "llm_decode.png").exists()
