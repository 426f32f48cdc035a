"""`saecache demo`: the click command that builds a `DemoConfig`, runs the offline pipeline and prints the seed's table."""

from __future__ import annotations

import click

from saecache.data.demo import TOKENIZERS, DemoConfig
from saecache.options import config_options


@click.command("demo")
@config_options(DemoConfig, skip=("progress", "extra"), types={"tokenizer": click.Choice(TOKENIZERS)})
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(quiet: bool, **kw) -> None:
    """The main job offline: a Pile-format corpus from local text, a small Pythia-architecture model, harvest of every
    layer's MLP output, a ReLU+L1 / TopK sweep from one store, evaluation by splicing, and the seed's table."""
    from saecache.data.demo import run_demo
    from saecache.evaluate.report import tables

    if kw["model_steps"] == 0:  # the flag's older spelling of "use --model-seconds"
        kw["model_steps"] = None
    cfg = DemoConfig(**kw, progress=not quiet)
    out = cfg.out
    s = run_demo(cfg)
    click.echo(f"tokenizer: {s['tokenizer']}")
    click.echo(f"demo model: validation loss {s['val_loss']:.3f} nats vs unigram entropy {s['unigram_entropy']:.3f} "
               f"(a unigram model fit on the train split: {s['unigram_xent']:.3f}); trained "
               f"{s['model_train_seconds']:.0f} s on {s['model_tokens']:,} tokens")
    click.echo("\n" + tables(s["rows"]))
    click.echo(f"\nreport: {s['report']} (histograms beside it); store: {out}/store.zarr; runs: {out}/runs; "
               f"total {s['timings_s']['total']:.0f} s")
