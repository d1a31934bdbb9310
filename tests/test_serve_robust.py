"""`llama3-mini serve` under load and bad input, seen through the official `openai` client
(the reference for the protocol) and raw HTTP: any valid order of messages is answered and a
400 comes only when the prompt truly does not fit; past the queue a 429 with Retry-After; a
client that leaves stops its reply's generation; a failure is a 500 that reveals nothing and
is logged; hostile JSON never gets a 500 or a hung server."""
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_support import one_thread  # noqa: F401
from test_serve import ASK, MAX_SEQ_LEN, reference, running, slow_generation, tiny_checkpoint

from llama3_mini import generate as generate_module
from llama3_mini.serve import create_app
from llama3_mini.tokenizer import ChatFormat

SHORT = [{"role": "user", "content": "Lily"}]  # the tiny model goes on for > 50 tokens here
LLAMA_ROLE = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(app, openai client, model, tokenizer): test_serve's tiny model behind a server with
    the default queue."""
    _, model, tokenizer = tiny_checkpoint(tmp_path_factory.mktemp("serve-robust"))
    app = create_app(model, tokenizer, "tiny")
    with running(app) as base_url:
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                           timeout=60) as client:
            yield app, client, model, tokenizer


def idle(app, seconds=30):
    """Wait until the app's worker has no reply admitted; False if it never gets there."""
    deadline = time.monotonic() + seconds
    while app.state.worker.admitted and time.monotonic() < deadline:
        time.sleep(0.01)
    return app.state.worker.admitted == 0


def in_llama_roles(messages):
    return [{"role": LLAMA_ROLE[m["role"]], "content": m["content"]} for m in messages]


def test_a_conversation_that_starts_with_an_assistant_greeting_is_answered(served):
    _, client, model, tokenizer = served
    dialog = [{"role": "assistant", "content": "Hello! Ask me about the story."}, ASK[1]]
    text, ids, _ = reference(model, tokenizer, dialog, 12)
    r = client.chat.completions.create(model="tiny", messages=dialog, temperature=0,
                                       max_tokens=12)
    assert r.choices[0].message.content == text and r.usage.prompt_tokens == len(ids)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(roles=st.lists(st.sampled_from(list(LLAMA_ROLE)), min_size=1, max_size=5),
       words=st.lists(st.integers(0, 60), min_size=5, max_size=5), slack=st.integers(-2, 2))
def test_any_order_of_messages_is_answered_unless_it_truly_does_not_fit(served, roles, words,
                                                                         slack):
    """Messages in any order of the four roles: the reply is generated from the whole
    dialog's prompt (the tool's message under Llama 3.1's ipython role), and max_tokens a
    token or two either side of the room left is answered exactly when it fits."""
    _, client, model, tokenizer = served
    messages = [{"role": r, "content": "Tom found a ball. " * (n // 4) + "Lily" * (n % 4)}
                for r, n in zip(roles, words, strict=False)]
    ids = ChatFormat(tokenizer).encode_dialog_prompt(in_llama_roles(messages))
    max_tokens = max(1, min(MAX_SEQ_LEN - len(ids) + slack, 3))
    kwargs = dict(model="tiny", messages=messages, temperature=0, max_tokens=max_tokens)
    if len(ids) + max_tokens > MAX_SEQ_LEN:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**kwargs)
        assert e.value.code == "context_length_exceeded" and f"{len(ids)} in" in e.value.message
    else:
        r = client.chat.completions.create(**kwargs)
        assert r.usage.prompt_tokens == len(ids)
        assert r.choices[0].message.content == reference(
            model, tokenizer, in_llama_roles(messages), max_tokens)[0]


def test_past_the_queue_a_request_gets_429_with_retry_after(served, monkeypatch):
    """One reply held in generation, one waiting (max_queue=1): a third request, streamed or
    not, is refused at once in OpenAI's shape; the two admitted are answered in full."""
    _, _, model, tokenizer = served
    text = reference(model, tokenizer, ASK, 6)[0]
    gate = threading.Event()
    slow_generation(monkeypatch, 0.0, gate)
    app = create_app(model, tokenizer, "tiny", max_queue=1)
    kwargs = dict(model="tiny", messages=ASK, temperature=0, max_tokens=6)
    with running(app) as base_url, openai.OpenAI(base_url=base_url, api_key="unused",
                                                 max_retries=0, timeout=60) as c:
        with ThreadPoolExecutor(max_workers=2) as pool:
            first = pool.submit(lambda: c.chat.completions.create(**kwargs))
            second = pool.submit(lambda: "".join(
                k.choices[0].delta.content or "" for k in
                c.chat.completions.create(**kwargs, stream=True)))
            deadline = time.monotonic() + 30
            while app.state.worker.admitted < 2:
                assert time.monotonic() < deadline, "the two requests never got admitted"
                time.sleep(0.01)
            refused = []
            for stream in (False, True):
                with pytest.raises(openai.RateLimitError) as e:
                    c.chat.completions.create(**kwargs, stream=stream)
                refused.append(e.value)
            gate.set()
            assert first.result(timeout=60).choices[0].message.content == text
            assert second.result(timeout=60) == text
        for e in refused:
            assert e.status_code == 429 and e.code == "rate_limit_exceeded"
            assert set(e.body) == {"message", "type", "param", "code"}
            assert int(e.response.headers["retry-after"]) >= 1
            assert "at most 1" in e.message and "retry after" in e.message
        r = c.chat.completions.create(**kwargs)  # the queue has drained: answered again
        assert r.choices[0].message.content == text


def test_a_client_that_leaves_before_a_whole_reply_stops_its_generation(served, monkeypatch):
    app, client, model, tokenizer = served
    assert len(reference(model, tokenizer, SHORT, 100)[2]) > 50  # it would go on that long
    steps = slow_generation(monkeypatch, 0.03)
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).chat.completions.create(
            model="tiny", messages=SHORT, temperature=0, max_tokens=100, stop="never in it")
    assert idle(app), "the worker is still busy with the reply nobody waits for"
    assert len(steps) < 50, f"{len(steps)} tokens were made after the client left"


