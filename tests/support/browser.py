"""A real headless Chromium driven over the Chrome DevTools Protocol: Debian's `chromium`, nothing downloaded.

The browser starts with `--remote-debugging-port=0` and says where it listens on stderr; one page target is
driven over a websocket (the `websockets` client the dev dependencies already have). Enough for the
dashboard's checks: open a URL and wait for the page to load, run JavaScript in it (to read the page, fill a
field, click a button: a real click event, a real form post), and take a screenshot. Every wait has a
deadline. When the browser is missing, tests skip with the reason, except where REQUIRE_BROWSER is set (CI
installs it, and must not skip).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

#: Where Debian's package puts the browser.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
#: Seconds the browser may take to start listening, and one command to answer.
START_S = 30.0
COMMAND_S = 15.0
#: Set in CI: a missing browser fails the browser tests instead of skipping them.
REQUIRE_BROWSER_ENV = "REQUIRE_BROWSER"
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class BrowserMissing(Exception):
    """Raised when no Chromium is installed."""


def find_chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserMissing(
        "no Chromium found: install Debian's, `apt-get install -y chromium chromium-driver` (.ci/run does)"
    )


class Page:
    """One tab, driven by DevTools commands."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self._ids = itertools.count(1)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One command; its result (events that arrive meanwhile are skipped)."""
        command_id = next(self._ids)
        self._socket.send(json.dumps({"id": command_id, "method": method, "params": params}))
        deadline = time.monotonic() + COMMAND_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{method} did not answer within {COMMAND_S:g} s")
            message = json.loads(self._socket.recv(timeout=remaining))
            if message.get("id") != command_id:
                continue
            if "error" in message:
                raise RuntimeError(f"{method} failed: {message['error']}")
            result: dict[str, Any] = message.get("result", {})
            return result

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = COMMAND_S) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout_s
        # An element is returned as true (by value it would be an empty object).
        truthy = f"(value => value instanceof Node ? true : value)({expression})"
        while True:
            with contextlib.suppress(RuntimeError):  # the page may be between two documents
                value = self.evaluate(truthy)
                if value:
                    return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"not true within {timeout_s:g} s: {expression}; page: {self.url()}")
            time.sleep(0.05)

    def open(self, url: str) -> None:
        """Navigate and wait until the new document has loaded."""
        self.send("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def url(self) -> str:
        try:
            return str(self.evaluate("location.href"))
        except RuntimeError:
            return "?"

    def click(self, selector: str) -> None:
        """Click the first element matching `selector` (it must exist)."""
        found = self.evaluate(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            " if (!el) return false; el.click(); return true; })()"
        )
        if not found:
            raise AssertionError(f"nothing matches {selector!r} on {self.url()}")

    def text(self, selector: str = "body") -> str:
        found = f"document.querySelector({json.dumps(selector)})"
        value = self.evaluate(f"(() => {{ const el = {found}; return el ? el.innerText : ''; }})()")
        return str(value or "")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))


@contextlib.contextmanager
def running_chromium(width: int = 1280, height: int = 1000) -> Iterator[Page]:
    """A headless Chromium with one page, closed (and its profile removed) on the way out."""
    binary = find_chromium()
    profile = tempfile.mkdtemp(prefix="chromium-test-")
    process = subprocess.Popen(
        [
            binary,
            "--headless",
            "--no-sandbox",  # root in a container; the pages are our own
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        browser_url = _listening_url(process)
        port = int(browser_url.split(":")[2].split("/")[0])
        page_socket = _page_socket(port)
        with connect(page_socket, max_size=None, open_timeout=COMMAND_S) as socket:
            page = Page(socket)
            page.send("Page.enable")
            page.send("Runtime.enable")
            yield page
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(profile, ignore_errors=True)


def _listening_url(process: subprocess.Popen[str]) -> str:
    found: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            match = _LISTENING.search(line)
            if match and not found:
                found.append(match.group(1))
                done.set()
        done.set()

    threading.Thread(target=read, name="chromium-stderr", daemon=True).start()
    if not done.wait(START_S) or not found:
        raise TimeoutError(f"Chromium did not open its DevTools port within {START_S:g} s")
    return found[0]


def _page_socket(port: int) -> str:
    """The websocket of the browser's page (the about:blank tab it started with)."""
    deadline = time.monotonic() + START_S
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=COMMAND_S) as response:
            targets = json.loads(response.read())
        pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
        if pages:
            return str(pages[0]["webSocketDebuggerUrl"])
        if time.monotonic() >= deadline:
            raise TimeoutError("Chromium has no page to drive")
        time.sleep(0.05)
