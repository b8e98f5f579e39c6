"""`python -m keras_tune.generate`: text from a preset (+ a LoRA adapter); merge and export.

Prompts come from the command line, or one a line from stdin when none are
given. Instruct presets (`model.instruct`) get Gemma's chat turn format
(`<start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n`) and stop
at `<end_of_turn>`; `--raw` sends prompts as they are. Each result is printed as
`>>> prompt`, then the generated text (the prompt itself stripped).

`--merge OUT_DIR` folds the adapter into the base weights (`keras_tune.lora.merge_lora`)
and writes a keras-hub preset directory (`save_to_preset`: load it anywhere with
`keras_hub.models.CausalLM.from_preset(OUT_DIR)`, or here with
`--set model.source=local --set model.handle=OUT_DIR`) plus, where keras-hub can
convert the model, a Hugging Face Transformers directory `OUT_DIR/transformers`
(`export_to_transformers`, which needs the `safetensors` package). keras-hub
converts Gemma 1 and Gemma 3; it would write a Gemma 2 model as a Gemma 1 one
(dropping its extra norms, soft-capping and sliding window), so for Gemma 2 only
the keras-hub preset is written and the reason is printed.

Examples:

```
python -m keras_tune.generate --preset gemma_tiny "The weather today"
echo "Best comedy movies in the 90s" | python -m keras_tune.generate --preset gemma2_instruct_2b_en --adapter runs/x/adapter.npz
python -m keras_tune.generate --preset gemma3_270m_offline --sampler top_p --top-p 0.9 --temperature 0.8 --seed 1 "def fib(n):"
python -m keras_tune.generate --preset gemma_tiny --adapter runs/x/adapter.npz --merge exported/gemma_tiny_tuned
```

Exit codes: 0 done, 2 a user error (one `error:` line on stderr).
"""

import os
import sys

from keras_tune.cli import ArgumentParser, load_model, parse_set_flags, run_cli
from keras_tune.errors import UserError

CHAT_TEMPLATE = "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"
SAMPLERS = ("greedy", "top_k", "top_p")


def chat_prompt(prompt):
    """Wraps a user prompt in Gemma's chat turn format."""
    return CHAT_TEMPLATE.format(prompt=prompt)


def stop_token_ids(tokenizer, chat):
    """`<eos>`, plus `<end_of_turn>` for chat prompts when the vocabulary has it."""
    ids = [int(tokenizer.end_token_id)]
    if chat:
        try:
            turn = tokenizer.token_to_id("<end_of_turn>")
        except (KeyError, ValueError):
            turn = None
        if turn is not None and int(turn) not in ids:
            ids.append(int(turn))
    return tuple(ids)


def generate_texts(causal_lm, preprocessor, prompts, max_length, chat=False):
    """Generates a continuation of each prompt (returned without the prompt).

    Works while `fit` runs with the preprocessor detached: `preprocessor` is
    attached for the call and the previous one put back.

    Args:
        causal_lm: a keras-hub CausalLM (its compiled sampler is used).
        preprocessor: its CausalLM preprocessor.
        prompts: strings.
        max_length: prompt plus generated tokens, at most.
        chat: wrap each prompt in the Gemma chat turn format and stop at `<end_of_turn>`.
    """
    inputs = [chat_prompt(p) if chat else p for p in prompts]
    before = causal_lm.preprocessor
    causal_lm.preprocessor = preprocessor
    try:
        outputs = causal_lm.generate(
            inputs,
            max_length=int(max_length),
            stop_token_ids=stop_token_ids(preprocessor.tokenizer, chat),
            strip_prompt=True,
        )
    finally:
        causal_lm.preprocessor = before
    return [outputs] if isinstance(outputs, str) else [str(o) for o in outputs]


def make_sampler(name="greedy", temperature=1.0, top_k=50, top_p=0.9, seed=None):
    """A keras-hub sampler: greedy, top-k or top-p (nucleus), with temperature.

    Args:
        name: "greedy", "top_k" or "top_p".
        temperature: logits are divided by it before sampling (sampled modes).
        top_k: candidates kept by top-k.
        top_p: probability mass kept by top-p.
        seed: makes sampling repeatable.
    """
    import keras_hub

    if name == "greedy":
        return keras_hub.samplers.GreedySampler()
    if temperature <= 0:
        raise UserError(f"--temperature {temperature}: expected a positive number such as 0.7")
    if name == "top_k":
        if top_k < 1:
            raise UserError(f"--top-k {top_k}: expected at least 1")
        return keras_hub.samplers.TopKSampler(k=int(top_k), seed=seed, temperature=float(temperature))
    if name == "top_p":
        if not 0 < top_p <= 1:
            raise UserError(f"--top-p {top_p}: expected a probability in (0, 1]")
        return keras_hub.samplers.TopPSampler(p=float(top_p), seed=seed, temperature=float(temperature))
    raise UserError(f"--sampler '{name}'; expected one of {', '.join(SAMPLERS)}")


# Gemma 2 features keras-hub's Transformers exporter (0.32) does not carry: it writes
# every GemmaBackbone as HF model_type "gemma" (Gemma 1), which has none of them.
_GEMMA2_FEATURES = (
    "use_post_ffw_norm",
    "use_post_attention_norm",
    "final_logit_soft_cap",
    "attention_logit_soft_cap",
    "use_sliding_window_attention",
)


