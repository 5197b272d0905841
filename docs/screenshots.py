"""Refresh the README's dashboard screenshots from the demo study: ``python docs/screenshots.py``.

Runs ``lora-search demo`` first unless ``--config`` names a study that exists, serves it with
``lora-search dashboard`` on a free local port and photographs three pages with headless Chromium
(Debian's ``chromium`` package): the best trial, a trial rejected by a constraint, and the study
overview. Nothing here is part of the tool; it keeps the pictures honest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=20000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the dashboard did not answer at {url}")


def shoot(browser: str, url: str, out: Path, size: str, profile: Path) -> None:
    subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                    f"--screenshot={out}", url], check=True, capture_output=True, timeout=120)
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("runs/demo/configs/study.toml"))
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise SystemExit("chromium not found; apt-get install chromium")
    if not args.config.is_file():
        subprocess.run([sys.executable, "-m", "search", "demo", "--out", str(args.config.parents[1])], check=True)
    from search.settings import load_settings
    from search.study import open_study

    study = open_study(load_settings(args.config), create=False)
    rejected = next(t.number for t in study.trials if t.user_attrs.get("prune_reason") == "constraint")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "search", "dashboard", "--config", str(args.config),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    profile = Path(f"/tmp/lora-search-screenshots-{port}")
    try:
        wait_for(f"http://127.0.0.1:{port}/dashboard")
        studies = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10).read())
        study_id = next(s["study_id"] for s in studies["study_summaries"] if s["study_name"] == study.study_name)
        base = f"http://127.0.0.1:{port}/dashboard/studies/{study_id}"
        shoot(browser, f"{base}/trials?numbers={study.best_trial.number}", DOCS / "dashboard-trial.png",
              "1400,1700", profile)
        shoot(browser, f"{base}/trials?numbers={rejected}", DOCS / "dashboard-rejected.png", "1400,900", profile)
        shoot(browser, base, DOCS / "dashboard-overview.png", "1400,1600", profile)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
