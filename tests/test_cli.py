"""The command line as a new user meets it: every option generated from its config dataclass (one name, one default,
the field's docstring as help), examples in the help that work, and a default install that runs the default
commands."""

import dataclasses
import json
import re
from pathlib import Path

import click
import pytest

from saecache.cli import COMMANDS, cli, main
from saecache.data.demo import DemoConfig
from saecache.errors import ConfigError
from saecache.evaluate.config import EvalConfig, FeaturesConfig
from saecache.harvest.config import HarvestConfig
from saecache.harvest.copy import CopyConfig
from saecache.options import field_default, field_docs, help_line
from saecache.train.cli import build_config
from saecache.train.config import SAESpec, TrainConfig

ROOT = Path(__file__).resolve().parents[1]

# (command, config class, fields that are not options: arguments or structured values with their own flags)
GENERATED = [
    ("harvest", HarvestConfig, {"storage_options"}),
    ("train", TrainConfig, {"saes"}),
    ("train", SAESpec, {"lr", "warmup_steps", "decay_start", "name"}),
    ("evaluate", EvalConfig, {"run_dirs", "extra"}),
    ("features", FeaturesConfig, {"run_dir"}),
    ("copy", CopyConfig, {"src", "dst", "src_options", "dst_options"}),
    ("demo", DemoConfig, {"progress", "extra"}),
]


def _command(name: str) -> click.Command:
    return cli.get_command(click.Context(cli), name)


@pytest.mark.parametrize("name,cls,not_options", GENERATED, ids=lambda v: getattr(v, "__name__", None))
def test_every_config_field_is_one_option_with_its_docstring_and_default(name, cls, not_options):
    cmd = _command(name)
    params = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in not_options:
            continue
        assert f.name in params, f"{name}: no option for {cls.__name__}.{f.name}"
        opt = params[f.name]
        doc = " ".join(docs[f.name].split())
        assert doc and opt.doc == doc and opt.help.startswith(help_line(doc)), (f.name, opt.help)  # 1st sentence
        default = field_default(cls, f.name)
        if name in ("train", "demo"):  # options default to None (a flag given overrides --config, or the demo
            assert opt.default in (None, ()), f.name  # flavour's value); help shows the default
            if default not in (None, "", (), dataclasses.MISSING):
                shown = (json.dumps(default) if isinstance(default, dict) else ",".join(map(str, default))
                         if isinstance(default, tuple) else str(default).lower())
                assert f"[default: {shown}]" in opt.help, (f.name, opt.help)
        elif default is not dataclasses.MISSING:
            assert opt.default == (tuple(default) if isinstance(default, list) else default), f.name
            assert opt.show_default, f.name
    # no hand-written defaults in help texts (they drift from the dataclass): "(default 4096)", "default: 8;"
    for p in cmd.params:
        assert not re.search(r"\(default:? \d", p.help or ""), (p.name, p.help)


def test_help_shows_the_dataclass_default_for_renamed_flags(capsys):
    main(["train", "--help"])
    out = capsys.readouterr().out
    # a flag is its field's name (TrainConfig.tokens: --tokens); the older spellings parse (below) but are not shown
    assert re.search(r"^\s+--tokens INTEGER", out, re.M) and re.search(r"^\s+--warmup-steps INTEGER", out, re.M)
    assert re.search(r"^\s+--heldout-fraction FLOAT", out, re.M)
    assert not re.search(r"--total-tokens|--warmup\b(?!-)|--heldout\b(?!-)|--sparsity-warmup\b(?!-)", out)
    assert re.search(r"Global batch.*?\[default:\s+4096\]", out, re.S)


def test_the_sae_options_example_in_the_help_is_accepted(tiny_store, tmp_path):
    """The JSON examples the --sae-options help shows are accepted by the config they describe."""
    opt = next(p for p in _command("train").params if "--sae-options" in p.opts)
    examples = re.findall(r"\{[^{}]*\}", opt.help)
    assert examples
    for example in examples:
        ctx = _command("train").make_context("train", ["--store", str(tiny_store), "--out", str(tmp_path), "--steps",
                                                       "1", "--hook", "mlp_out.0", "--width", "64",
                                                       "--sae-options", example])
        cfg = build_config(ctx.params)
        # given options pass through unchanged; the run resolves the rest (e.g. AuxK's dead threshold for topk)
        assert cfg.saes[0].options.items() >= json.loads(example).items()


