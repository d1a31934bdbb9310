"""Preference optimization (chapter 07c): `dpo_loss` against TRL's DPO trainer and the
paper's formula, Meta's formatting mask and NLL term, the frozen reference, rejection
sampling and pass@k against independent counts."""
import itertools
import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_mini.config import ModelArgs
from llama3_mini.finetune import IGNORE, Example, make_qa
from llama3_mini.model import Transformer
from llama3_mini.preference import (
    dpo_loss,
    dpo_objective,
    frozen_copy,
    is_correct,
    make_pairs,
    mask_formatting,
    pass_at_k,
    preference_loss,
    rejection_sample,
    train_dpo,
)
from llama3_mini.stories import make_stories, story_answers

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16,
                 max_seq_len=64)
FIRST_SPECIAL = 50  # in these tests, ids 50 to 60 play the formatting tokens


# --- TRL's DPOTrainer._compute_loss, called on given log-probabilities ---------------------

class _Accelerator:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


def trl_loss(token_logps, completion_mask, ref_chosen, ref_rejected, beta, loss_types,
             loss_weights):
    """TRL 1.16's DPO loss (trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss) on the
    given per-token log-probs (2 * batch, seq) of [chosen; rejected], with the reference's
    summed log-probs precomputed, as TRL's precompute_ref_log_probs option passes them. The
    trainer's state is a namespace holding only what the method reads; the model is a stub
    whose outputs carry the log-probs (TRL's fused LM head returns them so)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    state = SimpleNamespace(
        model=SimpleNamespace(training=False), accelerator=_Accelerator(),
        aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None,
        f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=loss_weights,
        beta=beta, use_weighting=False, label_smoothing=0.0, _total_train_tokens=0,
        _tp_size=1, _metrics=defaultdict(lambda: defaultdict(list)))
    n, seq = token_logps.shape
    zeros = torch.zeros(n, seq)

    def model(**kwargs):
        return SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())

    # completion_mask has one more column than the targets: TRL shifts it by one
    inputs = {"input_ids": torch.zeros(n, seq + 1, dtype=torch.long),
              "attention_mask": torch.ones(n, seq + 1, dtype=torch.long),
              "completion_mask": torch.cat([torch.zeros(n, 1), completion_mask.float()], 1),
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(state, model, inputs, False)


def _random_logps(batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2 * batch, seq, generator=g) < 0.6
    mask[:, 0] = True  # every response has a token
    logps = -torch.rand(2 * batch, seq, generator=g).mul(6) * mask  # 0 where not counted
    ref = -torch.rand(2 * batch, seq, generator=g).mul(6) * mask
    return logps.double(), ref.double(), mask


# TRL's losses stored, so that `make test-fast` checks against TRL without importing it (which
# takes seconds): each case's inputs and TRL 1.16's loss on them, written by
# `python tests/test_preference.py`; the slow test below recomputes every stored loss with TRL.
TRL_FIXTURE = Path(__file__).parent / "data" / "trl_dpo_losses.json"


def _trl_cases():
    """(name, logps, ref, mask, beta, loss_types, loss_weights) for each stored case."""
    for beta, seed in itertools.product([0.1, 0.5, 2.0], [0, 1]):
        yield (f"sigmoid beta {beta} seed {seed}", *_random_logps(4, 7, seed), beta,
               ["sigmoid"], [1.0])
    yield ("sigmoid + sft 0.2", *_random_logps(3, 9, 7), 0.1, ["sigmoid", "sft"], [1.0, 0.2])


def write_trl_fixture():
    cases = []
    for name, logps, ref, mask, beta, types, weights in _trl_cases():
        rc, rr = ref.sum(-1).chunk(2)
        loss = trl_loss(logps, mask, rc, rr, beta, types, weights)
        cases.append({"name": name, "beta": beta, "loss_types": types, "loss_weights": weights,
                      "logps": logps.tolist(), "ref": ref.tolist(), "mask": mask.tolist(),
                      "trl_loss": loss.item()})
    TRL_FIXTURE.parent.mkdir(exist_ok=True)
    TRL_FIXTURE.write_text(json.dumps({"trl": "1.16.0", "cases": cases}) + "\n")


def _stored_trl_cases():
    for case in json.loads(TRL_FIXTURE.read_text())["cases"]:
        tensors = [torch.tensor(case[k], dtype=torch.float64) for k in ("logps", "ref")]
        yield case, *tensors, torch.tensor(case["mask"])


def _ours(logps, ref, mask, case):
    """The package's loss for a case: DPO alone, or DPO with Meta's NLL term, whose
    coefficient 0.2 on the chosen responses is TRL's loss_type ["sigmoid", "sft"] with
    loss_weights [1, 0.2] (the chosen tokens' mean NLL)."""
    if case["loss_types"] == ["sigmoid"]:
        pc, pr = logps.sum(-1).chunk(2)
        rc, rr = ref.sum(-1).chunk(2)
        return dpo_loss(pc, pr, rc, rr, case["beta"])[0].mean()
    nll = case["loss_weights"][1]
    loss, stats = dpo_objective(logps, ref, mask, mask.chunk(2)[0], beta=case["beta"], nll=nll)
    assert stats["nll"] > 0 and stats["loss"] > stats["dpo"]
    return loss


def test_dpo_losses_equal_trl_s_stored_losses():
    """Fast: TRL's losses as stored; the slow test below checks they are still TRL's."""
    for case, logps, ref, mask in _stored_trl_cases():
        ours = _ours(logps, ref, mask, case)
        assert ours.item() == pytest.approx(case["trl_loss"], rel=1e-12, abs=1e-12), case["name"]


@pytest.mark.slow  # imports trl
def test_the_stored_trl_losses_are_trl_s_own():
    stored = list(_stored_trl_cases())
    assert [c["name"] for c, *_ in stored] == [c[0] for c in _trl_cases()]
    for case, logps, ref, mask in stored:
        rc, rr = ref.sum(-1).chunk(2)
        theirs = trl_loss(logps, mask, rc, rr, case["beta"], case["loss_types"],
                          case["loss_weights"])
        assert theirs.item() == case["trl_loss"], case["name"]


# --- The paper's formula, by hand ----------------------------------------------------------

def test_dpo_loss_by_hand():
    """Rafailov et al. (2023), eq. 7: -log sigmoid(beta * (log-ratio chosen - log-ratio
    rejected)). Log-ratios +1 and -1, beta 0.5: -log sigmoid(1) = log(1 + e^-1)."""
    t = torch.tensor
    loss, chosen_r, rejected_r = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), 0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert chosen_r.item() == pytest.approx(0.5) and rejected_r.item() == pytest.approx(-0.5)
    flipped = dpo_loss(t([-3.0]), t([-1.0]), t([-2.0]), t([-2.0]), 0.5)[0]  # wrong way round
    assert flipped.item() == pytest.approx(math.log(1 + math.e), rel=1e-6)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-50, 0), min_size=4, max_size=4), st.floats(-20, 20))
