"""Post-training as Llama 3 did it ("The Llama 3 Herd of Models", section 4): rejection
sampling (4.1.3) and Direct Preference Optimization (4.1.4) with Meta's two changes, the
formatting tokens masked out of the DPO loss and an NLL term on the chosen responses.

The story grammar knows every right answer (finetune.make_qa), so the verifier here is exact:
a reply is correct when it is the expected sentence. Meta's verifier was a learned reward
model (4.1.2), which only approximates what people prefer.

DPO (Rafailov et al. 2023) turns preferences into a classification loss on log-probabilities:
with pi the model being trained and ref a frozen copy of where it started,

    loss = -log sigmoid(beta * [(log pi(chosen) - log ref(chosen))
                                - (log pi(rejected) - log ref(rejected))])

`beta * (log pi - log ref)` is the response's *implicit reward*; the loss makes the chosen
response's reward exceed the rejected one's."""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import re

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .finetune import ANSWERS, IGNORE, Example, encode_example, fit_examples, make_batch
from .generate import generate
from .model import in_mode, model_device
from .train import evaluate_bpb

# "The Llama 3 Herd of Models", section 4.1.4: DPO at learning rate 1e-5, beta 0.1, and an
# NLL term with coefficient 0.2 on the chosen sequences.
META_LR, META_BETA, META_NLL = 1e-5, 0.1, 0.2


# --- Rejection sampling (4.1.3) ------------------------------------------------------------

def is_correct(example: Example, reply: str) -> bool:
    """The exact verifier: the reply is the sentence the grammar's facts make.
    (Example(..., answer="The hero is Gus."), "The hero is Gus.") -> True; "The hero is Pia." ->
    False; "The hero is Gus. Gus" -> False."""
    return reply.strip() == example.answer


def sample_replies(model, tokenizer, chat, examples: list[Example], k: int,
                   temperature: float = 1.0, max_new_tokens: int = 20, seed: int = 0,
                   batch_size: int = 256, progress: bool = False) -> list[list[str]]:
    """k sampled replies to each example's question, [example][sample], each generation
    stopped at <|eot_id|> (a reply that never stops is cut at max_new_tokens)."""
    prompts = [chat.encode_dialog_prompt(e.dialog()) for e in examples for _ in range(k)]
    out = []
    for at in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="sampling"):
        out += generate(model, prompts[at: at + batch_size], max_new_tokens,
                        temperature=temperature, seed=seed + at,
                        stop_tokens=tuple(tokenizer.stop_tokens))
    replies = [tokenizer.decode(ids).strip() for ids in out]
    return [replies[i * k: (i + 1) * k] for i in range(len(examples))]


def rejection_sample(examples: list[Example], samples: list[list[str]]) -> list[Example]:
    """Keep, for each prompt, the best of its samples as the verifier judges: a correct one
    (the first; all correct replies are the same sentence). A prompt with none is dropped.
    Returns the kept replies as examples to fine-tune on.
    [Ex(answer="A."), Ex(answer="B.")], [["X.", "A."], ["C.", "D."]] -> [Ex(answer="A.")]."""
    kept = []
    for example, replies in zip(examples, samples, strict=True):
        good = next((r for r in replies if is_correct(example, r)), None)
        if good is not None:
            kept.append(dataclasses.replace(example, answer=good))
    return kept


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples drawn without replacement from n, c of them
    correct, is correct (the unbiased estimator of Chen et al. 2021):
    1 - C(n - c, k) / C(n, k). (n=4, c=1, k=2) -> 0.5; (4, 0, 4) -> 0.0; (4, 1, 4) -> 1.0."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c ({c}) <= n ({n}) and 1 <= k ({k}) <= n")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# --- Preference pairs, on-policy ----------------------------------------------------------

def make_pairs(examples: list[Example], samples: list[list[str]],
               seed: int = 0) -> list[tuple[Example, str, str]]:
    """(example, chosen, rejected) for each prompt whose samples hold a correct reply and a
    wrong one: the model's own correct answer against one of its own wrong answers (drawn
    with `seed`). Prompts answered all right or all wrong make no pair.
    [Ex(answer="A.")], [["A.", "B.", "A."]] -> [(Ex(answer="A."), "A.", "B.")]."""
    rng, pairs = random.Random(seed), []
    for example, replies in zip(examples, samples, strict=True):
        right = [r for r in replies if is_correct(example, r)]
        wrong = [r for r in replies if not is_correct(example, r)]
        if right and wrong:
            pairs.append((example, right[0], rng.choice(wrong)))
    return pairs


