"""`saecache train`: builds a `TrainConfig` from flags or a JSON file and runs it (resuming when the run dir exists).

The flags are generated from `TrainConfig` and `SAESpec` (`saecache.options`): one flag per field, with the field's
docstring and default. Repeated `--hook`, `--width`, `--k` and `--coeff` flags make a sweep over their product,
trained from one read of the data; the other SAE flags (`--arch`, `--penalty`, `--resample/--no-resample`, ...)
apply to every SAE of it. Without `--hook`, a store with a single hook trains on that hook. `--config sweep.json`
holds TrainConfig fields (with `saes` as a list of SAESpec dicts); flags given on the command line override the
file's top-level fields. Every flag's whole documentation: docs/flags.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import click

from saecache.errors import ConfigError
from saecache.options import config_options
from saecache.train.config import AUTOCAST, LOG_BACKENDS, OLD_FLAGS, SAESpec, TrainConfig, flag, upgrade_fields

SWEEP = ("hook_in", "width", "k", "coeff")  # repeatable SAE flags: the sweep is their product
SAE_FLAGS = (*SWEEP, "hook_out", "hooks_in", "hooks_out", "arch", "penalty", "resample", "options")
LIST_FLAGS = ("hooks_in", "hooks_out")  # repeated for one SAE's list (a cross-layer dictionary's hooks)
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "saes")


class _Json(click.ParamType):
    name = "JSON"

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--sae-options is not valid JSON ({e}); e.g. '{{\"auxk_alpha\": 0.03}}'") from None


def default_hooks(stores: list[str]) -> tuple[str, ...]:
    """The hook to train when none is given: the first store's only hook; with several, an error listing them."""
    from saecache.harvest.store import Store

    hooks = sorted(Store.open(stores[0]).hooks)
    if len(hooks) != 1:
        raise ConfigError(f"no SAE to train: store {stores[0]} has hooks {', '.join(hooks)}; pass --hook (repeat "
                          "it for several) or a --config with `saes`")
    return tuple(hooks)


def build_config(opts: dict) -> TrainConfig:
    base: dict = {}
    if opts.get("config"):
        try:
            with open(opts["config"]) as f:
                base = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read --config {opts['config']}: {e}")
        if not isinstance(base, dict):
            raise ConfigError(f"--config {opts['config']} must hold a JSON object of training settings (the flags' "
                              "names with underscores, e.g. batch_size; `saes`: a list of SAE objects)")
        base = upgrade_fields(base)  # older field names, under today's
    for name in RUN_FIELDS:  # flags given on the command line override the file
        v = opts.get(name)
        if v is not None and v != ():
            base[name] = list(v) if isinstance(v, tuple) else v
    for need in ("stores", "out"):
        if not base.get(need):
            raise ConfigError(f"missing {flag(need)}")
    sae = {k: list(opts[k]) if k in LIST_FLAGS else opts[k] for k in SAE_FLAGS if opts.get(k) not in (None, ())}
    if base.get("saes") and sae:
        given = ["--resample/--no-resample" if k == "resample" else flag(k) for k in sae]
        raise ConfigError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to SAEs given with --hook; "
                          "with a --config that has `saes`, set it in each entry of `saes`")
    if base.get("tokens") is None and base.get("steps") is None:
        raise ConfigError("give the training length: --tokens N or --steps N")
    if not base.get("saes"):
        if "hook_in" not in sae and "hooks_in" not in sae:
            sae["hook_in"] = default_hooks(base["stores"])
        sweep = {k: sae.pop(k) for k in SWEEP if k in sae}
        base["saes"] = [{**sae, **dict(zip(sweep, values))} for values in itertools.product(*sweep.values())]
    return TrainConfig.from_dict(base)


@click.command("train")
@config_options(TrainConfig, skip=("saes",), defaults=False, flags={"stores": "--store"}, old_flags=OLD_FLAGS,
                types={"autocast": click.Choice(AUTOCAST), "log": click.Choice(LOG_BACKENDS)})
@click.option("--config", "config", type=click.Path(dir_okay=False),
              help="JSON file of training settings, the flags' names with underscores (`saes`: a list of SAEs); "
                   "flags given here override it.")
@config_options(SAESpec, only=SAE_FLAGS, defaults=False, multiple=SWEEP, flags={"options": "--sae-options"},
                aliases={"hook_in": ("--hook",)}, types={"options": _Json()})
def train(**opts) -> None:
    """Train one or more SAEs from a store in one read of the data; rerun the same command to resume.

    A --config file may give any flag, the required ones included. Each flag's whole documentation: docs/flags.md.
    """
    cfg = build_config(opts)
    from saecache.train import ddp
    from saecache.train.trainer import run_training

    try:
        dirs = run_training(cfg)
    finally:
        ddp.cleanup()
    if int(os.environ.get("RANK", "0")) == 0:
        for d in dirs:
            click.echo(d)
