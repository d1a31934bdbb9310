"""Quality against size for chapter 11b (`make assets --only quantization`, or
`python assets/make_quantization.py`): every quantization scheme of quantization.py and
llama.cpp's own types, measured on the story model and qa-full. Numbers only, no weights.

- Stories: N_STORIES fresh stories (seed 99: no model was trained on them), their exact
  entropy floor, and each model's bits per byte on them and mean KL divergence per token from
  the float model (llama.cpp's `perplexity --kl-divergence` measure).
- qa-full: exact-match answers by question kind on chapter 07's held-out questions (15
  stories, 60 questions), greedy.
- Ours: int8 per tensor, per row, in groups of 32 (q8_0); int4 per tensor, per row, in groups
  of 32 (q4_0); Llama
  3's FP8 (feed-forward layers of the inner blocks), and FP8 everywhere for contrast. The
  embedding stays float (a table). Bits per weight of the linear layers, measured from the
  stored tensors, a float layer counted at 16 bits (the asset's float16).
- llama.cpp: the models exported as f16, q8_0, q5_0, q4_0 GGUF files and run in llama.cpp
  (cyllama); bits per weight of the same matrices from the file's tensor sizes.
- One layer at a time: each linear layer alone in q4_0, and each block's feed-forward alone in
  FP8: KL from the float model. And the activations' range entering each block's feed-forward
  layers (for FP8's per-token scale and Meta's cap of 1200).
The card records how long it took."""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama3_mini.checkpoint import load_pretrained  # noqa: E402
from llama3_mini.finetune import answer, make_qa, split_qa  # noqa: E402
from llama3_mini.gguf_export import export_gguf  # noqa: E402
from llama3_mini.quantization import (  # noqa: E402
    FP8_ACTIVATION_CAP,
    SCHEMES,
    bits_and_kl,
    linear_bits_per_weight,
    linear_names,
    quantize_model,
    text_logits,
)
from llama3_mini.stories import entropy_bits_per_byte, make_stories  # noqa: E402
from llama3_mini.tokenizer import ChatFormat  # noqa: E402

OUT = ROOT / "assets" / "quantization"
N_STORIES, STORY_SEED = 100, 99
GGUF_TYPES = ("f16", "q8_0", "q5_0", "q4_0")


def story_data(tokenizer):
    stories = make_stories(N_STORIES, seed=STORY_SEED)
    ids = [tokenizer.encode(s.text, bos=True) for s in stories]
    return stories, ids, sum(len(s.text.encode()) for s in stories)


def held_out_questions():
    return split_qa(make_qa(2000, seed=1), n_heldout_stories=15)[1]


def exact_by_kind(replies, questions) -> dict:
    right = defaultdict(list)
    for r, q in zip(replies, questions, strict=True):
        right[q.kind].append(r == q.answer)
    return {k: round(sum(v) / len(v), 4) for k, v in right.items()}


def gguf_linear_bits(path) -> float:
    """Bits per weight of the blocks' matrices and the output layer, from the file."""
    from gguf import GGUFReader

    bits = weights = 0
    for t in GGUFReader(path).tensors:
        if len(t.shape) == 2 and t.name != "token_embd.weight":
            bits += 8 * int(t.n_bytes)
            weights += int(t.n_elements)
    return bits / weights


def ffn_input_ranges(model, ids) -> list[dict]:
    """Per block: the largest per-token max|x| entering w1/w3 and w2, and the median of a
    token's max|x| over its root mean square (how spiky a token's activations are)."""
    seen = defaultdict(list)
    hooks = []
    for i, block in enumerate(model.layers):
        for w in ("w1", "w2"):
            def hook(_m, args, i=i, w=w):
                x = args[0].detach().flatten(0, -2)
                seen[i, w].append(torch.stack([x.abs().amax(-1), x.pow(2).mean(-1).sqrt()], 1))
            hooks.append(getattr(block.feed_forward, w).register_forward_pre_hook(hook))
    text_logits(model, ids)
    for h in hooks:
        h.remove()
    out = []
    for i in range(len(model.layers)):
        row = {"block": i}
        for w in ("w1", "w2"):
            s = torch.cat(seen[i, w])
            row[f"{w}_max"] = round(s[:, 0].max().item(), 3)
            row[f"{w}_spike"] = round((s[:, 0] / s[:, 1]).median().item(), 2)
        out.append(row)
    return out


