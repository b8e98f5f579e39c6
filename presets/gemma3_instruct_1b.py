"""Gemma 3 1B instruction-tuned (keras-hub preset `gemma3_instruct_1b`): the architecture of `gemma3_1b`."""

from keras_tune.presets.gemma3_1b import get_config as base_preset


def get_config():
    config = base_preset()
    config.preset = "gemma3_instruct_1b"
    config.description = "Gemma 3 1B instruction-tuned"
    config.model.handle = "kaggle://keras/gemma3/keras/gemma3_instruct_1b/3"
    config.model.instruct = True
    return config
