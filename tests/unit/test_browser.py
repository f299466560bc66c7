"""The browser check itself, on a small page: it must find a broken image and broken links."""

import os

import pytest

from tests import browser

needs_chromium = pytest.mark.skipif(
    browser.chromium() is None and not os.environ.get("KVSTUDY_REQUIRE_BROWSER"),
    reason="chromium not installed (apt-get install chromium; .ci/run installs it)")


@needs_chromium
def test_finds_broken_images_and_links(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    page = tmp_path / "index.html"
    page.write_text('<html><body><h2 id="here">x</h2><a href="#here">ok</a><a href="#gone">bad anchor</a>'
                    '<a href="data.csv">ok file</a><a href="missing.csv">bad file</a>'
                    '<img alt="good" src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==">'
                    '<img alt="bad" src="nope.png"></body></html>')
    found = browser.check(page, tmp_path / "shot.png")
    assert found["images"] == ["good", "bad"] and found["broken_images"] == ["bad"]
    assert found["broken_links"] == ["#gone", "missing.csv"]
    assert found["screenshot"] and not (tmp_path / "index.check.html").exists()
