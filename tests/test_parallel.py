"""Tensor parallelism, FSDP and their composition on the 4D mesh, each against one process.

The reference is the unsharded model with the same weights and the same batch, run here in
one process (the model itself equals transformers' Llama: tests/test_parity.py). Each layout
runs on gloo ranks forked on the CPU (`run_ranks`): the first step's logits, loss and every
parameter's gradient (gathered to full tensors), then 20 AdamW steps with clipping, whose
losses must be those of one process. The tensor-parallel shards must also be the very slices
fairscale's layers cut, the layers Meta's reference is built from (tests/test_meta_shards.py).

Why not bit for bit: a split changes the order of float32 additions. Row-wise layers (wo, w2)
and the embedding add partial products across ranks (an all-reduce), FSDP averages gradients
across ranks (a reduce-scatter), so results differ from one process by a few units in the
last place (float32's epsilon is 1.2e-7). After 20 AdamW steps those differences grow, since
Adam divides each gradient by its own running magnitude; still far below what any bug makes.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_meta_shards import PARAMS, fairscale_shards, full_model
from torch.distributed.tensor import DTensor

from llama3_mini.config import ModelArgs
from llama3_mini.model import Transformer
from llama3_mini.parallel.context import context_parallel_forward
from llama3_mini.parallel.mesh import (
    Layout,
    build_mesh,
    clip_grad_norm_,
    mesh_coordinates,
    parallelize,
)
from llama3_mini.parallel.spawn import run_ranks
from llama3_mini.parallel.tensor import check_tensor_parallel
from llama3_mini.train import TrainConfig, make_optimizer

# 16 query heads, 8 KV heads, vocabulary 256, hidden 192: every degree here divides them.
ARGS = ModelArgs(**PARAMS, max_seq_len=64)
STEPS, BATCH, SEQ = 20, 8, 16
CFG = TrainConfig(lr=3e-3, weight_decay=0.1)
LOGITS_TOL = dict(rtol=1e-5, atol=1e-5)  # float32, other addition orders
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)  # the 20 steps' losses


def batch(step: int):
    """Step `step`'s batch: inputs and targets (BATCH, SEQ), the same in every process. Two
    batches in turn, so that the model learns them and the losses fall (a wrong update
    shows)."""
    g = torch.Generator().manual_seed(1000 + step % 2)
    tokens = torch.randint(0, ARGS.vocab_size, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def plain_loss(model, x, y):
    """(loss to differentiate, loss to report, logits): the whole model on these rows."""
    logits = model(x)
    loss = lm_loss(logits, y)
    return loss, loss, logits


def train(model, share=lambda x: x, clip=torch.nn.utils.clip_grad_norm_, loss_fn=plain_loss,
          world_mean=1, steps=STEPS):
    """STEPS steps of AdamW (the trainer's groups) with clipping at 1.0: the first step's
    logits, loss and gradients, and every step's loss. share(x): this rank's rows. A rank's
    reported loss is summed over every rank and divided by world_mean (the ranks that hold
    the same number)."""
    opt = make_optimizer(model, CFG)
    out = {"losses": []}
    for step in range(steps):
        x, y = (share(t) for t in batch(step))
        loss, reported, logits = loss_fn(model, x, y)
        loss.backward()
        if step == 0:
            logits = tuple(t.detach().clone() for t in logits) if isinstance(logits, tuple) \
                else logits.detach().clone()
            out.update(logits=logits, loss=reported.detach().clone(),
                       grads={n: full(p.grad) for n, p in model.named_parameters()})
        clip(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = reported.detach().clone()
        if world_mean > 1:
            dist.all_reduce(value)
            value /= world_mean
        out["losses"].append(value.item())
    return out


@pytest.fixture(scope="module")
def model_state():
    return {k: v.clone() for k, v in full_model(tied=False).state_dict().items()}


@pytest.fixture(scope="module")
def one_process(model_state):
    model = Transformer(ARGS)
    model.load_state_dict(model_state)
    return train(model)


def run_layout(layout: Layout, state: dict, steps: int = STEPS) -> dict:
    """On each rank: the model split by `layout`, its shards, then `train`. With context
    parallelism a rank computes its own positions' logits and its share of the loss
    (context.py); FSDP then averages gradients over the DP x CP ranks, so the share is
    multiplied by CP (the CP shares add up to the loss)."""
    mesh = build_mesh(layout)
    model = Transformer(ARGS)
    model.load_state_dict(state)
    parallelize(model, mesh)
    coords = mesh_coordinates(mesh)
    shards = {n: p.to_local().clone() for n, p in model.named_parameters()
              if isinstance(p, DTensor)}
    rows, loss_fn = BATCH // layout.dp, plain_loss
    if layout.cp > 1:
        group = mesh["cp"].get_group()

        def loss_fn(model, x, y):
            positions, logits = context_parallel_forward(model, x, group)
            share = F.cross_entropy(logits.flatten(0, 1), y[:, positions].flatten(),
                                    reduction="sum") / y.numel()
            return share * layout.cp, share, (positions, logits)
    out = train(model, share=lambda t: t[coords["dp"] * rows:(coords["dp"] + 1) * rows],
                clip=clip_grad_norm_, loss_fn=loss_fn, world_mean=layout.tp * layout.dp,
                steps=steps)
    if layout.cp > 1:  # the logits of this rank's positions, and its loss share
        positions, logits = out["logits"]
        out["logits"] = torch.full((rows, SEQ, ARGS.vocab_size), float("nan"))
        out["logits"][:, positions] = logits
    return {**out, "coords": coords, "shards": shards}


def check_equal(results: list, ref: dict, layout: Layout) -> None:
    """Every rank's first step against one process, and the 20 losses."""
    rows = BATCH // layout.dp
    logits = torch.full_like(ref["logits"], float("nan"))
    losses = torch.zeros(layout.dp)
    for r in results:  # TP ranks hold the same logits; CP ranks their own positions'
        dp = r["coords"]["dp"]
        mine = logits[dp * rows:(dp + 1) * rows]
        held = ~r["logits"].isnan()
        mine[held] = r["logits"][held]
        losses[dp] += r["loss"] / layout.tp
    torch.testing.assert_close(logits, ref["logits"], **LOGITS_TOL)  # no NaN left: all held
    torch.testing.assert_close(losses.mean(), ref["loss"], **LOSS_TOL)
    for r in results:
        assert r["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            torch.testing.assert_close(r["grads"][name], g, **GRAD_TOL, msg=name)
        n = len(r["losses"])  # the 20 steps, or the first ones
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"][:n]),
                                   **LOSS_TOL)


@pytest.mark.slow  # forks 2 and 4 gloo ranks
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_one_process(tp, model_state, one_process, tmp_path):
    layout = Layout(tp=tp)  # 20 steps on 2 ranks (and 8, below); 2 steps on 4 (CI's time)
    results = run_ranks(run_layout, tp, layout, model_state, STEPS if tp == 2 else 2)
    check_equal(results, one_process, layout)
    if tp == 2:  # each rank holds the slice fairscale's parallel layers cut, as Meta splits
        folder = fairscale_shards(full_model(tied=False), tp, tmp_path / "meta")
        for rank, r in enumerate(results):
            meta = torch.load(folder / f"consolidated.{rank:02d}.pth", weights_only=True)
            split = {n for n in meta if not n.endswith("norm.weight")}
            assert r["shards"].keys() == split  # the norms stay whole
            for name, shard in r["shards"].items():
                assert torch.equal(shard, meta[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("dp_shard", [2, 4])
def test_fsdp_equals_one_process(dp_shard, model_state, one_process):
    layout = Layout(dp_shard=dp_shard)
    results = run_ranks(run_layout, dp_shard, layout, model_state, STEPS if dp_shard == 2 else 2)
    check_equal(results, one_process, layout)
    n = sum(p.numel() for p in model_state.values())
    held = sum(s.numel() for s in results[0]["shards"].values())
    assert held == n // dp_shard  # each rank keeps 1/N of every parameter


@pytest.mark.slow  # forks 8 gloo ranks
def test_tp_cp_fsdp_on_8_ranks_equals_one_process(model_state, one_process):
    """The 4D mesh with three dimensions of 2: TP x CP x DP (FSDP over DP x CP). Each rank's
    place in the mesh torch built is the paper's numbering (TP fastest)."""
    layout = Layout(tp=2, cp=2, dp_shard=2)
    results = run_ranks(run_layout, 8, layout, model_state)
    assert [r["coords"] for r in results] == [layout.coordinates(i) for i in range(8)]
    check_equal(results, one_process, layout)


def test_coordinates_follow_the_paper():
    """Section 3.3.2's example: 16 GPUs, every degree 2, ranks in the order [TP, CP, PP, DP]."""
    layout = Layout(tp=2, cp=2, pp=2, dp_shard=2)
    assert layout.describe(0) == "GPU0[TP0, CP0, PP0, DP0]"
    assert layout.describe(1) == "GPU1[TP1, CP0, PP0, DP0]"

    def group(rank, dim):  # the ranks that differ from `rank` along `dim` alone
        c = layout.coordinates(rank)
        return {r for r in range(16) if all(v == c[k] for k, v in
                                            layout.coordinates(r).items() if k != dim)}
    assert group(0, "tp") == {0, 1}
    assert group(0, "cp") == {0, 2}
    assert group(0, "pp") == {0, 4}
    assert group(0, "dp") == {0, 8}


@pytest.mark.parametrize("layout, message", [
    (Layout(tp=3), "n_heads (16) is not a multiple of 3"),
    (Layout(tp=16), "n_kv_heads (8) is not a multiple of 16"),
    (Layout(pp=4, dp_shard=1), "n_layers (2) is not a multiple of 4"),
    (Layout(tp=2, dp_shard=2), "= 4 ranks, but 2 processes"),
])
def test_layouts_that_do_not_divide_are_named(layout, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        layout.check(layout.world_size if "processes" not in message else 2, ARGS)


def test_vocabulary_must_divide():
    with pytest.raises(ValueError, match=r"vocab_size \(255\) is not a multiple of 2"):
        check_tensor_parallel(ARGS.replace(vocab_size=255), 2)
