"""AnnData -> checked minibatches: the data setup a model stores, and every input check."""

from ._arguments import SetupArguments
from ._batches import MinibatchSource
from ._proteins import background_prior, measured_proteins
from ._setup import BoundData, DataSetup, categories

__all__ = [
    "BoundData",
    "DataSetup",
    "MinibatchSource",
    "SetupArguments",
    "background_prior",
    "categories",
    "measured_proteins",
]
