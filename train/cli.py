"""`saecache train`: builds a `TrainConfig` from flags or a JSON file and runs it (resuming when the run dir exists).

Repeated `--hook`, `--width`, `--k` and `--coeff` flags make a sweep over their product, trained from one read of
the data; the other SAE flags (`--arch`, `--penalty`, `--resample/--no-resample`, ...) apply to every SAE of it.
`--config sweep.json` holds TrainConfig fields (with `saes` as a list of SAESpec dicts); flags given on the command
line override the file's top-level fields.
"""

from __future__ import annotations

import itertools
import json
import os

import click

from saecache.errors import ConfigError

_OVERRIDES = {  # flag name -> TrainConfig field
    "store": "stores", "out": "out", "seed": "seed", "seeds": "seeds", "batch_size": "batch_size", "tokens": "total_tokens",
    "steps": "steps", "lr": "lr", "warmup": "warmup_steps", "decay_start": "decay_start",
    "sparsity_warmup": "sparsity_warmup_steps", "resample_steps": "resample_steps",
    "resample_window": "resample_window", "checkpoint_every": "checkpoint_every", "heldout": "heldout_fraction",
    "partitions": "partitions", "reader_threads": "reader_threads", "autocast": "autocast", "device": "device",
    "log": "log", "log_every": "log_every", "allow_incomplete": "allow_incomplete",
}


def build_config(opts: dict):
    from saecache.train.config import TrainConfig

    base: dict = {}
    if opts.get("config"):
        try:
            with open(opts["config"]) as f:
                base = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read --config {opts['config']}: {e}")
        if not isinstance(base, dict):
            raise ConfigError(f"--config {opts['config']} must hold a JSON object of TrainConfig fields")
    for flag, fld in _OVERRIDES.items():
        v = opts.get(flag)
        if v is not None and v != () and not (flag == "allow_incomplete" and not v):
            base[fld] = list(v) if isinstance(v, tuple) else v
    if opts.get("no_progress"):
        base["progress"] = False
    if opts.get("hook"):
        if base.get("saes"):
            raise ConfigError("give the SAEs either with --hook/--arch/--width flags or in the config's `saes`")
        try:
            options = json.loads(opts["sae_options"]) if opts.get("sae_options") else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"--sae-options is not valid JSON ({e}); e.g. '{{\"auxk_alpha\": 0.03}}'") from None
        base["saes"] = [dict(arch=opts["arch"], hook_in=h, hook_out=opts.get("hook_out"), width=w, k=k,
                             penalty=opts.get("penalty"), coeff=c, resample=opts.get("resample"), options=options)
                        for h, w, k, c in itertools.product(opts["hook"], opts["width"] or (4096,),
                                                            opts["k"] or (None,), opts["coeff"] or (None,))]
    elif opts.get("resample") is not None:
        raise ConfigError("--resample/--no-resample applies to SAEs given with --hook; in a --config, set `resample` "
                          "in each entry of `saes`")
    for need, flag in (("stores", "--store"), ("out", "--out")):
        if not base.get(need):
            raise ConfigError(f"missing {flag}")
    if not base.get("saes"):
        raise ConfigError("no SAE to train: pass --hook (with --arch/--width/--k) or a --config with `saes`")
    if base.get("total_tokens") is None and base.get("steps") is None:
        raise ConfigError("give the training length: --tokens N or --steps N")
    return TrainConfig.from_dict(base)


@click.command("train")
@click.option("--store", multiple=True, help="Store path or URL (repeat to mix several stores).")
@click.option("--out", help="Run root; each SAE gets RUN_ROOT/<name>/. Rerunning the same command resumes.")
@click.option("--config", "config", type=click.Path(dir_okay=False), help="JSON file of TrainConfig fields.")
@click.option("--hook", multiple=True, help="Input hook, e.g. mlp_out.0 (repeat for a sweep over layers).")
@click.option("--hook-out", help="Target hook for a transcoder (default: same as --hook).")
@click.option("--arch", default="topk", show_default=True, help="SAE architecture (relu, topk, batchtopk, ...).")
@click.option("--width", type=int, multiple=True, help="Dictionary size F (repeat for a sweep).")
@click.option("--k", type=int, multiple=True, help="Active features per row for topk/batchtopk (repeatable).")
@click.option("--penalty", help="Penalty: l1 or entropy (relu, gated), l0 (jumprelu). Default per architecture.")
@click.option("--coeff", type=float, multiple=True, help="Sparsity coefficient λ (repeat for a sweep).")
@click.option("--sae-options", help='Extra SAEConfig fields as JSON, e.g. \'{"sparsity": "entropy"}\'.')
@click.option("--tokens", type=int, help="Training length in rows (tokens).")
@click.option("--steps", type=int, help="Training length in optimizer steps.")
@click.option("--batch-size", type=int, help="Global batch size (default 4096).")
@click.option("--lr", type=float, help="Learning rate (default 3e-4).")
@click.option("--warmup", type=int, help="LR warmup steps (default 1000).")
@click.option("--decay-start", type=int, help="Step where linear LR decay to 0 begins.")
@click.option("--sparsity-warmup", type=int, help="Sparsity-penalty warmup steps.")
@click.option("--resample-steps", type=int, help="Resample dead features every N steps.")
@click.option("--resample/--no-resample", default=None,
              help="Resample these SAEs at --resample-steps (default: relu/gated/jumprelu yes, topk/batchtopk no).")
@click.option("--resample-window", type=int, help="Steps without firing that make a feature dead.")
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints (default 1000).")
@click.option("--heldout", type=float, help="Held-out fraction of contexts (default 0.01).")
@click.option("--partitions", type=int, help="Canonical data partitions (default 8; multiple of DDP ranks).")
@click.option("--reader-threads", type=int, help="Chunk-decoding threads (does not change results).")
@click.option("--autocast", type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--device", help="auto, cpu, cuda, cuda:N.")
@click.option("--seed", type=int)
@click.option("--seeds", type=int, help="Replicas of every SAE from the same data read, differing only in init seed.")
@click.option("--log", type=click.Choice(["none", "tensorboard", "wandb"]))
@click.option("--log-every", type=int)
@click.option("--allow-incomplete", is_flag=True, help="Train on the complete shards of an unfinished store.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train(**opts) -> None:
    """Train one or more SAEs from a store in one read of the data; rerun the same command to resume."""
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
