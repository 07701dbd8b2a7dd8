"""``bitfold demo``: the main job on built-in models, no files and no network.

Builds two seeded models (a small CNN with BatchNorm, a small pre-norm transformer block), exports them with
``from_torch``, optimizes them with the canonical recipe under verification, benchmarks before against after with
ONNX Runtime (interleaved rounds), and returns one row per model.
"""

from __future__ import annotations

from typing import Any

from bitfold.backends import compile
from bitfold.frontend import clone, from_torch
from bitfold.frontend.inputs import sample_feeds
from bitfold.passes.canonical import CANONICAL
from bitfold.pipeline import Pipeline
from bitfold.summary import summarize
from bitfold.tools.bench import compare


def demo_models() -> dict[str, tuple[Any, tuple]]:
    """name → (torch module, example inputs), seeded."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64), nn.ReLU(),
            )  # fmt: skip
            self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(64, 10))

        def forward(self, x):
            return self.head(self.features(x).mean(dim=(2, 3), keepdim=True))

    class TransformerBlock(nn.Module):
        def __init__(self, dim: int = 64, heads: int = 4) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * dim, dim))

        def forward(self, x):
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.norm2(x))

    cnn = SmallCNN().eval()
    for module in cnn.modules():  # non-trivial running statistics, as a trained network has
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return {
        "cnn-bn": (cnn, (torch.randn(1, 3, 64, 64),)),
        "transformer-block": (TransformerBlock().eval(), (torch.randn(1, 32, 64),)),
    }


def run_demo(*, rounds: int = 10, iters: int = 20) -> list[dict[str, Any]]:
    rows = []
    for name, (module, inputs) in demo_models().items():
        model = from_torch(module, inputs)
        before = clone(model)
        feeds = sample_feeds(model)
        optimized, report = Pipeline(list(CANONICAL), verify=True).run(model, feeds=feeds)
        stats = compare(
            [compile(before, "ort", "cpu", spinning=False), compile(optimized, "ort", "cpu", spinning=False)],
            [feeds, feeds],
            rounds=rounds,
            iters=iters,
        )
        start, end = summarize(before), summarize(optimized)
        rows.append(
            {
                "model": name,
                "nodes_before": start["nodes"],
                "nodes_after": end["nodes"],
                "ops_removed": _removed(start["ops"], end["ops"]),
                "kb_before": start["parameter_bytes"] / 1024,
                "kb_after": end["parameter_bytes"] / 1024,
                "max_rel_err": max(r.max_rel for r in report.passes),
                "p50_ms_before": stats[0]["p50"],
                "p50_ms_after": stats[1]["p50"],
                "speedup": 1.0 / stats[1]["ratio"],
            }
        )
    return rows


def _removed(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {op: n - after.get(op, 0) for op, n in before.items() if n > after.get(op, 0)}
