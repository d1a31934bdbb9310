"""Decode speed and memory of quantized models, one CPU thread: our float32 model, our
QuantLinear schemes (int8 per row, q8_0, q4_0: integers stored, dequantized at every call),
torch's own dynamic int8 (`torch.ao.quantization.quantize_dynamic`: int8 weights per row,
activations quantized per call, int8 matrix kernels), and llama.cpp (cyllama) running the same
weights as f16, q8_0 and q4_0 GGUF files. A model of DIM x LAYERS (random weights, the story
tokenizer's vocabulary), batch 1, a 16-token prompt, greedy, N new tokens; one run each.
Memory: ours and torch's measured from the stored tensors, llama.cpp's from the model's
tensor bytes (llama_model_size). Ratios against our float32 model.

    .venv/bin/python benchmarks/bench_quantization.py [--tokens 64] [--dim 512] [--layers 8]

Measured (torch 2.13 CPU, cyllama 0.2.18, one thread, on a shared 2-core machine under load
average ~4; 34 s wall): dim 512, 8 layers, 25.4M parameters, a 15-token prompt, 64 new tokens.
                            tokens/s x float32      MB x float32
    float32                 32.1      1.00   101.5      1.00
    ours int8-row            8.1      0.25    27.4      0.27
    ours q8_0               16.6      0.52    28.8      0.28
    ours q4_0                9.6      0.30    16.4      0.16
    torch dynamic int8      44.0      1.37    27.3      0.27
    llama.cpp f16          163.5      5.10    50.8      0.50
    llama.cpp q8_0         217.5      6.78    27.0      0.27
    llama.cpp q4_0         327.5     10.21    14.3      0.14
Ours saves the memory and loses speed: QuantLinear dequantizes its whole matrix in Python at
every call. torch's dynamic int8 multiplies int8 matrices directly and beats float32; llama.cpp
multiplies the blocks as stored, in C, and the fewer bytes it reads a token the faster it goes.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

from llama3_mini.checkpoint import load_pretrained
from llama3_mini.config import ModelArgs
from llama3_mini.generate import generate
from llama3_mini.gguf_export import export_gguf
from llama3_mini.model import Transformer
from llama3_mini.quantization import quantize_model, stored_bytes


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def torch_dynamic_int8(model):
    """torch's dynamic int8 model and the bytes of its state (the packed int8 weights come
    as (weight, bias) tuples in the state dict)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    size = 0
    for value in q.state_dict().values():
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor):
                size += t.numel() * t.element_size()
    return q, size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _, tok = load_pretrained("story-model", device="cpu")
    shape = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=2,
                      vocab_size=1216, multiple_of=256, max_seq_len=512)
    torch.manual_seed(0)
    model = Transformer(shape).eval()
    prompt = tok.encode("Once upon a time, there was a little fox named Zoe. Zoe", bos=True)
    prompt = prompt[:16]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model dim {args.dim}, {args.layers} layers, {n_params / 1e6:.1f}M parameters; "
          f"prompt {len(prompt)} tokens, {args.tokens} new, 1 thread")
    rows = []

    def ours(name, m, size):
        generate(m, [prompt], 4)  # warm-up
        out, sec = timed(lambda: generate(m, [prompt], args.tokens))
        rows.append((name, "torch", len(out[0]) / sec, size))

    ours("float32", model, stored_bytes(model))
    for scheme in ("int8-row", "q8_0", "q4_0"):
        q = quantize_model(model, scheme)
        ours(f"ours {scheme}", q, stored_bytes(q))
    q, size = torch_dynamic_int8(model)
    ours("torch dynamic int8", q, size)
    try:
        from llama3_mini.llama_cpp import LlamaCpp
    except ImportError:
        LlamaCpp = None
    if LlamaCpp is not None:
        with tempfile.TemporaryDirectory() as tmp:
            for dtype in ("f16", "q8_0", "q4_0"):
                path = export_gguf((model, tok), Path(tmp) / f"{dtype}.gguf", dtype=dtype,
                                   progress=False)
                try:
                    llama = LlamaCpp(path)
                except ImportError as e:
                    print(f"llama.cpp not run: {e}")
                    break
                llama.greedy(prompt, 4)
                out, sec = timed(lambda llama=llama: llama.greedy(prompt, args.tokens))
                rows.append((f"llama.cpp {dtype}", "llama.cpp", len(out) / sec,
                             llama.model.size))
    base_speed, base_size = rows[0][2], rows[0][3]
    print(f"{'':22} {'tokens/s':>9} {'x float32':>9} {'MB':>7} {'x float32':>9}")
    for name, _, speed, size in rows:
        print(f"{name:22} {speed:9.1f} {speed / base_speed:9.2f} {size / 1e6:7.1f} "
              f"{size / base_size:9.2f}")


if __name__ == "__main__":
    main()
