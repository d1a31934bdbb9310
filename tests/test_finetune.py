"""Supervised fine-tuning: the loss mask, the batch, and that prompts carry no gradient."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_mini.config import ModelArgs
from llama3_mini.finetune import (
    ANSWERS,
    IGNORE,
    QUESTIONS,
    encode_example,
    loss_mask,
    make_batch,
    make_qa,
    sft_loss,
    split_qa,
)
from llama3_mini.model import Transformer
from llama3_mini.stories import is_grammatical, parse_story
from llama3_mini.tokenizer import ChatFormat, Tokenizer, llama3_tokenizer_path

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16,
                 max_seq_len=64)


@settings(max_examples=200, deadline=None)
@given(n_prompt=st.integers(1, 40), n_reply=st.integers(0, 40))
def test_loss_mask_keeps_exactly_the_targets_that_are_reply_tokens(n_prompt, n_reply):
    n_total = n_prompt + n_reply
    mask = loss_mask(n_prompt, n_total)
    assert mask.shape == (n_total - 1,)
    # target i is the token at position i + 1; it counts if that token is in the reply
    assert mask.tolist() == [i + 1 >= n_prompt for i in range(n_total - 1)]
    assert int(mask.sum()) == n_reply


def test_loss_mask_rejects_a_prompt_longer_than_the_sequence():
    with pytest.raises(ValueError, match=r"need 0 < n_prompt \(5\) <= n_total \(3\)"):
        loss_mask(5, 3)


def random_encoded(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        n_prompt = int(torch.randint(3, 20, (1,), generator=g))
        n_reply = int(torch.randint(1, 6, (1,), generator=g))
        out.append((torch.randint(0, 61, (n_prompt + n_reply,), generator=g).tolist(), n_prompt))
    return out


def test_batch_targets_are_the_replies_shifted_by_one_and_ignore_the_rest():
    encoded = random_encoded()
    inputs, targets = make_batch(encoded, pad_id=7)
    longest = max(len(t) for t, _ in encoded)
    assert inputs.shape == targets.shape == (len(encoded), longest - 1)
    for b, (tokens, n_prompt) in enumerate(encoded):
        n = len(tokens)
        assert inputs[b, : n - 1].tolist() == tokens[:-1]
        assert inputs[b, n - 1:].eq(7).all()
        assert targets[b, : n_prompt - 1].eq(IGNORE).all()  # prompt: nothing to learn
        assert targets[b, n_prompt - 1: n - 1].tolist() == tokens[n_prompt:]  # the reply
        assert targets[b, n - 1:].eq(IGNORE).all()  # padding


def test_prompt_tokens_carry_no_gradient():
    torch.manual_seed(0)
    model = Transformer(ARGS)
    encoded = random_encoded(seed=1)
    inputs, targets = make_batch(encoded)
    logits = model(inputs)
    logits.retain_grad()
    F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE).backward()
    for b, (tokens, n_prompt) in enumerate(encoded):
        assert logits.grad[b, : n_prompt - 1].abs().sum() == 0  # prompt positions
        assert logits.grad[b, n_prompt - 1: len(tokens) - 1].abs().amax(-1).gt(0).all()
        assert logits.grad[b, len(tokens) - 1:].abs().sum() == 0  # padding


def test_sft_loss_is_the_mean_negative_log_likelihood_of_the_replies():
    torch.manual_seed(0)
    model = Transformer(ARGS).eval()
    encoded = random_encoded(seed=2)
    inputs, targets = make_batch(encoded)
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens, n_prompt in encoded:  # one sequence at a time, no padding at all
            logp = torch.log_softmax(model(torch.tensor([tokens[:-1]]))[0], -1)
            for pos in range(n_prompt - 1, len(tokens) - 1):
                total -= logp[pos, tokens[pos + 1]].item()
                count += 1
        torch.testing.assert_close(sft_loss(model, inputs, targets).item(), total / count,
                                   atol=1e-5, rtol=1e-5)


def test_finetune_trains_what_requires_grad_with_the_trainers_optimizer_and_schedule(
        monkeypatch):
    import llama3_mini.finetune as sft
    from llama3_mini.train import lr_at

    torch.manual_seed(0)
    model = Transformer(ARGS)
    for name, p in model.named_parameters():  # the last block and the output layer only
        p.requires_grad = name.startswith(("layers.1.", "output."))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    made, lrs, trainers = [], [], sft.make_optimizer

    def make_optimizer(*args):  # the Trainer's, watched: the lr each step runs at
        opt = trainers(*args)
        opt.register_step_pre_hook(lambda o, *_: lrs.append([g["lr"] for g in o.param_groups]))
        made.append(opt)
        return opt

    monkeypatch.setattr(sft, "make_optimizer", make_optimizer)
    steps, warmup, lr = 40, 5, 1e-2
    out = sft.finetune(model, random_encoded(seed=3), steps=steps, batch_size=4, lr=lr,
                       warmup=warmup, progress=False)
    (opt,) = made
    decayed, plain = opt.param_groups  # matrices, then vectors (RMSNorm gains): no decay
    assert decayed["weight_decay"] == plain["weight_decay"] == 0.0
    assert decayed["betas"] == (0.9, 0.95) and len(plain["params"]) == 2
    # warm-up to the peak in `warmup` steps, then a cosine to lr / 10 at the last step
    assert [g[0] for g in lrs] == [lr_at(s, lr, warmup, steps, lr / 10) for s in range(steps)]
    assert lrs[0][0] == pytest.approx(lr / warmup) and lrs[warmup - 1][0] == pytest.approx(lr)
    assert lrs[-1] == pytest.approx([lr / 10, lr / 10])
    assert len(out["losses"]) == steps and max(out["losses"][-5:]) < out["losses"][0] - 1.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert out["trainable"] == sum(p.numel() for n, p in model.named_parameters()
                                   if n in trainable)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="no parameter requires grad: nothing to fine-tune"):
        sft.finetune(model, random_encoded(), steps=1, progress=False)


@pytest.mark.slow
def test_answers_are_the_stories_own_choices_and_lie_in_the_opening():
    whole = make_qa(50, seed=3, whole=True)
    opening = make_qa(50, seed=3)
    assert len(whole) == len(opening) == 50 * len(QUESTIONS)
    for w, o in zip(whole, opening, strict=True):
        assert is_grammatical(w.story)
        assert w.story.startswith(o.story) and len(o.story) < len(w.story) / 2
        assert w.answer == o.answer and w.question == o.question == QUESTIONS[w.kind]
        assert o.answer == ANSWERS[o.kind].format(o.fact)
        assert o.fact in o.story, (o.kind, o.fact)
        choices = parse_story(w.story).choices  # the parser's reading of the text
        hero = next(v for k, v in choices if k == "hero")
        assert (w.kind != "hero") or w.fact == hero


def test_encoded_example_is_the_chat_prompt_then_the_answer_then_eot():
    tok = Tokenizer.load(llama3_tokenizer_path())
    chat = ChatFormat(tok)
    example = make_qa(1, seed=5)[0]
    tokens, n_prompt = encode_example(example, tok, chat)
    assert tokens[:n_prompt] == chat.encode_dialog_prompt(example.dialog())
    assert tok.decode(tokens[n_prompt:]) == example.answer + "<|eot_id|>"
    inputs, targets = make_batch([(tokens, n_prompt)])
    kept = targets[targets != IGNORE].tolist()
    assert tok.decode(kept) == example.answer + "<|eot_id|>"  # the loss sees the answer only


def test_held_out_stories_are_never_in_training():
    train, held = split_qa(make_qa(40, seed=4), n_heldout_stories=10)
    assert len(held) == 10 * len(QUESTIONS) and len(train) == 30 * len(QUESTIONS)
    assert not {e.story for e in train} & {e.story for e in held}


def test_loss_mask_checker_accepts_the_reference_and_rejects_plausible_mistakes(capsys):
    from llama3_mini.exercises import check_loss_mask

    assert check_loss_mask(loss_mask)
    assert check_loss_mask(lambda p, n: [i + 1 >= p for i in range(n - 1)])  # a list is fine
    assert "✓ loss_mask" in capsys.readouterr().out
    wrong = {
        "off by one": lambda p, n: torch.arange(n - 1) >= p,
        "one per token, not per target": lambda p, n: torch.arange(n) >= p,
        "the prompt kept, the reply masked": lambda p, n: torch.arange(1, n) < p,
    }
    for why, fn in wrong.items():
        assert not check_loss_mask(fn), why
        out = capsys.readouterr().out
        assert "✗ loss_mask(" in out and "expected" in out, why
