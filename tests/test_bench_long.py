"""Issue 21's benches at tiny sizes: the larger corpus source (data/corpus.py `sitepackages`), the long bench's
pieces (bench/bench_long.py: a saecache checkpoint read back in raw units, the targets, the resumable peer state of
bench/quality_peers.py, a whole `run` of saecache's CLI with its checkpoints measured) and the resampling study
(bench/bench_resample.py) end to end on the tiny store."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- the corpus
def test_sitepackages_source_reads_package_text_only_when_asked(tmp_path, monkeypatch):
    import sysconfig

    from saecache.data import corpus

    site = tmp_path / "site"
    files = {"pkg/mod.py": "x = 1\n", "pkg/README.md": "# pkg\n", "pkg/tests/test_mod.py": "assert True\n",
             "pkg/__pycache__/mod.py": "cached\n", "pkg-1.0.dist-info/LICENSE.txt": "licence\n",
             "pkg/data.bin": "not text by suffix\n", "other/notes.rst": "Notes\n=====\n"}
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    real = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {**real, "purelib": str(site), "platlib": str(site)})
    docs = corpus.collect_sources(include=("sitepackages",))
    assert [(s, d) for s, d, _ in docs] == [("PythonSitePackages", "other/notes.rst"),
                                            ("PythonSitePackages", "pkg/README.md"),
                                            ("PythonSitePackages", "pkg/mod.py")]
    # the demo's corpus (the default sources) never reads site-packages
    assert "sitepackages" not in corpus.DEFAULT_SOURCES
    assert corpus.build_pile_corpus.__defaults__[-2] == corpus.DEFAULT_SOURCES == ("stdlib", "pydocs", "usrsharedoc")


# ------------------------------------------------------------------------------------------------ bench_long parts
def test_targets_per_checkpoint_and_dead_at_the_end():
    from bench import bench_long as bl

    def row(trainer, step, fve, dead):
        return {"trainer": trainer, "step": step, "schedule_steps": bl.STEPS, "fve": fve, "dead_train_pct": dead}

    last = bl.CHECKPOINTS[-1]
    rows = [row("saecache-topk", 1000, 0.95, 0.0), row("dl-topk", 1000, 0.94, 0.0),
            row("sparsify-signum-topk", 1000, 0.96, 5.0),
            row("saecache-topk", last, 0.97, 2.5), row("dl-topk", last, 0.96, 1.0),
            row("sparsify-signum-topk", last, 0.955, 3.0),
            {**row("saecache-topk-1m", 1000, 0.99, 0.0), "schedule_steps": 1000}]  # own schedule: no target row
    t = {x["step"]: x for x in bl.targets(rows)}
    assert set(t) == {1000, last}
    assert t[1000]["best_peer"] == "sparsify-signum-topk" and not t[1000]["fve_met"]
    assert t[1000]["margin"] == pytest.approx(-0.01) and "dead_met" not in t[1000]
    assert t[last]["fve_met"] and t[last]["best_peer"] == "dl-topk"
    assert t[last]["lowest_dead_peer"] == "dl-topk" and not t[last]["dead_met"]  # 2.5 > 1.0 + 1 point
    rows[3]["dead_train_pct"] = 2.0
    assert bl.targets(rows)[-1]["dead_met"]


def test_peer_state_resumes_an_adam_run_exactly(tmp_path):
    """quality_peers' save_state/load_state (safetensors + JSON): a run stopped, saved and reloaded into fresh
    objects continues exactly as the uninterrupted one (the optimizer's per-parameter state keys are ints)."""
    from bench.quality_peers import load_state, save_state

    def make():
        torch.manual_seed(0)
        m = torch.nn.Linear(8, 4)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
        return m, opt, sched

    def steps(m, opt, sched, a, b):
        for s in range(a, b):
            g = torch.Generator().manual_seed(s)
            loss = m(torch.randn(16, 8, generator=g)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    m, opt, sched = make()
    steps(m, opt, sched, 0, 10)
    want = {k: v.clone() for k, v in m.state_dict().items()}
    m, opt, sched = make()
    steps(m, opt, sched, 0, 4)
    save_state(tmp_path / "st", 3, {"m": m.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    save_state(tmp_path / "st", 4, {"m": m.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                    "note": [1, "a", None]})
    (tmp_path / "st" / ".tmp-half-written").mkdir()  # a killed save: ignored
    assert sorted(p.name for p in (tmp_path / "st").glob("step-*")) == ["step-000000004"]
    step, st = load_state(tmp_path / "st")
    assert step == 4 and st["note"] == [1, "a", None]
    m, opt, sched = make()
    m.load_state_dict(st["m"])
    opt.load_state_dict(st["opt"])
    sched.load_state_dict(st["sched"])
    steps(m, opt, sched, 4, 10)
    for k, v in m.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert load_state(tmp_path / "none") == (0, None)


@pytest.fixture
def tiny_long(monkeypatch):
    """bench_long at tiny sizes: 8 steps of 256 rows, checkpoints at 2, 4, 8, F=64, k=8."""
    from bench import bench_long as bl

    monkeypatch.setattr(bl, "STEPS", 8)
    monkeypatch.setattr(bl, "BATCH", 256)
    monkeypatch.setattr(bl, "CHECKPOINTS", (2, 4, 8))
    monkeypatch.setattr(bl, "WINDOW", 2)
    monkeypatch.setattr(bl, "WIDTH", 64)
    monkeypatch.setattr(bl, "K", 8)
    monkeypatch.setattr(bl, "POLL_S", 0.2)
    monkeypatch.setattr(bl, "TRAINERS", {"saecache-topk": ("saecache", "topk", 8),
                                         "saecache-topk-1m": ("saecache", "topk", 2)})
    return bl


def test_long_run_measures_every_checkpoint_and_resumes(tiny_long, tiny_store, tmp_path, monkeypatch):
    """`dump` then `run` on the tiny store: saecache's CLI trains, every checkpoint is measured into long.json as it
    appears; the checkpoint read back in raw units equals the finished run's weights; a rerun measures nothing new."""
    bl = tiny_long
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    (scratch / "store.zarr").symlink_to(tiny_store)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.setattr(bl, "HOOK", "mlp_out.1")
    args = ["--scratch", str(scratch), "--out", str(out), "--model", str(model)]
    bl.main(["dump", *args])
    off = np.load(scratch / "offsets.npy")
    assert len(off) == 9 and off[-1] == (scratch / "rows.f16").stat().st_size // (2 * 64)  # d=64 fp16 rows
    bl.main(["run", "saecache-topk", *args])
    bl.main(["run", "saecache-topk-1m", *args])
    r = json.loads((out / "long.json").read_text())
    got = [(x["trainer"], x["step"], x["tokens"]) for x in r["rows"]]
    assert sorted(got) == [("saecache-topk", 2, 512), ("saecache-topk", 4, 1024), ("saecache-topk", 8, 2048),
                           ("saecache-topk-1m", 2, 512)]
    assert all(x["l0"] == 8.0 and -1 < x["fve"] <= 1 and 0 <= x["dead_train_pct"] <= 100 for x in r["rows"])
    assert any("run saecache-topk" in c for c in r["commands"])
    # the last checkpoint, read back with the normalisation folded in, is the finished run's SAE
    from saecache.train.rundir import load_run

    run_dir = bl.run_dir_of(bl.paths(scratch), "saecache-topk")
    sae, _ = load_run(str(run_dir))
    x = torch.from_numpy(np.load(scratch / "heldout.npy")[:50].astype(np.float32))
    x_hat, f = bl.saecache_checkpoint(run_dir, 8)(x)
    torch.testing.assert_close(x_hat, sae(x))
    torch.testing.assert_close(f, sae.encode(x))
    md = (out / "long.md").read_text()
    assert "| saecache-topk | 8 | 8 |" in md and (out / "long.png").stat().st_size > 0
    bl.main(["loss", *args, "--n-contexts", "4"])  # saecache evaluate of both finished runs
    loss = json.loads((out / "long.json").read_text())["loss"]
    assert set(loss) == {"saecache-topk", "saecache-topk-1m"}
    for name, x in loss.items():  # evaluate's own figures, interval included (a percentile bootstrap of a ratio
        # need not hold its point estimate: on this tiny model CE zero ~ CE clean, and the point sat 2e-12 above hi)
        row = json.loads((scratch / "eval" / name / "report" / "report.json").read_text())["rows"][0]
        keys = ("recovered_zero", "recovered_zero_lo", "recovered_zero_hi", "fve", "l0")
        assert {k: x[k] for k in keys} == {k: row[k] for k in keys} and x["recovered_zero_lo"] <= x["recovered_zero_hi"]
    assert "| saecache-topk-1m | " in (out / "long.md").read_text().split("% loss recovered at the end")[1]
    before = (out / "long.json").read_text()
    monkeypatch.setattr(bl.subprocess, "Popen", None)  # nothing left to train: no child is started
    bl.main(["run", "saecache-topk", *args])
    assert json.loads((out / "long.json").read_text())["rows"] == json.loads(before)["rows"]


def test_run_refuses_without_the_dump(tiny_long, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="not dumped yet"):
        tiny_long.main(["run", "saecache-topk", "--scratch", str(tmp_path / "s"), "--out", str(tmp_path),
                        "--model", str(model)])


# ------------------------------------------------------------------------------------------------- bench_resample
def test_resample_schedules():
    from bench.bench_resample import schedule

    assert schedule("none", 2000) == {"fields": {}, "resample_at": []}
    assert schedule("none-no-warmup", 2000) == {"fields": {"warmup_steps": 0}, "resample_at": []}
    assert schedule("late", 2000) == {"fields": {"resample_steps": 600}, "resample_at": [600, 1200, 1800]}
    early = schedule("early-no-rewarm", 2000)
    assert early == {"fields": {"resample_steps": 667, "warmup_steps": 0}, "resample_at": [667, 1334]}
    assert max(early["resample_at"]) < 0.8 * 2000 <= max(schedule("late", 2000)["resample_at"])


def test_resample_study_end_to_end(tiny_store, tmp_path, one_torch_thread, monkeypatch):
    """Three settings on the tiny store with a strong L1 and a high LR (latents die, so resampling has work): the
    resampled latents are found only where resampling ran, the counts agree with the frequencies, and a rerun trains
    nothing."""
    from bench import bench_resample as br
    from saecache.train.rundir import read_cfg

    out, scratch = tmp_path / "out", tmp_path / "scratch"
    args = ["--store", str(tiny_store), "--hook", "mlp_out.1", "--width", "64", "--tokens", str(20 * 256),
            "--batch", "256", "--coeff", "3.0", "--lr", "0.03", "--settings", "late", "none", "early-no-rewarm",
            "--scratch", str(scratch), "--out", str(out)]
    br.main(args)
    r = json.loads((out / "resample.json").read_text())
    rows = {x["setting"]: x for x in r["rows"]}
    assert [x["setting"] for x in r["rows"]] == ["none", "late", "early-no-rewarm"]
    assert rows["late"]["resample_at"] == [6, 12, 18] and rows["early-no-rewarm"]["resample_at"] == [7, 14]
    assert rows["late"]["resampled_last"] > 0 and "resampled_last" not in rows["none"]
    assert not br.resampled_at(str(scratch / "none" / "sae"), 20).any()  # trained biases are never exactly 0
    cfg = read_cfg(str(scratch / "early-no-rewarm" / "sae"))
    assert cfg["train"]["warmup_steps"] == 0 and cfg["train"]["resample_steps"] == 7
    assert cfg["spec"]["warmup_steps"] == 0 and read_cfg(str(scratch / "late" / "sae"))["spec"]["warmup_steps"] > 0
    for x in r["rows"]:
        freq = np.asarray(x["freq"])
        assert len(freq) == 64 and x["above_threshold"] == int((freq > br.THRESHOLD).sum())
        assert x["dead"] == int((freq == 0).sum()) and x["l0"] == pytest.approx(freq.sum(), abs=0.01)  # l0: 2 places
    assert (out / "resample.png").stat().st_size > 0 and "| late | 6, 12, 18 | at the start and after each resample |" in \
        (out / "resample.md").read_text()
    monkeypatch.setattr(br, "train", None)  # every setting is measured: nothing is trained again
    assert [x["setting"] for x in br.main(args)["rows"]] == ["none", "late", "early-no-rewarm"]


@pytest.mark.slow
def test_dictionary_learning_long_run_resumes_exactly_in_a_new_process(tmp_path):
    """quality_peers' "long" op in dictionary_learning's own environment: 20 steps in one worker equal 12 steps,
    the worker ended, and 8 more in a fresh worker (from the saved state)."""
    sys.path.insert(0, str(REPO / "tests"))
    from _venvs import peer_python

    python = peer_python("dictionary-learning")
    rng = np.random.default_rng(0)
    d, steps, batch = 16, 20, 64
    rng.standard_normal((steps * batch, d)).astype(np.float16).tofile(tmp_path / "rows.f16")
    np.save(tmp_path / "offsets.npy", np.arange(steps + 1) * batch)
    np.save(tmp_path / "heldout.npy", rng.standard_normal((100, d)).astype(np.float32))

    def ask(reqs):
        worker = subprocess.run([str(python), str(REPO / "bench" / "quality_peers.py")], text=True,
                                input="".join(json.dumps(r) + "\n" for r in reqs), capture_output=True, timeout=600)
        answers = [json.loads(x[2:]) for x in worker.stdout.splitlines() if x.startswith("@@")]
        assert len(answers) == len(reqs) and all("error" not in a for a in answers), worker.stderr + str(answers)

    def req(state, until, result):
        return {"op": "long", "name": "dl", "arch": "topk", "width": 32, "k": 4, "seed": 0, "d": d,
                "data": str(tmp_path / "rows.f16"), "offsets": str(tmp_path / "offsets.npy"),
                "heldout": str(tmp_path / "heldout.npy"), "state_dir": str(tmp_path / state), "until": until,
                "save_every": 5, "window": [0, batch * 2], "result": str(tmp_path / result)}

    ask([req("one", 12, "one-12.npz"), req("one", 20, "one.npz")])  # one worker, two pieces
    ask([req("two", 12, "two-12.npz")])
    ask([req("two", 20, "two.npz")])  # a new process: from the state saved at step 12
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert set(a.files) == {"x_hat", "counts", "l0", "train_counts"}
    for k in a.files:
        assert np.array_equal(a[k], b[k]), k
    assert not np.array_equal(np.load(tmp_path / "one-12.npz")["x_hat"], a["x_hat"])  # it did train on
    assert math.isfinite(float(a["x_hat"].sum()))
    # the end state exported as a dictionary_learning save dir and imported by saecache is the same SAE
    export = {**req("two", 20, "unused"), "op": "long_export", "out": str(tmp_path / "dl-save")}
    ask([export])
    subprocess.run([sys.executable, "-m", "saecache", "import", str(tmp_path / "dl-save"), "--out",
                    str(tmp_path / "run"), "--hook", "mlp_out.1"], check=True)
    from saecache.train.rundir import load_run

    sae, _ = load_run(str(tmp_path / "run"))
    x = torch.from_numpy(np.load(tmp_path / "heldout.npy"))
    np.testing.assert_allclose(sae(x).detach().numpy(), a["x_hat"], atol=1e-5)
