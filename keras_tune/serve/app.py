"""The HTTP layer: FastAPI routes of the OpenAI API over a `Batcher`, server-sent events, OpenAI-style errors.

Routes: `GET /v1/models` (and `/v1/models/{id}`), `POST /v1/completions`,
`POST /v1/chat/completions`, `GET /health`. A request is checked
(`keras_tune.serve.protocol`), tokenized and measured against the context
before it is queued; a refusal is an `{"error": {...}}` body with 400 (the
request), 404 (no such model), 429 and `Retry-After` (the queue is full) or 503
(shutting down), and the server goes on serving. A streamed answer is
`text/event-stream` (`data: {chunk}` lines, then `data: [DONE]`); a client that
goes away mid-answer frees its slot at the next step.

Example:

```python
service = Service(batcher, adapters, tokenizer, context=1024)
app = create_app(service)
serve_forever(app, "127.0.0.1", 8000, drain_timeout=120)   # returns after SIGTERM, once drained
```
"""

import asyncio
import json
import logging
import re
import secrets

from keras_tune.serve import answers, protocol
from keras_tune.serve.batcher import Closed, Done, Failed, QueueFull, Sequence
from keras_tune.serve.protocol import ApiError, ChatRequest, CompletionRequest

log = logging.getLogger("keras_tune.serve")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# A client that is gone is noticed within this many seconds while it waits for a whole answer.
DISCONNECT_POLL_S = 0.5


