"""The graph fuzzer: generated graphs are valid and cover the op set, the checker classifies planted bugs, shrinking
finds minimal graphs, and every pass case holds on seeded random graphs."""

from __future__ import annotations

import collections
import random

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

import bitfold
from bitfold.errors import BitfoldError
from bitfold.passes.registry import registered
from bitfold.tools import fuzz

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

SEEDED = dict(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck), print_blob=False)
CASES = fuzz.pass_cases()

#: Cases that fail on the seeded graphs today, with the regression test (tests/tools/test_fuzz_regressions.py)
#: holding the minimal graph of the failure. They run without shrinking, to keep the suite fast; each mark goes
#: when its defect is fixed (the test then passes, which strict xfail reports).
KNOWN_FAILURES: dict[str, str] = {}


def _unoptimized_shapes(graph: fuzz.FuzzGraph) -> dict[str, tuple[int, ...]]:
    """Output shapes ORT computes with its graph optimizer off (it rejects a few valid graphs when on)."""
    from bitfold.backends.ort import OrtRunnable

    outputs = OrtRunnable(graph.model, device="cpu", optimization="none").run(graph.feeds)
    return {name: value.shape for name, value in outputs.items()}


@settings(max_examples=40, **SEEDED)
@given(graph=fuzz.graphs(runnable=False))
def test_generated_graphs_are_valid_and_shapes_are_right(graph: fuzz.FuzzGraph) -> None:
    """Strict ONNX shape inference accepts every graph, and ORT computes the output shapes the generator declared."""
    onnx.checker.check_model(ir.to_proto(graph.model), full_check=True)
    assert _unoptimized_shapes(graph) == graph.shapes
    for sample in [graph.feeds, *graph.calibration]:
        assert set(sample) == {v.name for v in graph.model.graph.inputs}


def _features(graph: fuzz.FuzzGraph) -> set[str]:
    model = graph.model
    features = {f"op:{node.op_type}" for node in model.graph}
    features |= {f"dtype:{graph.dtype}", f"opset:{model.opset_imports['']}"}
    uses = collections.Counter(id(v) for node in model.graph for v in node.inputs if v is not None)
    if any(uses[id(v)] >= 2 for v in model.graph.initializers.values()):
        features.add("shared initializer")
    if any(uses[id(out)] >= 2 for node in model.graph for out in node.outputs if node.op_type != "Constant"):
        features.add("several readers")
    if any(out.uses() for out in model.graph.outputs):
        features.add("mid-graph output")
    if any(node.op_type == "Constant" for node in model.graph):
        features.add("constant nodes")
    if any(out.type is None for node in model.graph for out in node.outputs if out not in model.graph.outputs):
        features.add("unannotated")
    for node in model.graph:
        if node.op_type in ("Conv", "ConvTranspose"):
            group = node.attributes.get_int("group", 1)
            dilations = node.attributes.get_ints("dilations", [1])
            features |= {f"{node.op_type} groups"} if group > 1 else set()
            features |= {f"{node.op_type} dilations"} if max(dilations) > 1 else set()
        if node.op_type == "Gemm":
            for name in ("transA", "transB"):
                features |= {f"Gemm {name}"} if node.attributes.get_int(name, 0) else set()
            features |= {"Gemm alpha"} if node.attributes.get_float("alpha", 1.0) != 1.0 else set()
            features |= {"Gemm beta"} if node.attributes.get_float("beta", 1.0) != 1.0 else set()
    return features


def test_generator_covers_the_op_set_and_graph_features() -> None:
    seen: set[str] = set()
    for i in range(150):
        seen |= _features(fuzz.build_graph(fuzz.RandomChoices(f"cover:{i}")))
    wanted = {f"op:{op}" for op in (
        "Conv", "ConvTranspose", "BatchNormalization", "MatMul", "Gemm", "Add", "Mul", "LayerNormalization", "Pow",
        "ReduceMean", "Sqrt", "Div", "Reciprocal", "Relu", "Clip", "Sigmoid", "Softmax", "Reshape", "Transpose",
        "Concat", "Split", "Gather",
    )}  # fmt: skip
    wanted |= {"dtype:float32", "dtype:float16"} | {f"opset:{o}" for o in range(17, 22)}
    wanted |= {"shared initializer", "several readers", "mid-graph output", "constant nodes", "unannotated"}
    wanted |= {"Conv groups", "Conv dilations", "ConvTranspose groups", "ConvTranspose dilations"}
    wanted |= {"Gemm transA", "Gemm transB", "Gemm alpha", "Gemm beta"}
    assert wanted <= seen, f"never generated: {sorted(wanted - seen)}"


