"""OpenAI's chat API, the part `llama3-mini serve` speaks: a request body checked field by
field and turned into Llama 3 prompt ids, and errors in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, each naming what was wrong.

Messages may come in any order OpenAI allows (system, user, assistant and tool, a greeting
from the assistant first included): the prompt is exactly the dialog in Llama 3's chat
format, never trimmed, and it is refused only when it and the reply's budget do not fit the
model's window. A tool's message becomes Llama 3.1's `ipython` role and an assistant's tool
calls are written as Llama 3.1 writes them (chat_format.py, after Meta's llama-models,
`models/llama3/chat_format.py`)."""
import json
import math
import reprlib
from dataclasses import dataclass, field

from .tokenizer import ChatFormat

# OpenAI's roles -> the role written in Llama 3's header (a tool's result is "ipython")
ROLES = {"system": "system", "developer": "system", "user": "user",
         "assistant": "assistant", "tool": "ipython"}
MAX_STOP = 4  # OpenAI's limit on stop sequences
# Parameters we do not implement, and the value that means "not used": anything else is a 400
# rather than a reply that silently ignores what was asked.
UNSUPPORTED = {"tools": (None, []), "functions": (None, []), "logprobs": (None, False),
               "top_logprobs": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
               "frequency_penalty": (None, 0), "response_format": (None, {"type": "text"})}


class APIError(Exception):
    """An error answered as OpenAI answers it: {"error": {message, type, param, code}}, with
    the HTTP status and any headers (Retry-After for a 429)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class ChatRequest:
    """A checked chat request: the prompt ids and the sampling options."""
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 60, 4, 4


def shown(value) -> str:
    """A client's value, quoted for an error message: short, shallow (however deep its
    nesting) and always encodable as UTF-8 (a lone surrogate, which JSON allows and UTF-8
    does not, comes out escaped).

    'gpt-4o' -> "'gpt-4o'"; '\\ud800' -> "'\\\\ud800'"; [[[[1]]]] -> '[[[[...]]]]'"""
    return _REPR.repr(value)


def _number(body, name, default, low, high, low_open=False):
    """body[name] as a float in [low, high] ((low, high] with low_open), else a 400."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (low < value if low_open else low <= value) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"{name} must be a number in {interval}, got {shown(value)}", name)
    return float(value)


def _integer(body, name, low=None, high=None):
    """body[name] as an int in [low, high] (either bound None: open), else a 400."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or \
            (low is not None and value < low) or (high is not None and value > high):
        bounds = (f" of at least {low}" if high is None else f" from {low} to {high}") \
            if low is not None else ""
        raise APIError(400, f"{name} must be an integer{bounds}, got {shown(value)}", name)
    return value


def _message(i: int, message) -> dict:
    """One message as {'role', 'content'} in Llama 3's roles; text parts are joined."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise APIError(400, f"{where} must be an object with 'role' and 'content'", where)
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or role not in ROLES:
        raise APIError(400, f"{where}.role is {shown(role)}; this server takes "
                            f"{', '.join(map(repr, ROLES))}", f"{where}.role")
    calls = message.get("tool_calls")
    if calls is not None:
        calls = _tool_calls(where, role, calls)
        content = "" if content is None else content
    if isinstance(content, list):  # [{"type": "text", "text": "..."}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise APIError(400, f"{where}.content: only text parts are supported (this model "
                                "reads no images, audio or files)", f"{where}.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"{where}.content must be a string, got {shown(content)}",
                       f"{where}.content")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{where}.content is not valid Unicode text (it holds a lone "
                            "surrogate, half of a UTF-16 pair); send the whole character",
                       f"{where}.content") from None
    return {"role": ROLES[role], "content": content, **({"tool_calls": calls} if calls else {})}


