"""Store fixtures: a real store harvested from the tiny GPT-NeoX fixture model over the tiny corpus.

`tiny_store` has hooks mlp_in.0, mlp_out.0 and mlp_out.1, ctx_len 32, 16 shards of 16 contexts (512 rows) with inner
chunks of 4 contexts (128 rows): small enough to build in seconds, with enough shards and chunks to test loaders.
`harvest_tiny(out, model_dir, corpus, **overrides)` makes more stores like it.
"""

from pathlib import Path

import pytest

TINY_STORE_HOOKS = ("mlp_in.0", "mlp_out.0", "mlp_out.1")


def tiny_harvest_config(out, model_dir, corpus, **overrides):
    from saecache.harvest.config import HarvestConfig

    kw = dict(out=str(out), model=str(model_dir), dataset=str(corpus), hooks=TINY_STORE_HOOKS, ctx_len=32,
              tokens=8192, batch_size=8, ctx_per_chunk=4, chunks_per_shard=4, device="cpu", seed=0)
    kw.update(overrides)
    return HarvestConfig(**kw)


def harvest_tiny(out, model_dir, corpus, **overrides) -> Path:
    from saecache.harvest.run import run_harvest

    run_harvest(tiny_harvest_config(out, model_dir, corpus, **overrides), progress=False)
    return Path(out)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_model_dir, tiny_corpus) -> Path:
    return harvest_tiny(tmp_path_factory.mktemp("tiny_store") / "store.zarr", tiny_model_dir, tiny_corpus)
