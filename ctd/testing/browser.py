"""A report page as a person sees it: rendered by headless Chromium (Debian's ``chromium`` package).

:func:`check_page` loads a local report page in the browser and reports what did not work: images
that did not decode, relative links to files that are not beside the page, and console errors.
:func:`screenshot` keeps a PNG of the page (the README's pictures come from it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

__all__ = ["chromium", "check_page", "screenshot"]

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars", "--no-first-run"]
# appended to a copy of the page: after load, record every image that did not decode
# (console.error calls are recorded too; uncaught exceptions show in the browser's log)
_CAPTURE = (
    "<script>var ctdErrors=[];var ctdError=console.error;console.error=function(){ctdErrors.push(Array.prototype.join.call(arguments,' '));"
    "ctdError.apply(console,arguments);};window.addEventListener('error',function(e){ctdErrors.push(String(e.message));});</script>"
)
_PROBE = (
    "<script>window.addEventListener('load',function(){var imgs=Array.prototype.slice.call(document.images);"
    "var heads=Array.prototype.map.call(document.querySelectorAll('h2'),function(h){return h.textContent;});"
    "document.body.setAttribute('data-ctd-check',JSON.stringify({images:imgs.length,errors:ctdErrors,heads:heads,"
    "rows:document.querySelectorAll('tr').length,"
    "broken:imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0);}).map(function(i){return i.alt||i.src.slice(0,60);})}));"
    "});</script>"
)


def chromium() -> str | None:
    """The Chromium binary, or None when it is not installed."""
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: nothing cached between runs
        return subprocess.run(
            [exe, *_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=timeout
        )


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links += [v for k, v in attrs if k == "href" and v]


def check_page(path: str, timeout: float = 60) -> dict:
    """Load ``path`` (a local HTML file) in headless Chromium. Returns {headings (the h2 texts in the
    browser's DOM), table_rows, images, broken_images, links, missing_links, console_errors, ok}: images counted and checked by the browser after
    load; relative links checked against the files beside the page (a browser may not read
    file:// URLs from a script); script errors and console.error calls."""
    path = os.path.abspath(path)
    with open(path, encoding="utf-8") as f:
        page = f.read()
    probe = os.path.join(
        os.path.dirname(path), f".ctd-check-{os.getpid()}.html"
    )  # beside the page: relative URLs resolve the same
    with open(probe, "w", encoding="utf-8") as f:
        head = page.find("<head>")  # the error capture first, before any script of the page runs
        early = page[: head + 6] + _CAPTURE + page[head + 6 :] if head >= 0 else _CAPTURE + page
        f.write(early.replace("</body>", _PROBE + "</body>") if "</body>" in early else early + _PROBE)
    try:
        r = _run(["--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom", "file://" + probe], timeout)
    finally:
        os.remove(probe)
    m = re.search(r"data-ctd-check=\"([^\"]*)\"", r.stdout)
    if m is None:
        raise RuntimeError(f"chromium did not render {path} (exit {r.returncode}): {r.stderr[-2000:]}")
    seen = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    console = seen["errors"] + [
        line for line in r.stderr.splitlines() if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line)
    ]
    parser = _Links()
    parser.feed(page)
    local = [u for u in parser.links if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", u)]
    missing = [u for u in local if not os.path.exists(os.path.join(os.path.dirname(path), u.split("#")[0]))]
    return {
        "headings": seen["heads"],
        "table_rows": seen["rows"],
        "images": seen["images"],
        "broken_images": seen["broken"],
        "links": parser.links,
        "missing_links": missing,
        "console_errors": console,
        "ok": not (seen["broken"] or missing or console),
    }


def screenshot(path: str, png: str, width: int = 1300, height: int = 2600, timeout: float = 60) -> str:
    """A PNG of the page's first ``height`` pixels at ``width``."""
    r = _run(
        [
            f"--screenshot={os.path.abspath(png)}",
            f"--window-size={width},{height}",
            "--virtual-time-budget=10000",
            "file://" + os.path.abspath(path),
        ],
        timeout,
    )
    if not os.path.exists(png):
        raise RuntimeError(f"chromium wrote no screenshot of {path} (exit {r.returncode}): {r.stderr[-2000:]}")
    return png
