"""The training loop and the interface a model's objective implements."""

from ._graphs import GraphedStep
from ._loop import Sums, TrainConfig, evaluate, minibatches, train
from ._objective import Objective, Terms, TrainContext

__all__ = [
    "GraphedStep",
    "Objective",
    "Sums",
    "Terms",
    "TrainConfig",
    "TrainContext",
    "evaluate",
    "minibatches",
    "train",
]
