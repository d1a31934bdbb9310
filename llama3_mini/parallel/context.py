"""Context parallelism as Llama 3 does it ("The Llama 3 Herd of Models", section 3.3.2): the
sequence is split across the ranks of a CP group, each rank all-gathers the keys and values of
the whole sequence and computes attention for its own queries only.

Cut in 2 x CP chunks. Under the causal mask a query late in the sequence attends to many
keys and an early one to few, so giving rank i the i-th slice of CP equal slices would leave
rank 0 almost idle and the last rank with most of the work. The sequence is cut instead in
2 x CP chunks and rank i takes chunks i and 2 x CP - 1 - i: one cheap early chunk and one
expensive late one, the same work on every rank. With CP = 2 and 8 tokens:

    chunks  [0 1] [2 3] [4 5] [6 7]     rank 0 holds positions [0 1 6 7]
                                        rank 1 holds positions [2 3 4 5]

Each rank embeds only its tokens, and RoPE rotates each at its true position (a rank's
second chunk does not start where its first ended). Attention gathers the keys and values
of every rank (an all-gather whose backward is a reduce-scatter of their gradients) and masks
by true positions, so a query sees exactly the keys it sees in one process. The loss of a
rank's tokens is divided by the tokens of the whole sequence, and the gradients summed over
the CP group (`reduce_gradients`), so the sum is the gradient of the whole sequence's mean.

The gathered keys and values arrive through the model's own KV-cache hook (`cache.update`,
see kv_cache.py): for attention, the other ranks' chunks are simply "the keys and values of
every position", what a cache returns during generation. So the model runs unchanged and
whatever wraps its blocks (FSDP, tensor parallel) still applies.

    positions, logits = context_parallel_forward(model, tokens, cp_group)  # this rank's part
    loss = context_parallel_loss(model, tokens, targets, cp_group)   # this rank's share
    loss.backward(); reduce_gradients(model, cp_group)
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..model import Transformer


def chunk_positions(seq_len: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """The positions rank cp_rank holds: chunks cp_rank and 2 cp_size - 1 - cp_rank of the
    sequence cut into 2 cp_size equal chunks. chunk_positions(8, 0, 2) -> [0, 1, 6, 7]."""
    n_chunks = 2 * cp_size
    if seq_len % n_chunks:
        raise ValueError(f"sequence length {seq_len} must be a multiple of 2 x CP = {n_chunks}"
                         f" (each of the {cp_size} ranks takes two equal chunks): pad or cut "
                         "the batch to such a length")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} must be in [0, {cp_size})")
    size = seq_len // n_chunks
    first = torch.arange(cp_rank * size, (cp_rank + 1) * size)
    second = torch.arange((n_chunks - 1 - cp_rank) * size, (n_chunks - cp_rank) * size)
    return torch.cat([first, second])


def causal_work(seq_len: int, cp_size: int, balanced: bool = True) -> list[int]:
    """The (query, key) pairs each rank's attention computes under the causal mask: balanced
    (chunks i and 2 CP - 1 - i) or in plain consecutive slices. causal_work(8, 2) -> [18, 18]
    (balanced), causal_work(8, 2, balanced=False) -> [10, 26]."""
    if balanced:
        holds = [chunk_positions(seq_len, r, cp_size) for r in range(cp_size)]
    else:
        holds = list(torch.arange(seq_len).chunk(cp_size))
    return [int((pos + 1).sum()) for pos in holds]  # the query at position t sees t + 1 keys


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence (dim 1) in rank order; backward: each rank receives
    the sum over ranks of the gradient of its own slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        parts = [g.contiguous() for g in grad.chunk(dist.get_world_size(ctx.group), dim=1)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=ctx.group)
        return out, None


def gather_sequence(x: torch.Tensor, group=None) -> torch.Tensor:
    """(batch, local, ...) on each rank -> (batch, cp_size * local, ...): every rank's slice,
    in rank order, differentiable (the backward is a reduce-scatter)."""
    return _GatherSequence.apply(x, group)


class KVGather:
    """Stands where a KV cache stands (`cache.update(start_pos, xk, xv)`): takes this rank's
    keys and values (batch, local, n_kv_heads, head_dim), already rotated at their true
    positions, and returns those of the whole sequence (batch, seq, n_kv_heads, head_dim), in
    position order. One object serves every layer."""

    def __init__(self, seq_len: int, group=None):
        self.group = group
        cp_size = dist.get_world_size(group)
        held = torch.cat([chunk_positions(seq_len, r, cp_size) for r in range(cp_size)])
        self.order = torch.argsort(held)  # gathered (rank order) -> position order

    def update(self, start_pos, xk, xv):
        order = self.order.to(xk.device)
        keys = gather_sequence(xk, self.group)[:, order]  # (batch, seq, n_kv_heads, head_dim)
        values = gather_sequence(xv, self.group)[:, order]
        return keys, values

    def __getitem__(self, layer):  # the model asks cache[i] for layer i: the same for all
        return self


def context_mask(positions: torch.Tensor, seq_len: int, doc_ids=None) -> torch.Tensor:
    """Additive mask for this rank's queries (at `positions`) against every key: (local,
    seq), or (batch, 1, local, seq) with doc_ids (batch, seq) for Llama 3's document mask.
    A query at position t sees the keys at positions 0..t (of its own document)."""
    # Built for these rows only (never the whole (seq, seq) mask: that would undo what CP
    # saves); its entries are document_mask's (model.py) at these rows.
    allowed = torch.arange(seq_len)[None, :] <= positions[:, None]  # (local, seq)
    if doc_ids is not None:
        same_doc = doc_ids[:, positions, None] == doc_ids[:, None, :]  # (batch, local, seq)
        allowed = (allowed & same_doc)[:, None]  # (batch, 1, local, seq)
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


@contextmanager
def _angles_at(model: Transformer, positions: torch.Tensor):
    """Make the model's RoPE table start with the angles of `positions`: the model takes
    rows 0..local-1 for a window starting at 0, and they are then each token's true ones."""
    table = model.freqs_cis
    model.freqs_cis = table[positions.to(table.device)]
    try:
        yield
    finally:
        model.freqs_cis = table


