"""Checkers of the exercises in the chapters' second parts (01b: Llama 3's chat prompt; 06b:
a model's bits per byte on any text). Each accepts a right answer written here without the
package's version, and rejects the mistakes TEACHING.md says it catches."""
import math

import torch

from llama3_mini.exercises import check_dialog_prompt, check_lora_params, check_text_bits_per_byte


# ------------------------------------------------------------ 01b: the chat prompt, as ids
def prompt_by_hand(tok, dialog, strip=True, open_header=True, as_string=False):
    if as_string:  # the whole prompt as text, encoded once: control tokens become text
        text = "<|begin_of_text|>" + "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
            for m in dialog) + "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return tok.encode(text)
    start, end = tok.special_tokens["<|start_header_id|>"], tok.special_tokens["<|end_header_id|>"]
    ids = [tok.special_tokens["<|begin_of_text|>"]]
    for m in dialog:
        content = m["content"].strip() if strip else m["content"]
        ids += [start, *tok.encode(m["role"]), end, *tok.encode("\n\n"), *tok.encode(content),
                tok.special_tokens["<|eot_id|>"]]
    if open_header:
        ids += [start, *tok.encode("assistant"), end, *tok.encode("\n\n")]
    return ids


def test_dialog_prompt_accepts_a_right_answer(capsys):
    assert check_dialog_prompt(prompt_by_hand)
    assert "✓ dialog_prompt: right on all 7 cases" in capsys.readouterr().out


def test_dialog_prompt_rejects_a_prompt_encoded_as_one_string(capsys):
    assert not check_dialog_prompt(lambda tok, d: prompt_by_hand(tok, d, as_string=True))
    out = capsys.readouterr().out
    assert "✗ dialog_prompt(" in out
    assert "→ this builds the prompt as one string and encodes it" in out
    # the ids decoded: the learner reads text, not numbers, at the first token that differs
    assert "first difference at token 0, decoded from there:\n" \
        "    yours    '<|begin_of_text|>" in out
    assert "    expected '<|begin_of_text|><|start_header_id|>assistant" in out


def test_dialog_prompt_rejects_a_missing_assistant_header_even_for_no_messages(capsys):
    assert not check_dialog_prompt(lambda tok, d: prompt_by_hand(tok, d, open_header=False))
    out = capsys.readouterr().out
    assert "✗ dialog_prompt(Tokenizer(n_ranks=960, n_words=1216), [])" in out
    assert "→ this leaves out the open assistant header at the end" in out
    assert "first difference at token 1, decoded from there:\n    yours    (end)" in out


def test_dialog_prompt_rejects_an_assistant_header_closed_with_eot(capsys):
    def closed(tok, d):
        return prompt_by_hand(tok, d) + [tok.special_tokens["<|eot_id|>"]]

    assert not check_dialog_prompt(closed)
    assert "→ this closes the assistant header with <|eot_id|>" in capsys.readouterr().out


def test_dialog_prompt_rejects_unstripped_content_on_the_padded_message(capsys):
    assert not check_dialog_prompt(lambda tok, d: prompt_by_hand(tok, d, strip=False))
    out = capsys.readouterr().out
    assert "padded with spaces" in out
    assert "→ this keeps the spaces and newlines around a message's content" in out


# ------------------------------------------------------ 06b: bits per byte on any text
def bpb_by_hand(model, tok, text, per="byte", log=math.log2, shift=True, bos=True):
    ids = tok.encode(text, bos=bos)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids[:-1]])).double()[0], dim=-1)
    targets = ids[1:] if shift else ids[:-1]
    bits = -sum(log(probs[i, t].item()) for i, t in enumerate(targets))
    size = {"byte": len(text.encode("utf-8")), "char": len(text), "token": len(targets)}[per]
    return bits / size


def test_text_bpb_accepts_a_right_answer(capsys):
    assert check_text_bits_per_byte(bpb_by_hand)
    assert "✓ text_bits_per_byte: right on all 5 cases" in capsys.readouterr().out


def test_text_bpb_rejects_bits_per_token(capsys):
    assert not check_text_bits_per_byte(lambda m, t, x: bpb_by_hand(m, t, x, per="token"))
    out = capsys.readouterr().out
    assert "✗ text_bits_per_byte(" in out and "→ this divides by the number of tokens" in out


def test_text_bpb_rejects_bits_per_character_on_a_text_outside_ascii(capsys):
    assert not check_text_bits_per_byte(lambda m, t, x: bpb_by_hand(m, t, x, per="char"))
    out = capsys.readouterr().out
    assert "'Öl 日本 🦙'" in out  # the first text that is not ASCII
    assert "→ this divides by the number of characters" in out


def test_text_bpb_rejects_nats_and_a_missing_shift(capsys):
    assert not check_text_bits_per_byte(lambda m, t, x: bpb_by_hand(m, t, x, log=math.log))
    assert "→ this is in nats (natural logarithm)" in capsys.readouterr().out
    assert not check_text_bits_per_byte(lambda m, t, x: bpb_by_hand(m, t, x, shift=False))
    assert "→ this scores each position's own token, <|begin_of_text|> included" in \
        capsys.readouterr().out
    assert not check_text_bits_per_byte(lambda m, t, x: bpb_by_hand(m, t, x, bos=False))
    assert "→ this encodes without <|begin_of_text|>" in capsys.readouterr().out


# ------------------------------------------------ 07b: what LoRA trains, from the shapes
def lora_by_hand(args, targets, rank, kv_as_dim=False, one_matrix=False, per_layer=True):
    head = args.dim // args.n_heads
    kv = args.dim if kv_as_dim else (args.n_kv_heads or args.n_heads) * head
    hidden = int(2 * 4 * args.dim / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    hidden = args.multiple_of * -(-hidden // args.multiple_of)
    io = {"wq": (args.dim, args.dim), "wk": (args.dim, kv), "wv": (args.dim, kv),
          "wo": (args.dim, args.dim), "w1": (args.dim, hidden), "w2": (hidden, args.dim),
          "w3": (args.dim, hidden)}
    per = sum(rank * (io[t][1] if one_matrix else io[t][0] + io[t][1]) for t in targets)
    return per * (args.n_layers if per_layer else 1)


def test_lora_params_accepts_a_right_answer_and_matches_real_adapters(capsys):
    from llama3_mini.config import get_preset
    from llama3_mini.lora import add_lora, trainable_parameters
    from llama3_mini.model import Transformer

    assert check_lora_params(lora_by_hand)
    assert "✓ lora_params: right on all 7 cases" in capsys.readouterr().out
    args = get_preset("tiny").replace(dim=64, n_heads=4, n_kv_heads=2, n_layers=2)
    for targets in (("wq", "wv"), ("wk", "w2", "w3")):
        model = add_lora(Transformer(args), targets, rank=4)
        assert trainable_parameters(model)[0] == lora_by_hand(args, targets, 4)


def test_lora_params_rejects_kv_projections_as_wide_as_dim(capsys):
    assert not check_lora_params(lambda a, t, r: lora_by_hand(a, t, r, kv_as_dim=True))
    out = capsys.readouterr().out
    assert "✗ lora_params(" in out and "→ this makes wk and wv as wide as dim" in out


def test_lora_params_rejects_counting_b_only_and_one_layer_only(capsys):
    assert not check_lora_params(lambda a, t, r: lora_by_hand(a, t, r, one_matrix=True))
    assert "→ this counts B only" in capsys.readouterr().out
    assert not check_lora_params(lambda a, t, r: lora_by_hand(a, t, r, per_layer=False))
    assert "→ this counts one layer" in capsys.readouterr().out
