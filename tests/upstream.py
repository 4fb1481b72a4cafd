"""The project's ASGI app (project/asgi.py) under uvicorn, in a background thread, on a free
loopback port: for tests (and benches) that need a real socket, such as the ``openai`` SDK,
whose own HTTP stack no transport mock intercepts.

Fixtures (registered in tests/conftest.py):

- ``asgi_server`` (session): the running server; ``asgi_server.url`` is
  ``http://127.0.0.1:<port>``. It serves every URL of the project, so the tests of the
  gateway can use it as well as those of the fake LLM. It runs in this process: settings a
  test changes (e.g. ``ragcache_prefix``'s key prefix) apply to it too. Views that use the
  database need ``transactional_db`` (the server thread has its own connection and sees only
  committed rows).
- ``fake_llm``: the fake OpenAI-compatible upstream (project/demo/fake_upstream.py) on that
  server, with no delays unless a request asks for them, and its call records reset;
  ``fake_llm.base_url`` for ``openai.OpenAI(base_url=...)``, ``fake_llm.client()`` /
  ``fake_llm.async_client()`` for ready clients (no retries), ``fake_llm.call_count(messages)``.

Outside pytest: ``with LiveASGIServer() as server: ...`` (Django must be set up first).
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

FAKE_LLM_PATH = "/fake-llm/v1"
API_KEY = "sk-test-fake-llm"


class LiveASGIServer:
    """uvicorn serving ``app`` (default: project.asgi.application) in a daemon thread."""

    def __init__(self, app: Any = None, *, host: str = "127.0.0.1", log_level: str = "warning") -> None:
        import uvicorn

        if app is None:
            from project.asgi import application as app
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))  # bound before the thread starts: no port race
        self.host, self.port = host, self._socket.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_level=log_level, access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> LiveASGIServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> LiveASGIServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


class FakeLLM:
    """The fake upstream on a live server: its URL, ready clients, and its call records."""

    def __init__(self, server: LiveASGIServer) -> None:
        from project.demo import fake_upstream

        self.server = server
        self.module = fake_upstream
        self.base_url = server.url + FAKE_LLM_PATH
        self.api_key = API_KEY

    def client(self, **options: Any):
        import openai

        return openai.OpenAI(**{"base_url": self.base_url, "api_key": self.api_key, "max_retries": 0, **options})

    def async_client(self, **options: Any):
        import openai

        return openai.AsyncOpenAI(**{"base_url": self.base_url, "api_key": self.api_key, "max_retries": 0,
                                     **options})

    def call_count(self, messages: Any = None) -> int:
        return self.module.call_count(messages)

    def calls(self, messages: Any = None) -> list:
        return self.module.calls(messages)


@pytest.fixture(scope="session")
def asgi_server():
    server = LiveASGIServer().start()
    yield server
    server.stop()


@pytest.fixture
def fake_llm(asgi_server, settings):
    """The fake LLM with no delays by default (``delay=``/``first=`` in a request set them)."""
    from project.demo import fake_upstream

    settings.DEMO_LLM_FIRST_CHUNK_MS = 0
    settings.DEMO_LLM_CHUNK_DELAY_MS = 0
    settings.DEMO_LLM_API_KEY = None
    fake_upstream.reset()
    yield FakeLLM(asgi_server)
    fake_upstream.reset()
