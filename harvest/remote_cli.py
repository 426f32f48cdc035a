"""`saecache copy`: the click command; it only builds a `CopyConfig` (see `copy.py`) and prints the summary."""

from __future__ import annotations

import json

import click

from saecache.harvest.cli import parse_storage_options
from saecache.harvest.config import CopyConfig
from saecache.options import config_options


@click.command()
@click.argument("src")
@click.argument("dst")
@config_options(CopyConfig, only=("hooks", "threads"))
@click.option("--src-option", "-S", multiple=True, metavar="KEY=VALUE",
              help="fsspec option of SRC, e.g. endpoint_url=http://127.0.0.1:9000, anon=true, profile=team")
@click.option("--dst-option", "-D", multiple=True, metavar="KEY=VALUE", help="fsspec option of DST (as -S).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def copy(src: str, dst: str, hooks: tuple[str, ...] | None, src_option: tuple[str, ...], dst_option: tuple[str, ...],
         threads: int, as_json: bool, quiet: bool) -> None:
    """Copy a store (or some of its hooks) from SRC to DST: local directories or URLs (s3://, gs://, hf://).

    Rerunning an interrupted copy resumes it. Every object is checked against the manifest checksums, and the
    destination is read back and verified at the end. Credentials come from the environment (AWS_ACCESS_KEY_ID, …)
    or -S/-D options and are never written to the destination.
    """
    from tqdm import tqdm

    from saecache.harvest.copy import copy_store

    cfg = CopyConfig(src=src, dst=dst, hooks=hooks,
                     src_options=parse_storage_options(src_option), dst_options=parse_storage_options(dst_option),
                     threads=threads)
    with tqdm(unit="shard", desc="copy", disable=quiet) as bar:
        s = copy_store(cfg, progress=bar.update)
    if as_json:
        click.echo(json.dumps(s, indent=1))
        return
    state = "complete" if s["complete"] else f"incomplete source: {s['shards']}/{s['shards_total']} shards"
    click.echo(f"copied {s['shards_copied']} shard(s) ({s['bytes_copied']:,} bytes), skipped {s['shards_skipped']} "
               f"already there, {len(s['shards_repaired'])} repaired; {s['dst']} verified ({state}); "
               f"fingerprint {s['fingerprint']}")
