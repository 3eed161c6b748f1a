"""The HTML report: self-contained, escaped, and rendering cleanly in a real browser.

The browser test drives headless Chromium (Debian's ``chromium``) over the DevTools protocol on a
pipe (``--remote-debugging-pipe``: JSON messages on fds 3/4, no websocket library needed): it
loads the page, collects every console message, uncaught exception and browser log error, reads
the rendered headline, checks every image decoded, and takes a full-page screenshot. The same
harness is first pointed at a deliberately broken page, so "no errors" is known to mean something.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from steerscope.report import (
    FeatureCard,
    ReportData,
    Snippet,
    Steered,
    render_report,
    write_report,
)
from steerscope.screening import evaluate, headline, heldout_screening, screen_features

EVIL = '<script>alert("x")</script>&amp;'


def _bundle() -> ReportData:
    """A report of a synthetic run: real evaluation tables, cards with hostile strings."""
    from test_screening import make_labels, make_predictors

    rng = np.random.default_rng(0)
    p = make_predictors(600, rng)
    lab = make_labels(p.iloc[:300], rng)
    ev = evaluate(p, lab, targets=["stability_abs", "collateral_count_0.05", "effect_l2",
                                   "noise_label"], n_boot=100, models=("ridge",))
    doc = ev.to_json()
    doc["heldout"] = heldout_screening(p, lab, None, n_boot=50).to_json()
    sc = screen_features(p, lab, cv=ev.cv, coverage_repeats=5)
    doc["screen"] = sc.to_json()
    doc["headline"] = headline(doc)
    doc = json.loads(json.dumps(doc))  # exactly what evaluation.json would hold
    t = sc.table
    cards = []
    for r in pd.concat([t.head(3), t.tail(2)]).to_dict("records"):
        cards.append(FeatureCard(
            feature=int(r["feature"]), rank=int(r["rank"]), tier=r["tier"],
            pred=r["pred_clean_score"], lo=r["pred_lo"], hi=r["pred_hi"],
            predicted={"stability_abs": r.get("pred_stability_abs")},
            measured={"stability_abs": r.get("measured_stability_abs")},
            logit_lens=["dog", EVIL, " \u00e9t\u00e9", "\x00"],
            snippets=[Snippet("Once upon a ", "time", ", there", 3.2),
                      Snippet(EVIL, "<b>", "&", 1.0)],
            steered=Steered("Once upon a time", " there was a dog.", " dog dog dog " + EVIL,
                            4.0, "+4 × max activation × W_dec[f], all positions"),
        ))
    return ReportData(title="steerscope screen — synthetic", run={
        "model": "synthetic", "sae": "synthetic-sae", "downstream_sae": EVIL,
        "n_features": len(p), "n_labelled": len(lab)}, evaluation=doc,
        labelled=lab.merge(p, on="feature"), screen=t, cards=cards)


@pytest.fixture(scope="module")
def bundle() -> ReportData:
    return _bundle()


@pytest.fixture(scope="module")
def page(bundle: ReportData) -> str:
    return render_report(bundle)


def test_report_is_one_self_contained_file(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()  # no scripts at all (and the hostile one is escaped)
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert refs and all(r.startswith("data:") for r in refs), refs
    imgs = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) >= 5  # heatmap, scatter, CV bars, held-out boxes, screen overview
    for b64 in imgs:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page and "https://" not in page


def test_report_escapes_every_string_from_the_data(page: str) -> None:
    assert EVIL not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;amp;" in page
    assert "<b>&lt;b&gt;</b>" not in page and "<mark>&lt;b&gt;</mark>" in page


def test_report_shows_the_headline_and_every_section(page: str, bundle: ReportData) -> None:
    h = bundle.evaluation["headline"]
    assert 'id="headline"' in page
    best = h["best"]
    assert f"{best['rho']:.2f}" in page and best["best_predictor"] in page
    for section in ("Predictive evaluation", "Held-out screening", "Every feature, screened",
                    "Feature cards"):
        assert section in page
    assert page.count('class="card"') == 5
    assert "robust" in page and h["heldout"]["outcome"] in page


def test_write_report_is_atomic(tmp_path: Path, bundle: ReportData) -> None:
    path = write_report(tmp_path / "r" / "report.html", bundle)
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp file left


# =========================================================================== headless Chromium
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``."""

    def __init__(self, binary: str, user_data: Path) -> None:
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-extensions", "--remote-debugging-pipe",
                 f"--user-data-dir={user_data}", "about:blank"]
        # Chromium reads fd 3 and writes fd 4; a tiny exec shim moves our pipe ends there.
        shim = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
                "os.execv(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", shim, str(to_child_r), str(from_child_w), binary, *flags],
            pass_fds=(to_child_r, from_child_w), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._id = 0
        self.events: list[dict[str, Any]] = []
        self._replies: dict[int, dict[str, Any]] = {}
        self._cv = threading.Condition()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._r, 65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cv:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                    self._cv.notify_all()

    def call(self, method: str, session: str | None = None, timeout: float = 60,
             **params: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(method)
                self._cv.wait(left)
            reply = self._replies.pop(self._id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for e in self.events:
                    if e.get("method") == method:
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(method)
                self._cv.wait(left)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - the browser may already be gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)


def load_page(path: Path, user_data: Path, screenshot: Path | None = None) -> dict[str, Any]:
    """Open ``path`` in headless Chromium: console/log errors, headline text, images, screenshot."""
    assert CHROMIUM is not None
    dt = DevTools(CHROMIUM, user_data)
    try:
        target = dt.call("Target.createTarget", url="about:blank")["targetId"]
        sid = dt.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            dt.call(domain, session=sid)
        dt.call("Emulation.setDeviceMetricsOverride", session=sid, width=1200, height=900,
                deviceScaleFactor=1, mobile=False)
        dt.call("Page.navigate", session=sid, url=path.resolve().as_uri())
        dt.wait_event("Page.loadEventFired")
        time.sleep(0.3)  # let late console messages arrive
        probe = ("JSON.stringify({headline: (document.getElementById('headline')||{}).innerText"
                 " || null, images: Array.from(document.images).map(i => [i.complete,"
                 " i.naturalWidth]), title: document.title})")
        state = json.loads(dt.call("Runtime.evaluate", session=sid, expression=probe,
                                   returnByValue=True)["result"]["value"])
        if screenshot is not None:
            shot = dt.call("Page.captureScreenshot", session=sid, format="png",
                           captureBeyondViewport=True)["data"]
            screenshot.write_bytes(base64.b64decode(shot))
        errors = []
        for e in dt.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                exc = (d.get("exception") or {}).get("description", "")
                errors.append(f"{d.get('text', '')} {exc}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert",
                                                                       "warning"):
                errors.append(" ".join(str(a.get("value")) for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
                errors.append(p["entry"].get("text", ""))
        state["errors"] = errors
        return state
    finally:
        dt.close()


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason=(
    "chromium is not installed (apt-get install chromium; .ci/run installs it, and under CI a "
    "missing browser fails this test instead of skipping it)"))
def test_report_renders_in_headless_chromium(tmp_path: Path, bundle: ReportData) -> None:
    assert CHROMIUM is not None, "CI must have chromium: .ci/run installs Debian's package"
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><link rel=icon href="data:,"></head><body>'
                   '<script>console.error("boom"); missingFn();</script></body></html>')
    broken = load_page(bad, tmp_path / "ud0")
    assert any("boom" in e for e in broken["errors"])  # the harness does see errors
    assert any("missingFn" in e for e in broken["errors"])

    path = write_report(tmp_path / "report.html", bundle)
    shot = tmp_path / "report.png"
    state = load_page(path, tmp_path / "ud1", screenshot=shot)
    assert state["errors"] == []
    best = bundle.evaluation["headline"]["best"]
    assert "Strongest relation" in state["headline"]
    assert f"{best['rho']:.2f}" in state["headline"]
    assert state["images"] and all(ok and w > 0 for ok, w in state["images"])
    assert state["title"].startswith("steerscope screen")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000  # a real, full page
