"""Refresh the README's dashboard screenshots from the demo study: ``python docs/screenshots.py``.

Runs ``lora-search demo`` first unless ``--config`` names a study that exists, serves it with
``lora-search dashboard`` on a free local port and photographs five pages with headless Chromium
(Debian's ``chromium`` package): the best trial, a trial rejected by a constraint, the study
overview, the best trial's artifacts (contact sheets, curves.png, scores.png: a wide window, cropped
to that row) and its rating form; ``demo-curves.png`` is that trial's ``curves.png`` itself. Nothing here is part of the tool; it keeps the pictures honest.
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


def crop_artifacts(path: Path, height: int = 350) -> None:
    """Keep the row of artifacts, the last thing on a trial's page, and the width its cards use."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        ink = np.asarray(image.convert("L"))[:, 300:] < 250  # the left 300 px are the menu and trial list
        bottom = int(np.where(ink.any(axis=1))[0].max())
        rows = ink[bottom - height:bottom]
        right = 300 + int(np.where(rows.any(axis=0))[0].max())
        cropped = image.crop((260, bottom - height, min(image.width, right + 40), bottom + 20))
    cropped.save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("runs/demo/configs/study.toml"))
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise SystemExit("chromium not found; apt-get install chromium")
    if not args.config.is_file():
        subprocess.run([sys.executable, "-m", "search", "demo", "--out", str(args.config.parents[1])], check=True)
    from search.ratings import ratings_name
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
        ids = {s["study_name"]: s["study_id"] for s in studies["study_summaries"]}
        study_id = ids[study.study_name]
        base = f"http://127.0.0.1:{port}/dashboard/studies/{study_id}"
        shoot(browser, f"{base}/trials?numbers={study.best_trial.number}", DOCS / "dashboard-trial.png",
              "1400,1700", profile)
        shoot(browser, f"{base}/trials?numbers={rejected}", DOCS / "dashboard-rejected.png", "1400,900", profile)
        shoot(browser, base, DOCS / "dashboard-overview.png", "1400,1600", profile)
        shoot(browser, f"{base}/trials?numbers={study.best_trial.number}", DOCS / "dashboard-curves.png",
              "2400,1800", profile)
        crop_artifacts(DOCS / "dashboard-curves.png")
        shutil.copyfile(Path(study.best_trial.user_attrs["run_dir"]) / "curves.png", DOCS / "demo-curves.png")
        rating = rating_trial_number(study, study.best_trial.number)
        shoot(browser, f"http://127.0.0.1:{port}/dashboard/studies/{ids[ratings_name(study.study_name)]}/trials"
              f"?numbers={rating}", DOCS / "dashboard-rating.png", "1400,1100", profile)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
    return 0


def rating_trial_number(study, number: int) -> int:
    """The trial of ``<study>-ratings`` that holds the rating form of trial ``number``."""
    import optuna

    from search.ratings import ratings_name

    rated = optuna.load_study(study_name=ratings_name(study.study_name), storage=study._storage)
    return next(t.number for t in rated.trials if t.user_attrs.get("trial") == number)


if __name__ == "__main__":
    raise SystemExit(main())
