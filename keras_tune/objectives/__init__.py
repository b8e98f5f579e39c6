"""Objectives: what a run trains for, each a loss and a Keras trainer on the same `fit`.

| `train.objective` | module | trains on |
| --- | --- | --- |
| `sft` | `base.py` (`Objective`) | next-token NLL at the loss positions (`keras_tune.losses`) |
| `distill` | `distill.py`, `divergence.py`, `teacher.py`, `sampling.py` | a frozen teacher's distributions (forward/reverse KL, JSD), mixed with the NLL; on-policy as an option |
| `dpo` | `preference.py` | preference pairs, against the same network with LoRA off |
| `orpo` | `preference.py` | preference pairs, reference-free |

Each is an `Objective` the training path asks at its steps (`keras_tune.training`):
checks before anything is built, what it adds to the plan and the build (a
teacher), its data, the compiled trainer, the words for its figures and the
`metrics.csv` columns it adds. Every trainer computes the output head only
where the loss is, a vocabulary block at a time: no `[tokens, vocabulary]`
logits exist whole. Callbacks, checkpoints, resume, multi-process runs, the
planner and the run directory are SFT's.

Example:

```python
config = keras_tune.load_config("gemma3_tiny", overrides={"train.objective": "orpo", "data.name": "text",
                                                          "data.path": "prefs.jsonl"})
objective = get(config)
objective.check()   # a bad preference file: one UserError, before any model is built
```
"""

from keras_tune.objectives.base import Objective
from keras_tune.objectives.distill import Distill
from keras_tune.objectives.preference import Preference

OBJECTIVES = {"sft": Objective, "distill": Distill, "dpo": Preference, "orpo": Preference}


def get(config):
    """The objective a run config names (`train.objective`), for that config.

    Args:
        config: a validated run config.
    """
    return OBJECTIVES[config.train.objective](config)


__all__ = ["OBJECTIVES", "Objective", "Distill", "Preference", "get"]