def test_equal_log_ratios_cost_log_2_and_beta_to_zero_too(logps, shift):
    """Equal log-ratios (the policy moved both responses alike, or not at all): log 2 at any
    beta. As beta -> 0 every pair costs log 2 and the gradient vanishes."""
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in logps)
    equal = dpo_loss(rc + shift, rr + shift, rc, rr, 0.7)[0]
    assert equal.item() == pytest.approx(math.log(2), abs=1e-9)
    tiny = dpo_loss(pc, pr, rc, rr, 1e-9)[0]
    assert tiny.item() == pytest.approx(math.log(2), abs=1e-7)


def test_the_loss_falls_as_the_chosen_log_ratio_rises():
    pc = torch.tensor([-2.0], requires_grad=True)
    loss = dpo_loss(pc, torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.1)[0]
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.05)  # -beta * sigmoid(0)


# --- The formatting mask, the reference, the training loop --------------------------------

def _pairs(with_format: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = [], []
    for n in (5, 7, 6):
        prompt = torch.randint(1, FIRST_SPECIAL, (n,), generator=g).tolist()
        for out in (chosen, rejected):
            reply = torch.randint(1, FIRST_SPECIAL, (int(torch.randint(2, 6, (), generator=g)),),
                                  generator=g).tolist()
            out.append((prompt + reply + ([FIRST_SPECIAL + 3] if with_format else []),
                        len(prompt)))
    return chosen, rejected


def _models():
    torch.manual_seed(0)
    policy = Transformer(ARGS)
    reference = frozen_copy(policy)
    with torch.no_grad():  # the policy has moved away from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference


def test_mask_formatting():
    targets = torch.tensor([[IGNORE, 3, 4, FIRST_SPECIAL], [IGNORE, FIRST_SPECIAL + 9, 2, 1]])
    expected = torch.tensor([[IGNORE, 3, 4, IGNORE], [IGNORE, IGNORE, 2, 1]])
    assert torch.equal(mask_formatting(targets, FIRST_SPECIAL), expected)


def test_the_masked_loss_equals_the_unmasked_one_without_formatting_tokens():
    policy, reference = _models()
    chosen, rejected = _pairs(with_format=False)
    masked, _ = preference_loss(policy, reference, chosen, rejected, first_special=FIRST_SPECIAL)
    plain, _ = preference_loss(policy, reference, chosen, rejected, first_special=None)
    torch.testing.assert_close(masked, plain, rtol=0, atol=0)
    chosen, rejected = _pairs(with_format=True)  # and with them, the mask changes the loss
    masked, _ = preference_loss(policy, reference, chosen, rejected, first_special=FIRST_SPECIAL)
    plain, _ = preference_loss(policy, reference, chosen, rejected, first_special=None)
    assert abs(masked.item() - plain.item()) > 1e-4


def test_the_reference_model_receives_no_gradient():
    policy, reference = _models()
    chosen, rejected = _pairs(with_format=True)
    loss, _ = preference_loss(policy, reference, chosen, rejected, first_special=FIRST_SPECIAL)
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert all(not p.requires_grad for p in reference.parameters())
    assert all(p.grad is not None for p in policy.parameters())


def test_a_policy_equal_to_its_reference_starts_at_log_2():
    torch.manual_seed(0)
    policy = Transformer(ARGS)
    chosen, rejected = _pairs(with_format=True)
    _, stats = preference_loss(policy, frozen_copy(policy), chosen, rejected, nll=0.0)
    assert stats["dpo"] == pytest.approx(math.log(2), abs=1e-6) and stats["margin"] == 0


class _Tok:
    """A tokenizer of single characters (ids 1..49), 50 the <|eot_id|>."""
    n_ranks, eot_id = FIRST_SPECIAL, FIRST_SPECIAL

    def encode(self, text, bos=False, eos=False):
        return [1 + ord(c) % 48 for c in text]


class _Chat:
    def encode_dialog_prompt(self, dialog):
        return _Tok().encode(dialog[0]["content"])[:20]


def test_train_dpo_widens_the_margin_and_leaves_the_reference_alone():
    torch.manual_seed(0)
    policy = Transformer(ARGS)
    reference = frozen_copy(policy)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    ex = [Example(f"story {i}", "hero", "Who?", f"A{i}.", f"A{i}") for i in range(6)]
    pairs = [(e, e.answer, f"B{i}x.") for i, e in enumerate(ex)]
    run = train_dpo(policy, pairs, _Tok(), _Chat(), steps=12, batch_size=4, lr=3e-3, warmup=2,
                    reference=reference, progress=False)
    h = run["history"]
    assert h[0]["margin"] == 0 and h[-1]["margin"] > 0.05
    assert sum(s["loss"] for s in h[-3:]) < sum(s["loss"] for s in h[:3])
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())


