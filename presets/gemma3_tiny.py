"""A tiny random-init Gemma 3 (one key/value head, q/k norms, like the 270M) for tests: no download."""

from keras_tune.config import base_config


def get_config():
    config = base_config()
    config.preset = "gemma3_tiny"
    config.description = "Tiny random-init Gemma 3 (2 layers, 4 query heads, 1 key/value head)"
    config.model.family = "gemma3"
    config.model.source = "tiny"
    config.model.arch = dict(
        vocabulary_size=1024,
        image_size=None,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=1,
        hidden_dim=64,
        intermediate_dim=256,
        head_dim=16,
        query_head_dim_normalize=True,
        use_query_key_norm=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        use_sliding_window_attention=True,
        sliding_window_size=32,
        layer_norm_epsilon=1e-6,
    )
    config.distribution.layout = "gemma3_tp"
    config.lora.rank = 4
    config.optimizer.learning_rate = 1e-3
    config.data.seq_len = 64
    config.data.batch_size = 8
    config.train.precision = "float32"
    return config
