"""Decoding: chunked prefill, a compiled per-token loop, sampling, streaming.

The model is a predict-mode layer: it takes the previous token(s) [batch, n] and returns
log-probabilities [batch, n, vocab] for the next position(s), keeping its caches in `state`.
Feeding `[0, t_0, ..., t_{n-1}]` gives the distribution of t_n (the model's own start token
is 0, as its ShiftRight pads with 0 in training).

    decoder = Decoder(TransformerLM(..., mode="predict"), weights, batch_size=1)
    tokens = decoder.generate(prompt_ids, max_new_tokens=64, temperature=0.0)

`generate` runs the whole generation as one `lax.while_loop` inside one jitted function;
`stream` yields tokens in blocks, each block one compiled scan, so a notebook or the CLI
can print as tokens come without a Python loop per token.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from terraformer.checks import check_choice, check_int, check_number
from terraformer.layers.base import Layer
from terraformer.layers.combinators import Serial
from terraformer.layers.core import DECODE_DTYPES, Dense, argmax
from terraformer.parallel.distributed import put
from terraformer.parallel.sharding import replicated, tree_shardings
from terraformer.shapes import ShapeDtype

START_ID = 0
# Tokens per call of the compiled loop when streaming: a call's dispatch cost is shared by
# this many tokens, and the first of them still shows up after one block.
STREAM_BLOCK = 16
# Prompt tokens per call while prefilling a model that does not read prompts in one call.
PREFILL_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when temperature == 0, else sampled.

    top_k keeps the k most likely tokens; top_p keeps the smallest set of most likely tokens
    whose probability reaches p (always at least one). Both apply before sampling.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        check_number("temperature", self.temperature, "Sampling", minimum=0.0)
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1, "Sampling")
        if self.top_p is not None:
            check_number("top_p", self.top_p, "Sampling", minimum=0.0, maximum=1.0,
                         allow_minimum=False)


def filter_logits(logits, top_k: int | None = None, top_p: float | None = None):
    """Sets excluded tokens' logits to -inf. logits: [batch, vocab]."""
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep_sorted = before < top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg_inf)
    return logits


