"""A small crash-restart drill in the suite: real writer SIGKILLs under client load."""

from __future__ import annotations

import os
import subprocess
import sys

from batpak_mp._drill import run_drill


def test_small_drill_loses_and_duplicates_nothing(data_dir: str) -> None:
    report = run_drill(data_dir, clients=3, kills=4, seconds=5.0, seed=7, segment_max_bytes=1 << 20)
    assert report.kills_done == 4, report.text()
    assert report.acknowledged > 0
    assert report.lost == 0 and report.duplicated == 0 and report.mismatched == 0, report.text()
    assert report.unexpected == 0 and report.verify_ok, report.text()
    assert report.found == report.acknowledged
    assert report.writer_starts_in_log == 5  # the first start and one per kill, read back from the log
    assert len(report.restart_ms) == 4
    assert report.ok


def test_drill_cli_exit_code_and_report(tmp_path: os.PathLike[str]) -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "batpak-mp")
    d = os.path.join(os.fspath(tmp_path), "drill")
    out = subprocess.run([exe, "drill", d, "--clients", "2", "--kills", "2", "--seconds", "3", "--seed", "3", "--json"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    import json

    doc = json.loads(out.stdout)
    assert doc["ok"] and doc["lost"] == 0 and doc["duplicated"] == 0 and doc["kills_done"] == 2
