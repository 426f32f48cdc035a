"""Open a local HTML page in a real headless Chromium (Debian's `chromium` package) and report what a person would
see: console errors, uncaught exceptions, failed resource loads, and each <img>'s box cropped from a full-page
screenshot.

Driven over the DevTools protocol (a websocket to the browser started with --remote-debugging-port=0) with aiohttp,
which the test install already has (a dependency of `datasets`' HTTP filesystem); selenium + chromedriver would add a
package for the same three calls. Flags: the ones that work as root on a closed network, with a fresh profile.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-port=0", "--hide-scrollbars"]


def chromium_path() -> str:
    """$CHROMIUM, else `chromium` / `chromium-browser` on PATH; a clear error when none is installed."""
    for cand in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    raise RuntimeError("no Chromium found: apt-get install -y chromium (or set CHROMIUM=/path/to/chromium)")


@dataclass
class PageView:
    """What the browser saw of one page."""

    errors: list[str] = field(default_factory=list)
    """Console errors, uncaught exceptions and failed loads (Log.entryAdded at level error), one line each."""
    images: list[dict] = field(default_factory=list)
    """Per <img>: src (first 60 characters), natural width/height (0 when it failed to decode), box {x, y, w, h}
    in page pixels."""
    crops: list = field(default_factory=list)
    """Per <img>, the screenshot cropped to its box (a PIL RGB image)."""
    title: str = ""
    links: list[str] = field(default_factory=list)
    """href of every <a>."""
    screenshot: object = None
    """The full-page screenshot (a PIL RGB image)."""


_PROBE = """(() => {
  const imgs = [...document.images].map(im => { const r = im.getBoundingClientRect();
    return {src: im.getAttribute('src').slice(0, 60), natural_w: im.naturalWidth, natural_h: im.naturalHeight,
            complete: im.complete, x: r.left + window.scrollX, y: r.top + window.scrollY, w: r.width, h: r.height}; });
  const links = [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'));
  return JSON.stringify({imgs, links, title: document.title,
                         width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight});
})()"""


class _CDP:
    """A minimal DevTools protocol session: send commands, collect events."""

    def __init__(self, ws):
        self.ws, self.next_id, self.events, self.pending = ws, 0, [], {}

    async def pump(self):
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        data = await asyncio.wait_for(fut, 60)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def wait_event(self, method: str, timeout: float = 60):
        t0 = time.monotonic()
        while not any(e["method"] == method for e in self.events):
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"no {method} within {timeout} s")
            await asyncio.sleep(0.05)


def _error_lines(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
        elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", "")))
                                                              for a in p.get("args", [])))
        elif e["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
            out.append(f"log ({p['entry'].get('source')}): {p['entry'].get('text')} {p['entry'].get('url', '')}")
    return out


async def _view(port: int, url: str, width: int) -> PageView:
    import aiohttp
    from PIL import Image

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json(content_type=None)
        page = next(t for t in targets if t["type"] == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = _CDP(ws)
            pump = asyncio.ensure_future(cdp.pump())
            try:
                for domain in ("Page", "Runtime", "Log"):
                    await cdp.call(f"{domain}.enable")
                await cdp.call("Emulation.setDeviceMetricsOverride", width=width, height=800, deviceScaleFactor=1,
                               mobile=False)
                await cdp.call("Page.navigate", url=url)
                await cdp.wait_event("Page.loadEventFired")
                await asyncio.sleep(0.3)  # late console messages
                probe = json.loads((await cdp.call("Runtime.evaluate", expression=_PROBE,
                                                   returnByValue=True))["result"]["value"])
                height = max(int(probe["height"]), 1)
                await cdp.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                               mobile=False)
                shot = await cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
                probe = json.loads((await cdp.call("Runtime.evaluate", expression=_PROBE,
                                                   returnByValue=True))["result"]["value"])
            finally:
                pump.cancel()
    screen = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    view = PageView(errors=_error_lines(cdp.events), title=probe["title"], links=probe["links"], screenshot=screen)
    for im in probe["imgs"]:
        box = (int(im["x"]), int(im["y"]), int(im["x"] + im["w"]), int(im["y"] + im["h"]))
        view.images.append({"src": im["src"], "natural_w": im["natural_w"], "natural_h": im["natural_h"],
                            "box": box})
        view.crops.append(screen.crop(box) if im["w"] >= 1 and im["h"] >= 1 else None)
    return view


def view_page(path: str | Path, width: int = 1280) -> PageView:
    """Open file `path` in a fresh headless Chromium and return what it saw (see `PageView`)."""
    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            t0 = time.monotonic()
            while not (port_file.is_file() and port_file.read_text().strip()):
                if proc.poll() is not None or time.monotonic() - t0 > 60:
                    raise RuntimeError(f"Chromium did not start (exit code {proc.poll()})")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            return asyncio.run(_view(port, url, width))
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def looks_drawn(crop) -> tuple[int, float]:
    """(distinct colours, fraction of non-white pixels) of an image crop: a blank or failed image has one or two
    colours and (almost) no non-white pixels."""
    import numpy as np

    a = np.asarray(crop)
    distinct = len(np.unique(a.reshape(-1, a.shape[-1]), axis=0))
    nonwhite = float((a.min(axis=-1) < 245).mean())
    return distinct, nonwhite
