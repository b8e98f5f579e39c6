"""Continuous batching: a queue of sequences, a fixed set of slots, one decode step for all of them at a time.

One thread runs the loop. Each turn it admits waiting sequences into free
slots (prefilling their prompts), drops the ones whose client went away, and
runs one decode step for every slot; a sequence that ends (a stop token, a stop
string, `max_tokens`, the end of the context) frees its slot at once, so a
sequence that arrived while others were decoding joins them at the next step.
What a sequence produces goes to its `emit` callback, from the loop's thread,
as `Prompt`, `Token` and `Done` events (or `Failed`).

The queue is bounded: `submit` refuses (`QueueFull`) what would wait beyond
`max_queue` sequences, and, once `close` was called, everything (`Closed`);
the loop finishes what it holds before its thread ends.

Example:

```python
batcher = Batcher(engine, tokenizer.detokenize, max_queue=64)
batcher.start()
batcher.submit([Sequence(prompt_ids=[2, 651], adapter=0, max_new_tokens=16, emit=print)])
batcher.close(); batcher.join()
```
"""

import collections
import dataclasses
import logging
import threading

import numpy as np

from keras_tune.serve.text import TextStream

log = logging.getLogger("keras_tune.serve")


class QueueFull(Exception):
    """The queue holds `max_queue` waiting sequences already."""


class Closed(Exception):
    """The batcher no longer takes sequences (the server is shutting down)."""


@dataclasses.dataclass
class Prompt:
    """The prompt's scores (`echo` with `logprobs`): a row per prompt token after `<bos>`."""

    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


@dataclasses.dataclass
class Token:
    """One generated token and the text it made safe to send (maybe "")."""

    token_id: int
    text: str
    logprob: float = 0.0
    top_ids: tuple = ()
    top_logprobs: tuple = ()


@dataclasses.dataclass
class Done:
    """The sequence ended: why ("stop" or "length"), its last text, and its token counts."""

    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass
class Failed:
    """The sequence could not be finished (a failure of the model's step)."""

    message: str


@dataclasses.dataclass
class Sequence:  # many: one generated sequence's settings
    """One sequence to generate (a request's prompt, one of its `n` choices).

    Attributes:
        prompt_ids: the prompt's tokens, `<bos>` first.
        adapter: the adapter's index (0: the base model).
        max_new_tokens: tokens to generate at most (0: only score the prompt).
        emit: called with each event, from the batcher's thread.
        temperature: 0 for greedy.
        top_k: 0 for off.
        top_p: 1 for off.
        seed: the sampling seed.
        stop_ids: tokens that end the sequence (not part of its text).
        stop_strings: strings that end its text (not part of it).
        score_prompt: emit a `Prompt` event with the prompt's log-probabilities first.
        logprobs: give each `Token` its log-probability and alternatives.
    """

    prompt_ids: list
    adapter: int
    max_new_tokens: int
    emit: object
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple = ()
    stop_strings: tuple = ()
    score_prompt: bool = False
    logprobs: bool = False
    cancelled: bool = False
    # the loop's state
    position: int = 0
    next_token: int = 0
    generated: int = 0
    text: object = None


