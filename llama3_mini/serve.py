"""`llama3-mini serve`: a local server that speaks OpenAI's chat API, so any client with an
OpenAI base-URL setting (the `openai` package, Open WebUI, editors' assistants) can talk to
a model the course trained.

    llama3-mini serve                          # the QA fine-tune, on http://127.0.0.1:8000/v1
    llama3-mini serve --checkpoint runs/story  # a model of your own

Endpoints: `GET /v1/models`, `GET /v1/models/{id}` and `POST /v1/chat/completions`, streamed
(server-sent events: `data: {chunk}` lines, then `data: [DONE]`) or not. The messages become
Llama 3's chat format (openai_api.parse_request checks the request); the reply is made by
generate.stream_pieces with the KV cache and ends at a stop token (finish_reason "stop"), at
a `stop` string (the text before it, as OpenAI does) or after max_tokens ("length").

The model and its cache are not thread-safe: one worker thread makes every reply, one request
at a time, in the order they came; the event loop only waits on it, so a streamed reply never
blocks another request from being read and queued. At most `max_queue` requests wait (past
that, 429 with Retry-After); a reply stops being generated when its client leaves, streamed
or not; a failure is a 500 that names only a reference, its details in the server's log.
Needs FastAPI and uvicorn: `pip install 'llama3-mini[serve]'`."""
import asyncio
import ipaddress
import json
import logging
import math
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from .generate import stream_pieces
from .openai_api import APIError, ChatRequest, parse_request
from .tokenizer import ChatFormat

MAX_QUEUE = 16  # requests that may wait while one is generated; past it, 429
MAX_BODY = 4 * 2**20  # bytes of a request body; past it, 413
log = logging.getLogger(__name__)


def _require_fastapi():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"`llama3-mini serve` needs FastAPI and uvicorn ({e.name} is missing): "
                          "pip install 'llama3-mini[serve]'") from None


class Worker:
    """One thread that makes every reply, in the order the requests came, and a bound on how
    many may wait for it: past `max_queue` waiting (one more is being made), `submit` raises
    a 429 whose Retry-After is the expected wait, from the mean time of recent replies."""

    def __init__(self, max_queue: int = MAX_QUEUE):
        if max_queue < 0:
            raise ValueError(f"max_queue ({max_queue}) must be 0 or more")
        self.max_queue, self.admitted, self.seconds = max_queue, 0, 1.0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama3-mini-reply")

    def submit(self, job) -> Future:
        with self._lock:
            if self.admitted > self.max_queue:
                wait = max(1, math.ceil(self.admitted * self.seconds))
                raise APIError(429, f"The server is busy: {self.admitted - 1} requests are "
                                    f"waiting (at most {self.max_queue}). Please retry after "
                                    f"{wait} s.", code="rate_limit_exceeded", type="requests",
                               headers={"Retry-After": str(wait)})
            self.admitted += 1

        def run():
            start = time.perf_counter()
            try:
                return job()
            finally:
                with self._lock:
                    self.admitted -= 1
                    self.seconds = 0.8 * self.seconds + 0.2 * (time.perf_counter() - start)

        return self._pool.submit(run)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_reply(model, tokenizer, req: ChatRequest, cancelled: threading.Event, emit=None):
    """The reply to req, made on the worker thread: (text, finish_reason, completion_tokens).
    Each piece of text goes to emit(text) as it is made; generation stops as soon as
    `cancelled` is set (the client left). completion_tokens counts every token generated,
    the closing <|eot_id|> included, as OpenAI counts."""
    if cancelled.is_set():  # the client left while it waited
        return "", "stop", 0
    parts, finish, n = [], "length", 0
    pieces = stream_pieces(model, tokenizer, req.prompt_ids, req.max_tokens,
                           temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                           stop=req.stop)
    for piece in pieces:
        n, finish = n + 1, piece.finish_reason or finish
        if piece.text:
            parts.append(piece.text)
            if emit is not None:
                emit(piece.text)
        if cancelled.is_set():
            pieces.close()
            break
    return "".join(parts), finish, n


def _chunk(rid, created, model_id, delta, finish_reason=None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}


def _usage(req: ChatRequest, completion_tokens: int) -> dict:
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": completion_tokens,
            "total_tokens": len(req.prompt_ids) + completion_tokens}


def _sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _internal_error(e: BaseException, where: str) -> APIError:
    """A 500 that says nothing of the server's internals; the details go to its log, under a
    reference the client can quote."""
    ref = uuid.uuid4().hex[:12]
    log.error("%s failed (reference %s)", where, ref, exc_info=e)
    return APIError(500, "The server had an error while processing your request (reference "
                         f"{ref}; the server's log has the details).", type="server_error")


