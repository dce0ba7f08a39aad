"""The training loop and the interface a model's objective implements."""

from ._distributed import Distributed, launched, rank
from ._graphs import GraphedStep
from ._loop import Sums, TrainConfig, evaluate, minibatches, train
from ._objective import Objective, Terms, TrainContext

__all__ = [
    "Distributed",
    "GraphedStep",
    "Objective",
    "Sums",
    "Terms",
    "TrainConfig",
    "TrainContext",
    "evaluate",
    "launched",
    "minibatches",
    "rank",
    "train",
]
