"""Export to GGUF, the single-file format of llama.cpp (and of Ollama and LM Studio, which
run on it), written with `gguf`, the Python package llama.cpp maintains.

    export_gguf("runs/story", "story.gguf")                   # a course checkpoint, float16
    export_gguf(load(), "story-q8.gguf", dtype="q8_0")
    llama3-mini export --format gguf runs/story story.gguf --dtype bf16

A GGUF file holds three things, each as llama.cpp's converter (convert_hf_to_gguf.py,
`LlamaModel`) writes them for a Llama 3 model:
- the architecture as metadata (`llama.context_length`, `llama.attention.head_count_kv`,
  `llama.rope.freq_base`, ...), and Llama 3.1's RoPE scaling as a tensor, `rope_freqs.weight`:
  one divisor per frequency (1 for the fast ones, the scale factor for the slow ones, a blend
  between), by which llama.cpp divides each rotation angle;
- the tokenizer: a byte-level BPE ("gpt2") with Llama 3's pre-tokenizer ("llama-bpe": the
  split pattern of tokenizer.py), every token in GPT-2's printable spelling, the merges,
  token types (normal, or control for the special tokens), BOS/EOS/EOT ids, the chat template;
- the weights under llama.cpp's names (`blk.3.attn_q.weight`), in f32, f16, bf16, q8_0
  (blocks of 32 int8 values sharing one float16 scale), q5_0 or q4_0 (blocks of 32 5- or
  4-bit values and a float16 scale; quantization.py builds q4_0 by hand). Vectors (the norms,
  `rope_freqs`) stay float32, as the converter keeps them.

Queries and keys: llama.cpp's Llama rotates adjacent pairs of dimensions (0,1), (2,3), ...,
Meta's layout, which our weights already have; the converter un-permutes Hugging Face's
rows back to it (`LlamaModel.permute`, the inverse of checkpoint.permute_to_hf). So our wq and
wk are written as they are: no permutation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import loader
from .hf_tokenizer import CHAT_TEMPLATE, tokenizer_json
from .rope import apply_scaling, rope_frequencies

INSTALL_HINT = "pip install 'llama3-mini[gguf]' (or: pip install gguf)"
# Our names for each type (the converter's --outtype) and the other names people use.
DTYPES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q4_0")
_ALIASES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "half": "f16",
            "bfloat16": "bf16", "q8": "q8_0", "int8": "q8_0", "q5": "q5_0", "q4": "q4_0"}
PRE_TOKENIZER = "llama-bpe"  # llama.cpp's name for Llama 3's split pattern
# Our (Meta's) parameter names -> llama.cpp's (gguf.TENSOR_NAMES of MODEL_ARCH.LLAMA).
_LAYER_NAMES = {
    "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight", "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight"}
_TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight"}


def _gguf():
    """The `gguf` package, or an error that says how to install it."""
    try:
        import gguf
    except ImportError:
        raise ImportError(f"GGUF export needs llama.cpp's `gguf` package: {INSTALL_HINT}") \
            from None
    return gguf


def gguf_dtype(dtype: str) -> str:
    """A type name as our DTYPES spell it: "float16" -> "f16", "Q8_0" -> "q8_0"."""
    name = str(dtype).lower().removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown GGUF type {dtype!r}: choose one of {', '.join(DTYPES)} "
                         f"(or {', '.join(_ALIASES)})")
    return name


def gguf_name(name: str) -> str:
    """Our parameter name -> llama.cpp's tensor name (`layers.3.attention.wq.weight` ->
    `blk.3.attn_q.weight`, `tok_embeddings.weight` -> `token_embd.weight`)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_NAMES:
        return f"blk.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise KeyError(f"no llama.cpp name for {name!r}")


def rope_freq_factors(args) -> torch.Tensor:
    """Llama 3.1's RoPE scaling as llama.cpp stores it: for each frequency the divisor that
    turns the plain frequency into the scaled one, (head_dim // 2,) float32. With the
    defaults (factor 8, bands 1 and 4, 8192 positions) on head_dim 128: 1.0 for the first
    pairs, 8.0 for the last, a blend in between. llama.cpp computes angle = position *
    freq / factor, the angle our rope.apply_scaling gives."""
    freqs = rope_frequencies(args.head_dim, args.rope_theta).double()
    scaled = apply_scaling(freqs, args.rope_scaling_factor, args.rope_low_freq_factor,
                           args.rope_high_freq_factor, args.rope_original_max_seq_len)
    return (freqs / scaled).float()


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's "gpt2" tokenizer reads them: tokens in
    GPT-2's byte spelling, as tokenizer.json's vocabulary (hf_tokenizer.tokenizer_json, whose
    merges are reused too), then the special tokens by name. Types: 1 normal, 3 control (a
    special token), 5 unused (rows of the embedding past the tokenizer's, named [PAD<id>] as
    the converter names them). {b"a": 0, ...} + specials -> ["a", ..., "<|begin_of_text|>"]."""
    if vocab_size < tokenizer.n_words:
        raise ValueError(f"the model has {vocab_size} embedding rows but the tokenizer "
                         f"{tokenizer.n_words} ids: this tokenizer does not belong to the model")
    spelled = tokenizer_json(tokenizer)
    tokens: list[str | None] = [None] * vocab_size
    types = [5] * vocab_size
    for text, i in spelled["model"]["vocab"].items():
        tokens[i], types[i] = text, 1
    for special in spelled["added_tokens"]:
        tokens[special["id"]], types[special["id"]] = special["content"], 3
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    return tokens, types, spelled["model"]["merges"]


def _weights(model) -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) in the converter's order; a tied output layer is left out
    (llama.cpp then reuses token_embd), Llama 3.1's scaling becomes rope_freqs.weight."""
    args = model.params
    out = []
    if args.use_scaled_rope:
        out.append(("rope_freqs.weight", rope_freq_factors(args)))
    for name, w in model.state_dict().items():
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        out.append((gguf_name(name), w))
    return out


