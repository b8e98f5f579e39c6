"""`python -m keras_tune.merge`: merge adapters and models (linear, SLERP, task arithmetic, TIES, DARE).

Models are positional (keras-hub preset directories, run directories, adapter
`.npz` files, PEFT adapter directories or keras_tune preset names), with one
`--weight` (and `--density` for TIES/DARE) each; or a mergekit-style YAML file
with `--yaml`. `--out` names what to write, by its form: a directory becomes a
keras-hub preset, `FILE.gguf` a llama.cpp GGUF (Gemma 3), `FILE.npz` an adapter
(with `--keep-lora`); `--transformers DIR` adds a Transformers copy. Existing
outputs are refused before anything is read. The library is `keras_tune.merging`.

Examples:

```
python -m keras_tune.merge runs/a/adapter.npz runs/b/adapter.npz --weight 0.6 0.4 --out merged/
python -m keras_tune.merge --method ties --base gemma3_270m_offline runs/a runs/b --density 0.5 --out merged.gguf
python -m keras_tune.merge --method slerp --t 0.3 model_a/ model_b/ --out merged/
python -m keras_tune.merge runs/a/adapter.npz runs/b/adapter.npz --keep-lora --out merged.npz
python -m keras_tune.merge --yaml merge.yaml --out merged/
```

Exit codes: 0 done, 2 a user error (one `error:` line on stderr), 4 an output could not be written.
"""

import argparse
import sys

from keras_tune import cli, merging
from keras_tune.errors import UserError

# The flags a --yaml file replaces.
RECIPE_FLAGS = ("method", "base", "weight", "density", "t", "scale", "normalize", "rescale", "seed")


def build_parser():
    """The `merge` tool's parser."""
    parser = cli.ArgumentParser(
        prog="python -m keras_tune.merge",
        description="Merge adapters and models of one architecture: linear, slerp, task_arithmetic, ties, dare, "
                    "dare_ties.",
    )
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="a keras-hub preset dir, run dir, adapter .npz, PEFT adapter dir or preset name")
    parser.add_argument("--yaml", metavar="FILE", help="a mergekit-style merge config instead of MODEL and the flags below")
    parser.add_argument("--method", help=f"{', '.join(merging.METHODS)} (default linear)")
    parser.add_argument("--base", metavar="MODEL", help="the base model (task_arithmetic, ties, dare; slerp's start)")
    parser.add_argument("--weight", type=float, nargs="+", metavar="W", help="one weight, or one per MODEL (default 1)")
    parser.add_argument("--density", type=float, nargs="+", metavar="D",
                        help="ties/dare: the fraction of each task vector kept, one or one per MODEL (default 1)")
    parser.add_argument("--t", type=float, help="slerp: 0 is the base (or first model), 1 the other")
    parser.add_argument("--lambda", dest="scale", type=float, help="task methods: the factor on the merged task vector")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="divide by the weights' sum (default: yes for linear and ties)")
    parser.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=None,
                        help="dare: divide what is kept by the density (default yes)")
    parser.add_argument("--seed", type=int, help="dare: the seed of the random drop (default 0)")
    parser.add_argument("--out", action="append", metavar="PATH",
                        help="a directory (keras-hub preset), FILE.gguf or FILE.npz (--keep-lora); repeatable")
    parser.add_argument("--transformers", metavar="DIR", help="also write the merged model as a Transformers directory")
    parser.add_argument("--gguf-dtype", choices=("f32", "f16"), default="f16", help="GGUF weight type (default f16)")
    parser.add_argument("--keep-lora", action="store_true",
                        help="linear/task_arithmetic over adapters: write one adapter of the summed rank")
    return parser


def _per_model(values, count, flag):
    if values is None:
        return [None] * count
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise UserError(f"{flag} got {len(values)} values for {count} models; expected one, or one per model")
    return values


def recipe_from_args(args):
    """The `MergeRecipe` the flags (or the `--yaml` file) describe.

    Args:
        args: parsed arguments of `build_parser()`.
    """
    if args.yaml:
        given = [f"--{name}" for name in RECIPE_FLAGS if getattr(args, name) is not None]
        if args.models or given:
            extra = ", ".join(args.models[:1] + given)
            raise UserError(f"--yaml {args.yaml} describes the whole merge, but {extra} was given too; expected one or "
                            "the other")
        return merging.read_recipe(args.yaml)
    if not args.models:
        raise UserError("no models to merge; expected MODEL arguments or --yaml FILE")
    weights = _per_model(args.weight, len(args.models), "--weight")
    densities = _per_model(args.density, len(args.models), "--density")
    return merging.MergeRecipe(
        method=args.method or "linear",
        models=[merging.MergeInput(model, weight, density) for model, weight, density in zip(args.models, weights,
                                                                                                densities)],
        base=args.base, t=args.t, normalize=args.normalize,
        scale=1.0 if args.scale is None else args.scale, rescale=args.rescale, seed=args.seed or 0,
    )


def run_merge(args, log=cli.log_stderr):
    """What the CLI does, given parsed arguments; returns `merging.merge_models`'s result."""
    recipe = recipe_from_args(args)
    result = merging.merge_models(recipe, out=args.out or (), transformers=args.transformers, keep_lora=args.keep_lora,
                                  gguf_dtype=args.gguf_dtype, log=log)
    for kind, path in result["written"].items():
        print(f"{kind}: {path}")
    print(f"peak RSS: {result['peak_rss_bytes'] / 2**30:.2f} GiB")
    return result


def main(argv=None):
    """CLI entry point; returns the process exit code."""

    def work(args):
        run_merge(args)

    return cli.run_cli(build_parser(), argv, work)


if __name__ == "__main__":
    sys.exit(main())
