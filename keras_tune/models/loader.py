"""Preset loaders: a run config becomes a CausalLM of its family.

Every loader builds inside the keras distribution that is active when it is
called, so variables are created directly with their sharding; nothing is first
materialized on one device. `abstract_model` builds the same backbone with
shapes only (no memory), which is what planning, `--dry-run` and the layout
checks use. The family (`keras_tune.models.families`) says which classes and
sources a model has; Kaggle handles, preset directories and the tiny presets
are loaded here, a family's own sources (GGUF, Flax checkpoints) by the family.
"""

import dataclasses
import os
import time

from keras_tune import compat
from keras_tune.errors import UserError
from keras_tune.models import families, remat
from keras_tune.models.families import GENERIC_SOURCES
from keras_tune.models.kaggle import kaggle_credentials_problem
from keras_tune.models.quantize import quantize_base


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

    family = families.get(config.model.family)
    backbone_cls, _, _ = family.classes()
    kwargs = family.backbone_kwargs(config)
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
    elif model.source not in GENERIC_SOURCES:
        families.get(model.family).check_source(config)


def load_causal_lm(config):
    """Builds the config's CausalLM (with its preprocessor) under the active distribution.

    Args:
        config: a validated run config.

    Returns:
        The family's CausalLM (keras-hub's, or keras_tune's RecurrentGemma); LoRA is not yet enabled.
    """
    check_source(config)
    model = config.model
    family = families.get(model.family)
    backbone_cls, preprocessor_cls, causal_lm_cls = family.classes()
    precision = config.train.precision
    sequence_length = config.data.seq_len
    if model.source == "tiny":
        from keras_tune.models.sentencepiece import read_sentencepiece
        from keras_tune.models.tiny import tiny_tokenizer

        compat.set_random_seed(config.train.seed)
        tokenizer = family.tokenizer(read_sentencepiece(model.tokenizer)) if model.tokenizer else \
            tiny_tokenizer(model.family)
        arch = family.backbone_kwargs(config)
        if arch["vocabulary_size"] != tokenizer.vocabulary_size():
            raise UserError(
                f"preset {config.preset}: model.arch.vocabulary_size {arch['vocabulary_size']} does not match "
                f"the tiny tokenizer's {tokenizer.vocabulary_size()}; expected a tokenizer of that size: "
                "--set model.tokenizer=PATH (python -m keras_tune.tokenizer train)"
            )
        backbone = backbone_cls(**arch, dtype=precision)
        preprocessor = preprocessor_cls(tokenizer=tokenizer, sequence_length=sequence_length)
        return causal_lm_cls(backbone=backbone, preprocessor=preprocessor)
    if model.source not in GENERIC_SOURCES:
        return family.load(config)
    try:
        causal_lm = causal_lm_cls.from_preset(model.handle, dtype=precision)
    except (OSError, ValueError, ConnectionError) as error:
        raise UserError(f"could not load {model.handle}: {type(error).__name__}: {str(error).splitlines()[0]}")
    causal_lm.preprocessor.sequence_length = sequence_length
    return causal_lm


def _quantized_on_load(causal_lm):
    """Whether a loader already quantized the base as it loaded it (the GGUF loader does, layer by layer)."""
    return any(getattr(layer, "quantization_mode", None) for layer in compat.sublayers(causal_lm.backbone))


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
    family = families.get(config.model.family)
    with remat.remat_scope(config):
        causal_lm = load_causal_lm(config)
    if config.train.quantize and not _quantized_on_load(causal_lm):
        quantize_base(causal_lm, config.train.quantize)
    if not config.data.cross_document_attention and family.document_masking:
        from keras_tune.models.document_mask import enable_document_masking

        enable_document_masking(causal_lm.backbone)  # packed rows send segment ids
    if config.train.keep_activations == "matmuls" and not config.train.remat and family.selective_remat:
        remat.keep_matmul_outputs_only(causal_lm.backbone)
    if lora:
        apply_lora(causal_lm, config.lora.rank, config.lora.targets, config.lora.alpha)
    metadata = load_adapter(causal_lm, adapter, preset=config.preset) if adapter else None
    release_freed_memory()  # loading's freed temporaries would otherwise count toward the training peak
    return BuiltModel(causal_lm=causal_lm, plan=plan, seconds=time.perf_counter() - started, adapter=metadata)
