"""The code recipe's seed: a GPT-2-small-sized Gemma 3 trained from scratch on Python that uses data libraries.

The seed (codeparrot-ds) trains on Python files that use pandas, scikit-learn,
matplotlib or seaborn with its own tokenizer, context 128, batch 32 with
gradient accumulation 8, AdamW at 5e-4 with weight decay 0.1, 1,000 warmup
updates then cosine decay, an evaluation every 5,000 updates, and a loss that
weighs rows by their key tokens (`plt`, `pd`, `sk`, `fit`, `predict`). Train a
tokenizer on the corpus first, then give it to this preset:

```
python -m keras_tune.tokenizer train --data code --data-path 'codeparrot/**/*.parquet' --vocab-size 32768 --output code.model
python -m keras_tune.fit --preset code_from_scratch --set model.tokenizer=code.model --data code --data-path 'codeparrot/**/*.parquet'
```

The model's vocabulary is the tokenizer's (`arch.vocabulary_size` below is the
size the seed's numbers assume); a corpus above 64 MB streams from token shards.
"""

from keras_tune.config import base_config


def get_config():
    config = base_config()
    config.preset = "code_from_scratch"
    config.description = "GPT-2-small-sized Gemma 3 from scratch on data-science Python (the code seed's settings)"
    config.model.family = "gemma3"
    config.model.source = "tiny"  # random init; the tokenizer comes from --set model.tokenizer=PATH
    config.model.arch = dict(
        vocabulary_size=32768,
        image_size=None,
        num_layers=12,
        num_query_heads=12,
        num_key_value_heads=12,
        hidden_dim=768,
        # Gemma's gated MLP: 3 x 768 x 2048 weights a layer, GPT-2 small's 2 x 768 x 3072 and a little more.
        intermediate_dim=2048,
        head_dim=64,
        query_head_dim_normalize=True,
        use_query_key_norm=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        use_sliding_window_attention=False,
        layer_norm_epsilon=1e-6,
    )
    config.distribution.layout = "gemma3_tp"
    config.lora.rank = 0  # every weight trains
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 5e-4
    config.optimizer.weight_decay = 0.1
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 1000
    config.optimizer.accumulation_steps = 8
    config.optimizer.clipnorm = 1.0
    config.data.name = "code"
    config.data.seq_len = 128
    config.data.batch_size = 32
    config.data.filter_keywords = ("pandas", "sklearn", "matplotlib", "seaborn")
    config.data.key_tokens = ("plt", "pd", "sk", "fit", "predict")
    config.data.key_token_alpha = 1.0
    config.train.epochs = 1
    config.train.eval_every = 5000
    config.train.save_every = 5000
    config.train.precision = "float32"
    config.train.sample_prompts = (
        "# create some data\nx = np.random.randn(100)\ny = np.random.randn(100)\n# create scatter plot with x, y\n",
        "# create dataframe from x and y\n",
        "# dataframe with profession, income and name\n",
    )
    config.train.sample_max_length = 96
    return config
