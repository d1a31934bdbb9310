"""Context parallelism (llama3_mini/parallel/context.py), Llama 3's all-gather design, against
one process: gloo ranks on the CPU each hold two chunks of the sequence; the reference is the
whole model on the whole sequence in one process (causal, and with the document mask).

Tolerances, float32: a rank's queries see the keys of the whole sequence, in position order,
through the same operations as one process's, and its logits came out equal bit for bit
(allowed 1e-5 in case another CPU's matmul blocks rows differently). Gradients are sums
over ranks of partial sums (the reduce-scatter of the keys' and values' gradients, the
all-reduce of the parameters'): the same sum in another order (measured 4e-8; allowed 1e-6
absolute on values of order 1e-1). Twenty AdamW steps keep the losses within 1e-5 (measured
1e-6)."""
import pytest
import torch
import torch.distributed as dist

from llama3_mini.config import ModelArgs
from llama3_mini.model import Transformer
from llama3_mini.parallel.context import (
    causal_work,
    chunk_positions,
    context_parallel_forward,
    context_parallel_loss,
    gather_sequence,
    reduce_gradients,
)
from llama3_mini.parallel.spawn import run_ranks

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16,
                 max_seq_len=64)
SEQ = 16


def _model():
    torch.manual_seed(0)
    return Transformer(ARGS)


def _batch(steps=1):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, ARGS.vocab_size, (steps, 2, SEQ + 1), generator=g)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 11 + [1] * 5])
    return tokens[..., :-1], tokens[..., 1:], doc_ids


def _context(steps, documents):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    inputs, targets, doc_ids = _batch(steps)
    doc_ids = doc_ids if documents else None
    losses = []
    with torch.no_grad():
        positions, logits = context_parallel_forward(model, inputs[0], doc_ids=doc_ids)
    for step in range(steps):
        opt.zero_grad()
        loss = context_parallel_loss(model, inputs[step], targets[step], doc_ids=doc_ids)
        loss.backward()
        reduce_gradients(model)
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        dist.all_reduce(loss.detach_())  # the whole batch's loss: the ranks' shares summed
        losses.append(loss.item())
    return {"positions": positions, "logits": logits, "losses": losses, "grads": grads}


def _reference(steps, documents):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    inputs, targets, doc_ids = _batch(steps)
    doc_ids = doc_ids if documents else None
    losses = []
    with torch.no_grad():
        logits = model(inputs[0], doc_ids=doc_ids)
    for step in range(steps):
        opt.zero_grad()
        out = model(inputs[step], doc_ids=doc_ids)
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), targets[step].flatten())
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return logits, losses, grads


def _check(results, steps, documents):
    logits, losses, grads = _reference(steps, documents)
    covered = torch.cat([r["positions"] for r in results]).sort().values
    assert torch.equal(covered, torch.arange(SEQ)), "the ranks hold every position once"
    for r in results:
        torch.testing.assert_close(r["logits"], logits[:, r["positions"]], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(losses),
                                   atol=1e-5, rtol=0)
        for name, grad in r["grads"].items():
            torch.testing.assert_close(grad, grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_chunk_positions_balance_the_causal_work():
    assert chunk_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert chunk_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert chunk_positions(16, 1, 4).tolist() == [2, 3, 12, 13]
    assert causal_work(8, 2) == [18, 18] and causal_work(8, 2, balanced=False) == [10, 26]
    assert len(set(causal_work(64, 4))) == 1
    with pytest.raises(ValueError, match="multiple of 2 x CP = 8"):
        chunk_positions(12, 0, 4)


def test_two_ranks_equal_one_process():
    """2 ranks, causal mask: logits, loss and every gradient equal one process's."""
    _check(run_ranks(_context, 2, 1, False), 1, False)


def test_gather_sequence_backward_is_a_reduce_scatter():
    """torch's own differentiable all-gather (torch.distributed.nn.functional) is the
    reference for ours: the same values and the same input gradients."""
    def fn():
        from torch.distributed.nn.functional import all_gather
        torch.manual_seed(dist.get_rank())
        x = torch.randn(2, 3, 4, requires_grad=True)
        torch.manual_seed(9)
        weight = torch.randn(2, 6, 4)  # the same on every rank
        ours = gather_sequence(x)
        (ours * weight).sum().backward()
        mine = x.grad.clone()
        x.grad = None
        theirs = torch.cat(all_gather(x), dim=1)
        (theirs * weight).sum().backward()
        return ours.detach(), theirs.detach(), mine, x.grad
    for ours, theirs, g_ours, g_theirs in run_ranks(fn, 2):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
        torch.testing.assert_close(g_ours, g_theirs, atol=0, rtol=0)


@pytest.mark.slow
def test_two_ranks_document_mask_twenty_steps():
    """2 ranks under Llama 3's document mask: the first step, then 20 AdamW steps."""
    _check(run_ranks(_context, 2, 20, True), 20, True)


@pytest.mark.slow
def test_four_ranks_equal_one_process():
    """4 ranks (8 chunks of 2 tokens), causal: logits, loss and every gradient."""
    _check(run_ranks(_context, 4, 1, False), 1, False)
