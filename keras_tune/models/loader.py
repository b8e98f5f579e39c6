"""Preset loaders: a run config becomes a keras-hub CausalLM.

Every loader builds inside the keras distribution that is active when it is
called, so variables are created directly with their sharding; nothing is first
materialized on one device. `abstract_model` builds the same backbone with
shapes only (no memory), which is what planning, `--dry-run` and the layout
checks use.
"""

import glob
import math
import os

from keras_tune.errors import UserError


def _classes(family):
    import keras_hub

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

    from keras_tune.lora import apply_lora

    from keras.src.backend.common import global_state

    backbone_cls, _, _ = _classes(config.model.family)
    kwargs = backbone_kwargs(config)
    # Keras queues deferred variables globally and initializes the queue when
    # the next outermost StatelessScope closes (fit opens one); take ours out
    # so an abstract 7B model never gets materialized by accident.
    pending = list(global_state.get_global_attribute("uninitialized_variables", []) or [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            backbone = backbone_cls(**kwargs, dtype=config.train.precision)
            if lora:
                apply_lora(backbone, config.lora.rank, config.lora.targets, config.lora.alpha)
    finally:
        global_state.set_global_attribute("uninitialized_variables", pending)
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

        keras.utils.set_random_seed(config.train.seed)
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

        return gguf.load_gguf_causal_lm(gguf_path(config), sequence_length=sequence_length, dtype=precision)
    try:
        causal_lm = causal_lm_cls.from_preset(model.handle, dtype=precision)
    except (OSError, ValueError, ConnectionError) as error:
        raise UserError(f"could not load {model.handle}: {type(error).__name__}: {str(error).splitlines()[0]}")
    causal_lm.preprocessor.sequence_length = sequence_length
    return causal_lm


def count_parameters(variables):
    """Total number of elements in `variables`."""
    return sum(math.prod(v.shape) for v in variables)

