"""Click commands of the evaluate stage: `evaluate`, `features`, `import`, `export`. Each only builds its config (or
arguments) and calls the stage's functions; errors are SaecacheErrors, printed as one line by `saecache.cli.main`."""

from __future__ import annotations

import os

import click

from saecache.evaluate.config import EvalConfig, FeaturesConfig

_D = EvalConfig.__dataclass_fields__


@click.command()
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--store", required=True, help="Store the runs were trained on (or another store of the same model).")
@click.option("--out", default=_D["out"].default, show_default=True, help="Report directory.")
@click.option("--prune-above", type=float, default=None,
              help="Also re-measure everything with features firing more often than this dropped (seed: 0.038).")
@click.option("--n-contexts", type=int, default=_D["n_contexts"].default, show_default=True,
              help="Held-out contexts for the loss figures.")
@click.option("--max-rows", type=int, default=_D["max_rows"].default, show_default=True,
              help="Held-out rows for the statistics (0 = all).")
@click.option("--batch-size", type=int, default=_D["batch_size"].default, show_default=True)
@click.option("--model", default=None, help="Model directory/name (default: the one in the store header).")
@click.option("--device", default=_D["device"].default, show_default=True)
@click.option("--no-histograms", is_flag=True, help="Skip the frequency histogram PNGs (no matplotlib needed).")
@click.option("--no-splice", is_flag=True, help="Statistics only: do not load the model for the loss figures.")
@click.option("--html-features", type=int, default=_D["html_features"].default, show_default=True,
              help="Features on the static HTML page written per SAE (0 = no pages).")
@click.option("--tokenizer", default=None, help="Tokenizer for those pages (default: the store header's).")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 is often fastest for "
                                                        "small models on a busy CPU).")
def evaluate(run_dirs, store, out, prune_above, n_contexts, max_rows, batch_size, model, device, no_histograms,
             no_splice, html_features, tokenizer, threads):
    """Statistics, % loss recovered and frequency histograms for RUN_DIRS on a store's held-out data."""
    from saecache.evaluate.runner import run_evaluation

    cfg = EvalConfig(run_dirs=list(run_dirs), store=store, out=out, prune_above=prune_above, n_contexts=n_contexts,
                     max_rows=max_rows or None, batch_size=batch_size, model=model, device=device,
                     histograms=not no_histograms, splice=not no_splice, html_features=html_features,
                     tokenizer=tokenizer, threads=threads)
    run_evaluation(cfg)
    with open(os.path.join(cfg.out, "report.md")) as f:
        click.echo(f.read())
    click.echo(f"report written to {cfg.out}/ (report.md, report.json, report.csv, eval_config.json, freq-*.npy"
               + (", hist-*.png" if cfg.histograms else "") + (", features-*.html" if cfg.html_features else "") + ")")


@click.command()
@click.argument("run_dir")
@click.option("--store", required=True, help="Store to read the contexts from.")
@click.option("--feature", "features", type=int, multiple=True, required=True, help="Feature index (repeatable).")
@click.option("--top", type=int, default=20, show_default=True, help="Contexts per feature.")
@click.option("--max-rows", type=int, default=FeaturesConfig.__dataclass_fields__["max_rows"].default,
              show_default=True, help="Rows scanned from the start of the store (0 = all).")
@click.option("--window", type=int, default=16, show_default=True, help="Tokens shown before the firing token.")
@click.option("--tokenizer", default=None, help="Tokenizer directory/name (default: the store header's).")
@click.option("--html", "html_out", default=None, help="Also write a static HTML page here.")
@click.option("--device", default="auto", show_default=True)
def features(run_dir, store, features, top, max_rows, window, tokenizer, html_out, device):
    """Top-activating contexts of features of the SAE in RUN_DIR, with the firing token marked «like this»."""
    from saecache.evaluate.features import as_html, as_text, feature_contexts

    cfg = FeaturesConfig(run_dir=run_dir, store=store, features=list(features), top=top, max_rows=max_rows or None,
                         window=window, tokenizer=tokenizer, html=html_out, device=device)
    result = feature_contexts(cfg)
    click.echo(as_text(result), nl=False)
    if cfg.html:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.html)), exist_ok=True)
        with open(cfg.html, "w") as f:
            f.write(as_html(result))
        click.echo(f"HTML written to {cfg.html}")


@click.command("import")
@click.argument("src")
@click.option("--out", required=True, help="Run dir to create.")
@click.option("--hook", required=True, help="Store hook the dictionary reads, e.g. mlp_out.3.")
@click.option("--hook-out", default=None, help="Hook it reconstructs, if not --hook.")
@click.option("--store", default=None, help="Check widths against this store and record it (recommended).")
@click.option("--name", default=None, help="Run name (default: the --out directory name).")
@click.option("--format", "fmt", type=click.Choice(["dictionary_learning"]), default="dictionary_learning",
              show_default=True)
def import_cmd(src, out, hook, hook_out, store, name, fmt):
    """Import a dictionary_learning save dir SRC (ae.pt + config.json) as a saecache run dir."""
    from saecache.evaluate.convert import import_run

    import_run(src, out, hook, hook_out, store, name, fmt)
    click.echo(f"imported {src} -> {out}")


@click.command("export")
@click.argument("run_dir")
@click.option("--to", "to", type=click.Choice(["saelens", "dictionary_learning"]), required=True)
@click.option("--out", required=True, help="Directory to write (cfg.json + sae_weights.safetensors, or ae.pt + "
                                            "config.json).")
def export_cmd(run_dir, to, out):
    """Export the SAE in RUN_DIR to SAELens or dictionary_learning format."""
    from saecache.evaluate.convert import export_run

    export_run(run_dir, to, out)
    click.echo(f"exported {run_dir} -> {out} ({to})")
