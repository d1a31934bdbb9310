"""Llama 3.1's special tokens, stop tokens and chat format (tool calls, tool results, the
ipython role) against Meta's own code, run here: the `Tokenizer` and `ChatFormat` of
meta-llama/llama-models (PyPI `llama-models`, installed by `make setup` with --no-deps), on
Meta's tokenizer.model and on a vocabulary we train."""
import importlib.util
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama3_mini.chat_format import BUILTIN_TOOLS, CODE_TOOL, ChatFormat, tool_call_text
from llama3_mini.data import sample_text
from llama3_mini.tokenizer import Tokenizer

HINT = "pip install --no-deps llama-models==0.3.0 (make setup does)"


def _meta_modules():
    if importlib.util.find_spec("llama_models") is None:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"Meta's llama-models is not installed: {HINT} (CI must run these)")
        pytest.skip(f"Meta's llama-models is not installed: {HINT}")
    from llama_models import datatypes
    from llama_models.llama3 import chat_format, tokenizer
    return tokenizer, chat_format, datatypes


@pytest.fixture(scope="module")
def meta():
    """(Meta's Tokenizer, Meta's ChatFormat, llama_models.datatypes) on Meta's own file."""
    tokenizer, chat_format, datatypes = _meta_modules()
    tok = tokenizer.Tokenizer.get_instance()
    return tok, chat_format.ChatFormat(tok), datatypes


@pytest.fixture(scope="module")
def ours_on_meta_file():
    tokenizer, _, _ = _meta_modules()
    from pathlib import Path
    return Tokenizer.load(Path(tokenizer.__file__).parent / "tokenizer.model")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 600-rank vocabulary we train, and Meta's Tokenizer reading the same file."""
    tokenizer, chat_format, _ = _meta_modules()
    ours = Tokenizer.train(sample_text("prose", 6_000) + " brave_search wolfram_alpha json",
                           600, progress=False)
    path = ours.save(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    theirs = tokenizer.Tokenizer(path)
    return ours, theirs, chat_format.ChatFormat(theirs)


def _meta_dialog(dialog, datatypes):
    """Our message dicts as Meta's RawMessage objects (roles `ipython` -> Meta's `tool`)."""
    out = []
    for m in dialog:
        calls = [datatypes.ToolCall(call_id=str(i), tool_name=c["name"], arguments=c["arguments"])
                 for i, c in enumerate(m.get("tool_calls", []))]
        stop = m.get("stop_reason")
        out.append(datatypes.RawMessage(
            role="tool" if m["role"] == "ipython" else m["role"], content=m["content"],
            tool_calls=calls, stop_reason=datatypes.StopReason(stop) if stop else None))
    return out


DIALOGS = {
    "search and answer": [
        {"role": "system", "content": "Environment: ipython\nTools: brave_search\n\n"
                                      "Cutting Knowledge Date: December 2023"},
        {"role": "user", "content": "Who won the 2024 Tour de France?"},
        {"role": "assistant", "content": "", "stop_reason": "end_of_message",
         "tool_calls": [{"name": "brave_search", "arguments": {"query": "2024 Tour winner"}}]},
        {"role": "ipython", "content": '{"results": [{"title": "Pogacar wins"}]}'},
        {"role": "assistant", "content": "Tadej Pogacar won it."},
        {"role": "user", "content": "Thanks!"}],
    "code": [
        {"role": "user", "content": "What is 2 ** 100?"},
        {"role": "assistant", "content": "", "stop_reason": "end_of_message",
         "tool_calls": [{"name": CODE_TOOL, "arguments": {"code": "print(2 ** 100)"}}]},
        {"role": "tool", "content": "1267650600228229401496703205376"}],
    "custom function, two calls": [
        {"role": "system", "content": "You may call get_weather."},
        {"role": "user", "content": "Weather in Lima and Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"name": "get_weather", "arguments": {"city": "Lima", "days": 2}},
            {"name": "wolfram_alpha", "arguments": {"query": "Oslo weather"}}]},
        {"role": "ipython", "content": "Lima: 21 C. Oslo: -3 C."},
        {"role": "assistant", "content": "Warm in Lima, cold in Oslo."}],
    "no tools": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
}