def _tensor_type(gguf, name: str, w: torch.Tensor, dtype: str):
    """The ggml type a tensor is stored in: vectors in F32 (norms, rope_freqs), matrices in
    `dtype`; a quantized matrix whose rows are not whole blocks of 32 in F16, as the
    converter falls back."""
    types = gguf.GGMLQuantizationType
    if w.dim() <= 1:
        return types.F32
    qtype = {"f32": types.F32, "f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0,
             "q5_0": types.Q5_0, "q4_0": types.Q4_0}[dtype]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if w.shape[-1] % block == 0 else types.F16


def _file_type(gguf, dtype: str) -> int:
    ft = gguf.LlamaFileType
    return {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16,
            "q8_0": ft.MOSTLY_Q8_0, "q5_0": ft.MOSTLY_Q5_0, "q4_0": ft.MOSTLY_Q4_0}[dtype]


def _resolve(source, tokenizer):
    """(model, tokenizer, name) from anything `llama3_mini.load` reads (a folder in any
    format, a shipped model's name), a (model, tokenizer) pair, or a model with tokenizer=."""
    name = "llama3-mini"
    if isinstance(source, (str, Path)):
        model, found = loader.load(source, device="cpu")
        tokenizer = tokenizer or found
        name = Path(source).resolve().name if Path(source).exists() else str(source)
    elif isinstance(source, tuple) and len(source) == 2:
        model, tokenizer = source[0], tokenizer or source[1]
    else:
        model = source
    if not hasattr(model, "params"):
        raise TypeError(f"expected a llama3_mini Transformer, a (model, tokenizer) pair or a "
                        f"checkpoint folder, got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError("a GGUF file carries its tokenizer (llama.cpp and Ollama read it from "
                         "there) and this model has none: pass tokenizer=, e.g. "
                         "export_gguf(model, 'out.gguf', tokenizer=tokenizer)")
    return model, tokenizer, name


def export_gguf(checkpoint_or_model, out_path, dtype: str = "f16", tokenizer=None,
                name: str | None = None, progress: bool = True) -> Path:
    """Write a model and its tokenizer as one GGUF file for llama.cpp, Ollama or LM Studio.

    checkpoint_or_model: a checkpoint folder (a training run's: its newest; Meta's or Hugging
    Face's folders too), a pretrained model's name ("story-model"), a (model, tokenizer) pair
    as load returns, or a Transformer with tokenizer=. dtype: "f32", "f16" (the
    converter's default), "bf16", "q8_0", "q5_0" or "q4_0". The model is read where it is,
    never moved. Returns the path written; transformers opens it with
    AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)."""
    gguf = _gguf()
    from tqdm.auto import tqdm

    dtype = gguf_dtype(dtype)
    model, tokenizer, found = _resolve(checkpoint_or_model, tokenizer)
    args, out_path = model.params, Path(out_path)
    tokens, types, merges = vocabulary(tokenizer, args.vocab_size)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name or found)
    writer.add_file_type(_file_type(gguf, dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_eot_token_id(tokenizer.eot_id)
    writer.add_eom_token_id(tokenizer.eom_id)  # Llama 3.1's third stop: a tool call's end
    writer.add_add_bos_token(True)  # as Llama 3's tokenizer.json: encode starts with BOS
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    tensors = [(n, w, _tensor_type(gguf, n, w, dtype)) for n, w in _weights(model)]
    for n, w, qtype in tensors:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor_info(n, tuple(w.shape), np.dtype(np.float32),
                               w.numel() // block * size, raw_dtype=qtype)
    total = sum(w.numel() // gguf.GGML_QUANT_SIZES[q][0] * gguf.GGML_QUANT_SIZES[q][1]
                for _, w, q in tensors)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out_path.name}",
                  disable=not progress) as bar:
            for _, w, qtype in tensors:  # one tensor in memory at a time
                data = w.detach().to("cpu", torch.float32).numpy()
                writer.write_tensor_data(gguf.quants.quantize(data, qtype))
                bar.update(w.numel() // gguf.GGML_QUANT_SIZES[qtype][0]
                           * gguf.GGML_QUANT_SIZES[qtype][1])
    except BaseException:
        writer.close()
        out_path.unlink(missing_ok=True)  # never leave half a file that looks like a model
        raise
    writer.close()
    return out_path
