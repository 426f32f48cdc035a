"""saecache: harvest LM activations into sharded zarr stores, train and evaluate sparse autoencoders from them.

Shape legend used across the package: B batch rows, D activation width, F dictionary features,
K active features per row (TopK), T context length, N stored rows.
"""

__version__ = "0.1.0"
