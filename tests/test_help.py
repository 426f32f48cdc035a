"""Help and messages (issue 22 §6): one line per flag in --help with the whole docstring on docs/flags.md, required
flags marked, one name per BOS field (old run dirs, configs and stores still load), messages in flag names, light
--help imports, and the SmolLM2 flavour named for what it is."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner
import pytest

from saecache.cli import COMMANDS, cli, main
from saecache.options import ConfigOption, flags_page, help_line
from test_train_errors import _run as _train

ROOT = Path(__file__).resolve().parents[1]
INTERNAL = re.compile(r"\bNone\b|SAESpec|TrainConfig|HarvestConfig|EvalConfig|FeaturesConfig|DemoConfig|SAEConfig|"
                      r"CopyConfig|default_lr|Architecture\.")


def _commands():
    with click.Context(cli, info_name="saecache") as ctx:
        return {name: cli.get_command(ctx, name) for name in cli.list_commands(ctx)}


def _help(*args) -> str:
    res = CliRunner().invoke(cli, [*args, "--help"], prog_name="saecache", terminal_width=80)
    assert res.exit_code == 0, res.output
    return res.output


def _entry(text: str, flag: str) -> str:
    """The --help entry of `flag` (its option line and the indented lines under it)."""
    m = re.search(rf"^  (?:-\w, )?{re.escape(flag)}\b.*?(?=^  -|\Z)", text, re.S | re.M)
    assert m, f"{flag} not in help"
    return " ".join(m.group(0).split())


def _one_sentence(text: str) -> bool:
    return help_line(text) == text


def test_help_shows_one_sentence_per_flag_and_the_page_has_the_rest():
    """Every config flag's help is the first sentence of its docstring (plus its default); grad_clip's research note
    is not in `train --help` but on docs/flags.md, verbatim."""
    for name, cmd in _commands().items():
        for p in cmd.params:
            if isinstance(p, ConfigOption):
                shown = re.sub(r"\s*\[(default: .*|required)\]$", "", p.help).removesuffix(" Repeat the flag for a "
                                                                                          "sweep.")
                shown = shown.removesuffix(" Repeat the flag for several.")
                assert _one_sentence(shown), (name, p.name, shown)
                assert p.doc.startswith(shown), (name, p.name)
    train = _help("train")
    clip = _entry(train, "--grad-clip")
    assert "0.02" in clip and "Why" not in clip and "second moment" not in clip and "0.941" not in clip
    assert len(train.splitlines()) < 187  # the count: a paragraph per flag
    page = (ROOT / "docs" / "flags.md").read_text()
    assert "Adam's second moment (β2 0.999, a ~1000-step memory) keeps the early gradients' size" in page
    assert "TopK k=32 held-out FVE 0.941 → 0.959, ReLU+L1 at L0 32 0.61 → 0.91" in page


def test_flags_page_is_current():
    """docs/flags.md is what `python -m saecache.options --write docs/flags.md` writes today: every command's every
    flag with its default and whole docstring. Regenerate the page when this fails."""
    assert (ROOT / "docs" / "flags.md").read_text() == flags_page(), \
        "docs/flags.md is stale: run `python -m saecache.options --write docs/flags.md`"
    page = flags_page()
    for name, cmd in _commands().items():
        assert f"## saecache {name}\n" in page
        for p in cmd.params:
            if isinstance(p, click.Option) and p.opts != ["--help"]:
                assert f"- `{p.opts[0]}" in page, (name, p.opts)


def test_flags_page_check_command_detects_a_stale_page(tmp_path):
    stale = tmp_path / "flags.md"
    stale.write_text(flags_page().replace("0.02", "0.03", 1))
    check = [sys.executable, "-m", "saecache.options", "--check", str(stale)]
    res = subprocess.run(check, capture_output=True, text=True)
    assert res.returncode == 1 and "stale" in res.stderr and "Traceback" not in res.stderr
    assert subprocess.run([sys.executable, "-m", "saecache.options", "--write", str(stale)]).returncode == 0
    assert subprocess.run(check).returncode == 0 and stale.read_text() == flags_page()


@pytest.mark.parametrize("command,flags", [("train", ("--store", "--out")), ("harvest", ("--out",)),
                                           ("evaluate", ("--store",)), ("features", ("--store", "--feature"))])
def test_required_flags_are_marked(command, flags):
    text = _help(command)
    for flag in flags:
        assert "[required]" in _entry(text, flag), (command, flag)
    assert "[required]" not in _entry(text, "--batch-size")


def test_the_bos_fields_have_one_name_each():
    """harvest's field decides what the store holds (--store-bos, on), train's what training reads (--train-on-bos,
    off); no command has the old shared --exclude-bos."""
    from saecache.harvest.config import HarvestConfig
    from saecache.train.config import TrainConfig

    harvest, train = _help("harvest"), _help("train")
    assert "--store-bos / --no-store-bos" in harvest and "[default: store-bos]" in _entry(harvest, "--store-bos")
    assert "--train-on-bos / --no-train-on-bos" in train and "[default: false]" in _entry(train, "--train-on-bos")
    for name in COMMANDS:
        assert "exclude-bos" not in _help(name)
    assert "store_bos" in HarvestConfig.__dataclass_fields__ and "train_on_bos" in TrainConfig.__dataclass_fields__
    assert not {"exclude_bos"} & (set(HarvestConfig.__dataclass_fields__) | set(TrainConfig.__dataclass_fields__))


def test_store_header_records_the_bos_field_under_its_old_key():
    """Stores keep their bytes: the header's config holds `exclude_bos` (the negation of store_bos) in the place the
    stores written before the rename have it, so a store of the same config is identical and resumes."""
    from saecache.harvest.config import HarvestConfig

    for store_bos in (True, False):
        rec = HarvestConfig(out="unused", store_bos=store_bos).as_recorded()
        assert list(rec) == ["model", "revision", "model_dtype", "trust_remote_code", "hooks", "dataset",
                             "dataset_name", "split", "text_field", "ctx_len", "bos", "exclude_bos", "tokens",
                             "batch_size", "dtype", "codec", "ctx_per_chunk", "chunks_per_shard", "seed", "nonfinite"]
        assert rec["exclude_bos"] is (not store_bos) and "store_bos" not in rec


def test_old_configs_with_exclude_bos_load():
    from saecache.train.config import TrainConfig

    base = dict(stores=["s.zarr"], out="runs", saes=[dict(hook_in="mlp_out.0", width=64)], steps=10)
    assert TrainConfig.from_dict({**base, "exclude_bos": True}).train_on_bos is False
    assert TrainConfig.from_dict({**base, "exclude_bos": False}).train_on_bos is True
    assert TrainConfig.from_dict(base).train_on_bos is False




def test_run_dir_from_before_the_rename_resumes(capsys, tiny_store, tmp_path):
    """A run dir whose cfg.json says `exclude_bos` (as saecache wrote it before) resumes under today's name, and the
    old value is read, not dropped: exclude_bos false resumes only with --train-on-bos."""
    argv = ["--store", tiny_store, "--out", tmp_path / "out", "--hook", "mlp_out.0", "--width", "64", "--k", "4",
            "--steps", "4", "--batch-size", "64", "--checkpoint-every", "2", "--no-progress"]
    code, out, err = _train(capsys, *argv)
    assert code == 0, err
    run = Path(out.strip())
    pristine = tmp_path / "pristine"
    shutil.copytree(run, pristine)

    def as_before_the_rename(exclude_bos: bool):
        shutil.rmtree(run)
        shutil.copytree(pristine, run)
        rec = json.loads((run / "cfg.json").read_text())
        assert rec["train"].pop("train_on_bos") is False
        rec["train"]["exclude_bos"] = exclude_bos
        (run / "cfg.json").write_text(json.dumps({**rec, "complete": False}))  # as if killed after step 2
        (run / "sae.safetensors").unlink()
        shutil.rmtree(run / "checkpoints" / "step-000000004")

    as_before_the_rename(True)
    code, out, err = _train(capsys, *argv)
    assert code == 0, err
    assert json.loads((run / "cfg.json").read_text())["complete"] is True and (run / "sae.safetensors").exists()

    as_before_the_rename(False)
    code, out, err = _train(capsys, *argv)
    assert code == 2 and "differs in --train-on-bos" in err and "Traceback" not in err


def test_help_texts_name_flags_not_internals():
    """No --help text names a Python class or field (`SAESpec.lr`, `default_lr`) or says `None = …`."""
    for name in [None, *COMMANDS]:
        text = _help(*([name] if name else []))
        hits = INTERNAL.findall(text)
        assert not hits, (name, hits)


def test_plan_mismatch_names_the_flag(capsys, tmp_path, tiny_model_dir, tiny_corpus):
    """Rerunning a harvest with another --tokens: the message says --tokens, not the plan's n_contexts_wanted."""
    def harvest(tokens):
        args = {"--out": tmp_path / "s", "--model": tiny_model_dir, "--dataset": tiny_corpus, "--hooks": "mlp_out.0",
                "--ctx-len": "32", "--tokens": tokens, "--ctx-per-chunk": "4", "--chunks-per-shard": "2",
                "--device": "cpu"}
        try:
            main(["harvest", "--quiet", *[str(x) for kv in args.items() for x in kv]])
            return 0, ""
        except SystemExit as e:
            return e.code, capsys.readouterr().err

    assert harvest(512)[0] in (0, None)
    code, err = harvest(1024)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "differs in: --tokens" in err and "n_contexts_wanted" not in err and "plan " not in err


