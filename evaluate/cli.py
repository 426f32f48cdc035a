"""Click commands of the evaluate stage: `evaluate`, `features`, `import`, `export`. Each only builds its config (or
arguments) and calls the stage's functions; errors are SaecacheErrors, printed as one line by `saecache.cli.main`."""

from __future__ import annotations

import os

import click

from saecache.evaluate.config import EvalConfig, FeaturesConfig, ReplacementConfig
from saecache.options import config_options

@click.command()
@click.argument("run_dirs", nargs=-1, required=True)
@config_options(EvalConfig, skip=("run_dirs", "extra"))
def evaluate(run_dirs, **kw):
    """Statistics, % loss recovered, the sparsity–fidelity frontier with pruning curves, and frequency histograms for
    RUN_DIRS on a store's held-out data; report.html shows them all."""
    from saecache.evaluate.runner import run_evaluation

    cfg = EvalConfig(run_dirs=list(run_dirs), **kw)
    run_evaluation(cfg)
    with open(os.path.join(cfg.out, "report.md")) as f:
        click.echo(f.read())
    click.echo(f"report written to {cfg.out}/ (report.html, report.md, report.json, report.csv, frontier.json, "
               "eval_config.json, freq-*.npy" + (", frontier-*.png" if cfg.frontier else "")
               + (", hist-*.png" if cfg.histograms else "") + (", features-*.html" if cfg.html_features else "") + ")")


@click.command()
@click.argument("run_dir")
@config_options(FeaturesConfig, skip=("run_dir",), flags={"features": "--feature"})
def features(run_dir, **kw):
    """Top-activating contexts of features of the SAE in RUN_DIR, with the firing token marked «like this»."""
    from saecache.evaluate.features import as_html, as_text
    from saecache.evaluate.features_run import feature_contexts

    cfg = FeaturesConfig(run_dir=run_dir, **{**kw, "features": list(kw["features"])})
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


@click.command("replacement")
@click.argument("run_dirs", nargs=-1, required=True)
@config_options(ReplacementConfig, skip=("run_dirs",))
def replacement(run_dirs, **kw):
    """Evaluate transcoder RUN_DIRS (one per layer) as a replacement model: every MLP output replaced at once."""
    from saecache.evaluate.replacement_run import markdown, run_replacement

    cfg = ReplacementConfig(run_dirs=list(run_dirs), **kw)
    click.echo(markdown(run_replacement(cfg)), nl=False)
    click.echo(f"report written to {cfg.out}/ (replacement.md, replacement.json)")


@click.command("export")
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--to", "to", type=click.Choice(["saelens", "dictionary_learning", "circuit-tracer"]), required=True)
@click.option("--out", required=True, help="Directory to write (cfg.json + sae_weights.safetensors, ae.pt + "
                                            "config.json, or circuit-tracer's config.yaml + layer_{i}.safetensors).")
def export_cmd(run_dirs, to, out):
    """Export the SAE in RUN_DIR to SAELens or dictionary_learning format; to circuit-tracer, a per-layer transcoder
    set (one run dir per layer, 0..n-1) or a cross-layer transcoder's run dir."""
    if to == "circuit-tracer":
        from saecache.evaluate.circuit_tracer import export

        export(list(run_dirs), out)
        click.echo(f"exported {' '.join(run_dirs)} -> {out} (circuit-tracer)")
        return
    from saecache.evaluate.convert import export_run

    if len(run_dirs) != 1:
        raise click.UsageError(f"--to {to} exports one run dir, got {len(run_dirs)}")
    export_run(run_dirs[0], to, out)
    click.echo(f"exported {run_dirs[0]} -> {out} ({to})")
