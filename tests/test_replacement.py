"""Replacement-model evaluation: every MLP replaced at once by a per-layer transcoder set, in both input modes.

On a small GPT-NeoX whose MLPs use ReLU, a ReLU transcoder holding a layer's own MLP weights reproduces it exactly,
so the replaced model IS the clean model: CE equal, KL 0, 100 % recovered, FVE 1, no error, and L0 = the MLP's
active hidden units. Zero transcoders give the zero-ablation loss. Noisy transcoders are checked against forwards
with the MLP modules swapped by hand (no hooks): the clean-input mode equals MLPs that return the prediction made
from the clean run's input; the replaced-input mode equals MLPs that return the prediction from their own input."""

import json
import shutil

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from saecache.evaluate import metrics as M
from saecache.evaluate.replacement import TranscoderSet, replacement_losses
from saecache.evaluate.splice import splice_losses
from saecache.harvest.hooks import HookPoint
from saecache.train.sae import SAE, SAEConfig

D, H, V, T, L = 32, 64, 97, 12, 3


def clean_record(model, ids, modules: list, output: bool) -> dict:
    """Each module's input (``output`` False) or output in a clean forward of `ids`, by its index in ``modules``."""
    seen = {}
    handles = [m.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.detach())) if output else
               m.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach()))
               for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def clean_mlp_inputs(model, ids, L: int) -> dict:
    """Every MLP's input in a clean forward of `ids`, by layer."""
    return clean_record(model, ids, [model.gpt_neox.layers[i].mlp for i in range(L)], output=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=H,
                        max_position_embeddings=64, hidden_act="relu")
    return GPTNeoXForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V, (6, T), generator=torch.Generator().manual_seed(1))


def hooks(layer):
    mod = f"gpt_neox.layers.{layer}.mlp"
    return (HookPoint(name=f"mlp_in.{layer}", module=mod, io="input", d=D, order=0),
            HookPoint(name=f"mlp_out.{layer}", module=mod, io="output", d=D, order=0))


def transcoder_of(mlp, noise=0.0, seed=0, zero=False) -> SAE:
    """A ReLU transcoder with the MLP's own weights (plus Gaussian noise of std `noise`; zero decoder with `zero`)."""
    sae = SAE(SAEConfig(arch="relu", d_in=D, width=H, transcoder=True)).eval()
    g = torch.Generator().manual_seed(seed)
    W1, b1 = mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias  # [H, D], [H]
    W2, b2 = mlp.dense_4h_to_h.weight, mlp.dense_4h_to_h.bias  # [D, H], [D]
    with torch.no_grad():
        sae.W_enc_DF.copy_(W1.t() + noise * torch.randn(D, H, generator=g))
        sae.b_enc_F.copy_(b1)
        sae.b_in_D.zero_()
        sae.W_dec_FD.copy_(0 * W2.t() if zero else W2.t() + noise * torch.randn(H, D, generator=g))
        sae.b_dec_D.copy_(0 * b2 if zero else b2)
    return sae


def plt_set(model, layers=range(L), **kw) -> TranscoderSet:
    saes = [transcoder_of(model.gpt_neox.layers[i].mlp, seed=i, **kw) for i in layers]
    return TranscoderSet(saes, [hooks(i)[0] for i in layers], [hooks(i)[1] for i in layers], [str(i) for i in layers])


def means(rep):
    return {l: torch.full((D,), 0.1 * (l + 1)) for l in range(len(rep))}


@torch.no_grad()
def ce_of(model, ids, p0):
    logits = model(input_ids=ids).logits
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[:, p0:] = True
    s, n = M.next_token_ce(logits, ids, mask)
    return s / n


class Swapped(torch.nn.Module):
    """Stands in for an MLP: returns new(input) at positions >= p0, the MLP's own output elsewhere."""

    def __init__(self, mlp, new, p0):
        super().__init__()
        self.mlp, self.new, self.p0 = mlp, new, p0

    def forward(self, x):
        out = self.mlp(x).clone()
        out[:, self.p0:] = self.new(x)[:, self.p0:]
        return out


