"""The Llama 3 transformer: RMSNorm, grouped-query attention with RoPE, SwiGLU, the block
and the whole model. Names and shapes follow Meta's reference `model.py`, so the two read
side by side; unlike Meta's inference-only version this one trains, and the KV cache is
an object passed in (see kv_cache.py) rather than a buffer inside each layer."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .rope import apply_rotary_emb, freqs_cis_for


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight. Unlike LayerNorm: no mean subtracted, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in float32 even when the model runs in bf16
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Grouped-query attention's sharing (notebook 03): each key (or value) head is read by
    n_rep query heads in a row, so query head h reads KV head h // n_rep. Each KV head is
    copied n_rep times, the copies side by side: heads [K0, K1], n_rep 2 -> [K0, K0, K1, K1]
    (not [K0, K1, K0, K1], which would give query head 1 the wrong keys).
    (batch, seq, n_kv_heads, head_dim) -> (batch, seq, n_kv_heads * n_rep, head_dim)."""
    return x if n_rep == 1 else torch.repeat_interleave(x, n_rep, dim=2)


def causal_mask(seqlen: int, start_pos: int = 0, device=None) -> torch.Tensor:
    """Additive mask (seqlen, start_pos + seqlen): 0 where a query may look, -inf in its
    future. causal_mask(2, start_pos=1) -> [[0, 0, -inf], [0, 0, 0]]."""
    # With a KV cache only the new tokens are queries, but they look at every key so far:
    # the scores are (seqlen, start_pos + seqlen), and row i is the token at position
    # start_pos + i. The only masked entries are (i, j) with j > start_pos + i, its future;
    # the first start_pos columns are cached positions, all in every query's past.
    mask = torch.full((seqlen, seqlen), float("-inf"), device=device).triu(diagonal=1)
    return torch.hstack([torch.zeros((seqlen, start_pos), device=device), mask])


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Additive mask (batch, 1, seq, seq) for documents packed into one window: a token sees
    the tokens before it in its own document and nothing of any other. doc_ids: (batch, seq),
    the document each token belongs to (equal ids, one document).
    document_mask(torch.tensor([[0, 0, 1]])) ->
    [[[[0, -inf, -inf], [0, 0, -inf], [-inf, -inf, 0]]]]: the third token starts a new
    document and sees itself alone."""
    # Row i is the query at position i, column j the key at j. The masked entries are (i, j)
    # with j > i (its future, as in causal_mask) or doc_ids[i] != doc_ids[j] (another
    # document): what is left is one causal triangle per document along the diagonal. The 1
    # broadcasts over the heads. Positions run on across documents (the paper, section 3.2,
    # names only the mask; Meta's reference has no position ids): RoPE's score depends on
    # i - j alone, so inside a triangle it is the score of the document run alone from 0,
    # and restarting them (transformers' packed position_ids) changes only the rounding.
    seqlen = doc_ids.shape[-1]
    past = torch.ones(seqlen, seqlen, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (batch, seq, seq)
    mask = torch.zeros(same_doc.shape, device=doc_ids.device)
    return mask.masked_fill(~(past & same_doc), float("-inf"))[:, None]  # (batch, 1, seq, seq)


def attention(q, k, v, mask=None):
    """Scaled dot-product attention written out. q: (batch, heads, seq, head_dim); k, v:
    (batch, heads, total, head_dim); mask broadcasts to (batch, heads, seq, total).
    Returns the output (batch, heads, seq, head_dim) and the weights (batch, heads, seq, total)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    weights = F.softmax(scores.float(), dim=-1).type_as(q)
    return weights @ v, weights


def fused_attention(q, k, v, mask=None, enable_gqa: bool = False):
    """torch's fused scaled_dot_product_attention, with one exception: in bfloat16 on a CPU
    without AVX-512, where torch's fused kernel raises ("pack_vnni2 is only supported when
    avx512 is supported", torch 2.13: every backward, and forwards past a few dozen tokens), it
    runs in float32 (the same attention, a little slower; tests/test_model.py)."""
    if (q.dtype == torch.bfloat16 and q.device.type == "cpu"
            and torch.backends.cpu.get_cpu_capability() != "AVX512"):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), enable_gqa=enable_gqa,
                attn_mask=None if mask is None else mask.float())
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


