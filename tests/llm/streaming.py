"""The same recipe in memory and streamed (weights read from disk at each use, new ones written to a store)."""

from __future__ import annotations

from pathlib import Path


def in_memory_and_streamed(source: Path, steps: list, calibration, tmp_path: Path):
    """(in-memory model, its report, the streamed run's output saved with external data and loaded back)."""
    import bitfold
    from bitfold.frontend.stream import WeightStore, read_on_demand, storing

    memory, report = bitfold.optimize(bitfold.load(source), steps, calibration)
    streamed = bitfold.load(source)
    assert read_on_demand(streamed) > 0, "the source's weights must be external data read on demand"
    store = WeightStore(tmp_path)
    try:
        with storing(store):
            streamed, _ = bitfold.optimize(streamed, steps, calibration)
        out = bitfold.save(streamed, tmp_path / "stream" / "model.onnx", external_data=True)
    finally:
        store.close()
    return memory, report, bitfold.load(out)
