"""Gemma 4 E4B instruction-tuned (keras-hub preset `gemma4_instruct_4b`, text only): the architecture of `gemma4_4b`."""

from keras_tune.presets.gemma4_4b import get_config as base_preset


def get_config():
    config = base_preset()
    config.preset = "gemma4_instruct_4b"
    config.description = "Gemma 4 E4B instruction-tuned (text)"
    config.model.handle = "kaggle://keras/gemma4/keras/gemma4_instruct_4b/2"
    config.model.instruct = True
    return config
