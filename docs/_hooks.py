"""mkdocs hook: serve the plots in benchmarks/results/ at benchmarks/results/ in the site.

Pages link to a plot as ``benchmarks/results/NAME.png``; the files stay where the benchmark scripts write them.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).parent.parent / "benchmarks" / "results"


def on_files(files, config):
    for path in sorted(RESULTS.rglob("*.png")):
        relative = path.relative_to(RESULTS)
        if not any(part.startswith(".") for part in relative.parts):
            files.append(File.generated(config, f"benchmarks/results/{relative.as_posix()}", abs_src_path=str(path)))
    return files