@torch.no_grad()
def manual_ce(model, ids, p0, news):
    """CE with each layer's MLP swapped (layer -> fn(input_BTD) giving its output); no hooks involved."""
    layers = model.gpt_neox.layers
    originals = {i: layers[i].mlp for i in news}
    try:
        for i, fn in news.items():
            layers[i].mlp = Swapped(originals[i], fn, p0)
        return ce_of(model, ids, p0)
    finally:
        for i, m in originals.items():
            layers[i].mlp = m


@pytest.mark.parametrize("p0", [0, 1])
def test_the_models_own_mlps_as_transcoders_replace_it_exactly(model, ids, p0):
    rep = plt_set(model)
    res = replacement_losses(model, ids, rep, list(range(L)), means(rep), first_position=p0, batch_size=4)
    # the MLPs' hidden activations, independently of the evaluation
    acts = clean_record(model, ids, [model.gpt_neox.layers[i].mlp.act for i in range(L)], output=True)
    for mode in ("clean", "replaced"):
        r = res[mode]
        assert r.losses.spliced == pytest.approx(r.losses.clean, abs=1e-5)
        assert abs(r.losses.kl) < 1e-5
        assert r.losses.recovered_zero == pytest.approx(1.0, abs=1e-4)
        assert r.losses.recovered_mean == pytest.approx(1.0, abs=1e-4)
        assert r.losses.zero > r.losses.clean and r.losses.n_contexts == 6
        for i, layer in enumerate(r.layers):
            assert layer["fve"] == pytest.approx(1.0, abs=1e-5) and layer["rel_error"] < 1e-5
            assert layer["n_rows"] == 6 * (T - p0)
            assert layer["l0"] == pytest.approx(float((acts[i][:, p0:] > 0).sum()) / (6 * (T - p0)))


def test_zero_transcoders_give_the_zero_ablation_loss_and_a_full_error(model, ids):
    rep = plt_set(model, zero=True)
    res = replacement_losses(model, ids, rep, list(range(L)), means(rep), batch_size=4)
    for r in res.values():
        assert r.losses.spliced == pytest.approx(r.losses.zero, abs=1e-6)
        assert r.losses.recovered_zero == pytest.approx(0.0, abs=1e-6)
        assert all(layer["rel_error"] == pytest.approx(1.0, abs=1e-6) for layer in r.layers)


def test_each_mode_equals_the_mlps_swapped_by_hand(model, ids):
    p0 = 1
    rep = plt_set(model, noise=0.005)
    res = replacement_losses(model, ids, rep, list(range(L)), means(rep), first_position=p0, batch_size=4)
    clean_in = clean_mlp_inputs(model, ids, L)  # every MLP's input in the clean run

    def pred(i, x):
        return rep.saes[i](x.reshape(-1, D)).reshape(x.shape)

    replaced_own = manual_ce(model, ids, p0, {i: (lambda x, i=i: pred(i, x)) for i in range(L)})
    replaced_clean = manual_ce(model, ids, p0, {i: (lambda x, i=i: pred(i, clean_in[i])) for i in range(L)})
    assert res["replaced"].losses.spliced == pytest.approx(replaced_own, abs=1e-5)
    assert res["clean"].losses.spliced == pytest.approx(replaced_clean, abs=1e-5)
    assert abs(replaced_own - replaced_clean) > 1e-4  # the modes differ: errors compound through the layers
    zero = manual_ce(model, ids, p0, {i: torch.zeros_like for i in range(L)})
    assert res["clean"].losses.zero == pytest.approx(zero, abs=1e-5)
    assert res["clean"].losses.clean == pytest.approx(ce_of(model, ids, p0), abs=1e-5)
    for mode in ("clean", "replaced"):
        assert res[mode].losses.kl > 0 and 0 < res[mode].losses.recovered_zero < 1
        assert all(0 < layer["rel_error"] < 1 for layer in res[mode].layers)
    # the first layer reads the same (clean) input in both modes; deeper layers do not
    assert res["clean"].layers[0]["fve"] == pytest.approx(res["replaced"].layers[0]["fve"], abs=1e-9)
    assert res["clean"].layers[2]["fve"] != pytest.approx(res["replaced"].layers[2]["fve"], abs=1e-9)


