"""A tiny random-init Gemma 4 mixture of experts (26B-A4B-like) for tests: no download.

Four layers, each a dense MLP beside 8 experts of which every token uses 2;
every second layer global, with keys equal to values (one key/value head, as
the 26B-A4B's global layers have fewer) and wider heads.
"""

from keras_tune.config import base_config


def get_config():
    config = base_config()
    config.preset = "gemma4_moe_tiny"
    config.description = "Tiny random-init Gemma 4 mixture of experts (4 layers, 8 experts, top 2, k = v global layers)"
    config.model.family = "gemma4"
    config.model.source = "tiny"
    config.model.arch = dict(
        vocabulary_size=1024,
        num_layers=4,
        num_query_heads=4,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        hidden_dim=64,
        intermediate_dim=96,
        head_dim=16,
        global_head_dim=32,
        final_logit_soft_cap=30.0,
        use_sliding_window_attention=True,
        sliding_window_size=16,
        sliding_window_pattern=2,
        local_rope_wavelength=10_000.0,
        global_rope_wavelength=1_000_000.0,
        global_rope_partial_rotary_factor=0.25,
        layer_norm_epsilon=1e-6,
        enable_moe_block=True,
        num_experts=8,
        expert_intermediate_dim=32,
        num_experts_per_token=2,
    )
    config.distribution.layout = "gemma4_tp"
    config.lora.rank = 4
    config.optimizer.learning_rate = 1e-3
    config.data.seq_len = 64
    config.data.batch_size = 8
    config.train.precision = "float32"
    return config