def encode_pair(pair: tuple[Example, str, str], tokenizer, chat):
    """The pair's chosen and rejected dialogs as (tokens, n_prompt), each reply ending in
    <|eot_id|> (finetune.encode_example)."""
    example, chosen, rejected = pair
    return tuple(encode_example(dataclasses.replace(example, answer=reply), tokenizer, chat)
                 for reply in (chosen, rejected))


# --- The DPO loss -------------------------------------------------------------------------

def mask_formatting(targets: torch.Tensor, first_special: int) -> torch.Tensor:
    """Targets with the formatting tokens (every special token: ids >= first_special, the
    tokenizer's n_ranks: headers, <|eot_id|>) set to IGNORE, so they leave the DPO loss, as
    Meta masked them (4.1.4). With first_special 5: [[-100, 3, 4, 9]] -> [[-100, 3, 4, -100]]."""
    return targets.masked_fill(targets >= first_special, IGNORE)


def token_logps(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each target, (batch, seq); 0 where the target is IGNORE."""
    logits = model(inputs).float()  # (batch, seq, vocab)
    logp = torch.gather(F.log_softmax(logits, -1), -1, targets.clamp(min=0).unsqueeze(-1))
    return logp.squeeze(-1).masked_fill(targets == IGNORE, 0.0)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = META_BETA):
    """The DPO loss of each pair from the responses' summed log-probabilities, (batch,) each:
    returns (losses, chosen_rewards, rejected_rewards), the rewards being
    beta * (log pi - log ref). Equal log-ratios give log 2 = 0.693:
    (tensor([-1.]), tensor([-2.]), tensor([-1.]), tensor([-2.])) -> (tensor([0.6931]), ...)."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def dpo_objective(policy_logps, ref_logps, keep, chosen_targets, beta: float = META_BETA,
                  nll: float = META_NLL):
    """Llama 3's DPO objective from per-token log-probabilities, (2 * batch, seq) each, the
    chosen responses first, then the rejected: the mean DPO loss of the responses' summed
    log-probs over the tokens `keep` marks, plus `nll` times the mean NLL of the chosen
    responses' tokens that `chosen_targets` (batch, seq) marks. Returns (loss, stats)."""
    pc, pr = (policy_logps * keep).sum(-1).chunk(2)  # (batch,) each
    rc, rr = (ref_logps * keep).sum(-1).chunk(2)
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta)
    nll_loss = -policy_logps.chunk(2)[0][chosen_targets].mean()
    loss = losses.mean() + nll * nll_loss
    stats = {"loss": loss.item(), "dpo": losses.mean().item(), "nll": nll_loss.item(),
             "accuracy": (chosen_r > rejected_r).float().mean().item(),
             "margin": (chosen_r - rejected_r).mean().item(),
             "chosen_logps": pc.mean().item(), "rejected_logps": pr.mean().item()}
    return loss, stats


def preference_loss(policy, reference, chosen: list, rejected: list, beta: float = META_BETA,
                    nll: float = META_NLL, first_special: int | None = None):
    """`dpo_objective` on a batch of pairs ((tokens, n_prompt) each): the DPO terms over the
    reply tokens, formatting tokens masked out when first_special is given; the NLL term over
    all the chosen reply's tokens, <|eot_id|> included, as in SFT. The reference runs
    without gradient. Returns (loss, stats)."""
    device = model_device(policy)
    inputs, targets = make_batch(list(chosen) + list(rejected))  # (2 * batch, seq) each
    inputs, targets = inputs.to(device), targets.to(device)
    scored = targets if first_special is None else mask_formatting(targets, first_special)
    policy_logps = token_logps(policy, inputs, targets)  # (2 * batch, seq)
    with torch.no_grad():
        ref_logps = token_logps(reference, inputs, targets)
    return dpo_objective(policy_logps, ref_logps, scored != IGNORE,
                         (targets != IGNORE).chunk(2)[0], beta, nll)


def frozen_copy(model):
    """The reference model: a copy of the policy as it starts, in eval mode, no gradient."""
    reference = copy.deepcopy(model).eval()
    return reference.requires_grad_(False)


