"""AnnData -> checked minibatches: the data setup a model stores, and every input check."""

from ._arguments import SetupArguments
from ._batches import MinibatchSource
from ._blocks import BlockReader, stream
from ._order import epoch_minibatches, minibatches
from ._programs import Programs, gene_sets, program_rows, read_gmt
from ._proteins import background_prior, measured_proteins
from ._resident import ResidentSource, resident_source
from ._setup import BoundData, DataSetup, categories

__all__ = [
    "BlockReader",
    "BoundData",
    "DataSetup",
    "MinibatchSource",
    "Programs",
    "ResidentSource",
    "SetupArguments",
    "background_prior",
    "categories",
    "epoch_minibatches",
    "gene_sets",
    "measured_proteins",
    "minibatches",
    "program_rows",
    "read_gmt",
    "resident_source",
    "stream",
]