class Batcher:
    """The slots, the queue and the loop thread over a `keras_tune.serve.engine.DecodeEngine`.

    Args:
        engine: the decode engine.
        detokenize: token ids -> text (the model's tokenizer).
        max_queue: sequences that may wait for a slot.
    """

    def __init__(self, engine, detokenize, max_queue):
        self.engine, self._detokenize, self.max_queue = engine, detokenize, int(max_queue)
        self._slots = [None] * engine.slots
        self._waiting = collections.deque()
        self._condition = threading.Condition()
        self._closed = False
        self._thread = None
        self.counts = collections.Counter()

    # ---- the HTTP side

    def submit(self, sequences):
        """Queues `sequences` (all or none).

        Args:
            sequences: `Sequence`s.

        Raises:
            QueueFull: they would not all fit in the free slots and the queue.
            Closed: the batcher is shutting down.
        """
        with self._condition:
            if self._closed:
                raise Closed()
            free = self._slots.count(None)
            if len(self._waiting) + len(sequences) > self.max_queue + free:
                self.counts["refused"] += 1
                raise QueueFull()
            self._waiting.extend(sequences)
            self.counts["submitted"] += len(sequences)
            self._condition.notify()

    def cancel(self, sequences):
        """Marks `sequences` as abandoned (their client went away): their slots free at the next turn.

        Args:
            sequences: `Sequence`s given to `submit`.
        """
        with self._condition:
            for sequence in sequences:
                sequence.cancelled = True
            self._condition.notify()

    def stats(self):
        """`{"slots", "busy", "waiting", "submitted", "finished", "cancelled", "refused", "tokens"}`."""
        with self._condition:
            busy = sum(slot is not None for slot in self._slots)
            return {"slots": len(self._slots), "busy": busy, "waiting": len(self._waiting),
                    **{key: int(self.counts[key]) for key in ("submitted", "finished", "cancelled", "refused", "tokens")}}

    def start(self):
        """Starts the loop's thread."""
        self._thread = threading.Thread(target=self._run, name="keras_tune.serve.batcher", daemon=True)
        self._thread.start()

    def close(self):
        """Takes no more sequences; the loop finishes the ones it holds, then ends."""
        with self._condition:
            self._closed = True
            self._condition.notify()

    def join(self, timeout=None):
        """Waits for the loop to end (after `close`); returns whether it did.

        Args:
            timeout: seconds (None: as long as it takes).
        """
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    # ---- the loop

    def _run(self):
        while True:
            with self._condition:
                while not self._waiting and not self._busy() and not self._closed:
                    self._condition.wait()
                if self._closed and not self._waiting and not self._busy():
                    return
                admitted = self._admit()
            for slot, sequence in admitted:
                self._guarded(self._start, [(slot, sequence)], slot, sequence)
            self._drop_cancelled()
            busy = [(slot, s) for slot, s in enumerate(self._slots) if s is not None]
            if busy:
                self._guarded(self._step, busy)

    def _busy(self):
        return any(slot is not None for slot in self._slots)

    def _admit(self):
        """Pops waiting sequences into free slots (called holding the lock)."""
        admitted = []
        for slot, holder in enumerate(self._slots):
            while holder is None and self._waiting:
                sequence = self._waiting.popleft()
                if sequence.cancelled:
                    self.counts["cancelled"] += 1
                    continue
                self._slots[slot] = holder = sequence
                admitted.append((slot, sequence))
        return admitted

    def _guarded(self, work, busy, *args):
        """Runs `work(*args or busy)`; a failure fails the sequences in `busy` and frees their slots."""
        try:
            work(*(args or (busy,)))
        except Exception as error:  # a failed step must not end the server: its sequences fail, the rest go on
            log.exception("decode step failed")
            for slot, sequence in busy:
                self._free(slot)
                sequence.emit(Failed(f"the model's step failed: {type(error).__name__}: {error}"))

    def _free(self, slot):
        with self._condition:
            self._slots[slot] = None

    def _drop_cancelled(self):
        for slot, sequence in enumerate(self._slots):
            if sequence is not None and sequence.cancelled:
                self._free(slot)
                self.counts["cancelled"] += 1

    def _start(self, slot, sequence):
        """Prefills a sequence's prompt into its slot."""
        ids = list(sequence.prompt_ids)
        scores = self.engine.prefill(slot, ids, sequence.adapter, echo=sequence.score_prompt)
        if scores is not None:
            sequence.emit(Prompt(*scores))
        sequence.position, sequence.next_token = len(ids) - 1, ids[-1]
        sequence.text = TextStream(self._detokenize, sequence.stop_strings)
        if sequence.max_new_tokens <= 0:
            self._finish(slot, sequence, "length")

    def _step(self, busy):
        slots = self.engine.width(busy[-1][0] + 1)  # the leading slots that hold every busy one
        tokens, positions, adapters = (np.zeros(slots, np.int32) for _ in range(3))
        temperature, top_p = np.zeros(slots, np.float32), np.ones(slots, np.float32)
        top_k, seeds = np.zeros(slots, np.int32), np.zeros(slots, np.uint32)
        adapters[:] = busy[0][1].adapter  # idle slots follow the first busy one: one adapter for all stays uniform
        for slot, s in busy:
            tokens[slot], positions[slot], adapters[slot] = s.next_token, s.position, s.adapter
            temperature[slot], top_k[slot], top_p[slot], seeds[slot] = s.temperature, s.top_k, s.top_p, s.seed
        want_logprobs = any(s.logprobs for _, s in busy)
        result = self.engine.step(tokens, positions, adapters, temperature, top_k, top_p, seeds, want_logprobs)
        for slot, sequence in busy:
            self._advance(slot, sequence, result)

    def _advance(self, slot, sequence, result):
        token = int(result.tokens[slot])
        sequence.generated += 1
        sequence.position += 1
        sequence.next_token = token
        self.counts["tokens"] += 1
        if token in sequence.stop_ids:
            self._finish(slot, sequence, "stop")
            return
        piece = sequence.text.add(token)
        if sequence.logprobs:
            event = Token(token, piece, float(result.logprobs[slot]), tuple(result.top_ids[slot].tolist()),
                          tuple(result.top_logprobs[slot].tolist()))
        else:
            event = Token(token, piece)
        sequence.emit(event)
        if sequence.text.stopped:
            self._finish(slot, sequence, "stop")
        elif sequence.generated >= sequence.max_new_tokens or sequence.position >= self.engine.context:
            self._finish(slot, sequence, "length")

    def _finish(self, slot, sequence, reason):
        self._free(slot)
        self.counts["finished"] += 1
        rest = sequence.text.finish() if sequence.text is not None else ""
        sequence.emit(Done(reason, rest, len(sequence.prompt_ids), sequence.generated))

