"""Training: optax optimizers and schedules, the train/eval loop, orbax checkpoints, metrics."""

from terraformer.training.checkpoints import Checkpointer, CheckpointError, NoCheckpointError
from terraformer.training.loop import (
    TrainingDivergedError,
    TrainResult,
    dry_run,
    evaluate,
    evaluate_checkpoint,
    load_weights,
    make_eval_step,
    make_train_step,
    train,
    train_config,
)
from terraformer.training.metrics import MetricsWriter, plot_metrics, read_metrics
from terraformer.training.optimizers import (
    SGD,
    Adafactor,
    Adam,
    Momentum,
    constant,
    cosine,
    current_learning_rate,
    multifactor,
    rsqrt_decay,
    scale_by_lr,
    warmup,
)
