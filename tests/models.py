"""The synthetic model zoo: small seeded torch models exported through ``bitfold.from_torch``.

Each entry covers a structure real exporters produce: BN after Conv/ConvTranspose/Gemm, a BN whose input is
shared (must stay), LayerNorm attention, a Llama-style decoder (RMSNorm, SwiGLU, rotary, causal), dynamic batch.
Hand-built ONNX graphs for cases torch cannot produce (non-constant or training BN, MatMul+Add) live here too.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

import bitfold


def _randomize_bn(module: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
    return module.eval()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


class CNNWithBN(nn.Module):
    """Conv+BN, depthwise Conv+BN, grouped ConvTranspose+BN, Linear+BatchNorm1d (Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.up, self.bn3 = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), nn.BatchNorm2d(6)
        self.fc, self.bn4 = nn.Linear(6, 12), nn.BatchNorm1d(12)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.bn3(self.up(x)))
        return self.bn4(self.fc(x.mean(dim=(2, 3))))


class SharedBNInput(nn.Module):
    """Conv → BN → ReLU → Conv where the first Conv's output also feeds a residual Add: that BN must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv1(x)
        return self.conv2(torch.relu(self.bn(y))) + y


class EncoderBlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        for ln in (self.ln1, self.ln2):  # a non-trivial affine, as trained models have
            nn.init.normal_(ln.weight, 1.0, 0.2)
            nn.init.normal_(ln.bias, 0.0, 0.2)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, -1e4)
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attn)
        return x + self.mlp(self.ln2(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class DecoderBlock(nn.Module):
    """Llama-style: RMSNorm, rotary q/k, causal attention, SwiGLU MLP."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        self.register_buffer("inv_freq", inv, persistent=False)

    def rotate(self, x, cos, sin):
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2 :]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def forward(self, x):
        b, t, d = x.shape
        freqs = torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        h = self.norm1(x)
        q, k, v = (p(h).reshape(b, t, self.heads, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(attn)
        h = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class TinyLM(nn.Module):
    """Embedding → 2 decoder blocks → RMSNorm → head tied to the embedding: a whole residual stream."""

    def __init__(self, vocab: int = 96, dim: int = 48) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads=4, hidden=96) for _ in range(2))
        self.norm = RMSNorm(dim)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T


class PreLNBlock(nn.Module):
    """GPT-style pre-LayerNorm block: fused qkv with bias, GELU MLP with biases."""

    def __init__(self, dim: int = 48, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        for ln in (self.ln1, self.ln2):
            nn.init.normal_(ln.weight, 1.0, 0.2)
            nn.init.normal_(ln.bias, 0.0, 0.2)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)).softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attn)
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class TinyLayerNormLM(nn.Module):
    """Embedding → 2 pre-LayerNorm blocks → LayerNorm → untied head with bias."""

    def __init__(self, vocab: int = 96, dim: int = 48) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(PreLNBlock(dim) for _ in range(2))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)
        nn.init.normal_(self.norm.weight, 1.0, 0.2)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class InvertedResidual(nn.Module):
    """MobileNet/EfficientNet-Lite's block: 1x1 expand, ReLU6, 3x3 depthwise, ReLU6, 1x1 project, + x."""

    def __init__(self, channels: int, expand: int) -> None:
        super().__init__()
        hidden = channels * expand
        self.expand, self.dw = nn.Conv2d(channels, hidden, 1), nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.project = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        return x + self.project(F.relu6(self.dw(F.relu6(self.expand(x)))))


