"""Chapter 07c's post-training round (`make assets`, or `python assets/make_preference.py`):
rejection sampling and DPO ("The Llama 3 Herd of Models", 4.1.3 and 4.1.4) on the story
model's short SFT, measured on the held-out questions of chapter 07. Several minutes on one
CPU thread, too long for the notebook, so made here, deterministically, and loaded there.

1. SFT: the story model fully fine-tuned for SFT_STEPS steps, as notebook 07a does (weak on
   places and things: room to improve).
2. Rejection sampling: K replies at TEMPERATURE to each of the questions about N_PROMPT_STORIES
   training stories; the exact verifier (finetune's expected sentence) keeps one correct
   reply per prompt; SFT goes on RS_STEPS steps on the kept replies. The control: the same
   steps on the gold answers of the same prompts.
3. DPO on on-policy pairs (the model's own correct reply against its own wrong one), Meta's
   recipe (formatting tokens masked, NLL term 0.2, beta 0.1) and the two ablations (no mask;
   no NLL); then the whole round (DPO on pairs sampled from the RS model) and a preference
   round on chapter 07b's unsure LoRA fine-tune (qa-lora: DPO on its adapters).

assets/preference/: models.safetensors (float16: "sft." the start, "dpo." Meta's recipe) and
card.json with every measurement the notebook shows (pass@k by kind, exact match by kind,
bits per answer token, story bits per byte, reply lengths and endings, DPO curves, seconds).
Every model is measured after a round trip through float16, as the notebook loads them."""
from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama3_mini.checkpoint import load_pretrained  # noqa: E402
from llama3_mini.data import encode_documents, pack_documents, token_bytes  # noqa: E402
from llama3_mini.finetune import (  # noqa: E402
    QUESTIONS,
    answer,
    encode_example,
    finetune,
    make_qa,
    split_qa,
)
from llama3_mini.lora import add_lora  # noqa: E402
from llama3_mini.preference import (  # noqa: E402
    META_BETA,
    META_NLL,
    make_pairs,
    measure,
    pass_at_k,
    rejection_sample,
    sample_replies,
    train_dpo,
)
from llama3_mini.stories import make_stories  # noqa: E402
from llama3_mini.tokenizer import ChatFormat  # noqa: E402

N_STORIES, HELD_OUT = 2000, 15  # chapter 07's split: make_qa(2000, seed=1), 15 held out
SFT_STEPS, SFT_LR, BATCH = 100, 1e-3, 16  # notebook 07a's full fine-tune
N_PROMPT_STORIES, K, TEMPERATURE = 50, 16, 1.0  # 200 training prompts, 16 samples each
RS_STEPS, RS_LR = 50, 1e-3
DPO_STEPS, DPO_BATCH, DPO_LR = 40, 8, 5e-4  # Meta: lr 1e-5 (50 times less), section 4.1.4
LORA_DPO_LR = 3e-3  # the adapters' fine-tuning rate (qa-lora's card)
STRESS_STEPS, STRESS_LR = 150, 3e-3  # the mask's ablation pushed until it shows
HELD_K = 16  # samples per held-out question for pass@k


