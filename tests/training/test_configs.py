"""The gin registry: every name gin files use is registered, and registering is idempotent."""

import gin
import pytest

from terraformer import configs


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_every_name_is_registered():
    gin.parse_config("""
        train.model = @TransformerLM
        train.inputs = @copy_task
        train.eval_inputs = @eval/text_lm_inputs
        train.optimizer = @Adafactor
        train.lr_schedule = @multifactor()
        SGD.learning_rate = 0.1
        Momentum.mass = 0.8
        lr.constant.value = 0.1
        warmup.warmup_steps = 3
        rsqrt_decay.warmup_steps = 3
        cosine.total_steps = 30
        tokenizer.name_or_path = 'byte'
        pack_documents.pad_id = 0
        whole_document.pad_id = 0
        terraformer.models.TransformerLM.d_model = 8
    """)


def test_register_is_idempotent():
    from terraformer.models.transformer import TransformerLM

    first = configs.register(TransformerLM)
    configs.register_models()
    assert configs.register(TransformerLM) is first
