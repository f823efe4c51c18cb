"""Notebook 00 in a real browser: JupyterLab, Debian's Chromium, Playwright.

A JupyterLab server (127.0.0.1, a free port, a random token) serves a copy of
``notebooks/00_quickstart.ipynb`` from a temporary root (the committed notebook is never opened,
so it stays without outputs); the kernel runs at ``MOSHIVIS_PRESET=smoke`` on the checkout's
``data/`` (building the smoke artefacts first when missing). Chromium opens the notebook, runs
every cell from the Run menu, and the test checks that every widget rendered, then moves the
explorer's timeline slider with the keyboard and checks that the attention overlay changed.
Screenshots go to pytest's ``tmp_path`` and to ``data/smoke/browser/`` (git-ignored):
``00_quickstart_ran.png`` (the whole notebook after the run) and
``00_quickstart_slider_moved.png`` (the explorer after the slider moved).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "00_quickstart.ipynb"
PRESET = "smoke"
BUILD_TIMEOUT_S = 600  # the kernel may have to build the smoke artefacts first (~3 min)


def find_chromium() -> str | None:
    """Chromium's executable: ``$CHROMIUM_PATH``, ``/usr/bin/chromium``, then the ``PATH``."""
    candidates = [os.environ.get("CHROMIUM_PATH", ""), "/usr/bin/chromium"]
    candidates += [shutil.which(n) or "" for n in ("chromium", "chromium-browser")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"jupyter lab exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"jupyter lab did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def _wait_kernel_idle(url: str, token: str, timeout: float = 120.0) -> None:
    """Wait until the server reports the notebook's kernel idle (started and connected)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/api/sessions?token={token}", timeout=5) as r:
            sessions = json.load(r)
        if sessions and all(
            (s.get("kernel") or {}).get("execution_state") == "idle" for s in sessions
        ):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the kernel did not become idle within {timeout} s: {sessions}")


@pytest.fixture(scope="module")
def chromium() -> str:
    pytest.importorskip(
        "playwright.sync_api",
        reason="playwright is missing: pip install -c constraints.txt -e '.[dev]'",
    )
    path = find_chromium()
    if path is None:
        pytest.skip("no chromium found (or set CHROMIUM_PATH): apt-get install -y chromium")
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    """A JupyterLab server on a copy of notebook 00; yields (base url, token, root); always
    shut down (its whole process group, kernels included)."""
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    # A private Jupyter home: no user settings or workspaces from this machine, no news pop-up,
    # and the notebook's kernel starts without asking.
    user_settings = {
        "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        "notebook-extension/tracker": {"autoStartDefaultKernel": True, "windowingMode": "none"},
    }
    for name, values in user_settings.items():
        path = base / "settings" / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    token = uuid.uuid4().hex
    port = _free_port()
    env = {
        **os.environ,
        "MOSHIVIS_PRESET": PRESET,
        "MOSHIVIS_DATA": os.environ.get("MOSHIVIS_DATA") or str(ROOT / "data"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "NO_TORCH_COMPILE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "JUPYTER_CONFIG_DIR": str(base / "config"),
        "JUPYTER_DATA_DIR": str(base / "share"),
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(base / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
        "IPYTHONDIR": str(base / "ipython"),
    }
    log = base / "jupyter.log"
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
    ]
    if os.geteuid() == 0:  # CI containers run as root
        cmd.append("--allow-root")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(f"{url}/api/status?token={token}", proc, log)
        yield url, token, root
    finally:
        _shut_down(proc)


def _shut_down(proc: subprocess.Popen) -> None:
    """Stop the server's process group; kernels (jupyter starts each in its own session) are
    shut down by the server on SIGTERM, and any left are killed by their pids."""
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing, or the server is already gone
        children = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    for child in children:
        with contextlib.suppress(Exception):
            child.kill()


_OVERLAY = """() => {
  const plots = [...document.querySelectorAll('.jp-OutputArea-output .js-plotly-plot')];
  const gd = plots.find(p => ((p.layout && p.layout.title && p.layout.title.text) || '')
                             .startsWith('cross-attention at step'));
  if (!gd) return null;
  const heat = gd.data.find(t => t.type === 'heatmap');
  return {title: gd.layout.title.text, z: heat ? heat.z : null};
}"""

_PROMPTS = """() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
  .map(e => e.textContent.trim())"""

# Everything in the panel drawn at once, so a screenshot shows the whole notebook.
_FULL_HEIGHT = """() => {
  const n = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer')
         || document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
  const height = Math.ceil(n.scrollHeight + 200);
  n.scrollTop = 0;
  return height;
}"""


def _save(shot: bytes, name: str, dirs: list[Path]) -> None:
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(shot)


def _ran(prompts: list[str], n_code: int) -> bool:
    """Every code cell has an execution count ("[3]:")."""
    return len(prompts) == n_code and all(p[:1] == "[" and p[1:-2].isdigit() for p in prompts)


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + 300)
def test_quickstart_runs_in_jupyterlab(chromium, lab, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, token, root = lab
    shots = [tmp_path, ROOT / "data" / PRESET / "browser"]
    n_code = sum(c["cell_type"] == "code" for c in json.loads(NOTEBOOK.read_text())["cells"])
    panel = ".jp-NotebookPanel:not(.lm-mod-hidden)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}", timeout=120_000)
            expect(page.locator(f"{panel} .jp-Notebook")).to_be_visible(timeout=120_000)
            select = page.locator(".jp-Dialog .jp-mod-accept")  # "Select Kernel", if asked
            if select.is_visible():
                select.click()
            expect(page.locator(f"{panel} .jp-KernelName")).not_to_have_text(
                "No Kernel", timeout=60_000
            )
            idle = page.locator(f"{panel} .jp-Notebook-ExecutionIndicator[data-status='idle']")
            expect(idle).to_be_attached(timeout=120_000)  # the kernel has started

            _wait_kernel_idle(url, token)

            # Run > Run All Cells, as a user would (again if a click was lost while the page
            # was still connecting to the kernel: nothing queued after 20 s).
            t0 = time.monotonic()
            clicked, last_click = 0, t0
            prompts: list[str] = page.evaluate(_PROMPTS)
            while time.monotonic() - t0 < BUILD_TIMEOUT_S + 120:
                if clicked == 0 or (
                    clicked < 3
                    and time.monotonic() - last_click > 20
                    and all(q == "[ ]:" for q in prompts)
                ):
                    page.get_by_role("menuitem", name="Run", exact=True).click()
                    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
                    clicked, last_click = clicked + 1, time.monotonic()
                page.wait_for_timeout(1000)
                prompts = page.evaluate(_PROMPTS)
                if _ran(prompts, n_code) and idle.count() == 1:
                    break
                if clicked == 3 and time.monotonic() - last_click > 30:
                    if all(q == "[ ]:" for q in prompts):
                        break  # nothing was ever queued: fail now, not after the timeout
            if not _ran(prompts, n_code):
                _save(page.screenshot(), "00_quickstart_failed.png", shots)
                pytest.fail(f"the notebook did not finish running: prompts {prompts}")
            ran_s = time.monotonic() - t0

            tracebacks = page.locator(f"{panel} [data-mime-type='application/vnd.jupyter.error']")
            assert tracebacks.count() == 0, tracebacks.first.inner_text()
            # Every widget view rendered: the explorer's controls and its two live figures.
            page.wait_for_function(f"({_OVERLAY})() !== null", timeout=60_000)
            assert page.get_by_text("Error displaying widget").count() == 0
            slider = page.locator(f"{panel} .jp-OutputArea-output .widget-slider")
            assert slider.count() == 1
            assert page.locator(f"{panel} .jp-OutputArea-output .widget-button").count() >= 1
            assert page.locator(f"{panel} .jp-OutputArea-output .js-plotly-plot").count() == 2
            assert page.locator(f"{panel} .jp-OutputArea-output audio").count() == 2
            # The placeholders' "press Run" notes are gone from the figures.
            assert page.locator(".js-plotly-plot .annotation-text").count() == 0
            before = page.evaluate(_OVERLAY)
            assert before["z"], "the attention overlay has no heatmap"
            page.set_viewport_size({"width": 1400, "height": page.evaluate(_FULL_HEIGHT)})
            page.evaluate(_FULL_HEIGHT)  # scrolled to the top once the panel has grown
            page.wait_for_timeout(500)
            _save(page.screenshot(full_page=True), "00_quickstart_ran.png", shots)

            # Move the timeline with the keyboard: focus the slider's handle, press End.
            handle = slider.locator(".noUi-handle")
            handle.focus()
            page.keyboard.press("End")
            page.wait_for_function(
                f"(t) => {{ const o = ({_OVERLAY})(); return o && o.title !== t; }}",
                arg=before["title"],
                timeout=60_000,
            )
            after = page.evaluate(_OVERLAY)
            assert after["z"] != before["z"], "the attention overlay did not change"
            page.wait_for_timeout(500)
            explorer = page.locator(f"{panel} .jp-OutputArea-output").filter(
                has=page.locator(".widget-slider")
            )
            _save(explorer.screenshot(), "00_quickstart_slider_moved.png", shots)
            print(
                f"notebook ran in {ran_s:.0f} s (Run All clicked {clicked}x); overlay {before['title']!r} -> {after['title']!r};"
                f" screenshots in {shots[0]} and {shots[1]}"
            )
        finally:
            browser.close()
    # Lab ran a copy: the committed notebook is as it was, without outputs.
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    assert not any(c.get("outputs") for c in cells if c["cell_type"] == "code")
