"""Export to GGUF (llama.cpp, Ollama, LM Studio), checked against readers we did not write:
transformers' GGUF loader (`from_pretrained(folder, gguf_file=...)`: weights, config and
tokenizer rebuilt from the file) and llama.cpp's own `gguf.GGUFReader` and name tables.

Bounds. A float32 file holds our weights exactly, so its logits equal ours to 1e-4. The other
types round each weight (f16: 11 significant bits, bf16: 8, q8_0: 8 bits per block of 32 with
a float16 scale), so their logits are compared twice: to our model with its weights rounded
by the `gguf` package's own quantizer, to 1e-4 (the file holds those values, in the right
places), and to our unrounded model with a looser bound, about 3 to 4 times the largest
difference measured on the two models here (f16 0.0024, bf16 0.024, q8_0 0.070, on logits
up to 2.8 and 17.5): f16 0.01, bf16 0.1, q8_0 0.2, far below what a misplaced tensor gives."""
import pytest
import torch

transformers = pytest.importorskip("transformers")  # the test extra: always installed by make
gguf = pytest.importorskip("gguf")

from model_support import attention_configs, one_thread, random_model  # noqa: E402, F401
from test_export import DIALOG, MIXED, STORY_MODEL  # noqa: E402

from llama3_mini.checkpoint import hf_config, hf_name, load_checkpoint, save_model  # noqa: E402
from llama3_mini.cli import main  # noqa: E402
from llama3_mini.generate import generate  # noqa: E402
from llama3_mini.gguf_export import export_gguf  # noqa: E402
from llama3_mini.hf_tokenizer import CHAT_TEMPLATE  # noqa: E402
from llama3_mini.stories import make_stories  # noqa: E402
from llama3_mini.tokenizer import ChatFormat, Tokenizer  # noqa: E402

TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
BOUND = {"f32": 1e-4, "f16": 0.01, "bf16": 0.1, "q8_0": 0.2}  # against unrounded weights
PROMPT = "Once upon a time, there was a little fox named"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A course checkpoint: a tiny random float32 model and a tokenizer trained here."""
    text = "\n".join(s.text for s in make_stories(200, seed=1)) + "\n".join(MIXED) * 5
    tokenizer = Tokenizer.train(text, 400, progress=False)
    folder = tmp_path_factory.mktemp("small")
    tokenizer.save(folder / "tok.tiktoken")
    args = attention_configs(64, vocab_size=tokenizer.n_words)["gqa"]
    save_model(random_model(args), folder / "ckpt", tokenizer="../tok.tiktoken")
    return folder / "ckpt"


def _folder(which, small):
    return small if which == "small" else STORY_MODEL


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _field(reader, key):
    return reader.fields[key].contents()


def _rounded(model, dtype):
    """Our model with each matrix rounded as the `gguf` package's quantizer stores it (f16
    for a q8_0 row that is not whole blocks of 32, as the converter falls back)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                kind = "F16" if dtype == "q8_0" and p.shape[1] % 32 else TYPES[dtype]
                qtype = gguf.GGMLQuantizationType[kind]
                q = gguf.quants.quantize(p.numpy(), qtype)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype).reshape(p.shape)))
    return model


@pytest.mark.parametrize("dtype", list(TYPES))
@pytest.mark.parametrize("which", ["small", "story-model"])
def test_transformers_opens_the_gguf_with_our_logits(which, dtype, small, tmp_path):
    folder = _folder(which, small)
    out = tmp_path / "model.gguf"
    assert main(["export", "--format", "gguf", str(folder), str(out), "--dtype", dtype,
                 "--quiet"]) == 0
    hf = _hf_model(out)
    model, tok, _ = load_checkpoint(folder, device="cpu")
    tokens = torch.tensor([tok.encode(PROMPT, bos=True)] * 2)
    with torch.no_grad():
        theirs, ours = hf(tokens).logits, model(tokens)
        assert (theirs - ours).abs().max() < BOUND[dtype]
        torch.testing.assert_close(theirs, _rounded(model, dtype)(tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["small", "story-model"])
def test_the_greedy_continuation_is_ours(which, small, tmp_path):
    folder = _folder(which, small)
    model, tok, _ = load_checkpoint(folder, device="cpu")
    out = export_gguf(folder, tmp_path / "m.gguf", dtype="f32", progress=False)
    prompt = tok.encode(PROMPT, bos=True)
    new = generate(model, [prompt], 40, stop_tokens=tok.stop_tokens)[0]
    theirs = _hf_model(out).generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                     pad_token_id=tok.eos_id)[0, len(prompt):].tolist()
    stop = next((i for i, t in enumerate(theirs) if t in tok.stop_tokens), len(theirs))
    assert theirs[:stop] == new and len(new) >= 5


