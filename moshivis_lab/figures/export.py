"""Write plotly figures to PNG / SVG (kaleido 1.x + a Chromium browser) and offline HTML.

``write_figure(fig, out_dir, name)`` always writes ``name.html``; it loads ``plotly.min.js`` from
its own folder (written there once, ~4.6 MB, instead of embedding it in every file), so the
figures open offline as long as the folder travels whole (``embed=True`` embeds it instead). PNG and SVG need a Chromium-based browser,
which kaleido 1.x drives headless: ``find_browser()`` looks for one (``BROWSER_PATH``, a browser
kaleido downloaded with ``kaleido_get_chrome``, then ``chromium`` / ``google-chrome`` on
``PATH``, e.g. Debian's ``/usr/bin/chromium``). Without one, nothing crashes: the HTML is written,
``png`` / ``svg`` are None and ``error`` carries ``BROWSER_HINT``.

Starting the browser costs seconds, so a batch runs inside ``export_session()``: one kaleido
server (a headless browser) for every figure, then about 0.1-0.2 s per image format.
Every file is written atomically (temporary sibling renamed into place).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from moshivis_lab.artefacts import atomic_open

BROWSER_HINT = "apt-get install -y chromium"
"""How to get a browser for PNG / SVG export on Debian / Ubuntu (or set BROWSER_PATH)."""

IMAGE_FORMATS = ("png", "svg", "pdf", "jpeg", "webp")
_BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_TYPICAL = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
_SCALE = 2.0  # PNG pixel density (crisp in a markdown report)


def _is_exe(path: str | os.PathLike[str] | None) -> bool:
    return bool(path) and Path(path).is_file() and os.access(path, os.X_OK)


def find_browser() -> str | None:
    """The Chromium-based browser kaleido will drive, or None.

    Order: ``$BROWSER_PATH``; choreographer's own search (a browser downloaded by
    ``kaleido_get_chrome``, then Chrome / Chromium / Edge / Brave on ``PATH`` and their usual
    install paths); ``chromium`` / ``google-chrome`` on ``PATH``; ``/usr/bin/chromium``.
    """
    env = os.environ.get("BROWSER_PATH")
    if env:
        return env if _is_exe(env) else None
    try:
        from choreographer.browsers.chromium import Chromium

        found = Chromium.find_browser(skip_local=False)
        if _is_exe(found):
            return str(found)
    except Exception:  # noqa: BLE001 - best effort, fall back to our own search
        pass
    for name in _BROWSER_NAMES:
        p = shutil.which(name)
        if _is_exe(p):
            return p
    for p in _TYPICAL:
        if _is_exe(p):
            return p
    return None


def no_browser_message() -> str:
    """The error recorded when PNG / SVG cannot be made."""
    return (
        "no Chromium-based browser found for PNG/SVG export (kaleido 1.x needs one); "
        f"HTML written instead. Install one: `{BROWSER_HINT}` (or set BROWSER_PATH)"
    )


_SESSION: dict[str, Any] = {"depth": 0, "started": False}


@contextlib.contextmanager
def export_session() -> Iterator[str | None]:
    """One headless browser for every ``write_figure`` inside the block (yields its path, or
    None when there is none). Nested sessions reuse the outer one; a kaleido sync server
    someone else started is reused and left running."""
    import kaleido

    browser = find_browser()
    start = (
        browser is not None and _SESSION["depth"] == 0 and not kaleido._global_server.is_running()  # noqa: SLF001 - documented singleton
    )
    if start:
        kaleido.start_sync_server(path=browser, mathjax=False, silence_warnings=True)
        _SESSION["started"] = True
    _SESSION["depth"] += 1
    try:
        yield browser
    finally:
        _SESSION["depth"] -= 1
        if start:
            kaleido.stop_sync_server(silence_warnings=True)
            _SESSION["started"] = False


def write_plotlyjs(out_dir: str | os.PathLike[str]) -> Path:
    """Write the installed plotly.js as ``out_dir/plotly.min.js`` (kept when already the same)."""
    from plotly.offline import get_plotlyjs

    path = Path(out_dir) / "plotly.min.js"
    js = get_plotlyjs().encode("utf-8")
    if not path.exists() or path.stat().st_size != len(js):
        with atomic_open(path, "wb") as f:
            f.write(js)
    return path


def _image_bytes(fig: Any, fmt: str, browser: str, width: int | None, height: int | None) -> bytes:
    import kaleido

    opts: dict[str, Any] = {"format": fmt, "scale": _SCALE if fmt == "png" else 1.0}
    w = width or fig.layout.width or 1000
    h = height or fig.layout.height or 500
    opts["width"], opts["height"] = int(w), int(h)
    if kaleido._global_server.is_running():  # noqa: SLF001 - reuse the batch's browser
        return kaleido.calc_fig_sync(fig, opts=opts)
    return kaleido.calc_fig_sync(fig, opts=opts, kopts={"path": browser, "mathjax": False})


def write_figure(
    fig: Any,
    out_dir: str | os.PathLike[str],
    name: str,
    formats: Sequence[str] = ("png", "svg"),
    *,
    width: int | None = None,
    height: int | None = None,
    embed: bool = False,
) -> dict[str, Any]:
    """Write ``fig`` as ``out_dir/name.{html,png,svg}``; returns the paths and what failed.

    Returns ``{"html": path, "png": path | None, "svg": path | None, ..., "seconds": export
    time, "error": None | str}``. HTML is always written and opens offline (``plotly.min.js``
    beside it, or embedded with ``embed``).
    Image formats need a browser (``find_browser``); without one their paths are None and the
    error carries ``BROWSER_HINT``. ``width`` / ``height``: image size in CSS pixels (default the
    figure's layout size, else 1000 x 500).
    """
    bad = [f for f in formats if f not in IMAGE_FORMATS]
    if bad:
        raise ValueError(f"unknown image formats {bad}; choose from {IMAGE_FORMATS}")
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"figure name must be a plain file stem, got {name!r}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {f: None for f in ("png", "svg", *formats)}
    html = out / f"{name}.html"
    with atomic_open(html, "w", encoding="utf-8") as f:
        f.write(fig.to_html(include_plotlyjs=True if embed else "directory", full_html=True))
    if not embed:
        write_plotlyjs(out)
    res["html"] = str(html)
    errors = []
    browser = find_browser() if formats else None
    if formats and browser is None:
        errors.append(no_browser_message())
    elif formats:
        for fmt in formats:
            try:
                data = _image_bytes(fig, fmt, browser, width, height)
            except Exception as e:  # noqa: BLE001 - recorded, the HTML is still there
                errors.append(f"{fmt} export failed: {type(e).__name__}: {e}".splitlines()[0])
                continue
            if isinstance(data, str):
                data = data.encode("utf-8")
            path = out / f"{name}.{fmt}"
            with atomic_open(path, "wb") as f:
                f.write(data)
            res[fmt] = str(path)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    res["error"] = "; ".join(errors) or None
    return res
