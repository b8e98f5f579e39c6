"""The decode engine: compiled prefill and decode steps over a fixed set of slots sharing one KV cache.

keras-hub's CausalLMs decode a batch with one `cache_update_index` for every
row. Continuous batching needs each row (a *slot*) at its own position, so the
decode step maps the model's own `call_with_cache` over the slots with
`jax.vmap`: inside, each slot is a batch of one at its own index, and keras-hub's
code (rotary positions, the cache update, the causal and sliding-window masks)
runs unchanged on it. The weights are the model's own, read once through a
`keras.StatelessScope`; a greedy answer equals keras-hub's `generate`.

- The cache is the family's (`Family.decode_cache`): rows on axis 0, one a
  slot, `context` positions each, placed as the model's distribution places a
  batch (split over the mesh's batch axis; the weights stay sharded as in
  training). Both steps update it in place (donated buffers).
- `prefill` writes a prompt's keys and values into one slot, the prompt
  right-padded to a length bucket (powers of two up to the context), so a
  handful of shapes is ever compiled. It can also return the log-probability of
  every prompt token (`echo` with `logprobs`).
- `step` feeds each slot its next token at its position and returns each
  slot's choice (`keras_tune.serve.sampling`), with log-probabilities when asked.
  It decodes only the leading slots that hold every busy one, rounded up to a
  power of two (`widths`), so one client is not decoded as sixteen.
- Adapters (`keras_tune.serve.adapters`): when every busy slot uses the same
  one, its rows stand in for the LoRA variables (the model then computes what a
  model with that adapter loaded computes); when they differ, each slot gets its
  own rows inside the vmap, at the cost of a merged kernel a slot in the
  adapted layers.

Example:

```python
engine = DecodeEngine(causal_lm, adapters, slots=8, context=1024)
engine.prefill(slot=0, prompt_ids=[2, 651, 6037, 235292], adapter=0)
out = engine.step(tokens, positions, adapter_ids, temperature, top_k, top_p, seeds)
```
"""

import dataclasses

import numpy as np

from keras_tune import decoding
from keras_tune.errors import UserError
from keras_tune.serve import sampling

SMALLEST_BUCKET = 16
ECHO_TOP = 5  # alternatives a prompt token may list (OpenAI's completions allow logprobs up to 5)


def buckets_for(context):
    """Prefill lengths: powers of two from `SMALLEST_BUCKET`, and `context` itself.

    Args:
        context: positions a slot holds.
    """
    lengths, length = [], SMALLEST_BUCKET
    while length < context:
        lengths.append(length)
        length *= 2
    return tuple(lengths) + (context,)


def cache_spec(family, backbone, compute_dtype):
    """The shapes of a one-row, one-position cache of `family`, or None when it cannot be served.

    Cheap (no memory): what the server checks before loading any weights.

    Args:
        family: a `keras_tune.models.families.Family`.
        backbone: the model's backbone (an abstract one works).
        compute_dtype: the model's compute dtype.
    """
    import types

    import jax

    stand_in = types.SimpleNamespace(backbone=backbone, compute_dtype=compute_dtype)
    return jax.eval_shape(lambda: family.decode_cache(stand_in, 1, 1))


def widths_for(slots, multiple=1):
    """How many leading slots a decode step may cover: powers of two that are multiples of `multiple`, and `slots`.

    A step decodes only as many slots as the highest busy one needs (sequences
    take the lowest free slot), so one client does not pay for sixteen.

    Args:
        slots: the slots.
        multiple: the mesh's batch axis, which splits a step's slots.
    """
    widths, width = [], 1
    while width < slots:
        if width % multiple == 0:
            widths.append(width)
        width *= 2
    return tuple(widths) + (slots,)


