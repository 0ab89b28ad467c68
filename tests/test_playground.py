"""The playground (GET /, server/edge/http/static/index.html) in a real browser: Debian's headless
Chromium driven by Playwright, against a real server (`--http-port 0`, the tiny preset with its tiny
autoencoder, so previews are TAESD decodes) that wants a bearer token.

What a user does: open the page, give the token it asks for, type a prompt, generate; the step
previews change, then the image appears with its seed, its timings and a download link. And what
an attacker might try: markup in a prompt or in an error message the server echoes stays text.

The page is served with a Content-Security-Policy without 'unsafe-eval', and the browser keeps it:
Playwright's waits are written as functions ("() => ..."), since a bare expression is eval'd.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ServerProcess

CHROMIUM = pathlib.Path("/usr/bin/chromium")  # Debian's package; .ci/run installs it
TOKEN = "playground-token-0123456789"
ATTACK = "<img src=x onerror=\"window.__pwned = 1\">"  # what the page must show as text, never run


def test_the_page_is_one_offline_file_without_html_sinks() -> None:
    """Shipped in the package, nothing fetched from elsewhere (no CDN: it works offline), and no API
    that parses a string as HTML or code anywhere in its script (the comment naming one aside)."""
    from importlib.resources import files

    page = (files("lcmserve.server.edge.http") / "static" / "index.html").read_text(encoding="utf-8")
    script = page[page.index("<script>"):]
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page), "the page loads something from elsewhere"
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "setTimeout(\"", "import("):
        assert sink not in script, sink


def _chromium() -> str:
    if CHROMIUM.exists():
        return str(CHROMIUM)
    reason = f"Debian's chromium is not installed ({CHROMIUM}); `apt-get install -y chromium` (.ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def http_base(tiny_artifact: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the module, with a bearer token and one per-request adapter (the kohya LoRA
    the session's artifact was made with, default scale 0.7); yields "http://HOST:PORT"."""
    _chromium()  # skip before paying for a server
    lora = tiny_artifact.parent / "crack_kohya.safetensors"
    tokens = tmp_path_factory.mktemp("playground") / "tokens"
    tokens.write_text(TOKEN + "\n")
    server = ServerProcess("--model", "tiny", "--tiny-vae", "tiny", "--adapter", f"crack={lora}:0.7",
                           "--http-port", "0", "--metrics-port", "0", "--auth-token-file", str(tokens))
    try:
        assert server.http_target, f"no `http listening on` line:\n{server.log()}"
        yield f"http://{server.http_target}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(http_base: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, http_base: str) -> Iterator[Any]:
    """A fresh tab (its own sessionStorage: no token yet) that fails the test on any script error."""
    context = browser.new_context(viewport={"width": 1200, "height": 860}, base_url=http_base)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.set_default_timeout(60_000)
    try:
        yield tab
    finally:
        context.close()
    assert not errors, f"script errors in the page: {errors}"


def _open_with_token(page: Any) -> None:
    """Load `/`: the server wants a token, the page asks for one; give it and wait for the model."""
    page.goto("/")
    page.wait_for_selector("#auth:not([hidden])")
    assert "token" in page.text_content("#auth-reason")
    page.fill("#token", "not-the-token")
    page.click("#token-save")
    page.wait_for_function("() => document.getElementById('model').textContent === 'token needed'")
    assert page.is_visible("#auth")
    page.fill("#token", TOKEN)
    page.click("#token-save")
    page.wait_for_function("() => document.getElementById('model').textContent.startsWith('tiny')")
    assert page.is_hidden("#auth")
    assert page.evaluate("sessionStorage.getItem('lcmserve.token')") == TOKEN


def _watch_steps(page: Any) -> None:
    """Record every picture the result card shows, as it happens (a mutation record's oldValue is the
    picture a change replaced: records are delivered in batches, after the fact)."""
    page.evaluate("""() => {
        window.__replaced = [];
        new MutationObserver((records) => {
            for (const r of records) if (r.target.tagName === "IMG") window.__replaced.push(r.oldValue);
        }).observe(document.getElementById("results"),
                   {subtree: true, attributes: true, attributeFilter: ["src"], attributeOldValue: true});
    }""")