@pytest.mark.parametrize("which", ["small", "story-model"])
def test_the_gguf_tokenizer_gives_our_ids_and_chat_prompts(which, small, tmp_path):
    folder = _folder(which, small)
    ours = load_checkpoint(folder, device="cpu")[1]
    out = export_gguf(folder, tmp_path / "m.gguf", dtype="q8_0", progress=False)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in [s.text for s in make_stories(30, seed=7)] + MIXED:
        ids = ours.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids, text
        assert theirs(text)["input_ids"] == [ours.bos_id] + ids  # add_bos_token: as Llama 3
        assert theirs.decode(ids) == text
    for name, i in ours.special_tokens.items():
        assert theirs.convert_tokens_to_ids(name) == i
    assert theirs("Lily said <|eot_id|>", add_special_tokens=False)["input_ids"] == \
        ours.encode("Lily said <|eot_id|>", allowed_special="all")
    for dialog in (DIALOG, DIALOG[1:2]):
        prompt = theirs.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
        prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
        assert prompt == ChatFormat(ours).encode_dialog_prompt(dialog)


@pytest.mark.parametrize("dtype", list(TYPES))
def test_metadata_names_and_types_as_llamacpp_reads_them(dtype, small, tmp_path):
    model, tok, _ = load_checkpoint(small, device="cpu")
    args = model.params
    out = export_gguf((model, tok), tmp_path / "m.gguf", dtype=dtype, progress=False)
    reader = gguf.GGUFReader(out)
    expected = {"general.architecture": "llama", "llama.context_length": args.max_seq_len,
                "llama.embedding_length": args.dim, "llama.block_count": args.n_layers,
                "llama.feed_forward_length": args.hidden_dim,
                "llama.attention.head_count": args.n_heads,
                "llama.attention.head_count_kv": args.n_kv_heads,
                "llama.rope.dimension_count": args.dim // args.n_heads,
                "llama.vocab_size": tok.n_words, "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.bos_token_id": tok.bos_id,
                "tokenizer.ggml.eos_token_id": tok.eos_id,
                "tokenizer.ggml.eot_token_id": tok.eot_id,
                "tokenizer.ggml.eom_token_id": tok.eom_id,
                "tokenizer.ggml.add_bos_token": True, "tokenizer.chat_template": CHAT_TEMPLATE,
                "general.file_type": {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[dtype]}
    for key, value in expected.items():
        assert _field(reader, key) == value, key
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(args.rope_theta)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert _field(reader, "tokenizer.ggml.token_type") == [1] * tok.n_ranks + [3] * 256
    assert "tokenizer.ggml.padding_token_id" not in reader.fields  # Llama 3 has none
    # Names: llama.cpp's own table maps Hugging Face's name of each of our tensors to them.
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, args.n_layers)
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors) == [names.get_name(hf_name(n), try_suffixes=(".weight",))
                             for n in model.state_dict()]
    for name, w in model.state_dict().items():
        t = tensors[names.get_name(hf_name(name), try_suffixes=(".weight",))]
        assert t.tensor_type.name == (TYPES[dtype] if w.dim() == 2 else "F32"), name
        assert [int(d) for d in t.shape] == list(reversed(w.shape))  # ggml: fastest dim first


