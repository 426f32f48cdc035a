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
