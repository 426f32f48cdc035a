"""Multi-hook reads for the dictionaries that span layers: the `resid_mid.i` hook (the input of block i's MLP layer
norm) on every architecture family, and row alignment of several hooks read together under shuffle, resume and
2-rank DDP."""

import pytest
import torch
from test_hooks import ARCHS, L, _build, _ids, close

from saecache.harvest.hooks import ActivationCapture, get_module, resolve_hooks


@pytest.mark.parametrize("arch", list(ARCHS))
def test_resid_mid_is_the_input_of_the_mlp_layer_norm(arch):
    model = _build(arch)
    blocks_path, _, ln2_name, style = ARCHS[arch][1:]
    hooks = resolve_hooks(model, [f"{k}.{i}" for k in ("resid_mid", "resid_pre", "attn_out", "mlp_in")
                                  for i in range(L)])
    ids = _ids(seed=3)
    seen = {}
    handles = [get_module(model, f"{blocks_path}.{i}.{ln2_name}").register_forward_pre_hook(
        lambda m, args, i=i: seen.setdefault(i, args[0].detach().clone())) for i in range(L)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    with ActivationCapture(model, hooks) as cap:
        acts = cap(ids)
    for i in range(L):
        mid = acts[f"resid_mid.{i}"]
        assert mid.std() > 0.05
        close(mid, seen[i])  # what the MLP's layer norm reads
        with torch.no_grad():
            close(getattr(get_module(model, f"{blocks_path}.{i}"), ln2_name)(mid), acts[f"mlp_in.{i}"])
        if style == "parallel":  # Pythia: attention and MLP both read the block's input
            close(mid, acts[f"resid_pre.{i}"])
        else:
            close(mid, acts[f"resid_pre.{i}"] + acts[f"attn_out.{i}"])
            assert not torch.allclose(mid, acts[f"resid_pre.{i}"], atol=1e-3)


# ---- several hooks read together: rows stay aligned ----

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from _store import harvest_tiny  # noqa: E402

from saecache.harvest.store import Store  # noqa: E402
from saecache.train import rundir  # noqa: E402
from saecache.train.loader import Loader  # noqa: E402

# the tiny model is a parallel-residual GPT-NeoX: resid_mid.1 = resid_pre.1 = resid_post.0 and resid_mid.0 = embed
# = the embedding row of the token, so rows read together agree exactly only when they come from one stored row
MULTI_HOOKS = ("embed", "resid_mid.0", "resid_mid.1", "resid_post.0", "mlp_out.0", "mlp_out.1")


@pytest.fixture(scope="module")
def multi_store(tmp_path_factory, tiny_model_dir, tiny_corpus):
    return harvest_tiny(tmp_path_factory.mktemp("multi") / "store.zarr", tiny_model_dir, tiny_corpus,
                        hooks=MULTI_HOOKS, tokens=4096)


def _embedding(model_dir) -> torch.Tensor:
    from safetensors.torch import load_file

    w = load_file(os.path.join(model_dir, "model.safetensors"))
    return w["gpt_neox.embed_in.weight"].half().float()


def check_aligned(batch: dict, E: torch.Tensor) -> None:
    """Every row of the batch is one stored row: the hooks that equal each other do, and the embedding matches the
    row's token id."""
    assert torch.equal(batch["resid_mid.1"], batch["resid_post.0"])
    assert torch.equal(batch["resid_mid.0"], batch["embed"])
    assert torch.equal(batch["embed"], E[batch["token"]])
    assert batch["resid_mid.1"].std() > 0.01 and not torch.equal(batch["resid_mid.1"], batch["embed"])


def _loader(store, **kw):
    hooks = [*MULTI_HOOKS, "token", "context", "position"]
    return Loader([Store.open(str(store))], hooks, 128, seed=3, partitions=4, shuffle_chunks=2, shuffle_run=8, **kw)


def test_multi_hook_rows_stay_aligned_under_shuffle_and_resume(multi_store, tiny_model_dir):
    E = _embedding(tiny_model_dir)
    loader = _loader(multi_store)
    batches = [next(loader) for _ in range(17)]
    state = loader.state_dict()
    batches += [next(loader) for _ in range(23)]  # > one epoch of the 4096-row store: the shuffle turns over
    loader.close()
    for b in batches:
        check_aligned(b, E)
    ids = [(b["context"] * 1000 + b["position"]) for b in batches]
    assert not torch.equal(ids[0], ids[0].sort().values)  # shuffled
    resumed = _loader(multi_store)
    resumed.load_state_dict(state)
    for b, again in zip(batches[17:], (next(resumed) for _ in range(23))):
        check_aligned(again, E)
        assert all(torch.equal(b[h], again[h]) for h in b)
    resumed.close()


DDP_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from saecache.harvest.store import Store
from saecache.train.loader import Loader
sys.path.insert(0, sys.argv[3])
from test_multihook import MULTI_HOOKS, _embedding, check_aligned
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
loader = Loader([Store.open(sys.argv[1])], [*MULTI_HOOKS, "token", "context", "position"], 128, seed=3,
                partitions=4, shuffle_chunks=2, shuffle_run=8, rank=rank, world_size=world)
E = _embedding(sys.argv[2])
rows = []
for _ in range(12):
    b = next(loader)
    check_aligned(b, E)
    rows.append((b["context"] * 1000 + b["position"]).tolist())
json.dump(rows, open(f"{sys.argv[4]}/rank{rank}.json", "w"))
loader.close()
dist.destroy_process_group()
"""


def test_multi_hook_rows_stay_aligned_over_two_gloo_ranks(multi_store, tiny_model_dir, tmp_path):
    script = tmp_path / "ddp_rows.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(multi_store), str(tiny_model_dir), os.path.dirname(__file__),
                          str(tmp_path)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    one = _loader(multi_store)
    for a, b in zip(r0, r1):  # the two ranks' rows, in rank order, are the one-process batch
        whole = next(one)
        assert a + b == (whole["context"] * 1000 + whole["position"]).tolist()
    one.close()


# ---- one read trains every family ----

from saecache.train.config import TrainConfig  # noqa: E402
from saecache.train.crosslayer import CrossLayer  # noqa: E402
from saecache.train.sae import SAE  # noqa: E402
from saecache.train.trainer import run_training  # noqa: E402

MIDS, OUTS = ["resid_mid.0", "resid_mid.1"], ["mlp_out.0", "mlp_out.1"]
SWEEP = [dict(arch="topk", hook_in="mlp_out.0", width=64, k=4),
         dict(arch="skip-transcoder", hook_in="resid_mid.0", hook_out="mlp_out.0", width=64, k=4),
         dict(arch="clt", hooks_in=MIDS, hooks_out=OUTS, width=32, k=4),
         dict(arch="clt-batchtopk", hooks_in=MIDS, hooks_out=OUTS, width=32, k=4),
         dict(arch="clt-jumprelu", hooks_in=MIDS, hooks_out=OUTS, width=32, coeff=0.01),
         dict(arch="crosscoder", hooks_in=["resid_post.0", "mlp_out.1"], width=48, k=6)]


def _sweep_cfg(store, out):
    return TrainConfig(stores=[str(store)], out=str(out), saes=SWEEP, steps=12, batch_size=128, checkpoint_every=6,
                       log_every=3, heldout_fraction=0.05, progress=False, device="cpu")


@pytest.mark.usefixtures("one_torch_thread")
def test_sweep_of_every_family_trains_from_one_read_and_resumes_bit_identically(multi_store, tmp_path):
    cfg = _sweep_cfg(multi_store, tmp_path / "run")
    assert cfg.hooks == ["mlp_out.0", "resid_mid.0", "resid_mid.1", "mlp_out.1", "resid_post.0"]
    dirs = run_training(cfg)
    names = [os.path.basename(d) for d in dirs]
    assert names[2] == "clt-resid_mid.0..resid_mid.1-to-mlp_out.0..mlp_out.1-32-k4"
    stats = Store.open(str(multi_store))
    for d, spec in zip(dirs, SWEEP):
        module, rec = rundir.load_run(d)
        assert rec["complete"] and rec["steps_done"] == 12
        if "hooks_in" in spec:
            assert isinstance(module, CrossLayer)
            assert rec["hooks"] == {"in": spec["hooks_in"], "out": spec.get("hooks_out", spec["hooks_in"]),
                                    "kind": spec["arch"].split("-")[0]}
            assert rec["sae"]["hooks_in"] == spec["hooks_in"] and rec["sae"]["kind"] == module.cfg.kind
            assert rec["sae"]["activation"] == module.cfg.activation
            # each hook normalised by its own statistics, folded back at save
            assert rec["normalization"]["in_scale"] == [stats.stats(h)["mean_sq_norm"] ** 0.5
                                                        for h in spec["hooks_in"]]
            xs = [torch.randn(5, module.cfg.d_in) for _ in spec["hooks_in"]]
            assert all(y.shape == (5, module.cfg.d_out) and torch.isfinite(y).all() for y in module(xs))
        else:
            assert isinstance(module, SAE) and rec["hooks"]["in"] == spec["hook_in"]
        metrics = [json.loads(x) for x in (tmp_path / "run" / os.path.basename(d) / rundir.METRICS_FILE)
                   .read_text().splitlines()]
        assert [r["step"] for r in metrics] == [3, 6, 9, 12] and all(r["fve"] is not None for r in metrics)
        if spec["arch"] in ("clt", "crosscoder"):  # AuxK on, its dead threshold resolved from the run's length
            assert rec["sae"]["dead_tokens_threshold"] == 12 * 128 // 100 and max(r["aux"] for r in metrics) > 0
    skip = rundir.load_run(dirs[1])[0]
    assert skip.W_skip_DD.abs().sum() > 0  # the skip term trained
    # resume from the step-6 checkpoint, as after a kill: bit-identical weights and metrics
    whole = {d: ((tmp_path / "run" / os.path.basename(d) / rundir.WEIGHTS_FILE).read_bytes(),
                 (tmp_path / "run" / os.path.basename(d) / rundir.METRICS_FILE).read_text()) for d in dirs}
    for d in dirs:
        shutil.rmtree(rundir.checkpoint_path(d, 12))
        os.remove(os.path.join(d, rundir.WEIGHTS_FILE))
        rundir.write_json_atomic(os.path.join(d, rundir.CFG_FILE), {**rundir.read_cfg(d), "complete": False})
    run_training(_sweep_cfg(multi_store, tmp_path / "run"))
    for d in dirs:
        assert (open(os.path.join(d, rundir.WEIGHTS_FILE), "rb").read(),
                open(os.path.join(d, rundir.METRICS_FILE)).read()) == whole[d], d


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_trains_a_clt_from_flags_and_refuses_bad_hooks_in_one_line(multi_store, tmp_path, capsys):
    from saecache.cli import main

    base = ["train", "--store", str(multi_store), "--steps", "4", "--batch-size", "128", "--no-progress",
            "--heldout-fraction", "0.05", "--arch", "clt", "--width", "32", "--k", "4"]
    main([*base, "--out", str(tmp_path / "run"), "--hooks-in", "resid_mid.0", "--hooks-in", "resid_mid.1",
          "--hooks-out", "mlp_out.0", "--hooks-out", "mlp_out.1"])
    [run] = capsys.readouterr().out.split()
    module, rec = rundir.load_run(run)
    assert isinstance(module, CrossLayer) and rec["hooks"] == {"in": MIDS, "out": OUTS, "kind": "clt"}
    with pytest.raises(SystemExit) as e:  # `evaluate` is for single-hook dictionaries: one line, nothing written
        main(["evaluate", run, "--store", str(multi_store), "--out", str(tmp_path / "eval")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "saecache replacement" in err and not (tmp_path / "eval").exists()
    with pytest.raises(SystemExit) as e:  # a CLT given one --hook: one line, nothing written
        main([*base, "--out", str(tmp_path / "bad"), "--hook", "resid_mid.0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hooks_in" in err and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_cross_layer_training_over_two_gloo_ranks_matches_one_process(multi_store, tmp_path):
    """A TopK CLT, a JumpReLU CLT and a TopK crosscoder trained by 2 gloo ranks (each reading its own partitions) end
    with the weights of one process at the same global batch: gradients averaged over the ranks' lists of hooks.
    (BatchTopK is left out: each rank selects the top k·B of its own rows, as the SAE's batchtopk does.)"""
    cfg = {"stores": [str(multi_store)], "steps": 8, "batch_size": 128, "heldout_fraction": 0.05, "progress": False,
           "device": "cpu", "checkpoint_every": 8,
           # AuxK off, as in test_ddp: its top-k_aux among many near-equal dead pre-activations flips on rounding
           "saes": [{**SWEEP[2], "options": {"dead_tokens_threshold": 10_000_000}}, SWEEP[4],
                    dict(arch="crosscoder", hooks_in=MIDS, width=32, k=4, options={"dead_tokens_threshold": 10**7})]}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = ["-m", "saecache", "train", "--config", str(tmp_path / "cfg.json"), "--out"]
    one = subprocess.run([sys.executable, *cmd, str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *cmd, str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    from safetensors.torch import load_file

    for d in one.stdout.split():
        name = os.path.basename(d)
        a, b = load_file(tmp_path / "one" / name / rundir.WEIGHTS_FILE), load_file(tmp_path / "two" / name /
                                                                                   rundir.WEIGHTS_FILE)
        assert a.keys() == b.keys() and any(k.startswith("threshold") for k in a) == ("jumprelu" in name)
        for k in a:
            if a[k].is_floating_point():
                torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4 * float(a[k].abs().max()), msg=k)
            else:
                assert torch.equal(a[k], b[k]), k