class Service:
    """What the routes serve: the models' names, the tokenizer, the context and the batcher.

    Args:
        batcher: a started-or-not `keras_tune.serve.batcher.Batcher`.
        adapters: the `keras_tune.serve.adapters.AdapterSet` the engine was built with.
        tokenizer: the model's keras-hub tokenizer.
        context: positions a sequence may take, prompt included.
        completion_stop_ids: tokens that end a completion.
        chat_stop_ids: tokens that end a chat answer.
    """

    def __init__(self, batcher, adapters, tokenizer, context, completion_stop_ids, chat_stop_ids):
        self.batcher, self.adapters, self.tokenizer = batcher, adapters, tokenizer
        self.context = int(context)
        self.completion_stop_ids, self.chat_stop_ids = tuple(completion_stop_ids), tuple(chat_stop_ids)
        self.created = protocol.now()
        self._pieces = {}

    # ---- requests to sequences

    def model_index(self, name):
        """The adapter index the `model` field names; 404 when the server has no such model."""
        index = self.adapters.index(name)
        if index is None:
            raise ApiError(404, f"model '{name}': no such model here; expected one of {', '.join(self.adapters.names)}",
                           param="model", code="model_not_found")
        return index

    def encode(self, text):
        """`<bos>` and the tokens of `text`."""
        import numpy as np

        return [int(self.tokenizer.start_token_id)] + [int(i) for i in np.asarray(self.tokenizer(text)).reshape(-1)]

    def check_length(self, prompt_tokens, max_tokens, field, prompt_field):
        """Refuses a prompt, or a prompt and `max_tokens`, that the context cannot hold.

        Args:
            prompt_tokens: the prompt's tokens (`<bos>` included).
            max_tokens: tokens asked for (None: as many as fit).
            field: the request field that asked for them.
            prompt_field: the request field that holds the prompt.
        """
        if prompt_tokens >= self.context:
            raise ApiError(400, f"this server's context is {self.context} tokens and the prompt takes {prompt_tokens}; "
                                f"expected a prompt of at most {self.context - 1} tokens",
                           param=prompt_field, code="context_length_exceeded")
        if max_tokens is not None and prompt_tokens + max_tokens > self.context:
            raise ApiError(400, f"this server's context is {self.context} tokens; the prompt takes {prompt_tokens} and "
                                f"{field} asks for {max_tokens} more; expected {field} at most "
                                f"{self.context - prompt_tokens}", param=field, code="context_length_exceeded")

    def sequences(self, request, prompts, stop_ids, max_tokens, logprobs, score_prompt=False):
        """The `Sequence`s of a request: `n` a prompt, in choice order.

        Args:
            request: the parsed request (sampling fields).
            prompts: token lists, one a prompt.
            stop_ids: tokens that end a sequence.
            max_tokens: tokens to generate at most.
            logprobs: whether tokens carry log-probabilities.
            score_prompt: also score the prompt (`echo` with `logprobs`).
        """
        seed = request.seed if request.seed is not None else secrets.randbits(32)
        temperature = 1.0 if request.temperature is None else request.temperature
        top_k = max(int(request.top_k or 0), 0)
        top_p = 1.0 if request.top_p is None else request.top_p
        found = []
        for prompt in prompts:
            for choice in range(request.n or 1):
                found.append(Sequence(
                    prompt_ids=prompt, adapter=self.model_index(request.model), max_new_tokens=max_tokens, emit=None,
                    temperature=temperature, top_k=top_k, top_p=top_p, seed=(seed + 7919 * choice) % 2**32,
                    stop_ids=stop_ids, stop_strings=protocol.stop_strings(request), score_prompt=score_prompt,
                    logprobs=logprobs,
                ))
        return found

    def submit(self, sequences):
        """Queues `sequences`; returns an `asyncio.Queue` of `(choice index, event)`."""
        most = self.batcher.engine.slots + self.batcher.max_queue
        if len(sequences) > most:
            raise ApiError(400, f"the request makes {len(sequences)} sequences (n times prompts); expected at most {most} "
                                "(this server's slots and queue)", param="n")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        for index, sequence in enumerate(sequences):
            sequence.emit = lambda event, index=index: loop.call_soon_threadsafe(events.put_nowait, (index, event))
        try:
            self.batcher.submit(sequences)
        except QueueFull:
            raise ApiError(429, f"the queue is full ({self.batcher.max_queue} waiting and every slot busy); expected "
                                "a retry after a moment", code="queue_full", headers={"Retry-After": "1"}) from None
        except Closed:
            raise ApiError(503, "the server is shutting down; expected no new requests", code="shutting_down") from None
        return events

    # ---- tokens to text

    def piece(self, token_id):
        """`(text, bytes)` of one token, as logprobs list it."""
        found = self._pieces.get(token_id)
        if found is None:
            piece = str(self.tokenizer.id_to_token(int(token_id)))
            byte = _BYTE_PIECE.match(piece)
            raw = bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8")
            found = self._pieces[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return found

    def alternatives(self, ids, values, count):
        """The first `count` of a position's likeliest tokens as `[(text, bytes, logprob)]`."""
        return [(*self.piece(i), float(v)) for i, v in list(zip(ids, values))[:count]]


def create_app(service):
    """The FastAPI application of `service`: the OpenAI routes, `/health`, errors as OpenAI bodies.

    The batcher's thread starts with the application and is closed (after the
    requests in flight are done) when it shuts down.

    Args:
        service: a `Service`.
    """
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        service.batcher.close()
        await asyncio.get_running_loop().run_in_executor(None, service.batcher.join)

    app = FastAPI(title="keras_tune", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def refused(request, error):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, error):
        message = f"{request.method} {request.url.path}: {error.detail}; expected one of GET /v1/models, " \
                  "POST /v1/completions, POST /v1/chat/completions, GET /health"
        return JSONResponse(ApiError(error.status_code, message).body(), status_code=error.status_code)

    @app.get("/health")
    async def health():
        stats = service.batcher.stats()
        return {"status": "ok", "models": list(service.adapters.names), "context": service.context, **stats}

    @app.get("/v1/models")
    async def models():
        return protocol.model_list(service.adapters.names, service.created)

    @app.get("/v1/models/{name}")
    async def model(name: str):
        service.model_index(name)
        listed = protocol.model_list(service.adapters.names, service.created)["data"]
        return next(entry for entry in listed if entry["id"] == name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(service, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _chat(service, request)

    return app


async def _body(request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error}); expected a JSON object") from None


async def _complete(service, request):
    """`POST /v1/completions`."""
    body = await _body(request)
    parsed = protocol.parse(CompletionRequest, body)
    service.model_index(parsed.model)
    texts = [parsed.prompt] if isinstance(parsed.prompt, str) else list(parsed.prompt)
    if not texts:
        raise ApiError(400, "prompt: received []; expected a string or a non-empty list of strings", param="prompt")
    prompts = [service.encode(text) for text in texts]
    max_tokens = 16 if parsed.max_tokens is None else parsed.max_tokens
    if max_tokens == 0 and not parsed.echo:
        raise ApiError(400, "max_tokens: received 0; expected at least 1 (0 only with echo, to score the prompt)",
                       param="max_tokens")
    for prompt in prompts:
        service.check_length(len(prompt), max_tokens, "max_tokens", "prompt")
    wants_logprobs = parsed.logprobs is not None
    sequences = service.sequences(parsed, prompts, service.completion_stop_ids, max_tokens, wants_logprobs,
                                  score_prompt=bool(parsed.echo) and wants_logprobs)
    events = service.submit(sequences)
    answer = answers.CompletionAnswer(service, parsed, texts, prompts, protocol.new_id("cmpl"))
    if parsed.stream:
        return _stream(service, sequences, events, answer)
    return await _collect(service, request, sequences, events, answer)


async def _chat(service, request):
    """`POST /v1/chat/completions`."""
    from keras_tune.decoding import conversation_prompt

    body = await _body(request)
    parsed = protocol.parse(ChatRequest, body)
    service.model_index(parsed.model)
    prompt = service.encode(conversation_prompt(protocol.chat_turns(parsed)))
    field = "max_completion_tokens" if parsed.max_completion_tokens is not None else "max_tokens"
    asked = parsed.max_completion_tokens if parsed.max_completion_tokens is not None else parsed.max_tokens
    service.check_length(len(prompt), asked, field, "messages")
    asked = service.context - len(prompt) if asked is None else asked
    sequences = service.sequences(parsed, [prompt], service.chat_stop_ids, asked, bool(parsed.logprobs))
    events = service.submit(sequences)
    answer = answers.ChatAnswer(service, parsed, [prompt], protocol.new_id("chatcmpl"))
    if parsed.stream:
        return _stream(service, sequences, events, answer)
    return await _collect(service, request, sequences, events, answer)


async def _collect(service, request, sequences, events, answer):
    """Waits for every sequence of a request; a client that leaves cancels them."""
    from fastapi.responses import JSONResponse

    remaining = len(sequences)
    try:
        while remaining:
            try:
                index, event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    service.batcher.cancel(sequences)
                    return JSONResponse({}, status_code=499)
                continue
            if isinstance(event, Failed):
                service.batcher.cancel(sequences)
                return JSONResponse(ApiError(500, event.message).body(), status_code=500)
            answer.add(index, event)
            remaining -= isinstance(event, Done)
    except asyncio.CancelledError:
        service.batcher.cancel(sequences)
        raise
    return answer.whole()


def _stream(service, sequences, events, answer):
    """The server-sent events of a streamed answer; a client that leaves cancels its sequences."""
    from fastapi.responses import StreamingResponse

    async def chunks():
        remaining = len(sequences)
        try:
            for chunk in answer.opening():
                yield _event(chunk)
            while remaining:
                index, event = await events.get()
                if isinstance(event, Failed):
                    yield _event(ApiError(500, event.message).body())
                    return
                for chunk in answer.chunks(index, event):
                    yield _event(chunk)
                remaining -= isinstance(event, Done)
            for chunk in answer.closing():
                yield _event(chunk)
            yield "data: [DONE]\n\n"
        finally:
            if remaining:  # the client went away (or a step failed): free the slots
                service.batcher.cancel(sequences)

    return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def serve_forever(app, host, port, drain_timeout, log_level="warning"):
    """Runs `app` with uvicorn until SIGTERM or Ctrl-C; returns once the requests in flight are done.

    On SIGTERM uvicorn stops accepting connections and waits (up to
    `drain_timeout` seconds) for the ones in flight; the application's shutdown
    then lets the batcher finish. The process's own SIGTERM handler is replaced
    by one that does nothing while this runs, so uvicorn's re-raise of the signal
    after draining does not end the process (the tool then exits 0).

    Args:
        app: the application (`create_app`).
        host: the address to bind (127.0.0.1: this machine only).
        port: the TCP port (0: any free one).
        drain_timeout: seconds to wait for requests in flight after SIGTERM.
        log_level: uvicorn's log level.
    """
    import signal

    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                            lifespan="on")
    server = uvicorn.Server(config)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return server
