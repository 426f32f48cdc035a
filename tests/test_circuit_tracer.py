"""Export of per-layer transcoder sets to circuit-tracer 0.5.0 (and of transcoders to SAELens), checked two ways:

- here: the files, keys, shapes and config.yaml circuit-tracer's loaders read, and its encode/decode (written out from
  its `SingleLayerTranscoder` and SAELens' `Transcoder` / `JumpReLUTranscoder` source) reproducing ours; refusals;
- in the real tool (slow): a virtualenv with circuit-tracer 0.5.0 (`ct_venv`, built once and kept under .venvs/)
  loads a set trained on SmolLM2-135M-Instruct with its own loader, reproduces our reconstructions and computes an attribution
  graph offline on CPU (`ct_roundtrip.py`, run inside that venv).
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from saecache.errors import RunDirError
from saecache.evaluate.circuit_tracer import export_transcoder_set
from saecache.evaluate.formats import from_sae
from saecache.evaluate.saelens import write_saelens
from saecache.train.sae import SAE, SAEConfig, save_sae

D, F = 24, 40
X = torch.randn(50, D, generator=torch.Generator().manual_seed(5))


def make_sae(arch, seed, width=F, **kw) -> SAE:
    if arch in ("topk", "batchtopk"):
        kw.setdefault("k", 4)
    sae = SAE(SAEConfig(arch=arch, d_in=D, width=width, transcoder=True, **kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        sae.b_in_D.copy_(torch.randn(D, generator=g))
        if arch == "jumprelu":
            sae.threshold_F.copy_(torch.rand(width, generator=g) * 0.3)
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae


def make_run(root, sae, layer, hook_in="mlp_in", name=None) -> str:
    run = os.path.join(root, name or f"{hook_in}-{layer}-{sae.cfg.arch}")
    os.makedirs(run)
    with open(os.path.join(run, "cfg.json"), "w") as f:
        json.dump({"format_version": 1, "name": os.path.basename(run), "sae": sae.cfg.to_dict(),
                   "hooks": {"in": f"{hook_in}.{layer}", "out": f"mlp_out.{layer}"},
                   "model": {"name": "models/tiny-llama"}}, f)
    save_sae(sae, os.path.join(run, "sae.safetensors"))
    return run


def ct_forward(t: dict, x):
    """circuit-tracer's SingleLayerTranscoder.forward: act(x @ W_enc.T + b_enc) @ W_dec + b_dec, act = ReLU or
    JumpReLU x * (x > threshold) when `activation_function.threshold` is stored."""
    pre = x @ t["W_enc"].T + t["b_enc"]
    th = t.get("activation_function.threshold")
    f = pre.relu() if th is None else pre * (pre > th)
    return f @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
def test_a_transcoder_set_exports_in_circuit_tracers_layout_and_computes_the_same(tmp_path, arch):
    saes = [make_sae(arch, seed=i) for i in range(3)]
    runs = [make_run(tmp_path / "runs", s, i) for i, s in reversed(list(enumerate(saes)))]  # any order given
    out = tmp_path / "ct" / "myset"
    export_transcoder_set(runs, str(out))
    assert sorted(os.listdir(out)) == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors",
                                       "layer_2.safetensors"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg == {"model_kind": "transcoder_set", "model_name": "models/tiny-llama",
                   "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out", "scan": "myset"}
    for i, sae in enumerate(saes):
        t = load_file(str(out / f"layer_{i}.safetensors"))
        want = {"W_enc": (F, D), "W_dec": (F, D), "b_enc": (F,), "b_dec": (D,)}
        if arch != "relu":
            want["activation_function.threshold"] = (F,)
        assert {k: tuple(v.shape) for k, v in t.items()} == want
        assert all(v.dtype == torch.float32 for v in t.values())
        with torch.no_grad():
            ours = sae(X)
        torch.testing.assert_close(ct_forward(t, X), ours, rtol=1e-5, atol=1e-5)
        assert (ours != sae.b_dec_D).any()  # some features fire: the comparison is not of the biases alone


def test_resid_mid_transcoders_get_circuit_tracers_resid_mid_hooks(tmp_path):
    runs = [make_run(tmp_path, make_sae("relu", i), i, hook_in="resid_mid") for i in range(2)]
    export_transcoder_set(runs, str(tmp_path / "out"))
    cfg = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == ("hook_resid_mid", "hook_mlp_out")


def unset_batchtopk() -> SAE:
    """A batchtopk transcoder never trained past its threshold's start: its encode still depends on the batch."""
    sae = make_sae("batchtopk", 0)
    sae.threshold.fill_(-1.0)
    return sae


@pytest.mark.parametrize("case, match", [
    ("topk", "cannot export a topk transcoder to circuit-tracer 0.5.0: its transcoders encode with ReLU or JumpReLU"),
    ("gap", r"needs a transcoder for every layer from 0 up; missing layer\(s\) 1"),
    ("widths", "different widths"),
    ("twice", "both write mlp_out.0"),
    ("mixed", "read different hooks"),
    ("unset", "no inference threshold"),
])
def test_unexportable_sets_are_refused_in_one_line_and_nothing_is_written(tmp_path, case, match):
    r = tmp_path / "runs"
    runs = {
        "topk": lambda: [make_run(r, make_sae("relu", 0), 0), make_run(r, make_sae("topk", 1), 1)],
        "gap": lambda: [make_run(r, make_sae("relu", 0), 0), make_run(r, make_sae("relu", 2), 2)],
        "widths": lambda: [make_run(r, make_sae("relu", 0), 0), make_run(r, make_sae("relu", 1, width=F + 8), 1)],
        "twice": lambda: [make_run(r, make_sae("relu", 0), 0), make_run(r, make_sae("relu", 1), 0, name="again")],
        "mixed": lambda: [make_run(r, make_sae("relu", 0), 0), make_run(r, make_sae("relu", 1), 1, "resid_mid")],
        "unset": lambda: [make_run(r, unset_batchtopk(), 0)],
    }[case]()
    proc = subprocess.run([sys.executable, "-m", "saecache", "export", *runs, "--to", "circuit-tracer", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(match, lines[0]), lines[0]
    assert sorted(os.listdir(tmp_path)) == ["runs"]  # no out, no temporary directory left


def test_an_existing_output_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(RunDirError, match="already exists"):
        export_transcoder_set([make_run(tmp_path, make_sae("relu", 0), 0)], str(out))
    assert os.listdir(out) == ["mine.txt"]


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
def test_saelens_holds_relu_and_jumprelu_transcoders(tmp_path, arch):
    sae = make_sae(arch, 3)
    write_saelens(from_sae(sae, {"hook_name": "mlp_in.3"}), str(tmp_path))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    t = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert cfg["architecture"] == ("transcoder" if arch == "relu" else "jumprelu_transcoder")
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"], cfg["apply_b_dec_to_input"]) == (D, F, D, False)
    assert cfg["metadata"]["hook_name"] == "mlp_in.3"
    # SAELens' Transcoder.encode: relu(x @ W_enc + b_enc), JumpReLUTranscoder also * (pre > threshold); decode
    # f @ W_dec + b_dec
    pre = X @ t["W_enc"] + t["b_enc"]
    f = pre.relu() * (pre > t["threshold"]) if "threshold" in t else pre.relu()
    with torch.no_grad():
        torch.testing.assert_close(f @ t["W_dec"] + t["b_dec"], sae(X), rtol=1e-5, atol=1e-5)
