"""Export of per-layer transcoder sets to circuit-tracer 0.5.0 (and of transcoders to SAELens), checked two ways:

- here: the files, keys, shapes and config.yaml circuit-tracer's loaders read, and its encode/decode (written out from
  its `SingleLayerTranscoder` and SAELens' `Transcoder` / `JumpReLUTranscoder` source) reproducing ours; refusals;
- in the real tool (slow): a virtualenv with circuit-tracer 0.5.0 (`ct_venv`, built once and kept under .venvs/)
  loads a PLT set and a CLT trained on SmolLM2-135M-Instruct with its own loaders, reproduces our reconstructions
  and computes an attribution graph with each, offline on CPU (`ct_roundtrip.py`, run inside that venv).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _venvs import peer_python
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


def make_clt_run(root, activation="jumprelu", kind="clt", L=3, seed=0, hook_in="resid_mid") -> tuple[str, object]:
    from saecache.train.crosslayer import CrossLayer, CrossLayerConfig, save_crosslayer

    hooks_out = None if kind == "crosscoder" else [f"mlp_out.{i}" for i in range(L)]
    clt = CrossLayer(CrossLayerConfig(kind=kind, hooks_in=[f"{hook_in}.{i}" for i in range(L)], hooks_out=hooks_out,
                                      d_in=D, n_features=F, activation=activation,
                                      k=4 if activation != "jumprelu" else None)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in clt.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in clt.named_buffers():
            if name.startswith("threshold_"):
                b.fill_(0.2)
    run = os.path.join(root, f"{kind}-{activation}")
    os.makedirs(run)
    with open(os.path.join(run, "cfg.json"), "w") as f:
        json.dump({"format_version": 1, "name": os.path.basename(run), "sae": clt.cfg.to_dict(),
                   "model": {"name": "models/tiny-llama"}}, f)
    save_crosslayer(clt, os.path.join(run, "sae.safetensors"))
    return run, clt


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
def test_a_clt_exports_in_circuit_tracers_layout_and_computes_the_same(tmp_path, activation):
    L = 3
    run, clt = make_clt_run(tmp_path, activation, L=L)
    subprocess.run([sys.executable, "-m", "saecache", "export", run, "--to", "circuit-tracer", "--out",
                    str(tmp_path / "out")], check=True, capture_output=True)
    cfg = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert cfg == {"model_kind": "cross_layer_transcoder", "model_name": "models/tiny-llama",
                   "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out", "scan": "out"}
    enc = [load_file(str(tmp_path / "out" / f"W_enc_{i}.safetensors")) for i in range(L)]
    dec = [load_file(str(tmp_path / "out" / f"W_dec_{i}.safetensors")) for i in range(L)]
    for i in range(L):
        assert {k: tuple(v.shape) for k, v in enc[i].items()} == {f"W_enc_{i}": (F, D), f"b_enc_{i}": (F,),
                                                                   f"b_dec_{i}": (D,), f"threshold_{i}": (F,)}
        assert {k: tuple(v.shape) for k, v in dec[i].items()} == {f"W_dec_{i}": (F, L - i, D)}
    xs = [torch.randn(20, D, generator=torch.Generator().manual_seed(10 + i)) for i in range(L)]
    # circuit-tracer's CrossLayerTranscoder: features_i = x_i @ W_enc_i.T + b_enc_i, JumpReLU f * (f > threshold_i);
    # layer l = b_dec_l + sum over i <= l of features_i @ W_dec_i[:, l - i]
    feats = []
    for i in range(L):
        z = xs[i] @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"]
        feats.append(z * (z > enc[i][f"threshold_{i}"]))
    with torch.no_grad():
        ours = clt(xs)
    for l in range(L):
        ct = enc[l][f"b_dec_{l}"] + sum(feats[i] @ dec[i][f"W_dec_{i}"][:, l - i] for i in range(l + 1))
        torch.testing.assert_close(ct, ours[l], rtol=1e-5, atol=1e-5)
    assert all(bool((f > 0).any()) for f in feats)


@pytest.mark.parametrize("kind, activation, match", [("clt", "topk", "cannot export a TopK CLT"),
                                                     ("crosscoder", "jumprelu", "cannot export a crosscoder")])
def test_unexportable_cross_layer_dictionaries_are_refused(tmp_path, kind, activation, match):
    run, _ = make_clt_run(tmp_path, activation, kind=kind)
    proc = subprocess.run([sys.executable, "-m", "saecache", "export", run, "--to", "circuit-tracer", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and match in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ the real circuit-tracer (slow)

PROMPT = "def add(a, b):\n    return a +"


@pytest.fixture(scope="session")
def ct_venv() -> Path:
    """The circuit-tracer 0.5.0 virtualenv's python (tests/_venvs.py: its versions apart from ours, since it pins
    transformers<=4.57.3; built once and kept under .venvs/)."""
    return peer_python("circuit-tracer")


def transformers4_model_dir(src: Path, dst: Path) -> Path:
    """`src` (saved by transformers 5) as transformers <= 4.57 reads it: config.json gets rope_theta / rope_scaling
    back from rope_parameters (else 4.57 silently uses its default base), tokenizer_config.json a tokenizer class it
    knows; the weights are linked, not copied."""
    dst.mkdir()
    for name in os.listdir(src):
        if name not in ("config.json", "tokenizer_config.json"):
            os.symlink(src / name, dst / name)
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta"))
    cfg["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    tok = json.loads((src / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=1))
    return dst


@pytest.fixture(scope="module")
def smollm2_plt(tmp_path_factory, tiny_corpus):
    """SmolLM2-135M-Instruct, a store of every layer's mlp_in and mlp_out (2048 tokens), a PLT set trained briefly
    from it (ReLU transcoders of 32 features, one per layer: circuit-tracer's replacement model runs one at every
    layer) and a CLT."""
    from saecache.data.smollm2 import export_smollm2
    from saecache.harvest.config import HarvestConfig
    from saecache.harvest.run import run_harvest
    from saecache.train.config import TrainConfig
    from saecache.train.trainer import run_training

    root = tmp_path_factory.mktemp("ct_smollm2")
    model = export_smollm2(root / "smollm2")
    n_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    hooks = tuple(f"{k}.{i}" for i in range(n_layers) for k in ("mlp_in", "mlp_out"))
    store = root / "store.zarr"
    run_harvest(HarvestConfig(out=str(store), model=str(model), dataset=str(tiny_corpus), hooks=hooks, ctx_len=32,
                              tokens=2048, batch_size=8, device="cpu", seed=0), progress=False)
    saes = [{"arch": "relu", "width": 32, "hook_in": f"mlp_in.{i}", "hook_out": f"mlp_out.{i}", "name": f"plt-{i}"}
            for i in range(n_layers)]
    runs = run_training(TrainConfig.from_dict({"stores": [str(store)], "out": str(root / "runs"), "saes": saes,
                                               "steps": 20, "batch_size": 64, "device": "cpu", "progress": False}))
    return {"root": root, "model": model, "store": store, "runs": runs, "n_layers": n_layers,
            "clt_run": train_clt_briefly(store, n_layers, root / "clt")}


def train_clt_briefly(store_path, n_layers, run_dir) -> str:
    """A JumpReLU CLT over the same hooks (32 features per layer), fitted by a plain loop of 20 Adam steps on the
    store's rows (`saecache train` does not train CLTs yet), saved as a run dir (cfg.json + sae.safetensors)."""
    from saecache.harvest.store import Store
    from saecache.train.crosslayer import CrossLayer, CrossLayerConfig, save_crosslayer

    store = Store.open(str(store_path))
    xs = [store.read_acts_torch(f"mlp_in.{i}", 64, 1024).float() for i in range(n_layers)]
    ts = [store.read_acts_torch(f"mlp_out.{i}", 64, 1024).float() for i in range(n_layers)]
    torch.manual_seed(0)
    clt = CrossLayer(CrossLayerConfig(kind="clt", hooks_in=[f"mlp_in.{i}" for i in range(n_layers)],
                                      hooks_out=[f"mlp_out.{i}" for i in range(n_layers)], d_in=xs[0].shape[1],
                                      n_features=32, activation="jumprelu"))
    clt.init_from_batch(xs, ts)
    opt = torch.optim.Adam(clt.parameters(), lr=1e-3)
    for step in range(20):
        rows = slice(64 * (step % 15), 64 * (step % 15 + 1))
        opt.zero_grad()
        clt.loss([x[rows] for x in xs], [t[rows] for t in ts]).total.backward()
        opt.step()
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "cfg.json"), "w") as f:
        json.dump({"format_version": 1, "name": "clt", "sae": clt.cfg.to_dict(),
                   "model": {"name": store.header["model"]["name"]}}, f)
    save_crosslayer(clt.eval(), os.path.join(run_dir, "sae.safetensors"))
    return str(run_dir)


