"""reconstruct: weight quantization learned block by block against the full-precision block's output.

The graph is cut into blocks along its transformer residual stream (``span`` residual Adds per block: 2 is one
decoder layer, attention then MLP): at the residual Adds that every path from the token embeddings to the first
output passes through, so pre-norm decoders, sandwich norms (Gemma) and post-norm encoders (BERT) all cut into
their layers. For each block in order, every MatMul weight inside it that
``quantize-weights`` (``grid = "int"``), ``shift`` (``grid = "shift"``), ``binarize`` (``grid = "binary"``; with
``salient_ratio``, PB-LLM), ``ternarize`` (``grid = "ternary"``, a scale per output) or ``shiftadd``
(``grid = "bcq"``) would quantize gets a learnable quantizer (:mod:`bitfold.quant.reconstruct`). On
integer grids the default start is GPTQ's solution on the Hessians of what the block reads in the quantized model
(the blocks before it already quantized), after which each group's scale learns a gain and each weight the choice
between GPTQ's code and its neighbour (AdaRound, annealed to hard); ``start = "rtn"`` learns the clipping ratio of
every scale group first (OmniQuant's learnable weight clipping), then the rounding. Binary codes (ShiftAddLLM) start
the same way from the shiftadd solver's GPTQ solution: α per plane and group learns, then each weight the choice
between its code and the neighbouring level. For powers of two: each output's scale, then the choice between the
two exponents around the weight's; for sign planes: α, then latent weights under a straight-through sign (PB-LLM: the
salient weights, chosen once by ``salience`` and kept, as int8 codes of the same latent weights); for ternary: γ per
output, then latent weights whose trits are taken straight-through. The loss
is the block's output error against the full-precision block on the calibration samples. The block is run by
:class:`~bitfold.quant.torch_graph.TorchGraph`, a torch translation of its ONNX nodes, so any architecture whose
layers use the interpreter's ops works without a model definition.

Sequential: block *i*'s inputs are what the already-quantized blocks before it compute, and its target is what
the full-precision blocks compute, so each block also corrects the error it inherits. Values the blocks read from
outside the stream (masks, rotary tables, graph inputs) come from one ONNX Runtime run of the input graph. With
nothing learned (``clip_steps = round_steps = 0``) the pass is sequential GPTQ: the GPTQ start is the answer, and no
full-precision target is computed, unless ``float_inputs`` > 0 sums the full-precision model's inputs to each weight
into its Gram matrix beside the quantized model's (H = Xq Xqᵀ + float_inputs · Xf Xfᵀ): a solution that fits the
inputs the quantized model gives and those the float model gives, between sequential and one-shot GPTQ.

CNNs: with ``"Conv"`` in ``op_types`` the 2-D Conv weights learn on the integer grid too (as (C_out, C_in/groups ·
kh · kw) rows, GPTQ's start on each group's input-patch Hessian, as ``quantize-weights`` does); the graph cuts at
its residual Adds (paths from the image input), and ``head = true`` adds the layers after the last Add (head Conv,
pooling, classifier) as a last block whose loss is the first output. ``bias = true`` also learns each Conv's
float bias with the scales. On a graph that already carries activation Q/DQ pairs (``quantize-activations``
first, ``weights = false``), the blocks learn under the activations' quantization, straight through its rounding,
against the float model (the same blocks with the pairs passed through).

With ``tune_steps`` an end-to-end phase then learns every scale of all blocks at once against the model's output;
``start_samples = N`` gives the per-block phase (whose cost grows with every sample) the first N calibration samples
and the end-to-end phase all of them.

Emits what ``quantize-weights`` emits for the same integer grid (``qdq``, ``matmulnbits`` or ``fake``), or what
``shift``, ``binarize``, ``ternarize`` and ``shiftadd`` emit (``op``: ``bitfold.ShiftMatMul`` / ``bitfold.BinaryMatMul`` /
``bitfold.TernaryMatMul`` / ``bitfold.BCQMatMul``, or ``fake``), tagged
``bitfold.quantized = reconstruct-…``; a rerun is a no-op. MatMuls outside every block (the LM head) are left float
with a note: quantize them with ``quantize-weights``. Each block's losses (at the start, after clipping, after
rounding) are in the pass notes.

Guarantees: the emitted weight equals the learned weight exactly in every format; on the calibration samples no
block's output error ends above what its start (GPTQ's solution, round to nearest, or the shift, binarize, ternarize
and shiftadd solvers') gives it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import onnx_ir as ir
import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from bitfold import parallel
from bitfold.errors import BitfoldError
from bitfold.frontend.stream import WeightStore, current_store, trim_heap
from bitfold.ops import bcq as bcq_op
from bitfold.ops import binary as binary_op
from bitfold.ops import shift as shift_op
from bitfold.ops import ternary as ternary_op
from bitfold.ops.functions import MIN_OPSET, upgrade_opset
from bitfold.passes.initializers import add_initializer, drop_if_unused
from bitfold.passes.multless.base import Encoded
from bitfold.passes.multless.binarize import Binarize, BinarizeConfig
from bitfold.passes.multless.shift import Shift, ShiftConfig
from bitfold.passes.multless.shiftadd import ShiftAdd, ShiftAddConfig
from bitfold.passes.multless.ternarize import Ternarize, TernarizeConfig
from bitfold.passes.quant.quantize_weights import QUANTIZED_KEY, QuantizeWeights
from bitfold.passes.registry import register
from bitfold.passes.transforms.structure import residual_cuts
from bitfold.quant.calibration import CalibrationData, sink_gram
from bitfold.quant.formats import Format, IntFormat, format_from, granularity_from
from bitfold.quant.bcq import bcq
from bitfold.quant.binary import Salience, salient_mask
from bitfold.quant.gptq import gptq
from bitfold.quant.im2col import ConvGeometry, patch_gram
from bitfold.quant.reconstruct import (BCQQuantizer, BinaryQuantizer, BlockResult, IntQuantizer, Schedule, ShiftQuantizer, TernaryQuantizer, block_error,
                                       train_block, tune_scales)
from bitfold.quant.torch_graph import TorchGraph


@dataclasses.dataclass(frozen=True)
class ReconstructConfig:
    grid: Literal["int", "shift", "binary", "ternary", "bcq"] = dataclasses.field(default="int", metadata={"doc": "int: integer codes, a scale per group (quantize-weights) | shift: signed powers of two, a scale per output (the shift pass) | binary: sign planes with α per output (the binarize pass; PB-LLM with salient_ratio) | ternary: {−γ, 0, +γ}, γ per output (the ternarize pass, per_channel) | bcq: ShiftAddLLM's binary codes, α per plane and group (the shiftadd pass)"})
    bits: int = dataclasses.field(default=4, metadata={"doc": "int: 2, 3, 4 or 8; shift: 3 or 4; bcq: sign planes q, 2 to 4"})
    group_size: int = dataclasses.field(default=128, metadata={"doc": "elements per scale along K; -1 per channel (bcq: a multiple of 8)"})
    symmetric: bool = dataclasses.field(default=True, metadata={"doc": "signed codes, zero point 0; false: unsigned with zero point"})
    zero_point: Literal["int", "float"] = dataclasses.field(default="int", metadata={"doc": "asymmetric: int (ONNX QDQ) | float (min-max grid; matmulnbits and fake only)"})
    format: Literal["qdq", "matmulnbits", "fake", "op"] = dataclasses.field(default="qdq", metadata={"doc": "int: qdq | matmulnbits | fake, as quantize-weights; shift, binary, ternary, bcq: op (bitfold.ShiftMatMul, bitfold.BinaryMatMul, bitfold.TernaryMatMul, bitfold.BCQMatMul) | fake"})
    zero: bool = dataclasses.field(default=True, metadata={"doc": "shift: one code means 0 (DeepShift-PS); false: DenseShift"})
    planes: int = dataclasses.field(default=1, metadata={"doc": "binary: 1 sign plane, or 2 (residual binary)"})
    center: bool = dataclasses.field(default=False, metadata={"doc": "binary: subtract a learned mean per output first"})
    salient_ratio: float = dataclasses.field(default=0.0, metadata={"doc": "binary, 1 plane: PB-LLM, the fraction of weights kept as int8 codes (a scale per output), chosen by salience before learning and kept (0: none)"})
    salience: Salience = dataclasses.field(default="hessian", metadata={"doc": "salient_ratio: magnitude (|w|) | activation (|w|·‖x_k‖) | hessian (w² / [H⁻¹]²_kk), H the block input's Gram matrix in the quantized model"})
    alpha_terms: int = dataclasses.field(default=2, metadata={"doc": "bcq: powers of two summed per α (0: float16), as shiftadd"})
    op_types: tuple[Literal["MatMul", "Conv"], ...] = dataclasses.field(default=("MatMul",), metadata={"doc": "ops whose weights are learned: MatMul, Conv (2-D; int grid only)"})
    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"doc": "globs on node name, weight name or torch module scope"})
    span: int = dataclasses.field(default=2, metadata={"doc": "residual Adds per block (2: one decoder layer)"})
    bias: bool = dataclasses.field(default=False, metadata={"doc": "also learn each learned Conv's float bias (with the scales, against the block's output): the mean shift rounding leaves"})
    head: bool = dataclasses.field(default=False, metadata={"doc": "also learn the weights between the last residual Add and the first output (a CNN's head) as one last block, against that output"})
    clip_steps: int = dataclasses.field(default=100, metadata={"doc": "Adam steps learning the clipping ratios (start = rtn) or the gains on GPTQ's scales, per block"})
    round_steps: int = dataclasses.field(default=200, metadata={"doc": "Adam steps learning the rounding, per block (0: round to nearest)"})
    clip_lr: float = dataclasses.field(default=5e-3, metadata={"doc": "learning rate of the clipping ratios or the gains on GPTQ's scales"})
    round_lr: float = dataclasses.field(default=5e-2, metadata={"doc": "learning rate of the rounding logits"})
    min_ratio: float = dataclasses.field(default=0.5, metadata={"doc": "smallest clipping ratio of a group's range"})
    reg: float = dataclasses.field(default=30.0, metadata={"doc": "weight of the rounding regulariser, in units of the block's error where rounding starts"})
    seed: int = dataclasses.field(default=0, metadata={"doc": "order in which calibration samples are visited"})
    start: Literal["rtn", "gptq"] = dataclasses.field(default="gptq", metadata={"doc": "int, bcq: where the learning starts: round to nearest (int: then learned clipping) | GPTQ's solution on the quantized model's inputs to the block (a gain learned on its scales, each rounding chosen between GPTQ's code and its neighbour)"})
    damp: float = dataclasses.field(default=0.003, metadata={"doc": "start = gptq: Hessian dampening, fraction of mean diag"})
    act_order: bool = dataclasses.field(default=True, metadata={"doc": "start = gptq: visit columns by decreasing Hessian diagonal"})
    true_sequential: bool = dataclasses.field(default=False, metadata={"doc": "nothing learned (clip_steps = round_steps = tune_steps = 0), int grid, MatMul weights: solve a block's weights in graph order, those reading one input at a time (q, k, v; o; gate, up; down), each on its input computed with the earlier ones already quantized (one input's Gram matrix held at a time); false: every input's Gram matrix from one forward on the block's float weights"})
    float_inputs: float = dataclasses.field(default=0.0, metadata={"doc": "sequential GPTQ (nothing learned, int grid, MatMul weights): weight of the full-precision model's inputs in each Gram matrix, summed with the quantized model's (0: the quantized model's inputs only; large: approaches GPTQ on the float model's inputs); runs the block's float forward too"})
    sink_weight: float = dataclasses.field(default=64.0, metadata={"doc": "start = gptq: weight in H of each sequence's first token"})
    clip: Literal["none", "weight", "output"] = dataclasses.field(default="output", metadata={"doc": "start = gptq: range shrink per group (as quantize-weights)"})
    loss: Literal["tensor", "channel", "token"] = dataclasses.field(default="tensor", metadata={"doc": "block output error relative to the target's mean square over: the tensor | each channel | each token"})
    start_samples: int = dataclasses.field(default=0, metadata={"doc": "with tune_steps: the per-block phase (GPTQ's start, the blocks' learning) reads the first start_samples calibration samples, and the end-to-end phase trains on all, its tune_holdout drawn among the others (0: every phase reads all); the start's cost grows with the samples, the end-to-end phase's does not"})
    tune_steps: int = dataclasses.field(default=0, metadata={"doc": "Adam steps (tune_batch calibration samples each) learning a factor on every scale end to end, all blocks at once, codes frozen (0: none)"})
    tune_batch: int = dataclasses.field(default=1, metadata={"doc": "calibration samples per end-to-end step, their gradients averaged"})
    tune_lr: float = dataclasses.field(default=3e-3, metadata={"doc": "learning rate of the end-to-end scale factors (their logarithms)"})
    tune_schedule: Literal["constant", "cosine"] = dataclasses.field(default="constant", metadata={"doc": "end to end: the learning rates held, or decayed along a half cosine to zero at the last step"})
    tune_holdout: int = dataclasses.field(default=0, metadata={"doc": "end to end: calibration samples never trained on; their loss, measured every tune_check steps, picks the step whose parameters are kept (early stopping; 0: all samples train, the last step's kept)"})
    tune_check: int = dataclasses.field(default=16, metadata={"doc": "end to end with tune_holdout: steps between two measurements of the held-out samples' loss"})
    tune_recompute: bool = dataclasses.field(default=True, metadata={"doc": "end to end: recompute each block's activations in the backward pass, one block's held at a time; false: hold every block's through the step (the same gradients, one forward per step less, every block's activations in memory)"})
    tune_loss: Literal["kl", "mse"] = dataclasses.field(default="kl", metadata={"doc": "end to end: KL divergence of the first graph output's softmax (logits) | its error relative to its mean square"})
    tune_weights: bool = dataclasses.field(default=False, metadata={"doc": "end to end: the codes learn too (distillation): latent weights whose sign (binary, bcq), trit (ternary) or rounded code (int) is taken straight-through"})
    tune_weight_lr: float = dataclasses.field(default=2e-3, metadata={"doc": "learning rate of the latent weights, in units of the grid step (int), of the row's α (binary) or γ (ternary) or of a sign (bcq); an integer code changes once its latent moves half a step, about tune_weight_lr per step"})
    tune_floats: bool = dataclasses.field(default=False, metadata={"doc": "end to end: every float vector a block reads from an initializer that nothing else reads (biases, norm scales and shifts) learns too, with the scales and codes; written back in place of the originals"})
    tune_float_lr: float = dataclasses.field(default=1e-4, metadata={"doc": "tune_floats: Adam's learning rate on those vectors (absolute, as in fine-tuning)"})
    tune_match: float = dataclasses.field(default=0.0, metadata={"doc": "end to end: weight of each block output's direction matching to the full-precision model's (1 − cosine per token, or per pixel over channels), added to the output loss"})
    tune_augment: bool = dataclasses.field(default=False, metadata={"doc": "end to end, NCHW image input: each training step reads a random crop of its sample (a random 50–100 % of each side, flipped half the time, resized back) against the full-precision model's output on that crop; the scores before and after read one fixed crop per sample"})
    accuracy_level: int = dataclasses.field(default=4, metadata={"doc": "matmulnbits: ORT compute type (4 = int8)"})

    # quantize-weights' emission reads this; reconstruct learns integer grids only
    dtype = "int"

    def __post_init__(self) -> None:
        if self.span < 1:
            raise ValueError("span must be >= 1")
        if min(self.clip_steps, self.round_steps, self.tune_steps) < 0:
            raise ValueError("clip_steps, round_steps and tune_steps must be >= 0")
        if not (math.isfinite(self.float_inputs) and self.float_inputs >= 0):
            raise ValueError(f"float_inputs must be a finite number >= 0, got {self.float_inputs!r}")
        if self.float_inputs and (self.clip_steps or self.round_steps or self.tune_steps or self.grid != "int" or self.start != "gptq"):
            raise ValueError("float_inputs belongs to sequential GPTQ (grid \"int\", start \"gptq\", nothing learned); "
                             "set clip_steps = round_steps = tune_steps = 0")  # fmt: skip
        if self.true_sequential and (self.clip_steps or self.round_steps or self.tune_steps or self.grid != "int" or self.start != "gptq"):
            raise ValueError("true_sequential belongs to sequential GPTQ (grid \"int\", start \"gptq\", nothing learned); "
                             "set clip_steps = round_steps = tune_steps = 0")  # fmt: skip
        if self.tune_batch < 1:
            raise ValueError("tune_batch must be >= 1")
        if (self.tune_weights or self.tune_floats or self.tune_match or self.tune_augment) and not self.tune_steps:
            raise ValueError("tune_weights, tune_floats, tune_match and tune_augment belong to the end-to-end phase; set tune_steps > 0")
        if not self.tune_float_lr > 0:
            raise ValueError("tune_float_lr must be > 0")
        if self.tune_holdout < 0 or self.tune_check < 1:
            raise ValueError("tune_holdout must be >= 0 and tune_check >= 1")
        if self.start_samples < 0:
            raise ValueError("start_samples must be >= 0")
        if self.start_samples and not self.tune_steps:
            raise ValueError("start_samples splits the calibration data between the per-block and the end-to-end phase; "
                             "set tune_steps > 0 (without it, calibrate on fewer samples)")  # fmt: skip
        if self.tune_holdout and not self.tune_steps:
            raise ValueError("tune_holdout belongs to the end-to-end phase; set tune_steps > 0")
        if self.tune_match < 0 or self.tune_weight_lr <= 0:
            raise ValueError("tune_match must be >= 0 and tune_weight_lr > 0")
        if self.salient_ratio and not (self.grid == "binary" and self.planes == 1):
            raise ValueError("salient_ratio (PB-LLM) belongs to grid \"binary\" with planes = 1")
        if not 0.0 <= self.salient_ratio < 0.5:
            raise ValueError("salient_ratio must be in [0, 0.5)")
        if self.tune_weights and self.grid == "shift":
            raise ValueError("grid \"shift\" has no latent weights to learn end to end; tune_weights takes grid int, binary, ternary or bcq")
        if not 0.0 < self.min_ratio <= 1.0:
            raise ValueError("min_ratio must be in (0, 1]")
        if not self.op_types or set(self.op_types) - {"MatMul", "Conv"}:
            raise ValueError("op_types must name MatMul and/or Conv")
        if "Conv" in self.op_types and self.grid != "int":
            raise ValueError(f"grid \"{self.grid}\" learns MatMul weights only (its op is a MatMul); Conv weights take grid = \"int\"")
        if "Conv" in self.op_types and self.loss != "tensor":
            raise ValueError("loss \"channel\" and \"token\" take the last axis as channels; a Conv block's NCHW output needs loss = \"tensor\"")
        if "Conv" in self.op_types and self.format == "matmulnbits":
            raise ValueError("format 'matmulnbits' is a MatMul kernel; Conv weights need format = \"qdq\" or \"fake\"")
        if self.grid == "binary":
            if self.planes not in (1, 2):
                raise ValueError("planes must be 1 or 2")
            if self.format not in ("op", "fake"):
                raise ValueError("grid \"binary\" is emitted as format = \"op\" (bitfold.BinaryMatMul) or \"fake\"")
            return
        if self.grid == "ternary":
            if self.format not in ("op", "fake"):
                raise ValueError("grid \"ternary\" is emitted as format = \"op\" (bitfold.TernaryMatMul) or \"fake\"")
            return
        if self.grid == "bcq":
            try:  # the shiftadd pass's own rules for q (here bits), group_size and alpha_terms
                ShiftAddConfig(q=self.bits, group_size=self.group_size, alpha_terms=self.alpha_terms)
            except ValueError as e:
                raise ValueError(f"grid \"bcq\": {str(e).replace('q must', 'bits (sign planes) must')}") from None
            if self.format not in ("op", "fake"):
                raise ValueError("grid \"bcq\" is emitted as format = \"op\" (bitfold.BCQMatMul) or \"fake\"")
            return
        if self.grid == "shift":
            if self.bits not in (3, 4):
                raise ValueError("grid \"shift\" takes bits 3 or 4")
            if self.format not in ("op", "fake"):
                raise ValueError("grid \"shift\" is emitted as format = \"op\" (bitfold.ShiftMatMul) or \"fake\"")
            return
        if self.format == "op":
            raise ValueError("format \"op\" belongs to the shift, binary, ternary and bcq grids; integer grids take qdq, matmulnbits or fake")
        if self.bits not in (2, 3, 4, 8):
            raise ValueError("bits must be 2, 3, 4 or 8")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError("group_size must be -1 (per channel) or a positive size")
        if self.format == "matmulnbits" and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise ValueError("format 'matmulnbits' needs group_size a power of two >= 16 (e.g. 32, 64, 128)")
        if self.zero_point == "float":
            if self.symmetric:
                raise ValueError("zero_point = \"float\" is an asymmetric grid; set symmetric = false")
            if self.format == "qdq":
                raise ValueError("zero_point = \"float\" cannot be stored by DequantizeLinear; use format = \"matmulnbits\" or \"fake\"")

    @property
    def number_format(self) -> Format:
        return format_from(f"int{self.bits}", symmetric=self.symmetric, float_zero=self.zero_point == "float")

    @property
    def tag(self) -> str:
        if self.grid == "binary":
            salient = f"-salient{self.salient_ratio:g}" if self.salient_ratio else ""
            return f"reconstruct-binary{self.planes}{'-centred' if self.center else ''}{salient}"
        if self.grid == "ternary":
            return "reconstruct-ternary"
        if self.grid == "shift":
            return f"reconstruct-shift{self.bits}{'' if self.zero else '-dense'}"
        if self.grid == "bcq":
            return f"reconstruct-bcq{self.bits}-{granularity_from(self.group_size)}"
        return f"reconstruct-{self.number_format.name}-{granularity_from(self.group_size)}"


@dataclasses.dataclass
class Block:
    nodes: list[ir.Node]
    output: ir.Value  # the stream value the block ends at (its loss)
    targets: list[ir.Node]  # the MatMuls it quantizes


@register
class Reconstruct(QuantizeWeights):
    """Weights on integer, power-of-two or sign grids whose scales and rounding are learned per block against the float block's output."""

    name = "reconstruct"
    family = "learned"
    Config = ReconstructConfig
    needs_calibration = True

    @property
    def holds_whole_model(self) -> str | None:
        if self.config.tune_steps:
            return "its end-to-end phase (tune_steps) keeps every block's learned quantizers until all blocks are done"
        return None  # block by block: one block's weights, activations at its boundary

    def rewrite(self, model: ir.Model) -> int:
        targets = self.collect(model)  # a rerun finds the blocks' weights quantized: what it collects lies outside them
        if not targets:
            return 0
        if self.config.format == "op":
            self._emitter.refuse_low_precision(targets)  # the bitfold ops are typed float32
        op = {"shift": shift_op, "binary": binary_op, "ternary": ternary_op, "bcq": bcq_op}.get(self.config.grid, binary_op)
        opset = 21 if self.config.format == "qdq" else max(MIN_OPSET, getattr(op, "MIN_OPSET", MIN_OPSET)) if self.config.format == "op" else 0
        upgraded = model.opset_imports.get("", 1) < opset
        if upgraded:
            upgrade_opset(model, opset)
            targets = self._recollect(model)
            if not targets:
                return 1
        blocks = self.blocks(model.graph, targets)
        inside = {node for b in blocks for node in b.targets}
        outside = [node for node in targets if node not in inside]
        if outside:
            kinds = " and ".join(sorted({node.op_type for node in outside}))
            where = "outside every block (off the paths to the first output)" if self.config.head else "after the last residual Add"
            self.notes.append(f"{len(outside)} {kinds} weight{'s' if len(outside) > 1 else ''} {where} stay{'' if len(outside) > 1 else 's'} float "
                              f"({'' if self.config.head else 'head = true learns them as a last block; or '}quantize them with quantize-weights)")
        last = max((i for i, b in enumerate(blocks) if b.targets), default=-1)
        if last < 0:
            return int(upgraded)  # the opset changed
        blocks = blocks[: last + 1]  # a block with nothing to learn before it still runs: later blocks read what it computes
        for b, block in enumerate(blocks):
            if not block.targets:
                self.notes.append(f"block {b}: no weights to learn (every one excluded or quantized already); run as it is")
        weights = list(dict.fromkeys(node.inputs[1] for b in blocks for node in b.targets))
        self._emitted = {}

        def emit(block: Block, solved: dict[str, tuple[np.ndarray, ...]]) -> None:
            for node in [n for n in block.targets if n.inputs[1].name in solved]:
                if node.op_type == "Conv":
                    self.fold_conv(model.graph, node, *solved[node.inputs[1].name])
                    continue
                if self.config.grid == "int":
                    self.fold(model.graph, node, *solved[node.inputs[1].name])
                    continue
                producer = self._emitter.fold(model, node, self._encode(solved[node.inputs[1].name]), node.inputs[1].const_value.numpy())
                producer.metadata_props[QUANTIZED_KEY] = self.config.tag

        vectors = [self._floats(block) for block in blocks]  # before emission rewires the blocks
        self.learn(model, blocks, emit)
        for block, found in zip(blocks, vectors, strict=True):
            for value in self._biases(block):
                node = next(user for user, _ in value.uses())
                learned = self.learned_biases[value.name].astype(value.const_value.dtype.numpy())
                node.replace_input_with(2, add_initializer(model.graph, f"{value.name}_learned", learned))
                drop_if_unused(model.graph, value)
            for value in found:
                node, index = next(iter(value.uses()))
                learned = self.learned_floats[value.name].astype(value.const_value.dtype.numpy())
                node.replace_input_with(index, add_initializer(model.graph, f"{value.name}_learned", learned))
                drop_if_unused(model.graph, value)
        for weight in weights:
            drop_if_unused(model.graph, weight)
        self._emitted.clear()
        return sum(len(b.targets) for b in blocks)

    def collect(self, model: ir.Model) -> list[ir.Node]:
        c = self.config
        if c.grid == "int":
            return super().collect(model)
        common = {"format": c.format, "exclude": c.exclude, "keep_ends": False}
        if c.grid == "shift":
            self._emitter = _ShiftEmitter(ShiftConfig(bits=c.bits, zero=c.zero, **common))
        elif c.grid == "ternary":
            self._emitter = _TernaryEmitter(TernarizeConfig(per_channel=True, **common))
        elif c.grid == "bcq":
            self._emitter = _BCQEmitter(ShiftAddConfig(q=c.bits, group_size=c.group_size, alpha_terms=c.alpha_terms, **common))
        else:
            self._emitter = _BinaryEmitter(BinarizeConfig(planes=c.planes, center=c.center, **common))
        found = [node for node in self._emitter.collect(model) if node.op_type == "MatMul"]
        self.notes += self._emitter.notes
        return found

    def _encode(self, solved: tuple[np.ndarray, ...]) -> Encoded:
        """The shift, binarize, ternarize or shiftadd pass's encoding of a learned weight."""
        if self.config.grid == "bcq":
            signs, alpha = solved
            k, group = signs.shape[2], self._bcq_group(signs.shape[2])
            packed, a = bcq_op.pack(signs.transpose(0, 2, 1), alpha.transpose(0, 2, 1))
            return Encoded(bcq_op.unpack(packed, a, k, group).T.astype(np.float64), {"bcq": packed, "alpha": a}, {"group_size": group})
        if self.config.grid == "shift":
            units, scale = solved
            packed, s = shift_op.pack(units.T, scale, self.config.bits, self.config.zero)
            return Encoded(units * s.astype(np.float64)[:, None], {"shift": packed, "scale": s}, {"zero": int(self.config.zero)})
        if self.config.grid == "ternary":
            trits, gamma = solved
            packed, g = ternary_op.pack(trits.T.astype(np.int64), gamma)
            return Encoded(trits * g.astype(np.float64)[:, None], {"ternary": packed, "gamma": g})
        signs, alpha, mean, salient, codes, scale = solved
        side = () if salient is None else (salient.T, codes.T, scale)
        tensors = binary_op.pack(signs.transpose(0, 2, 1), alpha, mean, *side)
        dense = binary_op.unpack(*tensors, signs.shape[2]).T
        names = ("signs", "alpha", "mean", "salient", "salient_codes", "salient_scale")
        return Encoded(dense.astype(np.float64), dict(zip(names, tensors, strict=True)), {"binarize_input": 0})

    # -- blocks -------------------------------------------------------------------------------------------------

    def blocks(self, graph: ir.Graph, targets: list[ir.Node]) -> list[Block]:
        """The graph cut along its residual stream: block i runs from cut span·i to span·(i+1)
        (:func:`~bitfold.passes.transforms.structure.residual_cuts`: the embeddings' output, then every residual
        Add on all paths to the output)."""
        cuts = residual_cuts(graph)
        if isinstance(cuts, str):
            raise BitfoldError(f"reconstruct cuts the graph into blocks along its residual stream, and this graph has none it can follow: {cuts}.")
        bounds = cuts[:: self.config.span]
        if bounds[-1] is not cuts[-1]:
            bounds.append(cuts[-1])
        if self.config.head and graph.outputs and graph.outputs[0] is not bounds[-1]:
            bounds.append(graph.outputs[0])
        order = {node: i for i, node in enumerate(graph)}
        wanted = set(targets)
        found = []
        for start, end in zip(bounds, bounds[1:]):
            nodes = sorted(_descendants(start) & _ancestors(end), key=order.__getitem__)
            found.append(Block(nodes, end, [n for n in nodes if n in wanted]))
        return found

    # -- learn --------------------------------------------------------------------------------------------------

    def _biases(self, block: Block) -> list[ir.Value]:
        """The float biases the block learns (``bias = true``): each learned Conv's constant third input that no
        other node reads."""
        if not self.config.bias:
            return []
        found = []
        for node in block.targets:
            b = node.inputs[2] if node.op_type == "Conv" and len(node.inputs) > 2 else None
            if b is not None and b.is_initializer() and b.const_value is not None and b.const_value.dtype.is_floating_point() and len(b.uses()) == 1:
                found.append(b)
        return found

    def _floats(self, block: Block) -> list[ir.Value]:
        """The float vectors the block learns end to end (``tune_floats``): each initializer of one axis and more than
        one element that one node of the block reads and nothing else (biases, norm scales and shifts), other than
        the learned weights and ``bias``'s biases. Scalars (epsilons, exponents, attention scales) stay."""
        if not self.config.tune_floats:
            return []
        skip = {v.name for v in _weights(block) + self._biases(block)}
        found: dict[str, ir.Value] = {}
        for node in block.nodes:
            for v in node.inputs:
                if (v is not None and v.name not in skip and v.is_initializer() and v.const_value is not None and v.const_value.dtype.is_floating_point()
                        and len(v.shape or ()) == 1 and v.const_value.size > 1 and len(v.uses()) == 1):  # fmt: skip
                    found[v.name] = v
        return list(found.values())

    def _bcq_group(self, k: int) -> int:
        """Inputs per α for a weight with ``k`` inputs (``group_size = -1``: all, rounded up to a multiple of 8)."""
        return self.config.group_size if self.config.group_size > 0 else -(-k // 8) * 8

    def _gptq(self, block: Block, probe: TorchGraph, names: list[str], samples: list[dict[str, torch.Tensor]],
              weights: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, ...]]:  # fmt: skip
        """GPTQ's solution of the block's weights (integer grid; binary codes: the shiftadd solver's) on Hessians of
        what the block reads in the quantized model (the earlier blocks already quantized), each sequence's first
        token weighted ``sink_weight``."""
        grams, convs = self._grams(block, probe, names, samples, weights)
        fmt, granularity = self.config.number_format, granularity_from(self.config.group_size)
        found = {}
        for node in block.targets:
            if node.inputs[1].name in found:
                continue
            wt = _rows(weights[node.inputs[1].name]).numpy()
            if node.op_type == "Conv":  # group by group, each on its own input-patch Gram matrix
                geometry, x = ConvGeometry.of(node), convs[node.inputs[0].name]
                patch = sum(patch_gram(batch, geometry) for batch in x)
                parts = [gptq(rows, h, fmt, granularity, damp=self.config.damp, act_order=self.config.act_order, clip=self.config.clip,
                              notes=self.notes) for rows, h in zip(np.split(wt, len(patch)), patch, strict=True)]  # fmt: skip
                found[node.inputs[1].name] = tuple(np.concatenate(p) for p in zip(*parts, strict=True))
            elif self.config.grid == "bcq":
                found[node.inputs[1].name] = bcq(wt.astype(np.float64), grams[node.inputs[0].name], self.config.bits, self._bcq_group(wt.shape[1]),
                                                 alpha_terms=self.config.alpha_terms, act_order=self.config.act_order,
                                                 damp=self.config.damp, notes=self.notes)  # fmt: skip
            else:
                found[node.inputs[1].name] = gptq(wt, grams[node.inputs[0].name], fmt, granularity, damp=self.config.damp,
                                                  act_order=self.config.act_order, clip=self.config.clip, notes=self.notes)  # fmt: skip
        return found

    def _salient(self, block: Block, probe: TorchGraph, names: list[str], samples: list[dict[str, torch.Tensor]],
                 weights: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray]]:  # fmt: skip
        """PB-LLM's salient mask (N, K) of each of the block's weights: the top ``salient_ratio`` by ``salience``, on
        the Gram matrix of what the block reads in the quantized model (the earlier blocks already quantized)."""
        c = self.config
        grams = self._grams(block, probe, names, samples, weights)[0] if c.salience != "magnitude" else {}
        found = {}
        for node in block.targets:
            name = node.inputs[1].name
            if name not in found:
                found[name] = (salient_mask(_rows(weights[name]).numpy().astype(np.float64), grams.get(node.inputs[0].name), c.salient_ratio, c.salience),)
        return found

    def _grams(self, block: Block, probe: TorchGraph, names: list[str], samples: list[dict[str, torch.Tensor]],
               weights: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:  # fmt: skip
        """The Gram matrix of every MatMul target's input and every Conv target's inputs, on what the block reads
        in the quantized model."""
        grams: dict[str, np.ndarray] = {}
        conv_inputs = {node.inputs[0].name for node in block.targets if node.op_type == "Conv"}
        matmul_inputs = {node.inputs[0].name for node in block.targets if node.op_type == "MatMul"}
        convs: dict[str, list[np.ndarray]] = {name: [] for name in conv_inputs}  # a Conv's inputs, for its patch Grams
        taken = set(probe.input_names)
        weights = {name: w for name, w in weights.items() if name in taken}
        with torch.no_grad():
            for env in samples:
                for name, x in probe(**{n: env[n] for n in names if n in taken}, **weights).items():
                    if name in conv_inputs:
                        convs[name].append(x.numpy())
                    if name in matmul_inputs:
                        grams[name] = sink_gram(x.numpy(), self.config.sink_weight, into=grams.get(name))
        return grams, convs

    def _lean_grams(self, probe: TorchGraph, names: list[str], streams: list[tuple[list[dict[str, torch.Tensor]], Callable[[], dict[str, torch.Tensor]], float]],
                    spill: WeightStore | None) -> tuple[dict[str, np.ndarray], dict[str, list[ir.TensorProtocol]]]:  # fmt: skip
        """Sequential GPTQ's Gram matrices: of every input ``probe`` computes, summed over ``streams`` — (samples,
        the weights the probe reads, a factor on the stream's Gram matrices): what the block reads in the quantized
        model with the weights solved so far, and with ``float_inputs`` what it reads in the float model with its
        float weights. Streaming (``spill`` given), an input whose activations take less room than its Gram matrix
        (fewer tokens than twice its width: a decoder's wide down-projection input) is kept on disk instead, per
        sample, and its Gram matrix is built by :meth:`_gram` when its weights are solved, with no other one held.
        Either way the sums run over the same arrays in the same order: the same bits. Each stream's weights are built
        when its forward starts and dropped after it."""
        taken = set(probe.input_names)
        grams: dict[str, np.ndarray] = {}
        kept: dict[str, list[ir.TensorProtocol]] = {}
        count = sum(len(samples) for samples, _, _ in streams)
        with torch.no_grad():
            for s, (samples, read, factor) in enumerate(streams):
                weights = read()
                for i, env in enumerate(samples):
                    for name, x in probe(**{n: env[n] for n in names if n in taken}, **weights).items():
                        x = x.numpy() if factor == 1.0 else x.numpy() * np.float32(math.sqrt(factor))
                        rows = x.size // x.shape[-1] * count
                        if spill is not None and (name in kept or (name not in grams and rows < 2 * x.shape[-1])):
                            kept.setdefault(name, []).append(spill.put(f"{name}#{s}.{i}", x))
                        else:
                            grams[name] = sink_gram(x, self.config.sink_weight, into=grams.get(name))
                del weights
        return grams, kept

    def _gram(self, parts: list[ir.TensorProtocol]) -> np.ndarray:
        """The Gram matrix of an input kept per sample (:meth:`_lean_grams`), summed in sample order."""
        gram = None
        for part in parts:
            gram = sink_gram(part.numpy(), self.config.sink_weight, into=gram)
        return gram

    def _lean(self, block: Block) -> bool:
        """Whether the block takes sequential GPTQ's lean path: nothing learned, integer grid from GPTQ's start,
        MatMul weights only and no biases."""
        c = self.config
        return (not (c.clip_steps or c.round_steps or c.tune_steps) and c.grid == "int" and c.start == "gptq"
                and all(n.op_type == "MatMul" for n in block.targets) and not self._biases(block))  # fmt: skip

    def _stages(self, graph: ir.Graph, block: Block, fed: list[ir.Value], probe: TorchGraph) -> list[tuple[TorchGraph, list[tuple[ir.Value, str]]]]:
        """Sequential GPTQ's order within a block: (probe, [(weight, the input its first reader reads)]) per step.
        ``true_sequential``: one step per input the weights read, in graph order (a decoder layer's q, k, v; o; gate,
        up; down), each with a probe that computes that input alone from the block's inputs, so the weights before
        it can be fed quantized; otherwise one step, every input from the block's float weights."""
        first: dict[ir.Value, ir.Value] = {}  # each weight, in order, and the input of its first reader
        for node in block.targets:
            first.setdefault(node.inputs[1], node.inputs[0])
        if not self.config.true_sequential:
            return [(probe, [(value, x.name) for value, x in first.items()])]
        steps: dict[str, tuple[ir.Value, list[tuple[ir.Value, str]]]] = {}
        for value, x in first.items():
            steps.setdefault(x.name, (x, []))[1].append((value, x.name))
        found = []
        for x, group in steps.values():
            needed = _feeding(block.nodes, [x])
            reads = {v.name for node in needed for v in node.inputs if v is not None} | {x.name}
            found.append((TorchGraph(graph, nodes=needed, inputs=[v for v in fed if v.name in reads], outputs=[x]), group))
        return found

    def _sequential_gptq(self, block: Block, stages: list[tuple[TorchGraph, list[tuple[ir.Value, str]]]], names: list[str],
                         samples: list[dict[str, torch.Tensor]], emit: Callable[[Block, dict[str, tuple[np.ndarray, ...]]], None],
                         floats: list[dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """GPTQ of a block's MatMul weights on the quantized model's inputs without learning, step by step
        (:meth:`_stages`), lean: the weights a step's probe reads are fed (float, or quantized where an earlier
        step solved them) for its Gram matrices and dropped, then each of the step's weights is read again, solved,
        handed to ``emit`` and kept only as its dequantized value (what later steps and the block's quantized
        forward need); each Gram matrix is dropped after its last reader, so one step's are held at a time. The
        solves within a step are independent: they go to the current executor (:mod:`bitfold.parallel`; in this
        process by default, one at a time). Returns the dequantized values in the graph's layout. With one step
        (``true_sequential = false``) the weights equal what the learning path gives with no steps (the same
        quantizer, rounded as its start). ``floats``: the same block inputs in the full-precision model, whose Gram
        matrices (float weights) are added to each step's, times ``float_inputs``."""
        read = lambda v: torch.from_numpy(v.const_value.numpy().astype(np.float32))  # noqa: E731
        values = [value for _, group in stages for value, _ in group]  # as built: emit rewires the block's readers
        shapes = {value.name: tuple(value.const_value.shape) for value in values}
        hard: dict[str, torch.Tensor | ir.TensorProtocol] = {}
        store = current_store()  # streaming: the solved weights wait on disk while the next ones are solved
        spill = WeightStore(tempfile.mkdtemp(prefix="bitfold-block-", dir=store.path.parent)) if store is not None else None
        settings = (self.config.number_format, granularity_from(self.config.group_size), self.config.damp, self.config.act_order, self.config.clip,
                    None if spill is None else str(spill.path.parent))  # fmt: skip
        dense = lambda name: _layout(torch.from_numpy(hard[name].numpy()) if spill is not None else hard[name], shapes[name])  # noqa: E731
        for probe, group in stages:
            clock = time.perf_counter()
            taken = set(probe.input_names)
            streams = [(samples, lambda taken=taken: {v.name: dense(v.name) if v.name in hard else read(v) for v in values if v.name in taken}, 1.0)]
            if floats:  # the float model's inputs too: its float weights on the float stream
                streams.append((floats, lambda taken=taken: {v.name: read(v) for v in values if v.name in taken}, self.config.float_inputs))
            grams, kept = self._lean_grams(probe, names, streams, spill)
            del streams
            trim_heap()  # the forward's activations are gone: the solves start from what the Gram matrices hold
            self.timings["grams"] += time.perf_counter() - clock
            last = {x: value.name for value, x in group}  # the last weight solved on each input's Gram matrix
            late = [0.0]  # seconds spent on the Gram matrices built from kept inputs, within the solves

            def problems(group=group, grams=grams, kept=kept, last=last, late=late):  # drawn as the executor asks: one weight and its Gram matrix at a time
                for value, x in group:
                    if x not in grams:  # an input kept on disk: its Gram matrix now, the block's weights and the Gram matrices solved before it gone
                        start = time.perf_counter()
                        grams[x] = self._gram(kept.pop(x))
                        late[0] += time.perf_counter() - start
                    owned = last[x] == value.name  # the last reader owns the Gram matrix: its solve factors it in its own memory
                    yield _rows(read(value)).numpy(), grams.pop(x) if owned else grams[x], owned

            clock = time.perf_counter()
            solutions = parallel.current().map(_gptq_solve, problems(), shared=settings)
            del grams, kept  # held by the generator until each last reader has taken its own
            for value, _ in group:  # not zip: it would hold the last solution while the next one is solved
                (q, scale, zero), notes = next(solutions)
                self.notes += notes
                # what the quantizer started from these would give with no steps: the solver's codes on its scales
                # (a group of zeros gets scale 1), so the solution goes out as it is
                scale = np.where(scale != 0, scale, np.float32(1.0))
                if spill is not None:
                    hard[value.name] = spill.put(value.name, q)
                else:
                    hard[value.name] = torch.from_numpy(q if q.flags.writeable else q.copy())  # a remote result is read-only
                emit(block, {value.name: (q, scale, zero)})
                del q, scale, zero
                trim_heap()
            solutions.close()  # the executor's workers go now
            self.timings["solves"] += time.perf_counter() - clock - late[0]
            self.timings["grams"] += late[0]
        if spill is not None:  # the Gram matrices are gone: the block's weights come back for its forward
            hard = {name: torch.from_numpy(t.numpy()) for name, t in hard.items()}
            spill.close()
            shutil.rmtree(spill.path.parent)
        return {name: _layout(rows, shapes[name]) for name, rows in hard.items()}

    def quantizer(self, wt: np.ndarray, start: tuple[np.ndarray, ...] | None = None) -> IntQuantizer | ShiftQuantizer | BinaryQuantizer | TernaryQuantizer | BCQQuantizer:
        """``start``: a solver's solution (int, bcq), or the salient mask (N, K) (binary, ``salient_ratio``)."""
        if self.config.grid == "bcq":
            return BCQQuantizer(wt, self.config.bits, self._bcq_group(wt.shape[1]), self.config.alpha_terms, start=start)
        if self.config.grid == "binary":
            return BinaryQuantizer(wt, self.config.planes, self.config.center, salient=None if start is None else start[0])
        if self.config.grid == "ternary":
            return TernaryQuantizer(wt)
        if self.config.grid == "shift":
            return ShiftQuantizer(wt, self.config.bits, self.config.zero)
        fmt = self.config.number_format
        assert isinstance(fmt, IntFormat)
        return IntQuantizer(wt, fmt, granularity_from(self.config.group_size), min_ratio=self.config.min_ratio, start=start)

    def learn(self, model: ir.Model, blocks: list[Block], emit: Callable[[Block, dict[str, tuple[np.ndarray, ...]]], None]) -> None:
        """Train every block in order and hand each block's weights to ``emit`` (weight name → the quantizer's
        export: (dequantized Wᵀ, scale, zero point) per element for integer grids, (units, scale per output) for
        powers of two, (signs, α, mean) for sign planes, (signs, α per group) for binary codes): right after the
        block, so one block's solutions are held at a time, or with ``tune_steps`` after the end-to-end phase.

        Without learning (``clip_steps = round_steps = tune_steps = 0``: GPTQ on the quantized model's inputs to
        each block, sequential GPTQ) the full-precision path is not run: nothing compares against it."""
        graph = model.graph
        inputs, made = [], []
        for block in blocks:
            weights = {v.name for v in _weights(block)}
            inputs.append([n for n in _reads(block.nodes) if n not in weights])
            made.append({v.name: v for node in block.nodes for v in node.outputs})
        produced = {name for names in made for name in names}
        tail = self.tail(graph, blocks[-1].output) if self.config.tune_steps else None
        tail_reads = [] if tail is None else [n for n in tail.input_names if n != blocks[-1].output.name]
        readers = [*inputs, tail_reads]
        outside = list(dict.fromkeys(n for names in readers for n in names if n not in produced))
        modules, probes, stages = [], [], []
        for b, block in enumerate(blocks):  # each block computes its stream output and what later blocks read of it
            passed = [made[b][n] for names in readers[b + 1 :] for n in names if n in made[b]]
            outputs = list(dict.fromkeys([block.output, *passed]))
            values = {v.name: v for node in block.nodes for v in node.inputs if v is not None}
            fed = [values[n] for n in inputs[b]] + _weights(block) + self._biases(block) + self._floats(block)
            modules.append(TorchGraph(graph, nodes=block.nodes, inputs=fed, outputs=outputs))
            wanted = list(dict.fromkeys(n.inputs[0] for n in block.targets))
            needed = _feeding(block.nodes, wanted) if wanted else block.nodes  # not the nodes after the last target's input
            reads = {v.name for node in needed for v in node.inputs if v is not None} | {v.name for v in wanted}
            probes.append(TorchGraph(graph, nodes=needed, inputs=[v for v in fed if v.name in reads], outputs=wanted))
            # sequential GPTQ's steps, built before any block's weights are emitted (emit rewires their readers)
            stages.append(self._stages(graph, block, fed, probes[-1]) if self._lean(block) else [])
        clock = time.perf_counter()
        read = {v.name: v for node in graph for v in node.inputs if v is not None}
        static = [n for n in outside if _static(read[n])]  # e.g. a head tied to the embedding: its weight transposed
        self._check_samples(len(self.calibration))  # before the first inputs' collection, not after
        samples = self.calibration.activations(model, [n for n in outside if n not in static])
        if static:  # the same on every sample: computed once and shared, not held once per sample
            once = CalibrationData([next(iter(self.calibration))]).activations(model, static, progress=False)[0]
            samples = [{**sample, **once} for sample in samples]
        seconds = {"inputs": time.perf_counter() - clock}  # where the pass's time goes, in its note
        clock = time.perf_counter()
        later = {name: max(i for i, names in enumerate(inputs) if name in names) for names in inputs for name in names}
        shared = [{k: torch.from_numpy(np.asarray(v)) for k, v in s.items()} for s in samples]
        if self.config.tune_steps and self.config.tune_augment:
            _image_input(shared[0])  # refused before the blocks' work, not after
        # the per-block phase reads the first start_samples; the full-precision stream runs on every sample, whose
        # value where the blocks end is the end-to-end phase's target
        quant = [dict(s) for s in shared[: self.config.start_samples or len(shared)]]  # value name → tensor on the quantized path, per sample
        learning = bool(self.config.clip_steps or self.config.round_steps or self.config.tune_steps)
        full = [dict(s) for s in shared] if learning or self.config.float_inputs else []  # the same on the full-precision path
        if not self.config.tune_steps:  # only the end-to-end phase reads the first inputs again
            del samples, shared
        schedule = Schedule(self.config.clip_steps, self.config.round_steps, self.config.clip_lr, self.config.round_lr,
                            self.config.reg, seed=self.config.seed, loss=self.config.loss)  # fmt: skip
        learned = []
        self.timings = dict.fromkeys(("grams", "solves", "forward"), 0.0)  # seconds, sequential GPTQ's phases
        self.learned_biases: dict[str, np.ndarray] = {}  # bias name → its learned value (bias = true)
        self.learned_floats: dict[str, np.ndarray] = {}  # float vector name → its value learned end to end (tune_floats)
        self.results: list[BlockResult] = []  # per block, for callers and tests
        bar = tqdm(total=len(blocks), desc=f"reconstruct {self.config.tag}", leave=False)
        for b, (block, module, probe, names) in enumerate(zip(blocks, modules, probes, inputs, strict=True)):
            if self._lean(block):
                originals = _weights(block)  # before emit rewires the block's readers: the float path reads them
                with torch.no_grad():
                    hard = self._sequential_gptq(block, stages[b], names, quant, emit, full)
                    clock = time.perf_counter()
                    for i in range(len(quant)):
                        quant[i].update(module(**{n: quant[i][n] for n in names}, **hard))
                    del hard
                    if full:  # float_inputs: the float model's stream goes on through the block's float weights
                        float_weights = {v.name: torch.from_numpy(v.const_value.numpy().astype(np.float32)) for v in originals}
                        for i in range(len(full)):
                            full[i].update(module(**{n: full[i][n] for n in names}, **float_weights))
                        del float_weights
                    self.timings["forward"] += time.perf_counter() - clock
                del originals
                trim_heap()  # the forward's activations and the block's weights: the next block starts from its inputs
                if block.targets:
                    self.notes.append(f"block {b} ({len(_weights(block))} weights): GPTQ on the quantized model's inputs, no learning")
                for env in (*quant, *full):  # drop what no later block reads
                    for name in [n for n in env if later.get(n, -1) <= b]:
                        del env[name]
                bar.update()
                continue
            float_weights = {v.name: torch.from_numpy(v.const_value.numpy().astype(np.float32)) for v in _weights(block) + self._biases(block)}
            biases = {v.name: torch.nn.Parameter(float_weights.pop(v.name).clone()) for v in self._biases(block)}
            # tune_floats: the block's other float vectors, fed like the biases and held in their dict, learned end to end only
            floats = {v.name: torch.from_numpy(v.const_value.numpy().astype(np.float32)) for v in self._floats(block)}
            learned_biases = list(biases.values())
            biases.update(floats)
            starts = self._gptq(block, probe, names, quant, {**float_weights, **biases}) if block.targets and self.config.grid in ("int", "bcq") and self.config.start == "gptq" else {}
            if block.targets and self.config.salient_ratio:  # PB-LLM: each weight's salient mask, chosen once
                starts = self._salient(block, probe, names, quant, {**float_weights, **biases})
            quantizers = {v.name: self.quantizer(_rows(float_weights[v.name]).numpy(), starts.get(v.name)) for v in _weights(block)}
            shapes = {name: tuple(w.shape) for name, w in float_weights.items()}
            out = block.output.name
            with torch.no_grad(), _float(module):
                computed = [module(**{n: s[n] for n in names}, **float_weights, **biases) for s in full]
            targets = [c[out] for c in computed]  # every sample's; the blocks learn on the first len(quant)

            def run(i: int, weights: dict[str, torch.Tensor], names=names, module=module, out=out, shapes=shapes, biases=biases) -> torch.Tensor:
                return module(**{n: quant[i][n] for n in names}, **{k: _layout(w, shapes[k]) for k, w in weights.items()}, **biases)[out]

            def show(phase: str, loss: float) -> None:
                bar.set_postfix_str(f"block {b}: {phase} loss {loss:.3g}", refresh=False)

            # no per-block steps: the start as it is, rounded as train_block would leave it with none; with tune_steps
            # its output error is measured on the quantized forward below, not by three more passes over the samples
            measured: list[float] | None = None
            if quantizers and not (self.config.clip_steps or self.config.round_steps):
                for q in quantizers.values():
                    q.start_rounding()
                    q.hard = True
                if not learning:
                    self.notes.append(f"block {b} ({len(quantizers)} weights): GPTQ on the quantized model's inputs, no learning")
                else:
                    measured = []
            elif quantizers:
                result = train_block(run, quantizers, targets[: len(quant)], schedule, biases=learned_biases, progress=show)
                self.results.append(result)
                self.notes.append(f"block {b} ({len(quantizers)} weights): output error {result.loss_start:.4g} (start) → "
                                  f"{result.loss_clip:.4g} (clipping) → {result.loss_end:.4g} (rounding)")  # fmt: skip
            with torch.no_grad():
                hard = {name: _layout(q(), shapes[name]) for name, q in quantizers.items()}
                hard.update({name: b.detach().clone() for name, b in biases.items()})
                for i in range(len(quant)):
                    found = module(**{n: quant[i][n] for n in names}, **hard)
                    if measured is not None:
                        measured.append(float(block_error(found[out], targets[i], self.config.loss)))
                    quant[i].update(found)
                for env, found in zip(full, computed, strict=True):
                    env.update(found)
            del hard, computed
            if measured is not None:  # what the end-to-end phase starts from, block by block
                error = float(np.mean(measured))
                self.results.append(BlockResult(error, error, error, 0.0))
                self.notes.append(f"block {b} ({len(quantizers)} weights): output error {error:.4g} from the start, no per-block steps")
            if not self.config.tune_steps:
                emit(block, {name: q.export() for name, q in quantizers.items()})
            self.learned_biases.update({name: b.detach().numpy().copy() for name, b in biases.items() if name not in floats})
            if self.config.tune_steps:  # kept for the end-to-end phase, the biases fixed; the float block for matching or crops
                teacher = {**float_weights, **{v.name: torch.from_numpy(v.const_value.numpy().astype(np.float32)) for v in self._biases(block)}, **floats} if self.config.tune_match or self.config.tune_augment else {}
                learned.append((quantizers, shapes, {name: b.detach().clone() for name, b in biases.items()}, teacher))
                final = targets  # at the last block: the full-precision model's stream where the blocks end
            for env in (*quant, *full):  # drop what no later block reads
                for name in [n for n in env if later.get(n, -1) <= b]:
                    del env[name]
            del float_weights, quantizers, starts, floats  # one block's weights held at a time (kept in learned for tuning)
            bar.update()
        bar.close()
        seconds["blocks"] = time.perf_counter() - clock
        if not learning and any(self.timings.values()):
            self.notes.append("sequential GPTQ seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()) +
                              " (inputs and Gram matrices, solves with emission, quantized forward)")  # fmt: skip
        if self.config.tune_steps:
            chain = list(zip(blocks, modules, inputs, learned, strict=True))
            clock = time.perf_counter()
            self._tune(chain, tail, shared, final)
            seconds["end to end"] = time.perf_counter() - clock
            for block, (quantizers, _, held, _) in zip(blocks, learned, strict=True):
                self.learned_floats.update({v.name: held[v.name].detach().numpy().copy() for v in self._floats(block)})  # before emission rewires it
                emit(block, {name: q.export() for name, q in quantizers.items()})
        self.seconds = seconds  # inputs, blocks, end to end: for callers
        per = {"blocks": (len(blocks), "block"), "end to end": (self.config.tune_steps, "step")}
        self.notes.append("seconds: " + ", ".join(f"{k} {v:.1f}" + (f" ({v / per[k][0]:.2f} per {per[k][1]})" if per.get(k, (0,))[0] else "")
                                                  for k, v in seconds.items()))  # fmt: skip

    def _check_samples(self, count: int) -> None:
        """Refuse a split of the ``count`` calibration samples that leaves a phase nothing to read."""
        c = self.config
        if c.start_samples > count:
            raise BitfoldError(f"start_samples = {c.start_samples} asks for more than the calibration data's {count} samples; "
                               f"give at most {count}, or 0 for all")  # fmt: skip
        if c.tune_holdout and c.tune_holdout >= count:
            raise BitfoldError(f"tune_holdout = {c.tune_holdout} leaves nothing to train on: the calibration data holds "
                               f"{count} samples; hold out fewer, or calibrate on more")  # fmt: skip
        if c.tune_holdout and c.start_samples and c.tune_holdout > count - c.start_samples:
            raise BitfoldError(f"tune_holdout = {c.tune_holdout} samples are held out among those after the first start_samples = "
                               f"{c.start_samples} (which the blocks fitted), and the calibration data holds {count - c.start_samples} "
                               "of them; hold out fewer, or start on fewer")  # fmt: skip

    def tail(self, graph: ir.Graph, end: ir.Value) -> TorchGraph | None:
        """The nodes from the blocks' end to the graph's first output (final norm and LM head), as a module; None
        when the blocks end at it."""
        if not graph.outputs or graph.outputs[0] is end:
            return None
        order = {node: i for i, node in enumerate(graph)}
        nodes = sorted(_descendants(end) & _ancestors(graph.outputs[0]), key=order.__getitem__)
        if not nodes:
            raise BitfoldError(f"tune_steps trains against the graph's first output '{graph.outputs[0].name}', which does not depend on where the blocks end ('{end.name}').")
        return TorchGraph(graph, nodes=nodes, outputs=[graph.outputs[0]])

    def _tune(self, chain: list[tuple[Block, TorchGraph, list[str], tuple]], tail: TorchGraph | None,
              shared: list[dict[str, torch.Tensor]], final: list[torch.Tensor]) -> None:  # fmt: skip
        """Every quantizer's scale factors (and with ``tune_weights`` its latent weights) learned at once against the
        full-precision model's output: the calibration sample run through all blocks with their quantized weights,
        then the tail; with ``tune_match`` each block's output also against the float model's there."""
        config = self.config
        # the tokens each sample holds (padding carries no meaning to match), where the samples say
        masks = [torch.from_numpy(np.asarray(s["attention_mask"])) if "attention_mask" in s else None for s in self.calibration] if config.tune_match else []
        parameters = [p for _, _, _, (quantizers, *_) in chain for q in quantizers.values() for p in q.start_tuning()]
        latent = [p for _, _, _, (quantizers, *_) in chain for q in quantizers.values() for p in q.start_latent()] if config.tune_weights else []
        learning = [q for _, _, _, (quantizers, *_) in chain for q in quantizers.values()] if config.tune_weights else []
        floats = []  # tune_floats: each block's float vectors, made learnable in place in its held dict
        for blk, _, _, (_, _, held, _) in chain:
            for v in self._floats(blk):
                held[v.name] = torch.nn.Parameter(held[v.name].clone())
                floats.append(held[v.name])
        codes_before = [_codes(q) for q in learning]
        reach = config.tune_weight_lr * config.tune_steps  # about the farthest Adam moves a latent code
        if learning and config.grid == "int" and reach < 0.5:
            self.notes.append(f"tune_weight_lr × tune_steps = {reach:.3g} < 0.5: an integer code changes only once its latent "
                              "moves half a step, so none can change; raise either to let the codes learn")  # fmt: skip
        end = chain[-1][0].output.name

        def block(module: TorchGraph, names: list[str], learned: tuple, *feeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
            quantizers, shapes, biases, _ = learned
            found = module(**dict(zip(names, feeds, strict=True)), **{name: _layout(q(), shapes[name]) for name, q in quantizers.items()}, **biases)
            return tuple(found[n] for n in module.output_names)

        image = _image_input(shared[0]) if config.tune_augment else None
        generator = torch.Generator().manual_seed(config.seed)

        def run(i: int) -> tuple[torch.Tensor, ...]:
            env = dict(shared[i])
            cropped = image is not None
            if cropped:  # a fresh crop per training step; the scores before and after read one fixed crop per sample
                fixed = None if torch.is_grad_enabled() else torch.Generator().manual_seed(config.seed + 7919 * (i + 1))
                env[image] = _random_crop(env[image], fixed or generator)
            teach = dict(env) if cropped or (config.tune_match and torch.is_grad_enabled()) else None
            terms = []
            for blk, module, names, learned in chain:
                feeds = [env[n] for n in names]
                if torch.is_grad_enabled() and config.tune_recompute:  # each block's activations recomputed in the backward pass, not all held
                    found = checkpoint(block, module, names, learned, *feeds, use_reentrant=False)
                else:
                    found = block(module, names, learned, *feeds)
                env.update(zip(module.output_names, found, strict=True))
                if teach is not None:
                    with torch.no_grad(), _float(module):
                        teach.update(module(**{n: teach[n] for n in names}, **learned[3]))
                    if config.tune_match and torch.is_grad_enabled():
                        terms.append(_direction_error(env[blk.output.name], teach[blk.output.name], masks[i]))
            extra = (config.tune_match * torch.stack(terms).mean(),) if terms else ()
            reference = teach if cropped else {**env, end: final[i]}  # the full-precision stream where the blocks end
            if tail is None:
                return env[end], reference[end], *extra
            out = tail.output_names[0]
            with torch.no_grad(), _float(tail):
                target = tail(**{n: reference[n] for n in tail.input_names})[out]
            return tail(**{n: env[n] for n in tail.input_names})[out], target, *extra

        def bound() -> None:
            for _, _, _, (quantizers, *_) in chain:
                for q in quantizers.values():
                    q.bound_latent()

        bar = tqdm(total=config.tune_steps, desc=f"reconstruct {config.tag}: end to end", leave=False)

        def show(loss: float) -> None:
            if bar.n == 0:
                bar.reset()  # the rate counts training steps, not the evaluation before them
            bar.set_postfix_str(f"{config.tune_loss} {loss:.3g}", refresh=False)
            bar.update()

        result = tune_scales(run, parameters, len(shared), steps=config.tune_steps, lr=config.tune_lr, loss=config.tune_loss,
                             seed=config.seed, progress=show, latent=latent, latent_lr=config.tune_weight_lr, floats=floats, floats_lr=config.tune_float_lr,
                             after_step=bound if latent else None, batch=config.tune_batch, schedule=config.tune_schedule,
                             holdout=config.tune_holdout, check=config.tune_check, holdout_from=config.start_samples)  # fmt: skip
        bar.close()
        self.tuned = result
        kept = "" if result.loss_end < result.loss_start else f" (reached {result.loss_reached:.4g}: undone)"
        what = (", weights learned" if config.tune_weights else "") + (f", {len(floats)} float vectors learned" if floats else "")
        changed = ""
        if learning:  # how many codes the latent weights moved (an integer code moves once its latent crosses half a step)
            moved = sum(int((_codes(q) != before).sum()) for q, before in zip(learning, codes_before, strict=True))
            changed = f"; {moved} of {sum(b.numel() for b in codes_before)} codes changed"
        held = ""
        if result.holdout_curve:  # early stopping: the held-out samples' loss at each check, and the step kept
            curve = ", ".join(f"{step}: {value:.4g}" for step, value in result.holdout_curve)
            held = f"; held out ({config.tune_holdout} samples) {curve}; kept step {result.kept_step}"
        scored = " on the held-out samples" if result.holdout_curve else ""
        self.notes.append(f"end to end ({config.tune_steps} steps{what}): {config.tune_loss} {result.loss_start:.4g} → {result.loss_end:.4g}{scored}{kept}{changed}{held}")


class _ShiftEmitter(Shift):
    """The shift pass's collection and emission, stamping what it writes as reconstruct's."""

    name = "reconstruct"


class _BCQEmitter(ShiftAdd):
    """The shiftadd pass's collection and emission, stamping what it writes as reconstruct's."""

    name = "reconstruct"


class _BinaryEmitter(Binarize):
    """The binarize pass's collection and emission, stamping what it writes as reconstruct's."""

    name = "reconstruct"


class _TernaryEmitter(Ternarize):
    """The ternarize pass's collection and emission, stamping what it writes as reconstruct's."""

    name = "reconstruct"


def _codes(quantizer: torch.nn.Module) -> torch.Tensor:
    """A copy of the values on a quantizer's grid: integer codes, sign planes."""
    with torch.no_grad():
        if hasattr(quantizer, "grid_values"):
            return quantizer.grid_values().detach().clone()
        return torch.stack(quantizer.signs()).detach().clone()


@contextlib.contextmanager
def _float(module: TorchGraph) -> Iterator[None]:
    """``module`` computing the float model: the activations' Q/DQ pairs of a QDQ graph passed through."""
    module.fake_quantize = False
    try:
        yield
    finally:
        module.fake_quantize = True


def _image_input(sample: dict[str, torch.Tensor]) -> str:
    """The one NCHW float input among the values the blocks read from outside, which ``tune_augment`` crops."""
    images = [name for name, value in sample.items() if value.ndim == 4 and value.is_floating_point()]
    if len(images) != 1:
        raise BitfoldError(f"tune_augment crops the one NCHW image the blocks read, but they read {len(images)} 4-D float inputs ({', '.join(images) or 'none'}); set tune_augment = false.")
    return images[0]


def _random_crop(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random crop of each side's 50–100 % (the same for the whole batch), flipped half the time, resized back
    bilinearly to the input's height and width."""
    height, width = images.shape[-2:]
    scale = 0.5 + 0.5 * torch.rand(2, generator=generator)
    h, w = max(1, round(float(scale[0]) * height)), max(1, round(float(scale[1]) * width))
    top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
    crop = images[..., top : top + h, left : left + w]
    if float(torch.rand(1, generator=generator)) < 0.5:
        crop = crop.flip(-1)
    return torch.nn.functional.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)


def _direction_error(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 − cosine between the two hidden states per token (last axis), or per pixel over the channels (NCHW),
    averaged over the tokens ``mask`` keeps when it has the tokens' shape."""
    axis = 1 if student.dim() == 4 else -1
    error = 1 - torch.nn.functional.cosine_similarity(student, teacher, dim=axis, eps=1e-12)
    if mask is not None and tuple(mask.shape) == tuple(error.shape) and mask.any():
        weights = mask.to(error.dtype)
        return (error * weights).sum() / weights.sum()
    return error.mean()


def _rows(w: torch.Tensor) -> torch.Tensor:
    """A weight as the quantizers' (N, K) rows: a MatMul's (K, N) transposed, a Conv's (N, C/groups, kh, kw) flattened."""
    return w.T if w.dim() == 2 else w.reshape(w.shape[0], -1)


def _layout(rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(N, K) rows back in the graph's layout of a weight of ``shape``."""
    return rows.T if len(shape) == 2 else rows.reshape(shape)


def _feeding(nodes: list[ir.Node], outputs: list[ir.Value]) -> list[ir.Node]:
    """The nodes (in order) that ``outputs`` depend on."""
    need, kept = {v.name for v in outputs}, []
    for node in reversed(nodes):
        if any(v.name in need for v in node.outputs):
            kept.append(node)
            need.update(v.name for v in node.inputs if v is not None)
    return kept[::-1]


def _weights(block: Block) -> list[ir.Value]:
    return list(dict.fromkeys(node.inputs[1] for node in block.targets))


def _reads(nodes: list[ir.Node]) -> list[str]:
    """Names of the non-constant values ``nodes`` read that none of them computes, in order of first use."""
    inside = {v.name for node in nodes for v in node.outputs}
    found: dict[str, None] = {}
    for node in nodes:
        for v in node.inputs:
            if v is not None and v.name not in inside and ir.convenience.get_const_tensor(v) is None:
                found[v.name] = None
    return list(found)


def _descendants(value: ir.Value) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    todo = [user for user, _ in value.uses()]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(user for v in node.outputs for user, _ in v.uses())
    return seen


def _static(value: ir.Value) -> bool:
    """Whether ``value`` is computed from constants alone, the same for every input: no graph input (nor a node
    with a subgraph, which may read one) among what its producers read."""
    nodes = _ancestors(value)
    return bool(nodes) and all(
        not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
        and all(v is None or v.producer() is not None or (v.const_value is not None and not v.is_graph_input()) for v in node.inputs)
        for node in nodes
    )


def _ancestors(value: ir.Value) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    todo = [value.producer()]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(v.producer() for v in node.inputs if v is not None)
    return seen


def _gptq_solve(settings: tuple, problem: tuple[np.ndarray, np.ndarray, bool]) -> tuple[tuple[np.ndarray, ...], list[str]]:
    """One weight's GPTQ solution (dequantized Wᵀ, scale, zero point) and the solver's notes (an executor's work item);
    a Gram matrix no later weight reads (``owned``) is overwritten by the factorization, its copy for a dampening
    retry kept in the folder ``settings`` name (streaming: the scratch folder beside the output)."""
    fmt, granularity, damp, act_order, clip, scratch = settings
    wt, gram, owned = problem
    notes: list[str] = []
    return gptq(wt, gram, fmt, granularity, damp=damp, act_order=act_order, clip=clip, notes=notes, overwrite_h=owned, scratch=scratch), notes
