"""The built-in web chat page (`qwen3next/server/static`, mounted by `mount_web`) end to end: a real uvicorn server
on loopback over the embedded demo model, driven by Debian's Chromium (headless) through Playwright's Python API.

Skips when /usr/bin/chromium or the playwright module is missing (CI installs both: .ci/run, the `test` extra).
Playwright's own browser downloads are never used."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.responses import PlainTextResponse
from test_server import ReadyServer

from qwen3next.engine.llm import DEFAULT_MODEL, LLM
from qwen3next.server.app import create_app
from qwen3next.server.web import CONTENT_SECURITY_POLICY, SECURITY_HEADERS, STATIC_DIR, mount_web

CHROMIUM = Path("/usr/bin/chromium")
MODEL = "demo"
KEY = "web-test-key"
MAX_LEN = 2048
PREFIX = "/chat"  # the sub-path of the reverse proxy in test_page_works_under_a_sub_path
TIMEOUT_MS = 30_000  # generous for a loaded 2-core machine; every wait below normally takes well under a second
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def behind_proxy(app, prefix: str):
    """What a reverse proxy that publishes the server under `prefix` does (nginx `location /chat/ { proxy_pass
    http://backend/; }`): answers only below `prefix/` and hands the rest of the path to the server, so a root-relative
    URL such as `/static/app.js` or `/v1/models` comes back 404."""
    async def proxy(scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]
            if not path.startswith(prefix + "/"):
                await PlainTextResponse(f"not under {prefix}/", status_code=404)(scope, receive, send)
                return
            scope = {**scope, "path": path[len(prefix):], "raw_path": path[len(prefix):].encode()}
        await app(scope, receive, send)

    return proxy


@contextmanager
def serving(llm: LLM, api_key: str | None, prefix: str | None = None) -> Iterator[str]:
    """create_app + mount_web on a free loopback port in a background thread (behind a proxy's sub-path `prefix` if
    given); yields the base URL."""
    app = create_app(llm, MODEL, api_key)
    mount_web(app)
    mount_web(app)  # idempotent (create_app may mount the page itself one day)
    if prefix is not None:
        app = behind_proxy(app, prefix)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = ReadyServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(30), "server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def llm():
    llm = LLM(DEFAULT_MODEL, max_model_len=MAX_LEN, max_memory="64MiB", max_num_seqs=2)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def open_url(llm):
    with serving(llm, None) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_url(llm):
    with serving(llm, KEY) as url:
        yield url


@pytest.fixture(scope="module")
def proxied_url(llm):
    with serving(llm, None, PREFIX) as url:
        yield url + PREFIX


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.skip(f"the playwright module is missing ({e}; it is in the `test` extra)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def page_of(browser, url: str, **options):
    """A page in a fresh context (own localStorage) with `url` loaded; fails the test on any uncaught JS error."""
    context = browser.new_context(viewport={"width": 1000, "height": 760}, **options)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    try:
        yield page
        assert errors == [], errors
    finally:
        context.close()


def expect(locator):
    from playwright.sync_api import expect as pw_expect
    return pw_expect(locator)


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_not_blank(png: bytes, size: tuple[int, int]) -> None:
    from PIL import Image  # a dependency of matplotlib, which the `test` extra installs

    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == size
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20, "the screenshot is (nearly) one colour"
    # no single colour covers almost everything: text, borders and bubbles are drawn
    assert max(n for n, _ in colours) < 0.97 * size[0] * size[1]


# ---- serving (no browser) ----------------------------------------------------------------------------------------


def test_page_and_static_files_are_served_without_a_key(keyed_url):
    with httpx.Client(base_url=keyed_url, timeout=30) as http:
        index = http.get("/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert "marked 18.2.1" in index.text and "dompurify 3.5.0" in index.text
        for name, kind in [("app.js", "javascript"), ("style.css", "text/css"), ("vendor/marked.umd.js", "javascript"),
                           ("vendor/purify.min.js", "javascript")]:
            assert f'"static/{name}"' in index.text
            r = http.get(f"/static/{name}")
            assert r.status_code == 200 and kind in r.headers["content-type"], name
            assert r.content == (STATIC_DIR / name).read_bytes()
        assert http.head("/").status_code == 200
        assert http.get("/static/nope.js").status_code == 404
        assert http.get("/v1/models").status_code == 401  # the API itself still wants the key
        paths = http.get("/openapi.json").json()["paths"]
        assert "/" not in paths and not any(p.startswith("/static") for p in paths)
    for name in ("marked.LICENSE.md", "dompurify.LICENSE", "dompurify.LICENSE-MPL"):
        assert (STATIC_DIR / "vendor" / name).stat().st_size > 1000


def test_security_headers(keyed_url):
    """The page and every file under /static (a 404 and a 304 too) come with the CSP (frame-ancestors 'none', which a
    <meta> policy cannot set), X-Frame-Options DENY, nosniff and no-referrer; the policy is no longer in the page."""
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
    policy = {d.split()[0]: d.split()[1:] for d in CONTENT_SECURITY_POLICY.split("; ")}
    assert policy == {"default-src": ["'self'"], "script-src": ["'self'"], "style-src": ["'self'"],
                      "img-src": ["'self'", "data:"], "connect-src": ["'self'"], "object-src": ["'none'"],
                      "base-uri": ["'none'"], "form-action": ["'none'"], "frame-ancestors": ["'none'"]}
    expected = {"content-security-policy": CONTENT_SECURITY_POLICY, "x-frame-options": "DENY",
                "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}
    assert SECURITY_HEADERS == expected
    with httpx.Client(base_url=keyed_url, timeout=30) as http:
        index = http.get("/")
        answers = [index, http.head("/"), http.get("/static/app.js"), http.get("/static/style.css"),
                   http.get("/static/vendor/purify.min.js"), http.get("/static/nope.js")]
        etag = answers[2].headers["etag"]
        answers.append(http.get("/static/app.js", headers={"if-none-match": etag}))
        assert [r.status_code for r in answers] == [200, 200, 200, 200, 200, 404, 304]
        for r in answers:
            for name, value in expected.items():
                assert r.headers.get(name) == value, (r.url, name)
        assert index.headers["cache-control"] == "no-cache"
        assert not re.search(r"<meta[^>]*http-equiv", index.text, re.I)  # no <meta> policy left behind


def test_page_urls_are_relative():
    """Script, style sheet and API URLs resolve against the page's address (works under a proxy's sub-path)."""
    index = (STATIC_DIR / "index.html").read_text()
    app_js = (STATIC_DIR / "app.js").read_text()
    urls = re.findall(r'\b(?:src|href)="([^"]*)"', index)
    assert sorted(urls) == sorted(["data:,", "static/style.css", "static/vendor/marked.umd.js",
                                   "static/vendor/purify.min.js", "static/app.js"])
    assert sorted(re.findall(r"\bfetch\(\s*'([^']*)'", app_js)) == ["v1/chat/completions", "v1/models"]
    for text in (index, app_js):
        assert not re.search(r"""(?:src|href)=["']/|fetch\(\s*[`'"]/|["'`]/(?:static|v1)/""", text)