# --- Rejection sampling, pairs, pass@k -----------------------------------------------------

STORIES = make_stories(6, seed=3)
EXAMPLES = make_qa(6, seed=3)


def _reply(draw, example):
    """A right reply, or a wrong one of the same shape, as a sampler might give."""
    facts = story_answers(STORIES[draw(st.integers(0, len(STORIES) - 1))])
    return draw(st.sampled_from([example.answer, example.answer.rstrip("."),
                                 example.answer.replace(example.fact, facts[example.kind]),
                                 example.answer + " " + example.fact, ""]))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_rejection_sampling_keeps_exactly_the_samples_the_grammar_marks_correct(data):
    samples = [[_reply(data.draw, e) for _ in range(data.draw(st.integers(1, 4)))]
               for e in EXAMPLES]
    kept = rejection_sample(EXAMPLES, samples)
    # the grammar's own reading of each story, not the examples' stored answers
    truth = {(s.text[:40], k): v for s in STORIES for k, v in story_answers(s).items()}
    marked = [[r == e.answer.replace(e.fact, truth[(e.story[:40], e.kind)]) for r in replies]
              for e, replies in zip(EXAMPLES, samples, strict=True)]
    expected = [e for e, m in zip(EXAMPLES, marked, strict=True) if any(m)]
    assert [(k.story, k.kind) for k in kept] == [(e.story, e.kind) for e in expected]
    for k, e in zip(kept, expected, strict=True):
        assert is_correct(e, k.answer) and k.answer in samples[EXAMPLES.index(e)]
    pairs = make_pairs(EXAMPLES, samples)
    for example, chosen, rejected in pairs:
        assert is_correct(example, chosen) and not is_correct(example, rejected)
    assert len(pairs) == sum(any(m) and not all(m) for m in marked)


