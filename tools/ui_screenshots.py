"""Screenshots of a flow run's Prefect page (Task Runs and Artifacts tabs) in a real browser.

Not a project dependency; run it from its own environment:

    apt-get install -y chromium
    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    /tmp/pw/bin/python tools/ui_screenshots.py http://127.0.0.1:4200/runs/flow-run/<id> --out shots/

Prints what each tab lists (and any browser console errors) and saves full-page PNGs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", help="a flow run's page")
    parser.add_argument("--out", default="ui-shots")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(args.url, wait_until="networkidle")
        for tab in ("Task Runs", "Artifacts", "Subflow Runs"):
            page.get_by_text(tab, exact=True).first.click()
            page.wait_for_timeout(2500)
            shot = out / f"{tab.lower().replace(' ', '-')}.png"
            page.screenshot(path=str(shot), full_page=True)
            text = page.inner_text("body")[-700:].replace("\n", " | ")
            print(f"{tab}: {shot}\n  {text}")
        print("console errors:", errors or "none")
        browser.close()


if __name__ == "__main__":
    main()
