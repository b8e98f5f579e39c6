"""What every objective is to the training path: checks, extra models, data, the compiled trainer, its figures.

`keras_tune.training` asks the run's objective (`keras_tune.objectives.get`)
at each of its steps; SFT's answers are the ones the path had before
objectives existed (`make_datasets`, `with_loss_positions_for`, `compile_training`).
"""


class Objective:
    """Next-token supervised fine-tuning, and the interface the other objectives override.

    Args:
        config: the validated run config.

    Attributes:
        name: the `train.objective` value.
        columns: `metrics.csv` columns the objective adds, logged every step from the
            trainer's `step_<column>` metric (and `val_<column>` at evaluations).
    """

    name = "sft"
    columns = ()

    def __init__(self, config):
        self.config = config

    def check(self):
        """Cheap checks of the objective's own inputs, before any model is built (a `UserError` if wrong)."""

    def plan(self, plan):
        """Plans what the objective adds to the run on the run's mesh (shapes only) and says it.

        Args:
            plan: the run's `ShardingPlan`.
        """

    def build(self, causal_lm, plan):
        """Builds what the objective needs besides the run's model (a teacher) on the same mesh.

        Args:
            causal_lm: the run's CausalLM, built.
            plan: the run's `ShardingPlan` (its distribution is active again afterwards).
        """

    def datasets(self, tokenizer, seed):
        """The run's `DataBundle`, tokenized by the model's tokenizer.

        Args:
            tokenizer: the model's keras-hub tokenizer.
            seed: the run's seed.
        """
        from keras_tune.data import make_datasets

        return make_datasets(self.config.data, tokenizer, seed=seed)

    def prepare(self, data):
        """The bundle's batches as the trainer reads them (mapped in place).

        Args:
            data: the run's `DataBundle`.
        """
        from keras_tune.losses import with_loss_positions_for

        return with_loss_positions_for(data, self.config.train)

    def compile(self, causal_lm, optimizer):
        """The compiled model `fit` trains.

        Args:
            causal_lm: the run's CausalLM (LoRA applied).
            optimizer: a Keras optimizer over the run's length.
        """
        from keras_tune.losses import compile_training

        return compile_training(causal_lm, self.config.train, optimizer)

    def describe(self, results):
        """An evaluation's figures in words, e.g. "loss 2.7976, perplexity 16.40".

        Args:
            results: keras' results dict of an evaluation (keys without `val_`).
        """
        return f"loss {results['loss']:.4f}, perplexity {results.get('perplexity', float('nan')):.2f}"
