"""Gemma 4 E2B instruction-tuned (keras-hub preset `gemma4_instruct_2b`, text only): the architecture of `gemma4_2b`."""

from keras_tune.presets.gemma4_2b import get_config as base_preset


def get_config():
    config = base_preset()
    config.preset = "gemma4_instruct_2b"
    config.description = "Gemma 4 E2B instruction-tuned (text)"
    config.model.handle = "kaggle://keras/gemma4/keras/gemma4_instruct_2b/2"
    config.model.instruct = True
    return config
