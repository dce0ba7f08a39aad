"""The training loop and the interface a model's objective implements."""

from ._loop import Sums, TrainConfig, evaluate, minibatches, train
from ._objective import Objective, Terms, TrainContext

__all__ = ["Objective", "Sums", "Terms", "TrainConfig", "TrainContext", "evaluate", "minibatches", "train"]
