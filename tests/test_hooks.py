"""Hook points: captured values equal what the modules really compute (checked against `output_hidden_states` and a
manual forward of each block's pieces) on GPT-NeoX (parallel and sequential residual), Llama and GPT-2; early stop;
several hooks in one pass; unknown hooks; output patching."""

import math

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM)

from saecache.errors import ModelError
from saecache.harvest.hooks import ActivationCapture, get_module, list_aliases, patch_output, resolve_hooks

L = 2  # blocks in every tiny model


def _neox(parallel: bool):
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=L, num_attention_heads=2, intermediate_size=256,
        max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=parallel))


# name -> (constructor, blocks path, final norm path, second layer norm inside a block, residual style)
ARCHS = {
    "neox_parallel": (lambda: _neox(True), "gpt_neox.layers", "gpt_neox.final_layer_norm",
                      "post_attention_layernorm", "parallel"),
    "neox_sequential": (lambda: _neox(False), "gpt_neox.layers", "gpt_neox.final_layer_norm",
                        "post_attention_layernorm", "sequential"),
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)), "model.layers", "model.norm",
        "post_attention_layernorm", "sequential"),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=512, n_embd=64, n_layer=L, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)),
        "transformer.h", "transformer.ln_f", "ln_2", "sequential"),
}


def _build(arch: str):
    torch.manual_seed(0)
    model = ARCHS[arch][0]().eval()
    with torch.no_grad():  # larger-than-default weights so activations are O(1) and equality checks are not vacuous
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name or "ln" in name else 0.0, 0.2)
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_model(request):
    return request.param, _build(request.param)


@pytest.fixture(scope="module")
def neox():
    return _build("neox_parallel")


def _ids(B=3, T=12, seed=1):
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_embed_and_residual_stream_equal_hidden_states(arch_model):
    arch, model = arch_model
    final_norm = get_module(model, ARCHS[arch][2])
    specs = ["embed"] + [f"resid_pre.{i}" for i in range(L)] + [f"resid_post.{i}" for i in range(L)]
    hooks = resolve_hooks(model, specs)
    ids = _ids()
    with ActivationCapture(model, hooks) as cap:
        acts = cap(ids)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    assert len(hs) == L + 1
    assert hs[0].std() > 0.05 and hs[-1].std() > 0.05
    close(acts["embed"], hs[0])
    for i in range(L):
        close(acts[f"resid_pre.{i}"], hs[i])
    for i in range(L - 1):
        close(acts[f"resid_post.{i}"], hs[i + 1])
    # transformers reports the last hidden state after the final norm; resid_post.{L-1} is before it
    with torch.no_grad():
        close(final_norm(acts[f"resid_post.{L - 1}"]), hs[L])
    assert not torch.allclose(acts[f"resid_post.{L - 1}"], hs[L], atol=1e-3)
    for h in hooks:
        assert acts[h.name].shape == (3, 12, h.d)


def test_block_pieces_equal_manual_forward(arch_model):
    arch, model = arch_model
    blocks_path, _, ln2_name, style = ARCHS[arch][1:]
    kinds = ("attn_out", "mlp_in", "mlp_out")
    hooks = resolve_hooks(model, [f"{k}.{i}" for k in kinds for i in range(L)])
    ids = _ids(seed=2)
    with ActivationCapture(model, hooks) as cap:
        acts = cap(ids)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        hs = list(out.hidden_states[:L])
        for i in range(L):
            block = get_module(model, f"{blocks_path}.{i}")
            ln2, mlp = getattr(block, ln2_name), block.mlp
            x = hs[i]
            attn = acts[f"attn_out.{i}"]
            assert attn.std() > 0.01
            if style == "parallel":  # GPT-NeoX: out = x + attn(ln1(x)) + mlp(ln2(x))
                mlp_in = ln2(x)
            else:  # out = h + mlp(ln2(h)), h = x + attn
                mlp_in = ln2(x + attn)
            mlp_out = mlp(mlp_in)
            close(acts[f"mlp_in.{i}"], mlp_in)
            close(acts[f"mlp_out.{i}"], mlp_out)
            resid_post = x + attn + mlp_out  # uses the captured attention output: wrong capture -> mismatch
            if i + 1 < L:
                close(resid_post, out.hidden_states[i + 1])
            else:
                close(get_module(model, ARCHS[arch][2])(resid_post), out.hidden_states[L])


