"""dictionary_learning import, dictionary_learning / SAELens export: round trips keep weights and outputs, exported
files hold exactly the documented keys, shapes and config fields, and bad input gets one-line errors.

The reference forwards below are written from the two libraries' documented formulas, independently of formats.py."""

import json

import pytest
import torch
from safetensors.torch import load_file

from saecache.errors import RunDirError
from saecache.evaluate import formats as FM
from saecache.evaluate import saelens as SL

D, F, K = 8, 24, 3


def rnd(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dl_state(cls):
    """A dictionary_learning-style state dict (plain tensors) for `cls`, with DL's own key names and layouts."""
    if cls == "AutoEncoder":
        return {"bias": rnd(D, seed=1), "encoder.weight": rnd(F, D, seed=2), "encoder.bias": rnd(F, seed=3) * 0.1,
                "decoder.weight": rnd(D, F, seed=4)}
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {"encoder.weight": rnd(F, D, seed=2), "encoder.bias": rnd(F, seed=3) * 0.1,
                "decoder.weight": rnd(D, F, seed=4), "b_dec": rnd(D, seed=1),
                "k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.4)}
    if cls == "JumpReluAutoEncoder":
        return {"W_enc": rnd(D, F, seed=2), "b_enc": rnd(F, seed=3) * 0.1, "W_dec": rnd(F, D, seed=4),
                "b_dec": rnd(D, seed=1), "threshold": rnd(F, seed=5).abs() * 0.5}
    if cls == "GatedAutoEncoder":
        return {"encoder.weight": rnd(F, D, seed=2), "decoder.weight": rnd(D, F, seed=4), "decoder_bias": rnd(D, seed=1),
                "r_mag": rnd(F, seed=6) * 0.2, "gate_bias": rnd(F, seed=7) * 0.1, "mag_bias": rnd(F, seed=8) * 0.1}
    raise AssertionError(cls)


def dl_forward(cls, sd, x):
    """dictionary_learning's inference forward for each class (dictionary.py / trainers, as documented)."""
    relu = torch.relu
    if cls == "AutoEncoder":
        f = relu((x - sd["bias"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
        return f @ sd["decoder.weight"].T + sd["bias"]
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        post = relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
        if cls == "AutoEncoderTopK":
            top = post.topk(int(sd["k"]), dim=-1)
            f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
        else:
            f = post * (post > sd["threshold"])
        return f @ sd["decoder.weight"].T + sd["b_dec"]
    if cls == "JumpReluAutoEncoder":
        pre = x @ sd["W_enc"] + sd["b_enc"]
        return relu(pre * (pre > sd["threshold"])) @ sd["W_dec"] + sd["b_dec"]
    if cls == "GatedAutoEncoder":
        x_enc = (x - sd["decoder_bias"]) @ sd["encoder.weight"].T
        gate = (x_enc + sd["gate_bias"] > 0).float()
        mag = relu(sd["r_mag"].exp() * x_enc + sd["mag_bias"])
        return (gate * mag) @ sd["decoder.weight"].T + sd["decoder_bias"]
    raise AssertionError(cls)


def saelens_forward(cfg, t, x):
    """SAELens inference forward (saes/{standard,topk,jumprelu,gated}_sae.py)."""
    x = x - t["b_dec"] * cfg["apply_b_dec_to_input"]
    arch = cfg["architecture"]
    if arch == "gated":
        gate = (x @ t["W_enc"] + t["b_gate"] > 0).float()
        f = gate * torch.relu(x @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    else:
        pre = x @ t["W_enc"] + t["b_enc"]
        if arch == "standard":
            f = torch.relu(pre)
        elif arch == "topk":
            top = pre.topk(cfg["k"], dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        else:
            f = torch.relu(pre) * (pre > t["threshold"])
    return f @ t["W_dec"] + t["b_dec"]


def write_dl(dirpath, cls, sd=None, trainer_extra=None):
    dirpath.mkdir(parents=True, exist_ok=True)
    sd = dl_state(cls) if sd is None else sd
    torch.save(sd, dirpath / "ae.pt")
    trainer = {"dict_class": cls, "trainer_class": FM.DL_CLASSES[cls][1], "activation_dim": D, "dict_size": F,
               "lm_name": "EleutherAI/pythia-70m-deduped", "layer": 3, "submodule_name": "mlp_out_layer3",
               **(trainer_extra or {})}
    if "TopK" in cls:
        trainer["k"] = K
    (dirpath / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"io": "out", "ctx_len": 128}}))
    return sd


CLASSES = ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder", "GatedAutoEncoder"]
X = rnd(16, D, seed=11)


@pytest.mark.parametrize("cls", CLASSES)
def test_dictionary_learning_round_trip(tmp_path, cls):
    sd = write_dl(tmp_path / "src", cls)
    w = FM.read_dictionary_learning(str(tmp_path / "src"))
    FM.write_dictionary_learning(w, str(tmp_path / "out"))
    back = torch.load(tmp_path / "out" / "ae.pt", weights_only=True)
    assert set(back) == set(sd)
    for key in sd:
        assert back[key].shape == sd[key].shape, key
        torch.testing.assert_close(back[key].float(), sd[key].float(), rtol=0, atol=0)
    torch.testing.assert_close(dl_forward(cls, back, X), dl_forward(cls, sd, X), rtol=0, atol=0)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["trainer"]["dict_class"] == cls and cfg["trainer"]["activation_dim"] == D
    assert cfg["trainer"]["dict_size"] == F and cfg["trainer"]["lm_name"] == "EleutherAI/pythia-70m-deduped"
    if "TopK" in cls:
        assert cfg["trainer"]["k"] == K and back["k"].dtype == torch.int32


SAELENS_KEYS = {"standard": {"W_enc", "b_enc", "W_dec", "b_dec"}, "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
                "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
                "gated": {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}}
SAELENS_SHAPES = {"W_enc": (D, F), "W_dec": (F, D), "b_dec": (D,)}
# the fields SAELens 6 `SAE.save_model` writes (top level; topk adds k and rescale_acts_by_decoder_norm) and the
# provenance keys it reads from `metadata` (LLM_METADATA_KEYS of its loaders)
SAELENS_CFG_FIELDS = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                      "normalize_activations", "reshape_activations", "metadata"}
SAELENS_METADATA = {"sae_lens_version", "sae_lens_training_version", "model_name", "hook_name", "hook_head_index",
                    "context_size", "prepend_bos", "dataset_path", "model_from_pretrained_kwargs", "neuronpedia_id"}


@pytest.mark.parametrize("cls", CLASSES)
def test_saelens_export_keys_shapes_and_outputs(tmp_path, cls):
    sd = write_dl(tmp_path / "src", cls)
    w = FM.read_dictionary_learning(str(tmp_path / "src"))
    SL.write_saelens(w, str(tmp_path / "sl"), meta={"hook_name": "mlp_out.3"})
    t = load_file(tmp_path / "sl" / "sae_weights.safetensors")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    arch = {"AutoEncoder": "standard", "AutoEncoderTopK": "topk", "BatchTopKSAE": "jumprelu",
            "JumpReluAutoEncoder": "jumprelu", "GatedAutoEncoder": "gated"}[cls]
    assert cfg["architecture"] == arch
    assert set(t) == SAELENS_KEYS[arch]
    for key, shape in SAELENS_SHAPES.items():
        assert tuple(t[key].shape) == shape
    assert all(tuple(v.shape) == (F,) for k, v in t.items() if k not in SAELENS_SHAPES)
    assert all(v.dtype == torch.float32 for v in t.values())
    extra = {"k", "rescale_acts_by_decoder_norm"} if arch == "topk" else set()
    assert set(cfg) == SAELENS_CFG_FIELDS | extra and set(cfg["metadata"]) == SAELENS_METADATA
    md = cfg["metadata"]
    assert cfg["d_in"] == D and cfg["d_sae"] == F and cfg["dtype"] == "float32" and md["hook_name"] == "mlp_out.3"
    assert md["model_name"] == "EleutherAI/pythia-70m-deduped" and cfg["normalize_activations"] == "none"
    assert md["sae_lens_version"].split(".")[0] == "6" and md["sae_lens_training_version"] is None
    assert md["context_size"] == 128  # from the dictionary_learning buffer config
    assert cfg["apply_b_dec_to_input"] is (cls != "JumpReluAutoEncoder")
    if arch == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    torch.testing.assert_close(saelens_forward(cfg, t, X), dl_forward(cls, sd, X), rtol=1e-5, atol=1e-5)
    if cls != "BatchTopKSAE":  # (a batchtopk comes back from SAELens as the equivalent jumprelu)
        back = SL.read_saelens(str(tmp_path / "sl"))
        assert back.arch is w.arch and back.k == w.k and back.pre_bias == w.pre_bias
        for name in ("W_enc_DF", "W_dec_FD", "b_dec_D", "b_enc_F"):
            a, b = getattr(back, name), getattr(w, name)
            assert (a is None and b is None) or torch.equal(a, b), name


@pytest.mark.parametrize("cls", ["AutoEncoder", "JumpReluAutoEncoder", "GatedAutoEncoder"])
def test_pre_bias_fold_keeps_the_map(tmp_path, cls):
    sd = write_dl(tmp_path / "src", cls)
    w = FM.read_dictionary_learning(str(tmp_path / "src"))
    flipped = w.with_pre_bias(not w.pre_bias)
    assert flipped.pre_bias != w.pre_bias
    SL.write_saelens(flipped, str(tmp_path / "sl"))
    t = load_file(tmp_path / "sl" / "sae_weights.safetensors")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["apply_b_dec_to_input"] is flipped.pre_bias
    torch.testing.assert_close(saelens_forward(cfg, t, X), dl_forward(cls, sd, X), rtol=1e-5, atol=1e-5)
    # and back to dictionary_learning's own convention: the original biases within float rounding
    FM.write_dictionary_learning(flipped, str(tmp_path / "dl"))
    back = torch.load(tmp_path / "dl" / "ae.pt", weights_only=True)
    for key in sd:
        torch.testing.assert_close(back[key].float(), sd[key].float(), rtol=1e-5, atol=1e-5)


def test_not_a_plain_state_dict_is_one_line_error(tmp_path):
    d = tmp_path / "pickled"
    write_dl(d, "AutoEncoder")
    torch.save(torch.nn.Linear(2, 2), d / "ae.pt")  # a pickled module, not a state dict
    with pytest.raises(RunDirError, match="not a plain state dict") as e:
        FM.read_dictionary_learning(str(d))
    assert "\n" not in str(e.value)
    backup = {"step": 10, "ae": dl_state("AutoEncoder"), "config": {"lr": 1e-3}}
    torch.save(backup, d / "ae.pt")
    with pytest.raises(RunDirError, match="not a plain state dict.*'ae'"):
        FM.read_dictionary_learning(str(d))
    (d / "ae.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(RunDirError, match="not a plain state dict"):
        FM.read_dictionary_learning(str(d))


def test_bad_dictionary_learning_dirs(tmp_path):
    with pytest.raises(RunDirError, match="config.json is missing"):
        FM.read_dictionary_learning(str(tmp_path))
    sd = dl_state("AutoEncoder")
    del sd["bias"]
    write_dl(tmp_path / "a", "AutoEncoder", sd=sd)
    with pytest.raises(RunDirError, match=r"missing \['bias'\]"):
        FM.read_dictionary_learning(str(tmp_path / "a"))
    write_dl(tmp_path / "b", "AutoEncoder", trainer_extra={"dict_class": "CrossCoder"})
    with pytest.raises(RunDirError, match="'CrossCoder' is not supported"):
        FM.read_dictionary_learning(str(tmp_path / "b"))
    write_dl(tmp_path / "c", "AutoEncoder", trainer_extra={"dict_size": F + 1})
    with pytest.raises(RunDirError, match="dict_size"):
        FM.read_dictionary_learning(str(tmp_path / "c"))


def test_unrepresentable_exports_are_refused(tmp_path):
    write_dl(tmp_path / "src", "AutoEncoder")
    w = FM.read_dictionary_learning(str(tmp_path / "src"))
    tc = FM.DictWeights("relu", w.W_enc_DF, rnd(F, D + 2, seed=9), rnd(D + 2, seed=10), w.b_enc_F)
    with pytest.raises(RunDirError, match="transcoder"):
        FM.write_dictionary_learning(tc, str(tmp_path / "x"))
    with pytest.raises(RunDirError, match="transcoder"):  # SAELens holds ReLU/JumpReLU transcoders, not TopK ones
        SL.write_saelens(FM.DictWeights("topk", w.W_enc_DF, tc.W_dec_FD, tc.b_dec_D, w.b_enc_F, k=2, transcoder=True),
                         str(tmp_path / "x"))
    sd = dl_state("BatchTopKSAE")
    sd["threshold"] = torch.tensor(-1.0)  # never set: encode would depend on the batch
    write_dl(tmp_path / "b", "BatchTopKSAE", sd=sd)
    w = FM.read_dictionary_learning(str(tmp_path / "b"))
    for writer in (FM.write_dictionary_learning, SL.write_saelens):
        with pytest.raises(RunDirError, match="no inference threshold"):
            writer(w, str(tmp_path / "y"))
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("cls", CLASSES)
def test_import_into_our_sae_and_back(tmp_path, cls):
    """dictionary_learning -> our SAE: same outputs; -> back to dictionary_learning: same tensors and outputs."""
    sd = write_dl(tmp_path / "src", cls)
    w = FM.read_dictionary_learning(str(tmp_path / "src"))
    sae = FM.to_sae(w).eval()
    with torch.no_grad():
        torch.testing.assert_close(sae(X), dl_forward(cls, sd, X), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(sae.encode(X)), dl_forward(cls, sd, X), rtol=1e-5, atol=1e-5)
    meta = {"dl_threshold": float(sd["threshold"])} if cls == "AutoEncoderTopK" else {}
    FM.write_dictionary_learning(FM.from_sae(sae, meta), str(tmp_path / "out"))
    back = torch.load(tmp_path / "out" / "ae.pt", weights_only=True)
    assert set(back) == set(sd)
    for key in sd:
        torch.testing.assert_close(back[key].float(), sd[key].float(), rtol=0, atol=0)
    sae2 = FM.to_sae(FM.read_dictionary_learning(str(tmp_path / "out")))
    for (k1, v1), (k2, v2) in zip(sae.state_dict().items(), sae2.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_our_transcoder_is_refused_on_export():
    from saecache.train.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(arch="relu", d_in=D, width=F, d_out=D, transcoder=True))
    with pytest.raises(RunDirError, match="transcoder"):
        FM.write_dictionary_learning(FM.from_sae(sae), "unused")
    topk = SAE(SAEConfig(arch="topk", d_in=D, width=F, d_out=D, transcoder=True, k=2))
    with pytest.raises(RunDirError, match="topk transcoder to SAELens"):  # ReLU/JumpReLU ones go to SAELens
        SL.write_saelens(FM.from_sae(topk), "unused")
