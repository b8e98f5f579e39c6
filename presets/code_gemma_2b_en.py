"""CodeGemma 2B (code completion, fill-in-the-middle) (keras-hub preset `code_gemma_2b_en`): the architecture of `gemma_2b_en`."""

from keras_tune.presets.gemma_2b_en import get_config as base_preset


def get_config():
    config = base_preset()
    config.preset = "code_gemma_2b_en"
    config.description = "CodeGemma 2B (code completion, fill-in-the-middle)"
    config.model.handle = "kaggle://keras/codegemma/keras/code_gemma_2b_en/2"
    config.model.instruct = False
    return config
