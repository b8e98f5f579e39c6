"""Gemma 4 E2B base (keras-hub preset `gemma4_2b`), text only.

35 layers, per-layer embeddings (2.3B of its parameters are lookup tables), the last 20 sharing keys and values.

The architecture is keras-hub's `Gemma4Backbone` arguments for the preset
without its vision and audio encoder (built text-only:
`keras_tune.models.gemma4`); Transformers' `google/gemma-4-E2B` config has the same numbers.
"""

from keras_tune.config import base_config


def get_config():
    config = base_config()
    config.preset = "gemma4_2b"
    config.description = "Gemma 4 E2B base (text)"
    config.model.family = "gemma4"
    config.model.source = "kaggle"
    config.model.handle = "kaggle://keras/gemma4/keras/gemma4_2b/2"
    config.model.arch = dict(
        vocabulary_size=262_144,
        num_layers=35,
        num_query_heads=8,
        num_key_value_heads=1,
        hidden_dim=1536,
        intermediate_dim=6144,
        head_dim=256,
        global_head_dim=512,
        final_logit_soft_cap=30.0,
        use_sliding_window_attention=True,
        sliding_window_size=512,
        sliding_window_pattern=5,
        local_rope_wavelength=10000.0,
        global_rope_wavelength=1000000.0,
        global_rope_partial_rotary_factor=0.25,
        layer_norm_epsilon=1e-06,
        hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262_144,
        num_kv_shared_layers=20,
        use_double_wide_mlp=True,
    )
    config.distribution.layout = "gemma4_tp"
    config.data.seq_len = 256
    config.data.batch_size = 8
    config.train.precision = "bfloat16"
    return config
