"""Shared test fixtures: fresh random inputs every run, with the seed printed on failure.

`--jax-strict` (or the environment variable TERRAFORMER_JAX_STRICT=1) runs the session with
strict dtype promotion and rank promotion raising, as equinox's tests do: an implicit
`float32 * int32` or a `[n] + [n, 1]` broadcast that nobody meant is then an error instead of
a silent widening or an outer sum.
"""

import os

from terraformer.runtime import tune_cpu_runtime

# The tests run what the programs run: XLA:CPU with the library's runtime settings, applied
# before JAX creates its backend (importing terraformer no longer applies them).
tune_cpu_runtime()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

STRICT_ENV = "TERRAFORMER_JAX_STRICT"


def pytest_addoption(parser):
    parser.addoption(
        "--jax-strict", action="store_true", default=False,
        help="run with jax_numpy_dtype_promotion='strict' and jax_numpy_rank_promotion='raise' "
             f"(also set by {STRICT_ENV}=1)",
    )


def jax_strict_requested(config) -> bool:
    return config.getoption("--jax-strict") or os.environ.get(STRICT_ENV, "") not in ("", "0")


def pytest_configure(config):
    if jax_strict_requested(config):
        jax.config.update("jax_numpy_dtype_promotion", "strict")
        jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_report_header(config):
    if jax_strict_requested(config):
        return "jax: strict dtype promotion, rank promotion raises"
    return None


@pytest.fixture
def seed(request):
    """A fresh seed per test; shown in the report so a failure can be replayed."""
    value = int(os.environ.get("TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value


@pytest.fixture
def np_rng(seed):
    return np.random.default_rng(seed)


# Tests that repeat, end to end, what a faster test checks already (another model of the same
# family, a parameter of the same check, a subprocess around an in-process check): they run in
# the slow job, so that the default run stays under 8 minutes on the 2-core CI machine.
SLOW_DUPLICATES = {
    # Session 8: the default run measured 525 s on a loaded box; these repeat what faster
    # default tests check (the slow job still runs them).
    "tests/layers/test_lsh.py::test_per_example_hashing_one_head_at_a_time",
    "tests/layers/test_lsh.py::test_predict_with_buckets_matches_bucket_reference",
    "tests/layers/test_lsh.py::test_train_hashes_each_example_with_its_own_rotations",
    "tests/test_decoding.py::test_lsh_prompt_read_in_one_call_equals_the_eval_forward",
    "tests/test_decoding.py::test_quantized_decoding_weights_within_tolerance"
    "[terraformer-output_dtype-bf16-0.05]",
    "tests/training/test_loop.py::test_resume_equals_uninterrupted",
    "tests/test_cli.py::test_rejected_resume_is_one_line",
    "tests/layers/test_reversible.py::test_memory_flat_in_depth",
    # The one-head-at-a-time LSH path is also checked against the all-heads path under
    # per-example hashing (test_per_example_hashing_one_head_at_a_time) in the default run.
    "tests/layers/test_lsh.py::test_layer_one_head_at_a_time_equals_all_heads",
    # Attention dropout: the other six mechanisms share this code path (block_sparse) and are
    # in the slow job already; LSH and blockwise attention dropout stay in the default run.
    "tests/layers/efficient/test_attention_dropout.py::test_attention_dropout"
    "[sparse_transformer]",
    "tests/parallel/test_sharded_training.py::test_data_and_model_parallel_steps_match_one_device",
    "tests/test_decoding.py::test_step_by_step_log_probs_equal_eval[transformer]",
    "tests/test_decoding.py::test_quantized_decoding_weights_within_tolerance"
    "[terraformer-output_dtype-int8-0.1]",
    "tests/models/test_encoder_decoder.py::test_predict_one_token_at_a_time_reproduces_eval"
    "[terraformer-1]",
    "tests/models/test_reformer.py::test_predict_one_token_at_a_time_reproduces_eval"
    "[reformer-mixed]",
    "tests/test_cli.py::test_bad_sentencepiece_model_is_one_line_without_tensorflow_logging",
    "tests/training/test_loop.py::test_greedy_decode_follows_the_model",
    "tests/training/test_memory_efficient.py::test_train_option_matches_plain_loop",
    "tests/layers/test_attention.py::test_predict_one_token_at_a_time_equals_eval[None-32]",
    "tests/models/test_stack.py::test_chunked_equals_unchunked[29-8]",
    "tests/test_decoding.py::test_chunked_prefill_equals_token_by_token",
    "tests/test_decoding.py::test_prompt_longer_than_the_cache_warns_once",
    "tests/training/test_run_cli.py::test_interrupt_saves_the_step_in_flight[SIGTERM]",
    "tests/layers/test_positional.py::test_fixed_base_writes_positions_in_digits",
    "tests/test_decoding.py::test_same_seed_same_samples_and_streaming_matches",
    "tests/test_cli.py::test_failed_start_is_one_line[TransformerLM.vocab_size=100-needles2]",
    "tests/models/test_encoder_decoder.py::test_predict_one_token_at_a_time_reproduces_eval"
    "[reformer-1]",
    "tests/layers/test_attention.py::test_predict_one_token_at_a_time_equals_eval[4-12]",
    # Session 9: the default run measured 555 s after the merges. Kept in the default run:
    # the saved LSH order through ReversibleSerial, the in-place feed-forward walk, ring and
    # blockwise over the sequence axis (the slow job has local attention both ways and the
    # in-place LSH walk).
    "tests/layers/test_lsh_reversible.py::"
    "test_gradients_equal_plain_backprop_and_backward_does_not_sort[repeat]",
    "tests/layers/test_lean_reverse.py::test_lsh_residual_by_head_in_place[False]",
    "tests/parallel/test_sharded_training.py::"
    "test_local_attention_over_the_sequence_axis_equals_one_device",
    # Other parameters of the same checks stay in the default run; the masked saved-order
    # check is the serial gradient test's path with a mask.
    "tests/layers/test_lsh_reversible.py::test_saved_order_is_the_hash_order_and_masks_apply",
    "tests/models/test_reformer.py::test_predict_one_token_at_a_time_reproduces_eval"
    "[reformer-local]",
    "tests/test_decoding.py::test_quantized_decoding_weights_within_tolerance"
    "[transformer-weight_dtype-int8-0.1]",
    "tests/models/test_encoder_decoder.py::test_decoder_sees_only_the_past[terraformer]",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW_DUPLICATES:
            item.add_marker(pytest.mark.slow)