def roundtrip(model):
    """The model as the notebook loads it: weights through float16 and back."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


def by_kind_pass(examples, samples) -> dict:
    """pass@k for k = 1, 2, 4, 8, 16 by kind of question (Chen et al.'s estimator)."""
    out = {}
    for kind in QUESTIONS:
        rows = [sum(r == e.answer for r in s) for e, s in zip(examples, samples, strict=True)
                if e.kind == kind]
        out[kind] = {k: round(sum(pass_at_k(len(samples[0]), c, k) for c in rows) / len(rows), 4)
                     for k in (1, 2, 4, 8, 16)}
    return out


def setup():
    """What every run of this script starts from: the story model, its chat format, the
    held-out questions, the training prompts and validation stories packed in rows."""
    base, tokenizer = load_pretrained("story-model", device="cpu")
    chat = ChatFormat(tokenizer)
    train, held = split_qa(make_qa(N_STORIES, seed=1), n_heldout_stories=HELD_OUT)
    stories = sorted({e.story for e in train})[:N_PROMPT_STORIES]
    prompts = [e for e in train if e.story in set(stories)]
    val_rows = pack_documents(encode_documents([s.text for s in make_stories(24, seed=2)],
                                               tokenizer), 256)
    return base, tokenizer, chat, train, held, prompts, val_rows


def main(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    start_all = time.perf_counter()
    base, tokenizer, chat, train, held, prompts, val_rows = setup()
    tbytes = token_bytes(tokenizer)
    card = {"recipe": {"sft_steps": SFT_STEPS, "sft_lr": SFT_LR, "batch": BATCH,
                       "prompts": len(prompts), "k": K, "temperature": TEMPERATURE,
                       "rs_steps": RS_STEPS, "rs_lr": RS_LR, "dpo_steps": DPO_STEPS,
                       "dpo_batch": DPO_BATCH, "dpo_lr": DPO_LR, "beta": META_BETA,
                       "nll": META_NLL, "lora_dpo_lr": LORA_DPO_LR, "held_k": HELD_K,
                       "torch_threads": threads},
            "rows": {}, "curves": {}, "seconds": {}}

    def record(name, model, seconds=None):
        row = measure(model, tokenizer, chat, held, val_rows, tbytes)
        card["rows"][name] = row
        if seconds is not None:
            card["seconds"][name] = round(seconds, 1)
        print(name, json.dumps(row), flush=True)

    def timed(fn, *args, **kwargs):
        t = time.perf_counter()
        return fn(*args, **kwargs), time.perf_counter() - t

    torch.manual_seed(0)
    sft = copy.deepcopy(base)
    _, s = timed(finetune, sft, [encode_example(e, tokenizer, chat) for e in train],
                 steps=SFT_STEPS, batch_size=BATCH, lr=SFT_LR)
    record("SFT", roundtrip(sft), s)
    held_samples, s = timed(sample_replies, sft, tokenizer, chat, held, HELD_K,
                            temperature=TEMPERATURE, seed=1)
    card["pass_at_k"] = {"SFT": by_kind_pass(held, held_samples)}
    card["seconds"]["held-out samples"] = round(s, 1)
    samples, s = timed(sample_replies, sft, tokenizer, chat, prompts, K,
                       temperature=TEMPERATURE, progress=True)
    card["seconds"]["samples"] = round(s, 1)
    card["train_pass_at_k"] = by_kind_pass(prompts, samples)
    kept = rejection_sample(prompts, samples)
    card["kept"] = {k: sum(e.kind == k for e in kept) for k in QUESTIONS}

    # Rejection sampling: SFT goes on with the verified replies; the control, gold answers.
    for name, data in (("SFT + RS", kept), ("SFT + gold (control)", prompts)):
        torch.manual_seed(0)
        model = copy.deepcopy(sft)
        _, s = timed(finetune, model, [encode_example(e, tokenizer, chat) for e in data],
                     steps=RS_STEPS, batch_size=BATCH, lr=RS_LR, progress=False)
        record(name, roundtrip(model), s)
        if name == "SFT + RS":
            rs = model

    # DPO: Meta's recipe, then each of its two changes taken away.
    pairs = make_pairs(prompts, samples)
    card["pairs"] = {k: sum(p[0].kind == k for p in pairs) for k in QUESTIONS}
    runs = {"SFT + DPO": {}, "SFT + DPO, no mask": {"mask_format": False},
            "SFT + DPO, no NLL": {"nll": 0.0}}
    for name, options in runs.items():
        torch.manual_seed(0)
        model = copy.deepcopy(sft)
        run = train_dpo(model, pairs, tokenizer, chat, steps=DPO_STEPS, batch_size=DPO_BATCH,
                        lr=DPO_LR, **options)
        card["curves"][name] = run["history"]
        record(name, roundtrip(model), run["seconds"])
        if name == "SFT + DPO":
            dpo = model

    # The whole round: DPO on pairs the RS model samples (on-policy for it).
    rs_samples = sample_replies(rs, tokenizer, chat, prompts, K, temperature=TEMPERATURE)
    rs_pairs = make_pairs(prompts, rs_samples)
    card["pairs_rs"] = len(rs_pairs)
    torch.manual_seed(0)
    both = copy.deepcopy(rs)
    run = train_dpo(both, rs_pairs, tokenizer, chat, steps=DPO_STEPS, batch_size=DPO_BATCH,
                    lr=DPO_LR)
    card["curves"]["SFT + RS + DPO"] = run["history"]
    record("SFT + RS + DPO", roundtrip(both), run["seconds"])
    card["pass_at_k"]["SFT + DPO"] = by_kind_pass(held, sample_replies(
        dpo, tokenizer, chat, held, HELD_K, temperature=TEMPERATURE, seed=1))

    # Chapter 07b's LoRA: right but unsure. Does a preference round make it sure?
    lora_card = json.loads((ROOT / "assets" / "qa-lora" / "card.json").read_text())
    from safetensors.torch import load_file
    lora = add_lora(copy.deepcopy(base), lora_card["targets"], rank=lora_card["rank"],
                    alpha=lora_card["alpha"])
    lora.load_state_dict({k: v.float() for k, v in load_file(
        ROOT / "assets" / "qa-lora" / "adapters.safetensors").items()}, strict=False)
    record("qa-lora", lora.eval())
    lora_samples = sample_replies(lora, tokenizer, chat, prompts, K, temperature=TEMPERATURE)
    card["train_pass_at_k_lora"] = by_kind_pass(prompts, lora_samples)
    # At temperature 1 its samples are almost never right (it is unsure), so its greedy reply,
    # verified, is the chosen one: still its own output, at temperature 0.
    greedy = answer(lora, tokenizer, chat, prompts)
    lora_pairs = make_pairs(prompts, [[g] + s for g, s in zip(greedy, lora_samples, strict=True)])
    card["pairs_lora"] = len(lora_pairs)
    torch.manual_seed(0)
    run = train_dpo(lora, lora_pairs, tokenizer, chat, steps=DPO_STEPS, batch_size=DPO_BATCH,
                    lr=LORA_DPO_LR)
    card["curves"]["qa-lora + DPO"] = run["history"]
    record("qa-lora + DPO", roundtrip(lora), run["seconds"])
    card["seconds"]["all"] = round(time.perf_counter() - start_all, 1)
    _save(card, {"sft": sft, "dpo": dpo})
    stress(threads)


def eot_logps(model, tokenizer, chat, dialogs) -> float:
    """Mean log-probability of <|eot_id|> right after each dialog's reply."""
    from llama3_mini.finetune import make_batch
    from llama3_mini.preference import token_logps

    encoded = [encode_example(e, tokenizer, chat) for e in dialogs]
    inputs, targets = make_batch(encoded)
    with torch.no_grad():
        logps = token_logps(model.eval(), inputs, targets)  # (batch, seq)
    last = torch.tensor([len(t) - 2 for t, _ in encoded])  # the target that is <|eot_id|>
    return round(logps[torch.arange(len(encoded)), last].mean().item(), 4)


def stress(threads: int = 1) -> None:
    """The formatting mask's ablation where it can show: DPO without the NLL term (which
    would hold <|eot_id|> up on its own), STRESS_STEPS steps at STRESS_LR, with and without
    the mask, from the stored SFT model on the same pairs. Adds card["stress"]: the endings
    of the greedy held-out replies, and the log-prob of <|eot_id|> after the held-out gold
    answers and after the pairs' rejected replies."""
    import dataclasses

    from safetensors.torch import load_file

    from llama3_mini.model import Transformer

    torch.set_num_threads(threads)
    folder = ROOT / "assets" / "preference"
    card = json.loads((folder / "card.json").read_text())
    base, tokenizer, chat, train, held, prompts, val_rows = setup()
    weights = load_file(folder / "models.safetensors")
    sft = Transformer(base.params)
    sft.load_state_dict({k[4:]: v.float() for k, v in weights.items() if k.startswith("sft.")})
    samples = sample_replies(sft.eval(), tokenizer, chat, prompts, K, temperature=TEMPERATURE,
                             progress=True)  # the same samples as main's: same weights, seed
    pairs = make_pairs(prompts, samples)
    wrong = [dataclasses.replace(e, answer=r) for e, _, r in pairs]
    out = {"steps": STRESS_STEPS, "lr": STRESS_LR, "nll": 0.0, "runs": {}}
    for name, mask in (("SFT", None), ("mask", True), ("no mask", False)):
        model = copy.deepcopy(sft)
        if mask is not None:
            torch.manual_seed(0)
            run = train_dpo(model, pairs, tokenizer, chat, steps=STRESS_STEPS,
                            batch_size=DPO_BATCH, lr=STRESS_LR, nll=0.0, mask_format=mask)
            out["runs"].setdefault("curves", {})[name] = [
                {k: round(v, 4) for k, v in h.items()} for h in run["history"]]
        row = measure(model.eval(), tokenizer, chat, held, val_rows, token_bytes(tokenizer))
        row["eot_after_gold"] = eot_logps(model, tokenizer, chat, held)
        row["eot_after_rejected"] = eot_logps(model, tokenizer, chat, wrong)
        out["runs"][name] = row
        print("stress", name, json.dumps(row), flush=True)
    card["stress"] = out
    (folder / "card.json").write_text(json.dumps(card, indent=1))
    with open(folder / "README.md", "a") as f:
        f.write(f"""
The mask pushed until it shows (card["stress"]): DPO without the NLL term, {STRESS_STEPS} steps
at {STRESS_LR:g}, with and without the formatting mask, from the SFT model above: greedy
held-out replies that stop (with and without the mask): {out['runs']['mask']['stopped']:.0%},
{out['runs']['no mask']['stopped']:.0%}; log-prob of <|eot_id|> after the rejected replies:
{out['runs']['mask']['eot_after_rejected']}, {out['runs']['no mask']['eot_after_rejected']}
(SFT: {out['runs']['SFT']['eot_after_rejected']}).
""")


def _save(card: dict, models: dict) -> None:
    from safetensors.torch import save_file

    out = ROOT / "assets" / "preference"
    work = out.with_name(".make-preference")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    save_file({f"{name}.{k}": v.to(torch.float16).contiguous()
               for name, m in models.items() for k, v in m.state_dict().items()},
              str(work / "models.safetensors"))
    (work / "card.json").write_text(json.dumps(card, indent=1))
    r = card["recipe"]
    rows = "\n".join(f"| {name} | " + " | ".join(f"{row['by_kind'][k]:.0%}" for k in QUESTIONS)
                     + f" | {row['answer_bits']:.2f} | {row['story_bpb']:.3f} | "
                     f"{row['reply_tokens']:.1f} |" for name, row in card["rows"].items())
    (work / "README.md").write_text(f"""# preference: a post-training round on the story model

Made by `make assets` (assets/make_preference.py) in {card['seconds']['all']:.0f} s on
{r['torch_threads']} CPU thread(s). Start: the story model fully fine-tuned {r['sft_steps']}
steps of {r['batch']} dialogs at {r['sft_lr']:g} (notebook 07a). Rejection sampling: {r['k']}
replies at temperature {r['temperature']} to {r['prompts']} training questions, one verified
reply kept per question ({sum(card['kept'].values())} kept), then {r['rs_steps']} more SFT steps
on them (control: the same steps on the gold answers). DPO: {r['dpo_steps']} steps of
{r['dpo_batch']} on-policy pairs at {r['dpo_lr']:g} (Meta: 1e-5), beta {r['beta']}, NLL
{r['nll']} (Meta's, "The Llama 3 Herd of Models" section 4.1.4), formatting tokens masked,
and without each change; LoRA (qa-lora's adapters) at {r['lora_dpo_lr']:g}.
Held-out exact match (chapter 07's 60 questions), bits per answer token, story bits per byte,
mean greedy reply length (tokens):

| model | {' | '.join(QUESTIONS)} | answer bits | story bpb | reply tokens |
| --- | {' | '.join('---' for _ in QUESTIONS)} | --- | --- | --- |
{rows}

models.safetensors (float16): "sft." the start, "dpo." Meta's recipe. Notebook 07c loads them.
""")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    print(json.dumps(card["seconds"]), flush=True)


if __name__ == "__main__":
    main()
