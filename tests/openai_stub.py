"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests, scripted by a Python function.

It is a test double for a *remote, paid* service (an LLM behind the chat-completions API). The
client side is the real ``openai`` package talking real HTTP, so timeouts, HTTP errors and parsing
are exercised exactly as in production.

    def handler(request: dict) -> str | list[str] | Reply: ...
    with ChatStub(handler) as stub:
        client = openai.OpenAI(base_url=stub.base_url, api_key="test")

``request`` is the parsed JSON body of ``POST /v1/chat/completions``. Return the reply text (or a
list of texts, one choice each), or a ``Reply`` for a status code or a delay.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Reply:
    content: str | list[str] = ""
    status: int = 200
    delay: float = 0.0  # seconds to sleep before answering (to trigger client timeouts)
    finish_reason: str = "stop"


@dataclass
class ChatStub:
    handler: Callable[[dict], "str | list[str] | Reply"]
    requests: list[dict] = field(default_factory=list)

    def __enter__(self) -> "ChatStub":
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                reply = stub.handler(body)
                if not isinstance(reply, Reply):
                    reply = Reply(content=reply)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.status != 200:
                    payload = {"error": {"message": "stub error", "type": "server_error", "code": reply.status}}
                else:
                    contents = reply.content if isinstance(reply.content, list) else [reply.content]
                    payload = {
                        "id": "chatcmpl-stub",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", "stub"),
                        "choices": [
                            {
                                "index": i,
                                "finish_reason": reply.finish_reason,
                                "message": {"role": "assistant", "content": text},
                            }
                            for i, text in enumerate(contents)
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                data = json.dumps(payload).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 64  # many concurrent clients (the default backlog of 5 stalls them)

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"
