"""Gemma 3 27B base, text only (keras-hub preset `gemma3_27b_text`, 27,009,002,240 parameters)."""

from keras_tune.config import base_config


def get_config():
    config = base_config()
    config.preset = "gemma3_27b_text"
    config.description = "Gemma 3 27B base, text only"
    config.model.family = "gemma3"
    config.model.source = "kaggle"
    config.model.handle = "kaggle://keras/gemma3/keras/gemma3_27b_text/4"
    # keras-hub backbone arguments; the total matches keras-hub's published count.
    config.model.arch = dict(
        vocabulary_size=262144,
        image_size=None,
        num_layers=62,
        num_query_heads=32,
        num_key_value_heads=16,
        hidden_dim=5376,
        intermediate_dim=21504,
        head_dim=128,
        query_head_dim_normalize=False,
        use_query_key_norm=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        attention_logit_soft_cap=None,
        final_logit_soft_cap=None,
        use_sliding_window_attention=True,
        sliding_window_size=1024,
        local_rope_scaling_factor=1.0,
        global_rope_scaling_factor=8.0,
        layer_norm_epsilon=1e-06,
    )
    config.distribution.layout = "gemma3_tp"
    config.data.seq_len = 256
    config.data.batch_size = 8
    config.train.precision = "bfloat16"
    return config
