"""AnnData -> checked minibatches: the data setup a model stores, and every input check."""

from ._arguments import SetupArguments
from ._batches import MinibatchSource
from ._blocks import BlockReader, stream
from ._order import epoch_minibatches, minibatches
from ._proteins import background_prior, measured_proteins
from ._resident import ResidentSource, resident_source
from ._setup import BoundData, DataSetup, categories

__all__ = [
    "BlockReader",
    "BoundData",
    "DataSetup",
    "MinibatchSource",
    "ResidentSource",
    "SetupArguments",
    "background_prior",
    "categories",
    "epoch_minibatches",
    "measured_proteins",
    "minibatches",
    "resident_source",
    "stream",
]
