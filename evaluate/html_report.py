"""`report.html`: the evaluation as one page a person opens from disk. The seed's tables with their intervals, the
sparsity–fidelity frontier and the pruning curves' numbers, the feature-frequency histograms, links to the feature
pages, and the definitions.

Self-contained: the pictures are embedded as data: URIs (the page still shows them when moved or mailed alone), the
style is inline, and there is no script and no external resource. Written by hand (a few string templates): the page
is static, and a template engine would be a dependency for ~100 lines.
"""

from __future__ import annotations

import base64
import html
import os

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1500px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin-bottom: 6px; }
table { border-collapse: collapse; margin: 6px 0 16px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f2f4f7; } td:first-child, th:first-child { text-align: left; }
img { display: block; max-width: 100%; height: auto; border: 1px solid #eee; }
.hists { display: flex; flex-wrap: wrap; gap: 12px; } .hists figure { margin: 0; width: 460px; }
.scroll { overflow-x: auto; } figcaption { font-size: 12px; color: #555; } code { background: #f4f4f4; padding: 0 3px; }
"""


def _e(v) -> str:
    return html.escape(str(v))


def data_uri(path: str) -> str:
    """A PNG file as a data: URI."""
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def table(head: list[str], body: list[list[str]]) -> str:
    rows = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>\n" for cells in body)
    return "<div class=\"scroll\"><table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + \
        f"</tr></thead><tbody>\n{rows}</tbody></table></div>\n"


def _pct(q: dict, key: str = "recovered_zero") -> str:
    if q.get(key) is None:
        return "—"
    text = f"{100 * q[key]:.1f}"
    if q.get(f"{key}_lo") is not None and q.get(f"{key}_hi") is not None:
        text += f" [{100 * q[f'{key}_lo']:.1f}, {100 * q[f'{key}_hi']:.1f}]"
    return text


def _f(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def pruning_table(panel: dict) -> str:
    """The numbers of a panel's pruning curves: one row per SAE and threshold."""
    body = []
    for c in panel["pruning"]:
        for q in c["points"]:
            body.append([c["run"], "—" if q["prune_above"] is None else f"{q['prune_above']:g}", str(q["n_pruned"]),
                         _f(q["l0"], ".1f"), _f(q["fve"], ".3f"), _pct(q)])
    if not body:
        return ""
    return table(["SAE", "Prune above", "Features dropped", "L0", "FVE", "% Loss Recovered"], body)


def report_html(header: dict, tables: list[tuple[str, list[str], list[list[str]]]], definitions: dict[str, str],
                frontier: dict, hists: dict[str, str], pages: list[str], notes: str, out: str) -> str:
    """The page (see the module docstring). `tables`: the report's tables (`report.table_groups`); `definitions`:
    what each column means (`report.DEFINITIONS`); `hists`: {label: PNG path}; `pages`: feature-page paths (linked
    relative to `out`, the page's own folder); `notes`: what the figures are over (`report.notes`)."""
    parts = ["<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
             "<title>saecache evaluation</title>", f"<style>{STYLE}</style></head><body>",
             "<h1>saecache evaluation</h1>",
             f"<p>Store <code>{_e(header['store'])}</code> (model <code>{_e(header['model'])}</code>, fingerprint "
             f"<code>{_e(header['fingerprint'][:16])}</code>; saecache {_e(header.get('package_version', ''))}).</p>",
             "<h2>The seed's tables</h2>",
             "<p>% loss recovered with its 95 % bootstrap interval over contexts in brackets.</p>"]
    for title, head, body in tables:
        parts += [f"<h3>{_e(title)}</h3>", table(head, body)]
    panels = frontier.get("panels", [])
    if panels:
        parts += ["<h2>Sparsity–fidelity frontier</h2>",
                  "<p>L0 (log scale) against % loss recovered and FVE, one line per architecture × width; beside "
                  "them each SAE's pruning curve: the features firing more often than each threshold dropped. The "
                  "numbers are in <code>frontier.json</code>.</p>"]
        for p in panels:
            parts.append(f"<h3>{_e(p['hook'])}</h3>")
            if p.get("png") and os.path.isfile(os.path.join(out, p["png"])):
                parts.append(f"<img src=\"{data_uri(os.path.join(out, p['png']))}\" alt=\"frontier at "
                             f"{_e(p['hook'])}\" width=\"1500\" height=\"430\">")
            parts.append(pruning_table(p))
    if hists:
        parts += ["<h2>Feature-frequency histograms</h2>", "<div class=\"hists\">"]
        for label, path in hists.items():
            parts.append(f"<figure><img src=\"{data_uri(path)}\" alt=\"frequency histogram of {_e(label)}\" "
                         f"width=\"600\" height=\"350\"><figcaption>{_e(label)}</figcaption></figure>")
        parts.append("</div>")
    if pages:
        parts += ["<h2>Feature pages</h2>", "<p>Top-activating contexts of some features of each SAE.</p><ul>"]
        parts += [f"<li><a href=\"{_e(os.path.relpath(p, out))}\">{_e(os.path.basename(p))}</a></li>"
                  for p in pages]
        parts.append("</ul>")
    parts += ["<h2>Definitions</h2>", f"<p>{_e(notes)}</p>", "<ul>"]
    parts += [f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in definitions.items()]
    parts += ["</ul>", "</body></html>\n"]
    return "\n".join(parts)