def _pictures_shown(page: Any) -> list[str]:
    """The src of every picture shown since _watch_steps, in order, the current one last."""
    replaced: list[str | None] = page.evaluate("window.__replaced")
    current: str = page.get_attribute("figure img", "src")
    return [src for src in replaced if src] + [current]


def test_generate_shows_previews_then_the_image_with_its_seed(page: Any, tmp_path: pathlib.Path) -> None:
    _open_with_token(page)
    decoders = page.eval_on_selector_all("#decoder option", "options => options.map(o => o.value)")
    assert "DECODER_TINY_VAE" in decoders, decoders
    page.fill("#prompt", "a lighthouse on a cliff at sunset")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#seed", "7")  # typing a seed keeps it
    assert page.is_checked("#seed-keep")
    _watch_steps(page)
    page.click("#generate")
    page.wait_for_selector("figure[data-seed]")

    # Previews: one per step (TAESD decodes at 64x64, PNG), changing, then the image itself.
    pictures = _pictures_shown(page)
    previews = [src for src in pictures if src.startswith("data:image/png;base64,")]
    assert len(previews) == 4 and pictures[:4] == previews, [src[:40] for src in pictures]
    assert len(set(previews)) > 1, "the step previews did not change"
    assert len(pictures) == 5 and pictures[-1].startswith("blob:"), "the final image is not the last picture shown"
    assert page.get_attribute("figure img", "data-step") == "final"

    figure = page.locator("figure[data-seed]")
    assert figure.get_attribute("data-seed") == "7"
    assert page.text_content("figcaption .seedtext") == "seed 7"
    assert page.evaluate("document.querySelector('figure img').naturalWidth") == 64
    assert page.get_attribute("a.download", "download") == "lcmserve-7.png"
    assert "seed 7" in page.text_content("#status")
    timings = page.inner_text("#timings")
    assert "UNET" in timings.upper() and "ROUND TRIP" in timings.upper()
    assert page.is_hidden("#error")

    # Random seeds: unticking "keep" lets the server pick, and the seed it picked shows in the field.
    # With the model's adapter, at the scale of its slider (the server's default scale to start with).
    assert page.text_content("#adapters label") == "crack"
    assert page.text_content("#adapters output") == "0.70"
    page.fill("#adapter-scale-0", "1.25")  # moving the slider ticks the adapter
    assert page.is_checked("#adapter-0")
    page.click("#seed-random")
    with page.expect_request("**/v1/generate") as sent:
        page.click("#generate")
    body = json.loads(sent.value.post_data)
    assert body["adapters"] == [{"name": "crack", "scale": 1.25}] and "seed" not in body
    assert body["previewMode"] == "PREVIEW_MODE_TINY_VAE"
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Done')")
    assert page.is_hidden("#error"), page.text_content("#error")
    seed = page.get_attribute("figure[data-seed]", "data-seed")
    assert seed and seed.isdigit() and page.input_value("#seed") == seed
    assert not page.is_checked("#seed-keep")

    screenshot = tmp_path / "playground.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"playground screenshot: {screenshot}")


def test_echoed_markup_stays_text(page: Any) -> None:
    """A prompt and a server error message carrying markup are shown as text: no element is made."""
    _open_with_token(page)
    page.fill("#prompt", f"a fox {ATTACK}")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.click("#generate")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Done')")
    assert ATTACK in page.text_content("#echo")

    # The server echoes a value it cannot parse into its error message (the seed is a uint64).
    page.fill("#seed", ATTACK)
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert ATTACK in page.text_content("#error")
    assert "seed" in page.text_content("#error")

    assert page.locator("img[src='x']").count() == 0
    assert page.evaluate("window.__pwned") is None
