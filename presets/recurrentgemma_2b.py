"""RecurrentGemma 2B base (Griffin; official Flax checkpoint, 2,682,862,080 parameters).

Loaded from the official release `google/recurrentgemma/flax/2b` on Kaggle (or a
local copy: `--set model.handle=DIR`). The defaults are the reference
fine-tuning recipe's: MTNT English to French, AdamW (lr 1e-4, b2 0.96, eps
1e-8, weight decay 0.1) with no decay on the RG-LRU, embeddings, biases and
norm scales; `--optimizer sgd --learning-rate 1e-3` is its low-memory choice.
"""

from keras_tune.config import base_config


def get_config():
    config = base_config()
    config.preset = "recurrentgemma_2b"
    config.description = "RecurrentGemma 2B base (Griffin)"
    config.model.family = "recurrentgemma"
    config.model.source = "flax"
    config.model.handle = "kaggle://google/recurrentgemma/flax/2b"
    # RecurrentGemmaBackbone arguments (the reference's RECURRENT_GEMMA_2B_V1);
    # the total matches the reference implementation's parameter count.
    config.model.arch = dict(
        vocabulary_size=256000,
        num_layers=26,
        hidden_dim=2560,
        intermediate_dim=7680,
        num_heads=10,
        lru_width=2560,
        attention_window_size=2048,
        final_logit_soft_cap=30.0,
    )
    config.distribution.layout = "recurrentgemma_tp"
    config.lora.rank = 4
    config.lora.targets = ("query", "value", "linear_x", "linear_y")
    config.optimizer.learning_rate = 1e-4
    config.optimizer.beta_2 = 0.96
    config.optimizer.epsilon = 1e-8
    config.optimizer.weight_decay = 0.1
    config.optimizer.exclude_embeddings_from_decay = True
    config.data.name = "mtnt"
    config.data.seq_len = 128
    config.data.batch_size = 8
    config.train.precision = "bfloat16"
    return config