def sample(log_probs, rng, sampling: Sampling):
    """Next token ids [batch] from log-probabilities [batch, vocab]."""
    if sampling.temperature == 0.0:
        return argmax(log_probs, axis=-1)
    logits = filter_logits(log_probs.astype(jnp.float32) / sampling.temperature,
                           sampling.top_k, sampling.top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Decoder:
    """Holds a predict-mode model and its weights; prefills prompts and generates.

    Args:
      model: a layer built with mode='predict'.
      weights: its weights (the same pytree a train/eval model of the same config has).
      batch_size: sequences decoded together.
      prefill_chunk: prompt tokens fed per call while prefilling (at most two compiled
        shapes: the remainder chunk first, then full chunks). None (default): the whole prompt
        in one call when `model.prefill_in_one_call()` (LSH attention then reads it with its
        eval forward pass, O(L log L), where pieces would each scan the whole cache; a prompt
        longer than the caches in pieces of their length), else PREFILL_CHUNK. Each prefill
        call computes the output layer on its last position only when the model ends in its
        output Dense and LogSoftmax (`_last_position_apply`).
      rng: key for the model's own init (e.g. LSH hash seeds); use the training init key so
        predict-mode hashing matches eval.
      max_len: the longest prompt + generation the model's caches hold exactly (e.g. the
        model's max_len); longer requests are a ValueError. None: longer requests than the
        model's caches hold (`model.predict_context()`) decode with a warning, attention then
        sliding over the last positions.
      weight_dtype: how the kernels the model multiplies by are stored for decoding
        (`model.pack_for_decoding`): 'float32' (default: same values, a layout the per-token
        matrix-vector products read fastest), 'bf16' (each entry to 2**-8 relative) or 'int8'
        (a quarter of the bytes; each entry within half its output unit's step, see
        `layers.core.quantize_int8`), or None to use `weights` as given (already packed).
      output_dtype: the output layer's storage when it should differ from weight_dtype
        (e.g. 'int8': its vocabulary-sized matrix is most of what a sparse model reads). The
        output layer is the last Dense among the model's top-level layers.
      mesh: a `jax.sharding.Mesh` of several devices to decode on: the (packed) weights are
        sharded by `parallel.sharding`'s rules (heads and d_ff over ``model``), the caches
        replicated, and the compiled steps run across the mesh. None: one device.
    """

    def __init__(self, model: Layer, weights, batch_size: int = 1,
                 prefill_chunk: int | None = None,
                 rng=None, max_len: int | None = None, weight_dtype: str | None = "float32",
                 output_dtype: str | None = None, mesh=None):
        if prefill_chunk is not None:
            check_int("prefill_chunk", prefill_chunk, 1, "Decoder")
        elif not model.prefill_in_one_call():
            prefill_chunk = PREFILL_CHUNK
        self.max_len = max_len
        self.model = model
        self.context = model.predict_context()
        self.weights = _decoding_weights(model, weights, weight_dtype, output_dtype)
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        if self.mesh is not None:
            self.weights = put(self.weights, tree_shardings(self.weights, self.mesh))
        self.batch_size = batch_size
        self.prefill_chunk = prefill_chunk
        self._init_rng = jax.random.PRNGKey(0) if rng is None else rng
        self._apply = jax.jit(model.apply, donate_argnums=(2,))
        self._prefill_apply = jax.jit(_last_position_apply(model) or model.apply,
                                      donate_argnums=(2,))
        self._loops = {}
        self._initial_states = {}
        self._is_encoder_decoder = model.n_in == 2

    def _model_inputs(self, tokens, encoder_inputs):
        """What the model takes: tokens, or (encoder inputs, tokens) for an encoder-decoder."""
        return (encoder_inputs, tokens) if self._is_encoder_decoder else tokens

    def _check_encoder_inputs(self, encoder_inputs):
        if not self._is_encoder_decoder:
            if encoder_inputs is not None:
                raise ValueError("encoder_inputs given, but the model is decoder-only")
            return None
        if encoder_inputs is None:
            raise ValueError("an encoder-decoder model needs encoder_inputs [batch, input_len]")
        enc = jnp.asarray(encoder_inputs, jnp.int32)
        enc = enc[None] if enc.ndim == 1 else enc
        if enc.ndim != 2 or enc.shape[0] != self.batch_size:
            raise ValueError(f"encoder_inputs must be [batch_size={self.batch_size}, input_len], "
                             f"got shape {tuple(np.shape(encoder_inputs))}")
        return enc

    def initial_state(self, encoder_inputs=None):
        """Fresh caches for `batch_size` sequences (and, for an encoder-decoder, this input)."""
        token_sig = ShapeDtype((self.batch_size, 1), jnp.int32)
        sig = token_sig
        if self._is_encoder_decoder:
            sig = (ShapeDtype(encoder_inputs.shape, jnp.int32), token_sig)
        if sig not in self._initial_states:
            # Compiled, with the weights left out: XLA drops their (random) initialisation, so
            # a prefill pays for the caches only, not for drawing the whole model eagerly.
            self._initial_states[sig] = jax.jit(
                lambda rng: self.model.init_weights_and_state(sig, rng)[1])
        state = self._initial_states[sig](self._init_rng)
        if self.mesh is not None:
            state = put(state, jax.tree.map(lambda _: replicated(self.mesh), state))
        return state

    # -- prefill ------------------------------------------------------------------------
    def prefill(self, prompt_ids, state=None, encoder_inputs=None):
        """Reads a prompt; returns (log-probs of the next token [batch, vocab], state).

        prompt_ids: int [batch, length] (length >= 0). The start token is fed first.
        encoder_inputs: int [batch, input_len], for an encoder-decoder model only: encoded on
        the first call and cached in the state.
        """
        prompt = self._check_prompt(prompt_ids)
        self._check_length(prompt.shape[1])
        return self._prefill(prompt, state, self._check_encoder_inputs(encoder_inputs))

    def _prefill(self, prompt, state, enc):
        """`prefill` of a checked prompt [batch, length] and encoder inputs."""
        if state is None:
            state = self.initial_state(enc)
        inputs = jnp.concatenate(
            [jnp.full((self.batch_size, 1), START_ID, jnp.int32), prompt], axis=1)
        total = inputs.shape[1]
        # Whole (prefill_chunk None), unless the caches hold fewer positions: then pieces of
        # what they hold, the oldest dropped as they go (a layer takes at most that a call).
        chunk = self.prefill_chunk or min(total, self.context or total)
        first = total % chunk or chunk
        bounds = [0, first] + list(range(first + chunk, total + 1, chunk))
        log_probs = None
        for start, stop in zip(bounds[:-1], bounds[1:]):
            log_probs, state = self._prefill_apply(
                self._model_inputs(inputs[:, start:stop], enc), self.weights, state, None)
        return log_probs[:, -1], state

    def _check_length(self, total: int, new_tokens: int = 0) -> None:
        """Refuses `total` tokens (prompt plus `new_tokens`) beyond max_len; without max_len,
        warns once when they exceed the model's caches."""
        if self.max_len is not None and total + 1 > self.max_len:
            raise ValueError(
                f"prompt plus new tokens ({total}) plus the start token exceed the model's "
                f"max_len={self.max_len}; shorten the prompt or raise max_len")
        if self.max_len is None and self.context is not None and total + 1 > self.context:
            request = f"a prompt of {total - new_tokens} tokens"
            if new_tokens:
                request += f" plus {new_tokens} new tokens"
            warnings.warn(
                f"{request} (with the start token, {total + 1} positions) exceed the model's "
                f"cache length of {self.context}: attention then slides over the last "
                f"{self.context} positions and earlier tokens no longer count",
                stacklevel=3)

    def _check_prompt(self, prompt_ids):
        prompt = jnp.asarray(prompt_ids)
        if prompt.ndim == 1:
            prompt = prompt[None]
        if prompt.ndim != 2 or prompt.shape[0] != self.batch_size:
            raise ValueError(
                f"prompt_ids must be [batch_size={self.batch_size}, length], got shape "
                f"{tuple(np.shape(prompt_ids))}")
        if not jnp.issubdtype(prompt.dtype, jnp.integer):
            raise TypeError(f"prompt_ids must be integer token ids, got {prompt.dtype}")
        return prompt.astype(jnp.int32)

    # -- the compiled loop --------------------------------------------------------------
    def _loop(self, n_steps: int, sampling: Sampling, stop_ids: tuple[int, ...]):
        key = (n_steps, sampling, stop_ids)
        if key not in self._loops:
            self._loops[key] = jax.jit(
                functools.partial(self._run, n_steps=n_steps, sampling=sampling,
                                  stop_ids=stop_ids), donate_argnums=(1,))
        return self._loops[key]

    def _run(self, weights, state, log_probs, rng, done, enc, *, n_steps, sampling, stop_ids):
        """n_steps of (sample, feed back) in a while_loop; stops early when all are done."""
        batch = log_probs.shape[0]
        stops = jnp.asarray(stop_ids or (-1,), jnp.int32)

        def body(carry):
            i, state, log_probs, rng, done, out = carry
            key = None
            if sampling.temperature > 0:  # greedy draws nothing: no key to split per token
                rng, key = jax.random.split(rng)
            token = sample(log_probs, key, sampling)
            token = jnp.where(done, START_ID, token)
            out = out.at[:, i].set(token)
            done = done | jnp.isin(token, stops)
            next_log_probs, state = self.model.apply(self._model_inputs(token[:, None], enc),
                                                     weights, state, None)
            return i + 1, state, next_log_probs[:, -1], rng, done, out

        def cond(carry):
            i, *_, done, _ = carry
            return (i < n_steps) & ~jnp.all(done)

        out = jnp.zeros((batch, n_steps), jnp.int32)
        i, state, log_probs, rng, done, out = jax.lax.while_loop(
            cond, body, (0, state, log_probs, rng, done, out))
        return out, i, state, log_probs, rng, done

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop_ids: Sequence[int] = (), encoder_inputs=None):
        """Prefills `prompt_ids` and generates; returns int32 [batch, max_new_tokens].

        Positions after a sequence's stop token are START_ID (0). `encoder_inputs`: the
        input tokens of an encoder-decoder model (see `prefill`).
        """
        blocks = list(self.stream(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                                  stop_ids, block_size=max_new_tokens,
                                  encoder_inputs=encoder_inputs))
        out = np.concatenate(blocks, axis=1) if blocks else np.zeros((self.batch_size, 0))
        pad = max_new_tokens - out.shape[1]
        return np.pad(out, [(0, 0), (0, pad)]).astype(np.int32)

    def stream(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               stop_ids: Sequence[int] = (), block_size: int = STREAM_BLOCK,
               encoder_inputs=None) -> Iterator[np.ndarray]:
        """Yields generated tokens in blocks of up to `block_size` ([batch, n] int32)."""
        check_int("max_new_tokens", max_new_tokens, 0, "Decoder.stream")
        prompt = self._check_prompt(prompt_ids)
        self._check_length(prompt.shape[1] + max_new_tokens, max_new_tokens)
        sampling = Sampling(temperature, top_k, top_p)
        enc = self._check_encoder_inputs(encoder_inputs)
        log_probs, state = self._prefill(prompt, None, enc)
        rng = jax.random.PRNGKey(seed)
        done = jnp.zeros((self.batch_size,), bool)
        remaining = max_new_tokens
        while remaining > 0:
            n = min(block_size, remaining)
            loop = self._loop(n, sampling, tuple(int(s) for s in stop_ids))
            out, steps, state, log_probs, rng, done = loop(self.weights, state, log_probs,
                                                           rng, done, enc)
            steps = int(steps)
            yield np.asarray(out[:, :steps])
            remaining -= n
            if steps < n or bool(jnp.all(done)):
                return


