"""A tiny random-init Gemma 2 (soft-caps, sliding window, post-norms) for tests: no download."""

from keras_tune.config import base_config


def get_config():
    config = base_config()
    config.preset = "gemma2_tiny"
    config.description = "Tiny random-init Gemma 2 (2 layers, grouped-query attention)"
    config.model.family = "gemma2"
    config.model.source = "tiny"
    config.model.arch = dict(
        vocabulary_size=1024,
        num_layers=2,
        num_query_heads=8,
        num_key_value_heads=4,
        hidden_dim=64,
        intermediate_dim=256,
        head_dim=16,
        query_head_dim_normalize=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        final_logit_soft_cap=30.0,
        attention_logit_soft_cap=50.0,
        use_sliding_window_attention=True,
        sliding_window_size=32,
    )
    config.distribution.layout = "gemma2_tp"
    config.lora.rank = 4
    config.optimizer.learning_rate = 1e-3
    config.data.seq_len = 64
    config.data.batch_size = 8
    config.train.precision = "float32"
    return config