class ResidualCNN(nn.Module):
    """A small EfficientNet-Lite: stem, a stride-2 depthwise stage padded on one side (an ONNX Pad), two inverted
    residual blocks, a 1x1 head Conv, global average pool and a classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem, self.down = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.blocks = nn.Sequential(InvertedResidual(8, 4), InvertedResidual(8, 4))
        self.head, self.fc = nn.Conv2d(8, 32, 1), nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu6(self.down(F.pad(F.relu6(self.stem(x)), (0, 1, 0, 1))))
        x = F.relu6(self.head(self.blocks(x)))
        return self.fc(x.mean(dim=(2, 3)))


class ConvMixer(nn.Module):
    """A depthwise Conv and a pointwise Linear (a MatMul on channels-last activations) in one residual block,
    ConvNeXt's pattern; the classifier is a MatMul too."""

    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem, self.dw = nn.Conv2d(3, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pw, self.head = nn.Linear(channels, channels), nn.Parameter(torch.randn(channels, classes) / channels**0.5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pw(F.gelu(self.dw(x)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x.mean(dim=(2, 3)) @ self.head


def zoo() -> dict[str, ir.Model]:
    """name → exported onnx-ir model (seeded)."""
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=64)
    specs = {
        "mlp": (MLP(), (torch.randn(4, 32),), None),
        "cnn-bn": (_randomize_bn(CNNWithBN()), (torch.randn(2, 3, 16, 16),), None),
        "shared-bn-input": (_randomize_bn(SharedBNInput()), (torch.randn(1, 4, 8, 8),), None),
        "encoder-layernorm": (EncoderBlock(), (torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.int64)), None),
        "decoder-rmsnorm-swiglu-rope": (DecoderBlock(), (torch.randn(1, 8, 32),), None),
        "tiny-lm": (TinyLM(), (torch.randint(0, 96, (1, 8)),), None),
        "tiny-lm-layernorm": (TinyLayerNormLM(), (torch.randint(0, 96, (1, 8)),), None),
        "residual-cnn": (ResidualCNN(), (torch.randn(1, 3, 16, 16),), None),
        "conv-mixer": (ConvMixer(), (torch.randn(1, 3, 16, 16),), None),
        "dynamic-batch-cnn": (_randomize_bn(CNNWithBN()), (torch.randn(2, 3, 16, 16),), {"x": {0: batch}}),
    }
    return {name: bitfold.from_torch(m.eval(), inputs, dynamic) for name, (m, inputs, dynamic) in specs.items()}


# ---- hand-built graphs for structures torch does not export -------------------------------------------------


def _const(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(array, name=name))


def bn_graph(producer: str, *, training: bool = False, scale_is_input: bool = False, rank3: bool = False, seed: int = 0) -> ir.Model:
    """``producer`` ∈ {"matmul", "matmul-add"} followed by BatchNormalization, with optional negative variants."""
    rng = np.random.default_rng(seed)
    n, k, c = 4, 8, 6
    x = ir.val("x", ir.DataType.FLOAT, [n, 3, k] if rank3 else [n, k])
    w = _const("w", rng.standard_normal((k, c)).astype(np.float32))
    inits = [w]
    inputs = [x]
    nodes = [ir.node("MatMul", [x, w], name="matmul")]
    z = nodes[-1].outputs[0]
    if producer == "matmul-add":
        b = _const("b", rng.standard_normal(c).astype(np.float32))
        inits.append(b)
        nodes.append(ir.node("Add", [b, z], name="add"))
        z = nodes[-1].outputs[0]
    bn_c = 3 if rank3 else c  # rank 3: BN normalizes axis 1 (size 3), not the MatMul's channel axis
    params = [rng.uniform(0.5, 1.5, bn_c), rng.uniform(-0.2, 0.2, bn_c), rng.uniform(-0.5, 0.5, bn_c), rng.uniform(0.5, 2.0, bn_c)]
    bn_inputs = []
    for name, p in zip(("gamma", "beta", "mean", "var"), params, strict=True):
        if name == "gamma" and scale_is_input:
            v = ir.val("gamma", ir.DataType.FLOAT, [bn_c])
            inputs.append(v)
        else:
            v = _const(name, p.astype(np.float32))
            inits.append(v)
        bn_inputs.append(v)
    attrs = {"epsilon": 1e-3}
    if training:
        attrs["training_mode"] = 1
    nodes.append(ir.node("BatchNormalization", [z, *bn_inputs], attributes=attrs, name="bn"))
    y = nodes[-1].outputs[0]
    y.name = "y"
    y.dtype = ir.DataType.FLOAT
    y.shape = ir.Shape([n, 3, c] if rank3 else [n, c])
    graph = ir.Graph(inputs, [y], nodes=nodes, initializers=inits, opset_imports={"": 17}, name="bn_graph")
    return ir.Model(graph, ir_version=9)


# ---- shared data for solver and pass tests --------------------------------------------------------------------


def correlated_layer(n: int, k: int, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A weight (n, k), correlated inputs with uneven channel scales (rows, k), and their Gram H = XᵀX."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)) * 0.05
    x = rng.standard_normal((rows, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k))
    x *= 1 + 3 * rng.random(k)
    return w, x, x.T @ x


def output_error(w: np.ndarray, q: np.ndarray, x: np.ndarray) -> float:
    """Relative error of the layer output x·qᵀ against x·wᵀ."""
    return float(np.linalg.norm((w - q) @ x.T) / np.linalg.norm(w @ x.T))


def token_calibration(samples: int, vocab: int = 96, seq: int = 8, seed: int = 0):
    """Calibration data of random token sequences for the tiny LMs."""
    from bitfold.quant.calibration import CalibrationData

    rng = np.random.default_rng(seed)
    return CalibrationData([{"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64)} for _ in range(samples)])


def image_calibration(samples: int, size: int = 16, seed: int = 0, name: str = "x"):
    """Calibration data of smooth random images (1, 3, size, size) for the CNNs: neighbouring pixels and channels
    correlated, so input-patch Hessians are far from isotropic."""
    from bitfold.quant.calibration import CalibrationData

    rng = np.random.default_rng(seed)
    low = rng.standard_normal((samples, 1, 3, size // 4, size // 4)).repeat(4, axis=3).repeat(4, axis=4)
    mixed = low + 0.3 * low[:, :, ::-1] + 0.1 * rng.standard_normal(low.shape)
    return CalibrationData([{name: m.astype(np.float32)} for m in mixed])
