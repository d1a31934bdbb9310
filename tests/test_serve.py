"""`llama3-mini serve`, checked with the official `openai` client (the reference for the
protocol) against a server on a free loopback port: replies equal our greedy `generate` on
the same prompt ids, streamed equals non-streamed, `stop`, `max_tokens`, errors, concurrency."""
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx  # comes with openai
import openai  # the test extra's reference client (the serve extra brings FastAPI, uvicorn)
import pytest
import torch
import uvicorn
from model_support import one_thread  # noqa: F401

from llama3_mini import generate as generate_module
from llama3_mini.checkpoint import load_checkpoint, load_pretrained, save_model
from llama3_mini.cli import main
from llama3_mini.config import ModelArgs
from llama3_mini.finetune import make_qa
from llama3_mini.generate import generate
from llama3_mini.model import Transformer
from llama3_mini.serve import create_app, is_loopback
from llama3_mini.tokenizer import ChatFormat, Tokenizer

MAX_SEQ_LEN = 128
ASK = [{"role": "system", "content": "You answer briefly."},
       {"role": "user", "content": "Who is the hero of the story?"}]
STORY = ("Lily found a red ball in the park. Tom asked where the ball was. "
         "The hero of the story is Lily, and her friend is Tom. ")


@contextmanager
def running(app):
    """The app served by uvicorn in a thread on a free port of 127.0.0.1; stopped after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the port is taken here, so no other process can race us
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def tiny_trained(tokenizer, steps: int = 40):
    """A 2-layer model that has seen a few sentences for 40 steps: its greedy replies are
    short words of them (distinct per prompt, never a special token), not a random model's
    loop over reserved tokens, so that stop strings and concurrent answers are tested on
    text. Still a tiny random-initialised model: it costs well under a second."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                  vocab_size=tokenizer.n_words, multiple_of=32,
                                  max_seq_len=MAX_SEQ_LEN))
    ids = torch.tensor(tokenizer.encode(STORY * 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (8,)).tolist()
        x = torch.stack([ids[i:i + 32] for i in starts])  # (8, 32)
        y = torch.stack([ids[i + 1:i + 33] for i in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve"))


def tiny_checkpoint(folder):
    """(folder, model, tokenizer): a tiny model saved with save_model beside a small
    tokenizer trained here, and loaded back as `serve --checkpoint` loads it."""
    text = " ".join(m["content"] for m in ASK) + " " + STORY * 4
    tokenizer = Tokenizer.train(text, 290, progress=False)
    tokenizer.save(folder / "tok.tiktoken")
    save_model(tiny_trained(tokenizer), folder / "tiny", tokenizer="../tok.tiktoken")
    model, tokenizer, _ = load_checkpoint(folder / "tiny", device="cpu")
    return folder / "tiny", model, tokenizer


@pytest.fixture(scope="module")
def client(tiny):
    _, model, tokenizer = tiny
    with running(create_app(model, tokenizer, "tiny")) as base_url:
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                           timeout=60) as client:
            yield client


def slow_generation(monkeypatch, seconds=0.02, gate=None):
    """Make every reply's generate_steps (under generate.stream_pieces) wait `seconds` per
    token, after `gate` (a threading.Event) is set if given; returns the list that gets one
    entry per token made, so a test sees when generation stops."""
    steps, real = [], generate_module.generate_steps

    def slow_steps(*args, **kwargs):
        for step in real(*args, **kwargs):
            if gate is not None:
                assert gate.wait(timeout=60), "the test never opened the gate"
            steps.append(1)
            time.sleep(seconds)
            yield step

    monkeypatch.setattr(generate_module, "generate_steps", slow_steps)
    return steps


def reference(model, tokenizer, messages, max_tokens, **options):
    """(text, prompt ids, new ids) by our own generate on the Llama 3 chat prompt."""
    ids = ChatFormat(tokenizer).encode_dialog_prompt(messages)
    new = generate(model, [ids], max_tokens, stop_tokens=tuple(tokenizer.stop_tokens),
                   **options)[0]
    return tokenizer.decode(new), ids, new


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "llama3-mini"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_a_reply_equals_greedy_generate_and_counts_its_tokens(client, tiny):
    _, model, tokenizer = tiny
    text, ids, new = reference(model, tokenizer, ASK, 12)
    r = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=12)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.usage.prompt_tokens == len(ids)
    finished = len(new) < 12  # a stop token came before the budget; it counts as generated
    assert r.choices[0].finish_reason == ("stop" if finished else "length")
    assert r.usage.completion_tokens == len(new) + finished
    assert r.usage.total_tokens == len(ids) + r.usage.completion_tokens


def test_a_streamed_reply_equals_the_non_streamed_one(client):
    kwargs = dict(model="tiny", messages=ASK, temperature=0, max_tokens=20)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # it did stream, in pieces
    assert "".join(deltas) == whole.choices[0].message.content
    ends = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert ends == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # include_usage


def test_a_sampled_reply_is_generate_with_the_same_options_and_seed(client, tiny):
    _, model, tokenizer = tiny
    text, _, _ = reference(model, tokenizer, ASK, 10, temperature=0.9, top_p=0.8, seed=7)
    r = client.chat.completions.create(model="tiny", messages=ASK, temperature=0.9, top_p=0.8,
                                       seed=7, max_tokens=10)
    assert r.choices[0].message.content == text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_cuts_the_text_before_the_stop_string(client, tiny, stream):
    _, model, tokenizer = tiny
    text, _, new = reference(model, tokenizer, ASK, 30)
    stop = text[8:12]  # four characters from inside the reply, spanning tokens
    assert len(stop) == 4 and text.index(stop) > 0, f"the tiny model's reply is {text!r}"
    assert not any(stop in tokenizer.decode([t]) for t in new), "stop must span tokens"
    kwargs = dict(model="tiny", messages=ASK, temperature=0, max_tokens=30,
                  stop=["never in it", stop])
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client.chat.completions.create(**kwargs)
        content, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert content == text[:text.index(stop)] and finish == "stop"


def test_max_tokens_ends_with_finish_reason_length(client, tiny):
    _, model, tokenizer = tiny
    text, _, new = reference(model, tokenizer, ASK, 5)
    assert len(new) == 5, "the tiny model must not stop within 5 tokens for this test"
    for key in ("max_tokens", "max_completion_tokens"):
        r = client.chat.completions.create(model="tiny", messages=ASK, temperature=0,
                                           **{key: 5})
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
        assert r.choices[0].message.content == text


@pytest.mark.parametrize("change, param, says", [
    (dict(temperature=-0.5), "temperature", "temperature must be a number in [0, 2]"),
    (dict(top_p=0), "top_p", "top_p must be a number in (0, 1]"),
    (dict(top_p=1.5), "top_p", "top_p must be a number in (0, 1]"),
    (dict(n=2), "n", "n must be 1 here"),
    (dict(messages=[]), "messages", "messages must be a non-empty list"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role",
     "messages[0].role is 'wizard'"),
    (dict(messages=[{"role": "user"}]), "messages[0].content", "must be a string"),
    (dict(max_tokens=0), "max_tokens", "max_tokens must be an integer of at least 1"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop", "a list of at most 4"),
    (dict(seed=2**70), "seed", "seed must be an integer from"),
    (dict(stream="yes"), "stream", "stream must be true or false"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools",
     "tools is not supported"),
])
def test_a_bad_request_is_a_400_naming_the_parameter(client, change, param, says):
    kwargs = {"model": "tiny", "messages": ASK, "max_tokens": 3, **change}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kwargs)
    assert e.value.status_code == 400 and e.value.param == param
    assert e.value.type == "invalid_request_error" and says in e.value.message


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert e.value.code == "model_not_found" and "`tiny`" in e.value.message


def test_a_prompt_longer_than_the_window_is_refused_not_trimmed(client, tiny):
    _, _, tokenizer = tiny
    long = [{"role": "user", "content": "Lily played in the park. " * 40}]
    n_ids = len(ChatFormat(tokenizer).encode_dialog_prompt(long))
    assert n_ids > MAX_SEQ_LEN
    for max_tokens in (None, 4):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=long, max_tokens=max_tokens)
        assert e.value.code == "context_length_exceeded"
        assert f"maximum context length is {MAX_SEQ_LEN} tokens" in e.value.message
        assert f"{n_ids} in the messages" in e.value.message or \
            f"{n_ids} tokens in the messages" in e.value.message
    history = [*long[:1], {"role": "assistant", "content": "Yes."}, *ASK[1:]]
    with pytest.raises(openai.BadRequestError, match="context length"):  # not the chat's trim
        client.chat.completions.create(model="tiny", messages=history, max_tokens=4)
    fits = [{"role": "user", "content": "Lily played."}]  # fits alone, not with the budget
    n_fits = len(ChatFormat(tokenizer).encode_dialog_prompt(fits))
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model="tiny", messages=fits,
                                       max_tokens=MAX_SEQ_LEN - n_fits + 1)


