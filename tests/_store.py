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


@pytest.fixture(scope="session")
def tiny_store_int8(tmp_path_factory, tiny_model_dir, tiny_corpus) -> Path:
    """`tiny_store` in the quantized int8 format (SPEC.md "Formats")."""
    return harvest_tiny(tmp_path_factory.mktemp("tiny_store_int8") / "store.zarr", tiny_model_dir, tiny_corpus,
                        dtype="int8")


def tiny_store_in(request, fmt: str) -> Path:
    """The tiny store in storage format `fmt` ("float16": `tiny_store`, "int8": `tiny_store_int8`), for tests
    parametrized over formats."""
    return request.getfixturevalue({"float16": "tiny_store", "int8": "tiny_store_int8"}[fmt])


def strip_chunk_crc(data: bytes, meta: dict) -> bytes:
    """One data object of a format-version-3 array as version 2 wrote it: each inner chunk without the 4-byte crc32c
    it ends with (and, for a shard, its index rebuilt). Checks each stripped crc32c on the way."""
    import crc32c
    import numpy as np

    def strip(blob: bytes) -> bytes:
        assert crc32c.crc32c(blob[:-4]) == int.from_bytes(blob[-4:], "little")
        return blob[:-4]

    if meta["codecs"][0]["name"] != "sharding_indexed":
        return strip(data)
    conf = meta["codecs"][0]["configuration"]
    n_inner = meta["chunk_grid"]["configuration"]["chunk_shape"][0] // conf["chunk_shape"][0]
    index = np.frombuffer(data[-(16 * n_inner + 4):-4], "<u8").reshape(n_inner, 2)
    blobs, table, off = [], np.full((n_inner, 2), 2**64 - 1, dtype="<u8"), 0
    for i, (o, n) in enumerate(index.tolist()):
        if o != 2**64 - 1:
            blobs.append(strip(data[o:o + n]))
            table[i] = off, n - 4
            off += n - 4
    return b"".join(blobs) + table.tobytes() + crc32c.crc32c(table.tobytes()).to_bytes(4, "little")


def downgrade_to_v2(src, dst) -> Path:
    """A copy of local store `src` in the layout of format version 2, as saecache wrote it before per-chunk
    checksums: header format_version 2, every array's codec chain without the trailing crc32c, every inner chunk
    without its 4 checksum bytes; the manifest's object checksums, the final record's fingerprint follow."""
    import json
    import shutil

    from saecache.harvest.store import checksum, compute_fingerprint, record_bytes

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    group = json.loads((dst / "zarr.json").read_text())
    header = group["attributes"]["saecache"]
    assert header["format_version"] == 3
    header["format_version"] = 2
    (dst / "zarr.json").write_text(json.dumps(group, indent=2))
    metas = {}
    for meta_path in dst.glob("**/zarr.json"):
        meta = json.loads(meta_path.read_text())
        if meta.get("node_type") != "array" or meta_path.parts[len(dst.parts)] not in ("acts", "rows", "contexts"):
            continue
        chain = meta["codecs"][0]["configuration"]["codecs"] if meta["codecs"][0]["name"] == "sharding_indexed" \
            else meta["codecs"]
        assert chain[-1]["name"] == "crc32c"
        chain.pop()
        metas[str(meta_path.parent.relative_to(dst))] = meta
        meta_path.write_text(json.dumps(meta, indent=2))
    manifest = {}
    for node in sorted((dst / "_manifest").glob("shard-*")):
        entry = json.loads((node / "zarr.json").read_text())["attributes"]["saecache"]
        for key in entry["objects"]:
            array = next(a for a in metas if key.startswith(a + "/c/"))
            data = strip_chunk_crc((dst / key).read_bytes(), metas[array])
            (dst / key).write_bytes(data)
            entry["objects"][key] = checksum(data)
        (node / "zarr.json").write_bytes(record_bytes(entry))
        manifest[entry["shard"]] = entry
    final = json.loads((dst / "_final" / "zarr.json").read_text())["attributes"]["saecache"]
    final["fingerprint"] = compute_fingerprint(header, manifest)
    (dst / "_final" / "zarr.json").write_bytes(record_bytes(final))
    return dst


def downgrade_to_v1(src, dst) -> Path:
    """A copy of local store `src` (float format) in the layout of format version 1, as saecache 0.1.0 wrote it:
    header format_version 1, bookkeeping as plain JSON files (`_manifest/shard-XXXXXX.json`, `_final.json`), no
    bookkeeping group nodes. Arrays as version 2 wrote them (`downgrade_to_v2`: no per-chunk crc32c); the fingerprint
    is recomputed over the v1 header."""
    import json
    import shutil

    from saecache.harvest.store import json_bytes, compute_fingerprint

    src, dst = Path(src), Path(dst)
    downgrade_to_v2(src, dst)
    group = json.loads((dst / "zarr.json").read_text())
    header = group["attributes"]["saecache"]
    assert header["format_version"] == 2 and header["storage"]["dtype"] in ("float16", "float32", "bfloat16")
    header["format_version"] = 1
    (dst / "zarr.json").write_text(json.dumps(group, indent=2))
    manifest = {}
    for node in sorted((dst / "_manifest").glob("shard-*")):
        entry = json.loads((node / "zarr.json").read_text())["attributes"]["saecache"]
        for st in entry["stats"].values():  # version 1 recorded no quantization error
            st.pop("sq_err", None), st.pop("sq_exact", None)
        manifest[entry["shard"]] = entry
        shutil.rmtree(node)
        (dst / "_manifest" / f"{node.name}.json").write_bytes(json_bytes(entry))
    (dst / "_manifest" / "zarr.json").unlink()
    shutil.rmtree(dst / "_claims")
    final = json.loads((dst / "_final" / "zarr.json").read_text())["attributes"]["saecache"]
    shutil.rmtree(dst / "_final")
    for st in final["stats"].values():
        st.pop("rel_mse", None)
    final["fingerprint"] = compute_fingerprint(header, manifest)
    (dst / "_final.json").write_bytes(json_bytes(final))
    return dst
