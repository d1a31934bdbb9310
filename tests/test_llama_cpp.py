"""Our GGUF files run in real llama.cpp (llama_cpp.LlamaCpp: the library inside the `cyllama`
wheel, 0.2.18, the last for Python 3.11; `make setup` installs it where a wheel exists).

For each type (f16, q8_0, q5_0, q4_0) the story model is exported, loaded by llama.cpp, and
compared with our package run at the weights the file holds (every matrix rounded by
quantization.py's q8_0 and q4_0, proved equal to gguf.quants in test_quantization; q5_0 by
gguf.quants itself): llama.cpp's tokens equal our tokenizer's, its logits are close, and its
greedy continuation is the same tokens. qa-full answers held-out questions through the chat
template stored in the file, rendered by llama.cpp's own template code, with our replies.

Tolerance. llama.cpp does not compute in float32: its KV cache is f16, an f16 matrix is
multiplied with activations rounded to f16, and a q8_0/q5_0/q4_0 matrix with activations
rounded to q8_0 blocks. Measured here, the largest logit difference to our model at the same
weights (logits up to 17.5 on the story model) was 0.0027 for f16 and 0.066, 0.071, 0.077 for
q8_0, q5_0, q4_0 (0.10 and 1.17 against the unrounded float model for q8_0 and q4_0).
Bounds about 3 times those: f16 0.01, the block types 0.25; for q4_0 the gap to the rounded
model must also be far below the gap to the float one (the file holds our rounding)."""
import copy

import pytest
import torch
from model_support import one_thread  # noqa: F401

from llama3_mini.checkpoint import load_pretrained
from llama3_mini.finetune import answer, make_qa, split_qa
from llama3_mini.generate import generate
from llama3_mini.gguf_export import export_gguf
from llama3_mini.llama_cpp import LlamaCpp
from llama3_mini.quantization import absmax, dequantize, q4_0
from llama3_mini.tokenizer import ChatFormat

gguf = pytest.importorskip("gguf")
try:
    import cyllama  # noqa: F401
except ImportError as e:  # no wheel for this OS or Python: say so rather than fail
    pytest.skip(f"llama.cpp's prebuilt wheel (cyllama==0.2.18) is not installed ({e}); it "
                "exists for Linux x86-64 with Python 3.11, where `make setup` installs it",
                allow_module_level=True)

TYPES = ("f16", "q8_0", "q5_0", "q4_0")
BOUND = {"f16": 0.01, "q8_0": 0.25, "q5_0": 0.25, "q4_0": 0.25}
PROMPT = "Once upon a time, there was a little fox named Zoe. Zoe lived in a cold pond."


def rounded(model, dtype):
    """A copy of the model whose matrices hold what a `dtype` GGUF file holds."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() != 2:
                continue
            if dtype == "f16":
                p.copy_(p.half().float())
            elif dtype == "q8_0":
                p.copy_(dequantize(*absmax(p, "group")))
            elif dtype == "q4_0":
                p.copy_(dequantize(*q4_0(p)))
            else:
                kind = gguf.GGMLQuantizationType[dtype.upper()]
                back = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), kind), kind)
                p.copy_(torch.from_numpy(back).reshape(p.shape))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    out = {}
    for name in ("story-model", "qa-full"):
        model, tok = load_pretrained(name, device="cpu")
        for dtype in TYPES:
            path = export_gguf((model, tok), folder / f"{name}-{dtype}.gguf", dtype=dtype,
                               progress=False)
            out[name, dtype] = (model, tok, path)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", TYPES)
def test_llama_cpp_runs_our_gguf_with_our_tokens_and_logits(dtype, exported):
    model, tok, path = exported["story-model", dtype]
    llama = LlamaCpp(path)
    ids = llama.tokenize(PROMPT)
    assert ids == tok.encode(PROMPT, bos=True)
    ours = rounded(model, dtype)
    with torch.no_grad():
        want, unrounded = ours(torch.tensor([ids]))[0], model(torch.tensor([ids]))[0]
    got = llama.logits(ids)
    gap = (got - want).abs().max().item()
    assert gap < BOUND[dtype], (dtype, gap)
    if dtype == "q4_0":
        assert gap < (got - unrounded).abs().max().item() / 5
    steps = generate(ours, [ids], 30, stop_tokens=tuple(tok.stop_tokens))[0]
    assert llama.greedy(ids, 30) == steps


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ("f16", "q8_0", "q4_0"))
def test_llama_cpp_chats_through_the_files_template(dtype, exported):
    model, tok, path = exported["qa-full", dtype]
    chat = ChatFormat(tok)
    _, held = split_qa(make_qa(2000, seed=1), n_heldout_stories=15)
    questions = [next(e for e in held if e.kind == k) for k in ("hero", "place", "thing",
                                                                "friend")]
    llama = LlamaCpp(path)
    replies = [llama.chat(e.dialog()[0]["content"]) for e in questions]
    assert replies == answer(rounded(model, dtype), tok, chat, questions)
    right = sum(r == e.answer for r, e in zip(replies, questions, strict=True))
    assert right >= 3  # it really answers
