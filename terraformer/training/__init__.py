"""Training: optax optimizers and schedules, the train/eval steps, the training run, orbax
checkpoints, metrics."""

from terraformer.training.checkpoints import Checkpointer, CheckpointError, NoCheckpointError
from terraformer.training.dry_run import dry_run
from terraformer.training.interrupts import TrainingInterruptedError
from terraformer.training.loop import (
    TrainingDivergedError,
    TrainingRun,
    TrainResult,
    evaluate_checkpoint,
    train,
    train_config,
)
from terraformer.training.memory_efficient import MemoryEfficientOptState, MemoryEfficientTrainer
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
from terraformer.training.run_dir import load_weights
from terraformer.training.step import TrainStep, evaluate, make_eval_step, make_train_step
