"""Quantization: weights stored in fewer bits, each scheme written from its definition.

Symmetric absmax int8: a block of weights shares one scale s = max|w| / 127 and each weight is
stored as q = round(w / s), an integer in [-127, 127]; w is read back as q * s (int4: 7 for
127). The block is the whole tensor, one output row, or a group of 32 consecutive weights of a
row (GGUF's q8_0: the scale in float16, rounding half away from zero, as ggml-quants.c does).

    absmax(torch.tensor([[0.5, -1.0, 0.25]]), "row")  ->  q [[64, -127, 32]], s [[1/127]]

int4 in groups of 32, q4_0's layout: the scale maps the weight of largest magnitude, with its
sign, to -8 (d = w_max / -8), so the group spends all 16 levels -8..7; q = trunc(w / d + 8.5)
- 8. Two 4-bit values share a byte: byte j of a group holds value j in its low nibble and
value j + 16 in its high one (`pack_nibbles`).

FP8 as Meta serves Llama 3 405B ("The Llama 3 Herd of Models", section 6.2; Meta's
llama-models, models/llama3/quantization/loader.py and models/quantize_impls.py): weights in
torch.float8_e4m3fn with one scale per row, activations cast per token with a scale computed
as they arrive ("dynamic"), the token's max|x| capped at 1200 (`fp8_activation_scale_ub`), only
in the feed-forward layers, and not in the first and last blocks.

`quantize_model` swaps a model's nn.Linear layers for `QuantLinear` (integers and scales
stored, dequantized on the fly) or `Fp8Linear`; `stored_bytes` measures what a model holds."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32  # weights per block in GGUF's q8_0, q4_0, q5_0
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
FP8_ACTIVATION_CAP = 1200.0  # Meta's upper bound on a token's max|x| (loader.py's default)
SCHEMES = ("int8-tensor", "int8-row", "q8_0", "int4-tensor", "int4-row", "q4_0", "fp8")


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties away from zero (C's roundf, which llama.cpp uses;
    torch.round sends ties to the even integer): [0.5, 1.5, -2.5] -> [1, 2, -3]."""
    a = x.abs()
    whole = torch.floor(a)
    return torch.sign(x) * (whole + (a - whole >= 0.5).to(x.dtype))


def _groups(w: torch.Tensor, size: int) -> torch.Tensor:
    """(out, in) -> (out, in // size, size); a row must be whole groups."""
    out, n_in = w.shape
    if n_in % size:
        raise ValueError(f"rows of {n_in} weights are not whole groups of {size}: "
                         f"quantize this layer per row instead")
    return w.reshape(out, n_in // size, size)


def absmax(w: torch.Tensor, per: str = "row", bits: int = 8, group_size: int = GROUP):
    """Symmetric absmax of a (out, in) matrix: (q int8 (out, in), scales (out or 1, n_groups)),
    q in [-(2^(bits-1) - 1), 2^(bits-1) - 1]: [-127, 127] for int8, [-7, 7] for int4.
    per: "tensor" (one scale), "row" (one per output row) or "group" (one per group_size
    weights of a row, in float16 as q8_0 stores it). The integers are computed with the
    float32 scale, as ggml does, before the scale is stored."""
    w = w.detach().float()
    if per == "tensor":
        blocks = w.reshape(1, 1, -1)
    elif per == "row":
        blocks = w.reshape(w.shape[0], 1, -1)
    elif per == "group":
        blocks = _groups(w, group_size)
    else:
        raise ValueError(f"per must be 'tensor', 'row' or 'group', not {per!r}")
    scale = blocks.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)  # (rows, groups, 1)
    inv = torch.where(scale == 0, 0.0, 1.0 / scale)
    q = round_half_away(blocks * inv).to(torch.int8).reshape(w.shape)
    scale = scale.squeeze(-1)
    return q, scale.half() if per == "group" else scale