def test_replay_rebuilds_a_graph_and_any_choice_list_builds_a_valid_one() -> None:
    source = fuzz.RandomChoices("replay")
    graph = fuzz.build_graph(source)
    again = fuzz.replay(source.record)
    assert again.text() == graph.text()
    for feeds, fed in zip([graph.feeds, *graph.calibration], [again.feeds, *again.calibration], strict=True):
        assert all(np.array_equal(feeds[k], fed[k]) for k in feeds)
    rng = random.Random(1)
    for values in ([], [0] * 50, [10**6] * 400, [rng.randrange(64) for _ in range(300)]):
        replayed = fuzz.replay(values)
        onnx.checker.check_model(ir.to_proto(replayed.model), full_check=True)
        assert _unoptimized_shapes(replayed) == replayed.shapes


def test_every_registered_pass_has_a_case_and_cases_are_valid_recipes() -> None:
    names = {step if isinstance(step, str) else step["name"] for case in CASES for step in case.steps}
    assert set(registered()) <= names
    assert len({case.label for case in CASES}) == len(CASES)
    assert set(KNOWN_FAILURES) <= {case.label for case in CASES}
    for case in CASES:
        bitfold.Recipe.from_list(list(case.steps))  # valid parameters


# ---- the checker on planted bugs ----------------------------------------------------------------------------------

_MATMUL = """
<ir_version: 10, opset_import: ["" : 17]>
planted (float[2,3] x) => (float[2,4] y) <float[3,4] w = {1,2,3,4,5,6,7,8,9,10,11,12}, float[4] b = {1,1,1,1}> {
    h = MatMul (x, w)
    y = Add (h, b)
}
"""


def _planted_graph(dtype: str = "float32") -> fuzz.FuzzGraph:
    model = ir.from_proto(onnx.parser.parse_model(_MATMUL))
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((2, 3)).astype(np.float32)} for _ in range(3)]
    return fuzz.FuzzGraph(model, samples[0], samples[1:], dtype, {"y": (2, 4)})


def _planted(mutate=None, *, modified: bool | None = None, raises: BaseException | None = None):
    """An ``optimize`` that runs remove-dead, then applies ``mutate(model, calibration)`` and overrides its claim."""

    def optimize(model, steps, calibration):
        if raises is not None:
            raise raises
        model, report = bitfold.optimize(model, ["remove-dead"], calibration)
        if mutate:
            mutate(model, calibration)
        if modified is not None:
            report.passes[0].modified = modified
        return model, report

    return optimize


def _scale_weight(factor: float):
    def mutate(model, calibration):
        w = model.graph.initializers["w"]
        w.const_value = ir.tensor(w.const_value.numpy() * factor, name="w")

    return mutate


EXACT = fuzz.PassCase("planted", ("remove-dead",), exact=True)
LOSSY = fuzz.PassCase("planted", ("remove-dead",), exact=False)


def test_checker_accepts_a_correct_rewrite() -> None:
    outcome = fuzz.check(_planted_graph(), EXACT, optimize=_planted())
    assert (outcome.kind, outcome.error) == ("ok", 0.0)


def test_checker_reports_a_refusal_as_a_decline() -> None:
    outcome = fuzz.check(_planted_graph(), EXACT, optimize=_planted(raises=BitfoldError("no BatchNormalization to fold.")))
    assert (outcome.kind, outcome.detail) == ("decline", "BitfoldError: no BatchNormalization to fold.")
    assert not outcome.failed


def test_checker_reports_other_exceptions_as_crashes() -> None:
    outcome = fuzz.check(_planted_graph(), EXACT, optimize=_planted(raises=KeyError("w")))
    assert (outcome.kind, outcome.reason, outcome.detail) == ("crash", "KeyError", "KeyError: 'w'")


