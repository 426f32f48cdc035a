"""`saecache harvest`, `saecache info`, `saecache verify`: click commands that only build configs and print."""

from __future__ import annotations

import json

import click

from saecache.harvest.config import HarvestConfig
from saecache.options import config_options


def parse_storage_options(pairs: tuple[str, ...]) -> dict:
    """fsspec storage options from repeated `KEY=VALUE` flags (-S here, -S/-D of `saecache copy`)."""
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
@config_options(HarvestConfig, skip=("storage_options",), flags={"out": "--out"}, aliases={"out": ("-o",)})
@storage_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
def harvest(quiet: bool, storage_option: tuple[str, ...], **kw) -> None:
    """Run a model over text and write hooked activations to a sharded, compressed zarr store.

    Killing it at any moment and rerunning the same command resumes; the result is byte-identical.
    """
    from saecache.harvest.run import run_harvest

    cfg = HarvestConfig(storage_options=parse_storage_options(storage_option), **kw)
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

    d = store_info(store, parse_storage_options(storage_option))
    click.echo(json.dumps(d, indent=1) if as_json else format_info(d))


@click.command()
@click.argument("store")
@storage_option
def verify(store: str, storage_option: tuple[str, ...]) -> None:
    """Recompute every shard checksum; report missing or corrupt shards (exit 1 on any problem)."""
    from saecache.harvest.inspect import verify_store
    from saecache.harvest.store import Store

    problems = verify_store(store, parse_storage_options(storage_option))
    for p in problems:
        click.echo(p)
    if problems:
        click.echo(f"{store}: {len(problems)} problem(s)", err=True)
        raise SystemExit(1)
    n = Store.open(store, parse_storage_options(storage_option)).geometry.n_shards
    click.echo(f"{store}: all {n} shards verified")