# ---- the page in Chromium ----------------------------------------------------------------------------------------


def test_chat_streams_stops_and_resets(browser, llm, open_url, tmp_path):
    with page_of(browser, open_url) as page:
        expect(page.locator("#model")).to_have_text(MODEL)
        expect(page.locator("#error")).to_be_hidden()
        expect(page.locator("#stop")).to_be_disabled()

        # 1. a short reply, streamed to its end
        page.fill("#input", "Hello!")
        page.press("#input", "Enter")
        first = page.locator(".msg.assistant").nth(0)
        expect(first).to_have_attribute("data-state", "done")
        assert first.locator(".body").inner_text().strip()
        expect(first.locator(".meta")).to_contain_text("tokens")
        expect(page.locator(".msg.user .body")).to_have_text("Hello!")
        expect(page.locator("#input")).to_have_value("")

        # 2. a long one (ignore_eos, a large max_tokens): it streams, then Stop ends it
        page.fill("#system", "You are a helpful assistant.")
        page.fill("#temperature", "0.8")
        page.fill("#top-p", "0.9")
        page.fill("#max-tokens", "1800")
        page.fill("#seed", "7")
        page.fill("#extra", '{"ignore_eos": true}')
        page.fill("#input", "Tell me a long story.")
        # note when the Markdown of the reply is rendered (app.js looks up window.marked.parse at each render)
        page.evaluate("""() => {
            const parse = window.marked.parse;
            window.parseTimes = [];
            const timed = (...args) => { window.parseTimes.push(performance.now()); return parse(...args); };
            window.marked = { parse: timed };
        }""")
        with page.expect_request("**/v1/chat/completions") as sent:
            page.click("#send")
        body = sent.value.post_data_json
        assert body["stream"] is True and body["model"] == MODEL and body["ignore_eos"] is True
        assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.8, 0.9, 1800, 7)
        assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
        assert [m["role"] for m in body["messages"][1:]] == ["user", "assistant", "user"]
        assert "tools" not in body

        second = page.locator(".msg.assistant").nth(1)
        expect(second).to_have_attribute("data-state", "streaming")
        expect(page.locator("#stop")).to_be_enabled()
        expect(page.locator("#send")).to_be_disabled()
        reply = second.locator(".body")
        lengths = [len(reply.inner_text())]
        for _ in range(3):  # the text grows while the reply streams
            page.wait_for_timeout(150)
            lengths.append(len(reply.inner_text()))
        wait_until(lambda: len(reply.inner_text()) > lengths[-1] > lengths[0], what="the reply to grow")
        running = wait_until(lambda: list(llm.engine.requests.values()), what="the engine request")
        assert len(running) == 1
        request = running[0]

        page.click("#stop")
        expect(second).to_have_attribute("data-state", "stopped")
        expect(second.locator(".meta")).to_contain_text("stopped")
        expect(page.locator("#stop")).to_be_disabled()
        expect(page.locator("#send")).to_be_enabled()
        expect(page.locator("#error")).to_be_hidden()
        # the server saw the connection close and aborted the generation well before max_tokens
        assert request.done.wait(10)
        output = request.output()
        assert output.finish_reason == "abort" and len(output.token_ids) < 1800
        wait_until(lambda: llm.stats()["running"] == 0 and llm.stats()["waiting"] == 0, what="an idle engine")
        stopped_text = reply.inner_text()
        page.wait_for_timeout(300)
        assert reply.inner_text() == stopped_text  # nothing arrives after Stop
        # throttled: while it streamed, renders were >= 100 ms apart (not one per chunk or frame); one more at Stop
        times = page.evaluate("window.parseTimes")
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(times) >= 4 and min(gaps[:-1]) >= 95, gaps
        assert page.evaluate("window.parseTimes.length") == len(times)

        png = page.screenshot(path=str(tmp_path / "chat.png"))
        assert (tmp_path / "chat.png").stat().st_size > 0
        assert_not_blank(png, (1000, 760))

        # 3. the next turn sends the stopped reply as history; then a reset empties the conversation
        page.fill("#extra", "")
        page.fill("#max-tokens", "8")
        with page.expect_request("**/v1/chat/completions") as sent:
            page.fill("#input", "Thanks.")
            page.press("#input", "Enter")
        history = sent.value.post_data_json["messages"]
        assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert history[4]["content"] and "tool_calls" not in history[4]  # the stopped reply, as far as it got
        expect(page.locator(".msg.assistant").nth(2)).to_have_attribute("data-state", "done")
        expect(second).to_have_attribute("data-history", "kept")
        page.click("#reset")
        expect(page.locator(".msg")).to_have_count(0)
        expect(page.locator("#empty")).to_be_visible()
        with page.expect_request("**/v1/chat/completions") as sent:
            page.fill("#input", "Hi again.")
            page.press("#input", "Enter")
        assert [m["role"] for m in sent.value.post_data_json["messages"]] == ["system", "user"]
        expect(page.locator(".msg.assistant")).to_have_attribute("data-state", "done")

        # 4. settings survive a reload (localStorage); the conversation does not
        page.reload()
        expect(page.locator("#model")).to_have_text(MODEL)
        expect(page.locator("#system")).to_have_value("You are a helpful assistant.")
        expect(page.locator("#max-tokens")).to_have_value("8")
        expect(page.locator(".msg")).to_have_count(0)

        # 5. the policy comes as a header and holds: no <meta> policy, an inline script does not run
        assert page.locator('meta[http-equiv="Content-Security-Policy" i]').count() == 0
        ran = page.evaluate("""() => {
            const s = document.createElement('script');
            s.textContent = 'window.inlineRan = true';
            document.body.append(s);
            return window.inlineRan === true;
        }""")
        assert ran is False


