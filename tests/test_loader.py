"""`llama3_mini.load`, the one loader: every source gives the same model and tokenizer, and the
command line, the server, the exports and the notebooks' `load_pretrained` all go through it.
The formats themselves are checked against transformers and fairscale elsewhere
(test_checkpoint_io, test_export, test_meta_shards); here, that one call reads them all."""
import pytest
import torch
import uvicorn

import llama3_mini
from llama3_mini import cli, gguf_export, hub, loader, serve
from llama3_mini.checkpoint import load_pretrained, save_checkpoint, save_model
from llama3_mini.pretrained import ASSETS, CHAT_MODEL, DEFAULT_MODEL, pretrained_models


@pytest.fixture(scope="module")
def story():
    return llama3_mini.load(DEFAULT_MODEL, device="cpu")


def _same(a, b, tokens):
    with torch.no_grad():
        torch.testing.assert_close(a(tokens), b(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # writes and reads five folders
def test_every_source_gives_the_same_model_and_tokenizer(story, tmp_path):
    model, tok = story
    tok.save(tmp_path / "tokenizer.model")
    sources = {
        "name": DEFAULT_MODEL,
        "folder": save_model(model, tmp_path / "ours", tokenizer="tokenizer.model"),
        "run": save_checkpoint(model, tmp_path / "run", 7, {"step": 7},
                               tokenizer="tokenizer.model").parent,
        "meta": hub.save_meta(model, tmp_path / "meta", n_shards=2,
                              tokenizer_model=tmp_path / "tokenizer.model"),
        "hf": hub.save_hf(model, tmp_path / "hf", tok),
    }
    (tmp_path / "run" / "tokenizer.model").write_bytes((tmp_path / "tokenizer.model").read_bytes())
    (tmp_path / "ours" / "tokenizer.model").write_bytes((tmp_path / "tokenizer.model").read_bytes())
    tokens = torch.randint(0, tok.n_ranks, (2, 12))
    formats = {}
    for kind, source in sources.items():
        formats[kind], _ = loader.locate(source)
        loaded, loaded_tok = llama3_mini.load(source, device="cpu")
        assert not loaded.training, kind
        assert loaded_tok.mergeable_ranks == tok.mergeable_ranks, kind
        assert loaded_tok.special_tokens == tok.special_tokens, kind
        _same(loaded, model, tokens)
    assert formats == {"name": "llama3-mini", "folder": "llama3-mini", "run": "llama3-mini",
                       "meta": "meta", "hf": "hf"}


def test_an_unknown_source_is_named_with_the_models_there_are(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no pretrained model 'nope'.*story-model"):
        llama3_mini.load("nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint folder .*nowhere"):
        llama3_mini.load(tmp_path / "nowhere")


def test_the_registry_is_the_assets_folder():
    assert DEFAULT_MODEL in pretrained_models() and CHAT_MODEL in pretrained_models()
    assert all((ASSETS / name / "model.safetensors").is_file() for name in pretrained_models())


def test_entry_points_call_the_one_loader(monkeypatch, story, tmp_path):
    calls = []

    def spy(source=None, device=None, dtype=None, max_seq_len=None):
        calls.append(str(source))
        return story

    monkeypatch.setattr(loader, "load", spy)
    load_pretrained("qa-full", device="cpu")
    assert cli.main(["generate", "--model", "byte-model", "--max-new-tokens", "1",
                     "--prompt", "a", "--device", "cpu"]) == 0
    hub.Llama.from_pretrained(DEFAULT_MODEL, device="cpu")
    hub.export_hf(DEFAULT_MODEL, tmp_path / "hf")
    gguf_export.export_gguf("byte-model", tmp_path / "byte.gguf")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)  # serve, without serving
    serve.serve(device="cpu")
    assert calls == ["qa-full", "byte-model", str(ASSETS / DEFAULT_MODEL), DEFAULT_MODEL,
                     "byte-model", CHAT_MODEL]
