"""Gemma 3 (text): keras-hub's `Gemma3Backbone`, from Kaggle, a preset directory or a GGUF file.

Gemma 3 is the family with a GGUF importer and exporter (llama.cpp's `gemma3`
architecture, `keras_tune.models.gguf`), which is how the offline default preset
gets real pretrained weights from a registry package.
"""

from keras_tune.models.families.base import GENERIC_SOURCES
from keras_tune.models.families.gemma import Gemma

# Gemma 3 models of up to this many layers (270M, 1B) were trained at 32K tokens, larger ones at 128K.
_SHORT_CONTEXT_LAYERS = 26


class Gemma3(Gemma):
    """Gemma 3 text models (270M to 27B), their instruction-tuned forms, and GGUF files of them."""

    name = "gemma3"
    title = "Gemma 3"
    description = "Gemma 3 (keras-hub Gemma3Backbone)"
    sources = GENERIC_SOURCES + ("gguf",)
    exports = ("--peft", "--transformers", "--gguf", "--keras-preset")

    def classes(self):
        import keras_hub

        return (keras_hub.models.Gemma3Backbone, keras_hub.models.Gemma3CausalLMPreprocessor,
                keras_hub.models.Gemma3CausalLM)

    def owns(self, backbone):
        return type(backbone) is self.classes()[0]

    def owns_config(self, class_name, backbone_config):
        return class_name == self.classes()[0].__name__

    def tokenizer(self, proto):
        import keras_hub

        return keras_hub.models.Gemma3Tokenizer(proto=proto, has_vision_tokens=False)

    def context_length(self, arch):
        return 32768 if int(arch.get("num_layers", 0)) <= _SHORT_CONTEXT_LAYERS else 131072

    def backbone_kwargs(self, config):
        if config.model.source == "gguf":  # the architecture is the GGUF's metadata
            from keras_tune.models.gguf import load

            return dict(load.gguf_backbone_kwargs(_gguf_path(config)))
        return super().backbone_kwargs(config)

    def check_source(self, config):
        if config.model.source == "gguf":
            _gguf_path(config)  # the registry package or the file must exist

    def load(self, config):
        if config.model.source != "gguf":
            return super().load(config)
        from keras_tune.models.gguf import load

        return load.load_gguf_causal_lm(_gguf_path(config), sequence_length=config.data.seq_len,
                                        dtype=config.train.precision, quantize=config.train.quantize)

    def after_transformers_export(self, backbone, directory):
        """Nothing to mend: keras-hub writes Gemma 3's attention right."""

    def decode_cache(self, causal_lm, batch_size, length):
        """`Gemma3CausalLM.call_with_cache`'s cache: a `(key, value)` pair a layer, each `[batch, length, heads, head_dim]`."""
        import jax.numpy as jnp

        backbone = causal_lm.backbone
        shape = (batch_size, length, backbone.num_key_value_heads, backbone.head_dim)
        return tuple((jnp.zeros(shape, causal_lm.compute_dtype), jnp.zeros(shape, causal_lm.compute_dtype))
                     for _ in range(backbone.num_layers))


def _gguf_path(config):
    """The GGUF file a `gguf`-source config reads ("registry" resolves to the package's file)."""
    from keras_tune.models.gguf import registry

    return registry.registry_gguf_path() if config.model.weights == "registry" else config.model.weights
