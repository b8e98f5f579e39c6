"""Preset loaders: a run config becomes a keras-hub CausalLM.

Every loader builds inside the keras distribution that is active when it is
called, so variables are created directly with their sharding; nothing is first
materialized on one device. `abstract_model` builds the same backbone with
shapes only (no memory), which is what planning, `--dry-run` and the layout
checks use.
"""

import dataclasses
import glob
import os
import time

from keras_tune import compat
from keras_tune.errors import UserError


def _classes(family):
    import keras_hub

    if family == "recurrentgemma":  # keras-hub has none: keras_tune's own Keras model
        from keras_tune.models import recurrent_gemma

        return (
            recurrent_gemma.RecurrentGemmaBackbone,
            recurrent_gemma.RecurrentGemmaCausalLMPreprocessor,
            recurrent_gemma.RecurrentGemmaCausalLM,
        )
    if family == "gemma3":
        return (
            keras_hub.models.Gemma3Backbone,
            keras_hub.models.Gemma3CausalLMPreprocessor,
            keras_hub.models.Gemma3CausalLM,
        )
    # keras-hub builds Gemma and Gemma 2 with the same classes.
    return (
        keras_hub.models.GemmaBackbone,
        keras_hub.models.GemmaCausalLMPreprocessor,
        keras_hub.models.GemmaCausalLM,
    )


def gguf_path(config):
    """The GGUF file a `gguf`-source config reads ("registry" resolves to the package's file)."""
    from keras_tune.models import gguf

    return gguf.registry_gguf_path() if config.model.weights == "registry" else config.model.weights


def backbone_kwargs(config):
    """The keras-hub backbone arguments of `config` (read from the GGUF for gguf sources)."""
    if config.model.source == "gguf":
        from keras_tune.models import gguf

        return dict(gguf.gguf_backbone_kwargs(gguf_path(config)))
    return dict(config.model.arch)


