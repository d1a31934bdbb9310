"""The chat: prompts in Llama 3's chat format as transformers' tokenizer builds them from the
exported chat template, replies equal to greedy generation (ours and transformers'), the stop
at <|eot_id|>, the oldest turns dropped when the window fills, and the terminal loop of
`llama3-mini chat` driven by a scripted stdin (/reset, /system, /exit, end of input)."""
import html
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")  # a test dependency: always installed by make

from model_support import one_thread  # noqa: E402, F401
from test_export import _ids  # noqa: E402

from llama3_mini import chat as chat_module  # noqa: E402
from llama3_mini import generate as generate_module  # noqa: E402
from llama3_mini import hub  # noqa: E402
from llama3_mini.chat import Conversation, dialog_prompt_ids, run_chat  # noqa: E402
from llama3_mini.checkpoint import load_pretrained  # noqa: E402
from llama3_mini.cli import main  # noqa: E402
from llama3_mini.finetune import make_qa  # noqa: E402
from llama3_mini.generate import generate  # noqa: E402
from llama3_mini.tokenizer import ChatFormat  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QA = make_qa(4, seed=11)  # stories the fine-tune never saw (it trained on seed 1)
QUESTIONS = [f"{e.story}\n\n{e.question}" for e in QA]  # as the fine-tune's dialogs
LINES = [f"{e.story} {e.question}" for e in QA]  # as typed in a terminal: one line each


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    """The course's QA fine-tune (qa-full), and the same model and tokenizer exported to a
    Hugging Face folder, loaded by transformers: the independent reference."""
    model, tokenizer = load_pretrained("qa-full", device="cpu")
    folder = tmp_path_factory.mktemp("qa-hf")
    hub.save_hf(model, folder, tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    return model, tokenizer, hf_tok, hf_model


def template_ids(hf_tok, messages):
    """transformers' prompt ids for a dialog: its chat template, with the generation prompt."""
    return _ids(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


@pytest.fixture
def prompts_seen(monkeypatch):
    """The prompt ids each reply was generated from, recorded on the way to stream_pieces."""
    seen = []
    real = chat_module.stream_pieces

    def spy(model, tokenizer, prompt_ids, *args, **kwargs):
        seen.append(list(prompt_ids))
        return real(model, tokenizer, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(chat_module, "stream_pieces", spy)
    return seen


def test_a_reply_is_greedy_generation_on_the_template_prompt_and_stops_at_eot(qa):
    model, tokenizer, hf_tok, hf_model = qa
    chat = Conversation(model, tokenizer, max_new_tokens=30)
    user = {"role": "user", "content": QUESTIONS[0]}
    ids = template_ids(hf_tok, [user])
    assert chat.prompt_ids(QUESTIONS[0]) == (ids, 0)
    pieces = list(chat.send(QUESTIONS[0]))
    expected = generate(model, [ids], 30, stop_tokens=tokenizer.stop_tokens)[0]
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False,
                            eos_token_id=sorted(tokenizer.stop_tokens),
                            pad_token_id=tokenizer.eos_id)[0, len(ids):].tolist()
    assert out[-1] == tokenizer.eot_id and out[:-1] == expected == chat.reply_ids
    assert "".join(pieces) == hf_tok.decode(out[:-1]) == QA[0].answer  # the right answer, too
    assert len(pieces) == len(expected) and chat.finish_reason == "stop"  # a piece per token
    assert chat.messages == [user, {"role": "assistant", "content": QA[0].answer}]
    # the next prompt carries the whole history, as transformers' template writes it
    second = {"role": "user", "content": QA[1].question}
    assert chat.prompt_ids(QA[1].question)[0] == template_ids(hf_tok, chat.messages + [second])


def test_sampling_settings_reach_the_sampler(qa):
    model, tokenizer, hf_tok, _ = qa
    chat = Conversation(model, tokenizer, temperature=4.0, top_p=0.95, max_new_tokens=12,
                        seed=3)
    ids = template_ids(hf_tok, [{"role": "user", "content": QUESTIONS[1]}])
    chat.reply(QUESTIONS[1])

    def sampled(seed):
        return generate(model, [ids], 12, temperature=4.0, top_p=0.95, seed=seed,
                        stop_tokens=tokenizer.stop_tokens)[0]

    assert chat.reply_ids == sampled(3)
    assert any(chat.reply_ids != sampled(seed) for seed in range(4, 8))  # the seed was used
    with pytest.raises(ValueError, match="top_p"):
        Conversation(model, tokenizer, top_p=1.5).send("hi")


def test_the_terminal_loop_streams_resets_and_sets_the_system_prompt(qa, prompts_seen):
    model, tokenizer, hf_tok, _ = qa
    chat = Conversation(model, tokenizer, max_new_tokens=30)
    script = "\n".join([LINES[0], "/system Answer in one sentence.", LINES[1], "/reset",
                        LINES[2], "/exit", "never read"]) + "\n"
    out = io.StringIO()
    run_chat(chat, io.StringIO(script), out)
    assert len(prompts_seen) == 3  # /exit: the line after it was never sent
    replies = [tokenizer.decode(generate(model, [ids], 30, stop_tokens=tokenizer.stop_tokens)[0])
               for ids in prompts_seen]  # greedy generation on the prompts the chat used
    q = [{"role": "user", "content": text} for text in LINES]
    a = [{"role": "assistant", "content": text} for text in replies]
    system = {"role": "system", "content": "Answer in one sentence."}
    assert prompts_seen[0] == template_ids(hf_tok, [q[0]])
    assert prompts_seen[1] == template_ids(hf_tok, [system, q[0], a[0], q[1]])  # /system
    assert prompts_seen[2] == template_ids(hf_tok, [system, q[2]])  # /reset: no history
    assert chat.messages == [q[2], a[2]]
    text = out.getvalue()
    assert all(f"model> {reply}\n" in text for reply in replies)  # streamed to the terminal
    assert replies[0] == QA[0].answer and replies[2] == QA[2].answer  # and right
    assert "[conversation reset]" in text and "'Answer in one sentence.'" in text
    assert "dropped" not in text and "stopped at" not in text


def test_the_oldest_turns_are_dropped_when_the_window_fills(qa, prompts_seen):
    qa_model, tokenizer, hf_tok, _ = qa
    model = type(qa_model)(qa_model.params.replace(max_seq_len=200)).eval()  # a small window
    model.load_state_dict(qa_model.state_dict())
    chat = Conversation(model, tokenizer, system="Be kind.", max_new_tokens=24)
    out = io.StringIO()
    run_chat(chat, io.StringIO("\n".join(LINES) + "\n"), out)
    system = {"role": "system", "content": "Be kind."}
    history, n_dropped = [], 0  # the whole conversation: the reference trims it itself
    for line, ids in zip(LINES, prompts_seen, strict=True):
        history.append({"role": "user", "content": line})
        # transformers' ids of the dialog less its oldest messages (never the system prompt,
        # never a reply without its question), the fewest dropped that fit 200 - 24 tokens
        dropped = next(k for k in range(n_dropped, len(history), 2)
                       if len(template_ids(hf_tok, [system] + history[k:])) + 24 <= 200)
        assert ids == template_ids(hf_tok, [system] + history[dropped:])
        if dropped > n_dropped:
            assert f"[dropped the {dropped - n_dropped} oldest message(s)" in out.getvalue()
        n_dropped = dropped
        reply = generate(model, [ids], 24, stop_tokens=tokenizer.stop_tokens)[0]
        history.append({"role": "assistant", "content": tokenizer.decode(reply)})
    assert n_dropped >= 4, "the window never filled: make the script longer"
    assert out.getvalue().count("[dropped the") == n_dropped // 2
    assert chat.messages == history[n_dropped:] and chat.finish_reason == "stop"


def test_dialog_prompt_ids_matches_the_template_and_refuses_what_cannot_fit(qa):
    _, tokenizer, hf_tok, _ = qa
    fmt = ChatFormat(tokenizer)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A b c."},
              {"role": "assistant", "content": "D e."}, {"role": "user", "content": "F?"}]
    full = template_ids(hf_tok, dialog)
    assert dialog_prompt_ids(fmt, dialog, len(full) + 4, 4) == (full, 0)
    # one token short: the first exchange goes, never the system prompt
    ids, n = dialog_prompt_ids(fmt, dialog, len(full) + 3, 4)
    assert (ids, n) == (template_ids(hf_tok, [dialog[0], dialog[3]]), 2)
    with pytest.raises(ValueError, match="max_seq_len 8"):
        dialog_prompt_ids(fmt, dialog, 8, 4)
    with pytest.raises(ValueError, match="role"):
        dialog_prompt_ids(fmt, [{"content": "no role"}], 100, 4)


def test_a_character_split_across_tokens_streams_whole(qa, monkeypatch):
    """The tokens of a llama emoji are single bytes here: no piece may hold half of it."""
    model, tokenizer, _, _ = qa
    text = "A llama 🦙, café!"
    script = tokenizer.encode(text) + [tokenizer.eot_id, 5, 6]
    assert len(tokenizer.encode("🦙")) > 1  # the emoji's four bytes span several tokens

    def scripted(model, prompts, max_new_tokens, **_):
        for t in script[:max_new_tokens]:
            yield torch.tensor([t]), None, None

    monkeypatch.setattr(generate_module, "generate_steps", scripted)
    chat = Conversation(model, tokenizer)
    pieces = list(chat.send("Say it."))
    assert "".join(pieces) == text and "🦙" in pieces and "\ufffd" not in "".join(pieces)
    assert chat.reply_ids == script[:-3] and chat.finish_reason == "stop"


def test_the_chat_command_with_a_scripted_stdin(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{LINES[3]}\n"))  # then end of input
    assert main(["chat", "--max-new-tokens", "24", "--device", "cpu"]) == 0  # qa-full
    assert f"model> {QA[3].answer}\n" in capsys.readouterr().out


@pytest.mark.slow
def test_the_chat_command_in_a_terminal_process():
    """`python -m llama3_mini chat` as a user runs it, stdin piped: replies, then /exit."""
    story = QA[2].story.replace("\n", " ")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "llama3_mini", "chat", "--device", "cpu"],
                          input=f"{story} {QA[2].question}\n/exit\n", capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"model> {QA[2].answer}\n" in done.stdout


def test_the_notebook_widget_streams_the_greedy_reply_only_when_sent(qa, prompts_seen):
    from llama3_mini.chat_widget import chat_widget

    model, tokenizer, hf_tok, _ = qa
    w = chat_widget(model, tokenizer, message=QUESTIONS[0], max_new_tokens=30)
    assert prompts_seen == [] and "No messages yet" in w.transcript.value  # nothing ran
    shown = []
    w.transcript.observe(lambda change: shown.append(change["new"]), names="value")
    w.controls["send"].click()  # what the button does in the page
    user = {"role": "user", "content": QUESTIONS[0]}
    assert prompts_seen == [template_ids(hf_tok, [user])]
    expected = tokenizer.decode(generate(model, [prompts_seen[0]], 30,
                                         stop_tokens=tokenizer.stop_tokens)[0])
    assert w.result["reply"] == expected == QA[0].answer and w.controls["message"].value == ""
    n = len(tokenizer.encode(expected))
    assert len(shown) >= n  # redrawn as the tokens came, the reply growing each time
    assert f"{html.escape(expected)}</span></div>" in w.transcript.value
    assert f"{w.result['tokens']} tokens in" in w.readout.value and w.result["tokens"] == n
    w.controls["system"].value = "Be brief."
    assert w.conversation.prompt_ids("Hi")[0] == template_ids(
        hf_tok, [{"role": "system", "content": "Be brief."}, user,
                 {"role": "assistant", "content": expected}, {"role": "user", "content": "Hi"}])
    w.controls["reset"].click()
    assert w.conversation.messages == [] and expected not in w.transcript.value
    assert len(prompts_seen) == 1  # neither the system box nor reset generated anything
