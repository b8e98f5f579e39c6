"""Gemma 3 270M instruction-tuned (keras-hub preset `gemma3_instruct_270m`): the architecture of `gemma3_270m`."""

from keras_tune.presets.gemma3_270m import get_config as base_preset


def get_config():
    config = base_preset()
    config.preset = "gemma3_instruct_270m"
    config.description = "Gemma 3 270M instruction-tuned"
    config.model.handle = "kaggle://keras/gemma3/keras/gemma3_instruct_270m/4"
    config.model.instruct = True
    return config
