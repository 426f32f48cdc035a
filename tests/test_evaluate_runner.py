"""`run_evaluation` on the tiny store with dictionaries whose answers are known without our code:

- an identity "SAE" (dictionary_learning AutoEncoder with encoder [I; -I], decoder [I, -I]: relu(x) - relu(-x) = x)
  gives exactly the clean loss (100 % recovered, KL 0, MSE 0) and a zero SAE exactly the zero-ablation loss (0 %);
- the runner's clean / spliced / zero / mean-ablated losses equal a manual forward of the model loaded with plain
  transformers in which layer 0's MLP module is swapped for one returning the replacement (SAE and transcoder-style
  mlp_in -> mlp_out), on contexts and means read straight from the zarr store;
- errors for a store of other hooks and for a model that is not the store's.

Dictionaries are written in dictionary_learning's format and imported, so these also cover import -> evaluate.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
import zarr

from saecache.errors import ModelError, RunDirError
from saecache.evaluate.config import EvalConfig
from saecache.evaluate.convert import import_run
from saecache.evaluate.runner import run_evaluation
from saecache.harvest.store import Store

D, N_CTX = 64, 6


def dl_dir(path, enc_FD, dec_DF, bias_D=None):
    """A dictionary_learning AutoEncoder save dir (ae.pt + config.json)."""
    F = enc_FD.shape[0]
    path.mkdir(parents=True)
    torch.save({"encoder.weight": enc_FD, "encoder.bias": torch.zeros(F), "decoder.weight": dec_DF,
                "bias": torch.zeros(D) if bias_D is None else bias_D}, path / "ae.pt")
    (path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "activation_dim": D,
                                                              "dict_size": F}}))
    return path


def evaluate(run_dirs, store, out, **kw):
    cfg = EvalConfig(run_dirs=[str(r) for r in run_dirs], store=str(store), out=str(out), n_contexts=N_CTX,
                     device="cpu", threads=1, histograms=False, html_features=0, **kw)
    return run_evaluation(cfg)


@pytest.fixture(scope="module")
def identity_and_zero(tiny_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("known")
    eye = torch.eye(D)
    enc = torch.cat([eye, -eye])  # [2D, D]: f = [relu(x), relu(-x)]
    ident = dl_dir(tmp / "dl_identity", enc, torch.cat([eye, -eye], 1))  # x_hat = relu(x) - relu(-x) = x
    zero = dl_dir(tmp / "dl_zero", enc, torch.zeros(D, 2 * D))
    runs = []
    for src in (ident, zero):
        runs.append(import_run(str(src), str(tmp / src.name[3:]), "mlp_out.0", store_url=str(tiny_store)))
    rows = evaluate(runs, tiny_store, tmp / "eval")
    return {r["run"]: r for r in rows}


def store_arrays(store_path):
    g = zarr.open_group(str(store_path), mode="r")
    return g, Store.open(str(store_path)).final


def test_identity_sae_gives_the_clean_loss_and_zero_sae_the_zero_ablation_loss(identity_and_zero, tiny_store):
    ident, zero = identity_and_zero["identity"], identity_and_zero["zero"]
    assert ident["ce_spliced"] == ident["ce_clean"]
    assert ident["recovered_zero"] == 1.0 and ident["recovered_mean"] == 1.0 and ident["kl"] == 0.0
    assert zero["ce_spliced"] == zero["ce_zero"] and zero["recovered_zero"] == 0.0 and zero["kl"] > 0
    assert zero["ce_zero"] != zero["ce_clean"] and zero["ce_clean"] == ident["ce_clean"]  # (random-init model)
    # reconstruction statistics over every row (imported: none of the store was trained on), from zarr directly
    g, _ = store_arrays(tiny_store)
    x = torch.from_numpy(np.asarray(g["acts/mlp_out.0"][:]).astype(np.float32))
    assert ident["n_rows"] == zero["n_rows"] == x.shape[0] == 256 * 32
    assert ident["mse"] == 0.0 and ident["fve"] == pytest.approx(1.0, abs=1e-12)
    assert ident["cos"] == pytest.approx(1.0, abs=1e-9) and ident["l2_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert zero["mse"] == pytest.approx(float(x.double().pow(2).mean()), rel=1e-9)
    nonzero = (x != 0).sum(1).double()  # f = [relu(x), relu(-x)] has one nonzero per nonzero entry of x
    assert ident["l0"] == zero["l0"] == pytest.approx(float(nonzero.mean()), rel=1e-12)
    assert ident["l1"] == pytest.approx(float(x.double().abs().sum(1).mean()), rel=1e-9)
    # frac_alive: feature d fires when some x[:, d] > 0, feature D + d when some x[:, d] < 0
    alive = torch.cat([(x > 0).any(0), (x < 0).any(0)]).double().mean()
    assert ident["frac_alive"] == pytest.approx(float(alive))


class Swapped(torch.nn.Module):
    """Stands in for an MLP: returns new(input, original output)."""

    def __init__(self, mlp, new):
        super().__init__()
        self.mlp, self.new = mlp, new

    def forward(self, x):
        return self.new(x, self.mlp(x))


def swapped_logits(model, ids, new=None):
    """The model's logits with layer 0's MLP output replaced by new(input, output) (None: the clean model)."""
    layer = model.gpt_neox.layers[0]
    original = layer.mlp
    if new is not None:
        layer.mlp = Swapped(original, new)
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        layer.mlp = original


def manual_ce(model, ids, new=None):
    """Mean next-token CE over every position (the tiny store keeps position 0) with layer 0's MLP swapped."""
    logits = swapped_logits(model, ids, new)
    V = logits.shape[-1]
    return float(Fn.cross_entropy(logits[:, :-1].reshape(-1, V).double(), ids[:, 1:].reshape(-1)))