def _last_position_apply(model: Layer):
    """`model.apply` with its output layers on the last position only, or None.

    For a `Serial` whose top-level layers end in the output `Dense` and a `LogSoftmax`: the
    layers before them run on every position (filling the caches), the output layers on the
    last one, so that a prefill computes [batch, 1, vocab] log-probs instead of [batch,
    length, vocab] (a gigabyte for 8K tokens of a 32K vocabulary, and as many FLOPs as the
    vocabulary's matrix times the length). Returns `(log_probs [batch, 1, vocab], state)`.
    """
    layers = model.sublayers
    dense_at = [i for i, sub in enumerate(layers) if isinstance(sub, Dense)]
    if not isinstance(model, Serial) or not dense_at:
        return None
    head = dense_at[-1]
    if head == 0 or any(sub.name != "LogSoftmax" for sub in layers[head + 1:]):
        return None
    body = Serial(*layers[:head])
    if body.n_in != model.n_in or body.n_out != 1:
        return None

    def apply(x, weights, state, rng):
        y, body_state = body.apply(x, tuple(weights[:head]), tuple(state[:head]), rng)
        y = y[:, -1:]
        tail_states = []
        for sub, w, st in zip(layers[head:], weights[head:], state[head:]):
            y, st = sub.apply(y, w, st, None)
            tail_states.append(st)
        return y, tuple(body_state) + tuple(tail_states)

    return apply


