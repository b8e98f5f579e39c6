"""Gemma 3 4B instruction-tuned, text only (keras-hub preset `gemma3_instruct_4b_text`): the architecture of `gemma3_4b_text`."""

from keras_tune.presets.gemma3_4b_text import get_config as base_preset


def get_config():
    config = base_preset()
    config.preset = "gemma3_instruct_4b_text"
    config.description = "Gemma 3 4B instruction-tuned, text only"
    config.model.handle = "kaggle://keras/gemma3/keras/gemma3_instruct_4b_text/3"
    config.model.instruct = True
    return config