def transformers_export_problem(backbone):
    """Why `export_to_transformers` would write a wrong model for this backbone, or None."""
    if type(backbone).__name__ != "GemmaBackbone":
        return None
    used = [name for name in _GEMMA2_FEATURES if getattr(backbone, name, None)]
    if used:
        return (
            "keras-hub exports a GemmaBackbone as Hugging Face model_type 'gemma' (Gemma 1), which would drop "
            f"this Gemma 2 model's {', '.join(used)}; use the keras-hub preset instead"
        )
    return None


def merge_and_export(causal_lm, out_dir, transformers=True, log=print):
    """Folds LoRA into the base weights and writes a keras-hub preset (and a Transformers copy).

    Args:
        causal_lm: a CausalLM, with or without LoRA.
        out_dir: the preset directory to write.
        transformers: also try `export_to_transformers` into `out_dir/transformers`.
        log: where progress lines go.

    Returns:
        A dict with `preset` (the directory) and `transformers` (a directory, or
        the reason it was not written).
    """
    from keras_tune.lora import merge_lora

    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise UserError(f"--merge {out_dir}: the directory exists and is not empty; expected a new directory")
    merge_lora(causal_lm)
    causal_lm.save_to_preset(out_dir)
    log(f"merged keras-hub preset: {out_dir}")
    result = {"preset": out_dir, "transformers": "not requested"}
    unsupported = transformers_export_problem(causal_lm.backbone)
    if transformers and unsupported:
        result["transformers"] = f"skipped: {unsupported}"
        log(f"Hugging Face Transformers export {result['transformers']}")
    elif transformers:
        target = os.path.join(out_dir, "transformers")
        try:
            causal_lm.export_to_transformers(target)
            result["transformers"] = target
            log(f"Hugging Face Transformers export: {target}")
        except ModuleNotFoundError as error:
            result["transformers"] = f"skipped: {error.name} is not installed (pip install {error.name})"
            log(f"Hugging Face Transformers export {result['transformers']}")
        except (ValueError, NotImplementedError, KeyError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            result["transformers"] = f"skipped: keras-hub cannot export this model ({reason})"
            log(f"Hugging Face Transformers export {result['transformers']}")
    return result


def build_parser():
    parser = ArgumentParser(
        prog="python -m keras_tune.generate",
        description="Generate text with a Gemma preset (+ LoRA adapter); merge and export the tuned model.",
    )
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (default: one a line from stdin)")
    parser.add_argument("--preset", help="preset name (default: the offline Gemma 3 270M)")
    parser.add_argument("--config", help="a copied and edited presets/*.py file to use instead of --preset")
    parser.add_argument("--adapter", help="a LoRA adapter .npz written by keras_tune.fit")
    parser.add_argument("--max-length", type=int, default=128, help="prompt + generated tokens (default 128)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="greedy", help="greedy (default), top_k or top_p")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (top_k, top_p)")
    parser.add_argument("--top-k", type=int, default=50, help="candidates kept by top_k (default 50)")
    parser.add_argument("--top-p", type=float, default=0.9, help="probability mass kept by top_p (default 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    parser.add_argument("--raw", action="store_true", help="do not wrap prompts in the chat format (instruct presets)")
    parser.add_argument("--merge", metavar="OUT_DIR", help="merge the adapter into the weights and save a keras-hub preset (+ Transformers) there")
    parser.add_argument("--precision", help="float32, mixed_bfloat16 or bfloat16 (default: the preset's)")
    parser.add_argument("--mesh", help="device mesh BxM, e.g. 1x8 (default: the preset's)")
    parser.add_argument("--simulate-devices", type=int, help="CPU only: expose N host devices")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override any config field")
    return parser


def _read_stdin_prompts():
    if sys.stdin is None or sys.stdin.isatty():
        return []
    return [line.rstrip("\r\n") for line in sys.stdin if line.strip()]


def run_generate(args, log=print):
    """What the CLI does, given parsed arguments; returns the list of generated texts."""
    from keras_tune import config as config_lib

    if args.max_length < 2:
        raise UserError(f"--max-length {args.max_length}: expected at least 2 tokens")
    prompts = list(args.prompts) or ([] if args.merge else _read_stdin_prompts())
    if not prompts and not args.merge:
        raise UserError("no prompt given; expected prompts as arguments or one a line on stdin")
    overrides = parse_set_flags(args.set)
    for field, value in (("train.precision", args.precision), ("distribution.mesh", args.mesh), ("train.seed", args.seed)):
        if value is not None:
            overrides[field] = value
    config = config_lib.load_config(args.preset, config_file=args.config, overrides=overrides)
    sampler = make_sampler(args.sampler, args.temperature, args.top_k, args.top_p, seed=args.seed)
    causal_lm, metadata = load_model(config, args.adapter)
    if metadata:
        log(f"adapter {args.adapter}: rank {metadata['rank']}, targets {','.join(metadata['targets'])}")
    if args.merge:
        merge_and_export(causal_lm, args.merge, log=log)
    if not prompts:
        return []
    causal_lm.compile(sampler=sampler)
    chat = bool(config.model.instruct) and not args.raw
    texts = generate_texts(causal_lm, causal_lm.preprocessor, prompts, args.max_length, chat=chat)
    for prompt, text in zip(prompts, texts):
        print(f">>> {prompt}\n{text.rstrip()}\n", flush=True)
    return texts


def main(argv=None):
    """CLI entry point; returns the process exit code."""

    def work(args):
        if args.simulate_devices:
            from keras_tune.distribution import simulate_devices

            simulate_devices(args.simulate_devices)
        run_generate(args, log=lambda line: print(line, file=sys.stderr))

    return run_cli(build_parser(), argv, work)


if __name__ == "__main__":
    sys.exit(main())
