"""saecache: harvest LM activations into sharded zarr stores, train and evaluate sparse autoencoders from them.

Shape legend used across the package: B batch rows, D activation width, F dictionary features,
K active features per row (TopK), T context length, N stored rows.

The Python API (docs/api.md) is imported on first use, so ``import saecache`` stays light:
``open_store``, ``load_sae``, ``splice`` (and the ``ActivationStore`` class) come from `saecache.api`.
"""

__version__ = "0.1.0"

from saecache import threads as _threads  # noqa: E402

_threads.prepare()  # before any stage imports torch: its OpenMP threads then wait passively (saecache/threads.py)

_API = ("open_store", "load_sae", "splice", "ActivationStore")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from saecache import api

        return getattr(api, name)
    raise AttributeError(f"module 'saecache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
