"""report.html (issue 22 §4) opened in a real headless Chromium (Debian's `chromium`; `.ci/run` installs it when
missing), driven over the DevTools protocol by tests/_browser.py:

- the sweep's report (tests/_sweep.py) loads with no console error, exception or failed load;
- every picture (the frontier per hook, the frequency histograms) decodes, and its box in the full-page screenshot
  is drawn: many distinct colours and a good share of non-white pixels;
- the page holds the seed's tables with intervals and links to every feature page, which exist; it is
  self-contained (no http(s) resource, no script);
- the checker itself fails on a page with a broken image, a script error, or a blank picture.
"""

import json
import re

import numpy as np
import pytest

from _browser import looks_drawn, view_page
from _sweep import sweep_eval

MIN_COLOURS = 20
MIN_INK = 0.01


@pytest.fixture(scope="module")
def page(tiny_store, tmp_path_factory):
    out = sweep_eval(tmp_path_factory.getbasetemp(), tiny_store)
    return out, view_page(out / "report.html")


@pytest.mark.slow  # the sweep: ~25 s to train and evaluate once per session
def test_report_html_loads_without_errors_and_shows_every_picture(page):
    out, view = page
    assert view.errors == []
    assert view.title == "saecache evaluation"
    frontier = json.loads((out / "frontier.json").read_text())
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert len(view.images) == len(frontier["panels"]) + len(rows) == 2 + 7  # frontier per hook, histogram per SAE
    for im, crop in zip(view.images, view.crops):
        assert im["src"].startswith("data:image/png;base64,")
        assert im["natural_w"] > 100 and im["natural_h"] > 100, im
        x0, y0, x1, y1 = im["box"]
        assert x1 - x0 > 200 and y1 - y0 > 100 and crop is not None, im
        colours, ink = looks_drawn(crop)
        assert colours >= MIN_COLOURS and ink >= MIN_INK, (im, colours, ink)


@pytest.mark.slow  # the sweep: ~25 s to train and evaluate once per session
def test_report_html_has_the_tables_and_links_to_the_feature_pages(page):
    out, view = page
    html = (out / "report.html").read_text()
    pages = sorted(p.name for p in out.glob("features-*.html"))
    assert len(pages) == 7 and sorted(view.links) == pages
    assert all((out / link).is_file() for link in view.links)
    assert "<script" not in html.lower() and not re.search(r"(src|href)=\"(https?:)?//", html)
    # the seed's columns, and % loss recovered with its interval, for every SAE's table
    assert html.count("<th>% Loss Recovered</th>") >= 4
    assert re.search(r"<td>-?\d+\.\d \[-?\d+\.\d, -?\d+\.\d\]</td>", html)
    assert "Sparsity–fidelity frontier" in html and "Feature-frequency histograms" in html


def _png(path, blank: bool):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    if blank:
        ax.set_axis_off()
    else:
        ax.plot(np.arange(50), np.sin(np.arange(50) / 5))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def test_the_checker_catches_a_broken_image_a_script_error_and_a_blank_picture(tmp_path):
    _png(tmp_path / "drawn.png", blank=False)
    _png(tmp_path / "blank.png", blank=True)
    good = tmp_path / "good.html"
    good.write_text('<!doctype html><html><head><meta charset="utf-8"><title>ok</title></head><body>'
                    '<img src="drawn.png" width="400" height="300"></body></html>')
    view = view_page(good)
    assert view.errors == [] and looks_drawn(view.crops[0])[0] >= MIN_COLOURS
    bad = tmp_path / "bad.html"
    bad.write_text('<!doctype html><html><head><meta charset="utf-8"><title>bad</title></head><body>'
                   '<img src="missing.png" width="400" height="300"><img src="blank.png" width="400" height="300">'
                   '<script>console.error("logged"); notDefined();</script></body></html>')
    view = view_page(bad)
    text = "\n".join(view.errors)
    assert "missing.png" in text and "console.error: logged" in text and "notDefined" in text
    assert view.images[0]["natural_w"] == 0  # the broken image never decoded
    colours, ink = looks_drawn(view.crops[1])
    assert colours < MIN_COLOURS and ink < MIN_INK  # the blank picture reads as blank
