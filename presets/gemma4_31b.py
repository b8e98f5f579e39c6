"""Gemma 4 31B base (keras-hub preset `gemma4_31b`), text only.

60 dense layers, k = v global layers.

The architecture is keras-hub's `Gemma4Backbone` arguments for the preset
without its vision encoder (built text-only:
`keras_tune.models.gemma4`); Transformers' `google/gemma-4-31B` config has the same numbers.
"""

from keras_tune.config import base_config


def get_config():
    config = base_config()
    config.preset = "gemma4_31b"
    config.description = "Gemma 4 31B base (text)"
    config.model.family = "gemma4"
    config.model.source = "kaggle"
    config.model.handle = "kaggle://keras/gemma4/keras/gemma4_31b/2"
    config.model.arch = dict(
        vocabulary_size=262_144,
        num_layers=60,
        num_query_heads=32,
        num_key_value_heads=16,
        num_global_key_value_heads=4,
        hidden_dim=5376,
        intermediate_dim=21504,
        head_dim=256,
        global_head_dim=512,
        final_logit_soft_cap=30.0,
        use_sliding_window_attention=True,
        sliding_window_size=1024,
        sliding_window_pattern=6,
        local_rope_wavelength=10000.0,
        global_rope_wavelength=1000000.0,
        global_rope_partial_rotary_factor=0.25,
        layer_norm_epsilon=1e-06,
    )
    config.distribution.layout = "gemma4_tp"
    config.data.seq_len = 256
    config.data.batch_size = 8
    config.train.precision = "bfloat16"
    return config
