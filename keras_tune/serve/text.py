"""Token ids to text as it streams: pieces that only grow, incomplete characters and stop strings held back.

A sequence's text is always the tokenizer's detokenization of all its tokens so
far; a piece is what that text adds to what was already sent. Text that may
still change is held back: a trailing replacement character (a multi-byte
character whose bytes have not all arrived) and any tail that could be the
start of a stop string. When a stop string appears, the text ends just before
it. So the pieces of a streamed answer join to exactly the text of the same
answer unstreamed.

Example:

```python
stream = TextStream(tokenizer.detokenize, stop=("\\n\\n",))
piece = stream.add(token_id)      # "" while held back
if stream.stopped: ...
rest = stream.finish()            # what was held back, at the end
```
"""

REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one generated sequence, handed out in pieces.

    Args:
        detokenize: token ids (a list of ints) -> text; the model's tokenizer.
        stop: strings that end the text (not included in it).
    """

    def __init__(self, detokenize, stop=()):
        self._detokenize = detokenize
        self._stop = tuple(s for s in stop if s)
        self._ids = []
        self.sent = ""
        self.stopped = False

    def _text(self):
        import numpy as np

        return str(self._detokenize(np.asarray(self._ids, dtype="int32"))) if self._ids else ""

    def _ready(self, text, final):
        """`(text that may be sent, whether a stop string ended it)`."""
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], True
        if final:
            return text, False
        if text.endswith(REPLACEMENT):
            text = text.rstrip(REPLACEMENT)
        # A tail that may grow into a stop string waits (the longest such tail over all of them).
        held = max((size for stop in self._stop for size in range(1, min(len(stop) - 1, len(text)) + 1)
                    if text.endswith(stop[:size])), default=0)
        return text[: len(text) - held], False

    def _piece(self, text):
        if not text.startswith(self.sent):  # the tokenizer rewrote earlier text: wait for it to settle
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def add(self, token_id):
        """Adds a generated token; returns the new text that is safe to send ("" if none).

        Args:
            token_id: the token.
        """
        self._ids.append(int(token_id))
        text, self.stopped = self._ready(self._text(), final=False)
        return self._piece(text)

    def finish(self):
        """Returns the text still held back, now that no token follows."""
        if self.stopped:
            return ""
        text, self.stopped = self._ready(self._text(), final=True)
        return self._piece(text)
