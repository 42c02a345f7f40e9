"""Render the README's screenshots of the scan report, the viewer and the side-by-side comparison.

Runs vsink on the synthetic demo model and the bundled demo images (offline), opens the pages
in headless Chromium (Debian: ``apt-get install chromium chromium-driver``; ``pip install
selenium``) and writes ``docs/images/{report,viewer,compare}.png``, each reduced to a 256-colour
PNG under 300 KB::

    python docs/images/make_screenshots.py
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from vsink.cli import main as vsink

HERE = Path(__file__).resolve().parent
MAX_BYTES = 300 * 1024


def driver(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    chromedriver = shutil.which("chromedriver")
    if not browser or not chromedriver:
        sys.exit("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.binary_location = browser
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def save_small(png: bytes, path: Path) -> None:
    """Quantise to 256 colours; halve the size until it is under :data:`MAX_BYTES`."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    while True:
        buf = io.BytesIO()
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() < MAX_BYTES:
            path.write_bytes(buf.getvalue())
            print(f"wrote {path} ({buf.tell() // 1024} KB, {image.size[0]}x{image.size[1]})")
            return
        image = image.resize((image.size[0] * 3 // 4, image.size[1] * 3 // 4), Image.LANCZOS)


def shoot(page: Path, out: Path, *, scroll_to: str = "", click: tuple[int, int] = (), size=(1200, 820)) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    d = driver(*size)
    try:
        d.get(page.as_uri())
        time.sleep(0.8)
        if scroll_to:
            heading = next(h for h in d.find_elements(By.TAG_NAME, "h2") if h.text.startswith(scroll_to))
            d.execute_script("arguments[0].scrollIntoView()", heading)
        if click:
            canvas = d.find_element(By.ID, "canvas")
            ActionChains(d).move_to_element_with_offset(canvas, *click).click().perform()
            time.sleep(0.3)
        save_small(d.get_screenshot_as_png(), out)
    finally:
        d.quit()


def run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        assert vsink(["scan", "--no-progress", "--out", str(work / "scan")]) == 0
        assert vsink(["registers", "find", "--no-progress", "--out", str(work / "neurons.json")]) == 0
        assert vsink(["registers", "apply", "--neurons", str(work / "neurons.json"), "--no-progress",
                      "--out", str(work / "apply")]) == 0
        assert vsink(["maps", "--kind", "full,norm,cls", "--heads", "all", "--layers", "2,3,4,5", "--format", "npz",
                      "--no-progress", "--out", str(work / "maps")]) == 0
        assert vsink(["view", str(work / "maps")]) == 0
        shoot(work / "scan" / "report.html", HERE / "report.png", scroll_to="Massive activations")
        shoot(work / "maps" / "viewer.html", HERE / "viewer.png", click=(-60, 60), size=(1200, 700))
        shoot(work / "apply" / "compare.html", HERE / "compare.png", scroll_to="Per block, all runs")


if __name__ == "__main__":
    run()
