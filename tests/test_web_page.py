"""The batches page of `tokenmill serve` (tokenmill/server/static/), in a real browser: Debian's
Chromium driven by Playwright, against a real server with an API key.

Skipped where /usr/bin/chromium is missing (`make test` installs it as root). With
TOKENMILL_SCREENSHOT=PATH the page with a finished and a running batch is saved there
(`make screenshot` writes the README's docs/images/batches-page.png).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright
from test_server import API_KEY, Server, batch_file

from tokenmill.endpoints import ENDPOINTS
from tokenmill.server.app import STATIC_DIR

CHROMIUM = Path("/usr/bin/chromium")
# Debian's Chromium headless in a sandbox-less container, quiet: no GPU, no network of its own.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
WAIT_MS = 180_000
# NOTE: a mark, not a check in the browser fixture, so that a skipped test starts no server first.
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (Debian's chromium "
                                    "package; `make test` installs it as root)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Iterator[Server]:
    running = Server(tiny_models["llama"], tmp_path_factory.mktemp("page-server")).start()
    yield running
    running.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page in a fresh context: an empty localStorage, so no key yet."""
    context = browser.new_context(viewport={"width": 1180, "height": 300}, accept_downloads=True)
    yield context.new_page()
    context.close()


def enter_key(page: Page, key: str) -> None:
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#key")).to_be_editable()  # not while the server is asked about the last key
    page.fill("#key", key)
    page.click("#key-form button[type=submit]")


def create_batch(page: Page, path: Path) -> str:
    """Uploads path through the form; returns the new batch's id, as the page reports it."""
    page.set_input_files("#file", str(path))
    expect(page.locator("#endpoint")).to_have_value("/v1/chat/completions")  # read from the file's first line
    page.click("#create")
    status = page.locator("#upload-status")
    expect(status).to_contain_text("Created batch_", timeout=WAIT_MS)
    found = re.search(r"batch_\w+", status.inner_text())
    assert found is not None
    return found.group()


def test_the_page_and_its_files_need_no_key_but_the_api_does(server: Server) -> None:
    page = urllib.request.urlopen(f"{server.url}/")
    assert page.status == 200 and "default-src 'self'" in page.headers["Content-Security-Policy"]
    html = page.read().decode()
    for name in ("app.js", "style.css"):
        assert urllib.request.urlopen(f"{server.url}/static/{name}").read() == (STATIC_DIR / name).read_bytes()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{server.url}/v1/batches")
    assert refused.value.code == 401

    class Options(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.values: list[str] = []
            self.inside = False

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.inside = tag == "option"

        def handle_data(self, data: str) -> None:
            if self.inside:
                self.values.append(data.strip())
                self.inside = False

    options = Options()
    options.feed(html)
    assert options.values == list(ENDPOINTS)  # the page offers every endpoint, and only those


@needs_chromium
def test_a_wrong_key_gets_the_401_and_is_asked_again(server: Server, page: Page) -> None:
    page.goto(server.url)
    expect(page.locator("#key-message")).to_contain_text("401")  # no key yet: the API's answer
    enter_key(page, "wrong-key")
    expect(page.locator("#key-message")).to_contain_text("401 (missing or wrong API key)")
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#content")).to_be_hidden()
    enter_key(page, API_KEY)
    expect(page.locator("#content")).to_be_visible()
    expect(page.locator("#key-form")).to_be_hidden()
    page.reload()  # kept in the browser: not asked again
    expect(page.locator("#content")).to_be_visible()
    assert page.evaluate("localStorage.getItem('tokenmill.apiKey')") == API_KEY


@needs_chromium
def test_the_key_form_waits_for_the_answer_to_its_key(server: Server, page: Page) -> None:
    """A late 401 (a loaded server's) cannot empty the field under the next key being typed: the
    form is disabled until the answer comes."""
    late: list[Route] = []

    def hold_the_wrong_key(route: Route) -> None:
        if route.request.headers.get("authorization") == "Bearer wrong-key":
            late.append(route)
        else:
            route.continue_()

    page.route("**/v1/batches*", hold_the_wrong_key)
    page.goto(server.url)
    enter_key(page, "wrong-key")
    expect(page.locator("#key-message")).to_have_text("Checking the key…")
    expect(page.locator("#key")).to_be_disabled()
    expect(page.locator("#key-form button[type=submit]")).to_be_disabled()
    deadline = time.monotonic() + 5
    while not late and time.monotonic() < deadline:  # the route handler runs as Playwright dispatches events
        page.wait_for_timeout(20)
    assert late, "the wrong key was never sent"
    late.pop().continue_()
    expect(page.locator("#key-message")).to_contain_text("401 (missing or wrong API key)")
    expect(page.locator("#key")).to_be_focused()
    expect(page.locator("#key")).to_have_value("")
    enter_key(page, API_KEY)
    expect(page.locator("#content")).to_be_visible()


@needs_chromium
def test_upload_watch_download_and_cancel(server: Server, page: Page, tmp_path: Path) -> None:
    model = server.client().models.list().data[0].id
    page.goto(server.url)
    enter_key(page, API_KEY)
    expect(page.locator("#model")).to_have_text(model)

    finished = create_batch(page, batch_file(tmp_path / "small.jsonl", model, 12))  # + 2 bad lines
    row = page.locator(f"tr[data-id='{finished}']")
    expect(row).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
    bar = row.locator("[role=progressbar]")
    expect(bar).to_have_attribute("aria-valuemax", "14")
    expect(bar).to_have_attribute("aria-valuenow", "14")  # full: 12 completed, 2 failed
    expect(row.locator(".counts")).to_have_text("12 completed · 2 failed · 14 total")
    expect(row.locator(".speed")).to_contain_text(" out · ")
    expect(row.locator(".hits")).to_have_text(re.compile(r"^\d+\.\d%$"))

    with page.expect_download() as output:
        row.locator("button.output").click()
    output.value.save_as(tmp_path / "output.jsonl")
    records = [json.loads(line) for line in (tmp_path / "output.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in records) == sorted(f"req-{i}" for i in range(12))
    assert all(r["response"]["status_code"] == 200 for r in records)
    with page.expect_download() as errors:
        row.locator("button.errors").click()
    errors.value.save_as(tmp_path / "errors.jsonl")
    assert len((tmp_path / "errors.jsonl").read_text().splitlines()) == 2

    running = create_batch(page, batch_file(tmp_path / "large.jsonl", model, 1000, 64))
    row = page.locator(f"tr[data-id='{running}']")
    expect(page.locator("tbody tr").first).to_have_attribute("data-id", running)  # newest first
    page.wait_for_function(f"""() => {{
        const row = document.querySelector("tr[data-id='{running}']");
        return row.dataset.status === "in_progress" && row.querySelector("[role=progressbar]").ariaValueNow >= 20
            && row.querySelector(".eta").textContent !== "—";
    }}""", timeout=WAIT_MS)
    if "TOKENMILL_SCREENSHOT" in os.environ:
        page.screenshot(path=os.environ["TOKENMILL_SCREENSHOT"])
    row.locator("button.cancel").click()
    expect(row).to_have_attribute("data-status", "cancelled", timeout=WAIT_MS)
    expect(row.locator("button.cancel")).to_be_hidden()
    expect(row.locator("button.output")).to_be_visible()  # the partial results are kept
    batch = server.client().batches.retrieve(running)
    assert batch.status == "cancelled" and 20 <= batch.request_counts.completed < 1000
    expect(row.locator("[role=progressbar]")).to_have_attribute(
        "aria-valuenow", str(batch.request_counts.completed + batch.request_counts.failed))
