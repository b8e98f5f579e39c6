"""The memory planner: bytes per device of a training step, and whether they fit.

Everything is computed from shapes: the abstract model (`abstract_model`, no
weights) and its sharding plan (`plan_sharding`); nothing is allocated.

| module | holds |
| --- | --- |
| `devices.py` | the device table (peak FLOP/s and memory a device), `--device-memory` sizes |
| `shapes.py` | `ModelShapes`: a family's planner view of its blocks (`Family.planner_shapes`) |
| `activations.py` | what the backward pass keeps, block by block; the logits' buffers |
| `figures.py` | weights, gradients, optimizer state; `MemoryReport` and `figures` |
| `suggest.py` | the changes tried when a run does not fit |
| `plan.py` | `plan_memory` (figures + verdict + suggestion) and `format_memory_report` |

What is counted, per device (each tensor divided by its placement's shards):

- **base weights**: every frozen variable in its stored dtype; with
  `train.quantize`, the matrices as Keras stores them (int8: a byte a weight
  and a float32 scale an output channel; int4: half a byte, a float32 scale
  and an int8 zero point per 128 inputs of an output channel).
- **trainable weights** (LoRA matrices, or everything at `--lora-rank 0`),
  **gradients** (one per trainable variable, same dtype and placement) and
  **optimizer state** (Keras keeps each slot in its variable's dtype and
  layout: AdamW 2, SGD 1 with momentum else 0, one more for accumulation).
- **activations**: what the backward pass keeps of each decoder block,
  derived op by op from keras-hub's Gemma blocks by the chain rule:

  | op | kept for the backward pass |
  | --- | --- |
  | RMSNorm (float32 inside) | its input (compute dtype) and 1/rms; x/rms too if the scale trains |
  | q/k/v, gate/up, output, down projections | the input, only where the kernel trains (full or LoRA) |
  | RoPE, scaling, residual adds | nothing (linear) |
  | q.k^T, probabilities.v | q and k; the probabilities (compute dtype) and v |
  | masked softmax (float32) | the exp of the shifted scores, and the mask (a byte a pair) |
  | attention soft cap (Gemma 2) | its tanh |
  | tanh-GELU(gate) * up | gate and up outputs, the tanh, the GELU |

  Token tensors hold `batch / batch axis` sequences; heads, FFW and vocabulary
  divide by the model axis where the layout splits that dimension of their
  kernel. D-wide tensors (the residual stream, norm inputs) are whole on every
  device, except where the layout splits the hidden dimension of q/k/v (the
  fallback for heads that do not divide the axis) or a kernel's output: XLA
  then keeps them split. With `train.remat` a block keeps only its input, plus
  one block recomputed during its backward pass; both figures are reported.
  `train.keep_activations=matmuls` is counted as this table too: an
  upper bound, as the blocks then keep only their matmul outputs and recompute
  the rest (how much less depends on where XLA schedules the recomputation;
  measured figures in BENCHMARKS.md).
- **RecurrentGemma** (Griffin): its local-attention blocks are counted as
  above (one key/value head; the code masks a full T x T score matrix to the
  2,048-token window, so the scores are T x T whatever the window), its
  recurrent blocks by `recurrent_block_activations` (linear_y's GELU branch,
  the convolution, the float32 RG-LRU gates and the parallel scan's levels:
  linear in T), both with the norms and gated MLP of a Gemma block.
- **backward workspace**: one block's float32 score gradient and gate/up
  gradients while its backward pass runs (a recurrent block: its scan's).
- **logits/loss buffer**: `full`: tokens x vocabulary of float32 shifted
  logits, their exp and their gradient (plus the compute-dtype logits when
  those are narrower, the soft cap's tanh, a second gradient when the
  embedding trains); `sparse` (`keras_tune.losses`): the forward and
  recomputed logits of one block of vocabulary rows for one chunk of
  `train.loss_chunk_tokens` tokens (the worst case: every position carries
  loss), plus the gathered table of fsdp layouts. The peak holds the larger of this
  buffer and the backward workspace, not both.
- **transient weights**: the largest weight as the compute uses it, where that
  differs from how it is stored: gathered over the 'batch' axis (fsdp
  layouts), cast (mixed precision) or dequantized.

Not counted: the data batch (KiB), LoRA's rank-wide `x A` (XLA recomputes
it), XLA's scratch and the runtime's reserve. The tests hold the total within
20% of XLA's compiled train step (`memory_analysis()`) on CPU, float32, for the
tiny presets on several meshes and the real Gemma 3 270M; where and why XLA
differs from the plan is in BENCHMARKS.md ("How close the planner is"). A fused
attention kernel (TPU, cuDNN) keeps no `B H T T` scores at all: there the plan
is an upper bound.

Example:

```python
import keras_tune
config = keras_tune.load_config("gemma_7b_en", overrides={
    "distribution.mesh": "1x8", "train.device_memory": "16GiB"})
print(keras_tune.format_memory_report(keras_tune.plan_memory(config)))
```
"""
