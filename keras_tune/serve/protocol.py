"""The OpenAI API's request and response bodies: checks with one-line messages, and the JSON sent back.

Requests are pydantic models with the OpenAI field names, strict about types
(`"5"` is not a number), closed to unknown fields, with the ranges the OpenAI
API documents. Fields the server does not implement are accepted only at their
neutral values (`presence_penalty: 0`, `best_of: 1`, ...); anything else is an
`ApiError` (HTTP 400) naming the field, what was received and what is expected.
`top_k` is an extension (as in vLLM): the openai client sends it with
`extra_body={"top_k": 40}`.

Log-probabilities are the model's own (before temperature and truncation).
Completion `logprobs` (0-5) lists, per token, its log-probability and that many
alternatives; with `echo` the prompt's tokens come first (each predicted from
`<bos>` and the tokens before it, as `keras_tune.scoring` scores a text).

Example:

```python
request = parse(CompletionRequest, {"model": "gemma3_270m_offline", "prompt": "def fib(n):", "max_tokens": 32})
```
"""

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keras_tune.serve.sampling import CANDIDATES, TOP_LOGPROBS

MAX_STOP = 4
MAX_N = 16


class ApiError(Exception):
    """A refusal, sent as an OpenAI-style error body.

    Args:
        status: the HTTP status (400, 404, 429, 503).
        message: one line: what was received and what was expected.
        param: the request field at fault, if one is.
        code: a short machine-readable code.
        headers: extra response headers (Retry-After).
    """

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self):
        """The JSON body: `{"error": {"message", "type", "param", "code"}}`."""
        kinds = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error",
                 503: "server_unavailable"}
        return {"error": {"message": self.message, "type": kinds.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Sampling(_Strict):
    """Fields the completions and chat APIs share."""

    model: str
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=0, ge=-1, le=CANDIDATES)
    n: int | None = Field(default=1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=0.0, ge=0.0, le=0.0)
    frequency_penalty: float | None = Field(default=0.0, ge=0.0, le=0.0)
    logit_bias: dict | None = Field(default=None, max_length=0)
    user: str | None = None


class CompletionRequest(_Sampling):
    """`POST /v1/completions`."""

    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = False
    best_of: int | None = Field(default=None, ge=1, le=1)
    suffix: None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "model"]
    content: str | list[TextPart]
    name: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None


# What a field takes, in words, where pydantic's message would name Python types.
_EXPECTED = {
    "prompt": "a string or a list of strings",
    "stop": f"a string or a list of up to {MAX_STOP} strings",
    "messages": "a list of {role, content} objects",
    "presence_penalty": "0 (penalties are not implemented)",
    "frequency_penalty": "0 (penalties are not implemented)",
    "logit_bias": "null or {} (logit bias is not implemented)",
    "best_of": "1 (best_of is not implemented)",
    "suffix": "null (suffixes are not implemented)",
    "top_k": f"0 or -1 (off) or 1..{CANDIDATES}",
    "response_format": '{"type": "text"}',
}


def _message(error, body):
    """One line for the first problem pydantic found."""
    first = error.errors()[0]
    location = [part for part in first["loc"] if isinstance(part, int) or part in (body if isinstance(body, dict) else {})
                or part in ("role", "content", "type", "text", "name")]
    field = str(first["loc"][0]) if first["loc"] else "body"
    where = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in location).replace(".[", "[") or field
    if first["type"] == "extra_forbidden":
        return field, f"unknown field '{where}'; expected only fields of the OpenAI API that this server implements"
    if first["type"] == "missing":
        return field, f"'{where}' is missing; expected it in the request body"
    received = body.get(field) if isinstance(body, dict) and len(location) <= 1 else first.get("input")
    expected = _EXPECTED.get(field) if len(location) <= 1 else None
    if expected is None:
        text = first["msg"]
        expected = text[len("Input should be "):] if text.startswith("Input should be ") else text[0].lower() + text[1:]
    return field, f"{where}: received {_short(received)}; expected {expected}"


def _short(value, limit=80):
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse(model, body):
    """Checks a request body against `model`; returns the parsed request.

    Args:
        model: `CompletionRequest` or `ChatRequest`.
        body: the decoded JSON body.

    Raises:
        ApiError: 400, with what was received and what was expected.
    """
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body is a JSON {type(body).__name__}; expected a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as error:
        field, message = _message(error, body)
        raise ApiError(400, message, param=field) from None
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop: received {len(stops)} strings; expected at most {MAX_STOP}", param="stop")
    return request


def stop_strings(request):
    """The request's stop strings, as a tuple."""
    return (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())


def chat_turns(request):
    """`[(role, text)]` of a chat request, roles as `keras_tune.decoding.conversation_prompt` takes them.

    Raises:
        ApiError: the conversation does not end with a user turn, or a system turn has no user turn after it.
    """
    roles = {"system": "system", "developer": "system", "user": "user", "assistant": "model", "model": "model"}
    turns = []
    for message in request.messages:
        text = message.content if isinstance(message.content, str) else "".join(p.text for p in message.content)
        turns.append((roles[message.role], text))
    if turns[-1][0] != "user":
        raise ApiError(400, f"messages: the last message is from '{request.messages[-1].role}'; expected the "
                            "conversation to end with a user message", param="messages")
    return turns


def new_id(prefix):
    """An id such as `cmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now():
    """Seconds since the epoch, as OpenAI's `created`."""
    return int(time.time())


def usage(prompt_tokens, completion_tokens):
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries, offset=0):
    """A completion choice's `logprobs`: tokens, their log-probabilities, alternatives and text offsets.

    Args:
        entries: `[(token text, logprob, {alternative text: logprob} or None)]`.
        offset: the text offset of the first entry.
    """
    tokens, values, tops, offsets = [], [], [], []
    for text, value, top in entries:
        tokens.append(text)
        values.append(value)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries):
    """A chat choice's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`.

    Args:
        entries: `[(token text, token bytes, logprob, [(alternative text, bytes, logprob)])]`.
    """
    return {"content": [
        {"token": text, "logprob": value, "bytes": list(raw),
         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(b)} for t, b, v in top]}
        for text, raw, value, top in entries
    ]}


def model_list(names, created):
    """`GET /v1/models`' body.

    Args:
        names: model names, the base preset first.
        created: when the server started (seconds since the epoch).
    """
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "keras_tune",
         "parent": None if index == 0 else names[0]}
        for index, name in enumerate(names)
    ]}
