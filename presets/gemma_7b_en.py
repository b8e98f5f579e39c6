"""Gemma 7B base (keras-hub preset `gemma_7b_en`, 8,537,680,896 parameters)."""

from keras_tune.config import base_config


def get_config():
    config = base_config()
    config.preset = "gemma_7b_en"
    config.description = "Gemma 7B base"
    config.model.family = "gemma"
    config.model.source = "kaggle"
    config.model.handle = "kaggle://keras/gemma/keras/gemma_7b_en/4"
    # keras-hub backbone arguments; the total matches keras-hub's published count.
    config.model.arch = dict(
        vocabulary_size=256000,
        num_layers=28,
        num_query_heads=16,
        num_key_value_heads=16,
        hidden_dim=3072,
        intermediate_dim=49152,
        head_dim=256,
    )
    config.distribution.layout = "gemma_tp"
    config.data.seq_len = 256
    config.data.batch_size = 8
    config.train.precision = "bfloat16"
    return config
