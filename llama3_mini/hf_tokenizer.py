"""Llama 3's tokenizer in Hugging Face's format: tokenizer.json, the byte-level BPE of the
`tokenizers` library, written from our ranks (`tokenizer_json`) and read back
(`ranks_from_tokenizer_json`), and the chat template that tokenizer_config.json carries.
hub.py writes and reads these files in Hugging Face folders; tokenizer.py holds the BPE
itself and Meta's own tokenizer.model format."""
from __future__ import annotations

import json
from pathlib import Path

# Meta-Llama-3-8B-Instruct's chat template: the same ids as tokenizer.ChatFormat.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>"
    "assistant<|end_header_id|>\n\n' }}{% endif %}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which tokenizer.json vocabularies use:
    printable bytes stand for themselves, the others for chr(256 + n) (b' ' -> 'Ġ')."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(others)) for b in range(256)}


def tokenizer_json(tokenizer) -> dict:
    """Our tokenizer as a `tokenizers` byte-level BPE (the tokenizer.json of Meta's Hugging
    Face folders). A token's id is its rank; the merges are every split of a token into two
    tokens, ordered by the token's rank (as transformers converts tiktoken files), so that
    BPE merges in tiktoken's order. {b"ab": 256} -> vocab {"a": 97, ..., "ab": 256},
    merges ["a b"]."""
    chars = bytes_to_unicode()
    ranks = tokenizer.mergeable_ranks

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    merges = []
    for token in sorted(ranks, key=ranks.get):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(splits, key=lambda s: (ranks[s[0]], ranks[s[1]]))
    special = [{"id": i, "content": name, "single_word": False, "lstrip": False,
                "rstrip": False, "normalized": False, "special": True}
               for name, i in tokenizer.special_tokens.items()]
    bos = "<|begin_of_text|>"
    template = {"type": "TemplateProcessing",  # encode(text) starts with <|begin_of_text|>
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}}}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated",
             "invert": False}, byte_level]},
        "post_processor": {"type": "Sequence", "processors": [
            {**byte_level, "trim_offsets": False}, template]},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True,  # a piece that is a token is taken whole (tiktoken)
                  "vocab": {text(t): r for t, r in ranks.items()},
                  "merges": [f"{text(a)} {text(b)}" for a, b in merges]}}


def ranks_from_tokenizer_json(path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Hugging Face's tokenizer.json -> (mergeable ranks as tiktoken keeps them, special
    tokens). In a byte-level BPE a token's id is its merge rank, so no merge is needed."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    decode = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(decode[c] for c in token): i for token, i in data["model"]["vocab"].items()}
    special = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    return ranks, special
