"""`python -m keras_tune.serve`: the tuned model behind an OpenAI-compatible HTTP API.

The shared model flags choose the base model (`--preset`, `--weights`,
`--mesh`, `--precision`, ...); `--adapter NAME=PATH` (repeatable) adds LoRA
adapters over it, each answering as model NAME, the base as its preset name.
The library is `keras_tune.serve` (see docs/serving.md).

Examples:

```
python -m keras_tune.serve --preset gemma3_270m_offline
python -m keras_tune.serve --preset gemma3_270m_offline --adapter fr=runs/fr/adapter.npz --adapter code=runs/code/adapter.npz
python -m keras_tune.serve --preset gemma_7b_en --mesh 1x8 --slots 16 --context 2048 --host 0.0.0.0
```

Exit codes: 0 stopped (SIGTERM: after the requests in flight finished), 2 a user
error (one `error:` line on stderr), 130 interrupted.
"""

import sys

from keras_tune import cli

SERVE_FLAGS = (
    ("--quantize", "train.quantize", str, "store the frozen base as int8 or int4"),
)


def build_parser():
    """The `serve` tool's parser: the shared model flags, adapters by name, where to listen and how much to hold."""
    parser = cli.tool_parser(
        "python -m keras_tune.serve",
        "Serve a Gemma preset (+ LoRA adapters) behind an OpenAI-compatible API (completions, chat, streaming).",
        SERVE_FLAGS,
        without=("--adapter",),
    )
    parser.add_argument("--adapter", dest="adapters", action="append", metavar="NAME=PATH",
                        help="a LoRA adapter .npz answering as model NAME (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--slots", type=int, default=8, help="sequences decoded together (default 8)")
    parser.add_argument("--context", type=int, default=1024, help="tokens a sequence may take, prompt included (default 1024)")
    parser.add_argument("--max-queue", type=int, default=64, help="sequences that may wait for a slot; beyond, 429 (default 64)")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds SIGTERM waits for requests in flight (default 120)")
    parser.add_argument("--no-warmup", action="store_true", help="compile on first use instead of before serving")
    return parser


def main(argv=None):
    """CLI entry point; returns the process exit code."""

    def work(args):
        from keras_tune.serve.app import create_app, serve_forever
        from keras_tune.serve.loading import ServeLimits, build_service, check_address

        check_address(args.host, args.port)
        config = cli.load_tool_config(args, SERVE_FLAGS)
        limits = ServeLimits(args.slots, args.context, args.max_queue, warm_up=not args.no_warmup)
        service = build_service(config, args.adapters, limits, log=cli.log_stderr)
        cli.log_stderr(f"serving {', '.join(service.adapters.names)} at http://{args.host}:{args.port}/v1 "
                       f"({limits.slots} slots, context {limits.context}); SIGTERM drains and stops")
        serve_forever(create_app(service), args.host, args.port, args.drain_timeout)
        cli.log_stderr("stopped")

    return cli.run_cli(build_parser(), argv, work)


if __name__ == "__main__":
    sys.exit(main())