def test_gpt2_attention_output_equals_manual_attention():
    model = _build("gpt2")
    hooks = resolve_hooks(model, ["attn_out.0", "embed"])
    ids = _ids(B=2, T=9, seed=3)
    with ActivationCapture(model, hooks) as cap:
        acts = cap(ids)
    blk = model.transformer.h[0]
    B, T, D = acts["embed"].shape
    H = model.config.n_head
    with torch.no_grad():
        q, k, v = blk.attn.c_attn(blk.ln_1(acts["embed"])).split(D, dim=-1)
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // H)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
        close(acts["attn_out.0"], blk.attn.c_proj(y))


def _count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda *a: calls.append(1))


def test_early_stop_skips_later_layers(neox):
    mlp_out0, mlp_in0 = resolve_hooks(neox, ["mlp_out.0", "mlp_in.0"])  # (resolving runs one tiny trace forward)
    last, head = neox.gpt_neox.layers[L - 1], neox.lm_head
    (c_last, h1), (c_head, h2) = _count_calls(last), _count_calls(head)
    (c_mlp0, h3) = _count_calls(neox.gpt_neox.layers[0].mlp)
    try:
        with ActivationCapture(neox, [mlp_out0]) as cap:
            acts = cap(_ids())
        assert acts["mlp_out.0"].shape == (3, 12, 64)
        assert len(c_last) == 0 and len(c_head) == 0 and len(c_mlp0) == 1
        # an input hook stops before its module runs
        with ActivationCapture(neox, [mlp_in0]) as cap:
            cap(_ids())
        assert len(c_mlp0) == 1 and len(c_last) == 0
        # without early stop the whole model runs
        with ActivationCapture(neox, [mlp_out0], stop_early=False) as cap:
            cap(_ids())
        assert len(c_last) == 1 and len(c_head) == 1
    finally:
        for h in (h1, h2, h3):
            h.remove()


def test_several_hooks_one_pass_equal_single_captures(neox):
    specs = ["embed", "mlp_out.0", "attn_out.1", "mlp_in.1", "resid_post.1", "gpt_neox.layers[0].mlp:input"]
    hooks = resolve_hooks(neox, specs)
    assert [h.name for h in hooks][-1] == "gpt_neox.layers.0.mlp:input"
    calls, handle = _count_calls(neox.gpt_neox.layers[0])
    ids = _ids(seed=4)
    try:
        with ActivationCapture(neox, hooks) as cap:
            together = cap(ids)
    finally:
        handle.remove()
    assert len(calls) == 1
    for h in hooks:
        alone = ActivationCapture(neox, [h])(ids)  # also usable without `with`
        assert torch.equal(alone[h.name], together[h.name])
    assert not torch.equal(together["mlp_out.0"], together["embed"])
    assert not neox.gpt_neox.layers[0].mlp._forward_hooks  # hooks removed after use


def test_raw_path_and_negative_index_normalise_to_the_same_point(neox):
    a, b, c = resolve_hooks(neox, ["mlp_out.-1", f"gpt_neox.layers[{L - 1}].mlp:output", "resid_post.1"])
    assert a.name == f"mlp_out.{L - 1}" and b.name == f"gpt_neox.layers.{L - 1}.mlp:output"
    assert (a.module, a.io, a.d) == (b.module, b.io, b.d) == (f"gpt_neox.layers.{L - 1}.mlp", "output", 64)
    assert a.order == b.order < c.order


