"""Every private API keras_tune touches, in one place.

Each function wraps one attribute that Keras, keras-hub or gguf do not promise
to keep, says why we need it, and is covered by a test. `pyproject.toml` pins
upper bounds at the next release that could move these, and `constraints.txt`
records the exact versions the suite passes on; when a bound is raised, this
module is the one file to check.
"""


def keras_global_attribute(name, default=None):
    """Reads a Keras global-state attribute (`keras.src.backend.common.global_state`).

    Used for the deferred-variable queue (planning abstract models without
    materializing them) and the global `SeedGenerator` (checkpointed so a
    resumed run samples the same dropout masks).

    Args:
        name: the attribute, e.g. "uninitialized_variables".
        default: returned when the attribute is unset.
    """
    from keras.src.backend.common import global_state

    return global_state.get_global_attribute(name, default)


def set_keras_global_attribute(name, value):
    """Sets a Keras global-state attribute (see `keras_global_attribute`).

    Args:
        name: the attribute.
        value: its new value.
    """
    from keras.src.backend.common import global_state

    global_state.set_global_attribute(name, value)


def sublayers(layer):
    """Every layer nested under `layer`, depth first, `layer` itself excluded.

    Keras' public `Layer` has no recursive walk; `_flatten_layers` is what
    `Model.summary` and keras-hub's own `enable_lora` use.

    Args:
        layer: a Keras layer or model.
    """
    return list(layer._flatten_layers(include_self=False))


def base_kernel(layer):
    """The kernel variable of a LoRA-enabled `Dense`/`EinsumDense`, without the update.

    With LoRA on, the public `layer.kernel` returns `kernel + A @ B * scale`
    (a tensor); merging must assign into the stored variable, `_kernel`.

    Args:
        layer: a Keras `Dense` or `EinsumDense` layer.
    """
    return layer._kernel


def set_kerashub_lora_state(backbone, layer_indices, rank):
    """Registers LoRA layers on a keras-hub backbone as `Backbone.enable_lora` does.

    keras-hub's `save_lora_weights`/`load_lora_weights` read `_lora_enabled_layers`
    (indices into `[l for l in sublayers(backbone) if l.weights]`) and `_lora_rank`;
    there is no public setter, and `enable_lora` itself cannot take an alpha.

    Args:
        backbone: a keras-hub Backbone.
        layer_indices: positions of the LoRA layers in that list.
        rank: the LoRA rank.
    """
    backbone._lora_enabled_layers = list(layer_indices)
    backbone._lora_rank = rank


def gguf_dequantizable(qtype):
    """Whether the installed `gguf` package can dequantize tensors of ggml type `qtype`.

    `gguf.quants` registers its (de)quantizers in `_type_traits`; there is no
    public listing, and `dequantize` on an unregistered type raises deep inside.

    Args:
        qtype: a `gguf.GGMLQuantizationType`.
    """
    import gguf

    return qtype in gguf.quants._type_traits


def wrap_attention_mask(decoder_block, wrap):
    """Replaces a keras-hub Gemma decoder block's `_compute_attention_mask` with `wrap(original)`.

    keras-hub's Gemma, Gemma 2 and Gemma 3 blocks build their causal + padding
    (+ sliding window, in the attention layer) mask in this private method and
    take no other mask input; wrapping it is how packed documents are masked
    apart without a copy of keras-hub's model code (`keras_tune.models.document_mask`).

    Args:
        decoder_block: a `GemmaDecoderBlock` or `Gemma3DecoderBlock`.
        wrap: `original -> replacement`, both with the method's signature.

    Returns:
        False when the block was already wrapped (nothing is done twice).
    """
    original = decoder_block._compute_attention_mask
    if getattr(original, "keras_tune_wrapped", False):
        return False
    replacement = wrap(original)
    replacement.keras_tune_wrapped = True
    decoder_block._compute_attention_mask = replacement
    return True


def initialize_deferred_variable(variable, value):
    """Gives a variable created under `StatelessScope(initialize_variables=False)` its first value.

    This is what `Variable.__init__` does with a concrete initial value: record
    the shape, take the layout the active distribution assigns and store the
    value. Nothing public turns a deferred variable into a concrete one without
    running its initializer, which for a 268M-parameter model costs seconds
    that are thrown away when the real weights arrive (`keras_tune.models.gguf`).

    Args:
        variable: a deferred (uninitialized) Keras variable.
        value: its first value, of the variable's shape and dtype.
    """
    variable._initialize(value)
    variable._initializer = None  # as `Variable._deferred_initialize` leaves it


def untracked_attributes():
    """A scope in which Keras layers do not wrap attribute values for dependency tracking.

    keras-hub's `SentencePieceTokenizer.set_proto` stores a 262k-entry vocabulary
    list and dict on the layer; tracking them costs 2.5 s and tracks nothing of use.
    """
    from keras.src.utils import tracking

    return tracking.DotNotTrackScope()


def set_random_seed(seed):
    """`keras.utils.set_random_seed` without `tf.random.set_seed`.

    `tf.random.set_seed` clears TensorFlow's eager kernel cache, and
    tensorflow-text's SentencePiece op owns its model resource through its
    kernel: every Gemma tokenizer built before the call stops working ("Resource
    ..._SentencepieceOp does not exist"), e.g. a notebook's second model. Here
    Python's, NumPy's, Keras' and TensorFlow's global seeds are set as Keras
    sets them, and the kernel cache is left alone.

    Args:
        seed: the integer seed.
    """
    import random

    import numpy as np
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils

    set_keras_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, int(seed))
    set_keras_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)
    # TensorFlow's global seed still decides tf.data's shuffle order (it combines with
    # each op's seed), so a run's batches must not depend on what ran before in the
    # process: set it as `tf.random.set_seed` does, minus the cache clearing.
    from tensorflow.python.eager import context

    eager = context.context()
    eager._seed = int(seed)
    eager._rng = random.Random(int(seed))


def initialize_processes(coordinator, count, index, heartbeat_timeout_s):
    """`keras.distribution.initialize`, with JAX's heartbeat timeout set.

    Keras passes only the address, the count and the index to
    `jax.distributed.initialize`; its heartbeat timeout (how long the
    coordination service waits before it declares a silent process dead, and
    aborts the others) stays JAX's default (100 s) unless it is given here, for
    the duration of the call. keras_tune sets it above `train.step_timeout`, so
    a stuck step is reported by keras_tune's watchdog in one line first.

    Args:
        coordinator: "HOST:PORT" of process 0 (None: Keras' environment variables).
        count: how many processes take part (None: from the environment).
        index: this process's index (None: from the environment).
        heartbeat_timeout_s: seconds without a heartbeat before a process counts as dead.
    """
    import functools

    import jax
    import keras

    original = jax.distributed.initialize
    jax.distributed.initialize = functools.partial(original, heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    try:
        keras.distribution.initialize(job_addresses=coordinator, num_processes=count, process_id=index)
    finally:
        jax.distributed.initialize = original
