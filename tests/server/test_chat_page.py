"""The chat page at / in a real headless Chromium, against a real server on the default model.

Chromium is driven by the DevTools protocol over a pipe (--remote-debugging-pipe: JSON messages ending in NUL on
fds 3 and 4), so the test needs only the standard library and Debian's `chromium` package."""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NAME = "smollm2"
QUESTION = "What is the capital of France? Answer in one sentence."

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None and not os.path.exists("/usr/bin/chromium"),
                                reason="needs Debian's chromium (apt-get install chromium chromium-driver)")


class Chromium:
    """A headless Chromium with one page, driven over the DevTools pipe."""

    def __init__(self, profile: Path, log: Path, width: int = 1280, height: int = 820) -> None:
        to_browser, self._to_browser = (_above_4(fd) for fd in os.pipe())
        self._from_browser, from_browser = (_above_4(fd) for fd in os.pipe())
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-extensions", "--mute-audio",
                f"--window-size={width},{height}", f"--user-data-dir={profile}",
                "--remote-debugging-pipe", "about:blank"]
        # Chromium reads commands on fd 3 and writes replies on fd 4: bash puts the pipe ends there (dash takes
        # one-digit fds only).
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(["bash", "-c", f'exec "$@" 3<&{to_browser} 4>&{from_browser}', "bash", *args],
                                         pass_fds=(to_browser, from_browser), stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, start_new_session=True)
        os.close(to_browser)
        os.close(from_browser)
        self._next_id, self._buffer, self.session = 0, b"", None
        self.exceptions: list[str] = []  # uncaught JavaScript errors on the page
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Runtime.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)  # --window-size counts the (invisible) browser frame in
        except Exception:
            self.close()
            raise

    def call(self, method: str, timeout: float = 20.0, **params) -> dict:
        """Send one DevTools command (to the page once attached) and return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, method)
            if reply.get("method") == "Runtime.exceptionThrown":
                details = reply["params"]["exceptionDetails"]
                self.exceptions.append(details.get("exception", {}).get("description") or details.get("text"))
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self, deadline: float, method: str) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer {method}")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def js(self, expression: str):
        """Evaluate JavaScript on the page (promises awaited) and return its value."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            if time.monotonic() > deadline:
                state = self.js("JSON.stringify({state: document.body.dataset.state, error: $('error').textContent,"
                                " messages: [...document.querySelectorAll('.msg')].map(m => m.textContent)})")
                raise AssertionError(f"timed out waiting for {expression}; page: {state}")
            time.sleep(0.05)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && typeof send === 'function'")

    def type(self, selector: str, text: str) -> None:
        """Focus the field and type into it as a keyboard would (input events included)."""
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        x, y = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                       " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def set_value(self, selector: str, value: str) -> None:
        self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.value = {json.dumps(value)};"
                " e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change')); })()")

    def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(png)
        return png

    def close(self) -> None:
        try:
            self.session = None
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the browser and its helpers: a session of their own
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _above_4(fd: int) -> int:
    """Move a pipe end above fd 4, so bash's `3<&n 4>&m` cannot clobber it."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


def test_chat_page(server, tmp_path):
    with Chromium(tmp_path / "profile", tmp_path / "chromium.log") as page:
        page.open(server["url"] + "/")
        page.wait_for(f"$('model').value === {json.dumps(NAME)}")  # from GET /v1/models
        assert "Context:" in page.js("$('model-info').textContent")
        # Record what the page sends, and every change to the messages (to see the answer arrive in pieces).
        page.js("window.sent = []; const realFetch = window.fetch; window.fetch = (url, options) => {"
                " if (options && options.body) sent.push(JSON.parse(options.body)); return realFetch(url, options); };"
                " window.updates = 0; new MutationObserver(() => updates++).observe($('messages'),"
                " {childList: true, subtree: true, characterData: true});")
        page.set_value("#temperature", "0")
        page.set_value("#max-tokens", "48")

        page.type("#message", QUESTION)
        page.press_enter()  # Enter sends
        page.wait_for("document.body.dataset.state === 'idle' && document.querySelectorAll('.msg.assistant').length"
                      " === 1")
        answer = page.js("document.querySelector('.msg.assistant').textContent")
        assert "Paris" in answer, answer
        assert page.js("updates") >= 3, "the answer came in one piece, not streamed"
        assert page.js("$('message').value") == "" and page.js("$('error').textContent") == ""
        assert page.js("$('stop').disabled") and not page.js("$('send').disabled")

        page.type("#message", "And of Germany?")
        page.click("#send")
        page.wait_for("document.body.dataset.state === 'idle' && document.querySelectorAll('.msg.assistant').length"
                      " === 2")
        assert page.js("document.querySelectorAll('#messages > .msg.user').length") == 2
        first, second = page.js("sent")
        assert first["stream"] is True and first["temperature"] == 0 and first["max_tokens"] == 48
        assert first["model"] == NAME and first["messages"] == [{"role": "user", "content": QUESTION}]
        assert second["messages"] == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer},
                                      {"role": "user", "content": "And of Germany?"}]  # the history is kept

        shot = tmp_path / "chat_page.png"
        png = page.screenshot(shot)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        try:
            from PIL import Image
        except ImportError:
            pass
        else:
            with Image.open(shot) as image:
                assert image.size == (1280, 820)
                low, high = zip(*image.convert("RGB").getextrema())
                assert low != high, "the screenshot is a single colour"

        # Stop aborts the answer in flight and keeps what came.
        page.set_value("#max-tokens", "400")
        page.type("#message", "Write a long story about the sea.")
        page.click("#send")
        page.wait_for("(document.querySelectorAll('.msg.assistant')[2] || {}).textContent?.length > 10")
        page.click("#stop")
        page.wait_for("document.body.dataset.state === 'idle'")
        assert "Stopped." in page.js("document.querySelectorAll('.msg.assistant')[2].textContent")

        page.click("#new-chat")
        assert page.js("document.querySelectorAll('#messages .msg').length") == 0

        # An OpenAI error comes back inline, in red, and the message waits in the box to be sent again.
        page.set_value("#model", "gpt-4")
        page.type("#message", "Hi")
        page.press_enter()
        page.wait_for("$('error').textContent.includes('does not exist')")
        assert page.js("getComputedStyle($('error')).color") == "rgb(180, 35, 24)"
        assert page.js("$('message').value") == "Hi"
        assert page.js("document.querySelectorAll('#messages .msg').length") == 0
        assert page.js("sent.at(-1).messages") == [{"role": "user", "content": "Hi"}]  # a new chat: no history

        assert page.exceptions == []

    engine = server["engine"]
    deadline = time.time() + 10  # the aborted answer is let go asynchronously
    while (engine.has_unfinished_requests() or engine.block_manager.num_used_blocks) and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0