def test_train_messages_name_flags(capsys, tiny_store, tmp_path):
    code, _, err = _train(capsys, "--store", tiny_store, "--out", tmp_path / "o", "--hook", "mlp_out.0",
                          "--steps", "2", "--tokens", "100")
    assert code == 2 and "--tokens" in err and "--steps" in err and "total_tokens" not in err
    code, _, err = _train(capsys, "--store", tiny_store, "--out", tmp_path / "o", "--hook", "mlp_out.0",
                          "--steps", "2", "--heldout", "1.5")
    assert code == 2 and "--heldout-fraction must be in [0, 1)" in err and "heldout_fraction" not in err


def test_help_imports_no_heavy_modules():
    """`saecache --help` and every command's --help (train's above all) load click and the config dataclasses
    only: not torch, transformers, zarr or datasets."""
    code = ("import sys\nfrom saecache.cli import COMMANDS, main\n"
            "for argv in [['--help'], *[[c, '--help'] for c in COMMANDS]]:\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert not e.code, argv\n"
            "print(sorted(m for m in ('torch', 'transformers', 'zarr', 'datasets') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_smollm2_is_named_for_what_it_is():
    from saecache.data.demo_cli import model_line
    from saecache.data.smollm2 import DESCRIPTION

    demo = " ".join(_help("demo").split())
    assert "SmolLM2-135M-Instruct" in demo and "Q4_1" in demo and "pretrained SmolLM2" not in demo
    assert "SmolLM2-135M-Instruct" in DESCRIPTION and "Q4_1" in DESCRIPTION
    line = model_line("smollm2", dict(val_loss=3.0, unigram_entropy=7.0, unigram_xent=7.5))
    assert DESCRIPTION in line and "pretrained" not in line
    for path in ("data/smollm2.py", "data/demo.py", "data/demo_cli.py"):
        assert "pretrained SmolLM2" not in " ".join((ROOT / path).read_text().split()), path


def test_run_dir_from_before_the_cross_layer_fields_resumes(capsys, tiny_store, tmp_path):
    """cfg.json written before SAESpec had hooks_in/hooks_out (their defaults keep the old meaning) resumes."""
    argv = ["--store", tiny_store, "--out", tmp_path / "out", "--hook", "mlp_out.0", "--width", "64", "--k", "4",
            "--steps", "4", "--batch-size", "64", "--checkpoint-every", "2", "--no-progress"]
    code, out, err = _train(capsys, *argv)
    assert code == 0, err
    run = Path(out.strip())
    rec = json.loads((run / "cfg.json").read_text())
    for spec in rec["train"]["saes"]:
        assert spec.pop("hooks_in") is None and spec.pop("hooks_out") is None
    (run / "cfg.json").write_text(json.dumps({**rec, "complete": False}))  # as if killed after step 2
    (run / "sae.safetensors").unlink()
    shutil.rmtree(run / "checkpoints" / "step-000000004")
    code, out, err = _train(capsys, *argv)
    assert code == 0, err
    assert json.loads((run / "cfg.json").read_text())["complete"] is True and (run / "sae.safetensors").exists()
