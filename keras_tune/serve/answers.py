"""A request's answer: the OpenAI response body, or its stream chunks, built from its sequences' events.

The batcher emits `Prompt`, `Token` and `Done` events a sequence (one a choice);
an `Answer` collects them into `whole()` (the non-streamed body) or turns each
into chunks as it comes (`opening`, `chunks`, `closing`): `text_completion`
objects for `/v1/completions`, `chat.completion(.chunk)` objects for chat.
Token texts and alternatives come from the service (`Service.piece`).

Example:

```python
answer = ChatAnswer(service, request, [prompt_ids], protocol.new_id("chatcmpl"))
for index, event in events:
    answer.add(index, event)
body = answer.whole()
```
"""

from keras_tune.serve import protocol
from keras_tune.serve.batcher import Done, Prompt, Token


class Answer:
    """What a request's sequences produced so far, as a whole response or stream chunks.

    Args:
        service: the `keras_tune.serve.app.Service` (token texts).
        request: the parsed request.
        prompts: the prompts' token lists (`n` choices each).
        answer_id: the response's `id`.
    """

    def __init__(self, service, request, prompts, answer_id):
        self.service, self.request, self.id = service, request, answer_id
        self.prompt_tokens = sum(len(p) for p in prompts)
        count = len(prompts) * (request.n or 1)
        self.text = [""] * count
        self.entries = [[] for _ in range(count)]
        self.finish = [None] * count
        self.completion_tokens = 0

    def add(self, index, event):
        """Records one event of choice `index`.

        Args:
            index: the choice.
            event: a batcher event.
        """
        if isinstance(event, Token):
            self.text[index] += event.text
            self.entries[index].append(event)
        elif isinstance(event, Done):
            self.text[index] += event.text
            self.finish[index] = event.reason
            self.completion_tokens += event.completion_tokens

    def usage(self):
        """The usage object so far."""
        return protocol.usage(self.prompt_tokens, self.completion_tokens)

    def whole(self):
        """The non-streamed response body, once every choice is done."""
        raise NotImplementedError

    def opening(self):
        """Chunks sent before any event."""
        return []

    def chunks(self, index, event):
        """Records an event and returns the chunks it makes.

        Args:
            index: the choice.
            event: a batcher event.
        """
        raise NotImplementedError

    def closing(self):
        """The usage chunk, when `stream_options.include_usage` asks for it."""
        if (self.request.stream_options or {}).get("include_usage"):
            return [dict(self._chunk_head(), choices=[], usage=self.usage())]
        return []

    def _chunk_head(self):
        raise NotImplementedError


class CompletionAnswer(Answer):
    """A `/v1/completions` answer: `text_completion` objects, with `echo` and per-token `logprobs`.

    Args:
        service: the `keras_tune.serve.app.Service`.
        request: the parsed `CompletionRequest`.
        texts: the prompts' texts (what `echo` repeats).
        prompts: their token lists.
        answer_id: the response's `id`.
    """

    def __init__(self, service, request, texts, prompts, answer_id):
        super().__init__(service, request, prompts, answer_id)
        self.texts, self.prompts = texts, prompts
        self.prompt_entries = [None] * len(self.text)

    def _head(self):
        return {"id": self.id, "object": "text_completion", "created": protocol.now(), "model": self.request.model}

    _chunk_head = _head

    def _prompt_of(self, index):
        return index // (self.request.n or 1)

    def add(self, index, event):
        if isinstance(event, Prompt):
            ids = self.prompts[self._prompt_of(index)][1:]
            self.prompt_entries[index] = self._entries(ids, event.logprobs, event.top_ids, event.top_logprobs)
            return
        super().add(index, event)

    def _entries(self, ids, values, top_ids, top_values):
        count = self.request.logprobs or 0
        entries = []
        for token, value, alt_ids, alt_values in zip(ids, values, top_ids, top_values):
            alternatives = {text: value for text, _, value in self.service.alternatives(alt_ids, alt_values, count)}
            entries.append((self.service.piece(token)[0], float(value), alternatives if count else None))
        return entries

    def _logprobs(self, index, tokens, with_prompt):
        if self.request.logprobs is None:
            return None
        entries = list(self.prompt_entries[index] or []) if with_prompt else []
        entries += self._entries([t.token_id for t in tokens], [t.logprob for t in tokens],
                                 [t.top_ids for t in tokens], [t.top_logprobs for t in tokens])
        return protocol.completion_logprobs(entries)

    def _echo(self, index):
        return self.texts[self._prompt_of(index)] if self.request.echo else ""

    def whole(self):
        choices = [
            {"index": i, "text": self._echo(i) + self.text[i], "logprobs": self._logprobs(i, self.entries[i], True),
             "finish_reason": self.finish[i]}
            for i in range(len(self.text))
        ]
        return dict(self._head(), choices=choices, usage=self.usage())

    def opening(self):
        if not self.request.echo or self.request.logprobs is not None:
            return []  # with logprobs, the echoed prompt comes with its scores (a `Prompt` event)
        return [self._chunk(i, self._echo(i), None, None) for i in range(len(self.text))]

    def chunks(self, index, event):
        self.add(index, event)
        if isinstance(event, Prompt):
            if not self.request.echo:
                return []
            return [self._chunk(index, self._echo(index), protocol.completion_logprobs(self.prompt_entries[index]), None)]
        if isinstance(event, Token):
            logprobs = self._logprobs(index, [event], False)
            return [self._chunk(index, event.text, logprobs, None)] if event.text or logprobs else []
        if isinstance(event, Done):
            return [self._chunk(index, event.text, None, event.reason)]
        return []

    def _chunk(self, index, text, logprobs, reason):
        return dict(self._head(), choices=[{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}])


class ChatAnswer(Answer):
    """A `/v1/chat/completions` answer: `chat.completion` and `chat.completion.chunk` objects."""

    def _head(self):
        return {"id": self.id, "object": "chat.completion", "created": protocol.now(), "model": self.request.model}

    def _logprobs(self, tokens):
        if not self.request.logprobs:
            return None
        count = self.request.top_logprobs or 0
        return protocol.chat_logprobs([
            (*self.service.piece(t.token_id), t.logprob, self.service.alternatives(t.top_ids, t.top_logprobs, count))
            for t in tokens
        ])

    def whole(self):
        choices = [
            {"index": i, "message": {"role": "assistant", "content": self.text[i]},
             "logprobs": self._logprobs(self.entries[i]), "finish_reason": self.finish[i]}
            for i in range(len(self.text))
        ]
        return dict(self._head(), choices=choices, usage=self.usage())

    def _chunk_head(self):
        return dict(self._head(), object="chat.completion.chunk")

    def _chunk(self, index, delta, logprobs=None, reason=None):
        return dict(self._chunk_head(), choices=[{"index": index, "delta": delta, "logprobs": logprobs,
                                                  "finish_reason": reason}])

    def opening(self):
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(len(self.text))]

    def chunks(self, index, event):
        self.add(index, event)
        if isinstance(event, Token):
            logprobs = self._logprobs([event])
            return [self._chunk(index, {"content": event.text}, logprobs)] if event.text or logprobs else []
        if isinstance(event, Done):
            found = [self._chunk(index, {"content": event.text})] if event.text else []
            return found + [self._chunk(index, {}, None, event.reason)]
        return []
