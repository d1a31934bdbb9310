"""Export to Hugging Face: a course model and its tokenizer written as a Hugging Face folder,
loaded back by transformers (LlamaForCausalLM, AutoTokenizer): the same logits, the same
greedy tokens, the same token ids and chat prompts; and `Llama.from_pretrained` telling the
course's folders from Hugging Face's and Meta's."""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")  # a test dependency: always installed by make

from model_support import attention_configs, one_thread, random_model  # noqa: E402, F401

from llama3_mini import hub  # noqa: E402
from llama3_mini.checkpoint import load_checkpoint, load_model, save_model  # noqa: E402
from llama3_mini.cli import main  # noqa: E402
from llama3_mini.generate import generate  # noqa: E402
from llama3_mini.hf_tokenizer import tokenizer_json  # noqa: E402
from llama3_mini.stories import make_stories  # noqa: E402
from llama3_mini.tokenizer import ChatFormat, Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STORY_MODEL = ROOT / "assets" / "story-model"
MIXED = ["naïve café, 東京, Ελληνικά, emoji 🦙👍🏽 and code:\n\n```python\ndef f(x):\n"
         "    return x ** 2  # square\n```\n", "I'm sure you'll see THEY'RE 12345 and 3.14159!",
         "\ttabs\tand   spaces   \r\nWindows lines\r\n\n\n", " ", ""]
DIALOG = [{"role": "system", "content": "You tell short stories."},
          {"role": "user", "content": "  Who is Lily?\n"},
          {"role": "assistant", "content": "Lily is a little fox."},
          {"role": "user", "content": "Where does she live? 🦊"}]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny random model with a small tokenizer trained here, saved as a course checkpoint."""
    text = "\n".join(s.text for s in make_stories(200, seed=1)) + "\n".join(MIXED) * 5
    tokenizer = Tokenizer.train(text, 400, progress=False)
    args = attention_configs(64, vocab_size=tokenizer.n_words)["gqa"]
    folder = tmp_path_factory.mktemp("small")
    tokenizer.save(folder / "tok.tiktoken")
    save_model(random_model(args), folder / "ckpt", tokenizer="../tok.tiktoken")
    return folder / "ckpt"


def _hf(folder):
    return (transformers.LlamaForCausalLM.from_pretrained(folder).eval(),
            transformers.AutoTokenizer.from_pretrained(folder))


def _ids(encoded):
    """apply_chat_template's ids: a list (transformers 4) or a BatchEncoding (5)."""
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded


@pytest.mark.parametrize("which", ["small", "story-model"])
def test_transformers_loads_the_export_with_equal_logits_and_greedy_tokens(which, small,
                                                                           tmp_path):
    folder = small if which == "small" else STORY_MODEL
    assert main(["export", str(folder), str(tmp_path / "hf")]) == 0
    hf, hf_tok = _hf(tmp_path / "hf")
    model, tok, _ = load_checkpoint(folder, device="cpu")
    prompt = tok.encode("Once upon a time, there was a little fox named", bos=True)
    with torch.no_grad():
        ours = model(torch.tensor([prompt] * 2))
        theirs = hf(torch.tensor([prompt] * 2)).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    new = generate(model, [prompt], 40, stop_tokens=tok.stop_tokens)[0]
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                      pad_token_id=tok.eos_id)[0, len(prompt):].tolist()
    stop = next((i for i, t in enumerate(out) if t in tok.stop_tokens), len(out))
    assert out[:stop] == new and len(new) >= 5
    assert hf_tok.decode(out[:stop]) == tok.decode(new)


