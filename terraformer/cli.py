"""The ``terraformer`` command line (see DESIGN.md, "The command line").

::

    terraformer train  --config gin/X.gin [--config more.gin] [--gin_param 'train.steps=100']
                       --output_dir DIR [--dry_run]
    terraformer eval   --output_dir DIR [--gin_param ...] [--checkpoint latest|best]
    terraformer decode --output_dir DIR (--prompt TEXT | --prompt_file F) [--max_new_tokens N]
                       [--temperature T] [--top_k K] [--top_p P] [--seed S]
    terraformer plot   DIR
    terraformer bench  ...                      (terraformer.bench)

Bad input (a missing file, an unknown gin binding, a gin syntax error, no checkpoint, a
tokenizer that does not fit the model) prints one line on stderr and exits with status 2; a
run whose loss stops being finite exits with status 1. ``TERRAFORMER_DEBUG=1`` shows
tracebacks instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tokenize
from pathlib import Path

__all__ = ["greedy_decode", "main"]

EXIT_USAGE = 2
EXIT_FAILED = 1


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# The thin decoding helper (to be replaced by terraformer.decoding).


def _sample(logits, rng, temperature: float, top_k: int | None, top_p: float | None):
    """Next ids [batch] from logits [batch, vocab]: argmax when temperature == 0."""
    import jax
    import jax.numpy as jnp

    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        inverse = jnp.argsort(order, axis=-1)
        logits = jnp.take_along_axis(sorted_logits, inverse, axis=-1)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def greedy_decode(model_fn, weights, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                  eos_id: int | None = None, start_id: int = 0):
    """Continues ``prompt_ids`` with the model in ``predict`` mode, one token per jitted step.

    Feeds ``start_id`` (the id the model shifts in, 0) and then the prompt token by token to
    fill the model's caches, then feeds back each new token.

    Args:
      model_fn: function of ``mode`` returning the language model Layer.
      weights: its trained weights (any mode: the pytrees are the same).
      prompt_ids: int ids, ``(n,)`` or ``(batch, n)``.
      max_new_tokens: how many tokens to generate.
      temperature: 0 for greedy (argmax); > 0 samples from ``softmax(logits / temperature)``,
        restricted to the ``top_k`` most likely and/or the smallest set of mass ``top_p``.
      seed: seed of the sampling.
      eos_id: stop once every row has produced it (it is kept in the output).

    Returns:
      int32 numpy array of the new ids, ``(max_new_tokens,)`` or ``(batch, max_new_tokens)``
      (shorter when stopped at ``eos_id``).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from terraformer.shapes import ShapeDtype

    prompt = np.asarray(prompt_ids)
    if prompt.ndim not in (1, 2) or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(
            f"greedy_decode: prompt_ids must be int ids (n,) or (batch, n), got "
            f"{prompt.dtype} {prompt.shape}"
        )
    if temperature < 0:
        raise ValueError(f"greedy_decode: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"greedy_decode: top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"greedy_decode: top_p must be in (0, 1], got {top_p}")
    rows = prompt[None] if prompt.ndim == 1 else prompt
    batch = rows.shape[0]
    model = model_fn(mode="predict")
    _, state = model.init_weights_and_state(
        ShapeDtype((batch, 1), jnp.int32), jax.random.PRNGKey(0))

    @jax.jit
    def step(weights, state, token, rng):
        log_probs, state = model.apply(token[:, None], weights, state, None)
        return _sample(log_probs[:, -1, :], rng, temperature, top_k, top_p), state

    base = jax.random.PRNGKey(seed)
    feed = np.concatenate([np.full((batch, 1), start_id, np.int32), rows.astype(np.int32)], 1)
    token = None
    for i in range(feed.shape[1]):
        token, state = step(weights, state, jnp.asarray(feed[:, i]), jax.random.fold_in(base, i))
    out = []
    for i in range(max_new_tokens):
        out.append(np.asarray(token))
        if eos_id is not None and np.all(np.any(np.stack(out, 1) == eos_id, axis=1)):
            break
        if i + 1 < max_new_tokens:
            token, state = step(weights, state, token,
                                jax.random.fold_in(base, feed.shape[1] + i))
    new = np.stack(out, 1) if out else np.zeros((batch, 0), np.int32)
    return new[0] if prompt.ndim == 1 else new


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
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    _parse_run_config(args.output_dir, args.gin_param)
    from terraformer import configs
    from terraformer.data.tokenizers import check_vocab
    from terraformer.training import loop

    config = loop.train_config()
    model_fn = config["model"]
    tok = configs.tokenizer()
    weights, _, meta = loop.load_weights(args.output_dir, model_fn, args.checkpoint)
    check_vocab(tok, meta["vocab_size"])
    ids = tok.encode(prompt)
    new = greedy_decode(
        model_fn, weights, ids, args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        eos_id=tok.eos_id if tok.eos_id >= 0 else None,
    )
    sys.stdout.write(tok.decode(new) + "\n")
    return 0


def _cmd_plot(args) -> int:
    from terraformer.training.metrics import METRICS_FILE, plot_metrics

    if not (Path(args.dir) / METRICS_FILE).is_file():
        raise UsageError(f"no {METRICS_FILE} in '{args.dir}' (train a model there first)")
    print(plot_metrics(args.dir))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gin_param", action="append", default=[], metavar="BINDING")
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest")
    p.set_defaults(func=_cmd_decode)

    p = sub.add_parser("plot", help="draw DIR/metrics.jsonl as DIR/metrics.png")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_plot)

    sub.add_parser("bench", help="run a benchmark workload (terraformer bench -h)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from terraformer import bench

        return bench.main(argv[1:]) or 0
    args = _parser().parse_args(argv)
    if os.environ.get("TERRAFORMER_DEBUG"):
        return args.func(args)
    from terraformer.training.checkpoints import CheckpointError
    from terraformer.training.loop import TrainingDivergedError

    try:
        return args.func(args)
    except TrainingDivergedError as e:
        print(f"terraformer {args.command}: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except (UsageError, CheckpointError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"terraformer {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
