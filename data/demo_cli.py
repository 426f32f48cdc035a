"""`saecache demo`: the click command that builds a `DemoConfig`, runs the offline pipeline and prints the seed's table."""

from __future__ import annotations

import click

from saecache.data.demo_config import MODELS, TOKENIZERS, DemoConfig
from saecache.data.smollm2 import DESCRIPTION
from saecache.options import config_options


def model_line(model: str, s: dict) -> str:
    """The demo's line about its model: which model it is, its validation loss, and how it was made."""
    if model == "smollm2":
        made = f"{DESCRIPTION}, not trained here"
    else:
        made = f"trained {s['model_train_seconds']:.0f} s on {s['model_tokens']:,} tokens"
    return (f"demo model: validation loss {s['val_loss']:.3f} nats vs unigram entropy {s['unigram_entropy']:.3f} "
            f"(a unigram model fit on the train split: {s['unigram_xent']:.3f}); {made}")


@click.command("demo")
@config_options(DemoConfig, skip=("progress", "extra"), defaults=False,
                types={"tokenizer": click.Choice(TOKENIZERS), "model": click.Choice(MODELS)})
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--recipe", type=click.Choice(("sae", "circuits")), default="sae", show_default=True,
              help="sae: the SAE sweep; circuits: a PLT set and a CLT (matched latents and L0, --widths' first and "
                   "--k) from a store of every layer's resid_mid and mlp_out, evaluated as replacement models "
                   "(saecache/data/circuits.py).")
def demo(quiet: bool, recipe: str, **kw) -> None:
    """The main job offline: a Pile-format corpus from local text, a language model (a small Pythia-architecture one
    trained here, or with --model smollm2 SmolLM2-135M-Instruct de-quantized from a Q4_1 GGUF), harvest of its MLP
    outputs, a ReLU+L1 / TopK sweep from one store, evaluation by splicing, and the seed's table. Options not given
    take the flavour's values (docs/flags.md), else the defaults shown."""
    from saecache.data.demo import run_demo
    from saecache.evaluate.report import tables

    given = {k: v for k, v in kw.items() if v is not None and k != "model"}
    if given.get("model_steps") == 0:  # the flag's older spelling of "use --model-seconds"
        given["model_steps"] = None
    cfg = DemoConfig.preset(kw["model"] or DemoConfig.model, **given, progress=not quiet)
    if recipe == "circuits":
        from saecache.data.circuits import circuits_table, run_circuits

        c = run_circuits(cfg)
        click.echo("\n" + circuits_table(c["reports"]))
        click.echo(f"reports: {cfg.out}/circuits-eval/{{plt,clt}}/replacement.md; store: {c['store']}; "
                   f"total {c['seconds']:.0f} s")
        return
    s = run_demo(cfg)
    click.echo(f"tokenizer: {s['tokenizer']}")
    click.echo(model_line(cfg.model, s))
    click.echo("\n" + tables(s["rows"]))
    click.echo(f"\nreport: {s['report']} and report.html (the frontier and histograms beside them); "
               f"store: {cfg.out}/store.zarr; runs: {cfg.out}/runs; total {s['timings_s']['total']:.0f} s")
