"""Gemma 4 weights for the text-only model: keras-hub presets (Kaggle, a directory) and Transformers checkpoints.

keras-hub's `Gemma4CausalLM.from_preset` builds the vision (and, for E2B and
E4B, audio) encoder of every Gemma 4 preset. Here the backbone is built from
the preset's text arguments alone (`Gemma4TextBackbone`) and the encoders'
weights are never read: from a keras-hub preset's `model.weights.h5` (or its
shards) the text variables are read one by one, where the saved `Gemma4Backbone`
(built abstractly, no memory) says Keras put them (`load_preset_weights`); from
a Transformers checkpoint (`config.json`, `model*.safetensors`,
`tokenizer.json`) through keras-hub's converter, which reads only the text
model's tensors.

A Transformers config names k = v global attention `attention_k_eq_v`; keras-hub's
converter infers it from `num_global_key_value_heads` alone, which E2B sets
without it. Here the flag decides, as in Transformers. The global layers' head
width and key/value heads are read from released configs (`global_head_dim`,
`num_global_key_value_heads`) and from those Transformers 5 saves
(`per_layer_config`) alike.

Example:

```python
backbone, tokenizer = load_text_model("kaggle://keras/gemma4/keras/gemma4_2b/2", dtype="bfloat16")
backbone, tokenizer = load_text_model("/checkpoints/gemma-4-E2B", dtype="bfloat16")   # Transformers
```
"""

import json
import os

from keras_tune import compat

# Saved keras-hub backbone arguments that concern the encoders or embedding models only.
ENCODER_ARGUMENTS = ("vision_encoder", "audio_encoder", "num_audio_tokens_per_clip", "use_vision_bidirectional_attention",
                     "pooling_intermediate_dim", "embedding_dim")
_NOT_ARCHITECTURE = ("name", "trainable", "dtype")
# Transformers' `model_type` of a Gemma 4 checkpoint: the whole model (with encoders), or its text model.
# (Transformers' vocabulary, not keras_tune's family names: the family registry is not asked.)
TRANSFORMERS_MODEL_TYPES = ("gemma4", "gemma4_text")


def text_arguments(saved):
    """A saved keras-hub `Gemma4Backbone`'s constructor arguments, without its encoders.

    Args:
        saved: the backbone's `config` from a preset's `config.json`.
    """
    return {key: value for key, value in saved.items() if key not in ENCODER_ARGUMENTS + _NOT_ARCHITECTURE}


def transformers_arguments(config):
    """`Gemma4TextBackbone` arguments of a Transformers Gemma 4 config (`gemma4` or `gemma4_text`).

    Args:
        config: the parsed `config.json`.

    Raises:
        ValueError: a config of an embedding (bidirectional) model.
    """
    text = config if config.get("model_type") == "gemma4_text" else config.get("text_config") or {}
    if text.get("use_bidirectional_attention") == "all":
        raise ValueError("this Gemma 4 checkpoint is an embedding model (bidirectional attention), not a causal LM")
    rope = text.get("rope_parameters") or {}
    full, sliding = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    k_eq_v = bool(text.get("attention_k_eq_v", False))
    window = text.get("sliding_window")
    global_head_dim, global_kv_heads = _global_layer_shape(text, k_eq_v)
    return dict(
        vocabulary_size=text["vocab_size"], num_layers=text["num_hidden_layers"],
        num_query_heads=text["num_attention_heads"], num_key_value_heads=text["num_key_value_heads"],
        hidden_dim=text["hidden_size"], intermediate_dim=text["intermediate_size"], head_dim=text["head_dim"],
        global_head_dim=global_head_dim,
        attention_logit_soft_cap=text.get("attn_logit_softcapping"),
        final_logit_soft_cap=text.get("final_logit_softcapping"),
        use_sliding_window_attention=bool(window), sliding_window_size=window or 512,
        layer_types=list(text["layer_types"]), layer_norm_epsilon=text.get("rms_norm_eps", 1e-6),
        num_kv_shared_layers=text.get("num_kv_shared_layers") or 0,
        num_global_key_value_heads=global_kv_heads,
        hidden_size_per_layer_input=text.get("hidden_size_per_layer_input") or 0,
        vocab_size_per_layer_input=text.get("vocab_size_per_layer_input"),
        global_rope_partial_rotary_factor=full.get("partial_rotary_factor", 1.0),
        global_rope_wavelength=full.get("rope_theta", 1_000_000.0),
        local_rope_wavelength=sliding.get("rope_theta", 10_000.0),
        use_double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
        enable_moe_block=bool(text.get("enable_moe_block", False)), num_experts=text.get("num_experts"),
        expert_intermediate_dim=text.get("moe_intermediate_size"), num_experts_per_token=text.get("top_k_experts") or 8,
    )