@pytest.mark.parametrize("stream", [False, True])
def test_a_failure_is_a_500_that_reveals_nothing_and_is_logged(served, monkeypatch, caplog,
                                                               stream):
    app, client, _, _ = served
    secret = "RuntimeError at /srv/secret/weights.pt: tensor(1.5)"

    def broken(*args, **kwargs):
        raise RuntimeError(secret)
        yield  # a generator, as generate_steps is

    monkeypatch.setattr(generate_module, "generate_steps", broken)
    caplog.set_level(logging.ERROR, logger="llama3_mini.serve")
    kwargs = dict(model="tiny", messages=ASK, max_tokens=3)
    with pytest.raises(openai.APIError) as e:
        if stream:
            list(client.chat.completions.create(**kwargs, stream=True))
        else:
            client.chat.completions.create(**kwargs)
    if not stream:
        assert isinstance(e.value, openai.InternalServerError) and e.value.status_code == 500
    message = e.value.message
    assert not any(s in message for s in ("secret", "RuntimeError", "tensor", "Traceback"))
    ref = re.search(r"reference ([0-9a-f]{12})", message).group(1)
    logged = [r for r in caplog.records if ref in r.getMessage()]
    assert logged and secret in logging.Formatter().formatException(logged[0].exc_info)
    monkeypatch.undo()
    assert idle(app)
    assert client.chat.completions.create(**kwargs).choices[0].finish_reason  # still serving


# --- hostile bodies -------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**40, 10**40) | st.floats()
    | st.text(max_size=12),  # any code point, lone surrogates included
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8)
FIELDS = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
          "stream", "stream_options", "tools", "logprobs", "response_format"]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from([*LLAMA_ROLE, "wizard"]) | JSON,
                                 "content": st.text(max_size=30) | JSON})
BODY = st.one_of(
    JSON,
    st.dictionaries(st.sampled_from(["model", "messages", *FIELDS]), JSON, max_size=4),
    st.fixed_dictionaries({"model": st.just("tiny") | JSON,
                           "messages": st.lists(MESSAGE, min_size=1, max_size=3) | JSON},
                          optional={f: JSON | st.integers(1, 4) for f in FIELDS}))
RAW = [b"[" * 100_000, b'{"model": "tiny", "messages": ' + b"[" * 5_000, b"9" * 5_000,
       b'{"model": "tiny", "messages": [], "max_tokens": 1e999}', b"\xff\xfe{}", b"",
       b'{"model": "\\ud800", "messages": [{"role": "user", "content": "\\udfff"}]}',
       b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"a" * 300_000 + b'"}]}']


def post(client, content: bytes) -> httpx.Response:
    """POST a body as it is; a hung server fails the test through the timeout."""
    url = f"{str(client.base_url).rstrip('/')}/chat/completions"
    r = httpx.post(url, content=content, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code != 500 and r.status_code in (200, 400, 404, 413), (r.status_code,
                                                                             r.text[:300])
    if r.status_code == 200:
        assert r.text.endswith("data: [DONE]\n\n") or r.json()["object"] == "chat.completion"
    else:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    return r


@pytest.mark.parametrize("content", RAW, ids=range(len(RAW)))
def test_hostile_bytes_get_an_openai_error_not_a_500(served, content):
    post(served[1], content)


def any_json_body_gets_a_reply_or_an_openai_error_never_a_500(served, body):
    post(served[1], json.dumps(body).encode())


# 25 bodies in make test-fast (about 2 s); 150 more in make test (about 10 s)
test_any_json_body_gets_a_reply_or_an_openai_error_never_a_500 = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])(
    given(body=BODY)(any_json_body_gets_a_reply_or_an_openai_error_never_a_500))
test_many_json_bodies_get_a_reply_or_an_openai_error_never_a_500 = pytest.mark.slow(settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])(
    given(body=BODY)(any_json_body_gets_a_reply_or_an_openai_error_never_a_500)))
