"""The pipeline report: one record per pass, JSON-ready, with a table rendering for the CLI."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class OutputError:
    output: int
    max_abs: float
    max_rel: float


@dataclasses.dataclass
class PassRecord:
    name: str
    params: dict[str, Any]
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    ops_added: dict[str, int]
    ops_removed: dict[str, int]
    param_bytes_before: int
    param_bytes_after: int
    #: One entry per graph output, filled when the pipeline verifies.
    errors: list[OutputError] | None = None
    #: What the pass left alone and why (unsupported structure), one sentence each.
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def max_rel(self) -> float | None:
        return max((e.max_rel for e in self.errors), default=0.0) if self.errors is not None else None


@dataclasses.dataclass
class PipelineReport:
    input: dict[str, Any]
    verified: bool
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    output: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def table(self):
        """A rich Table: one row per pass."""
        from rich.table import Table

        table = Table(title="bitfold pipeline")
        for column in ("pass", "modified", "nodes", "ops removed", "ops added", "param MB", "ms", "max rel err"):
            table.add_column(column, justify="left" if column.startswith(("pass", "ops")) else "right")
        for r in self.passes:
            table.add_row(
                r.name,
                "yes" if r.modified else "no",
                f"{r.nodes_before} → {r.nodes_after}",
                _ops(r.ops_removed),
                _ops(r.ops_added),
                f"{r.param_bytes_before / 1e6:.2f} → {r.param_bytes_after / 1e6:.2f}",
                f"{r.seconds * 1e3:.1f}",
                "-" if r.max_rel is None else f"{r.max_rel:.2e}",
            )
        notes = [f"{r.name}: {note}" for r in self.passes for note in r.notes]
        if notes:
            table.caption = "\n".join(notes)
        return table


def _ops(ops: dict[str, int]) -> str:
    return ", ".join(f"{k}×{v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])) or "-"