def _tool_calls(where: str, role: str, calls) -> list[dict]:
    """OpenAI's tool calls of an assistant message, [{"type": "function", "function": {"name",
    "arguments": JSON text}}], as the chat format takes them: [{"name", "arguments": dict}]."""
    param = f"{where}.tool_calls"
    if role != "assistant" or not isinstance(calls, list):
        raise APIError(400, f"{param}: only an assistant message has tool calls, a list of "
                            "{'type': 'function', 'function': {'name', 'arguments'}}", param)
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except (ValueError, RecursionError):
            arguments = None
        if not isinstance(name, str) or not isinstance(arguments, dict):
            raise APIError(400, f"{param}[{j}] must be {{'type': 'function', 'function': "
                                "{'name': str, 'arguments': a JSON object as text}}", param)
        out.append({"name": name, "arguments": arguments})
    return out


def _fit(chat_format: ChatFormat, dialog, max_seq_len: int, max_tokens, longest_token):
    """The dialog's prompt ids, or a 400 when they and max_tokens do not fit the window.
    A text of n bytes is at least n / longest_token tokens: one several times too long for
    the window is refused from that bound, without spending time on encoding it."""
    n = None
    if longest_token:
        n_bytes = sum(len(m["content"].strip().encode("utf-8")) for m in dialog)
        if n_bytes > 4 * max_seq_len * longest_token:
            n = math.ceil(n_bytes / longest_token)
    try:
        ids = chat_format.encode_dialog_prompt(dialog) if n is None else None
    except (ValueError, KeyError, TypeError) as e:  # a tool call the format cannot write
        raise APIError(400, f"messages: {shown(str(e))}", "messages") from None
    if ids is not None:
        if len(ids) + (max_tokens or 1) <= max_seq_len:
            return ids
        n = len(ids)
    have = f"{'' if ids else 'at least '}{n}"
    asked = f"{have} tokens in the messages" if not max_tokens else \
        f"{'' if ids else 'at least '}{n + max_tokens} tokens ({have} in the messages, " \
        f"{max_tokens} in the completion)"
    raise APIError(400, f"This model's maximum context length is {max_seq_len} tokens. "
                        f"However, you requested {asked}. Please reduce the length of the "
                        "messages or of max_tokens.", "messages", "context_length_exceeded")


def parse_request(body, chat_format: ChatFormat, max_seq_len: int, model_id: str,
                  longest_token: int | None = None) -> ChatRequest:
    """Check an OpenAI chat request and turn its messages into Llama 3 prompt ids. Every
    problem is an APIError naming the parameter; a prompt that does not fit the window with
    its max_tokens is refused, never trimmed. longest_token: the tokenizer's longest token
    in bytes, if known (it lets a huge message be refused without encoding it)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise APIError(400, "you must provide a model parameter", "model")
    if model != model_id:
        raise APIError(404, f"The model {shown(model)} does not exist; this server has "
                            f"`{model_id}` (GET /v1/models)", "model", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {'role', 'content'} objects",
                       "messages")
    dialog = [_message(i, m) for i, m in enumerate(messages)]
    for name, defaults in UNSUPPORTED.items():
        if name in body and body[name] not in defaults:
            raise APIError(400, f"{name} is not supported by this server; leave it out", name)
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise APIError(400, f"n must be 1 here (one reply per request), got {n}", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stop, list) or len(stop) > MAX_STOP or \
            not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} "
                            f"of them, got {shown(body.get('stop'))}", "stop")
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError(400, "stream must be true or false, stream_options an object", "stream")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    max_tokens = _integer(body, "max_tokens", 1) if max_tokens is None else max_tokens
    ids = _fit(chat_format, dialog, max_seq_len, max_tokens, longest_token)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    return ChatRequest(ids, max_tokens or max_seq_len - len(ids),
                       _number(body, "temperature", 1.0, 0.0, 2.0),
                       None if top_p == 1.0 else top_p, stop,
                       _integer(body, "seed", -2**63, 2**63 - 1),  # torch's seeds are 64-bit
                       stream, bool(options.get("include_usage")))