@dataclasses.dataclass
class StepResult:
    """One decode step's output, numpy arrays `[slots]` (and `[slots, sampling.TOP_LOGPROBS]`).

    Attributes:
        tokens: each slot's next token.
        logprobs: its log-probability under the model (zeros unless asked for).
        top_ids: the likeliest tokens a slot (zeros unless asked for).
        top_logprobs: their log-probabilities.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


class DecodeEngine:
    """Compiled prefill and decode steps for `slots` sequences of up to `context` tokens each.

    Args:
        causal_lm: a keras-hub CausalLM whose family has a `decode_cache`, built
            under its distribution; LoRA layers only as `adapters` added them.
        adapters: a `keras_tune.serve.adapters.AdapterSet`.
        slots: sequences decoded together.
        context: positions a sequence may take, prompt included.
    """

    def __init__(self, causal_lm, adapters, slots, context):
        import jax
        import jax.numpy as jnp

        from keras_tune.models import families

        family = families.of_model(causal_lm)
        cache = family.decode_cache(causal_lm, slots, context)
        if cache is None:
            raise UserError(f"{family.title} models cannot be served (keras_tune.serve needs a per-slot "
                            "key/value cache); expected a Gemma, Gemma 2 or Gemma 3 preset")
        self.causal_lm, self.adapters = causal_lm, adapters
        self.slots, self.context = int(slots), int(context)
        self.buckets = buckets_for(self.context)
        self.widths = widths_for(self.slots, decoding.batch_axis_size())
        lora = [variable for pair in adapters.variables for variable in pair]
        lora_ids = {id(variable) for variable in lora}
        self._base_variables = [v for v in causal_lm.backbone.weights if id(v) not in lora_ids]
        self._lora_variables = lora
        self._base_values = [v.value for v in self._base_variables]
        self._tables = [
            jnp.asarray(table, dtype=variable.dtype)
            for pair, variables in zip(adapters.tables, adapters.variables)
            for table, variable in zip(pair, variables)
        ]
        placed = _place_rows(cache)
        self._cache_shardings = jax.tree.map(lambda leaf: leaf.sharding, placed)
        self.cache = jax.device_put(placed, self._cache_shardings)  # committed, as the steps' outputs are
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("echo",), donate_argnums=(2,))
        self._decode = jax.jit(self._decode_fn, static_argnames=("mixed",), donate_argnums=(2,))

    # ---- traced functions

    def _forward(self, base_values, lora_values, token_ids, cache, index):
        """The model's `call_with_cache` on the given weights: `(logits, cache)`."""
        import keras

        mapping = list(zip(self._base_variables, base_values)) + list(zip(self._lora_variables, lora_values))
        with keras.StatelessScope(state_mapping=mapping):
            logits, _, cache = self.causal_lm.call_with_cache(
                token_ids=token_ids, cache=cache, cache_update_index=index
            )
        return logits, cache

    def _prefill_fn(self, base_values, tables, cache, slot, adapter, token_ids, targets, echo):  # many: one jitted call's operands
        import jax

        lora = [table[adapter] for table in tables]
        row = jax.tree.map(lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, slot, 1, axis=0), cache)
        logits, row = self._forward(base_values, lora, token_ids, row, 0)
        cache = jax.tree.map(lambda leaf, new: jax.lax.dynamic_update_slice_in_dim(leaf, new, slot, axis=0), cache, row)
        cache = jax.tree.map(jax.lax.with_sharding_constraint, cache, self._cache_shardings)
        if not echo:
            return cache, None
        return cache, sampling.log_probabilities(logits[0], targets[0], ECHO_TOP)

    def _decode_fn(self, base_values, tables, cache, tokens, positions, adapter_ids, settings, mixed):  # many: one jitted call's operands
        import jax
        import jax.numpy as jnp

        temperature, top_k, top_p, seeds, want_logprobs = settings
        lora = [table[adapter_ids] if mixed else table[adapter_ids[0]] for table in tables]

        def one_slot(token, position, cache_row, lora_row):
            cache_row = jax.tree.map(lambda leaf: leaf[None], cache_row)
            logits, cache_row = self._forward(base_values, lora_row, token[None, None], cache_row, position)
            return logits[0, 0], jax.tree.map(lambda leaf: leaf[0], cache_row)

        width = tokens.shape[0]  # the first `width` slots hold every busy one
        rows = jax.tree.map(lambda leaf: leaf[:width], cache)
        logits, rows = jax.vmap(one_slot, in_axes=(0, 0, 0, 0 if mixed else None))(tokens, positions, rows, lora)
        cache = jax.tree.map(lambda leaf, new: jax.lax.dynamic_update_slice_in_dim(leaf, new, 0, axis=0), cache, rows)
        cache = jax.tree.map(jax.lax.with_sharding_constraint, cache, self._cache_shardings)
        chosen = sampling.choose(logits, temperature, top_k, top_p, seeds, positions + 1)
        count = sampling.TOP_LOGPROBS
        logprobs = jax.lax.cond(
            want_logprobs,
            lambda: sampling.log_probabilities(logits, chosen, count),
            lambda: (jnp.zeros(chosen.shape, jnp.float32), jnp.zeros(chosen.shape + (count,), jnp.int32),
                     jnp.zeros(chosen.shape + (count,), jnp.float32)),
        )
        return cache, chosen, logprobs

    # ---- calls

    def bucket(self, length):
        """The prefill length that holds `length` tokens.

        Args:
            length: tokens to prefill (at most the context).
        """
        return next(b for b in self.buckets if b >= length)

    def prefill(self, slot, prompt_ids, adapter, echo=False):
        """Writes the keys and values of all but the last prompt token into `slot`, from position 0.

        The last token is what the slot's first decode step feeds (as keras-hub's
        `generate` does), so its answer starts at the next step.

        Args:
            slot: which slot.
            prompt_ids: the whole prompt (`<bos>` first).
            adapter: the adapter's index (0: the base).
            echo: also return, for every prompt token after the first, its log-probability and the
                `ECHO_TOP` likeliest tokens at its position.

        Returns:
            None, or `(logprobs [n-1], top ids [n-1, ECHO_TOP], top logprobs [n-1, ECHO_TOP])` with `echo`.
        """
        count = len(prompt_ids) - 1
        if count < 1:
            empty = np.zeros((0, ECHO_TOP))
            return (np.zeros(0), empty.astype(np.int32), empty) if echo else None
        length = self.bucket(count)
        token_ids = np.zeros((1, length), np.int32)
        token_ids[0, :count] = prompt_ids[:-1]
        targets = np.zeros((1, length), np.int32)
        targets[0, :count] = prompt_ids[1:]
        self.cache, scores = self._prefill(
            self._base_values, self._tables, self.cache, np.int32(slot), np.int32(adapter), token_ids, targets,
            echo=bool(echo),
        )
        if scores is None:
            return None
        chosen, top_ids, top_values = (np.asarray(x) for x in scores)
        return chosen[:count], top_ids[:count], top_values[:count]

    def width(self, busy_until):
        """How many leading slots a step decodes when slots below `busy_until` may be busy.

        Args:
            busy_until: one past the highest busy slot.
        """
        return next(w for w in self.widths if w >= busy_until)

    def step(self, tokens, positions, adapter_ids, temperature, top_k, top_p, seeds, want_logprobs=False):  # many: one array a slot setting
        """One decode step over the first `len(tokens)` slots (a `widths` entry); idle ones among them are ignored.

        Idle slots are fed token 0 at position 0. Each argument holds one entry a
        slot, for slots `0 .. len(tokens) - 1`.

        Args:
            tokens: int, each slot's input token.
            positions: int, its position.
            adapter_ids: int, its adapter (all equal: the faster uniform path).
            temperature: float (0: greedy).
            top_k: int (0: off).
            top_p: float (1: off).
            seeds: uint32.
            want_logprobs: also compute log-probabilities (some slot asked for them).

        Returns:
            A `StepResult`.
        """
        adapter_ids = np.asarray(adapter_ids, np.int32)
        mixed = bool(self._tables) and bool((adapter_ids != adapter_ids[0]).any())
        settings = (
            np.asarray(temperature, np.float32), np.asarray(top_k, np.int32), np.asarray(top_p, np.float32),
            np.asarray(seeds, np.uint32), np.bool_(want_logprobs),
        )
        self.cache, chosen, logprobs = self._decode(
            self._base_values, self._tables, self.cache, np.asarray(tokens, np.int32),
            np.asarray(positions, np.int32), adapter_ids, settings, mixed=mixed,
        )
        return StepResult(np.asarray(chosen), *(np.asarray(x) for x in logprobs))

    def warm_up(self, log=None):
        """Compiles the decode step and every prefill bucket now, so no request waits for a compile.

        Args:
            log: where to say what is compiled (None: quiet).
        """
        import time

        started = time.perf_counter()
        for width in self.widths:
            idle = np.zeros(width, np.int32)
            self.step(idle, idle, idle, np.zeros(width), idle, np.ones(width), idle.astype(np.uint32))
        for length in self.buckets:
            self.prefill(0, [0] * (length + 1), 0)
        if log:
            log(f"compiled the decode step for {', '.join(map(str, self.widths))} slots and {len(self.buckets)} "
                f"prefill lengths ({', '.join(map(str, self.buckets))}) in {time.perf_counter() - started:.1f}s")


def _place_rows(cache):
    """Places every cache leaf on the active keras distribution's mesh: rows over its batch axis, heads over the other.

    Pinned in both compiled steps too, so the cache keeps one placement (a step
    whose output placement differed from its input's would compile twice).
    """
    import jax
    import keras

    distribution = keras.distribution.distribution()
    mesh = getattr(distribution, "device_mesh", None)
    if mesh is None:
        return cache
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    batch_axis = getattr(distribution, "batch_dim_name", None) or mesh.axis_names[0]
    other_axes = [name for name in mesh.axis_names if name != batch_axis]

    def place(leaf):
        axes = [None] * leaf.ndim
        if leaf.shape[0] % sizes[batch_axis] == 0:
            axes[0] = batch_axis
        if other_axes and leaf.shape[-2] % sizes[other_axes[0]] == 0:
            axes[-2] = other_axes[0]  # key/value heads, as the attention's projections split them
        return keras.distribution.distribute_tensor(leaf, keras.distribution.TensorLayout(axes, mesh))

    return jax.tree.map(place, cache)