def _global_layer_shape(text, k_eq_v):
    """`(head_dim, key/value heads or None)` of the global (full-attention) layers of a Transformers text config.

    Released Gemma 4 configs say `global_head_dim` (default 512) and
    `num_global_key_value_heads`; Transformers 5.x turns them into
    `per_layer_config` overrides of the full-attention layers
    (`{"5": {"head_dim": 512, "num_key_value_heads": 2}}`), which take their
    place when present, and a config it saved has only those. The key/value
    heads count only with `attention_k_eq_v` (None without: the global layers
    have keys and values of their own), as in Transformers.

    Args:
        text: the text model's config dict.
        k_eq_v: `attention_k_eq_v`.

    Raises:
        ValueError: overrides this backbone cannot build (a sliding layer's, other
            attributes, global layers of different shapes, other heads without k = v).
    """
    if "per_layer_config" not in text:
        heads = text.get("num_global_key_value_heads") or text["num_key_value_heads"]
        return text.get("global_head_dim") or 512, heads if k_eq_v else None
    per_layer = {int(index): override for index, override in (text["per_layer_config"] or {}).items()
                 if str(index).isdigit()}  # other keys, if any, are Transformers' derived views
    shapes = set()
    for layer, kind in enumerate(text["layer_types"]):
        override = per_layer.get(layer, {})
        if kind != "full_attention" or set(override) - {"head_dim", "num_key_value_heads"}:
            if override:
                raise ValueError(f"per_layer_config[{layer}] {override} on a {kind} layer; expected head_dim and "
                                 "num_key_value_heads overrides of full_attention layers only")
            continue
        shapes.add((override.get("head_dim", text["head_dim"]),
                    override.get("num_key_value_heads", text["num_key_value_heads"])))
    if len(shapes) > 1:
        raise ValueError(f"per_layer_config: full_attention layers of shapes {sorted(shapes)} (head_dim, "
                         "key/value heads); expected one shape for all of them")
    head_dim, heads = next(iter(shapes), (text["head_dim"], text["num_key_value_heads"]))
    if not k_eq_v and heads != text["num_key_value_heads"]:
        raise ValueError(f"per_layer_config: global layers with {heads} key/value heads without attention_k_eq_v; "
                         "expected other head counts only on k = v global layers")
    return head_dim, heads if k_eq_v else None