def test_runner_losses_equal_a_manual_module_swap(tiny_store, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    F = 96
    enc, dec, b = torch.randn(F, D, generator=g) * 0.2, torch.randn(D, F, generator=g) * 0.05, torch.randn(D) * 0.01
    src = dl_dir(tmp_path / "dl", enc, dec, b)
    sae_run = import_run(str(src), str(tmp_path / "sae"), "mlp_out.0", store_url=str(tiny_store))
    tc_run = import_run(str(src), str(tmp_path / "tc"), "mlp_in.0", hook_out="mlp_out.0", store_url=str(tiny_store))
    rows = {r["run"]: r for r in evaluate([sae_run, tc_run], tiny_store, tmp_path / "eval")}

    def dictionary(x_BTD):  # dictionary_learning's AutoEncoder forward, written out
        return torch.relu((x_BTD - b) @ enc.T) @ dec.T + b

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    grp, final = store_arrays(tiny_store)
    ids = torch.from_numpy(np.asarray(grp["contexts"][:N_CTX]).astype(np.int64))  # imported: held out from context 0
    mean = torch.tensor(final["stats"]["mlp_out.0"]["mean"], dtype=torch.float32)
    clean = manual_ce(model, ids)
    for run, new in (("sae", lambda x, y: dictionary(y)), ("tc", lambda x, y: dictionary(x))):
        r = rows[run]
        assert r["n_contexts"] == N_CTX and r["n_predictions"] == N_CTX * (ids.shape[1] - 1)
        assert r["ce_clean"] == pytest.approx(clean, rel=1e-6)
        assert r["ce_spliced"] == pytest.approx(manual_ce(model, ids, new), rel=1e-6)
        assert r["ce_zero"] == pytest.approx(manual_ce(model, ids, lambda x, y: torch.zeros_like(y)), rel=1e-6)
        assert r["ce_mean"] == pytest.approx(manual_ce(model, ids, lambda x, y: mean.expand_as(y)), rel=1e-6)
    assert rows["sae"]["ce_spliced"] != pytest.approx(rows["tc"]["ce_spliced"], rel=1e-6)


def manual_ce_after_bos(model, ids, new):
    """Mean next-token CE of the predictions made at positions 1..T-2, with layer 0's MLP output replaced by
    new(input, output) at positions >= 1 only: the BOS position keeps the model's own output."""
    def keep_bos(x, y):
        out = y.clone()
        out[:, 1:] = new(x, y)[:, 1:]
        return out

    logits = swapped_logits(model, ids, keep_bos)
    V = logits.shape[-1]
    return float(Fn.cross_entropy(logits[:, 1:-1].reshape(-1, V).double(), ids[:, 2:].reshape(-1)))


@pytest.fixture(scope="module")
def bos_free_run(tiny_store, tmp_path_factory):
    """A real run trained on tiny_store with saecache train's defaults: BOS rows left out, 10 % held out."""
    from saecache.train.config import TrainConfig
    from saecache.train.trainer import run_training

    torch.set_num_threads(1)
    (run,) = run_training(TrainConfig(stores=[str(tiny_store)], out=str(tmp_path_factory.mktemp("bosrun")), steps=3,
                                      batch_size=64, heldout_fraction=0.1, progress=False,
                                      saes=[{"arch": "topk", "hook_in": "mlp_out.0", "width": 32, "k": 4}]))
    return run


def test_a_run_that_left_bos_out_is_spliced_with_bos_kept_clean(bos_free_run, tiny_store, tiny_model_dir, tmp_path):
    """The run never saw a BOS row, so evaluation follows that rule: its spliced / zero / mean losses equal a hand-built
    forward in which only the non-BOS positions are replaced (the prediction made at BOS not counted), and the
    statistics leave the BOS rows out. `splice_bos` gives the old figures: every position replaced and counted, every
    held-out row in the statistics. The report (md, json, html) says which rule ran."""
    from transformers import AutoModelForCausalLM

    from saecache.harvest.split import heldout_cutoff
    from saecache.train.rundir import load_run

    (row,) = evaluate([bos_free_run], tiny_store, tmp_path / "clean")
    (old,) = evaluate([bos_free_run], tiny_store, tmp_path / "old", splice_bos=True)
    sae, _ = load_run(bos_free_run)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    grp, final = store_arrays(tiny_store)
    cut = heldout_cutoff(Store.open(str(tiny_store)), 0.1)
    ids = torch.from_numpy(np.asarray(grp["contexts"][cut:cut + N_CTX]).astype(np.int64))
    mean = torch.tensor(final["stats"]["mlp_out.0"]["mean"], dtype=torch.float32)

    def spliced(x, y):
        with torch.no_grad():
            return sae(y.reshape(-1, D)).reshape(y.shape)

    T = ids.shape[1]
    assert row["bos"] == "clean" and row["n_predictions"] == N_CTX * (T - 2)
    assert row["ce_clean"] == pytest.approx(manual_ce_after_bos(model, ids, lambda x, y: y), rel=1e-6)
    assert row["ce_spliced"] == pytest.approx(manual_ce_after_bos(model, ids, spliced), rel=1e-6)
    assert row["ce_zero"] == pytest.approx(manual_ce_after_bos(model, ids, lambda x, y: torch.zeros_like(y)), rel=1e-6)
    assert row["ce_mean"] == pytest.approx(manual_ce_after_bos(model, ids, lambda x, y: mean.expand_as(y)), rel=1e-6)
    # --splice-bos: the old figure, every position replaced and every prediction counted
    assert old["bos"] == "replaced" and old["n_predictions"] == N_CTX * (T - 1)
    assert old["ce_spliced"] == pytest.approx(manual_ce(model, ids, spliced), rel=1e-6)
    assert old["ce_spliced"] != pytest.approx(row["ce_spliced"], rel=1e-6)
    # statistics: the held-out rows without / with the BOS rows
    ctx, pos = np.asarray(grp["rows/context"][:]), np.asarray(grp["rows/position"][:])
    assert row["n_rows"] == int(((ctx >= cut) & (pos != 0)).sum()) and old["n_rows"] == int((ctx >= cut).sum())
    assert "BOS rows left out as in training" in row["rows"] and "BOS" not in old["rows"]
    # the report says which rule ran
    rep = json.loads((tmp_path / "clean" / "report.json").read_text())
    assert rep["rows"][0]["bos"] == "clean"
    md = (tmp_path / "clean" / "report.md").read_text()
    assert "the BOS position (position 0) keeps the model's own activation" in md and "BOS included" not in md
    html = (tmp_path / "clean" / "report.html").read_text()
    assert "keeps the model&#x27;s own activation" in html or "keeps the model's own activation" in html
    assert "every position, BOS included, is replaced" in (tmp_path / "old" / "report.md").read_text()


def test_store_of_other_hooks_and_model_of_another_store_are_refused(identity_and_zero, tiny_store, tiny_model_dir,
                                                                      tiny_corpus, tmp_path):
    from _store import harvest_tiny
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    run = identity_and_zero["identity"]["run_dir"]
    # a real second store of the same model, harvested at other hooks
    other = harvest_tiny(tmp_path / "other.zarr", tiny_model_dir, tiny_corpus, hooks=("mlp_out.1",), tokens=1024)
    with pytest.raises(RunDirError, match="different hooks") as e:
        evaluate([run], other, tmp_path / "e1")
    assert "\n" not in str(e.value)
    # the store's model replaced by another one (same family, other width) through `model`
    cfg = GPTNeoXConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "other_model")
    with pytest.raises(ModelError, match="config hash differs") as e:
        evaluate([run], tiny_store, tmp_path / "e2", model=str(tmp_path / "other_model"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "e2" / "report.md").exists()


def test_statistics_only_report_without_the_model(identity_and_zero, tiny_store, tmp_path):
    """splice=False: no model loaded, no loss keys, "—" in the loss column; two SAEs of one set at the same layer get
    a Run column in their shared table."""
    runs = [identity_and_zero[k]["run_dir"] for k in ("identity", "zero")]
    rows = evaluate(runs, tiny_store, tmp_path / "ev", splice=False, model="/nonexistent/model")
    assert [r["run"] for r in rows] == ["identity", "zero"]
    assert all("ce_clean" not in r and "recovered_zero" not in r for r in rows)
    assert rows[0]["mse"] == identity_and_zero["identity"]["mse"] and rows[1]["l0"] == identity_and_zero["zero"]["l0"]
    md = (tmp_path / "ev" / "report.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| Run | Layer | MSE Loss | L1 loss | L0 | % Alive | % Loss Recovered |")
    assert len(lines) == 4 and all(line.split("|")[7].strip() == "—" for line in lines[2:])


@pytest.mark.slow
def test_a_derived_store_of_the_training_data_is_evaluated_on_the_held_out_contexts_only(tiny_store, tiny_model_dir,
                                                                                        tiny_corpus, tmp_path):
    """Train on tiny_store with a held-out cut; copy it with `copy --hooks` (a new fingerprint). Evaluation on the
    copy reads exactly the run's held-out contexts, by the split identity recorded in cfg.json (the old runner went by
    fingerprint and fell back to every row, training rows included). A store of the same data holding none of the
    held-out contexts is refused rather than widened."""
    from _store import harvest_tiny
    from saecache.harvest.copy import CopyConfig, copy_store
    from saecache.harvest.split import heldout_cutoff
    from saecache.harvest.store import Store
    from saecache.train.config import TrainConfig
    from saecache.train.trainer import run_training

    torch.set_num_threads(1)
    (run,) = run_training(TrainConfig(stores=[str(tiny_store)], out=str(tmp_path / "run"), steps=2, batch_size=64,
                                      heldout_fraction=0.1, progress=False,
                                      saes=[{"arch": "topk", "hook_in": "mlp_out.0", "width": 32, "k": 4}]))
    copy = tmp_path / "copy.zarr"
    copy_store(CopyConfig(src=str(tiny_store), dst=str(copy), hooks=("mlp_out.0",), threads=1))
    st, cp = Store.open(str(tiny_store)), Store.open(str(copy))
    assert cp.fingerprint() != st.fingerprint()
    cut = heldout_cutoff(st, 0.1)
    ctx = np.asarray(zarr.open_group(str(tiny_store), mode="r")["rows/context"][:])
    # splice_bos: every held-out row counted, BOS rows too (the run left them out: by default they would not be)
    (row,) = evaluate([run], copy, tmp_path / "eval", splice=False, splice_bos=True)
    assert row["n_rows"] == int((ctx >= cut).sum()) < len(ctx)
    assert f"held-out contexts {cut}.." in row["rows"]
    (same,) = evaluate([run], tiny_store, tmp_path / "eval2", splice=False, splice_bos=True)
    assert same["n_rows"] == row["n_rows"] and same["mse"] == pytest.approx(row["mse"])
    # a store of the same data that stops before the cut: nothing held out in it -> refused
    short = harvest_tiny(tmp_path / "short.zarr", tiny_model_dir, tiny_corpus, tokens=2048)
    with pytest.raises(RunDirError, match="none of its held-out ones") as e:
        evaluate([run], short, tmp_path / "eval3", splice=False)
    assert "\n" not in str(e.value)