def abstract_model(config, lora=True):
    """Builds the backbone with shapes only: no weights are allocated.

    Variables are created under a `keras.StatelessScope`, where Keras defers
    their initialization, so planning a 27B model costs seconds and no memory.

    Args:
        config: a validated run config.
        lora: also add the LoRA variables the config asks for.
    """
    import keras

    from keras_tune.environment import require_jax_backend
    from keras_tune.lora import apply_lora

    require_jax_backend()

    backbone_cls, _, _ = _classes(config.model.family)
    kwargs = backbone_kwargs(config)
    # Keras queues deferred variables globally and initializes the queue when
    # the next outermost StatelessScope closes (fit opens one); take ours out
    # so an abstract 7B model never gets materialized by accident.
    pending = list(compat.keras_global_attribute("uninitialized_variables", []) or [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            backbone = backbone_cls(**kwargs, dtype=config.train.precision)
            if lora:
                apply_lora(backbone, config.lora.rank, config.lora.targets, config.lora.alpha)
    finally:
        compat.set_keras_global_attribute("uninitialized_variables", pending)
    return backbone


def kaggle_credentials_problem(handle):
    """Says why a Kaggle handle cannot be fetched, or returns None if it can.

    Credentials count from `KAGGLE_USERNAME`/`KAGGLE_KEY`, a `kaggle.json` or an
    access token in `~/.kaggle` (or `$KAGGLE_CONFIG_DIR`), a Kaggle notebook, or
    the model already sitting in the kagglehub cache.

    Args:
        handle: a `kaggle://owner/model/framework/variation/version` handle.
    """
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return None
    if os.environ.get("KAGGLE_API_TOKEN") or os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return None
    config_dir = os.environ.get("KAGGLE_CONFIG_DIR") or os.path.expanduser("~/.kaggle")
    if any(os.path.isfile(os.path.join(config_dir, name)) for name in ("kaggle.json", "access_token")):
        return None
    cache = os.environ.get("KAGGLEHUB_CACHE") or os.path.expanduser("~/.cache/kagglehub")
    parts = handle.removeprefix("kaggle://").split("/")
    if glob.glob(os.path.join(cache, "models", *parts[:4], parts[4] if len(parts) > 4 else "*", "config.json")):
        return None
    return (
        f"cannot download {handle}: no Kaggle credentials found; set KAGGLE_USERNAME and KAGGLE_KEY "
        "(from kaggle.com > Settings > API > Create New Token), or save that kaggle.json in ~/.kaggle/, "
        "and accept the Gemma license on the model's Kaggle page"
    )


def check_source(config):
    """Cheap checks that the weights can be reached, run before anything is built.

    Args:
        config: a validated run config.
    """
    model = config.model
    if model.source == "kaggle":
        problem = kaggle_credentials_problem(model.handle)
        if problem:
            raise UserError(problem)
    elif model.source == "local":
        if not os.path.isfile(os.path.join(model.handle, "config.json")):
            raise UserError(
                f"model.handle {model.handle}: not a keras-hub preset directory; expected a folder with "
                "config.json (as written by save_to_preset)"
            )
    elif model.source == "gguf":
        gguf_path(config)  # the registry package or the file must exist
    elif model.source == "flax":
        from keras_tune.models.recurrent_gemma import source

        source.check_source(model.handle)


def load_causal_lm(config):
    """Builds the config's CausalLM (with its preprocessor) under the active distribution.

    Args:
        config: a validated run config.

    Returns:
        A keras-hub `GemmaCausalLM` or `Gemma3CausalLM`; LoRA is not yet enabled.
    """
    import keras

    check_source(config)
    model = config.model
    backbone_cls, preprocessor_cls, causal_lm_cls = _classes(model.family)
    precision = config.train.precision
    sequence_length = config.data.seq_len
    if model.source == "tiny":
        from keras_tune.models.tiny import tiny_tokenizer

        compat.set_random_seed(config.train.seed)
        tokenizer = tiny_tokenizer(model.family)
        arch = dict(model.arch)
        if arch["vocabulary_size"] != tokenizer.vocabulary_size():
            raise UserError(
                f"preset {config.preset}: model.arch.vocabulary_size {arch['vocabulary_size']} does not match "
                f"the tiny tokenizer's {tokenizer.vocabulary_size()}"
            )
        backbone = backbone_cls(**arch, dtype=precision)
        preprocessor = preprocessor_cls(tokenizer=tokenizer, sequence_length=sequence_length)
        return causal_lm_cls(backbone=backbone, preprocessor=preprocessor)
    if model.source == "gguf":
        from keras_tune.models import gguf

        return gguf.load_gguf_causal_lm(
            gguf_path(config), sequence_length=sequence_length, dtype=precision, quantize=config.train.quantize
        )
    if model.source == "flax":
        from keras_tune.models.recurrent_gemma import source

        return source.load_causal_lm(config)
    try:
        causal_lm = causal_lm_cls.from_preset(model.handle, dtype=precision)
    except (OSError, ValueError, ConnectionError) as error:
        raise UserError(f"could not load {model.handle}: {type(error).__name__}: {str(error).splitlines()[0]}")
    causal_lm.preprocessor.sequence_length = sequence_length
    return causal_lm


def quantization_config(mode):
    """Keras' weight-only quantization config for `--quantize mode` ("int8" or "int4").

    Weight-only: the scales are per output channel (int8) or per block of 128
    inputs (int4) and activations stay in the compute precision, so the only
    change to the function the model computes is the weights' rounding.

    Args:
        mode: "int8" or "int4".
    """
    import keras

    if mode == "int8":
        return keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    if mode == "int4":
        return keras.quantizers.Int4QuantizationConfig(activation_quantizer=None, block_size=128)
    raise UserError(f"--quantize {mode}: expected int8 or int4")


def quantize_base(causal_lm, mode):
    """Stores the frozen base weights as int8 or int4 (Keras' own `quantize`), QLoRA-style.

    LoRA, enabled afterwards, trains float32 matrices on top; their shapes are
    the unquantized model's, so an adapter moves between the two. (The GGUF
    loader quantizes as it loads instead: `load_gguf_causal_lm(quantize=)`.)

    Args:
        causal_lm: a keras-hub CausalLM, LoRA not yet enabled.
        mode: "int8" or "int4".
    """
    import warnings

    config = quantization_config(mode)
    with warnings.catch_warnings():  # norms, rotary embeddings, dropout: nothing to quantize, as intended
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        causal_lm.backbone.quantize(mode, config=config)


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
    layers = int(backbone_kwargs(config)["num_layers"])
    return keras.RematScope(mode="list_of_layers", layer_names=[f"decoder_block_{i}" for i in range(layers)])


def keep_matmul_outputs_only(backbone):
    """Makes each decoder block's backward pass keep only its weight matmuls' outputs (selective recomputation).

    The block runs under `jax.checkpoint` with JAX's
    `dots_with_no_batch_dims_saveable` policy: the outputs of q/k/v, the
    attention output and the gate/up/down projections (LoRA's too) are kept,
    and the rest of the block (norms, tanh-GELU, the attention scores, their
    softmax and both batched attention matmuls) is recomputed from them in the
    backward pass, as Korthikanti et al. (2022) recompute the attention core.
    The same numbers either way; on the 270M (batch 2 x 128, one CPU device)
    the compiled step's temporaries drop from 294 to 197 MiB with an int8 base
    and from 568 to 491 MiB in float32, but the float32 MTNT-like step took 6%
    longer and the compile more memory, so it is `train.keep_activations`'s
    choice, not the default. Generation (a cache) runs the block as it is.

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


@dataclasses.dataclass
class BuiltModel:
    """What `build_model` hands back.

    Attributes:
        causal_lm: the keras-hub CausalLM, built under `plan`'s distribution.
        plan: the `keras_tune.distribution.ShardingPlan` it was built with.
        seconds: wall time of building and loading the weights (and adapter).
        adapter: the adapter file's record, when one was loaded.
    """

    causal_lm: object
    plan: object
    seconds: float
    adapter: dict = None


def build_model(config, *, lora=False, plan=None, devices=None):
    """Builds the config's CausalLM the one way every tool does: seed, precision, distribution, weights, LoRA.

    The adapter file (`config.model.adapter`) is read before anything is built,
    and its preset, rank and targets are checked against the model
    (`keras_tune.lora.load_adapter`): another preset's adapter is refused whole.

    Args:
        config: a validated run config.
        lora: add the LoRA layers `config.lora` asks for (training); without it,
            LoRA comes only from the adapter file, if any.
        plan: a sharding plan already made for this config (default: planned here).
        devices: devices for the mesh when planning here (default: all).

    Returns:
        A `BuiltModel`.
    """
    import keras

    from keras_tune.distribution import plan_sharding
    from keras_tune.environment import release_freed_memory, require_jax_backend
    from keras_tune.lora import apply_lora, load_adapter, read_adapter

    require_jax_backend()
    adapter = config.model.adapter
    if adapter:
        read_adapter(adapter)  # an unreadable file fails before the model is built
    if plan is None:
        plan = plan_sharding(config, abstract_model(config, lora=lora).weights, devices=devices)
    compat.set_random_seed(config.train.seed)  # not keras.utils: see compat
    keras.config.set_dtype_policy(config.train.precision)
    keras.distribution.set_distribution(plan.distribution())
    started = time.perf_counter()
    with remat_scope(config):
        causal_lm = load_causal_lm(config)
    if config.train.quantize and config.model.source != "gguf":  # the GGUF loader quantizes as it loads
        quantize_base(causal_lm, config.train.quantize)
    gemma_blocks = config.model.family in ("gemma", "gemma2", "gemma3")  # not RecurrentGemma's
    if not config.data.cross_document_attention and gemma_blocks:
        from keras_tune.models.document_mask import enable_document_masking

        enable_document_masking(causal_lm.backbone)  # packed rows send segment ids
    if config.train.keep_activations == "matmuls" and not config.train.remat and gemma_blocks:
        keep_matmul_outputs_only(causal_lm.backbone)
    if lora:
        apply_lora(causal_lm, config.lora.rank, config.lora.targets, config.lora.alpha)
    metadata = load_adapter(causal_lm, adapter, preset=config.preset) if adapter else None
    release_freed_memory()  # loading's freed temporaries would otherwise count toward the training peak
    return BuiltModel(causal_lm=causal_lm, plan=plan, seconds=time.perf_counter() - started, adapter=metadata)