@pytest.mark.parametrize("layer", [0, 2])
def test_one_layer_alone_agrees_across_modes_and_with_evaluates_splice(model, ids, layer):
    rep = plt_set(model, noise=0.005)
    res = replacement_losses(model, ids, rep, [layer], means(rep), first_position=1, batch_size=4)
    h_in, h_out = hooks(layer)
    ref = splice_losses(model, ids, h_out, rep.saes[layer].forward, means(rep)[layer], hook_in=h_in,
                        first_position=1, batch_size=4)
    for mode in ("clean", "replaced"):
        got = res[mode].losses
        assert got.spliced == pytest.approx(ref.spliced, abs=1e-6) and got.kl == pytest.approx(ref.kl, abs=1e-6)
        assert got.zero == pytest.approx(ref.zero, abs=1e-6) and got.mean == pytest.approx(ref.mean, abs=1e-6)
    assert res["clean"].layers[0]["fve"] == pytest.approx(res["replaced"].layers[0]["fve"], abs=1e-9)


# ----------------------------------------------------------------------------------- `saecache replacement` on run dirs


@pytest.fixture(scope="module")
def plt_runs(tmp_path_factory, tiny_model_dir, tiny_corpus):
    """A store of the tiny demo-size model's two MLPs (input and output) and a ReLU PLT set trained briefly on it."""
    from _store import harvest_tiny

    from saecache.train.config import TrainConfig
    from saecache.train.trainer import run_training

    root = tmp_path_factory.mktemp("plt")
    store = harvest_tiny(root / "store.zarr", tiny_model_dir, tiny_corpus,
                         hooks=("mlp_in.0", "mlp_out.0", "mlp_in.1", "mlp_out.1"))
    saes = [{"arch": "relu", "width": 128, "hook_in": f"mlp_in.{i}", "hook_out": f"mlp_out.{i}", "name": f"plt-{i}"}
            for i in (1, 0)]
    runs = run_training(TrainConfig.from_dict({"stores": [str(store)], "out": str(root / "runs"), "saes": saes,
                                               "steps": 40, "batch_size": 64, "heldout_fraction": 0.05,
                                               "device": "cpu", "progress": False}))
    return root, str(store), runs


def test_the_command_reports_both_modes_and_each_layer_alone_as_evaluate_splices_it(plt_runs, capsys):
    from saecache.cli import main

    root, store, runs = plt_runs
    out = root / "rep"
    main(["replacement", *runs, "--store", store, "--out", str(out), "--device", "cpu", "--n-contexts", "6"])
    main(["replacement", *runs, "--store", store, "--out", str(root / "all"), "--device", "cpu", "--n-contexts",
          "64", "--inputs", "clean", "--no-per-layer"])  # every held-out context: the rows evaluate reads
    printed = capsys.readouterr().out
    rep = json.loads((out / "replacement.json").read_text())
    assert (out / "replacement.md").read_text() in printed
    assert [layer["hook_out"] for layer in rep["layers"]] == ["mlp_out.0", "mlp_out.1"]  # model order
    assert set(rep["modes"]) == {"clean", "replaced"}
    for m in rep["modes"].values():
        assert m["ce_zero"] != m["ce_clean"] and m["n_contexts"] == 6 and m["kl"] > 0  # a random-init model
        assert len(m["layers"]) == 2 and all(s["rel_error"] > 0 and s["l0"] > 0 for s in m["layers"])
    assert rep["modes"]["clean"]["layers"][0] == rep["modes"]["replaced"]["layers"][0]  # layer 0 reads the same
    main(["evaluate", *runs, "--store", store, "--out", str(root / "eval"), "--device", "cpu", "--n-contexts", "6",
          "--no-histograms", "--html-features", "0", "--prune-curve", "", "--no-frontier"])
    rows = {r["hook_out"]: r for r in json.loads((root / "eval" / "report.json").read_text())["rows"]}
    for layer in rep["layers"]:
        ev = rows[layer["hook_out"]]
        assert layer["alone"]["ce_spliced"] == pytest.approx(ev["ce_spliced"], abs=1e-6)
        assert layer["alone"]["ce_clean"] == pytest.approx(ev["ce_clean"], abs=1e-6)
        assert layer["alone"]["kl"] == pytest.approx(ev["kl"], abs=1e-6)
    # with clean inputs, each layer's statistics over every held-out row are evaluate's (read from the fp16 store)
    every = json.loads((root / "all" / "replacement.json").read_text())
    assert set(every["modes"]) == {"clean"} and "alone" not in every["layers"][0]
    for layer, s in zip(every["layers"], every["modes"]["clean"]["layers"]):
        ev = rows[layer["hook_out"]]
        assert s["n_rows"] == ev["n_rows"]
        assert s["fve"] == pytest.approx(ev["fve"], abs=2e-3) and s["l0"] == pytest.approx(ev["l0"], rel=1e-2)


