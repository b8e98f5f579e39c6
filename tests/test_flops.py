"""FLOPs a training token costs: RecurrentGemma's recurrent blocks have no attention term, its local attention a window."""

import pytest

from keras_tune import config as config_lib
from keras_tune import flops
from keras_tune.models.loader import abstract_model

# recurrentgemma_tiny by hand: vocabulary 1024, width D 64, MLP 192, 4 heads of 16, recurrence 64,
# window 16, convolution 4, blocks recurrent, recurrent, attention.
EMBEDDING = 1024 * 64
NORMS = 2 * 64
MLP = 2 * (64 * 192 + 192) + 192 * 64 + 64
RECURRENT = 3 * (64 * 64 + 64) + (4 * 64 + 64) + 64 + 2 * (4 * 16 * 16 + 4 * 16)  # linear x/y/out, conv, RG-LRU
ATTENTION = 64 * 64 + 2 * 64 * 16 + 64 * 64 + 64  # query, one key/value head, output
TOTAL = EMBEDDING + 2 * (NORMS + MLP + RECURRENT) + (NORMS + MLP + ATTENTION) + 64
# LoRA rank 4 on query and value (attention block) and linear_x, linear_y (both recurrent blocks).
LORA = (64 * 4 + 4 * 64) + (64 * 4 + 4 * 16) + 2 * 2 * (64 * 4 + 4 * 64)


@pytest.fixture(scope="module")
def tiny_backbone():
    return abstract_model(config_lib.load_config("recurrentgemma_tiny"))


@pytest.mark.parametrize("seq_len, keys", [(8, 8), (17, 17), (64, 17), (4096, 17)])
def test_recurrentgemma_tiny_flops_match_the_hand_count(tiny_backbone, seq_len, keys):
    # One attention block in three; a query sees the 16-token window and itself.
    expected = 4 * (TOTAL + LORA) + 2 * LORA + 12 * 1 * keys * (4 * 16)
    assert flops.model_flops_per_token(tiny_backbone, seq_len) == expected


def test_the_hand_count_is_the_model_s_parameter_count(tiny_backbone):
    from keras_tune.lora import trainable_report

    assert trainable_report(tiny_backbone) == {"trainable": LORA, "total": TOTAL + LORA, "fraction": LORA / (TOTAL + LORA)}
    assert TOTAL == 218_304  # as `fit --list-presets` prints


def test_recurrentgemma_9b_attention_is_bounded_by_the_window_not_the_sequence():
    backbone = abstract_model(config_lib.load_config("recurrentgemma_9b"))
    assert flops.attention_span(backbone, 8192) == (12, 2049)  # 38 blocks: 12 attend, over 2,048 + 1 keys
    assert flops.attention_span(backbone, 128) == (12, 128)
    dense = flops.model_flops_per_token(backbone, 1)
    # Past the window, a longer sequence costs nothing more per token.
    assert flops.model_flops_per_token(backbone, 8192) == flops.model_flops_per_token(backbone, 2049) > dense


def test_gemma_still_attends_in_every_block_over_the_whole_sequence():
    backbone = abstract_model(config_lib.load_config("gemma_tiny"))
    assert flops.attention_span(backbone, 64) == (backbone.num_layers, 64)
