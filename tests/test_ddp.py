"""Data-parallel training for real: `torchrun --nproc_per_node 2` with gloo on CPU gives (within float tolerance) the
weights of one process at the same global batch, with each rank reading only its own partitions; resuming it from a
checkpoint ends bit-identical to the uninterrupted two-rank run."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from _store import tiny_store_in
from safetensors.torch import load_file

from saecache.train import rundir

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("fmt", ["float16", "int8"])
def test_two_gloo_processes_match_one_process_and_resume_exactly(request, fmt, tmp_path):
    tiny_store = tiny_store_in(request, fmt)
    cfg = {"stores": [str(tiny_store)], "steps": 24, "batch_size": 256, "warmup_steps": 4, "checkpoint_every": 12,
           "resample_steps": 8, "dead_tokens_threshold": 2 * 256, "heldout_fraction": 0.05, "log_every": 4, "progress": False,
           "device": "cpu",
           # AuxK off (its default threshold, a hundredth of the run, would train the ~300 dead latents by AuxK alone:
           # its top-k_aux among hundreds of near-equal dead pre-activations flips on rounding differences, so those
           # rows drift apart; test_auxk_gradient_over_two_ranks_is_the_one_process_gradient checks AuxK's gradient)
           "saes": [{"arch": "topk", "hook_in": "mlp_out.0", "width": 512, "k": 4, "resample": True,  # resamples ~200
                     "options": {"dead_tokens_threshold": 10_000_000}},
                    {"arch": "relu", "hook_in": "mlp_out.1", "width": 128}]}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    one = subprocess.run([sys.executable, "-m", "saecache", "train", "--config", tmp_path / "cfg.json",
                          "--out", tmp_path / "one"], env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "saecache", "train", "--config", tmp_path / "cfg.json", "--out", tmp_path / "two"],
                         env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert two.stdout.split() == [str(tmp_path / "two" / n) for n in ("topk-mlp_out.0-512-k4", "relu-mlp_out.1-128")]
    for name in ("topk-mlp_out.0-512-k4", "relu-mlp_out.1-128"):
        a, b = load_file(tmp_path / "one" / name / rundir.WEIGHTS_FILE), load_file(tmp_path / "two" / name /
                                                                                   rundir.WEIGHTS_FILE)
        assert a.keys() == b.keys()
        for k in a:
            if a[k].is_floating_point():
                # atol on the tensor's scale: Adam divides by sqrt(v), so an entry whose gradients are all ~0 turns
                # the ~1e-7 difference of a 2-rank all-reduce into ~1e-5 of that tensor's largest entry (CPU-dependent)
                torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4 * float(a[k].abs().max()),
                                           msg=f"{name} {k}")
            else:
                assert torch.equal(a[k], b[k]), f"{name} {k}"
        # the two-rank run still trained (weights moved away from a fresh init) and recorded its world size
        cfg_two = rundir.read_cfg(tmp_path / "two" / name)
        assert cfg_two["world_size"] == 2 and cfg_two["complete"]
        m1 = [json.loads(x) for x in (tmp_path / "one" / name / rundir.METRICS_FILE).read_text().splitlines()]
        m2 = [json.loads(x) for x in (tmp_path / "two" / name / rundir.METRICS_FILE).read_text().splitlines()]
        assert [r["step"] for r in m1] == [r["step"] for r in m2] == [4, 8, 12, 16, 20, 24]
    # resuming the two-rank run from its step-12 checkpoint (as after a kill) ends bit-identical to the whole run
    names = ("topk-mlp_out.0-512-k4", "relu-mlp_out.1-128")
    whole = {n: (tmp_path / "two" / n / rundir.WEIGHTS_FILE).read_bytes() for n in names}
    metrics = {n: (tmp_path / "two" / n / rundir.METRICS_FILE).read_text() for n in names}
    for n in names:
        run = tmp_path / "two" / n
        shutil.rmtree(rundir.checkpoint_path(run, 24))
        (run / rundir.WEIGHTS_FILE).unlink()
        rundir.write_json_atomic(str(run / "cfg.json"), {**rundir.read_cfg(run), "complete": False})
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "saecache", "train", "--config", tmp_path / "cfg.json", "--out", tmp_path / "two"],
                           env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    for n in names:
        assert (tmp_path / "two" / n / rundir.WEIGHTS_FILE).read_bytes() == whole[n]
        assert (tmp_path / "two" / n / rundir.METRICS_FILE).read_text() == metrics[n]


AUXK_SCRIPT = """
import sys
import torch, torch.distributed as dist
from safetensors.torch import save_file
from saecache.train import ddp
from saecache.train.sae import SAE, SAEConfig

