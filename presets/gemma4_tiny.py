"""A tiny random-init Gemma 4 (E2B-like) for tests: per-layer embeddings, key/value sharing, wider MLPs, no download.

Six layers, every third global (head width 32, partial RoPE) and the rest
sliding-window (head width 16); the last two reuse the keys and values of the
last earlier layer of their kind and have a double-wide MLP, as E2B's do.
"""

from keras_tune.config import base_config


def get_config():
    config = base_config()
    config.preset = "gemma4_tiny"
    config.description = "Tiny random-init Gemma 4 (6 layers: per-layer embeddings, shared key/values, 2 global)"
    config.model.family = "gemma4"
    config.model.source = "tiny"
    config.model.arch = dict(
        vocabulary_size=1024,
        num_layers=6,
        num_query_heads=4,
        num_key_value_heads=1,
        hidden_dim=64,
        intermediate_dim=128,
        head_dim=16,
        global_head_dim=32,
        final_logit_soft_cap=30.0,
        use_sliding_window_attention=True,
        sliding_window_size=16,
        sliding_window_pattern=3,
        local_rope_wavelength=10_000.0,
        global_rope_wavelength=1_000_000.0,
        global_rope_partial_rotary_factor=0.25,
        layer_norm_epsilon=1e-6,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=1024,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
    )
    config.distribution.layout = "gemma4_tp"
    config.lora.rank = 4
    config.optimizer.learning_rate = 1e-3
    config.data.seq_len = 64
    config.data.batch_size = 8
    config.train.precision = "float32"
    return config