async def _client_left(request) -> None:
    """Returns once the client has closed its connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_json(request):
    body = await request.body()
    if len(body) > MAX_BODY:
        raise APIError(413, f"the request body is {len(body):,} bytes, more than this server "
                            f"takes ({MAX_BODY:,}); send a shorter conversation")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, too deep
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise APIError(400, f"We could not parse the JSON body of your request ({why}); send "
                            "a JSON object with 'model' and 'messages'") from None


def create_app(model, tokenizer, model_id: str = "llama3-mini", max_queue: int = MAX_QUEUE):
    """A FastAPI app serving `model` (in eval mode, on its device) under the name model_id;
    at most max_queue requests wait while one is answered.

        app = create_app(*load_pretrained("qa-full"), "qa-full")
        uvicorn.run(app, host="127.0.0.1", port=8000)"""
    _require_fastapi()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    worker = Worker(max_queue)
    chat_format, max_seq_len, created = ChatFormat(tokenizer), model.params.max_seq_len, \
        int(time.time())
    ranks = getattr(tokenizer, "mergeable_ranks", None)
    longest_token = max(map(len, ranks)) if ranks else None

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.shutdown()

    app = FastAPI(title="llama3-mini", lifespan=lifespan)
    app.state.worker = worker
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "llama3-mini"}

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: "
                                     f"{e.detail}").body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        error = _internal_error(e, f"{request.method} {request.url.path}")
        return JSONResponse(error.body(), status_code=500)

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
        req = parse_request(await _read_json(request), chat_format, max_seq_len, model_id,
                            longest_token)
        rid, now, cancelled = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), \
            threading.Event()
        if req.stream:
            return _stream(req, rid, now, cancelled)
        job = asyncio.wrap_future(worker.submit(
            lambda: make_reply(model, tokenizer, req, cancelled)))
        left = asyncio.ensure_future(_client_left(request))
        try:
            await asyncio.wait({job, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            if not job.done():  # the client left (or the server stops): nobody to answer
                cancelled.set()
        if not job.done():
            return Response(status_code=499)  # never sent: the connection is gone
        try:
            text, finish, n = job.result()
        except Exception as e:  # noqa: BLE001 - answered here: an exception that reached
            raise _internal_error(e, "a reply") from None  # uvicorn would close the connection
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_id,
                "choices": [{"index": 0, "logprobs": None, "finish_reason": finish,
                             "message": {"role": "assistant", "content": text,
                                         "refusal": None}}],
                "usage": _usage(req, n)}

    def _stream(req: ChatRequest, rid: str, now: int, cancelled: threading.Event):
        """The reply as server-sent events, fed by the worker thread through a queue: its
        pieces, then the job itself once it has finished."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the server's loop has closed: nobody is listening
                cancelled.set()

        job = worker.submit(lambda: make_reply(model, tokenizer, req, cancelled, put))
        job.add_done_callback(put)  # after every piece: the end of the stream

        async def events():
            try:
                yield _sse(_chunk(rid, now, model_id, {"role": "assistant", "content": ""}))
                while isinstance(item := await queue.get(), str):
                    yield _sse(_chunk(rid, now, model_id, {"content": item}))
                try:
                    _, finish, n = item.result()
                except Exception as e:  # noqa: BLE001 - logged; the client learns only that
                    yield _sse(_internal_error(e, "a streamed reply").body())
                    return
                yield _sse(_chunk(rid, now, model_id, {}, finish))
                if req.include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": now,
                                "model": model_id, "choices": [], "usage": _usage(req, n)})
                yield _sse("[DONE]")
            finally:
                cancelled.set()  # the client left, or the reply is done: free the worker

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

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
          device=None, log_level: str = "info", max_queue: int | None = None) -> None:
    """Load a checkpoint (default: the shipped `qa-full` fine-tune, which answers questions
    about a story) and serve it until Ctrl-C. A host other than the loopback exposes the
    model to the network, and says so."""
    _require_fastapi()
    import uvicorn

    from .loader import load
    from .pretrained import CHAT_MODEL

    model, tokenizer = load(checkpoint or CHAT_MODEL, device=device)
    name = CHAT_MODEL if checkpoint is None else Path(checkpoint).resolve().name
    model_id = model_id or name
    if not is_loopback(host):
        print(f"warning: listening on {host}, not the loopback: anyone who can reach this "
              "machine can use the model (there is no authentication)", file=sys.stderr)
    print(f"serving {model_id} at http://{host}:{port}/v1 (OpenAI chat API; Ctrl-C stops it)")
    app = create_app(model, tokenizer, model_id, MAX_QUEUE if max_queue is None else max_queue)
    uvicorn.run(app, host=host, port=port,
                log_level=log_level)
