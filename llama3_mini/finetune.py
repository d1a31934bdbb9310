"""Supervised fine-tuning (SFT) for chat: an instruction dataset from the story grammar,
loss on the assistant's tokens only, the training loop, and exact-match evaluation.

Every story's choices are recoverable from its text (stories.py), so each question about a
story has exactly one right answer: who the hero is, where the story happens, what the
hero had, who the friend is. A model's answer is then checked by string equality."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .model import in_mode, model_device
from .stories import make_stories, story_answers, story_opening
from .train import TrainConfig, lr_at, make_optimizer

IGNORE = -100  # cross_entropy's ignore_index: a target that adds nothing to the loss

QUESTIONS = {
    "hero": "Who is the hero of the story?",
    "place": "Where does the story happen?",
    "thing": "What thing is the story about?",
    "friend": "Who is the hero's friend?",
}
# Answers are short sentences. The fact in them is spelled as in the story (" Zoe", with
# its space, is one token both there and here), so the model can copy it from the prompt.
ANSWERS = {"hero": "The hero is {}.", "place": "It happens in {}.",
           "thing": "It is about {}.", "friend": "The friend is {}."}


@dataclass
class Example:
    story: str
    kind: str  # a key of QUESTIONS
    question: str
    answer: str  # the reply to learn, a sentence (ANSWERS)
    fact: str  # what it states: "Zoe", "a cold pond", "a white doll"

    def dialog(self) -> list[dict]:
        return [{"role": "user", "content": f"{self.story}\n\n{self.question}"}]


def make_qa(n_stories: int, seed: int = 1, kinds=tuple(QUESTIONS),
            whole: bool = False) -> list[Example]:
    """Every question kind about each of n_stories fresh stories (seed 1: not the stories
    the course's model was pretrained on, which use seed 0). The story is its opening
    (`story_opening`) unless whole=True."""
    out = []
    for story in make_stories(n_stories, seed):
        answers = story_answers(story)
        text = story.text if whole else story_opening(story)
        out += [Example(text, k, QUESTIONS[k], ANSWERS[k].format(answers[k]), answers[k])
                for k in kinds]
    return out


def split_qa(examples: list[Example], n_heldout_stories: int, seed: int = 0):
    """(train, held-out), split by story so no held-out story is ever seen in training."""
    stories = sorted({e.story for e in examples})
    random.Random(seed).shuffle(stories)
    held = set(stories[:n_heldout_stories])
    return [e for e in examples if e.story not in held], [e for e in examples if e.story in held]


def loss_mask(n_prompt: int, n_total: int) -> torch.Tensor:
    """Which next-token targets count in the loss, for a sequence of n_total tokens whose
    first n_prompt are the prompt: (n_total - 1,) booleans. Target i is token i + 1, so the
    targets that count are the reply's tokens, positions n_prompt - 1 onwards."""
    if not 0 < n_prompt <= n_total:
        raise ValueError(f"need 0 < n_prompt ({n_prompt}) <= n_total ({n_total})")
    return torch.arange(1, n_total) >= n_prompt


def encode_example(example: Example, tokenizer, chat) -> tuple[list[int], int]:
    """(tokens, n_prompt): the chat prompt (ending in an open assistant header), then the
    answer and <|eot_id|>, which the model must learn to say to stop."""
    prompt = chat.encode_dialog_prompt(example.dialog())
    reply = tokenizer.encode(example.answer, bos=False, eos=False) + [tokenizer.eot_id]
    return prompt + reply, len(prompt)


def make_batch(encoded: list[tuple[list[int], int]], pad_id: int = 0):
    """Right-padded inputs and targets, (batch, longest - 1) each; targets are IGNORE on
    the prompt and the padding."""
    longest = max(len(t) for t, _ in encoded)
    inputs = torch.full((len(encoded), longest - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(encoded), longest - 1), IGNORE, dtype=torch.long)
    for b, (tokens, n_prompt) in enumerate(encoded):
        t = torch.tensor(tokens)
        inputs[b, : len(t) - 1] = t[:-1]
        keep = loss_mask(n_prompt, len(t))
        targets[b, : len(t) - 1] = torch.where(keep, t[1:], IGNORE)
    return inputs, targets


def sft_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE (the answers)."""
    logits = model(inputs)  # (batch, seq, vocab)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def fit_examples(model, examples: list, loss_of, steps: int, batch_size: int, lr: float,
                 warmup: int, seed: int, progress: bool = True, desc: str = "fine-tuning"):
    """The loop that `finetune` and `preference.train_dpo` share: `steps` random batches of
    `examples` (at most batch_size each), `loss_of(batch) -> (loss, record)`, training whatever
    parameters of the model require grad with the Trainer's AdamW (`make_optimizer`, without
    weight decay: it would pull the pretrained weights towards zero) and schedule (`lr_at`:
    `warmup` steps up to `lr`, then a cosine down to lr / 10), gradients clipped at norm 1.
    Returns (each step's record, the seconds taken, the number of trainable parameters)."""
    with in_mode(model, True):  # train mode for the loop, the caller's mode after it
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no parameter requires grad: nothing to fine-tune")
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, min_lr=lr / 10,
                          warmup_steps=warmup, weight_decay=0.0, seed=seed)
        opt = make_optimizer(model, cfg)
        rng, records, start = random.Random(seed), [], time.perf_counter()
        for step in tqdm(range(steps), disable=not progress, desc=desc):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr)
            loss, record = loss_of(rng.sample(examples, min(batch_size, len(examples))))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            records.append(record)
    return records, time.perf_counter() - start, sum(p.numel() for p in params)


def finetune(model, encoded: list[tuple[list[int], int]], steps: int = 100,
             batch_size: int = 8, lr: float = 1e-3, warmup: int = 10, seed: int = 0,
             device=None, progress: bool = True) -> dict:
    """Supervised fine-tuning on random batches of encoded examples, the loss on the
    replies alone (`sft_loss`), in `fit_examples`' loop: every parameter for full
    fine-tuning, the adapters alone after `add_lora`. Returns the losses, the seconds taken
    and the number of trainable parameters."""
    device = model_device(model, device)  # the model's own: it is never moved

    def loss_of(batch):
        inputs, targets = make_batch(batch)
        loss = sft_loss(model, inputs.to(device), targets.to(device))
        return loss, loss.item()

    losses, seconds, trainable = fit_examples(model, encoded, loss_of, steps, batch_size, lr,
                                              warmup, seed, progress)
    return {"losses": losses, "seconds": seconds, "trainable": trainable}


def answer(model, tokenizer, chat, examples: list[Example], max_new_tokens: int = 20,
           batch_size: int = 32) -> list[str]:
    """The model's greedy answers, generation stopping at <|eot_id|>."""
    from .generate import generate

    replies = []
    for i in range(0, len(examples), batch_size):
        prompts = [chat.encode_dialog_prompt(e.dialog()) for e in examples[i: i + batch_size]]
        out = generate(model, prompts, max_new_tokens, stop_tokens=tuple(tokenizer.stop_tokens))
        replies += [tokenizer.decode(ids).strip() for ids in out]
    return replies


def exact_match(model, tokenizer, chat, examples: list[Example], **kwargs) -> float:
    """Share of examples answered exactly right."""
    replies = answer(model, tokenizer, chat, examples, **kwargs)
    return sum(r == e.answer for r, e in zip(replies, examples, strict=True)) / len(examples)