def test_checker_reports_a_changed_output_of_an_exact_pass_and_not_of_a_lossy_one() -> None:
    outcome = fuzz.check(_planted_graph(), EXACT, optimize=_planted(_scale_weight(1.001), modified=True))
    assert (outcome.kind, outcome.reason) == ("mismatch", "relative error")
    assert fuzz.check(_planted_graph(), LOSSY, optimize=_planted(_scale_weight(1.001), modified=True)).kind == "ok"
    within = fuzz.check(_planted_graph(), EXACT, optimize=_planted(_scale_weight(1 + 1e-6), modified=True))
    assert within.kind == "ok" and 0 < within.error < 1e-5 and within.dtype == "float32"


def test_tolerance_follows_the_graph_dtype() -> None:
    """1e-3 relative (2 units of float16 rounding) is within the float16 tolerance, not the float32 one."""
    scaled = _planted(_scale_weight(1.001), modified=True)
    assert fuzz.check(_planted_graph("float16"), EXACT, optimize=scaled).kind == "ok"
    assert fuzz.check(_planted_graph("float32"), EXACT, optimize=scaled).kind == "mismatch"
    assert fuzz.tolerance("float16") == 2.0**-7 and fuzz.tolerance("float32") == 1e-5


def test_checker_reports_lost_finiteness_of_a_lossy_pass() -> None:
    outcome = fuzz.check(_planted_graph(), LOSSY, optimize=_planted(_scale_weight(np.inf), modified=True))
    assert (outcome.kind, outcome.reason) == ("mismatch", "non-finite")


def test_checker_reports_a_false_modified_claim() -> None:
    outcome = fuzz.check(_planted_graph(), EXACT, optimize=_planted(_scale_weight(1.0 + 1e-7), modified=False))
    assert (outcome.kind, outcome.reason) == ("contract", "modified claim")
    outcome = fuzz.check(_planted_graph(), EXACT, optimize=_planted(modified=True))
    assert (outcome.kind, outcome.reason) == ("contract", "modified claim")


def test_checker_reports_changed_calibration_arrays() -> None:
    def mutate(model, calibration):
        next(iter(calibration))["x"][0, 0] += 1.0

    outcome = fuzz.check(_planted_graph(), EXACT, optimize=_planted(mutate))
    assert (outcome.kind, outcome.reason) == ("contract", "input changed")


def test_checker_reports_a_model_onnx_runtime_cannot_load() -> None:
    def mutate(model, calibration):  # the bias becomes int64: Add(float, int64) is a type error
        b = model.graph.initializers["b"]
        b.const_value, b.dtype = ir.tensor(np.ones(4, np.int64), name="b"), ir.DataType.INT64

    outcome = fuzz.check(_planted_graph(), LOSSY, optimize=_planted(mutate, modified=True))
    assert (outcome.kind, outcome.reason.split(":")[0]) == ("crash", "onnxruntime load")


# ---- shrinking ----------------------------------------------------------------------------------------------------


def test_shrink_finds_the_smallest_failing_choice_list() -> None:
    assert fuzz.shrink([3, 4, 5, 6, 0, 9], lambda v: any(x >= 5 for x in v)) == [5]
    assert fuzz.shrink([3, 4, 5, 6, 0, 9], lambda v: len(v) >= 3) == [0, 0, 0]
    calls = []
    fuzz.shrink(list(range(40)), lambda v: calls.append(v) or True, budget=25)
    assert len(calls) == 25


def test_shrinking_a_graph_with_a_batchnorm_leaves_the_batchnorm_and_little_else() -> None:
    start = next(
        tuple(s.record) for i in range(50)
        if (s := fuzz.RandomChoices(f"bn:{i}")) and len(list(fuzz.build_graph(s).model.graph)) > 12
        and any(n.op_type == "BatchNormalization" for n in fuzz.replay(s.record).model.graph)
    )  # fmt: skip

    def has_bn(values) -> bool:
        return any(node.op_type == "BatchNormalization" for node in fuzz.replay(values).model.graph)

    smallest = fuzz.replay(fuzz.shrink(start, has_bn, budget=400))
    ops = [node.op_type for node in smallest.model.graph]
    assert "BatchNormalization" in ops and len(ops) <= 2, ops


