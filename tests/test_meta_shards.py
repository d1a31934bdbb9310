"""Meta's model-parallel checkpoints, made by fairscale's own parallel layers: not by our splitter.

Meta's Llama 3 reference (meta-llama/llama3, llama/model.py) builds every weight from fairscale's
layers on a model-parallel group and each rank saves its slices as consolidated.<rank>.pth:
ColumnParallelLinear for wq, wk, wv (lines 100-120), w1, w3 (208, 214) and output (267),
RowParallelLinear for wo (121) and w2 (211), VocabParallelEmbedding for tok_embeddings (258),
plain RMSNorm weights (236-237, 266) on every rank. Here each rank of a CPU (gloo) process group
of 2 or 8 builds those fairscale layers, lets fairscale cut its slice out of the full weight
(fairscale builds the master weight with `init_method` and keeps its own rank's part), and
saves its state dict as Meta's folders do. `hub.load_meta` must merge them into the model whose
weights were split, logit for logit.
"""
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from llama3_mini import hub
from llama3_mini.config import ModelArgs
from llama3_mini.model import Transformer

# A model every world size here can split the way Meta's code requires: 16 query heads and
# 8 KV heads (one KV head a rank at 8 ranks, like Llama 3 70B), a vocabulary and a SwiGLU
# hidden size (192) that 8 divides.
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 16, "n_kv_heads": 8, "vocab_size": 256,
          "multiple_of": 32, "ffn_dim_multiplier": None, "norm_eps": 1e-5,
          "rope_theta": 500000.0, "use_scaled_rope": True}  # Meta's params.json fields


def full_model(tied: bool) -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs(**PARAMS, max_seq_len=64, tie_word_embeddings=tied)
    model = Transformer(args).eval()
    with torch.no_grad():  # norms away from 1, so a norm taken from the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _copy_of(full: dict, name: str):
    """fairscale's init_method: fill the master weight it hands us with the full tensor."""
    def init(master: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return master.copy_(full[name])
    return init


def _meta_rank_state_dict(full: dict) -> dict:
    """One rank's state dict, with the layers and names of Meta's llama/model.py."""
    from fairscale.nn.model_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    def column(name, n_in, n_out):  # as model.py builds wq, wk, wv, w1, w3, output
        return ColumnParallelLinear(n_in, n_out, bias=False, gather_output=False,
                                    init_method=_copy_of(full, name + ".weight"))

    def row(name, n_in, n_out):  # as model.py builds wo and w2
        return RowParallelLinear(n_in, n_out, bias=False, input_is_parallel=True,
                                 init_method=_copy_of(full, name + ".weight"))

    def norm(name):  # RMSNorm's weight: a plain parameter, whole on every rank
        module = nn.Module()
        module.weight = nn.Parameter(full[name + ".weight"].clone())
        return module

    dim, vocab = PARAMS["dim"], PARAMS["vocab_size"]
    kv_dim = PARAMS["n_kv_heads"] * dim // PARAMS["n_heads"]
    hidden = full["layers.0.feed_forward.w1.weight"].shape[0]
    meta = nn.Module()
    meta.tok_embeddings = VocabParallelEmbedding(  # as model.py builds tok_embeddings
        vocab, dim, init_method=_copy_of(full, "tok_embeddings.weight"))
    meta.layers = nn.ModuleList()
    for i in range(PARAMS["n_layers"]):
        p = f"layers.{i}."
        block, attention, ffn = nn.Module(), nn.Module(), nn.Module()
        attention.wq = column(p + "attention.wq", dim, dim)
        attention.wk = column(p + "attention.wk", dim, kv_dim)
        attention.wv = column(p + "attention.wv", dim, kv_dim)
        attention.wo = row(p + "attention.wo", dim, dim)
        ffn.w1 = column(p + "feed_forward.w1", dim, hidden)
        ffn.w2 = row(p + "feed_forward.w2", hidden, dim)
        ffn.w3 = column(p + "feed_forward.w3", dim, hidden)
        block.attention, block.feed_forward = attention, ffn
        block.attention_norm, block.ffn_norm = norm(p + "attention_norm"), norm(p + "ffn_norm")
        meta.layers.append(block)
    meta.norm = norm("norm")
    meta.output = column("output", dim, vocab)
    return {k: v.detach().clone() for k, v in meta.state_dict().items()}


def _rank_main(rank: int, world_size: int, folder: str):
    """What each GPU of Meta's model-parallel group does, here on CPU over gloo."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel.initialize import (
        destroy_model_parallel,
        get_model_parallel_rank,
        initialize_model_parallel,
    )

    torch.set_num_threads(1)
    folder = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}",
                            rank=rank, world_size=world_size)
    try:
        initialize_model_parallel(world_size)
        assert get_model_parallel_rank() == rank
        full = torch.load(folder / "full.pt", weights_only=True)
        state = _meta_rank_state_dict(full)
        torch.save(state, folder / f"consolidated.{rank:02d}.pth")
        dist.barrier()
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()


def fairscale_shards(model: Transformer, world_size: int, folder: Path) -> Path:
    """A Meta folder whose shards were cut by fairscale's layers on `world_size` ranks."""
    pytest.importorskip("fairscale", reason="fairscale is in the test extra")
    folder.mkdir(parents=True)
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, folder / "full.pt")
    mp.start_processes(_rank_main, args=(world_size, str(folder)), nprocs=world_size,
                       join=True, start_method="fork")  # fork: no re-import of torch per rank
    (folder / "full.pt").unlink()
    (folder / "params.json").write_text(json.dumps(PARAMS))  # written by hand, Meta's keys
    return folder


