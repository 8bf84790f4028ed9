"""The ``terraformer`` command line.

::

    terraformer train  --config gin/X.gin [--config more.gin] [--gin_param 'train.steps=100']
                       --output_dir DIR [--dry_run]
    terraformer eval   --output_dir DIR [--gin_param ...] [--checkpoint latest|best]
    terraformer decode --output_dir DIR (--prompt TEXT | --prompt_file F) [--max_new_tokens N]
                       [--temperature T] [--top_k K] [--top_p P] [--seed S]
    terraformer plot   DIR | FILE                (FILE: a saved `bench attention` output)
    terraformer import-trax --checkpoint model.pkl.gz --config X.gin --output_dir DIR
    terraformer bench  ...                      (terraformer.bench)

Bad input (an argument out of range, a missing file, an unknown gin binding, a gin syntax
error, no checkpoint, a tokenizer that does not fit the model) prints one line on stderr and
exits with status 2, for ``bench`` as for the others (the checks of ``terraformer.arguments``);
a run whose loss stops being finite exits with status 1. ``TERRAFORMER_DEBUG=1`` shows
tracebacks instead.

``main`` applies ``tune_cpu_runtime()`` before anything imports JAX, so that its XLA flags
reach the backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tokenize
from pathlib import Path

from terraformer.arguments import EXIT_USAGE, ArgumentParser, integer, number
from terraformer.runtime import tune_cpu_runtime

__all__ = ["main"]

EXIT_FAILED = 1


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Gin.


def _one_line(error: BaseException) -> str:
    """The first line of an error message, with the gin location when there is one."""
    text = str(error).strip()
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.msg} (in {error.filename}, line {error.lineno})"
    if isinstance(error, tokenize.TokenError):
        return f"gin syntax error: {error.args[0]}"
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    where = next((line for line in lines[1:] if line.startswith("In file")), None)
    return f"{lines[0]} ({where})" if where else lines[0]


def _parse_gin(config_files: list[str], params: list[str]) -> None:
    import gin

    from terraformer import configs  # noqa: F401 (registers every gin name)

    for path in config_files:
        if not Path(path).is_file():
            raise UsageError(f"config file '{path}' does not exist")
    gin.clear_config()
    errors = (ValueError, SyntaxError, tokenize.TokenError, KeyError, TypeError, IOError)
    for path in config_files:
        gin.add_config_file_search_path(str(Path(path).resolve().parent))
        try:
            gin.parse_config_file(path)
        except errors as e:
            raise UsageError(f"bad gin file '{path}': {_one_line(e)}") from e
    for binding in params:
        try:
            gin.parse_config(binding)
        except errors as e:
            raise UsageError(f"bad --gin_param {binding!r}: {_one_line(e)}") from e


def _parse_run_config(output_dir: str, params: list[str]) -> None:
    config = Path(output_dir) / "config.gin"
    if not Path(output_dir).is_dir():
        raise UsageError(f"output_dir '{output_dir}' does not exist (train a model there first)")
    if not config.is_file():
        raise UsageError(f"no config.gin in '{output_dir}' (train a model there first)")
    _parse_gin([str(config)], params)


# ---------------------------------------------------------------------------------------------
# Subcommands.


def _cmd_train(args) -> int:
    from terraformer.parallel.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)  # before any device use
    _parse_gin(args.config, args.gin_param)
    from terraformer.training import loop

    if args.dry_run:
        config = loop.train_config()
        report = loop.dry_run(
            config["model"], config["optimizer"], config["inputs"], seed=config["seed"]
        )
        print(json.dumps(report))
        return 0
    result = loop.train(args.output_dir)
    summary = {"step": result.step, "output_dir": str(args.output_dir)}
    if result.losses:
        summary["last_loss"] = result.losses[max(result.losses)]
    if result.eval_metrics:
        summary["eval"] = result.eval_metrics[max(result.eval_metrics)]
    print(json.dumps(summary))
    return 0


def _cmd_eval(args) -> int:
    _parse_run_config(args.output_dir, args.gin_param)
    from terraformer.training import loop

    metrics = loop.evaluate_checkpoint(args.output_dir, checkpoint=args.checkpoint)
    print(json.dumps(metrics))
    return 0


def _cmd_decode(args) -> int:
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"prompt file '{path}' does not exist")
        prompt = path.read_text(encoding="utf-8")
    else:
        prompt = args.prompt
    _parse_run_config(args.output_dir, args.gin_param)
    from terraformer.data.tokenizers import check_vocab, tokenizer
    from terraformer.training import loop

    config = loop.train_config()
    model_fn = config["model"]
    tok = tokenizer()
    weights, _, meta = loop.load_weights(args.output_dir, model_fn, args.checkpoint)
    check_vocab(tok, meta["vocab_size"])
    ids = tok.encode(prompt)
    _stream_continuation(model_fn, weights, ids, tok, args)
    return 0


def _stream_continuation(model_fn, weights, ids, tok, args) -> None:
    """Prefills the prompt, then prints the continuation as it comes, and tokens/s on stderr."""
    import time

    import numpy as np

    from terraformer.decoding import STREAM_BLOCK, Decoder
    from terraformer.parallel.mesh import mesh

    # on the run's mesh when its config names one (mesh.model = 2: weights over model)
    decoder = Decoder(model_fn(mode="predict"), weights, batch_size=1, mesh=mesh())
    stops = (tok.eos_id,) if tok.eos_id >= 0 else ()
    start = time.perf_counter()
    new = []
    for block in decoder.stream(np.asarray(ids)[None], args.max_new_tokens, args.temperature,
                                args.top_k, args.top_p, args.seed, stops,
                                block_size=STREAM_BLOCK):
        text_before = tok.decode(np.asarray(new, np.int32)) if new else ""
        new.extend(int(t) for t in block[0])
        text = tok.decode(np.asarray(new, np.int32))
        sys.stdout.write(text[len(text_before):] if text.startswith(text_before) else text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - start
    print(f"{len(new)} tokens in {elapsed:.2f}s ({len(new) / max(elapsed, 1e-9):.1f} tokens/s, "
          "prefill and compile included)", file=sys.stderr)


def _cmd_plot(args) -> int:
    from terraformer.training.metrics import METRICS_FILE, plot_metrics

    if Path(args.dir).is_file():  # a saved `terraformer bench attention` output
        from terraformer.bench_attention import plot_attention

        print(plot_attention(args.dir))
        return 0
    if not (Path(args.dir) / METRICS_FILE).is_file():
        raise UsageError(f"no {METRICS_FILE} in '{args.dir}' (train a model there first)")
    print(plot_metrics(args.dir))
    return 0


def _cmd_import_trax(args) -> int:
    from terraformer.interop import import_trax_checkpoint

    for path in (args.checkpoint, *args.config):
        if not Path(path).is_file():
            raise UsageError(f"'{path}' does not exist")
    run_dir = import_trax_checkpoint(args.checkpoint, args.config, args.output_dir,
                                     bindings=args.gin_param, input_shape=args.input_shape)
    print(json.dumps({"output_dir": str(run_dir)}))
    return 0


def _batch_and_length(text: str) -> tuple[int, int]:
    """`--input_shape 1,2048` as (batch, length)."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"must be BATCH,LENGTH, got {text!r}")
    return tuple(integer(1)(part) for part in parts)


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="terraformer", description="Train, evaluate, decode and benchmark Terraformers."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train from gin config files")
    p.add_argument("--config", action="append", required=True, metavar="FILE.gin",
                   help="gin config file (repeatable; later files override earlier ones)")
    p.add_argument("--gin_param", action="append", default=[], metavar="BINDING",
                   help="a gin binding such as 'train.steps=100' (repeatable)")
    p.add_argument("--output_dir", required=True, help="run directory (resumed if it exists)")
    p.add_argument("--dry_run", action="store_true",
                   help="build the model and print parameter counts and memory estimates")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="several processes: the coordinator's address (default: "
                        "$JAX_COORDINATOR_ADDRESS; none: one process)")
    p.add_argument("--num_processes", type=integer(1), default=None)
    p.add_argument("--process_id", type=integer(0), default=None)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint on its held-out stream")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--gin_param", action="append", default=[], metavar="BINDING")
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("decode", help="continue a prompt with a trained model")
    p.add_argument("--output_dir", required=True)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt_file", help="file holding the prompt text")
    p.add_argument("--max_new_tokens", type=integer(1), default=100,
                   help="tokens to generate (default 100; fewer when the model ends the text)")
    p.add_argument("--temperature", type=number(0.0), default=0.0,
                   help="0 (the default): greedy; above 0: sampling")
    p.add_argument("--top_k", type=integer(1), default=None,
                   help="sample among the k likeliest tokens")
    p.add_argument("--top_p", type=number(0.0, 1.0, allow_minimum=False), default=None,
                   help="sample among the likeliest tokens holding this probability")
    p.add_argument("--seed", type=integer(0), default=0)
    p.add_argument("--gin_param", action="append", default=[], metavar="BINDING")
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest")
    p.set_defaults(func=_cmd_decode)

    p = sub.add_parser("plot", help="draw DIR/metrics.jsonl as DIR/metrics.png (or a saved "
                       "`bench attention` output FILE as FILE.png)")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("import-trax",
                       help="make a run directory from a trax 1.4.1 checkpoint (no trax needed)")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="trax's model.pkl.gz (training.Loop) or a Layer.save_to_file file")
    p.add_argument("--config", action="append", required=True, metavar="FILE.gin",
                   help="gin file(s) that build the same model (repeatable)")
    p.add_argument("--gin_param", action="append", default=[], metavar="BINDING")
    p.add_argument("--output_dir", required=True, help="the new run directory")
    p.add_argument("--input_shape", type=_batch_and_length, default=None, metavar="BATCH,LENGTH",
                   help="token input shape, when the checkpoint holds no input signature")
    p.set_defaults(func=_cmd_import_trax)

    sub.add_parser("bench", help="run a benchmark workload (terraformer bench -h)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    tune_cpu_runtime()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    if os.environ.get("TERRAFORMER_DEBUG"):
        return args.func(args)
    from terraformer.training.checkpoints import CheckpointError
    from terraformer.training.loop import TrainingDivergedError, TrainingInterruptedError

    try:
        return args.func(args)
    except TrainingInterruptedError as e:  # SIGINT/SIGTERM: the step it stopped at is saved
        print(f"terraformer {args.command}: {_one_line(e)}", file=sys.stderr)
        return e.exit_status
    except TrainingDivergedError as e:
        print(f"terraformer {args.command}: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except (UsageError, CheckpointError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"terraformer {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


def _bench(argv: list[str]) -> int:
    """``terraformer bench``: its parser refuses bad arguments; a workload the library refuses
    (a length its chunking cannot split, ...) is one line and status 2 as for the others."""
    from terraformer import bench

    if os.environ.get("TERRAFORMER_DEBUG"):
        return bench.main(argv) or 0
    try:
        return bench.main(argv) or 0
    except (ValueError, TypeError) as e:
        print(f"terraformer bench: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
