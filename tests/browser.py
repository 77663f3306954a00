"""A report opened as a person opens it: in a real headless Chromium (Debian's `chromium`, which
`make setup` installs), driven by Playwright. What the page logs, what it asks the network for,
whether each figure decoded, and whether the page and each figure draw something."""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update"]  # fmt: skip


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if shutil.which("apt-get"):  # where the project's setup installs it, its absence is a failure
            pytest.fail("chromium is not installed: `make setup` installs Debian's chromium (apt-get install chromium)")
        pytest.skip("no chromium on this machine and no apt-get to install it")
    return path


@dataclass
class OpenedReport:
    console_errors: list[str]  # console.error lines and uncaught page errors
    requests: list[str]  # every URL the page asked for other than itself and its inline data
    figures: dict[str, tuple[int, int]]  # data-figure name -> the decoded image's natural size
    figure_spread: dict[str, float]  # data-figure name -> pixel standard deviation of the drawn figure
    page_spread: float  # pixel standard deviation of the full-page screenshot
    text: str  # the page's visible text


def _spread(png: bytes) -> float:
    from PIL import Image

    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32).std())


def open_report(path: Path, screenshot: Path | None = None) -> OpenedReport:
    from playwright.sync_api import sync_playwright

    url = Path(path).resolve().as_uri()
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url)
                    if request.url != url and not request.url.startswith("data:") else None)  # fmt: skip
            page.goto(url, wait_until="load")
            figures = {item["name"]: (item["width"], item["height"]) for item in page.evaluate(
                """() => [...document.querySelectorAll('figure[data-figure] img')].map(img => ({
                    name: img.closest('figure').dataset.figure, width: img.naturalWidth, height: img.naturalHeight}))""")}  # fmt: skip
            spread = {name: _spread(page.locator(f'figure[data-figure="{name}"] img').screenshot()) for name in figures}
            whole = page.screenshot(full_page=True)
            if screenshot is not None:
                screenshot.write_bytes(whole)
            text = page.inner_text("body")
        finally:
            browser.close()
    return OpenedReport(errors, requests, figures, spread, _spread(whole), text)


def check_report(path: Path, figure_names: set[str], screenshot: Path | None = None) -> OpenedReport:
    """The report opens without a console error or a network request, every expected figure decodes
    to a real image and draws more than a blank rectangle, and so does the page."""
    opened = open_report(path, screenshot)
    assert opened.console_errors == []
    assert opened.requests == []
    assert figure_names <= set(opened.figures), f"figures missing: {figure_names - set(opened.figures)}"
    for name, (width, height) in opened.figures.items():
        assert width > 200 and height > 150, f"{name}: {width}x{height}"
        assert opened.figure_spread[name] > 10, f"{name} draws nearly one colour"
    assert opened.page_spread > 10
    return opened
