"""Gemma 2 2B base (keras-hub preset `gemma2_2b_en`, 2,614,341,888 parameters)."""

from keras_tune.config import base_config


def get_config():
    config = base_config()
    config.preset = "gemma2_2b_en"
    config.description = "Gemma 2 2B base"
    config.model.family = "gemma2"
    config.model.source = "kaggle"
    config.model.handle = "kaggle://keras/gemma2/keras/gemma2_2b_en/2"
    # keras-hub backbone arguments; the total matches keras-hub's published count.
    config.model.arch = dict(
        vocabulary_size=256000,
        num_layers=26,
        num_query_heads=8,
        num_key_value_heads=4,
        hidden_dim=2304,
        intermediate_dim=18432,
        head_dim=256,
        query_head_dim_normalize=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        final_logit_soft_cap=30.0,
        attention_logit_soft_cap=50.0,
        use_sliding_window_attention=True,
        sliding_window_size=4096,
    )
    config.distribution.layout = "gemma2_tp"
    config.data.seq_len = 256
    config.data.batch_size = 8
    config.train.precision = "bfloat16"
    return config
