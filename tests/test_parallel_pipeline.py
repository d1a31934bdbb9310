"""Pipeline parallelism (llama3_mini/parallel/pipeline.py) against one process: gloo ranks on
the CPU run torch's own schedules (GPipe, 1F1B, interleaved 1F1B) over stages of the course's
Transformer; the reference is the whole model, same weights, same batch, in one process.

Tolerances: float32 throughout. Each micro-batch's logits come from the same operations as
one process's rows (measured equal bit for bit; allowed 1e-5 in case another CPU's matmul
blocks rows differently). The pipeline sums the gradient micro-batch by micro-batch and
divides by m at the end, where one process takes the mean over the whole batch at once: the
same sum in another order, so gradients agree to float32 rounding (measured 3e-8 on values
up to 0.12; allowed 1e-6). Twenty AdamW steps at learning rate 3e-3 keep the losses within
1e-5 (measured 5e-7). At 1e-2 the 8-layer model's trajectory amplifies rounding: one process
summing the same 4 micro-batches instead of the whole batch drifts 3e-3 from the whole
batch by step 20, exactly as the pipeline does, so that drift is the order of the sum, not
the pipeline."""
import pytest
import torch
import torch.distributed as dist

from llama3_mini.config import ModelArgs
from llama3_mini.model import Transformer
from llama3_mini.parallel.pipeline import (
    bubble_fraction,
    lm_loss,
    pipeline_schedule,
    pipeline_stages,
    pipeline_step,
    split_layers,
)
from llama3_mini.parallel.spawn import run_ranks

ARGS = dict(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16,
            max_seq_len=32)


def _model(n_layers):
    torch.manual_seed(0)
    return Transformer(ModelArgs(**{**ARGS, "n_layers": n_layers}))


def _batch(steps=1):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, ARGS["vocab_size"], (steps, 4, 13), generator=g)
    return tokens[..., :-1], tokens[..., 1:]  # inputs, next-token targets: (steps, 4, 12)


def _pipeline(kind, n_micro, stages_per_rank, n_layers, steps):
    """Runs on every rank: `steps` AdamW steps through the pipeline. Returns the last
    stage's logits and losses, and the gradients of the first step by parameter name."""
    model = _model(n_layers)
    stages = pipeline_stages(model, stages_per_rank=stages_per_rank)
    schedule = pipeline_schedule(stages, n_micro, loss_fn=lm_loss, kind=kind)
    params = [p for s in stages for p in s.submod.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    inputs, targets = _batch(steps)
    losses, grads, logits = [], {}, None
    for step in range(steps):
        opt.zero_grad()
        loss, out = pipeline_step(schedule, stages, inputs[step], targets[step])
        if step == 0:
            grads = {n: p.grad.clone() for s in stages for n, p in s.submod.named_parameters()}
            logits = None if out is None else out.detach()
        opt.step()
        if loss is not None:
            losses.append(loss.item())
    return {"rank": dist.get_rank(), "losses": losses, "grads": grads, "logits": logits}


def _reference(n_layers, steps):
    model = _model(n_layers)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    inputs, targets = _batch(steps)
    losses, grads, logits = [], {}, None
    for step in range(steps):
        opt.zero_grad()
        out = model(inputs[step])
        loss = lm_loss(out, targets[step])
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            logits = out.detach()
        opt.step()
        losses.append(loss.item())
    return losses, grads, logits


def _check(results, n_layers, steps):
    ref_losses, ref_grads, ref_logits = _reference(n_layers, steps)
    seen = {}
    for r in results:
        seen.update(r["grads"])
    assert set(seen) == set(ref_grads), "every parameter lives on exactly one stage"
    for name, grad in seen.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    losses = [r["losses"] for r in results if r["losses"]]
    assert len(losses) == 1, "one rank holds the last stage"
    logits = [r["logits"] for r in results if r["logits"] is not None][0]
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(ref_losses),
                               atol=1e-5, rtol=0)


def test_split_layers_and_bubble():
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(8, 4) == [range(2 * i, 2 * i + 2) for i in range(4)]
    with pytest.raises(ValueError, match="at most 3 stages"):
        split_layers(3, 4)
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(4, 8, stages_per_rank=2) == pytest.approx(3 / 19)


def test_two_stages_gpipe_equal_one_process():
    """2 ranks, GPipe, 2 micro-batches: logits, loss and every gradient equal one process's."""
    _check(run_ranks(_pipeline, 2, "gpipe", 2, 1, 4, 1), 4, 1)


@pytest.mark.slow
def test_two_stages_1f1b_twenty_steps():
    """2 ranks, 1F1B, 4 micro-batches: the first step's logits and gradients, then 20 AdamW
    steps' losses, equal one process's."""
    _check(run_ranks(_pipeline, 2, "1f1b", 4, 1, 4, 20), 4, 20)


@pytest.mark.slow
def test_four_ranks_interleaved_equal_one_process():
    """4 ranks, 2 stages each (8 stages of one layer), interleaved 1F1B, 4 micro-batches:
    logits, loss and every gradient equal one process's."""
    _check(run_ranks(_pipeline, 4, "interleaved", 4, 2, 8, 1), 8, 1)


def test_tied_embeddings_refused():
    def fn():
        torch.manual_seed(0)
        model = Transformer(ModelArgs(**ARGS, tie_word_embeddings=True))
        try:
            pipeline_stages(model)
        except ValueError as e:
            return str(e)
    assert "tie_word_embeddings" in run_ranks(fn, 2)[0]
