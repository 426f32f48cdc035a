"""Feature contexts: the top-activating rows of a few features, read from the store and shown as text with the firing
token marked, plus each feature's firing frequency; optionally a static HTML page.

Rows are scanned in storage order from the start of the store (complete shards only, up to `max_rows`); each row maps
back to its text through rows/context + rows/position + contexts and the tokenizer named in the store header.
`saecache features` shows chosen features (`features_run.py`); `saecache evaluate` writes one page per SAE with a few
features picked along the frequency ranking (`pick_features`).
"""

from __future__ import annotations

import html

import numpy as np
import torch

from saecache.errors import ModelError

AFTER = 4  # tokens shown after the firing one


@torch.no_grad()
def top_activations(sae, store, hook: str, features: list[int], top: int, max_rows: int | None, batch_size: int,
                    device) -> tuple[dict[int, dict], int]:
    """{feature: {"count": rows where it fired, "top": [(activation, context, position), ...] best first}}, rows read."""
    n_feat = len(features)
    idx_N = torch.tensor(features, dtype=torch.long, device=device)
    best_vals = torch.full((0, n_feat), -float("inf"))
    best_ctx = torch.zeros((0, n_feat), dtype=torch.long)
    best_pos = torch.zeros((0, n_feat), dtype=torch.long)
    counts = torch.zeros(n_feat, dtype=torch.long)
    seen = 0
    for _, _, _, r0, r1 in store.shards():
        for b0 in range(r0, r1, batch_size):
            b1 = min(b0 + batch_size, r1, b0 + (max_rows - seen) if max_rows is not None else r1)
            if b1 <= b0:
                break
            x = store.read_acts_torch(hook, b0, b1).to(device=device, dtype=torch.float32)
            meta = store.read_meta(b0, b1)
            f = sae.encode(x)[:, idx_N].cpu()  # [b, n]
            counts += (f != 0).sum(0)
            ctx = torch.from_numpy(meta["context"].astype(np.int64))[:, None].expand_as(f)
            pos = torch.from_numpy(meta["position"].astype(np.int64))[:, None].expand_as(f)
            vals = torch.cat([best_vals, f.masked_fill(f == 0, -float("inf"))])
            keep = vals.topk(min(top, vals.shape[0]), dim=0).indices  # [top, n]
            best_vals = vals.gather(0, keep)
            best_ctx = torch.cat([best_ctx, ctx]).gather(0, keep)
            best_pos = torch.cat([best_pos, pos]).gather(0, keep)
            seen += b1 - b0
        if max_rows is not None and seen >= max_rows:
            break
    out = {}
    for j, feat in enumerate(features):
        rows = [(float(v), int(c), int(p)) for v, c, p in zip(best_vals[:, j], best_ctx[:, j], best_pos[:, j])
                if v > -float("inf")]
        out[feat] = {"count": int(counts[j]), "top": rows}
    return out, seen


def load_tokenizer(name: str | None, fallback: str | None = None):
    """AutoTokenizer for `name` (else `fallback`, e.g. the model directory); one-line ModelError when neither loads."""
    from transformers import AutoTokenizer

    tried = []
    for candidate in dict.fromkeys(c for c in (name, fallback) if c):
        try:
            return AutoTokenizer.from_pretrained(candidate)
        except (OSError, ValueError) as e:
            tried.append(f"{candidate!r} ({(str(e).strip().splitlines() or [type(e).__name__])[0][:120]})")
    raise ModelError(f"cannot load a tokenizer: {'; '.join(tried) or 'none named'}; pass --tokenizer DIR")


def snippet(tok, ids_T: np.ndarray, pos: int, window: int) -> tuple[list[str], int]:
    """Token strings from pos-window to pos+AFTER and the index of the firing token among them."""
    lo, hi = max(0, pos - window), min(len(ids_T), pos + AFTER + 1)
    return [tok.decode([int(t)]) for t in ids_T[lo:hi]], pos - lo


def render(found: dict[int, dict], n_rows: int, store, tok, window: int, run: str, hook: str) -> dict:
    """`top_activations` output -> {"run", "hook", "n_rows", "features": {N: {frequency, count, contexts[...]}}},
    each context with its token strings and the index `at` of the firing token."""
    result = {"run": run, "hook": hook, "n_rows": n_rows, "features": {}}
    for feat, info in found.items():
        contexts = []
        for act, c, p in info["top"]:
            toks, at = snippet(tok, np.asarray(store.contexts(c, c + 1))[0], p, window)
            contexts.append({"activation": act, "context": c, "position": p, "tokens": toks, "at": at})
        result["features"][feat] = {"count": info["count"], "frequency": info["count"] / max(n_rows, 1),
                                    "contexts": contexts}
    return result


def pick_features(freq_F: torch.Tensor, n: int) -> list[int]:
    """`n` features spread evenly along the ranking of the alive ones by frequency (most frequent first)."""
    alive = [int(i) for i in torch.argsort(freq_F, descending=True, stable=True) if freq_F[i] > 0]
    if len(alive) <= n:
        return alive
    return [alive[int(j)] for j in np.unique(np.linspace(0, len(alive) - 1, n).round().astype(int))]


def as_text(result: dict) -> str:
    lines = []
    for feat, info in result["features"].items():
        lines.append(f"feature {feat} of {result['run']} ({result['hook']}): fires on {info['count']} of "
                     f"{result['n_rows']} rows (frequency {info['frequency']:.4g})")
        for c in info["contexts"]:
            toks = list(c["tokens"])
            toks[c["at"]] = f"«{toks[c['at']]}»"
            text = "".join(toks).replace("\n", "\\n")
            lines.append(f"  {c['activation']:9.4f}  ctx {c['context']:>6} pos {c['position']:>4}  {text}")
        if not info["contexts"]:
            lines.append("  (never fires in the rows scanned)")
    return "\n".join(lines) + "\n"


def as_html(result: dict) -> str:
    parts = ["<!doctype html><meta charset='utf-8'>",
             f"<title>saecache features: {html.escape(result['run'])}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:auto}td{padding:2px 8px}"
             ".ctx{font-family:monospace;white-space:pre-wrap}mark{background:#ffb347;font-weight:bold}</style>",
             f"<h1>{html.escape(result['run'])} <small>({html.escape(result['hook'])}, {result['n_rows']} rows)"
             "</small></h1>"]
    for feat, info in result["features"].items():
        parts.append(f"<h2>Feature {feat}</h2><p>fires on {info['count']} of {result['n_rows']} rows "
                     f"(frequency {info['frequency']:.4g})</p><table>")
        for c in info["contexts"]:
            toks = [html.escape(t) for t in c["tokens"]]
            toks[c["at"]] = f"<mark title='{c['activation']:.4f}'>{toks[c['at']]}</mark>"
            parts.append(f"<tr><td>{c['activation']:.4f}</td><td>ctx {c['context']} pos {c['position']}</td>"
                         f"<td class='ctx'>{''.join(toks)}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"