def main(threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    start, wall = time.process_time(), time.perf_counter()
    model, tok = load_pretrained("story-model", device="cpu")
    qa_model, qa_tok = load_pretrained("qa-full", device="cpu")
    chat = ChatFormat(qa_tok)
    stories, ids, n_bytes = story_data(tok)
    questions = held_out_questions()
    ref = text_logits(model, ids)
    card = {"stories": f"make_stories({N_STORIES}, seed={STORY_SEED})", "n_bytes": n_bytes,
            "floor_bpb": round(entropy_bits_per_byte(stories), 5),
            "questions": f"qa-full's held-out: {len(questions)}", "torch_threads": threads,
            "fp8_activation_cap": FP8_ACTIVATION_CAP, "rows": []}

    def add(name, engine, bits, logits, replies):
        score = bits_and_kl(logits, ref, ids, n_bytes)
        row = {"scheme": name, "engine": engine, "bits_per_weight": round(bits, 3),
               "bpb": round(score["bpb"], 5), "kl": round(score["kl"], 6),
               "qa_exact": exact_by_kind(replies, questions)}
        card["rows"].append(row)
        print(row, flush=True)

    add("float", "ours", 16.0, ref, answer(qa_model, qa_tok, chat, questions))
    for scheme in (*SCHEMES, "fp8-all"):
        names = linear_names(model) if scheme == "fp8-all" else None
        kind = "fp8" if scheme == "fp8-all" else scheme
        q = quantize_model(model, kind, names)
        qa = quantize_model(qa_model, kind, names)
        add(scheme, "ours", linear_bits_per_weight(q, float_bits=16), text_logits(q, ids),
            answer(qa, qa_tok, chat, questions))

    from llama3_mini.llama_cpp import LlamaCpp

    with tempfile.TemporaryDirectory() as tmp:
        for dtype in GGUF_TYPES:
            path = export_gguf((model, tok), Path(tmp) / f"s-{dtype}.gguf", dtype=dtype,
                               progress=False)
            qa_path = export_gguf((qa_model, qa_tok), Path(tmp) / f"q-{dtype}.gguf",
                                  dtype=dtype, progress=False)
            llama, qa_llama = LlamaCpp(path), LlamaCpp(qa_path)
            logits = [llama.logits(x) for x in ids]
            replies = [qa_llama.chat(q.dialog()[0]["content"]) for q in questions]
            add(dtype, "llama.cpp", gguf_linear_bits(path), logits, replies)

    layers = []
    for name in linear_names(model):  # one layer at a time, in q4_0
        q = quantize_model(model, "q4_0", [name])
        layers.append({"layer": name,
                       "kl": round(bits_and_kl(text_logits(q, ids), ref, ids, n_bytes)["kl"], 6)})
    card["one_layer_q4_0"] = layers
    card["one_block_fp8"] = []
    for i in range(model.params.n_layers):
        names = [f"layers.{i}.feed_forward.{w}" for w in ("w1", "w2", "w3")]
        q = quantize_model(model, "fp8", names)
        card["one_block_fp8"].append(
            {"block": i, "kl": round(bits_and_kl(text_logits(q, ids), ref, ids, n_bytes)["kl"], 7)})
    card["ffn_input_ranges"] = ffn_input_ranges(model, ids)
    card["cpu_seconds"] = round(time.process_time() - start, 1)
    card["wall_seconds"] = round(time.perf_counter() - wall, 1)
    write(card)
    return card


def write(card: dict) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / "card.json").write_text(json.dumps(card, indent=1))
    rows = "\n".join(
        f"| {r['scheme']} | {r['engine']} | {r['bits_per_weight']:.2f} | {r['bpb']:.4f} | "
        f"{r['kl']:.2e} | {statistics.mean(r['qa_exact'].values()):.3f} |" for r in card["rows"])
    worst = sorted(card["one_layer_q4_0"], key=lambda r: -r["kl"])[:5]
    (OUT / "README.md").write_text(f"""# Quantization: quality against size

Made by `make assets` (assets/make_quantization.py) from the story model and qa-full, in
{card['cpu_seconds']:.0f} CPU seconds ({card['wall_seconds']:.0f} s of wall time) on
{card['torch_threads']} thread(s). Numbers only; notebook 11b loads card.json.

Held-out stories: {card['stories']}, {card['n_bytes']} bytes, entropy floor
{card['floor_bpb']:.4f} bits per byte. KL: mean per token, nats, from the float model.
qa: {card['questions']} questions, exact match averaged over the four kinds.

| scheme | engine | bits/weight | bits/byte | KL | qa exact |
| --- | --- | --- | --- | --- | --- |
{rows}

Layers that hurt most alone in q4_0 (KL): {', '.join(f"{r['layer']} {r['kl']:.1e}" for r in worst)}.
""")


if __name__ == "__main__":
    print(json.dumps(main(), indent=1)[:3000])
