"""The evaluate-stage commands end to end on the tiny store: runs trained for a few steps with the train API, then
`saecache evaluate` (tables, histograms, pruning), `features`, `import`/`export`, and one-line errors."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from saecache.cli import main

HELDOUT = 0.25


@pytest.fixture(scope="module")
def runs(tiny_store, tmp_path_factory):
    from saecache.train.config import SAESpec, TrainConfig
    from saecache.train.trainer import run_training

    out = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(stores=[str(tiny_store)], out=str(out), steps=40, batch_size=64, warmup_steps=5,
                      heldout_fraction=HELDOUT, checkpoint_every=1000, progress=False, device="cpu",
                      saes=[SAESpec(arch="topk", width=64, hook_in="mlp_out.0", k=4, name="topk0"),
                            SAESpec(arch="relu", width=64, hook_in="mlp_in.0", hook_out="mlp_out.0", name="tc0")])
    dirs = run_training(cfg)
    return {p.rsplit("/", 1)[-1]: p for p in dirs}


def run_cli(args, capsys):
    """Run `saecache ARGS`; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        main(list(map(str, args)))
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def heldout_rows(store_path, hook):
    """Held-out rows read directly: every row whose context id is in the last HELDOUT fraction, but the BOS rows
    (position 0), which the runs (train's default) never trained on and evaluate leaves out for them."""
    from saecache.harvest.store import Store

    st = Store.open(str(store_path))
    n_ctx = st.geometry.n_contexts
    cut = n_ctx - math.ceil(HELDOUT * n_ctx)
    ctx = np.asarray(st.array("rows/context")[:])
    rows = np.flatnonzero((ctx >= cut) & (np.asarray(st.array("rows/position")[:]) != 0))
    return torch.from_numpy(np.asarray(st.array(f"acts/{hook}")[:])[rows].astype(np.float32)), st


