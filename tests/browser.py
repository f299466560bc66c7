"""Render an HTML page in headless Chromium (Debian's `chromium`): every image loaded, every link
resolves (in-page anchors to an element, relative links to a readable file), and a screenshot.

Chromium runs with a fresh profile and without any network service (this machine's network is
closed: otherwise it waits on connections). The page is checked through a copy of it next to the
original, with a script appended that records what it finds into the DOM Chromium dumps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--allow-file-access-from-files"]
CHECK = """<script>
window.addEventListener("load", () => {
  const out = {images: [], broken_images: [], links: [], broken_links: []};
  for (const img of document.images) {
    out.images.push(img.alt);
    if (!(img.complete && img.naturalWidth > 0)) out.broken_images.push(img.alt);
  }
  for (const a of document.querySelectorAll("a[href]")) {
    const href = a.getAttribute("href");
    out.links.push(href);
    let ok = false;
    if (href.startsWith("#")) ok = document.getElementById(href.slice(1)) !== null;
    else { try { const x = new XMLHttpRequest(); x.open("GET", href, false); x.send();
                 ok = (x.status === 0 || x.status === 200) && x.responseText.length > 0; } catch (e) { ok = false; } }
    if (!ok) out.broken_links.push(href);
  }
  const pre = document.createElement("pre"); pre.id = "kvstudy-check";
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="kvstudy-chromium-") as profile:
        return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout)


def check(page: Path, screenshot: Path) -> dict:
    """Images and links of `page` as Chromium sees them; writes a full-page-width screenshot."""
    probe = page.with_name(page.stem + ".check.html")
    probe.write_text(page.read_text() + CHECK)
    try:
        dom = run(["--virtual-time-budget=10000", "--dump-dom", probe.resolve().as_uri()])
    finally:
        probe.unlink()
    start = dom.stdout.find('<pre id="kvstudy-check">')
    if start < 0:
        raise RuntimeError(f"chromium rendered no check result (exit {dom.returncode}): {dom.stderr[-2000:]}")
    import html

    found = json.loads(html.unescape(dom.stdout[start:].split(">", 1)[1].split("</pre>", 1)[0]))
    shot = run(["--window-size=1280,4000", "--hide-scrollbars", f"--screenshot={screenshot.resolve()}",
                page.resolve().as_uri()])
    found["screenshot"] = screenshot.exists() and screenshot.stat().st_size > 0
    found["screenshot_log"] = shot.stderr[-500:]
    return found
