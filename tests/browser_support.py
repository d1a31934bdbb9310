"""A throwaway JupyterLab server and headless Chromium for tests/test_browser.py.

The server runs on 127.0.0.1 on a free port with a random token, with its config, runtime,
data, settings and workspace folders in a temporary directory, and serves a copy of
notebooks/, so running cells there never saves over the repository."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "tests" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
# windowingMode "none": JupyterLab otherwise leaves off-screen cells unrendered.
SETTINGS = {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
            "@jupyterlab/apputils-extension/notification": {"fetchNews": "false"}}


def chromium_or_skip() -> str:
    """Chromium's path. Without Chromium or Playwright: fail in CI (CI=true), else skip and
    say how to enable the browser tests."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    missing = [] if chromium else ["Chromium (as root: apt-get install -y chromium)"]
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("Playwright (.venv/bin/pip install -e '.[test]')")
    if missing:
        message = ("browser tests need " + " and ".join(missing)
                   + "; `make test` run as root installs Chromium")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI must run the browser tests: " + message)
        pytest.skip(message)
    return chromium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """`with JupyterLab() as lab:` a running server; `lab.url(path)` opens a notebook."""

    def __enter__(self) -> "JupyterLab":
        self.dir = Path(tempfile.mkdtemp(prefix="llama3-mini-lab-"))
        shutil.copytree(ROOT / "notebooks", self.dir / "notebooks",
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        for name in ("config", "runtime", "data", "workspaces", "ipython"):
            (self.dir / name).mkdir()
        for plugin, values in SETTINGS.items():
            path = self.dir / "settings" / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        self.port, self.token = _free_port(), secrets.token_hex(16)
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(self.dir / "config"),
                   JUPYTER_RUNTIME_DIR=str(self.dir / "runtime"),
                   JUPYTER_DATA_DIR=str(self.dir / "data"), IPYTHONDIR=str(self.dir / "ipython"),
                   PYTHONHASHSEED="0", PYTHONPATH=str(ROOT))
        self.log = open(self.dir / "server.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
             "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.dir / 'notebooks'}",
             f"--LabApp.user_settings_dir={self.dir / 'settings'}",
             f"--LabApp.workspaces_dir={self.dir / 'workspaces'}",
             "--LabApp.expose_app_in_browser=True"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_until_up(timeout=120)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({self.process.returncode}):\n"
                                   + (self.dir / "server.log").read_text()[-3000:])
            try:
                urllib.request.urlopen(f"{self.base}/api/status?token={self.token}", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"JupyterLab did not answer on port {self.port} in {timeout} s")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, notebook: str) -> str:
        # one workspace per notebook, so that a tab restores no other notebook's layout
        workspace = Path(notebook).stem.replace("_", "-")
        return f"{self.base}/lab/workspaces/{workspace}/tree/{notebook}?token={self.token}"

    def shutdown_kernels(self) -> None:
        """End every session's kernel (each test opens its own notebook)."""
        headers = {"Authorization": f"token {self.token}"}
        with urllib.request.urlopen(urllib.request.Request(f"{self.base}/api/sessions",
                                                           headers=headers)) as answer:
            sessions = json.load(answer)
        for session in sessions:
            urllib.request.urlopen(urllib.request.Request(
                f"{self.base}/api/sessions/{session['id']}", headers=headers, method="DELETE"))

    def __exit__(self, *exc) -> None:
        self.process.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


KERNEL_READY = """() => {
  const nb = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = nb && nb.sessionContext && nb.sessionContext.session
                 && nb.sessionContext.session.kernel;
  return !!kernel && kernel.connectionStatus === 'connected' && kernel.status === 'idle';
}"""


def open_and_run(page, lab: JupyterLab, notebook: str, done_text: str, timeout_s: float = 240):
    """Open a notebook, clear its stored outputs, run all cells, and wait until `done_text`
    (printed by its last code cell) appears."""
    page.goto(lab.url(notebook))
    page.wait_for_function(KERNEL_READY, timeout=120_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.locator(".jp-OutputArea-output", has_text=done_text).first.wait_for(
        timeout=timeout_s * 1000)


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