def test_replacement_keeps_bos_clean_for_runs_that_left_it_out_as_evaluate_does(plt_runs, tmp_path):
    """The PLT set was trained with BOS rows left out (train's default): the replacement splices every layer from
    position 1 on (the BOS position keeps the model's own activations, its prediction not counted), and says so;
    --splice-bos replaces and counts every position, as before. Each layer alone equals evaluate's splice either way."""
    from saecache.cli import main

    root, store, runs = plt_runs
    T = 32  # the tiny store's ctx_len, with position 0 stored
    reports, evals = {}, {}
    for name, flag in (("clean", []), ("every", ["--splice-bos"])):
        main(["replacement", *runs, "--store", store, "--out", str(tmp_path / name), "--device", "cpu", "--n-contexts",
              "4", "--inputs", "clean", *flag])
        main(["evaluate", *runs, "--store", store, "--out", str(tmp_path / f"ev-{name}"), "--device", "cpu",
              "--n-contexts", "4", "--no-histograms", "--html-features", "0", "--prune-curve", "", "--no-frontier",
              *flag])
        reports[name] = json.loads((tmp_path / name / "replacement.json").read_text())
        evals[name] = {r["hook_out"]: r for r in json.loads((tmp_path / f"ev-{name}" / "report.json").read_text())
                       ["rows"]}
    clean, every = reports["clean"], reports["every"]
    assert (clean["bos"], clean["first_position"], every["bos"], every["first_position"]) == ("clean", 1, "replaced", 0)
    assert clean["modes"]["clean"]["n_predictions"] == 4 * (T - 2)
    assert every["modes"]["clean"]["n_predictions"] == 4 * (T - 1)
    assert clean["modes"]["clean"]["ce_spliced"] != every["modes"]["clean"]["ce_spliced"]
    for name, rep in reports.items():
        for layer in rep["layers"]:
            ev = evals[name][layer["hook_out"]]
            assert layer["alone"]["ce_spliced"] == pytest.approx(ev["ce_spliced"], abs=1e-6)
            assert layer["alone"]["n_predictions"] == ev["n_predictions"]
    assert "keeps the model's own activation" in (tmp_path / "clean" / "replacement.md").read_text()
    assert "BOS included, is replaced" in (tmp_path / "every" / "replacement.md").read_text()