@pytest.mark.parametrize("n", [1, 4, 7])
def test_pass_at_k_counts_every_draw(n):
    """Against enumeration: the share of all k-subsets of n samples holding a correct one."""
    for c in range(n + 1):
        right = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(right, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))
    with pytest.raises(ValueError, match="need 0 <= c"):
        pass_at_k(4, 5, 2)


# --- The exercise's checker names each likely mistake --------------------------------------

def _learner(dpo_special=False, nll_special=True, prompt=False, nll_rejected=False,
             nll_sum=False, nll_sign=-1.0, nll_weight=True, per_pair=False):
    """A learner's Llama 3 DPO objective, written here without the package, right or wrong in
    one way: masks from the targets, DPO on summed log-probs, NLL on the chosen replies."""
    def fn(pc, pr, rc, rr, tc, tr, first_special, beta, nll):
        def dpo_mask(t):
            if prompt:  # -100 < first_special: the prompt slips in
                return t < first_special
            return (t != -100) if dpo_special else (t != -100) & (t < first_special)

        def nll_mask(t):
            return (t != -100) if nll_special else (t != -100) & (t < first_special)

        def logp(x, t):
            return torch.where(dpo_mask(t), x, torch.zeros_like(x)).sum(-1)

        margin = beta * ((logp(pc, tc) - logp(rc, tc)) - (logp(pr, tr) - logp(rr, tr)))
        dpo = -torch.nn.functional.logsigmoid(margin)
        tokens = [pc[nll_mask(tc)]] + ([pr[nll_mask(tr)]] if nll_rejected else [])
        tokens = torch.cat(tokens)
        term = nll_sign * (tokens.sum() if nll_sum else tokens.mean())
        return (dpo if per_pair else dpo.mean()) + (nll * term if nll_weight else 0)
    return fn


@pytest.mark.parametrize("wrong, named", [
    (_learner(nll_special=False), "the NLL term masked like the DPO terms"),
    (_learner(dpo_special=True), "formatting tokens left in the DPO terms"),
    (_learner(prompt=True), "the prompt counted"),
    (_learner(nll_rejected=True), "the NLL term on the rejected replies too"),
    (_learner(nll_sum=True), "the NLL term summed"),
    (_learner(nll_sign=1.0), "the NLL term's sign"),
    (_learner(nll_weight=False), "the NLL term forgotten"),
    (_learner(per_pair=True), "one loss per pair"),
])
def test_check_llama3_dpo_loss_names_the_mistake(wrong, named, capsys):
    from llama3_mini.exercises import check_llama3_dpo_loss

    assert not check_llama3_dpo_loss(wrong)
    out = capsys.readouterr().out
    assert f"→ {named}" in out, out


def test_check_llama3_dpo_loss_accepts_the_right_objective(capsys):
    from llama3_mini.exercises import check_llama3_dpo_loss

    assert check_llama3_dpo_loss(_learner())
    assert "right on all 5 cases" in capsys.readouterr().out


class _TextTok(_Tok):
    """_Tok that decodes too: ids 1..48 back to characters, specials to nothing."""
    stop_tokens = {FIRST_SPECIAL}

    def decode(self, ids):
        chars = {1 + ord(c) % 48: c for c in "The hero is Gus.It happens in a cold pond"}
        return "".join(chars.get(i, "?") for i in ids if i < FIRST_SPECIAL)


def test_ending_reads_how_a_reply_stops():
    from llama3_mini.preference import ending

    tok = _TextTok()
    ex = Example("s", "hero", "Who?", "The hero is Gus.", "Gus")
    right = tok.encode("The hero is Gus.")
    assert ending(ex, right, tok, 20) == {"stopped": True, "formed": True, "repeats": False}
    assert ending(ex, tok.encode("The hero is"), tok, 20)["formed"] is False  # abrupt
    assert ending(ex, right[:20], tok, len(right[:20]))["stopped"] is False  # hit the budget
    looped = tok.encode("The hero is Gus. Gus. Gus.")
    assert ending(ex, looped, tok, 40)["repeats"] is True


def test_sample_replies_are_seeded_and_shaped():
    from llama3_mini.preference import sample_replies

    torch.manual_seed(0)
    model = Transformer(ARGS).eval()
    ex = [Example(f"story {i}", "hero", "Who?", "A.", "A") for i in range(3)]
    one = sample_replies(model, _TextTok(), _Chat(), ex, k=4, max_new_tokens=5, seed=3)
    again = sample_replies(model, _TextTok(), _Chat(), ex, k=4, max_new_tokens=5, seed=3)
    assert one == again and len(one) == 3 and all(len(s) == 4 for s in one)


if __name__ == "__main__":  # rewrite tests/data/trl_dpo_losses.json with the installed TRL
    write_trl_fixture()