def local_arguments(directory):
    """`Gemma4TextBackbone` arguments of a local keras-hub preset or Transformers checkpoint directory.

    Args:
        directory: a folder with a `config.json` of either format.

    Raises:
        UserError: no readable `config.json`, or one of another kind of model.
    """
    from keras_tune.errors import UserError

    path = os.path.join(directory, "config.json")
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
        if "registered_name" in config:
            return text_arguments(config["config"])
        if config.get("model_type") not in TRANSFORMERS_MODEL_TYPES:
            raise ValueError(f"model_type {config.get('model_type')!r}")
        return transformers_arguments(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{directory}: not a Gemma 4 keras-hub preset or Transformers checkpoint "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                        "expected a folder with the config.json of either") from None


def tokenizer_from_json(path):
    """keras-hub's `Gemma4Tokenizer` from a Transformers `tokenizer.json`, with the special tokens it holds.

    Args:
        path: the `tokenizer.json` file.
    """
    import keras_hub

    with open(path, encoding="utf-8") as file:
        tokenizer_json = json.load(file)
    vocabulary = set(tokenizer_json.get("model", {}).get("vocab", {}))
    vocabulary |= {token["content"] for token in tokenizer_json.get("added_tokens", [])}
    return keras_hub.models.Gemma4Tokenizer(
        proto=compat.kerashub_sentencepiece_from_tokenizer_json(tokenizer_json),
        has_vision_tokens="<|image|>" in vocabulary, has_audio_tokens="<|audio|>" in vocabulary,
        has_video_tokens="<|video|>" in vocabulary,
    )


def _abstract_saved_backbone(saved):
    """The backbone a preset's `config.json` describes (encoders included), its variables deferred: no memory.

    Args:
        saved: the preset's `config.json` (a serialized keras-hub or keras_tune backbone).
    """
    import copy

    import keras

    # Keras queues deferred variables globally and initializes the queue when the next
    # outermost StatelessScope closes; this backbone's must never be, so the queue is restored.
    pending = list(compat.keras_global_attribute("uninitialized_variables", []) or [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            # keras-hub's from_config replaces the encoders' configs by layers in place: a copy keeps the loader's.
            return keras.saving.deserialize_keras_object(copy.deepcopy(saved))
    finally:
        compat.set_keras_global_attribute("uninitialized_variables", pending)


def load_preset_weights(loader, backbone):
    """Reads a keras-hub preset's weights into the text-only `backbone`, variable by variable, by path.

    Keras' weights file addresses variables by the saving model's object tree
    (keras-hub's `Gemma4Backbone`, with its encoders), which the text backbone
    does not have: the saved backbone is built abstractly from `config.json`
    to learn where each variable lies (`compat.keras_weight_locations`), and
    only the text model's tensors are read, one at a time.

    Args:
        loader: `compat.kerashub_preset_loader(...)` of a keras-hub preset (Kaggle's, or a
            directory written by `save_to_preset`, keras-hub's or keras_tune's).
        backbone: a `Gemma4TextBackbone` of the preset's text arguments.

    Raises:
        ValueError: the file lacks one of the backbone's variables, or holds it in another shape.
    """
    locations = compat.keras_weight_locations(_abstract_saved_backbone(loader.config))
    missing = [variable.path for variable in backbone.weights if variable.path not in locations]
    if missing:
        raise ValueError(f"the preset's {loader.config.get('class_name')} has no variable {missing[0]} "
                         f"({len(missing)} missing); expected a Gemma 4 backbone with the text model's layers")
    store = compat.keras_weights_store(compat.kerashub_backbone_weights_file(loader))
    try:
        for variable in backbone.weights:
            group, key = locations[variable.path]
            value = store.get(group)[key]
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(f"the preset holds {variable.path} as {tuple(value.shape)}; "
                                 f"expected {tuple(variable.shape)}")
            variable.assign(value)
    finally:
        store.close()


def load_text_model(handle, dtype=None, load_weights=True):
    """`(Gemma4TextBackbone, Gemma4Tokenizer)` of a keras-hub preset or a Transformers checkpoint, text only.

    Args:
        handle: `kaggle://...`, `hf://...` or a directory of either format.
        dtype: the backbone's dtype policy (default: Keras').
        load_weights: read the weights (else a random model of the preset's architecture).
    """
    import keras_hub

    from keras_tune.models.gemma4.backbone import Gemma4TextBackbone

    loader = compat.kerashub_preset_loader(handle)
    if "registered_name" in loader.config:  # a keras-hub preset
        backbone = Gemma4TextBackbone(**text_arguments(loader.config["config"]), dtype=dtype)
        if load_weights:
            load_preset_weights(loader, backbone)
        return backbone, loader.load_tokenizer(keras_hub.models.Gemma4Tokenizer)
    if loader.config.get("model_type") not in TRANSFORMERS_MODEL_TYPES:
        raise ValueError(f"{handle}: a Transformers {loader.config.get('model_type')} checkpoint; expected gemma4")
    backbone = Gemma4TextBackbone(**transformers_arguments(loader.config), dtype=dtype)
    if load_weights:
        compat.kerashub_gemma4_transformers_weights(loader, backbone)
    return backbone, tokenizer_from_json(compat.kerashub_preset_file(loader, "tokenizer.json"))
