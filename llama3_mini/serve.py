"""`llama3-mini serve`: a local server that speaks OpenAI's chat API, so any client with an
OpenAI base-URL setting (the `openai` package, Open WebUI, editors' assistants) can talk to
a model the course trained.

    llama3-mini serve                          # the QA fine-tune, on http://127.0.0.1:8000/v1
    llama3-mini serve --checkpoint runs/story  # a model of your own

Endpoints: `GET /v1/models`, `GET /v1/models/{id}` and `POST /v1/chat/completions`, streamed
(server-sent events: `data: {chunk}` lines, then `data: [DONE]`) or not. The messages become
Llama 3's chat format (tokenizer.ChatFormat); the reply is made by generate.generate_steps
with the KV cache and ends at <|eot_id|> or <|end_of_text|> (finish_reason "stop"), at a
`stop` string (the text before it, as OpenAI does) or after max_tokens ("length").

The model and its cache are not thread-safe: one worker thread makes every reply, one request
at a time, in the order they came; the event loop only waits on it, so a streamed reply never
blocks another request from being read and queued. Needs FastAPI and uvicorn:
`pip install 'llama3-mini[serve]'`."""
import asyncio
import codecs
import ipaddress
import json
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .chat import dialog_prompt_ids
from .generate import generate_steps
from .tokenizer import ChatFormat

ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # OpenAI's limit on stop sequences
# Parameters we do not implement, and the value that means "not used": anything else is a 400
# rather than a reply that silently ignores what was asked.
UNSUPPORTED = {"tools": (None, []), "functions": (None, []), "logprobs": (None, False),
               "top_logprobs": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
               "frequency_penalty": (None, 0), "response_format": (None, {"type": "text"})}


def _require_fastapi():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"`llama3-mini serve` needs FastAPI and uvicorn ({e.name} is missing): "
                          "pip install 'llama3-mini[serve]'") from None


class APIError(Exception):
    """An error answered as OpenAI answers it: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

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


def _number(body, name, default, low, high, low_open=False):
    """body[name] as a float in [low, high] ((low, high] with low_open), else a 400."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (low < value if low_open else low <= value) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"{name} must be a number in {interval}, got {value!r}", name)
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
        raise APIError(400, f"{name} must be an integer{bounds}, got {value!r}", name)
    return value