def context_parallel_forward(model: Transformer, tokens: torch.Tensor, group=None,
                             doc_ids: torch.Tensor | None = None):
    """This rank's part of the forward pass of `tokens` (batch, seq), the whole batch as every
    rank of the CP group has it. Returns (positions, logits): the positions this rank holds
    (`chunk_positions`) and their float32 logits (batch, local, vocab_size), equal to
    model(tokens)[:, positions]. doc_ids (batch, seq): Llama 3's document mask, as
    `Transformer.forward` takes it."""
    seq_len = tokens.shape[1]
    positions = chunk_positions(seq_len, dist.get_rank(group), dist.get_world_size(group))
    local = tokens[:, positions.to(tokens.device)]  # (batch, local)
    device = next(model.parameters()).device
    mask = context_mask(positions, seq_len, None if doc_ids is None else doc_ids.cpu())
    with _angles_at(model, positions):
        logits = model(local, cache=KVGather(seq_len, group), mask=mask.to(device))
    return positions, logits


def context_parallel_loss(model: Transformer, tokens: torch.Tensor, targets: torch.Tensor,
                          group=None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of the mean next-token loss of the whole batch: the sum over its
    tokens divided by all the batch's tokens. Summed over the CP group (as the gradients
    are, by `reduce_gradients`) it is the loss one process computes."""
    positions, logits = context_parallel_forward(model, tokens, group, doc_ids)
    local_targets = targets[:, positions.to(targets.device)]
    total = F.cross_entropy(logits.flatten(0, 1), local_targets.flatten(), reduction="sum")
    return total / targets.numel()


def reduce_gradients(model: torch.nn.Module, group=None) -> None:
    """Sum every parameter's gradient over the CP group: each rank's holds the part that
    came from its own tokens. (Under FSDP this sum joins the data-parallel reduction: shard
    over the DP x CP ranks, as torchtitan does, instead of calling this.)"""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
