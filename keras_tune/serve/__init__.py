"""An OpenAI-compatible server for a tuned model: `python -m keras_tune.serve`.

One room a concern, each usable without the HTTP layer:

- `adapters.py`: several LoRA adapters over one frozen base, as per-layer tables
  the decode step indexes by request.
- `engine.py`: the compiled prefill and decode steps over a fixed set of slots,
  each slot at its own position in one key/value cache, through the model's own
  `call_with_cache` (so a greedy answer equals keras-hub's `generate`).
- `sampling.py`: greedy, temperature, top-k and top-p sampling a slot, seeded.
- `text.py`: token ids to streamed text, with stop strings held back.
- `batcher.py`: continuous batching: a queue, slots that requests join at the
  next step and leave when done, cancellation and draining.
- `protocol.py`: the OpenAI request bodies, their checks, and response bodies.
- `app.py`: the FastAPI routes, server-sent events and OpenAI-style errors.
- `__main__.py`: the command-line shell.

See docs/serving.md for how to start it and call it.
"""