def test_order_follows_execution_not_registration():
    # Llama blocks register input_layernorm AFTER mlp, but run it first: stopping must wait for the mlp
    model = _build("llama")
    hooks = resolve_hooks(model, ["model.layers.0.input_layernorm:output", "mlp_out.0"])
    assert hooks[0].order < hooks[1].order
    acts = ActivationCapture(model, hooks)(_ids())
    assert set(acts) == {"model.layers.0.input_layernorm:output", "mlp_out.0"}


def test_list_aliases(neox):
    expected = {"embed"} | {f"{k}.{i}" for k in ("mlp_out", "mlp_in", "attn_out", "resid_pre", "resid_mid",
                                                                    "resid_post")
                            for i in range(L)}
    assert set(list_aliases(neox)) == expected
    assert {h.name for h in resolve_hooks(neox, list_aliases(neox))} == expected


@pytest.mark.parametrize("spec", ["mlp_outt.0", f"mlp_out.{L}", "mlp.0", "gpt_neox.layers.0.nope:output",
                                  "gpt_neox.layers.0.mlp:middle"])
def test_unknown_hook_is_a_model_error(neox, spec):
    with pytest.raises(ModelError) as e:
        resolve_hooks(neox, [spec])
    msg = str(e.value)
    assert "\n" not in msg
    if ":" not in spec:
        assert spec in msg
        for alias in ("embed", f"mlp_out.0..{L - 1}", f"resid_post.0..{L - 1}", f"attn_out.0..{L - 1}"):
            assert alias in msg


def test_duplicate_and_empty_hook_lists_are_refused(neox):
    with pytest.raises(ModelError, match="more than once"):
        resolve_hooks(neox, ["mlp_out.0", "mlp_out.0"])
    with pytest.raises(ModelError, match="no hook points"):
        resolve_hooks(neox, [])


def test_get_module(neox):
    assert get_module(neox, "gpt_neox.layers.1.mlp") is neox.gpt_neox.layers[1].mlp
    with pytest.raises(ModelError, match="no module"):
        get_module(neox, "gpt_neox.layers.9")


@pytest.mark.parametrize("spec", ["mlp_out.0", "mlp_in.1", "attn_out.0", "resid_post.0", "embed"])
def test_patch_identity_keeps_logits_zero_changes_them(neox, spec):
    (hook,) = resolve_hooks(neox, [spec])
    ids = _ids(seed=5)
    with torch.no_grad():
        clean = neox(ids).logits
        with patch_output(neox, hook, lambda t: t):
            same = neox(ids).logits
        with patch_output(neox, hook, torch.zeros_like):
            zeroed = neox(ids).logits
        after = neox(ids).logits
    assert torch.equal(same, clean)
    assert (zeroed - clean).abs().max() > 1e-2
    assert torch.equal(after, clean)  # the patch is removed on exit


def test_patch_output_sees_the_captured_tensor(neox):
    (hook,) = resolve_hooks(neox, ["attn_out.1"])
    ids = _ids(seed=6)
    seen = []
    captured = ActivationCapture(neox, [hook])(ids)[hook.name]
    with torch.no_grad(), patch_output(neox, hook, lambda t: seen.append(t.clone()) or t):
        neox(ids)
    assert torch.equal(seen[0], captured)


def test_attention_mask_is_passed(neox):
    hooks = resolve_hooks(neox, ["resid_post.1"])
    ids = _ids(B=2, T=8, seed=7)
    full = ActivationCapture(neox, hooks)(ids, torch.ones_like(ids))["resid_post.1"]
    assert torch.allclose(full, ActivationCapture(neox, hooks)(ids)["resid_post.1"], atol=1e-6)
    mask = torch.ones_like(ids)
    mask[:, :3] = 0  # left padding changes what later positions attend to
    padded = ActivationCapture(neox, hooks)(ids, mask)["resid_post.1"]
    assert not torch.allclose(padded[:, 3:], full[:, 3:], atol=1e-4)