def test_q8_0_rows_that_are_not_whole_blocks_fall_back_to_f16(small, tmp_path):
    """q8_0 packs rows in blocks of 32 values: a 48-wide model's rows are stored in f16, as
    llama.cpp's converter falls back, and still load with our logits."""
    tok = load_checkpoint(small, device="cpu")[1]
    model = random_model(attention_configs(64, vocab_size=tok.n_words)["mha"])  # dim 48
    out = export_gguf(model, tmp_path / "m.gguf", dtype="q8_0", tokenizer=tok, progress=False)
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert kinds == {"F16", "Q8_0", "F32"}  # only ffn_down's rows (hidden_dim, 128) are whole
    tokens = torch.randint(0, tok.n_words, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(_hf_model(out)(tokens).logits, _rounded(model, "q8_0")(tokens),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_llama31_rope_scaling_is_written_as_llamacpp_writes_it(tied, small, tmp_path):
    """transformers' GGUF loader reads no RoPE scaling for a llama file (it ignores the
    rope_freqs tensor), so the scaling is checked in two parts: the rope_freqs.weight the
    file holds equals the ratio of transformers' plain to its "llama3"-scaled inverse
    frequencies (the factors llama.cpp's converter writes), and the weights transformers
    reads, put into a Hugging Face model configured with the scaling, give our logits at
    positions far past the original context (16 here)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    tok = load_checkpoint(small, device="cpu")[1]
    args = attention_configs(64, vocab_size=tok.n_words)["gqa-scaled-rope"]
    model = random_model(args.replace(tie_word_embeddings=tied))
    out = export_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer=tok, progress=False)
    reader = gguf.GGUFReader(out)
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert factors.tensor_type.name == "F32"
    plain = LlamaRotaryEmbedding(hf_config(args.replace(use_scaled_rope=False))).inv_freq
    scaled = LlamaRotaryEmbedding(hf_config(model.params)).inv_freq
    assert not torch.allclose(plain, scaled)  # the scaling changes some frequencies
    torch.testing.assert_close(torch.from_numpy(factors.data.copy()), plain / scaled)
    assert ("output.weight" in [t.name for t in reader.tensors]) is not tied
    loaded = _hf_model(out)
    hf = transformers.LlamaForCausalLM(hf_config(model.params)).eval()
    hf.load_state_dict(loaded.state_dict())
    tokens = torch.randint(0, tok.n_words, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-4, rtol=0)


def test_clear_errors(small, tmp_path):
    model, tok, _ = load_checkpoint(small, device="cpu")
    with pytest.raises(ValueError, match="unknown GGUF type 'q4_k'.*f32, f16, bf16, q8_0"):
        export_gguf(small, tmp_path / "m.gguf", dtype="q4_k")
    with pytest.raises(ValueError, match="carries its tokenizer.*pass tokenizer="):
        export_gguf(model, tmp_path / "m.gguf")
    with pytest.raises(FileNotFoundError, match="no checkpoint folder .*nowhere"):
        export_gguf(tmp_path / "nowhere", tmp_path / "m.gguf")
    bigger = load_checkpoint(STORY_MODEL, device="cpu")[1]  # 1216 ids, the model has 656
    with pytest.raises(ValueError, match="1216 ids: this tokenizer does not belong"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=bigger)
    assert not (tmp_path / "m.gguf").exists()
    assert main(["export", str(small), str(tmp_path / "hf"), "--dtype", "q8_0"]) == 2


def test_a_larger_embedding_is_padded_with_unused_tokens(small, tmp_path):
    """Rows past the tokenizer's ids (a vocabulary rounded up) become [PAD<id>], type unused,
    as llama.cpp's converter names them; the logits are still ours."""
    tok = load_checkpoint(small, device="cpu")[1]
    model = random_model(attention_configs(64, vocab_size=tok.n_words + 4)["gqa"])
    out = export_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer=tok, progress=False)
    reader = gguf.GGUFReader(out)
    assert _field(reader, "tokenizer.ggml.tokens")[-4:] == [
        f"[PAD{i}]" for i in range(tok.n_words, tok.n_words + 4)]
    assert _field(reader, "tokenizer.ggml.token_type")[-5:] == [3, 5, 5, 5, 5]
    tokens = torch.randint(0, tok.n_words, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(_hf_model(out)(tokens).logits, model(tokens), atol=1e-4,
                                   rtol=0)


def test_a_pretrained_model_exports_by_its_name(tmp_path):
    out = export_gguf("story-model", tmp_path / "s.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.gguf"]  # one file, nothing else
    assert _field(gguf.GGUFReader(out), "general.name") == "story-model"