@pytest.mark.parametrize("which", ["small", "story-model"])
def test_the_exported_tokenizer_gives_our_ids_and_chat_prompts(which, small, tmp_path):
    folder = small if which == "small" else STORY_MODEL
    hub.export_hf(folder, tmp_path)
    ours = load_checkpoint(folder, device="cpu")[1]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in [s.text for s in make_stories(30, seed=7)] + MIXED:
        ids = ours.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids, text
        assert theirs(text)["input_ids"] == [ours.bos_id] + ids  # <|begin_of_text|> first
        assert theirs.decode(ids) == text
    assert theirs.convert_tokens_to_ids("<|eot_id|>") == ours.eot_id
    # Special-token text: transformers parses it by default (its chat template relies on
    # that), as our encode does when allowed; split_special_tokens=True keeps it text, as
    # our encode does by default.
    text = "Lily said <|eot_id|> and left."
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(
        text, allowed_special="all")
    assert theirs(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == \
        ours.encode(text)
    for dialog in (DIALOG, DIALOG[1:2]):
        prompt = theirs.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
        assert _ids(prompt) == ChatFormat(ours).encode_dialog_prompt(dialog)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (ours.bos_id, ours.eos_id)


@pytest.mark.parametrize("tied", [False, True])
def test_scaled_rope_and_tied_embeddings_survive_the_export(tied, tmp_path):
    model = random_model(attention_configs(64)["gqa-scaled-rope"].replace(tie_word_embeddings=tied))
    hub.save_hf(model, tmp_path)  # no tokenizer: config and weights only
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 97, (2, 50))  # past the 16 positions RoPE was scaled from
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-5, rtol=1e-5)
    again = hub.Llama.from_pretrained(tmp_path, device="cpu", max_seq_len=64)
    assert again.source.startswith("hf:") and again.model.params.use_scaled_rope
    assert again.model.params.tie_word_embeddings == tied
    torch.testing.assert_close(again.model(tokens), model(tokens))


def test_bfloat16_export_is_half_the_size_and_loads_as_bfloat16(small, tmp_path):
    hub.export_hf(small, tmp_path / "f32")
    hub.export_hf(small, tmp_path / "bf16", dtype=torch.bfloat16)
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("f32", "bf16")}
    assert size["bf16"] < 0.6 * size["f32"]
    config = json.loads((tmp_path / "bf16/config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert next(hf.parameters()).dtype == torch.bfloat16


@pytest.mark.slow
def test_merges_derived_from_metas_ranks_encode_as_tiktoken_does():
    """The same derivation on Meta's 128K ranks: tokenizers' BPE gives tiktoken's ids."""
    from test_checkpoint_io import meta_tokenizer_file
    from tokenizers import Tokenizer as HFTokenizer

    meta = Tokenizer.load(meta_tokenizer_file())
    fast = HFTokenizer.from_str(json.dumps(tokenizer_json(meta)))
    text = "\n".join(s.text for s in make_stories(20)) + "".join(MIXED) + " Supercalifragilistic"
    assert fast.encode(text, add_special_tokens=False).ids == meta.encode(text)
    assert fast.encode("hi").ids == [128000, meta.encode("hi")[0]]


def test_from_pretrained_loads_the_courses_own_folders(small, tmp_path):
    llama = hub.Llama.from_pretrained(STORY_MODEL, device="cpu")
    model, _ = load_model(STORY_MODEL, device="cpu")
    assert llama.source.startswith("llama3-mini:") and llama.tokenizer.n_words == 1216
    tokens = torch.tensor([llama.tokenizer.encode("Once upon a time", bos=True)])
    torch.testing.assert_close(llama.model(tokens), model(tokens))
    # the mark is the "format" key (or, in older folders, "model_args"), not the file name
    assert json.loads((small / "config.json").read_text())["format"] == "llama3-mini"
    assert hub.detect_format(small) == hub.detect_format(STORY_MODEL) == "llama3-mini"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ValueError, match="model_type 'gpt2', not 'llama'"):
        hub.Llama.from_pretrained(tmp_path)


def test_a_training_runs_folder_loads_and_exports_even_when_moved(small, tmp_path):
    import shutil

    run = tmp_path / "run"  # as the trainer leaves it: step folders, `latest`, the tokenizer
    shutil.copytree(small, run / "step_000002")
    shutil.copy(small.parent / "tok.tiktoken", run / "tokenizer.tiktoken")
    (run / "latest").write_text("step_000002")
    config = json.loads((run / "step_000002/config.json").read_text())
    config["tokenizer"] = "/somewhere/else/runs/mine/tokenizer.tiktoken"  # the run was moved
    (run / "step_000002/config.json").write_text(json.dumps(config))
    llama = hub.Llama.from_pretrained(run, device="cpu")
    assert llama.source == f"llama3-mini:{run}" and llama.tokenizer.n_words == 400 + 256
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("Lily")["input_ids"] == \
        [llama.tokenizer.bos_id] + llama.tokenizer.encode("Lily")
    (run / "tokenizer.tiktoken").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer /somewhere/else/.* is missing"):
        hub.Llama.from_pretrained(run)
