"""Translation scores: greedy translations of held-out pairs, scored with sacrebleu's chrF and BLEU (library code).

The pairs come from a data recipe's validation split, the same examples a run
holds out (`translation_examples`): MTNT's `valid` split (TFDS
`mtnt/<pair>`, prompts from `data.prompt_template`) or the held-out share of a
user's prompt/response file (`text` recipe). Each prompt is sent as the model
saw it in training (`<bos>` + prompt), the model continues greedily until
`<eos>` or `max_length` tokens in all, and the continuation, stripped of
surrounding whitespace, is the hypothesis. The corpus scores are sacrebleu's
own (`corpus_chrf`, `corpus_bleu` with their default settings: chrF with
character 6-grams and beta 2, BLEU with the 13a tokenizer), so they equal what
sacrebleu computes on the same hypotheses.

`translation_scores` is also what a training run calls between steps; the
preprocessor can be passed in while `fit` has it detached from the model.

Example:

```python
import keras_tune
from keras_tune.translation import translation_examples, translation_scores

config = keras_tune.load_config("gemma3_270m_offline", overrides={"data.name": "mtnt"})
causal_lm = keras_tune.load_causal_lm(config)
examples, where = translation_examples(config.data, causal_lm.preprocessor.tokenizer, seed=config.train.seed)
scores = translation_scores(causal_lm, examples, max_length=128, batch_size=8)
print(scores["chrf"], scores["bleu"], scores["hypotheses"][:3])
```

The command-line tool is `python -m keras_tune.evaluate --task translation`.
"""

import numpy as np

from keras_tune.errors import UserError


def translation_examples(data_config, tokenizer, seed=0, log=None):
    """The held-out `(prompt, reference)` pairs of a prompt/target recipe (`mtnt`, or `text` with prompt/response records).

    Args:
        data_config: the `data` section of the run config (recipe, paths, template, validation share).
        tokenizer: the model's tokenizer (recipes check lengths with it).
        seed: the run's seed: it fixes the held-out share of a user's file, as in training.
        log: where the recipe's progress lines go (None: quiet).

    Returns:
        `(examples, where)`: the pairs, and where they came from, in words.
    """
    from keras_tune import data, environment

    data.check_data(data_config)
    environment.keep_tensorflow_off_accelerators()
    recipe = data.RECIPES[data_config.name]
    source = recipe.source(data_config, tokenizer, seed=seed, log=log or (lambda line: None))
    if source.validation is None:
        raise UserError(f"recipe '{data_config.name}' holds out no examples (data.validation_fraction 0); "
                        "expected a held-out split to translate")
    examples = []
    for example in source.validation.as_numpy_iterator():
        segments, weights = example["segments"], example["weights"]
        if len(segments) != 2 or weights.tolist() != [0.0, 1.0]:
            raise UserError(f"recipe '{data_config.name}' gives examples of {len(segments)} segments weighted "
                            f"{weights.tolist()}; expected prompt/target pairs (mtnt, or text with prompt/response records)")
        examples.append((segments[0].decode("utf-8"), segments[1].decode("utf-8")))
    if not examples:
        raise UserError(f"recipe '{data_config.name}': the held-out split ({source.validation_source}) is empty; "
                        "expected at least one pair")
    return examples, source.validation_source


def score_hypotheses(hypotheses, references):
    """sacrebleu's corpus chrF and BLEU of `hypotheses` against one reference each.

    Args:
        hypotheses: strings.
        references: strings, one a hypothesis.

    Returns:
        `{"chrf", "bleu"}`, each 0-100.
    """
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    return {"chrf": float(sacrebleu.corpus_chrf(hypotheses, [references]).score),
            "bleu": float(sacrebleu.corpus_bleu(hypotheses, [references]).score)}


def _greedy(causal_lm):
    """Swaps in a greedy sampler where the model has another; returns a function that puts it back."""
    import keras_hub

    before, function = getattr(causal_lm, "sampler", None), getattr(causal_lm, "generate_function", None)
    if isinstance(before, keras_hub.samplers.GreedySampler):
        return lambda: None
    causal_lm.sampler = keras_hub.samplers.GreedySampler()
    causal_lm.generate_function = None  # compiled for the other sampler

    def restore():
        causal_lm.sampler, causal_lm.generate_function = before, function

    return restore


def translate(causal_lm, prompts, max_length, batch_size=8, preprocessor=None):
    """Greedy continuations of `prompts` (no chat turns), in batches of one compiled shape.

    Args:
        causal_lm: a keras-hub CausalLM.
        prompts: strings, each sent as `<bos>` + prompt.
        max_length: prompt + generated tokens, at most.
        batch_size: prompts a `generate` call (the last batch is padded with copies).
        preprocessor: the model's CausalLM preprocessor (default: its attached one).
    """
    from keras_tune.decoding import generate_texts

    preprocessor = preprocessor or causal_lm.preprocessor
    tokenizer = preprocessor.tokenizer
    longest = max(int(np.asarray(tokenizer(p)).size) + 1 for p in prompts)
    if longest >= max_length:
        raise UserError(f"max_length {max_length} leaves no room to translate a prompt of {longest} tokens; "
                        f"expected a max_length above {longest}")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size}: expected at least 1")
    restore = _greedy(causal_lm)
    try:
        texts = []
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            padded = batch + batch[-1:] * (batch_size - len(batch))
            texts += generate_texts(causal_lm, preprocessor, padded, max_length)[: len(batch)]
    finally:
        restore()
    return texts


def translation_scores(causal_lm, examples, max_length, batch_size=8, preprocessor=None):
    """Translates each example's prompt greedily and scores the translations against the references.

    Args:
        causal_lm: a keras-hub CausalLM.
        examples: `(prompt, reference)` pairs (`translation_examples`).
        max_length: prompt + generated tokens, at most.
        batch_size: prompts a `generate` call.
        preprocessor: the model's CausalLM preprocessor (default: its attached one; `fit` passes
            the one it detached).

    Returns:
        `{"chrf", "bleu", "hypotheses"}`: sacrebleu's corpus chrF and BLEU (0-100) and the
        translations, in the order of `examples`.
    """
    if not examples:
        raise UserError("no examples to translate; expected at least one (prompt, reference) pair")
    prompts, references = [p for p, _ in examples], [r for _, r in examples]
    hypotheses = [text.strip() for text in translate(causal_lm, prompts, max_length, batch_size, preprocessor)]
    return dict(score_hypotheses(hypotheses, references), hypotheses=hypotheses)
