"""A local Slack Web API: a real HTTP server on 127.0.0.1 that speaks enough of chat.postMessage.

with FakeSlack(token="xoxb-test") as slack:
    client = WebClient(token="xoxb-test", base_url=slack.base_url)
    client.chat_postMessage(channel="#x", text="hi")
    assert slack.messages[0]["text"] == "hi"
"""

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs


class FakeSlack:
    def __init__(self, token: str = "xoxb-fake-token") -> None:
        self.token = token
        self.messages: list[dict[str, Any]] = []  # accepted chat.postMessage payloads
        self.calls = 0  # every request, accepted or not
        self._failures: list[str] = []
        self._lock = threading.Lock()
        self._ts = itertools.count(1)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def fail_next(self, count: int, mode: str = "http_500") -> None:
        """Makes the next `count` calls fail: mode "http_500" or "ratelimited" (ok=false)."""
        if mode not in ("http_500", "ratelimited"):
            raise ValueError(f"unknown failure mode {mode!r}")
        with self._lock:
            self._failures = [mode] * count

    def start(self) -> "FakeSlack":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "FakeSlack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answer(self, path: str, auth: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.calls += 1
            failure = self._failures.pop(0) if self._failures else None
        if failure == "http_500":
            return 500, {"ok": False, "error": "internal_error"}
        if failure == "ratelimited":
            return 200, {"ok": False, "error": "ratelimited"}
        if path != "/api/chat.postMessage":
            return 404, {"ok": False, "error": "unknown_method"}
        token = auth.removeprefix("Bearer ").strip() or payload.get("token")
        if not token:
            return 200, {"ok": False, "error": "not_authed"}
        if token != self.token:
            return 200, {"ok": False, "error": "invalid_auth"}
        if not payload.get("channel"):
            return 200, {"ok": False, "error": "channel_not_found"}
        if not (payload.get("text") or payload.get("blocks")):
            return 200, {"ok": False, "error": "no_text"}
        with self._lock:
            self.messages.append(payload)
            ts = f"{int(time.time())}.{next(self._ts):06d}"
        return 200, {"ok": True, "channel": payload["channel"], "ts": ts, "message": payload}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get_content_type() == "application/json":
                    payload = json.loads(body or b"{}")
                else:
                    form = parse_qs(body.decode("utf-8"))
                    payload = {key: values[-1] for key, values in form.items()}
                status, answer = fake._answer(
                    self.path, self.headers.get("Authorization", ""), payload
                )
                data = json.dumps(answer).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output quiet

        return Handler