def _decoding_weights(model: Layer, weights, weight_dtype: str | None,
                      output_dtype: str | None):
    """`weights` packed by `model.pack_for_decoding(weights, weight_dtype)`; with an
    `output_dtype` of its own, the output layer's entry is packed in that dtype instead."""
    if weight_dtype is None:
        return weights
    check_choice("weight_dtype", weight_dtype, DECODE_DTYPES, "Decoder")
    packed = model.pack_for_decoding(weights, weight_dtype)
    if output_dtype is None or output_dtype == weight_dtype:
        return packed
    check_choice("output_dtype", output_dtype, DECODE_DTYPES, "Decoder")
    dense_at = [i for i, sub in enumerate(model.sublayers) if isinstance(sub, Dense)]
    if not dense_at:
        return packed
    out = dense_at[-1]
    output_layer = model.sublayers[out].pack_for_decoding(weights[out], output_dtype)
    return packed[:out] + (output_layer,) + packed[out + 1:]


def time_per_token(decoder: Decoder, prompt_ids, new_tokens: int,
                   block_size: int | None = None) -> dict:
    """Latency figures: prefill seconds and greedy per-token seconds.

    Tokens are generated `block_size` at a time, each block one call of the compiled loop
    (as `Decoder.stream` does; by default STREAM_BLOCK, fewer when new_tokens is under four
    blocks of it), timed with block_until_ready; `s_per_token` is the median over blocks
    after the first (which compiles) of block time / block_size.
    block_size=1 times every token as its own call, which adds the call's dispatch and
    set-up to each token.
    """
    if block_size is None:
        block_size = max(1, min(STREAM_BLOCK, new_tokens // 4))
    if block_size < 1 or new_tokens < block_size:
        raise ValueError(f"block_size must be in [1, new_tokens={new_tokens}], got {block_size}")
    start = time.perf_counter()
    log_probs, state = decoder.prefill(prompt_ids)
    jax.block_until_ready(log_probs)
    prefill_s = time.perf_counter() - start
    loop = decoder._loop(block_size, Sampling(), ())
    rng = jax.random.PRNGKey(0)
    done = jnp.zeros((decoder.batch_size,), bool)
    times = []
    for _ in range(new_tokens // block_size):
        start = time.perf_counter()
        out, _, state, log_probs, rng, done = loop(decoder.weights, state, log_probs, rng, done,
                                                   None)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / block_size)
    return {"prefill_s": prefill_s, "first_token_s": times[0],
            "s_per_token": float(np.median(times[1:])) if len(times) > 1 else times[0]}


def generate(model_fn, weights, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int | None = None, max_len: int | None = None,
             prefill_chunk: int | None = None) -> np.ndarray:
    """Continues `prompt_ids` ((n,) or (batch, n)) with `model_fn(mode='predict')`.

    Returns int32 new ids of shape (max_new_tokens,) or (batch, max_new_tokens); after
    `eos_id` (kept) a row holds START_ID.
    """
    prompt = np.asarray(prompt_ids)
    if prompt.ndim not in (1, 2) or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_ids must be int ids (n,) or (batch, n), got {prompt.dtype} "
                         f"{prompt.shape}")
    rows = prompt[None] if prompt.ndim == 1 else prompt
    decoder = Decoder(model_fn(mode="predict"), weights, batch_size=rows.shape[0],
                      prefill_chunk=prefill_chunk, max_len=max_len)
    stops = () if eos_id is None else (eos_id,)
    new = decoder.generate(rows, max_new_tokens, temperature, top_k, top_p, seed, stops)
    return new[0] if prompt.ndim == 1 else new
