"""Benchmark tables merge reruns into earlier results."""

from __future__ import annotations

from bitfold.tools.bench import merge_rows


def test_merge_replaces_same_rows_keeps_the_rest_and_orders():
    old = [{"model": "a", "variant": "x", "value": 1}, {"model": "a", "variant": "y", "value": 2}, {"model": "b", "variant": "x", "value": 3}]
    new = [{"model": "a", "variant": "x", "value": 9}]
    assert merge_rows(old, new) == old[1:] + new
    assert [r["value"] for r in merge_rows(old, new, ["x", "y"])] == [9, 2, 3]