def fairscale_shards_in_one_process(model: Transformer, world_size: int, monkeypatch) -> list:
    """The same shards with no process group, fast: each rank's layers are built in turn with
    fairscale's own rank and world-size functions answering that rank. fairscale cuts a slice
    by those two numbers alone (layers._initialize_affine_weight, VocabUtility), with no
    collective, so these equal the gloo ranks' shards (the slow test below checks it)."""
    layers = pytest.importorskip("fairscale.nn.model_parallel.layers",
                                 reason="fairscale is in the test extra")
    full = {k: v.detach() for k, v in model.state_dict().items()}
    monkeypatch.setattr(layers, "get_model_parallel_world_size", lambda: world_size)
    shards = []
    for rank in range(world_size):
        monkeypatch.setattr(layers, "get_model_parallel_rank", lambda rank=rank: rank)
        shards.append(_meta_rank_state_dict(full))
    return shards


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked ranks must not inherit a busy OpenMP pool
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # spawns 2 and 8 processes
@pytest.mark.parametrize("world_size", [2, 8])
def test_fairscale_shards_merge_into_the_unsplit_model(tmp_path, world_size):
    model = full_model(tied=False)
    folder = fairscale_shards(model, world_size, tmp_path / f"mp{world_size}")
    shard0 = torch.load(folder / "consolidated.00.pth", weights_only=True)
    vocab, dim = PARAMS["vocab_size"], PARAMS["dim"]
    # fairscale's VocabParallelEmbedding keeps a slice of the vocabulary, all of dim
    assert shard0["tok_embeddings.weight"].shape == (vocab // world_size, dim)
    # at 8 ranks each holds exactly one KV head (head_dim 4 rows of wk), like Llama 3 70B
    assert shard0["layers.0.attention.wk.weight"].shape == (8 * 4 // world_size, dim)

    loaded = hub.load_meta(folder, device="cpu", max_seq_len=64)
    assert loaded.tok_embeddings.weight.shape == (vocab, dim)
    for name, w in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], w), name
    tokens = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=0, rtol=0)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_our_splitter_and_merger_agree_with_fairscale_s_layers(tmp_path, monkeypatch,
                                                               world_size):
    """Fast (one process): our splitter cuts what fairscale's layers cut, and our merger
    rebuilds the model from fairscale's shards."""
    model = full_model(tied=False)
    theirs = fairscale_shards_in_one_process(model, world_size, monkeypatch)
    ours = hub.save_meta(model, tmp_path / "ours", n_shards=world_size)
    for rank, shard in enumerate(theirs):
        mine = torch.load(ours / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert mine.keys() == shard.keys()
        for name in shard:
            assert torch.equal(mine[name], shard[name]), (rank, name)
    merged = hub.merge_meta_shards(theirs)
    for name, w in model.state_dict().items():
        assert torch.equal(merged[name], w), name


@pytest.mark.slow
def test_our_splitter_cuts_what_fairscale_cuts(tmp_path, monkeypatch):
    model = full_model(tied=False)
    folder = fairscale_shards(model, 8, tmp_path / "fairscale")
    ours = hub.save_meta(model, tmp_path / "ours", n_shards=8)
    in_one_process = fairscale_shards_in_one_process(model, 8, monkeypatch)
    for rank in range(8):
        theirs = torch.load(folder / f"consolidated.{rank:02d}.pth", weights_only=True)
        mine = torch.load(ours / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert mine.keys() == theirs.keys() == in_one_process[rank].keys()
        for name in theirs:
            assert torch.equal(mine[name], theirs[name]), (rank, name)
            assert torch.equal(in_one_process[rank][name], theirs[name]), (rank, name)
    # params.json in Meta's fields only (no max_seq_len, which Meta's loader passes itself)
    saved = json.loads((ours / "params.json").read_text())
    assert saved == {k: v for k, v in PARAMS.items() if v is not None}


@pytest.mark.slow
def test_tied_output_as_llama_3_2_saves_it(tmp_path):
    """Meta's 3.2 files hold output.weight (model.py always builds `output`), equal to the
    embedding: the loader ties the two, so the model holds one copy."""
    model = full_model(tied=True)
    folder = fairscale_shards(model, 2, tmp_path / "mp2")
    loaded = hub.load_meta(folder, device="cpu", max_seq_len=64)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    tokens = torch.randint(0, PARAMS["vocab_size"], (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=0, rtol=0)


def test_fewer_kv_heads_than_shards_is_refused_with_the_reason(tmp_path):
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64,
                                  multiple_of=16, max_seq_len=16))
    with pytest.raises(ValueError, match=r"n_kv_heads \(2\) is not a multiple of 4 shards"):
        hub.save_meta(model, tmp_path / "four", n_shards=4)
    folder = hub.save_meta(model, tmp_path / "two", n_shards=2)
    (folder / "consolidated.02.pth").write_bytes((folder / "consolidated.00.pth").read_bytes())
    (folder / "consolidated.03.pth").write_bytes((folder / "consolidated.01.pth").read_bytes())
    with pytest.raises(ValueError, match="4 shards but n_kv_heads is 2"):
        hub.load_meta(folder, device="cpu")
