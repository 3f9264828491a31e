"""Fixtures that run the app for real: a uvicorn process on a free loopback port."""

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).parent
STARTUP_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


def pytest_configure(config: pytest.Config) -> None:
    # A warning today is tomorrow's breakage: the suite fails on any.
    config.addinivalue_line("filterwarnings", "error")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with code {process.returncode} before listening"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout_s} s")


@dataclass
class Server:
    """A running `uvicorn main:app`, and everything it logged."""

    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(log_path: Path, port: int | None = None, **env: str) -> Server:
    port = port or free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "main:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log_path.open("a") as log:  # uvicorn keeps its own copy of the file handle
        process = subprocess.Popen(
            command,
            cwd=HERE,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(port, process, log_path)
    try:
        wait_for_port(port, process, STARTUP_TIMEOUT_S)
    except (RuntimeError, TimeoutError):
        server.stop()
        raise RuntimeError(f"uvicorn did not start:\n{server.log()}") from None
    return server


def assert_nothing_went_wrong(server: Server) -> None:
    """No traceback and no ERROR line: clients leaving, however rudely, are ordinary."""
    log = server.log()
    assert "Traceback" not in log, log
    assert "ERROR" not in log, log


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = start_server(tmp_path / "uvicorn.log")
    yield running
    running.stop()


def require_program(path_or_name: str, install_hint: str) -> str:
    """The program's path; skipped with a hint when it is missing, but failed under CI=true."""
    found = shutil.which(path_or_name)
    if found:
        return found
    message = f"{path_or_name} is not installed: {install_hint}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