def test_the_warmup_flag_overrides_a_config_files_and_reaches_every_sae_without_its_own(tmp_path):
    """The LR warm-up is each SAE's: the run's value (flag over --config file) is the default of every spec that
    gives none, and a spec's own wins."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"stores": ["s"], "out": "o", "steps": 3000, "warmup_steps": 100, "saes": [
        {"arch": "relu", "hook_in": "h", "width": 64}, {"arch": "topk", "hook_in": "h", "width": 64, "k": 4},
        {"arch": "relu", "hook_in": "h", "width": 128, "warmup_steps": 9}]}))
    ctx = _command("train").make_context("train", ["--config", str(config), "--warmup-steps", "5"])
    assert [s.warmup_steps for s in build_config(ctx.params).saes] == [5, 5, 9]
    ctx = _command("train").make_context("train", ["--config", str(config)])
    assert [s.warmup_steps for s in build_config(ctx.params).saes] == [100, 100, 9]
    config.write_text(json.dumps({**json.loads(config.read_text()), "warmup_steps": None}))
    ctx = _command("train").make_context("train", ["--config", str(config)])
    assert [s.warmup_steps for s in build_config(ctx.params).saes] == [300, 100, 9]  # relu ≤ 1000, topk ≤ 100


def test_old_flag_spellings_still_parse(tiny_store, tmp_path):
    ctx = _command("train").make_context("train", [
        "--store", str(tiny_store), "--out", str(tmp_path), "--total-tokens", "640", "--warmup", "3",
        "--heldout", "0.1", "--sparsity-warmup", "2", "--hook", "mlp_out.0", "--hook", "mlp_out.1", "--width", "64", "--k", "4",
        "--no-progress"])
    cfg = build_config(ctx.params)
    assert (cfg.tokens, cfg.warmup_steps, cfg.heldout_fraction, cfg.sparsity_warmup_steps) == (640, 3, 0.1, 2)
    assert [s.hook_in for s in cfg.saes] == ["mlp_out.0", "mlp_out.1"] and cfg.progress is False
    ev = _command("evaluate").make_context("evaluate", ["run", "--store", "s", "--no-histograms", "--max-rows", "0"])
    assert ev.params["histograms"] is False and ev.params["max_rows"] == 0  # parsed; EvalConfig refuses it (none = all)
    hv = _command("harvest").make_context("harvest", ["-o", "x", "--hooks", "mlp_out.0, mlp_out.1"])
    assert hv.params["hooks"] == ("mlp_out.0", "mlp_out.1")
    demo = _command("demo").make_context("demo", ["--widths", "256,512", "--model-steps", "0", "--quiet"])
    assert demo.params["widths"] == (256, 512) and demo.params["model_steps"] == 0


def test_every_command_has_help():
    for name in COMMANDS:
        assert _command(name).get_help(click.Context(_command(name))), name


def _core_dependencies() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    return [re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in re.findall(r'^\s*"([^"]+)"', block, re.M)]


def test_default_commands_need_no_extras():
    """A plain `pip install saecache` runs every default command: the default `evaluate` draws histograms, so the
    plotting library is a core dependency, not an extra."""
    assert EvalConfig.histograms is True
    assert "matplotlib" in _core_dependencies()


def test_sae_flags_beside_a_config_with_saes_are_refused_in_one_line(tmp_path):
    """An SAE flag given with a --config that has `saes` names the flag (it used to crash on a shadowed name)."""
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps({"stores": ["s"], "out": "o", "steps": 1, "saes": [{"hook_in": "h"}]}))
    with pytest.raises(ConfigError, match=r"^--width, --k apply to SAEs given with --hook; with a --config"):
        build_config({"config": str(config), "width": (64,), "k": (4,)})
    with pytest.raises(ConfigError, match=r"^missing --store$"):
        build_config({"out": "o", "steps": 1})