def test_malformed_json_and_unknown_routes_get_openai_shaped_errors(client):
    base = str(client.base_url).rstrip("/")
    r = httpx.post(f"{base}/chat/completions", content=b'{"model": "tiny", "messages": [',
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400
    assert "could not parse the JSON body" in r.json()["error"]["message"]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{base}/completions", timeout=30)
    assert r.status_code in (404, 405) and "error" in r.json()


def test_concurrent_requests_each_get_their_own_answer(client, tiny):
    """Six requests at once, streamed and not, on three prompts: the single worker answers
    each one as if it were alone."""
    _, model, tokenizer = tiny
    asks = [[{"role": "user", "content": c}] for c in ("Lily", "Tom found a ball.", "park")]
    want = [reference(model, tokenizer, m, 15)[0] for m in asks]
    assert len(set(want)) == 3, f"the prompts must have different replies: {want}"

    def ask(i):
        kwargs = dict(model="tiny", messages=asks[i % 3], temperature=0, max_tokens=15)
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(**kwargs, stream=True))
        return client.chat.completions.create(**kwargs).choices[0].message.content

    with ThreadPoolExecutor(max_workers=6) as pool:
        got = [f.result(timeout=120) for f in [pool.submit(ask, i) for i in range(6)]]
    assert got == [want[i % 3] for i in range(6)]