@pytest.mark.slow
def test_circuit_tracer_loads_the_sets_reproduces_them_and_builds_attribution_graphs(ct_venv, smollm2_plt, tmp_path):
    """A PLT set and a CLT trained on SmolLM2-135M, exported, loaded by circuit-tracer 0.5.0's own loader in its
    venv: every layer's reconstruction equal to ours to 1e-4, and an attribution graph each, on CPU, offline."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saecache.evaluate.circuit_tracer import export
    from saecache.evaluate.replacement import read_run
    from saecache.harvest.store import Store

    s = smollm2_plt
    L = s["n_layers"]
    export(s["runs"], str(tmp_path / "plt"))
    export([s["clt_run"]], str(tmp_path / "clt"))
    store, tensors = Store.open(str(s["store"])), {}
    with torch.no_grad():
        xs = [store.read_acts_torch(f"mlp_in.{i}", 0, 64).float() for i in range(L)]
        for i, run in enumerate(sorted(s["runs"], key=lambda r: int(r.rsplit("-", 1)[1]))):
            sae, cfg = read_run(run)
            assert cfg["hooks"] == {"in": f"mlp_in.{i}", "out": f"mlp_out.{i}"}
            tensors[f"x_{i}"], tensors[f"plt_y_{i}"] = xs[i], sae(xs[i])
        clt, _ = read_run(s["clt_run"])
        for i, y in enumerate(clt(xs)):
            tensors[f"clt_y_{i}"] = y
        tok = AutoTokenizer.from_pretrained(str(s["model"]))
        ids = torch.tensor([tok.bos_token_id, *tok(PROMPT, add_special_tokens=False)["input_ids"]])
        model = AutoModelForCausalLM.from_pretrained(str(s["model"]), dtype=torch.float32).eval()
        tensors["ids"], tensors["logits"] = ids, model(input_ids=ids[None]).logits[0]
        del model
    for slug in ("plt", "clt"):  # reconstructions that vary with the input: features fire
        assert all(bool((tensors[f"{slug}_y_{i}"] != tensors[f"{slug}_y_{i}"][0]).any()) for i in range(L)), slug
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "inputs.safetensors"))
    args = {"sets": {"plt": str(tmp_path / "plt"), "clt": str(tmp_path / "clt")},
            "inputs": str(tmp_path / "inputs.safetensors"),
            "model": str(transformers4_model_dir(s["model"], tmp_path / "model4")),
            "graph_dir": str(tmp_path / "graph")}
    (tmp_path / "args.json").write_text(json.dumps(args))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([str(ct_venv), str(Path(__file__).with_name("ct_roundtrip.py")), str(tmp_path / "args.json")],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(res))  # the figures (pytest -s): reconstruction errors, load and attribution seconds
    assert res["logit_err"] < 1e-3  # its transformers reads the model directory as the same model
    kinds = {"plt": "transcoder_set", "clt": "cross_layer_transcoder"}
    for slug, r in ((k, res[k]) for k in kinds):
        assert r["n_layers"] == L == 30
        assert r["config"] == {"model_kind": kinds[slug], "feature_input_hook": "mlp.hook_in",
                               "feature_output_hook": "mlp.hook_out"}
        assert max(r["recon_err"]) <= 1e-4, (slug, r["recon_err"])  # |ct - ours| / (1 + |ours|), every layer
        assert r["n_active_features"] > 0 and r["n_selected_features"] > 0
        graph = json.loads((tmp_path / "graph" / f"{slug}.json").read_text())
        assert graph["nodes"] and graph["links"] and graph["metadata"]["slug"] == slug
        assert (tmp_path / "graph" / f"{slug}.pt").is_file()
    assert (tmp_path / "graph" / "graph-metadata.json").is_file()
