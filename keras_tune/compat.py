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


def kerashub_gemma4_text_classes():
    """keras-hub's Gemma 4 text decoder block and RMS norm, which `keras_hub.models` does not export.

    keras_tune's text-only Gemma 4 (`keras_tune.models.gemma4`) subclasses the
    block (its attention, norms and per-layer-input layers are keras-hub's, so
    weights keep keras-hub's names) and builds its norms with keras-hub's class.

    Returns:
        `(Gemma4TextDecoderBlock, RMSNormalization)`.
    """
    from keras_hub.src.models.gemma4.gemma4_decoder_block import Gemma4TextDecoderBlock
    from keras_hub.src.models.gemma4.gemma4_layers import RMSNormalization

    return Gemma4TextDecoderBlock, RMSNormalization


def kerashub_preset_loader(handle):
    """keras-hub's loader of a preset (`kaggle://`, `hf://`, a directory), which reads its config and weights.

    keras-hub builds a preset's whole model (for Gemma 4 with its vision and
    audio encoders) through this loader; keras_tune builds the text model
    itself and asks the loader only for the config, the tokenizer and the
    weights (`keras_weight_locations`, `keras_weights_store`).

    Args:
        handle: a keras-hub preset handle or directory.

    Returns:
        A keras-hub `PresetLoader` (`.config`, `.preset`, `.load_tokenizer(cls)`).
    """
    from keras_hub.src.utils.preset_utils import get_preset_loader

    return get_preset_loader(handle)


def keras_weight_locations(model):
    """`{variable path: (group, key)}`: where Keras' weights file of `model` holds each of its variables.

    Keras' `.weights.h5` addresses a variable by the object tree that saved it
    (`layers/<snake_case class name>[_n]/.../vars/<index>`), not by its path, so
    a model of another class (keras_tune's text-only Gemma 4 reading a keras-hub
    `Gemma4Backbone`'s file) cannot `load_weights` it. This walks `model` the
    way Keras' saving does (`saving_lib._save_state`), recording where each
    variable would be written instead of writing it; `model` may be abstract
    (variables deferred under `StatelessScope(initialize_variables=False)`).

    Args:
        model: a built Keras model of the class and config that wrote the file.
    """
    import keras
    from keras.src.saving import saving_lib

    class Recorder(saving_lib.H5IOStore):
        """A write-mode store that keeps each variable's address and no value."""

        def __init__(self):  # no file: the parent's would open one
            self.locations, self.group = {}, None

        def __bool__(self):
            return True

        def make(self, path, metadata=None):
            self.group = path
            return self

        def __setitem__(self, key, value):
            if isinstance(value, keras.Variable):
                self.locations.setdefault(value.path, (self.group, key))

    recorder = Recorder()
    saving_lib._save_state(model, recorder, None, inner_path="", visited_saveables=set())
    return recorder.locations


def keras_weights_store(path):
    """Keras' reader of a `.weights.h5` file or a sharded `.weights.json` index: `store.get(group)[key]` is an array.

    Args:
        path: the local file.
    """
    from keras.src.saving import saving_lib

    if path.endswith(".json"):
        return saving_lib.ShardedH5IOStore(path, mode="r")
    return saving_lib.H5IOStore(path, mode="r")


def kerashub_backbone_weights_file(loader):
    """The local path of a keras-hub preset's backbone weights (`model.weights.h5`, or the sharded index
    with its shards fetched), as keras-hub's `_load_backbone_weights` finds it.

    Args:
        loader: `kerashub_preset_loader(...)` of a keras-hub (Keras-format) preset.
    """
    from keras_hub.src.utils import preset_utils

    if preset_utils.check_file_exists(loader.preset, preset_utils.MODEL_WEIGHTS_FILE):
        return preset_utils.get_file(loader.preset, preset_utils.MODEL_WEIGHTS_FILE)
    index = preset_utils.get_file(loader.preset, preset_utils.SHARDED_MODEL_WEIGHTS_CONFIG_FILE)
    for shard in loader._get_sharded_filenames(index):
        preset_utils.get_file(loader.preset, shard)
    return index


def kerashub_gemma4_transformers_weights(loader, backbone):
    """Ports a Transformers Gemma 4 checkpoint's text weights into `backbone` (keras-hub's converter).

    Args:
        loader: `kerashub_preset_loader(...)` of a Transformers checkpoint.
        backbone: a backbone with keras-hub's Gemma 4 layer names.
    """
    from keras_hub.src.utils.transformers import convert_gemma4
    from keras_hub.src.utils.transformers.safetensor_utils import SafetensorLoader

    with SafetensorLoader(loader.preset) as tensors:
        convert_gemma4.convert_weights(backbone, tensors, loader.config)


def kerashub_sentencepiece_from_tokenizer_json(tokenizer_json):
    """A serialized SentencePiece model rebuilt from a Gemma 4 `tokenizer.json` (keras-hub's converter).

    Args:
        tokenizer_json: the parsed `tokenizer.json`.
    """
    from keras_hub.src.utils.transformers.convert_gemma4 import _build_sentencepiece_proto

    return _build_sentencepiece_proto(tokenizer_json)


def kerashub_gemma4_transformers_export():
    """keras-hub's Gemma 4 Transformers export pieces: `(config function, weight-map function, tokenizer export)`.

    keras-hub dispatches its exporter on the backbone's class name, which a
    subclass does not have; keras_tune calls the Gemma 4 functions directly and
    mends what they write (`keras_tune.models.gemma4.transformers`).
    """
    from keras_hub.src.utils.transformers.export.gemma4 import get_gemma4_config, get_gemma4_weights_map
    from keras_hub.src.utils.transformers.export.hf_exporter import export_tokenizer

    return get_gemma4_config, get_gemma4_weights_map, export_tokenizer


def kerashub_preset_file(loader, name):
    """The local path of one file of a preset (downloaded first for a `kaggle://` or `hf://` handle).

    Args:
        loader: `kerashub_preset_loader(...)`.
        name: the file's name in the preset, e.g. "tokenizer.json".
    """
    from keras_hub.src.utils.preset_utils import get_file

    return get_file(loader.preset, name)


def adding_variables(layer):
    """A context in which a built Keras layer may create variables, as Keras' own `enable_lora` does.

    A built layer locks its state tracker; Keras unlocks it (`layer._tracker`)
    to add LoRA factors to a `Dense`, and so does Gemma 4's expert bank
    (`keras_tune.models.gemma4.moe.SparseExperts.enable_lora`).

    Args:
        layer: a built Keras layer.
    """
    import contextlib

    @contextlib.contextmanager
    def unlocked():
        layer._tracker.unlock()
        try:
            yield
        finally:
            layer._tracker.lock()

    return unlocked()