def md_table(md: str, title_part: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, body rows) of the first markdown table under a `## ...title_part...` heading."""
    lines = md.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("## ") and title_part in line)
    i = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("|"))
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    body = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        body.append(cells(line))
    return cells(lines[i]), body


def test_evaluate_writes_tables_histograms_and_pruned_rows(runs, tiny_store, tmp_path, capsys):
    from saecache.train.rundir import load_run

    # independent figures first: the topk run on the held-out rows, read straight from the zarr arrays
    x, st = heldout_rows(tiny_store, "mlp_out.0")
    sae, _ = load_run(runs["topk0"])
    keep_hat = lambda keep: sae.decode(f * keep)  # noqa: E731
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    freq_F = (f != 0).double().mean(0).numpy()
    # a pruning threshold half-way between two distinct frequencies near the median: some, not all, dropped
    levels = np.unique(freq_F)
    j = len(levels) // 2
    thr = float((levels[j - 1] + levels[j]) / 2)

    out = tmp_path / "eval"
    code, stdout, err = run_cli(["evaluate", runs["topk0"], runs["tc0"], "--store", tiny_store, "--out", out,
                                 "--prune-above", thr, "--n-contexts", "6", "--threads", 1, "--html-features", 3],
                                capsys)
    assert code == 0, err
    md = (out / "report.md").read_text()
    assert md in stdout
    # the seed's table: Layer | MSE Loss | L1 loss | L0 | % Alive | % Loss Recovered, one table per set of SAEs
    head, body = md_table(md, "mlp_out: topk, 64 features, k=4")
    assert head[:6] == ["Layer", "MSE Loss", "L1 loss", "L0", "% Alive", "% Loss Recovered"]
    assert len(body) == 1 and body[0][0] == "0"
    assert float(body[0][1]) == pytest.approx(float(((x - x_hat) ** 2).mean()), rel=1e-3)
    assert float(body[0][3]) == pytest.approx(float((f != 0).sum(1).float().mean()), abs=0.05)
    assert float(body[0][4]) == pytest.approx(100 * float((f != 0).any(0).float().mean()), abs=0.05)
    head_tc, body_tc = md_table(md, "mlp_in -> mlp_out: relu, 64 features")
    assert head_tc[:6] == head[:6] and len(body_tc) == 1
    head_pr, body_pr = md_table(md, "mlp_out: topk, 64 features, k=4 — features firing more often than")
    assert head_pr[-1] == "Pruned" and body_pr[0][-1] == str(int((freq_F > thr).sum()))
    # what the figures are over: 64 held-out contexts of 32 positions, less the BOS rows the run never trained on
    assert f"{64 * 31} held-out rows" in md and "6 held-out contexts" in md

    report = json.loads((out / "report.json").read_text())
    rows = {(r["run"], r["pruned"]): r for r in report["rows"]}
    assert set(rows) == {("topk0", False), ("topk0", True), ("tc0", False), ("tc0", True)}
    csv_lines = (out / "report.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 5 and "recovered_zero" in csv_lines[0]
    cfg = json.loads((out / "eval_config.json").read_text())
    assert cfg["prune_above"] == thr and cfg["n_contexts"] == 6 and cfg["store"] == str(tiny_store)
    for label in ("topk0", "topk0-pruned", "tc0", "tc0-pruned"):
        png = (out / f"hist-{label}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    # a static feature page per SAE (not per pruned re-measurement): 3 features, each context's firing token marked
    assert sorted(p.name for p in out.glob("features-*.html")) == ["features-tc0.html", "features-topk0.html"]
    page = (out / "features-topk0.html").read_text()
    assert page.count("<h2>Feature ") == 3 and page.count("<mark") >= 3

    # the statistics agree with the direct computation over the held-out rows
    n_ctx = st.geometry.n_contexts
    # every held-out row but the BOS ones (the run left them out)
    assert rows[("topk0", False)]["n_rows"] == math.ceil(HELDOUT * n_ctx) * (st.geometry.rows_per_context - 1) == len(x)
    r = rows[("topk0", False)]
    assert r["mse"] == pytest.approx(float(((x - x_hat) ** 2).mean()), rel=1e-4)
    assert r["l0"] == pytest.approx(float((f != 0).sum(1).float().mean()), rel=1e-6)
    assert r["frac_alive"] == pytest.approx(float((f != 0).any(0).float().mean()))

    # pruning drops exactly the features firing above the threshold, and every statistic is re-measured without them
    freq = np.load(out / "freq-topk0.npy")
    assert freq == pytest.approx(freq_F, abs=1e-9)
    pr = rows[("topk0", True)]
    keep = torch.from_numpy(freq_F <= thr)
    assert 0 < pr["n_pruned"] == int((~keep).sum()) < 64
    with torch.no_grad():
        f_kept, x_hat_kept = f * keep, keep_hat(keep)
    assert pr["l0"] == pytest.approx(float((f_kept != 0).sum(1).float().mean()), rel=1e-6)
    assert pr["l0"] < r["l0"]
    assert pr["mse"] == pytest.approx(float(((x - x_hat_kept) ** 2).mean()), rel=1e-4)
    assert pr["frac_alive"] == pytest.approx(float((f_kept != 0).any(0).float().mean()))
    assert np.load(out / "freq-topk0-pruned.npy")[~keep.numpy()].max() == 0
    assert pr["ce_spliced"] != r["ce_spliced"] and pr["ce_clean"] == r["ce_clean"]  # loss re-measured as well
    # loss figures: the same clean loss for both runs (same contexts), ablations worse than clean
    for run in ("topk0", "tc0"):
        r = rows[(run, False)]
        assert r["ce_clean"] == pytest.approx(rows[("topk0", False)]["ce_clean"])
        assert r["n_contexts"] == 6 and r["ce_zero"] != r["ce_clean"]
        assert r["recovered_zero"] == pytest.approx((r["ce_zero"] - r["ce_spliced"]) / (r["ce_zero"] - r["ce_clean"]))
        assert r["recovered_mean"] == pytest.approx((r["ce_mean"] - r["ce_spliced"]) / (r["ce_mean"] - r["ce_clean"]))


def test_features_marks_the_firing_token(runs, tiny_store, tmp_path, capsys):
    x_all, st = None, None
    from saecache.evaluate.config import FeaturesConfig
    from saecache.evaluate.features_run import feature_contexts
    from saecache.harvest.store import Store
    from saecache.train.rundir import load_run

    st = Store.open(str(tiny_store))
    sae, _ = load_run(runs["topk0"])
    x_all = torch.from_numpy(np.asarray(st.array("acts/mlp_out.0")[:1024]).astype(np.float32))
    with torch.no_grad():
        fired = (sae.encode(x_all) != 0).sum(0)
    feats = fired.argsort(descending=True)[:2].tolist()
    page = tmp_path / "f.html"
    code, out, err = run_cli(["features", runs["topk0"], "--store", tiny_store, "--feature", feats[0], "--feature",
                              feats[1], "--top", 5, "--max-rows", 1024, "--html", page], capsys)
    assert code == 0, err
    assert f"feature {feats[0]} of topk0" in out and f"fires on {int(fired[feats[0]])} of 1024 rows" in out
    assert out.count("«") >= 5
    assert page.read_text().count("<mark") >= 5
    res = feature_contexts(FeaturesConfig(run_dir=runs["topk0"], store=str(tiny_store), features=feats, top=5,
                                          max_rows=1024, device="cpu"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(st.header["tokenizer"]["name"])
    for feat in feats:
        acts = [c["activation"] for c in res["features"][feat]["contexts"]]
        assert acts == sorted(acts, reverse=True) and len(acts) == 5
        for c in res["features"][feat]["contexts"]:
            token_id = int(np.asarray(st.contexts(c["context"], c["context"] + 1))[0, c["position"]])
            assert c["tokens"][c["at"]] == tok.decode([token_id])


def test_import_evaluate_export(tiny_store, tmp_path, capsys):
    d, F = 64, 32
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "dl"
    src.mkdir()
    torch.save({"bias": torch.randn(d, generator=g) * 0.01, "encoder.weight": torch.randn(F, d, generator=g) * 0.1,
                "encoder.bias": torch.zeros(F), "decoder.weight": torch.randn(d, F, generator=g) * 0.1}, src / "ae.pt")
    (src / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "activation_dim": d,
                                                             "dict_size": F, "lm_name": "tiny", "layer": 0}}))
    run = tmp_path / "imported"
    code, out, err = run_cli(["import", src, "--out", run, "--hook", "mlp_out.0", "--store", tiny_store], capsys)
    assert code == 0, err
    code, out, err = run_cli(["evaluate", run, "--store", tiny_store, "--out", tmp_path / "ev", "--n-contexts", 2,
                              "--no-histograms", "--html-features", 0, "--threads", 1], capsys)
    assert code == 0, err
    row = json.loads((tmp_path / "ev" / "report.json").read_text())["rows"][0]
    # imported: the store was never trained on, so every row of it is held out (256 contexts x 32 positions)
    assert row["n_rows"] == 256 * 32 and "every row" in row["rows"]
    for to, files in (("saelens", {"cfg.json", "sae_weights.safetensors"}),
                      ("dictionary_learning", {"ae.pt", "config.json"})):
        code, out, err = run_cli(["export", run, "--to", to, "--out", tmp_path / to], capsys)
        assert code == 0, err
        assert {p.name for p in (tmp_path / to).iterdir()} == files
    back = torch.load(tmp_path / "dictionary_learning" / "ae.pt", weights_only=True)
    assert torch.equal(back["decoder.weight"], torch.load(src / "ae.pt", weights_only=True)["decoder.weight"])
    sl = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert sl["metadata"]["hook_name"] == "mlp_out.0" and sl["d_in"] == d and sl["d_sae"] == F


def one_line_error(args, capsys, match):
    code, out, err = run_cli(args, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert match in err, err


def test_one_line_errors(runs, tiny_store, tmp_path, capsys):
    one_line_error(["evaluate", tmp_path / "nope", "--store", tiny_store], capsys, "does not exist")
    one_line_error(["evaluate", runs["topk0"], "--store", tmp_path / "nostore"], capsys, "no store")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["topk0"], unfinished)
    (unfinished / "sae.safetensors").unlink()
    one_line_error(["evaluate", unfinished, "--store", tiny_store], capsys, "training did not finish")
    other_hook = tmp_path / "other_hook"
    shutil.copytree(runs["topk0"], other_hook)
    cfg = json.loads((other_hook / "cfg.json").read_text())
    cfg["hooks"] = {"in": "mlp_out.5", "out": "mlp_out.5"}
    (other_hook / "cfg.json").write_text(json.dumps(cfg))
    one_line_error(["evaluate", other_hook, "--store", tiny_store], capsys, "different hooks")
    other_model = tmp_path / "other_model"
    shutil.copytree(runs["topk0"], other_model)
    cfg = json.loads((other_model / "cfg.json").read_text())
    cfg["stores"][0]["fingerprint"] = "0" * 64
    cfg["model"] = {"name": "EleutherAI/pythia-70m-deduped", "config_hash": "f" * 64}
    (other_model / "cfg.json").write_text(json.dumps(cfg))
    one_line_error(["evaluate", other_model, "--store", tiny_store], capsys, "different models")
    (tmp_path / "bad").mkdir()
    torch.save(torch.nn.Linear(2, 2), tmp_path / "bad" / "ae.pt")
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    one_line_error(["import", tmp_path / "bad", "--out", tmp_path / "r", "--hook", "mlp_out.0"], capsys,
                   "not a plain state dict")
    # a ReLU transcoder exports to SAELens 6's `transcoder` class (TopK/gated ones are refused: test_formats)
    code, out, err = run_cli(["export", runs["tc0"], "--to", "saelens", "--out", tmp_path / "x"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "x" / "cfg.json").read_text())["architecture"] == "transcoder"
    # missing files: a run dir without cfg.json, a dictionary_learning dir without config.json, a non-store
    no_cfg = tmp_path / "no_cfg"
    shutil.copytree(runs["topk0"], no_cfg)
    (no_cfg / "cfg.json").unlink()
    one_line_error(["evaluate", no_cfg, "--store", tiny_store], capsys, "cfg.json is missing")
    (tmp_path / "dl_no_cfg").mkdir()
    torch.save({"bias": torch.zeros(2)}, tmp_path / "dl_no_cfg" / "ae.pt")
    one_line_error(["import", tmp_path / "dl_no_cfg", "--out", tmp_path / "r2", "--hook", "mlp_out.0"], capsys,
                   "config.json is missing")
    one_line_error(["evaluate", runs["topk0"], "--store", tmp_path / "dl_no_cfg"], capsys, "dl_no_cfg")
    # a dictionary of another width than the store's hook
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    torch.save({"bias": torch.zeros(32), "encoder.weight": torch.zeros(8, 32), "encoder.bias": torch.zeros(8),
                "decoder.weight": torch.zeros(32, 8)}, narrow / "ae.pt")
    (narrow / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    one_line_error(["import", narrow, "--out", tmp_path / "r3", "--hook", "mlp_out.0", "--store", tiny_store], capsys,
                   "width 32")
    assert not (tmp_path / "r3").exists()


def test_evaluate_from_another_directory_finds_the_model(tmp_path, tiny_model_dir, tiny_corpus, capsys, monkeypatch):
    """The store header names the model as typed (`model`, relative to where the harvest ran); evaluate run from
    elsewhere finds it beside the store, for the loss figures and the feature pages' tokenizer."""
    from _store import harvest_tiny

    from saecache.train.config import SAESpec, TrainConfig
    from saecache.train.trainer import run_training

    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir, work / "model")
    monkeypatch.chdir(work)
    harvest_tiny("store.zarr", "model", tiny_corpus, hooks=("mlp_out.0",), tokens=2048, ctx_per_chunk=16)
    run, = run_training(TrainConfig(stores=["store.zarr"], out="runs", steps=3, batch_size=64, warmup_steps=1,
                                    heldout_fraction=HELDOUT, progress=False, device="cpu",
                                    saes=[SAESpec(arch="topk", width=64, hook_in="mlp_out.0", k=4, name="t")]))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["evaluate", work / run, "--store", work / "store.zarr", "--out", tmp_path / "eval",
                              "--n-contexts", "4", "--no-histograms", "--html-features", "2", "--device", "cpu"],
                             capsys)
    assert code == 0, err
    row, = json.loads((tmp_path / "eval" / "report.json").read_text())["rows"]
    assert math.isfinite(row["ce_spliced"]) and (tmp_path / "eval" / "features-t.html").exists()
