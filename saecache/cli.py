"""The `saecache` console command: a click group whose subcommands live in the stage packages.

Commands are imported lazily so `saecache --help` stays fast and a stage's heavy imports load only when used.
Every `SaecacheError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from saecache import __version__
from saecache.errors import SaecacheError

# command name -> ("module:attribute" of a click.Command, one-line help shown without importing the module)
COMMANDS = {
    "harvest": ("saecache.harvest.cli:harvest", "Run a model over text and write hooked activations to a store."),
    "info": ("saecache.harvest.cli:info", "Summarise a store: provenance, hooks, rows, codec, fingerprint."),
    "verify": ("saecache.harvest.cli:verify", "Recompute shard checksums; report missing or corrupt shards."),
    "copy": ("saecache.harvest.remote_cli:copy", "Copy a store (or some hooks) between local paths and URLs."),
    "train": ("saecache.train.cli:train", "Train one or more SAEs from a store in one read of the data."),
    "evaluate": ("saecache.evaluate.cli:evaluate", "Statistics, % loss recovered and histograms for run dirs."),
    "features": ("saecache.evaluate.cli:features", "Top-activating contexts of features, read from the store."),
    "replacement": ("saecache.evaluate.cli:replacement", "Evaluate a per-layer transcoder set as a replacement model."),
    "import": ("saecache.evaluate.cli:import_cmd", "Import a dictionary_learning ae.pt as a saecache run dir."),
    "export": ("saecache.evaluate.cli:export_cmd", "Export a run dir to SAELens or dictionary_learning format."),
    "demo": ("saecache.data.demo_cli:demo", "The main job offline: corpus, tiny model, harvest, train, evaluate."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="saecache")
def cli() -> None:
    """Harvest activations once into sharded zarr stores; train and evaluate sparse autoencoders from them."""


def main(argv: list[str] | None = None) -> None:
    # our own progress bars only: the Hub's and transformers' weight-loading bars are noise on stderr
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        cli.main(args=argv, prog_name="saecache", standalone_mode=False)
    except SaecacheError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("interrupted: completed work is kept; rerun the same command to resume", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except OSError as e:
        # disk full, permission denied, unreachable endpoints: one line, no traceback
        where = getattr(e, "filename", None)
        click.echo(f"error: {e.strerror or e}" + (f" ({where})" if where else ""), err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