def test_special_and_stop_tokens_equal_meta_s(meta, ours_on_meta_file, small):
    tok, _, _ = meta
    ours = ours_on_meta_file
    assert ours.special_tokens == tok.special_tokens and ours.n_words == tok.n_words
    assert ours.stop_tokens == set(tok.stop_tokens) == {128001, 128008, 128009}
    assert ((ours.bos_id, ours.eos_id, ours.eot_id, ours.eom_id, ours.python_tag_id, ours.pad_id)
            == (tok.bos_id, tok.eos_id, tok.eot_id, tok.eom_id, tok.python_tag_id, tok.pad_id))
    mine, theirs, _ = small  # the same layout after a vocabulary of 600 ranks
    assert mine.special_tokens == theirs.special_tokens
    assert mine.stop_tokens == set(theirs.stop_tokens)


@pytest.mark.parametrize("name", DIALOGS)
def test_dialogs_with_tool_calls_equal_meta_s_chat_format(meta, ours_on_meta_file, small, name):
    tok, fmt, datatypes = meta
    dialog = DIALOGS[name]
    expected = fmt.encode_dialog_prompt(_meta_dialog(dialog, datatypes)).tokens
    assert ChatFormat(ours_on_meta_file).encode_dialog_prompt(dialog) == expected
    mine, _, small_fmt = small
    assert (ChatFormat(mine).encode_dialog_prompt(dialog)
            == small_fmt.encode_dialog_prompt(_meta_dialog(dialog, datatypes)).tokens)


def test_the_code_call_and_the_wait_for_its_result_read_as_meta_writes_them(meta,
                                                                            ours_on_meta_file):
    tok, _, _ = meta
    ids = ChatFormat(ours_on_meta_file).encode_dialog_prompt(DIALOGS["code"])
    text = tok.decode(ids)
    assert ("<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>print(2 ** 100)"
            "<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\n1267650600228229401496703205376"
            "<|eot_id|>") in text


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30).map(
    str.strip)  # Meta's 3.1 code keeps surrounding white space, ours strips it (see module)
_call = st.one_of(
    st.builds(lambda q, n: {"name": n, "arguments": {"query": q}}, _text,
              st.sampled_from(BUILTIN_TOOLS)),
    st.builds(lambda code: {"name": CODE_TOOL, "arguments": {"code": code}}, _text),
    st.builds(lambda n, a: {"name": n, "arguments": a},
              st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
              st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True),
                              st.one_of(_text, st.integers(), st.booleans()), max_size=3)))


@st.composite
def _message(draw):
    role = draw(st.sampled_from(["system", "user", "assistant", "ipython", "tool"]))
    message = {"role": role, "content": draw(_text)}
    if role == "assistant" and draw(st.booleans()):
        message["tool_calls"] = draw(st.lists(_call, min_size=1, max_size=2))
        message["stop_reason"] = draw(st.sampled_from(["end_of_turn", "end_of_message"]))
    return message


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_message(), max_size=5))
def test_any_dialog_equals_meta_s_chat_format(meta, ours_on_meta_file, dialog):
    tok, fmt, datatypes = meta
    meta_dialog = [dict(m, role="ipython") if m["role"] == "tool" else m for m in dialog]
    assert (ChatFormat(ours_on_meta_file).encode_dialog_prompt(dialog)
            == fmt.encode_dialog_prompt(_meta_dialog(meta_dialog, datatypes)).tokens)


def test_tool_call_text_examples_and_errors():
    assert tool_call_text({"name": "photogen", "arguments": {"query": "a llama"}}) == (
        'photogen.call(query="a llama")')
    with pytest.raises(ValueError, match="a tool call is a dict"):
        tool_call_text({"name": "f", "arguments": "x=1"})
    chat = ChatFormat(Tokenizer.train("abc " * 50, 258, progress=False))
    with pytest.raises(ValueError, match="only an assistant message has tool_calls"):
        chat.encode_message({"role": "user", "content": "x", "tool_calls": []})
    with pytest.raises(ValueError, match="stop_reason 'done' is not one of"):
        chat.encode_message({"role": "assistant", "content": "x", "stop_reason": "done"})
