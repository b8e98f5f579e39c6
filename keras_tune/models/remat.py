"""Memory levers on a model's decoder blocks: whole-block recomputation and selective recomputation.

`remat_scope` (`train.remat`) makes each block recompute its activations in the
backward pass; `keep_matmul_outputs_only` (`train.keep_activations=matmuls`)
keeps a block's weight matmuls' outputs and recomputes the rest.
"""

from keras_tune.models import families


def remat_scope(config):
    """With `train.remat`, a Keras `RematScope` that recomputes each decoder block in the backward pass.

    Layers take their rematerialization mode when they are created, so the
    model is built inside it. A block's activations are then the only thing
    the backward pass keeps of it (its input), at the cost of running its
    forward twice.

    Args:
        config: the run config.
    """
    import contextlib

    import keras

    if not config.train.remat:
        return contextlib.nullcontext()
    layers = int(families.get(config.model.family).backbone_kwargs(config)["num_layers"])
    return keras.RematScope(mode="list_of_layers", layer_names=[f"decoder_block_{i}" for i in range(layers)])


def keep_matmul_outputs_only(backbone):
    """Makes each decoder block's backward pass keep only its weight matmuls' outputs (selective recomputation).

    The block runs under `jax.checkpoint` with JAX's
    `dots_with_no_batch_dims_saveable` policy: the outputs of q/k/v, the
    attention output and the gate/up/down projections (LoRA's too) are kept,
    and the rest of the block (norms, tanh-GELU, the attention scores, their
    softmax and both batched attention matmuls) is recomputed from them in the
    backward pass, as Korthikanti et al. (2022) recompute the attention core.
    The same numbers either way, fewer bytes kept, a little more compute
    (measured in BENCHMARKS.md), so it is `train.keep_activations`'s choice,
    not the default. Generation (a cache) runs the block as it is.

    Idempotent: a block already wrapped is left as it is.

    Args:
        backbone: a keras-hub `GemmaBackbone` (Gemma, Gemma 2) or `Gemma3Backbone`.

    Returns:
        The number of decoder blocks wrapped.
    """
    import jax

    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    wrapped = 0
    for block in backbone.transformer_layers:
        if getattr(block.call, "keras_tune_selective_remat", False):
            continue

        def call(x, _original=block.call, **kwargs):
            if kwargs.get("cache") is not None:  # generation: nothing to differentiate
                return _original(x, **kwargs)
            arrays = {name: value for name, value in kwargs.items() if hasattr(value, "shape")}
            static = {name: value for name, value in kwargs.items() if name not in arrays}
            return jax.checkpoint(lambda x, arrays: _original(x, **arrays, **static), policy=policy)(x, arrays)

        call.keras_tune_selective_remat = True
        block.call = call
        wrapped += 1
    return wrapped