def train_dpo(policy, pairs: list, tokenizer, chat, steps: int = 100, batch_size: int = 16,
              lr: float = META_LR, beta: float = META_BETA, nll: float = META_NLL,
              mask_format: bool = True, warmup: int = 10, seed: int = 0, reference=None,
              progress: bool = True) -> dict:
    """DPO on (example, chosen, rejected) pairs, training whatever parameters of `policy`
    require grad (the adapters alone after `add_lora`), against `reference` (by default a
    frozen copy of the policy as it starts). The Trainer's AdamW (`make_optimizer`, no
    weight decay) and schedule (`lr_at`: warm-up, then a cosine to lr / 10), gradients
    clipped at norm 1, as finetune.finetune. Returns every step's stats and the seconds."""
    reference = frozen_copy(policy) if reference is None else reference
    encoded = [encode_pair(p, tokenizer, chat) for p in pairs]
    if not encoded:
        raise ValueError("no pairs: sample more replies per prompt (k) or at a higher "
                         "temperature, so some prompts get both a right and a wrong reply")
    first_special = tokenizer.n_ranks if mask_format else None

    def loss_of(batch):
        return preference_loss(policy, reference, [c for c, _ in batch], [r for _, r in batch],
                               beta, nll, first_special)

    history, seconds, _ = fit_examples(policy, encoded, loss_of, steps, batch_size, lr, warmup,
                                       seed, progress, "DPO")
    return {"history": history, "seconds": seconds}


# --- Measures: answers, confidence, forgetting, endings ------------------------------------

def ending(example: Example, reply_ids: list[int], tokenizer, max_new_tokens: int) -> dict:
    """How a greedy reply ends: `stopped` (it said <|eot_id|> within the budget), `formed`
    (it stopped right after one sentence of its kind's form, "It happens in ...."),
    `repeats` (a run of 3 tokens occurs twice in it: tail repetition).
    "The hero is Gus." stopped -> {"stopped": True, "formed": True, "repeats": False}."""
    text = tokenizer.decode(reply_ids).strip()
    form = re.escape(ANSWERS[example.kind]).replace(re.escape("{}"), "[^.]+")
    grams = [tuple(reply_ids[i: i + 3]) for i in range(len(reply_ids) - 2)]
    stopped = len(reply_ids) < max_new_tokens
    return {"stopped": stopped, "formed": stopped and re.fullmatch(form, text) is not None,
            "repeats": len(set(grams)) < len(grams)}


def measure(model, tokenizer, chat, examples: list[Example], story_rows, tbytes,
            max_new_tokens: int = 20) -> dict:
    """One model's row: greedy exact match by kind, bits per answer token (confidence),
    story bits per byte (forgetting), mean reply length in tokens and the share of replies
    that stop, stop in form, repeat (`ending`)."""
    prompts = [chat.encode_dialog_prompt(e.dialog()) for e in examples]
    with in_mode(model, False):
        out = generate(model, prompts, max_new_tokens, stop_tokens=tuple(tokenizer.stop_tokens))
        inputs, targets = make_batch([encode_example(e, tokenizer, chat) for e in examples])
        device = model_device(model)
        with torch.no_grad():
            bits = -token_logps(model, inputs.to(device), targets.to(device)).sum().item() / (
                (targets != IGNORE).sum().item() * math.log(2))
        bpb = evaluate_bpb(model, story_rows, tbytes)["val_bpb"]
    right = [tokenizer.decode(ids).strip() == e.answer for ids, e in zip(out, examples,
                                                                      strict=True)]
    ends = [ending(e, ids, tokenizer, max_new_tokens) for ids, e in zip(out, examples,
                                                                        strict=True)]
    share = {key: round(sum(e[key] for e in ends) / len(ends), 4) for key in ends[0]}
    kinds = sorted({e.kind for e in examples}, key=list(ANSWERS).index)
    return {"by_kind": {k: round(sum(r for r, e in zip(right, examples, strict=True)
                                     if e.kind == k) / sum(e.kind == k for e in examples), 4)
                        for k in kinds},
            "exact": round(sum(right) / len(right), 4), "answer_bits": round(bits, 4),
            "story_bpb": round(bpb, 4),
            "reply_tokens": round(sum(len(o) for o in out) / len(out), 3), **share}