def q4_0(w: torch.Tensor):
    """int4 in groups of 32 as GGUF's q4_0: (q int8 in [-8, 7] (out, in), d float16 (out,
    in // 32)). d = (the weight of largest magnitude) / -8, so that weight becomes exactly
    -8 and the other end, 7, is never wasted: [2.0, -1.0, 0.5, ...] -> d = -0.25,
    q = [-8, 4, -2, ...]."""
    blocks = _groups(w.detach().float(), GROUP)
    biggest = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))  # signed
    d = biggest / -8
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.trunc(blocks * inv + 8.5).clamp(0, 15) - 8  # q4_0 stores q + 8 in 0..15
    return q.to(torch.int8).reshape(w.shape), d.squeeze(-1).half()


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int4 values (out, in) in [-8, 7] -> bytes (out, in // 2) in q4_0's layout: each value
    is stored as q + 8 (0..15), and in each group of 32, byte j holds value j in its low 4 bits
    and value j + 16 in its high 4 bits (not neighbours j, j + 1 as Meta's pack_int4 does).
    A group [-8, -7, ..., 7, 7, ..., 7] -> byte 0 = 0 | 15 << 4 = 0xF0."""
    u = (_groups(q.to(torch.int16) + 8, GROUP)).to(torch.uint8)  # (out, n_groups, 32)
    low, high = u[..., :GROUP // 2], u[..., GROUP // 2:]
    return (low | (high << 4)).reshape(q.shape[0], -1)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles: bytes (out, in // 2) -> int8 values (out, in) in [-8, 7]."""
    g = packed.reshape(packed.shape[0], -1, GROUP // 2)
    low, high = g & 0x0F, g >> 4
    return (torch.cat([low, high], -1).to(torch.int8) - 8).reshape(packed.shape[0], -1)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (out, in) and scales (out or 1, n_groups) -> float32 weights q * scale of its group."""
    rows = q.shape[0] if scale.shape[0] > 1 else 1
    blocks = q.float().reshape(rows, scale.shape[1], -1)
    return (blocks * scale.float().unsqueeze(-1)).reshape(q.shape)


def gguf_blocks(q: torch.Tensor, scale: torch.Tensor, kind: str):
    """Our integers and scales laid out as GGUF stores them, one row of bytes per block of
    32: q8_0 = 2 bytes of float16 scale + 32 int8; q4_0 = 2 bytes of scale + 16 bytes of
    nibbles. What gguf.quants.quantize returns, reshaped (n_blocks, bytes)."""
    d = scale.half().reshape(-1, 1).view(torch.uint8)  # (n_blocks, 2) little-endian float16
    if kind == "q8_0":
        body = q.reshape(-1, GROUP).view(torch.uint8)
    elif kind == "q4_0":
        body = pack_nibbles(q).reshape(-1, GROUP // 2)
    else:
        raise ValueError(f"kind must be 'q8_0' or 'q4_0', not {kind!r}")
    return torch.cat([d, body], 1).numpy()


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to float8 e4m3 (1 sign, 4 exponent bits with bias 7, 3 mantissa
    bits; no infinities), from the definition: a normal number 2^e * 1.m keeps 3 bits of m,
    so its neighbours are 2^(e-3) apart; below 2^-6 (subnormals) they are 2^-9 apart; ties
    go to the even neighbour; beyond 448, the largest finite value, it saturates.
    [0.3, 1.0625, 500.0] -> [0.3125, 1.0, 448.0]."""
    a = x.abs().float().clamp(max=E4M3_MAX)
    e = torch.floor(torch.log2(a.clamp(min=2.0 ** -6)))  # exponent, at least the normal one
    step = torch.exp2(e - 3)
    return torch.sign(x) * torch.round(a / step) * step  # torch.round: ties to even


def fp8_rowwise(w: torch.Tensor):
    """Weights (out, in) -> (float8_e4m3fn (out, in), float32 scale (out, 1)): each row's
    max|w| maps to 448."""
    w = w.detach().float()
    scale = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (w / scale).to(torch.float8_e4m3fn), scale


def fp8_per_token(x: torch.Tensor, cap: float | None = FP8_ACTIVATION_CAP):
    """Activations (..., in) -> (float8_e4m3fn, float32 scale (..., 1)), one scale per
    token computed now. With cap, a token's max|x| counts as at most `cap` (Meta's upper
    bound): one huge activation then saturates at 448 instead of shrinking every other value
    of the token towards the float8 underflow."""
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    if cap is not None:
        amax = amax.clamp(max=cap)
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class QuantLinear(nn.Module):
    """A linear layer (no bias) that stores integers and scales, not float weights, and
    dequantizes its weight at every call. scheme: "int8-tensor", "int8-row", "q8_0" (int8
    in groups of 32), "int4-tensor", "int4-row" or "q4_0" (int4 in groups of 32); int4
    values are stored two a byte."""

    def __init__(self, linear: nn.Linear, scheme: str):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("QuantLinear holds Llama's bias-free layers; this one has a bias")
        self.scheme, self.in_features, self.out_features = scheme, linear.in_features, \
            linear.out_features
        w = linear.weight
        per = {"int8-tensor": "tensor", "int8-row": "row", "q8_0": "group",
               "int4-tensor": "tensor", "int4-row": "row"}
        if scheme == "q4_0":
            q, scale = q4_0(w)
        elif scheme in per:
            q, scale = absmax(w, per[scheme], bits=4 if scheme.startswith("int4") else 8)
        else:
            raise ValueError(f"unknown scheme {scheme!r}: choose one of {', '.join(SCHEMES[:6])}")
        self.packed = scheme.startswith("int4") or scheme == "q4_0"
        if self.packed:
            q = pack_nibbles(q)  # (out, in // 2) bytes
        self.register_buffer("q", q.to(w.device))
        self.register_buffer("scale", scale.to(w.device))

    def weight_dequantized(self) -> torch.Tensor:
        q = unpack_nibbles(self.q) if self.packed else self.q
        return dequantize(q, self.scale)

    def forward(self, x):
        return F.linear(x, self.weight_dequantized().to(x.dtype))

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, scheme={self.scheme}"


class Fp8Linear(nn.Module):
    """Llama 3's FP8 layer: float8_e4m3fn weights with one scale per row; each token's input
    cast to float8 with its own scale (capped), the product of the two float8 matrices summed
    in float32 and rescaled by both scales (what torch._scaled_mm and Meta's fbgemm kernel
    compute on a GPU, here in plain float32 arithmetic)."""

    def __init__(self, linear: nn.Linear, cap: float | None = FP8_ACTIVATION_CAP):
        super().__init__()
        wq, scale = fp8_rowwise(linear.weight)
        self.register_buffer("weight_fp8", wq.to(linear.weight.device))
        self.register_buffer("scale", scale.to(linear.weight.device))
        self.cap, self.in_features, self.out_features = cap, linear.in_features, \
            linear.out_features

    def forward(self, x):
        xq, x_scale = fp8_per_token(x, self.cap)
        y = xq.float() @ self.weight_fp8.float().T  # (..., out): products of float8 values
        return (y * x_scale * self.scale.T).to(x.dtype)


def fp8_layer_names(model) -> list[str]:
    """The layers Meta's FP8 mode quantizes: w1, w2, w3 of every block but the first and
    the last (loader.py: layer_id 0 and n_layers - 1 are skipped)."""
    n = model.params.n_layers
    return [f"layers.{i}.feed_forward.{w}" for i in range(1, n - 1) for w in ("w1", "w2", "w3")]


def linear_names(model) -> list[str]:
    """Every nn.Linear of the model by name: the blocks' seven matrices and the output."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def quantize_model(model, scheme: str, names=None):
    """A copy of the model with the named nn.Linear layers quantized (the original is left
    as it was). names: default every linear layer (the embedding stays float: it is a table
    read one row per token), and for "fp8" Meta's choice, `fp8_layer_names`."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if names is None:
        names = fp8_layer_names(model) if scheme == "fp8" else linear_names(model)
    out = copy.deepcopy(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = out.get_submodule(parent) if parent else out
        layer = getattr(holder, child)
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{name} is a {type(layer).__name__}, not an nn.Linear")
        setattr(holder, child, Fp8Linear(layer) if scheme == "fp8" else QuantLinear(layer, scheme))
    return out


def dequantized_model(qmodel):
    """A float model whose linear layers hold the weights a quantized model reads back: the
    reference its logits must equal (integer schemes; FP8 also rounds the activations)."""
    out = copy.deepcopy(qmodel)
    for name, m in list(out.named_modules()):
        if isinstance(m, QuantLinear):
            parent, _, child = name.rpartition(".")
            lin = nn.Linear(m.in_features, m.out_features, bias=False, device=m.q.device)
            with torch.no_grad():
                lin.weight.copy_(m.weight_dequantized())
            setattr(out.get_submodule(parent) if parent else out, child, lin)
    return out


def stored_bytes(module: nn.Module) -> int:
    """Bytes of every tensor the module stores (parameters and buffers), measured from their
    storages, each counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def linear_bits_per_weight(model, float_bits: int | None = None) -> float:
    """Stored bits per weight of the linear layers alone (integers and scales, measured).
    float_bits: count a layer left in float at this many bits (16: as served in bf16)
    instead of the float32 it is held in here."""
    bits, weights = 0, 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, QuantLinear, Fp8Linear)):
            n = m.in_features * m.out_features
            plain = isinstance(m, nn.Linear) and float_bits is not None
            bits += n * float_bits if plain else 8 * stored_bytes(m)
            weights += n
    return bits / weights


@torch.no_grad()
def kl_per_token(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) in nats at each position (llama.cpp's perplexity --kl-divergence
    measure): sum_v p_ref(v) (log p_ref(v) - log p(v)). (..., vocab) -> (...)."""
    ref = F.log_softmax(ref_logits.float(), -1)
    return (ref.exp() * (ref - F.log_softmax(logits.float(), -1))).sum(-1)


@torch.no_grad()
def text_logits(model, texts_ids: list[list[int]]) -> list[torch.Tensor]:
    """Each text's logits at every position, one text at a time: [(n, vocab) float32]."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = [model(torch.tensor([ids], device=device))[0].float().cpu() for ids in texts_ids]
    model.train(was)
    return out


def bits_and_kl(logits: list[torch.Tensor], ref_logits: list[torch.Tensor],
                texts_ids: list[list[int]], n_bytes: int) -> dict:
    """Bits per byte (each token's -log2 p, after <|begin_of_text|>, over the texts' UTF-8
    bytes) and the mean KL per token from the reference's logits, in nats."""
    nats, kl, tokens = 0.0, 0.0, 0
    for got, ref, ids in zip(logits, ref_logits, texts_ids, strict=True):
        targets = torch.tensor(ids[1:])
        nats += F.cross_entropy(got[:-1], targets, reduction="sum").item()
        kl += kl_per_token(ref[:-1], got[:-1]).sum().item()
        tokens += len(targets)
    return {"bpb": nats / math.log(2) / n_bytes, "kl": kl / tokens}
