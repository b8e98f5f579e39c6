"""`RecurrentGemmaCausalLM`: a keras-hub `CausalLM` over the Griffin backbone.

Training, `evaluate`, `stateless_call` and checkpoints see a plain functional
model from `{"token_ids", "padding_mask"}` to soft-capped logits, as with
keras-hub's `GemmaCausalLM`. `generate` (keras-hub's, with any of its samplers)
keeps a constant-size cache: per recurrent block the RG-LRU state and the last
three convolution inputs, per attention block a ring buffer of at most
`attention_window_size` keys and values. Generating more tokens never makes it
bigger.

Example:

```python
causal_lm = RecurrentGemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
causal_lm.generate("Translate this into French:\\nHello\\n", max_length=32)
```
"""

import keras
from keras import ops
from keras_hub.models import CausalLM

from keras_tune.models.recurrent_gemma.backbone import RecurrentGemmaBackbone
from keras_tune.models.recurrent_gemma.preprocessor import RecurrentGemmaCausalLMPreprocessor


@keras.saving.register_keras_serializable(package="keras_tune")
class RecurrentGemmaCausalLM(CausalLM):
    """RecurrentGemma for causal language modelling: fit, evaluate and generate.

    Args:
        backbone: a `RecurrentGemmaBackbone`.
        preprocessor: a `RecurrentGemmaCausalLMPreprocessor`, or None for
            already-tokenized inputs.
    """

    backbone_cls = RecurrentGemmaBackbone
    preprocessor_cls = RecurrentGemmaCausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional Model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)
        outputs = backbone.token_embedding(hidden_states, reverse=True)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    def compile(self, optimizer="auto", loss="auto", *, weighted_metrics="auto", sampler="greedy", **kwargs):
        """keras-hub's `CausalLM.compile`, with greedy sampling by default (as Gemma)."""
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, sampler=sampler, **kwargs)

    def call_with_cache(self, token_ids, cache, cache_update_index):
        """One step of generation: the token at `cache_update_index`, from and to the cache.

        Args:
            token_ids: `(batch, 1)` int tokens, all at position `cache_update_index`.
            cache: one state per block (see `build_cache`).
            cache_update_index: the tokens' position (int or scalar tensor).

        Returns:
            `(logits, hidden_states, cache)`.
        """
        backbone = self.backbone
        x = backbone.embed(token_ids)
        positions = ops.full(ops.shape(token_ids), cache_update_index, dtype="int32")
        caches = []
        for block, block_cache in zip(backbone.transformer_layers, cache):
            x, block_cache = block.call(x, positions, cache=block_cache)  # see `build_cache`
            caches.append(block_cache)
        hidden_states = backbone.layer_norm(x)
        logits = backbone.token_embedding(hidden_states, reverse=True)
        return logits, hidden_states, tuple(caches)

    def build_cache(self, token_ids, length):
        """Runs the prompt buffer once and keeps each block's state after its first `length` tokens.

        The pass covers the whole `(batch, max_length)` buffer (static shapes);
        what comes after `length` does not reach the states (everything is
        causal). Attention caches hold `min(attention_window_size, max_length)`
        positions.

        Args:
            token_ids: `(batch, max_length)` int tokens, right-padded.
            length: how many tokens (the same for every row) the cache covers.

        Returns:
            `(hidden_states, cache)`.
        """
        backbone = self.backbone
        cache_size = min(backbone.attention_window_size, int(token_ids.shape[1]))
        positions = ops.broadcast_to(ops.arange(ops.shape(token_ids)[1], dtype="int32")[None], ops.shape(token_ids))
        segments = ops.ones_like(positions)
        x = backbone.embed(token_ids)
        caches = []
        for block in backbone.transformer_layers:
            # `call`, not `__call__`: generation has no backward pass to rematerialize for, and
            # `train.remat` wraps `__call__` in `jax.checkpoint`, which would trace `cache_size`.
            x, block_cache = block.call(x, positions, segments, cache_length=length, cache_size=cache_size)
            caches.append(block_cache)
        return backbone.layer_norm(x), tuple(caches)

    def generate_step(self, inputs, stop_token_ids=None):
        """A compilable generation function for one batch (keras-hub's `CausalLM` contract).

        Every row steps through the same position at once: the prompt before the
        shortest row's end is run in one pass (`build_cache`); from there, one
        token a step, keeping the prompt's own tokens where a row's prompt is
        longer (keras-hub's sampler does that).

        Args:
            inputs: `{"token_ids", "padding_mask"}`, right-padded to the maximum length.
            stop_token_ids: token ids that end a row.
        """
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        row_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)
        index = ops.min(row_lengths)
        hidden_states, cache = self.build_cache(token_ids, index - 1)

        def next(prompt, cache, index):
            batch_size = ops.shape(prompt)[0]
            prompt = ops.slice(prompt, [0, index - 1], [batch_size, 1])
            logits, hidden_states, cache = self.call_with_cache(prompt, cache, index - 1)
            return ops.squeeze(logits, axis=1), ops.squeeze(hidden_states, axis=1), cache

        token_ids = self.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )
        return {"token_ids": token_ids, "padding_mask": _generated_mask(token_ids, padding_mask, stop_token_ids)}


def _generated_mask(token_ids, padding_mask, stop_token_ids):
    """Valid positions after generation: everything up to and including the first new stop token."""
    if stop_token_ids is None:
        return ops.ones_like(token_ids, dtype="bool")
    new = ops.logical_not(ops.cast(padding_mask, "bool"))
    ends = ops.zeros_like(token_ids, dtype="bool")
    for stop in stop_token_ids:
        ends = ops.logical_or(ends, ops.logical_and(new, ops.equal(token_ids, stop)))
    ends = ops.cast(ends, "int32")
    after = ops.cumsum(ends, axis=-1) - ends
    return ops.logical_not(ops.cast(after, "bool"))