def _message_text(i: int, message) -> dict:
    """One message as {'role', 'content'}; content given as text parts is joined."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise APIError(400, f"{where} must be an object with 'role' and 'content'", where)
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise APIError(400, f"{where}.role is {role!r}; this server takes "
                            f"{', '.join(map(repr, ROLES))}", f"{where}.role")
    if isinstance(content, list):  # [{"type": "text", "text": "..."}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise APIError(400, f"{where}.content: only text parts are supported (this model "
                                "reads no images, audio or files)", f"{where}.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"{where}.content must be a string, got {content!r:.40}",
                       f"{where}.content")
    return {"role": role, "content": content}


def parse_request(body, chat_format: ChatFormat, max_seq_len: int, model_id: str) -> ChatRequest:
    """Check an OpenAI chat request and turn its messages into Llama 3 prompt ids. Every
    problem is an APIError naming the parameter; a prompt that does not fit the window with
    its max_tokens is refused, never trimmed."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise APIError(400, "you must provide a model parameter", "model")
    if model != model_id:
        raise APIError(404, f"The model `{model}` does not exist; this server has "
                            f"`{model_id}` (GET /v1/models)", "model", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {'role', 'content'} objects",
                       "messages")
    dialog = [_message_text(i, m) for i, m in enumerate(messages)]
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
                            f"of them, got {body.get('stop')!r}", "stop")
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError(400, "stream must be true or false, stream_options an object", "stream")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    max_tokens = _integer(body, "max_tokens", 1) if max_tokens is None else max_tokens
    try:  # chat.py's prompt, as `llama3-mini chat` builds it; but here nothing is dropped
        ids, n_dropped = dialog_prompt_ids(chat_format, dialog, max_seq_len, max_tokens or 1)
    except ValueError:  # even the last message does not fit
        n_dropped = None
    if n_dropped != 0:
        n = len(chat_format.encode_dialog_prompt(dialog))
        asked = f"{n + max_tokens} tokens ({n} in the messages, {max_tokens} in the " \
                f"completion)" if max_tokens else f"{n} tokens in the messages"
        raise APIError(400, f"This model's maximum context length is {max_seq_len} tokens. "
                            f"However, you requested {asked}. Please reduce the length of the "
                            "messages or of max_tokens.", "messages", "context_length_exceeded")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    return ChatRequest(ids, max_tokens or max_seq_len - len(ids),
                       _number(body, "temperature", 1.0, 0.0, 2.0),
                       None if top_p == 1.0 else top_p, stop,
                       _integer(body, "seed", -2**63, 2**63 - 1),  # torch's seeds are 64-bit
                       stream, bool(options.get("include_usage")))


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of text could begin a stop string (not sent yet).

    'Hello Wo', ['World'] -> 2; 'Hello', ['World'] -> 0"""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


@dataclass
class Outcome:
    finish_reason: str = "length"
    completion_tokens: int = 0


def reply_pieces(model, tokenizer, req: ChatRequest, outcome: Outcome, cancelled=None):
    """Yield the reply's text in pieces as the tokens are made, filling `outcome`. A piece
    never ends inside a UTF-8 character or inside what may become a stop string; the text
    ends before the first stop string, as OpenAI's does. completion_tokens counts every
    token generated, the closing <|eot_id|> included."""
    stop_ids = set(tokenizer.stop_tokens)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, sent = "", 0
    steps = generate_steps(model, [req.prompt_ids], req.max_tokens, temperature=req.temperature,
                           top_p=req.top_p, seed=req.seed, stop_tokens=tuple(stop_ids))
    for nxt, _, _ in steps:
        outcome.completion_tokens += 1
        token = int(nxt[0])
        final = token in stop_ids or outcome.completion_tokens == req.max_tokens
        if token in stop_ids:
            outcome.finish_reason = "stop"
        else:
            text += decoder.decode(tokenizer.decode_bytes([token]))
        if final:
            text += decoder.decode(b"", final=True)
        cuts = [i for i in (text.find(s, max(0, sent - len(s))) for s in req.stop) if i >= 0]
        if cuts:
            text, final = text[:min(cuts)], True
            outcome.finish_reason = "stop"
        safe = len(text) if final else len(text) - _held_back(text, req.stop)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
        if final or (cancelled is not None and cancelled.is_set()):
            steps.close()
            return


def _chunk(rid, created, model_id, delta, finish_reason=None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}


def _usage(req: ChatRequest, outcome: Outcome) -> dict:
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": outcome.completion_tokens,
            "total_tokens": len(req.prompt_ids) + outcome.completion_tokens}


def _sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(model, tokenizer, model_id: str = "llama3-mini"):
    """A FastAPI app serving `model` (in eval mode, on its device) under the name model_id.

        app = create_app(*load_pretrained("qa-full"), "qa-full")
        uvicorn.run(app, host="127.0.0.1", port=8000)"""
    _require_fastapi()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama3-mini-generate")
    chat_format, max_seq_len, created = ChatFormat(tokenizer), model.params.max_seq_len, \
        int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="llama3-mini", lifespan=lifespan)
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "llama3-mini"}

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: "
                                     f"{e.detail}").body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return JSONResponse(APIError(500, f"the server failed: {e!r}", type="server_error")
                            .body(), status_code=500)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        if name != model_id:
            raise APIError(404, f"The model `{name}` does not exist; this server has "
                                f"`{model_id}`", "model", "model_not_found")
        return card

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request ({e}); send "
                                "a JSON object with 'model' and 'messages'") from None
        req = parse_request(body, chat_format, max_seq_len, model_id)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            outcome = Outcome()
            job = worker.submit(lambda: "".join(reply_pieces(model, tokenizer, req, outcome)))
            text = await asyncio.wrap_future(job)
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_id,
                    "choices": [{"index": 0, "logprobs": None, "finish_reason":
                                 outcome.finish_reason, "message": {
                                     "role": "assistant", "content": text, "refusal": None}}],
                    "usage": _usage(req, outcome)}
        return StreamingResponse(_events(req, rid, now), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _events(req: ChatRequest, rid: str, now: int):
        """The reply as server-sent events, fed by the worker thread through a queue."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        cancelled, outcome = threading.Event(), Outcome()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the server's loop has closed: nobody is listening
                cancelled.set()

        def run():
            try:
                if not cancelled.is_set():  # the client may have left while it waited
                    for piece in reply_pieces(model, tokenizer, req, outcome, cancelled):
                        put(piece)
                put(None)
            except Exception as e:  # noqa: BLE001 - reported to the client, not lost
                put(e)

        worker.submit(run)
        try:
            yield _sse(_chunk(rid, now, model_id, {"role": "assistant", "content": ""}))
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    yield _sse(APIError(500, f"generation failed: {item!r}", type="server_error")
                               .body())
                    return
                yield _sse(_chunk(rid, now, model_id, {"content": item}))
            yield _sse(_chunk(rid, now, model_id, {}, outcome.finish_reason))
            if req.include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": now,
                            "model": model_id, "choices": [], "usage": _usage(req, outcome)})
            yield _sse("[DONE]")
        finally:
            cancelled.set()  # the client left, or the reply is done: free the worker

    return app


def is_loopback(host: str) -> bool:
    """Whether host only listens on this machine: 'localhost', 127.x.x.x, ::1.

    '127.0.0.1' -> True, 'localhost' -> True, '0.0.0.0' -> False, '192.168.1.5' -> False"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(checkpoint=None, host: str = "127.0.0.1", port: int = 8000, model_id=None,
          device=None, log_level: str = "info") -> None:
    """Load a checkpoint (default: the shipped `qa-full` fine-tune, which answers questions
    about a story) and serve it until Ctrl-C. A host other than the loopback exposes the
    model to the network, and says so."""
    _require_fastapi()
    import uvicorn

    from .checkpoint import load_checkpoint, load_pretrained

    if checkpoint is None:
        model, tokenizer = load_pretrained("qa-full", device=device)
        name = "qa-full"
    else:
        model, tokenizer, _ = load_checkpoint(checkpoint, device=device)
        name = Path(checkpoint).resolve().name
    model_id = model_id or name
    if not is_loopback(host):
        print(f"warning: listening on {host}, not the loopback: anyone who can reach this "
              "machine can use the model (there is no authentication)", file=sys.stderr)
    print(f"serving {model_id} at http://{host}:{port}/v1 (OpenAI chat API; Ctrl-C stops it)")
    uvicorn.run(create_app(model, tokenizer, model_id), host=host, port=port,
                log_level=log_level)
