"""AnnData -> checked minibatches: the data setup a model stores, and every input check."""

from ._arguments import SetupArguments
from ._batches import MinibatchSource
from ._blocks import BlockReader, stream
from ._mudata import anndata_from_mudata, is_mudata, mudata_modalities
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
    "anndata_from_mudata",
    "background_prior",
    "categories",
    "epoch_minibatches",
    "gene_sets",
    "is_mudata",
    "measured_proteins",
    "minibatches",
    "mudata_modalities",
    "program_rows",
    "read_gmt",
    "resident_source",
    "stream",
]