def _sse(*events) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def _chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": MODEL, "choices": choices,
            "usage": usage}


MARKDOWN = ("# Title\n\nSome *emphasis*, **strong** and `code`, a [link](https://example.com/).\n\n- one\n- two\n\n"
            "```python\nprint('hi')\n```\n\n<img src=x onerror=\"window.pwned=1\"><script>window.pwned=2</script>"
            "[bad](javascript:window.pwned=3) <b onclick=\"window.pwned=4\">bold</b>")


def test_markdown_tool_calls_and_stream_errors(browser, open_url):
    """Replies with Markdown, an injection attempt, a tool call in pieces and an error event, served by a route that
    answers /v1/chat/completions in the browser (the demo model writes none of these on demand)."""
    with page_of(browser, open_url) as page:
        expect(page.locator("#model")).to_have_text(MODEL)
        pieces = [MARKDOWN[i:i + 17] for i in range(0, len(MARKDOWN), 17)]
        body = _sse(_chunk({"role": "assistant", "content": ""}), *[_chunk({"content": p}) for p in pieces],
                    _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                            "function": {"name": "get_weather", "arguments": '{"city": '}}]}),
                    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
                    _chunk({}, "tool_calls"), _chunk(usage={"prompt_tokens": 5, "completion_tokens": 42,
                                                            "total_tokens": 47}), "[DONE]")
        page.route("**/v1/chat/completions",
                   lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
        page.fill("#tools", json.dumps(TOOLS))
        with page.expect_request("**/v1/chat/completions") as sent:
            page.fill("#input", "What is the weather in Paris?")
            page.press("#input", "Enter")
        assert sent.value.post_data_json["tools"] == TOOLS
        msg = page.locator(".msg.assistant")
        expect(msg).to_have_attribute("data-state", "done")
        reply = msg.locator(".body")
        expect(reply.locator("h1")).to_have_text("Title")
        expect(reply.locator("em")).to_have_text("emphasis")
        expect(reply.locator("strong")).to_have_text("strong")
        expect(reply.locator("li")).to_have_count(2)
        expect(reply.locator("pre code")).to_have_text("print('hi')\n")
        link = reply.locator('a[href="https://example.com/"]')
        expect(link).to_have_attribute("target", "_blank")
        expect(link).to_have_attribute("rel", "noopener noreferrer")
        expect(reply.locator("b")).to_have_text("bold")
        for unsafe in ("script", "[onerror]", "[onclick]", 'a[href^="javascript"]'):
            expect(reply.locator(unsafe)).to_have_count(0)
        assert page.evaluate("window.pwned") is None
        expect(msg.locator(".tool-call .tool-name")).to_have_text("get_weather")
        expect(msg.locator(".tool-call .tool-args")).to_have_text('{\n  "city": "Paris"\n}')
        expect(msg.locator(".meta")).to_have_text(re.compile(r"^42 tokens · [0-9.]+ tok/s · tool_calls$"))
        # the tool call goes back as history in the next request
        page.unroute("**/v1/chat/completions")
        error = _sse(_chunk({"role": "assistant", "content": ""}), _chunk({"content": "Partial"}),
                     {"error": {"message": "the request was aborted by the engine", "type": "server_error"}}, "[DONE]")
        page.route("**/v1/chat/completions",
                   lambda route: route.fulfill(status=200, content_type="text/event-stream", body=error))
        with page.expect_request("**/v1/chat/completions") as sent:
            page.fill("#input", "And tomorrow?")
            page.press("#input", "Enter")
        call = sent.value.post_data_json["messages"][1]
        assert call["role"] == "assistant" and call["tool_calls"] == [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
        # an error event mid-stream: the partial reply stays, marked failed, and the error is shown
        failed = page.locator(".msg.assistant").nth(1)
        expect(failed).to_have_attribute("data-state", "error")
        expect(failed.locator(".body")).to_have_text("Partial")
        expect(page.locator("#error")).to_have_text("Error: the request was aborted by the engine")
        expect(failed).to_have_attribute("data-history", "left-out")
        expect(failed.locator(".meta")).to_contain_text("failed · not in history")

        # an empty reply (no text, no tool call) is shown but not kept either
        page.unroute("**/v1/chat/completions")
        empty = _sse(_chunk({"role": "assistant", "content": ""}), _chunk({}, "stop"), "[DONE]")
        page.route("**/v1/chat/completions",
                   lambda route: route.fulfill(status=200, content_type="text/event-stream", body=empty))
        with page.expect_request("**/v1/chat/completions") as sent:
            page.fill("#input", "Say nothing.")
            page.press("#input", "Enter")
        roles = [(m["role"], m["content"]) for m in sent.value.post_data_json["messages"]]
        assert roles == [("user", "What is the weather in Paris?"), ("assistant", MARKDOWN), ("user", "And tomorrow?"),
                         ("user", "Say nothing.")]  # the failed reply's "Partial" is not sent
        blank = page.locator(".msg.assistant").nth(2)
        expect(blank).to_have_attribute("data-state", "done")
        expect(blank).to_have_attribute("data-history", "left-out")
        expect(blank.locator(".meta")).to_contain_text("not in history")

        # a reply stopped before any text came is not kept: the request hangs until Stop
        page.unroute("**/v1/chat/completions")
        held = []
        page.route("**/v1/chat/completions", lambda route: held.append(route))
        with page.expect_request("**/v1/chat/completions") as sent:
            page.fill("#input", "Wait.")
            page.press("#input", "Enter")
        roles = [m["role"] for m in sent.value.post_data_json["messages"]]
        assert roles == ["user", "assistant", "user", "user", "user"]  # the empty reply is not sent
        wait_until(lambda: held, what="the held request")
        page.click("#stop")
        halted = page.locator(".msg.assistant").nth(3)
        expect(halted).to_have_attribute("data-state", "stopped")
        expect(halted).to_have_attribute("data-history", "left-out")
        expect(halted.locator(".meta")).to_have_text("stopped · not in history")
        page.unroute("**/v1/chat/completions")
        partial = _sse(_chunk({"role": "assistant", "content": ""}), _chunk({"content": "Fine."}), _chunk({}, "stop"),
                       "[DONE]")
        page.route("**/v1/chat/completions",
                   lambda route: route.fulfill(status=200, content_type="text/event-stream", body=partial))
        with page.expect_request("**/v1/chat/completions") as sent:
            page.fill("#input", "Well?")
            page.press("#input", "Enter")
        roles = [m["role"] for m in sent.value.post_data_json["messages"]]
        assert roles == ["user", "assistant", "user", "user", "user", "user"]
        expect(page.locator(".msg.assistant").nth(4)).to_have_attribute("data-history", "kept")


def test_api_key(browser, keyed_url):
    with page_of(browser, keyed_url) as page:
        # no key: the page loads, GET /v1/models and a chat request show the server's 401
        error = page.locator("#error")
        expect(error).to_contain_text("Error 401: invalid or missing API key")
        expect(page.locator("#model")).to_have_class("model bad")
        page.fill("#input", "Hello!")
        page.press("#input", "Enter")
        expect(error).to_contain_text("Error 401: invalid or missing API key")
        expect(page.locator(".msg")).to_have_count(0)  # the turn is undone and the text given back
        expect(page.locator("#input")).to_have_value("Hello!")
        expect(page.locator("#send")).to_be_enabled()

        # with the key: the model loads, the error goes, the chat works, and the key survives a reload
        page.fill("#api-key", KEY)
        page.press("#api-key", "Tab")  # `change` stores it and reloads the model list
        expect(page.locator("#model")).to_have_text(MODEL)
        expect(error).to_be_hidden()
        page.fill("#max-tokens", "6")
        with page.expect_request("**/v1/chat/completions") as sent:
            page.click("#send")
        assert sent.value.headers["authorization"] == f"Bearer {KEY}"
        expect(page.locator(".msg.assistant")).to_have_attribute("data-state", "done")
        expect(error).to_be_hidden()
        page.reload()
        expect(page.locator("#api-key")).to_have_value(KEY)
        expect(page.locator("#model")).to_have_text(MODEL)

        # a wrong key: the error again
        page.fill("#api-key", "wrong")
        page.press("#api-key", "Tab")
        expect(error).to_contain_text("Error 401")


def test_page_works_under_a_sub_path(browser, proxied_url):
    """Behind a reverse proxy that publishes the server under /chat/, the page loads its script, style sheet and
    libraries and calls the API below /chat/ (root-relative URLs would get the proxy's 404)."""
    with page_of(browser, proxied_url) as page:
        failed: list[str] = []
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        expect(page.locator("#model")).to_have_text(MODEL)
        assert page.evaluate("!!(window.marked && window.DOMPurify)")
        assert page.evaluate("document.styleSheets.length === 1 && document.styleSheets[0].cssRules.length > 20")
        page.fill("#max-tokens", "8")
        with page.expect_request("**/v1/chat/completions") as sent:
            page.fill("#input", "Hello!")
            page.press("#input", "Enter")
        assert sent.value.url == f"{proxied_url}/v1/chat/completions"
        msg = page.locator(".msg.assistant")
        expect(msg).to_have_attribute("data-state", "done")
        assert msg.locator(".body").inner_text().strip()
        expect(page.locator("#error")).to_be_hidden()
        assert failed == []
    with httpx.Client(timeout=30) as http:  # and the proxy does refuse what is not under its sub-path
        assert http.get(proxied_url.removesuffix(PREFIX) + "/static/app.js").status_code == 404
        assert http.get(proxied_url + "/static/app.js").status_code == 200
