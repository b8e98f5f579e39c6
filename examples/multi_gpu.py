"""LoRA fine-tuning on one multi-GPU host: the mesh and memory are planned first, then it trains.

Every device of the host takes part. The mesh is 2 x N/2 (each batch split two ways, each
weight matrix N/2 ways) with the model family's FSDP layout, which splits every large weight
over both axes; the sharding table and the memory planner's verdict are printed before any
weight exists, and the script stops with the planner's suggestion when the plan does not fit.

    python examples/multi_gpu.py --preset gemma2_9b_en --data mtnt          # 8 GPUs: a 2x4 mesh
    python examples/multi_gpu.py --preset gemma_7b_en --data text --data-path notes/*.txt

Try it on a CPU with simulated devices and a tiny preset:

    python examples/multi_gpu.py --preset gemma2_tiny --simulate-devices 8 --device-memory 16GiB \\
        --steps 4 --data text --data-path notes.txt

Gemma weights come from Kaggle: set KAGGLE_USERNAME and KAGGLE_KEY (or ~/.kaggle/kaggle.json)
and accept the Gemma license on the model's page. For more settings, `python -m keras_tune.fit`
takes every field of the run config.
"""

import argparse
import sys

import keras_tune


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="LoRA fine-tuning on every device of one multi-GPU host.")
    parser.add_argument("--preset", default="gemma2_9b_en")
    parser.add_argument("--data", default="mtnt", help="recipe: imdb, mtnt, code, text, chat")
    parser.add_argument("--data-path", default="", help="your files (text, code, chat recipes)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--device-memory", default="", help="memory of one device, e.g. 80GiB (default: ask it)")
    parser.add_argument("--simulate-devices", type=int, default=0, help="CPU only: expose N host devices")
    parser.add_argument("--output-dir", default="", help="run directory (default runs/<preset>-<time>)")
    return parser.parse_args(argv)


def host_mesh(device_count):
    """2 x N/2 on an even count of at least 4 devices, else 1 x N."""
    return f"2x{device_count // 2}" if device_count >= 4 and device_count % 2 == 0 else f"1x{device_count}"


def main(argv=None):
    args = parse_args(argv)
    keras_tune.simulate_devices(args.simulate_devices)  # before anything starts JAX
    import keras

    mesh = host_mesh(len(keras.distribution.list_devices()))
    family = keras_tune.load_config(args.preset).model.family
    config = keras_tune.load_config(args.preset, overrides={
        "distribution.mesh": mesh, "distribution.layout": f"{family}_fsdp",
        "lora.rank": args.lora_rank,
        "data.name": args.data, "data.path": args.data_path,
        "data.seq_len": args.seq_len, "data.batch_size": args.batch_size,
        "train.steps": args.steps, "train.output_dir": args.output_dir, "train.device_memory": args.device_memory,
    })

    plan = keras_tune.plan_sharding(config, keras_tune.abstract_model(config).weights)
    print(plan.table())
    report = keras_tune.plan_memory(config, plan)
    print(f"mesh {mesh}, layout {plan.layout.name}: planned {report.total / 2**30:.2f} GiB a device; {report.verdict}")
    if report.fits is False:
        print(f"error: the plan does not fit; {report.suggestion}", file=sys.stderr)
        return 2

    result = keras_tune.run(config)
    print(f"adapter and metrics in {result.output_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except keras_tune.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