class Attention(nn.Module):
    """Grouped-query attention with RoPE: n_heads query heads share n_kv_heads key/value
    heads, n_rep = n_heads // n_kv_heads each.

    One code path to read: the explicit one below, as Meta's reference writes it (repeat_kv,
    then `attention`). By default the same numbers come from torch's fused
    `scaled_dot_product_attention`, faster and without the (seq, total) weights in memory;
    `fused` is chosen per model, not per call (`Transformer.set_fast_attention(False)` runs
    the explicit path: to step through it, count its FLOPs, or compare bit for bit). Nothing
    here keeps the weights: widgets.attention_weights recomputes them with a forward hook."""

    def __init__(self, args: ModelArgs, fused: bool = True):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.n_rep = self.n_heads // self.n_kv_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.fused = fused  # the kernel, chosen for the whole model: set_fast_attention

    def forward(self, x, freqs_cis, mask=None, cache=None, start_pos: int = 0):
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        if cache is not None:  # keys and values of every position so far: (b, total, kv, hd)
            xk, xv = cache.update(start_pos, xk, xv)
        q = xq.transpose(1, 2)  # (bsz, n_heads, seqlen, head_dim)
        if self.fused:
            # The fused kernel shares each KV head among its query heads itself, without
            # the copy that repeat_kv makes (the same result; tests/test_model.py checks).
            out = fused_attention(q, xk.transpose(1, 2), xv.transpose(1, 2), mask, self.n_rep > 1)
        else:
            keys = repeat_kv(xk, self.n_rep).transpose(1, 2)  # (bsz, n_heads, total, head_dim)
            values = repeat_kv(xv, self.n_rep).transpose(1, 2)
            out, _ = attention(q, keys, values, mask)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)  # (bsz, seqlen, n_heads * head_dim)
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). The hidden size follows ModelArgs.hidden_dim."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs_cis, mask=None, cache=None, start_pos: int = 0):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.params = args  # frozen, validated when it was made
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not a buffer: model.to(torch.bfloat16) must not round the rotation angles.
        self.freqs_cis = freqs_cis_for(args)  # (max_seq_len, head_dim // 2), complex64
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # residual projections, GPT-2 style
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * args.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def set_fast_attention(self, enabled: bool = True) -> "Transformer":
        """Every layer's attention through `scaled_dot_product_attention` (True, the
        default) or the explicit path (False): the same numbers. Returns the model."""
        for layer in self.layers:
            layer.attention.fused = enabled
        return self

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache=None, mask=None,
                doc_ids: torch.Tensor | None = None):
        """tokens: (batch, seq) -> logits (batch, seq, vocab_size), float32.

        start_pos: position of tokens[:, 0]; cache: per-layer caches (cache[i].update);
        mask: an additive mask broadcastable to (batch, heads, seq, start_pos + seq), by
        default causal. doc_ids (batch, seq): the document of each token of a packed window
        (data.batch_at gives them); attention then stays inside each document
        (`document_mask`), as Llama 3 trained. For training windows: no cache, start_pos 0."""
        bsz, seqlen = tokens.shape
        if start_pos + seqlen > self.params.max_seq_len:
            raise ValueError(f"sequence of {start_pos + seqlen} positions (start_pos {start_pos} "
                             f"+ {seqlen} tokens) is longer than max_seq_len "
                             f"({self.params.max_seq_len})")
        if doc_ids is not None:
            if mask is not None or cache is not None or start_pos:
                raise ValueError("doc_ids makes the mask of a whole packed window: give no "
                                 "mask, no cache and start_pos 0 with it (generation needs none)")
            if doc_ids.shape != tokens.shape:
                raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must have the shape of "
                                 f"tokens {tuple(tokens.shape)}: one document id per token")
        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        if self.freqs_cis.device != h.device:
            self.freqs_cis = self.freqs_cis.to(h.device)
        freqs_cis = self.freqs_cis[start_pos: start_pos + seqlen]
        if doc_ids is not None:
            mask = document_mask(doc_ids.to(h.device)).to(h.dtype)
        elif mask is None and seqlen > 1:  # one query (a decode step) may see every key so far
            mask = causal_mask(seqlen, start_pos, device=h.device).to(h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs_cis, mask, None if cache is None else cache[i], start_pos)
        return self.output(self.norm(h)).float()


def model_device(model: nn.Module, device=None) -> torch.device:
    """The device a function given a model works on: the model's own (that of its first
    parameter). Such a function never moves the model; a `device` it still accepts must name
    that same device, or this raises."""
    own = next(model.parameters()).device
    if device is not None:
        asked = torch.device(device)
        if asked.type != own.type or asked.index not in (None, own.index):
            raise ValueError(f"the model is on {own}, not {asked}; move it first "
                             f"(model.to({str(asked)!r})) or leave device out")
    return own


@contextmanager
def in_mode(model: nn.Module, training: bool):
    """Run the with-block with `model` in train (True) or eval (False) mode, then give every
    submodule back the mode it had: a function that switches a model's mode restores it."""
    modes = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, was_training in modes:
            module.training = was_training


def evaluating(model: nn.Module):
    """`with evaluating(model): ...`: eval mode for the block, the caller's mode after it."""
    return in_mode(model, False)
