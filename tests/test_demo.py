"""The offline main job (`saecache demo`) at miniature size: every stage runs for real, the seed's table comes out,
and a second run reuses the model, the store and the finished SAEs instead of redoing them."""

import json

from saecache.data.demo import DemoConfig, run_demo, sweep
from saecache.evaluate.report import tables


def mini(out, **kw) -> DemoConfig:
    base = dict(out=str(out), corpus_bytes=300_000, tokenizer="bpe", bpe_vocab=384, layers=2, hidden=32,
                model_steps=40, ctx_len=32, harvest_tokens=6000, widths=(64, 128), k=4, train_tokens=12_000,
                batch_size=512, resample_steps=8, eval_contexts=8, device="cpu", progress=False)
    base.update(kw)
    return DemoConfig(**base)


def test_demo_pipeline_end_to_end_and_cached_rerun(tmp_path):
    cfg = mini(tmp_path / "demo")
    s = run_demo(cfg)

    # the sweep: ReLU+L1 and TopK at both widths for every layer's MLP output, all evaluated
    want = {(a, w, str(layer)) for a in ("relu", "topk") for w in cfg.widths for layer in range(cfg.layers)}
    got = {(r["arch"], r["width"], str(r["layer"])) for r in s["rows"]}
    assert got == want
    assert len(sweep(cfg, [f"mlp_out.{i}" for i in range(cfg.layers)])) == len(want)
    for r in s["rows"]:
        assert r["ce_clean"] < r["ce_zero"] or r["layer"] != "0"  # zero-ablating MLP0 hurts even a small model
        if r["arch"] == "topk":
            assert r["l0"] <= cfg.k + 1e-6
    assert s["tokenizer"].startswith("local byte-level BPE")
    assert s["val_loss"] < s["unigram_xent"]  # the model learned something beyond token frequencies

    # the seed's table: one per (architecture, width), one line per layer
    table = tables(s["rows"])
    assert table.count("| Layer | MSE Loss | L1 loss | L0 | % Alive | % Loss Recovered |") == 4
    assert sum(line.startswith("| 0 |") for line in table.splitlines()) == 4

    out = tmp_path / "demo"
    assert (out / "eval" / "report.md").is_file()
    assert len(list((out / "eval").glob("hist-*.png"))) == len(want)
    # the sweep's frontier: a picture per hook, a point per SAE at its row's L0 and % loss recovered
    assert [p.rsplit("/", 1)[-1] for p in s["frontier"]] == [f"frontier-mlp_out.{i}.png" for i in range(cfg.layers)]
    assert all((out / "eval" / p).is_file() for p in s["frontier"]) and (out / "eval" / "report.html").is_file()
    panels = json.loads((out / "eval" / "frontier.json").read_text())["panels"]
    points = {q["run"]: q for p in panels for ln in p["lines"] for q in ln["points"]}
    assert {run: (q["l0"], q["recovered_zero"]) for run, q in points.items()} == {
        r["run"]: (r["l0"], r["recovered_zero"]) for r in s["rows"]}
    pruned_at = {q["prune_above"] for p in panels for c in p["pruning"] for q in c["points"][1:]}
    assert pruned_at and pruned_at <= set(cfg.prune_curve)  # the demo's own series
    assert json.loads((out / "demo_config.json").read_text())["widths"] == list(cfg.widths)

    # second run: nothing is retrained or re-harvested; the evaluation gives the same figures
    model_record = (out / "model" / "training.json").read_bytes()
    weights = {p: p.read_bytes() for p in (out / "runs").glob("*/sae.safetensors")}
    assert len(weights) == len(want)
    s2 = run_demo(cfg)
    assert s2["harvest"]["shards_written"] == 0
    assert (out / "model" / "training.json").read_bytes() == model_record
    assert {p: p.read_bytes() for p in (out / "runs").glob("*/sae.safetensors")} == weights
    by_run = {r["run"]: r for r in s["rows"]}
    for r in s2["rows"]:
        assert r["mse"] == by_run[r["run"]]["mse"]


def test_demo_config_flavours_and_sweep_choices():
    import pytest

    from saecache.errors import ConfigError

    with pytest.raises(ConfigError, match="model must be one of tiny, smollm2"):
        DemoConfig(model="gpt2")
    with pytest.raises(ConfigError, match="archs must be"):
        DemoConfig(archs=("gated",))
    cfg = DemoConfig(archs=("topk",), widths=(64,), k=8)
    assert sweep(cfg, ["mlp_out.0", "resid_post.1"]) == [
        {"arch": "topk", "hook_in": "mlp_out.0", "width": 64, "k": 8},
        {"arch": "topk", "hook_in": "resid_post.1", "width": 64, "k": 8}]
    assert DemoConfig.preset("smollm2").out != DemoConfig().out  # the two flavours never share a store


def test_demo_seeds_adds_replicas_to_a_finished_demo_and_reports_their_spread(tmp_path):
    """`saecache demo --seeds 2` on a finished demo reuses its model and store, trains the replicas, and the report
    gives every figure as mean ± sd across them."""
    cfg = mini(tmp_path / "demo", widths=(64,), archs=("topk",))
    run_demo(cfg)
    out = tmp_path / "demo"
    model_record = (out / "model" / "training.json").read_bytes()
    s = run_demo(mini(tmp_path / "demo", widths=(64,), archs=("topk",), seeds=2))
    assert s["harvest"]["shards_written"] == 0
    assert (out / "model" / "training.json").read_bytes() == model_record
    names = sorted(p.parent.name for p in (out / "runs").glob("*/sae.safetensors"))
    assert [n for n in names if "seed" in n] == sorted(f"topk-mlp_out.{i}-64-k4-seed{r}" for i in range(2)
                                                         for r in range(2))
    replicas = {}
    for p in (out / "runs").glob("*-seed*/sae.safetensors"):
        replicas.setdefault(p.parent.name.rsplit("-seed", 1)[0], []).append(p.read_bytes())
    assert all(len(w) == 2 and w[0] != w[1] for w in replicas.values())  # the replicas differ by their init
    report = (out / "eval" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert len(rows) == 2 and all(" ± " in line for line in rows)  # one row per layer, its figures mean ± sd