def test_an_sae_in_place_of_a_transcoder_is_refused_in_one_line(plt_runs, tmp_path, capsys):
    from saecache.cli import main

    root, store, runs = plt_runs
    sae_run = tmp_path / "sae-run"
    shutil.copytree(runs[0], sae_run)
    cfg = json.loads((sae_run / "cfg.json").read_text())
    cfg["hooks"]["out"] = cfg["hooks"]["in"]
    (sae_run / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as e:
        main(["replacement", str(sae_run), "--store", store, "--out", str(tmp_path / "rep"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "reconstructs its own input" in err[0]
    assert not (tmp_path / "rep").exists()


# ------------------------------------------------------------------------------------- a cross-layer transcoder


def clt_of(model, off_diagonal=0.0, seed=0):
    """A JumpReLU CLT (threshold 0: ReLU) over mlp_in.l -> mlp_out.l whose source l encodes with MLP l's first layer
    and decodes into layer l with its second layer; decoders into later layers are `off_diagonal`-scaled noise."""
    from saecache.train.crosslayer import CrossLayer, CrossLayerConfig

    clt = CrossLayer(CrossLayerConfig(kind="clt", hooks_in=[f"mlp_in.{i}" for i in range(L)],
                                      hooks_out=[f"mlp_out.{i}" for i in range(L)], d_in=D, n_features=H,
                                      activation="jumprelu")).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in range(L):
            mlp = model.gpt_neox.layers[s].mlp
            getattr(clt, f"W_enc_{s}").copy_(mlp.dense_h_to_4h.weight)
            getattr(clt, f"b_enc_{s}").copy_(mlp.dense_h_to_4h.bias)
            getattr(clt, f"threshold_{s}").zero_()
            W = off_diagonal * torch.randn(H, L - s, D, generator=g)
            W[:, 0] = mlp.dense_4h_to_h.weight.t()
            getattr(clt, f"W_dec_{s}").copy_(W.reshape(H, -1))
            clt.b_dec_LD[s].copy_(mlp.dense_4h_to_h.bias)
    return clt


def clt_replacement(clt):
    from saecache.evaluate.replacement import CrossLayerReplacement

    return CrossLayerReplacement(clt, [hooks(i)[0] for i in range(L)], [hooks(i)[1] for i in range(L)],
                                 [str(i) for i in range(L)])


def test_a_clt_with_the_mlps_on_its_diagonal_replaces_the_model_exactly(model, ids):
    rep = clt_replacement(clt_of(model))
    res = replacement_losses(model, ids, rep, list(range(L)), means(rep), first_position=1, batch_size=4)
    for r in res.values():
        assert r.losses.spliced == pytest.approx(r.losses.clean, abs=1e-5) and abs(r.losses.kl) < 1e-5
        assert all(layer["rel_error"] < 1e-5 for layer in r.layers)


def test_a_clts_layer_sums_every_earlier_source_in_both_modes(model, ids):
    p0 = 1
    clt = clt_of(model, off_diagonal=0.01, seed=3)
    rep = clt_replacement(clt)
    res = replacement_losses(model, ids, rep, list(range(L)), means(rep), first_position=p0, batch_size=4)

    def pred(l, xs):  # ŷ_l = b_dec_l + sum over s <= l of relu(x_s W_enc_s^T + b_enc_s) W_dec_s[:, l - s]
        y = clt.b_dec_LD[l].clone()
        for s in range(l + 1):
            f = torch.relu(xs[s] @ getattr(clt, f"W_enc_{s}").t() + getattr(clt, f"b_enc_{s}"))
            y = y + f @ getattr(clt, f"W_dec_{s}").view(H, L - s, D)[:, l - s]
        return y

    clean_in = clean_mlp_inputs(model, ids, L)
    own_in = {}

    def own(l):
        def fn(x):
            own_in[l] = x
            return pred(l, own_in)
        return fn

    with torch.no_grad():
        replaced_own = manual_ce(model, ids, p0, {i: own(i) for i in range(L)})
        replaced_clean = manual_ce(model, ids, p0, {i: (lambda x, i=i: pred(i, clean_in)) for i in range(L)})
    assert res["replaced"].losses.spliced == pytest.approx(replaced_own, abs=1e-5)
    assert res["clean"].losses.spliced == pytest.approx(replaced_clean, abs=1e-5)
    assert abs(res["clean"].losses.spliced - res["clean"].losses.clean) > 1e-4  # the cross-layer terms count


def test_the_command_takes_a_clt_run_dir(plt_runs, tmp_path):
    from saecache.cli import main
    from saecache.train.crosslayer import CrossLayer, CrossLayerConfig, save_crosslayer

    root, store, runs = plt_runs
    torch.manual_seed(0)
    clt = CrossLayer(CrossLayerConfig(kind="clt", hooks_in=["mlp_in.0", "mlp_in.1"],
                                      hooks_out=["mlp_out.0", "mlp_out.1"], d_in=64, n_features=32,
                                      activation="jumprelu")).eval()
    run = tmp_path / "clt"
    run.mkdir()
    (run / "cfg.json").write_text(json.dumps({"format_version": 1, "name": "clt", "sae": clt.cfg.to_dict()}))
    save_crosslayer(clt, run / "sae.safetensors")
    main(["replacement", str(run), "--store", store, "--out", str(tmp_path / "rep"), "--device", "cpu",
          "--n-contexts", "4"])
    rep = json.loads((tmp_path / "rep" / "replacement.json").read_text())
    assert [layer["hook_out"] for layer in rep["layers"]] == ["mlp_out.0", "mlp_out.1"]
    assert [layer["width"] for layer in rep["layers"]] == [32, 32]
    clean, replaced = rep["modes"]["clean"], rep["modes"]["replaced"]
    assert clean["layers"][0] == replaced["layers"][0] and clean["ce_spliced"] != replaced["ce_spliced"]
    assert rep["layers"][0]["alone"]["ce_spliced"] != rep["layers"][1]["alone"]["ce_spliced"]