def test_sweep_counts_every_case_on_every_graph() -> None:
    cases = [c for c in CASES if c.label in ("remove-dead", "fold-batchnorm")]
    result = fuzz.sweep(3, "sweep-test", cases)
    summary = result.to_dict()
    assert (result.graphs, result.skipped) == (3, 0)
    assert summary["cases_per_pass"] == {"remove-dead": 3, "fold-batchnorm": 3}
    assert set(summary["max_relative_error"]) <= {"remove-dead", "fold-batchnorm"}
    assert all(e <= fuzz.tolerance(d) for errors in summary["max_relative_error"].values() for d, e in errors.items())


# ---- the seeded sweep: every pass case on random graphs ----------------------------------------------------------


def _marks(case: fuzz.PassCase) -> list:
    reason = KNOWN_FAILURES.get(case.label)
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


@pytest.mark.parametrize("case", [pytest.param(c, id=c.label, marks=_marks(c)) for c in CASES])
def test_pass_keeps_its_contract_on_random_graphs(case: fuzz.PassCase) -> None:
    """No crash; exact cases keep every output (1e-5 relative, 16 units of float16 rounding on float16 graphs),
    lossy ones keep finite outputs finite; the input is untouched and ``modified`` is true."""
    phases = (Phase.explicit, Phase.generate) if case.label in KNOWN_FAILURES else tuple(Phase)
    examples = 4 if case.label.startswith("affine") else 15 if case.exact else 10

    @settings(max_examples=examples, phases=phases, **SEEDED)
    @given(graph=fuzz.graphs())
    def holds(graph: fuzz.FuzzGraph) -> None:
        outcome = fuzz.check(graph, case)
        assert not outcome.failed, f"{outcome.kind} ({outcome.reason}): {outcome.detail}"

    holds()



def test_shards_merge_into_the_report_of_one_run():
    """Graphs 0-3 checked as one sweep and as shards 0-1 and 2-3: the merged report counts the same checks."""
    cases = [c for c in CASES if c.label in ("fold-constants", "quantize-weights")] or CASES[:2]
    whole = fuzz.sweep(4, "shards", cases).to_dict()
    parts = [{**fuzz.sweep(2, "shards", cases, start=s).to_dict(), "start": s, "commit": "c", "command": "x",
              "machine": {}, "seed": "shards", "tolerance": {}, "exact_cases": [], "lossy_cases": [],
              "seconds": {"sweep": 1.0, "total": 2.0}} for s in (2, 0)]  # fmt: skip
    merged = fuzz.merge_reports(parts)
    assert merged["graphs"] == whole["graphs"] == 4 and merged["seconds"] == {"sweep": 2.0, "total": 4.0}
    for key in ("cases_per_pass", "crashes", "mismatches", "contract_violations", "declines", "max_relative_error"):
        assert merged[key] == whole[key], key
    assert [s["start"] for s in merged["shards"]] == [0, 2]
    with pytest.raises(BitfoldError, match="overlap"):
        fuzz.merge_reports([parts[1], {**parts[1], "start": 1}])


def _killer_check(task):
    """A stand-in for ``fuzz.check_graph`` whose case labelled "killer" kills its process on odd graphs."""
    import os
    import signal

    seed, index, cases = task
    if index % 2 and any(case.label == "killer" for case in cases):
        os.kill(os.getpid(), signal.SIGSEGV)
    return (index,), [fuzz.Outcome(case.label, "ok", dtype="float32") for case in cases]


def test_a_case_that_kills_its_process_is_a_crash_and_the_sweep_goes_on():
    """Isolated checks: graphs 0-3 with a case that segfaults on graphs 1 and 3; each graph still reports every case,
    the killer as a crash with the reason ``DIED``, the other case as it was."""
    cases = (fuzz.PassCase("killer", ("fold-constants",), True), fuzz.PassCase("calm", ("fold-constants",), True))
    results = list(fuzz._isolated_checks([("kill", i, cases) for i in range(4)], 2, check=_killer_check))
    assert [choices for choices, _ in results][::2] == [(0,), (2,)]  # in order
    for index, (_, outcomes) in enumerate(results):
        kinds = {o.case: (o.kind, o.reason) for o in outcomes}
        assert kinds["calm"] == ("ok", "")
        assert kinds["killer"] == (("crash", fuzz.DIED) if index % 2 else ("ok", ""))