distributed = len(sys.argv) > 2
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
torch.manual_seed(0)
sae = SAE(SAEConfig("topk", 16, 64, k=4, dead_tokens_threshold=5))
x = torch.randn(96, 16) * torch.linspace(0.2, 3.0, 16)
x[:48] += 2.0  # the ranks' halves differ in mean and spread
sae.tokens_since_fired_F[:32] = 5  # half the latents dead: AuxK trains them
mine = x.chunk(world)[rank]
out = sae.loss(mine)
assert out.aux is not None and float(out.aux) > 0
(out.total * (mine.shape[0] * world / x.shape[0])).backward()  # the trainer's weighting of each rank's mean
ddp.average_gradients(sae, world)
if rank == 0:
    save_file({n: p.grad.contiguous() for n, p in sae.named_parameters()}, sys.argv[1])
"""


def test_auxk_gradient_over_two_ranks_is_the_one_process_gradient(tmp_path):
    """AuxK normalises by the residual's variance over the batch: over the global batch (every rank's rows), so the
    two-rank averaged gradient is the one-process gradient on the same rows (it used each rank's own variance)."""
    script = tmp_path / "auxk.py"
    script.write_text(AUXK_SCRIPT)
    one = subprocess.run([sys.executable, script, tmp_path / "one.safetensors"], env=ENV, capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          script, tmp_path / "two.safetensors", "ddp"], env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys() and a["W_dec_FD"][:32].abs().sum() > 0  # the dead latents' rows got AuxK gradient
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)


AGREE_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from saecache.harvest.store import Store
from saecache.train import ddp
from saecache.harvest.split import Split
from saecache.train.chunks import training_units

path, path_rank1, hidden, agree, out_dir = sys.argv[1:6]
dist.init_process_group("gloo")
rank = dist.get_rank()
st = Store.open(path if rank == 0 else path_rank1)
if rank == 1:
    st.manifest()  # rank 1 lists the manifest before the harvest publishes its next shards
dist.barrier()
if rank == 0:  # the harvest publishes them (their objects are already written)
    for name in os.listdir(hidden):
        os.replace(os.path.join(hidden, name), os.path.join(path, "_manifest", name))
dist.barrier()
seen = len(st.complete_shards())
try:
    if agree == "agree":
        ddp.agree_on_shards([st])
    units = [[u.row0, u.n] for u in training_units([st], Split(0.05))]
    result = {"rank": rank, "seen": seen, "units": units}
except Exception as e:
    result = {"rank": rank, "error": f"{type(e).__name__}: {e}"}
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:  # one file per rank: two ranks' stdout interleave
    json.dump(result, f)
dist.destroy_process_group()
"""


def _incomplete_copy(src, dst, hidden, keep: int):
    """A real copy of the store whose shards >= keep are not published yet (manifest entries moved to `hidden`)."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "_final")  # the final record (a zarr group node, SPEC.md)
    hidden.mkdir(exist_ok=True)
    for name in sorted(n for n in os.listdir(dst / "_manifest") if n.startswith("shard-"))[keep:]:
        os.replace(dst / "_manifest" / name, hidden / name)


def _agree(tmp_path, path, path_rank1, hidden, mode):
    (tmp_path / "agree.py").write_text(AGREE_SCRIPT)
    out_dir = tmp_path / f"agree-{path.name}"
    out_dir.mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "agree.py"), str(path), str(path_rank1), str(hidden), mode, str(out_dir)],
                       env=ENV, capture_output=True, text=True, timeout=600)
    out = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in (0, 1) if (out_dir / f"rank{rank}.json").exists()]
    assert len(out) == 2, r.stderr
    return out


@pytest.mark.slow
def test_ranks_of_an_allow_incomplete_run_train_from_the_shards_rank_0_sees(tiny_store, tmp_path):
    """A harvest publishes shards between the ranks' manifest reads: each rank saw its own set, so ranks trained from
    different data; now rank 0 decides and the other follows. A rank that cannot see rank 0's shards even after
    re-listing (it reads another copy) stops the run with one line on every rank."""
    _incomplete_copy(tiny_store, tmp_path / "s.zarr", tmp_path / "hidden", keep=10)
    r0, r1 = _agree(tmp_path, tmp_path / "s.zarr", tmp_path / "s.zarr", tmp_path / "hidden", "agree")
    assert (r0["seen"], r1["seen"]) == (16, 10)  # each rank's own listing: 16 and 10 shards published
    assert r0["units"] == r1["units"] and len(r0["units"]) > 10 * 4  # both train from rank 0's 16
    _incomplete_copy(tiny_store, tmp_path / "a.zarr", tmp_path / "h3", keep=12)
    _incomplete_copy(tiny_store, tmp_path / "b.zarr", tmp_path / "h4", keep=12)
    r0, r1 = _agree(tmp_path, tmp_path / "a.zarr", tmp_path / "b.zarr", tmp_path / "h3", "agree")
    assert "does not see shard(s) 12, 13, 14, 15" in r1["error"] and "\n" not in r1["error"]
    assert "StoreError" in r0["error"]
