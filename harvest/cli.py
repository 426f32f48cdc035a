"""`saecache harvest`, `saecache info`, `saecache verify`: click commands that only build configs and print."""

from __future__ import annotations

import json

import click

from saecache.harvest.config import HarvestConfig


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _storage_options(pairs: tuple[str, ...]) -> dict:
    opts = {}
    for p in pairs:
        k, _, v = p.partition("=")
        if k == "endpoint_url":
            opts.setdefault("client_kwargs", {})["endpoint_url"] = v
        else:
            opts[k] = {"true": True, "false": False}.get(v.lower(), v)
    return opts


storage_option = click.option("--storage-option", "-S", multiple=True, metavar="KEY=VALUE",
                              help="fsspec option for remote stores, e.g. endpoint_url=http://127.0.0.1:9000, anon=true")


@click.command()
@click.option("--out", "-o", required=True, help="Store to write: a directory or an fsspec URL (s3://…).")
@click.option("--model", default=HarvestConfig.model, show_default=True, help="HF causal LM name or local directory.")
@click.option("--revision", default=None, help="Model revision on the Hub.")
@click.option("--model-dtype", default="float32", show_default=True, help="float32, float16 or bfloat16.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the Hub (off unless asked).")
@click.option("--hooks", default="mlp_out.3", show_default=True,
              help="Comma-separated hook points: mlp_out.i, mlp_in.i, attn_out.i, resid_post.i, embed, or module.path:output|input.")
@click.option("--dataset", default=HarvestConfig.dataset, show_default=True,
              help="Text: .jsonl/.jsonl.zst/.txt files or globs (comma-separated), a local dataset dir, or a Hub dataset.")
@click.option("--dataset-name", default=None, help="Hub dataset config name.")
@click.option("--split", default="train", show_default=True)
@click.option("--text-field", default="text", show_default=True)
@click.option("--ctx-len", default=128, show_default=True, type=int)
@click.option("--bos/--no-bos", default=True, show_default=True, help="Start every context with BOS.")
@click.option("--exclude-bos", is_flag=True, help="Keep the BOS position (0) out of the store.")
@click.option("--tokens", default=1_000_000, show_default=True, type=int, help="Rows (token positions) to store.")
@click.option("--batch-size", default=32, show_default=True, type=int, help="Contexts per forward pass.")
@click.option("--dtype", default="float16", show_default=True, help="Storage format: float16, bfloat16, float32, int8 or nf4 (quantized, "
              "a scale per row; costs in the README's store-format table).")
@click.option("--codec", default="blosc-zstd", show_default=True, help="blosc-zstd, blosc-lz4, zstd or none.")
@click.option("--ctx-per-chunk", default=None, type=int, help="Contexts per inner chunk (default ≈ 4096 rows).")
@click.option("--chunks-per-shard", default=16, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the within-shard row permutation.")
@click.option("--nonfinite", default="error", show_default=True, help="NaN/Inf activations: error or count.")
@click.option("--worker", default=None, help="i/N: harvest shards s with s %% N == i (default from RANK/WORLD_SIZE or SLURM).")
@storage_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
def harvest(quiet: bool, hooks: str, storage_option: tuple[str, ...], **kw) -> None:
    """Run a model over text and write hooked activations to a sharded, compressed zarr store.

    Killing it at any moment and rerunning the same command resumes; the result is byte-identical.
    """
    from saecache.harvest.run import run_harvest

    cfg = HarvestConfig(hooks=_split(hooks), storage_options=_storage_options(storage_option), **kw)
    s = run_harvest(cfg, progress=not quiet)
    state = "complete" if s["complete"] else "incomplete (other workers' shards pending)"
    click.echo(f"harvested {s['rows']:,} rows into {s['store']} in {s['seconds']:.1f}s: "
               f"{s['bytes_on_disk']:,} bytes on disk, {s['bytes_per_value']:.3f} bytes/value; store {state}")


@click.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@storage_option
def info(store: str, as_json: bool, storage_option: tuple[str, ...]) -> None:
    """Summarise a store: provenance, hooks, rows, codec, size and fingerprint."""
    from saecache.harvest.inspect import format_info, store_info

    d = store_info(store, _storage_options(storage_option))
    click.echo(json.dumps(d, indent=1) if as_json else format_info(d))


@click.command()
@click.argument("store")
@storage_option
def verify(store: str, storage_option: tuple[str, ...]) -> None:
    """Recompute every shard checksum; report missing or corrupt shards (exit 1 on any problem)."""
    from saecache.harvest.inspect import verify_store
    from saecache.harvest.store import Store

    problems = verify_store(store, _storage_options(storage_option))
    for p in problems:
        click.echo(p)
    if problems:
        click.echo(f"{store}: {len(problems)} problem(s)", err=True)
        raise SystemExit(1)
    n = Store.open(store, _storage_options(storage_option)).geometry.n_shards
    click.echo(f"{store}: all {n} shards verified")