def test_a_client_that_leaves_mid_stream_frees_the_worker(client, tiny, monkeypatch):
    """Closing a stream stops its generation (the worker would otherwise go on for every
    token of max_tokens before serving anyone else); the next request is answered."""
    _, model, tokenizer = tiny
    steps, short = slow_generation(monkeypatch), [{"role": "user", "content": "Lily"}]
    stream = client.chat.completions.create(model="tiny", messages=short, temperature=0,
                                            max_tokens=100, stream=True, stop="never in it")
    next(iter(stream))
    stream.close()
    monkeypatch.undo()
    text, _, new = reference(model, tokenizer, ASK, 6)
    r = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=6)
    assert r.choices[0].message.content == text
    assert len(reference(model, tokenizer, short, 100)[2]) > 50  # it would have gone on
    assert len(steps) < 50, f"the stream went on for {len(steps)} tokens after the client left"


def test_the_shipped_qa_model_answers_through_the_openai_client():
    """The real qa-full fine-tune, on a story it never saw: the served answer is our greedy
    generate's, and it names the hero."""
    model, tokenizer = load_pretrained("qa-full", device="cpu")
    example = make_qa(1, seed=123)[0]
    text, _, _ = reference(model, tokenizer, example.dialog(), 20)
    with running(create_app(model, tokenizer, "qa-full")) as base_url:
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                           timeout=60) as c:
            r = c.chat.completions.create(model="qa-full", messages=example.dialog(),
                                          temperature=0, max_tokens=20)
    assert r.choices[0].message.content == text == example.answer
    assert r.choices[0].finish_reason == "stop"  # it closed its turn with <|eot_id|>


def test_is_loopback():
    assert [is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "::", "example.com")] == [False] * 4


def test_the_cli_serves_on_the_loopback_and_warns_for_any_other_host(tiny, monkeypatch, capsys):
    folder, _, _ = tiny
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    assert main(["serve", "--checkpoint", str(folder), "--port", "8123"]) == 0
    out, err = capsys.readouterr()
    assert calls[-1][1]["host"] == "127.0.0.1" and calls[-1][1]["port"] == 8123
    assert "serving tiny at http://127.0.0.1:8123/v1" in out and "warning" not in err
    assert main(["serve", "--checkpoint", str(folder), "--host", "0.0.0.0"]) == 0
    assert calls[-1][1]["host"] == "0.0.0.0"
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err
