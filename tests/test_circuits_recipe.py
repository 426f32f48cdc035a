"""`saecache demo --recipe circuits` at miniature size: a store of every layer's resid_mid and mlp_out, a PLT set and a
CLT with matched total latents and L0 trained from it, both evaluated as replacement models and printed as one table;
a rerun reuses the store and the runs."""

import json
from pathlib import Path

from click.testing import CliRunner

from saecache.cli import cli
from saecache.data.circuits import circuit_sweep, circuits_table
from saecache.evaluate.runner import open_store

MINI = ["--corpus-bytes", "300000", "--tokenizer", "bpe", "--bpe-vocab", "384", "--layers", "2", "--hidden", "32",
        "--model-steps", "40", "--ctx-len", "32", "--harvest-tokens", "6000", "--widths", "64", "--k", "4",
        "--train-tokens", "12000", "--batch-size", "512", "--eval-contexts", "8", "--device", "cpu", "--quiet"]


def test_the_sweep_matches_latents_and_l0():
    saes = circuit_sweep(3, 64, (8,), (4, 8))
    plts = [s for s in saes if s["arch"] == "topk"]
    clts = [s for s in saes if s["arch"] == "clt"]
    assert [(s["hook_in"], s["hook_out"]) for s in plts] == [(f"resid_mid.{i}", f"mlp_out.{i}") for i in range(3)]
    assert [s["k"] for s in clts] == [4, 8] and all(s["width"] == 64 for s in saes)
    assert clts[0]["hooks_in"] == [f"resid_mid.{i}" for i in range(3)]
    assert clts[0]["hooks_out"] == [f"mlp_out.{i}" for i in range(3)]
    assert len({s["name"] for s in saes}) == len(saes)


def test_demo_recipe_circuits_end_to_end_and_cached_rerun(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(cli, ["demo", "--recipe", "circuits", "--out", str(out), *MINI])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "circuits_summary.json").read_text())

    # one store holds both hooks of every layer
    assert set(open_store(s["store"]).hooks) == {"resid_mid.0", "resid_mid.1", "mlp_out.0", "mlp_out.1"}

    # matched total latents and L0: 2 transcoders of 64 vs a CLT of 64 per layer over 2 layers, TopK 4 per layer
    cfgs = {name: json.loads((Path(d) / "cfg.json").read_text())["sae"] for name, d in s["runs"].items()}
    plt = [c for n, c in cfgs.items() if n.startswith("plt-")]
    (clt,) = [c for n, c in cfgs.items() if n.startswith("clt-")]
    assert sum(c["width"] for c in plt) == clt["n_features"] * clt["n_layers"] == 128
    assert {c["k"] for c in plt} == {clt["k"]} == {4}
    assert clt["hooks_in"] == ["resid_mid.0", "resid_mid.1"] and clt["hooks_out"] == ["mlp_out.0", "mlp_out.1"]

    # both evaluated as replacement models, in both input modes, every layer with L0 <= k
    reps = s["reports"]
    assert set(reps) == {"PLT set", "CLT"}
    for rep in reps.values():
        assert set(rep["modes"]) == {"clean", "replaced"}
        assert [layer["hook_out"] for layer in rep["layers"]] == ["mlp_out.0", "mlp_out.1"]
        for r in rep["modes"].values():
            assert r["ce_zero"] > r["ce_clean"] and r["kl"] >= 0
            assert all(0 < x["l0"] <= 4 + 1e-6 for x in r["layers"])
    assert reps["CLT"]["layers"][0]["width"] == 64

    # the printed table: a line per (dictionary, mode), a line per layer
    table = circuits_table(reps)
    assert table in res.output
    for name in ("PLT set", "CLT"):
        for mode in ("clean", "replaced"):
            r = reps[name]["modes"][mode]
            assert f"| {name} | {mode} | {r['ce_clean']:.4f} | {r['ce_spliced']:.4f} |" in table
    assert sum(line.startswith("| 0 |") or line.startswith("| 1 |") for line in table.splitlines()) == 2
    assert (out / "circuits-eval" / "plt" / "replacement.md").is_file()
    assert (out / "circuits-eval" / "clt" / "replacement.md").is_file()

    # a rerun harvests and trains nothing and gives the same figures
    weights = {p: p.read_bytes() for p in (out / "circuits-runs").glob("*/sae.safetensors")}
    assert len(weights) == 3
    res2 = CliRunner().invoke(cli, ["demo", "--recipe", "circuits", "--out", str(out), *MINI])
    assert res2.exit_code == 0, res2.output
    s2 = json.loads((out / "circuits_summary.json").read_text())
    assert s2["harvest"]["shards_written"] == 0
    assert {p: p.read_bytes() for p in (out / "circuits-runs").glob("*/sae.safetensors")} == weights
    assert s2["reports"]["CLT"]["modes"] == reps["CLT"]["modes"]


def test_the_bench_pairs_seeds_and_states_whether_the_lower_l0_claim_holds():
    from bench.bench_circuits import delta, summarise, verdict

    def rep(rec):
        layer = {"l0": 4.0, "fve": 0.5, "rel_error": 0.5}
        return {"modes": {m: {"recovered_zero": rec, "recovered_mean": rec, "kl": 1 - rec, "ce_spliced": 5.0,
                              "ce_clean": 4.0, "layers": [layer]} for m in ("clean", "replaced")}}

    summary = summarise({"PLT set k=8": [rep(0.80), rep(0.90)], "CLT k=4": [rep(0.78), rep(0.86)],
                         "CLT k=8": [rep(0.95), rep(0.97)], "PLT set k=4": [rep(0.7), rep(0.7)]})
    d = delta(summary, "CLT k=4", "PLT set k=8", "clean", "recovered_zero")
    assert [round(v, 6) for v in d["per_seed"]] == [-0.02, -0.04]  # paired by seed, not mean minus mean
    assert round(d["mean"], 6) == -0.03 and round(d["spread"], 6) == 0.02
    assert delta(summary, "CLT k=2", "PLT set k=8", "clean", "kl") is None
    deltas = {m: {name: {"recovered_zero": delta(summary, a, b, m, "recovered_zero")}
                  for name, a, b in (("CLT k=4 − PLT set k=8", "CLT k=4", "PLT set k=8"),)} for m in ("clean",)}
    assert "does not reach the PLT set at k=8 (-3.0 ± 2.0" in verdict({"k": [8, 4], "deltas": deltas})
    deltas["clean"]["CLT k=4 − PLT set k=8"]["recovered_zero"] = delta(summary, "CLT k=4", "PLT set k=4", "clean",
                                                                       "recovered_zero")
    assert "CLT at k=4 reaches the PLT set at k=8" in verdict({"k": [8, 4], "deltas": deltas})
