"""The `fusionrec` command line: settings precedence, publishing files, asking the ranker."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from fusionrec.settings import load_settings
from tests.conftest import Stack


def test_settings_flags_beat_env_beat_file(tmp_path, monkeypatch):
    config = tmp_path / "fusionrec.toml"
    config.write_text('[ranker]\nport = 1111\nmax_limit = 7\n[kafka]\nitems_topic = "catalog"\n')
    monkeypatch.delenv("FUSIONREC_CONFIG", raising=False)
    assert load_settings(config).ranker.port == 1111
    monkeypatch.setenv("FUSIONREC_RANKER__PORT", "2222")
    s = load_settings(config)
    assert (s.ranker.port, s.ranker.max_limit, s.kafka.items_topic) == (2222, 7, "catalog")
    s = load_settings(config, ranker={"port": 3333})
    assert (s.ranker.port, s.ranker.max_limit) == (3333, 7)
    assert "FUSIONREC_CONFIG" not in os.environ, "a --config must not leak into child processes"
    monkeypatch.setenv("FUSIONREC_CONFIG", str(config))
    assert load_settings().kafka.items_topic == "catalog"


def test_unknown_settings_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("FUSIONREC_CONFIG", raising=False)
    config = tmp_path / "bad.toml"
    config.write_text("[ranker]\nprot = 1\n")
    with pytest.raises(ValueError, match="prot"):
        load_settings(config)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")


def fusionrec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fusionrec", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.integration
def test_publish_csv_and_jsonl_then_ask(stack: Stack, tmp_path):
    a = stack.item("flowers", "cli-a")
    b = stack.item("flowers", "cli-b")
    csv_file = tmp_path / "items.csv"
    with csv_file.open("w", newline="") as f:
        w = csv.DictWriter(f, ["id", "title", "description", "image", "category", "tags"])
        w.writeheader()
        for it in (a, b):
            w.writerow({k: it[k] for k in w.fieldnames if k != "tags"} | {"tags": "flowers|cli"})
    done = fusionrec("publish", "items", str(csv_file), "--kafka", stack.bootstrap)
    assert done.returncode == 0, done.stderr
    assert "published 2 items, refused 0" in done.stdout

    events = tmp_path / "events.jsonl"
    rows = [
        {
            "event_id": "cli-e1",
            "user_id": "cli-user",
            "item_id": "cli-a",
            "type": "like",
            "timestamp": 1e9,
        },
        {"event_id": "cli-e2", "user_id": "cli-user", "type": "like"},
    ]
    events.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    done = fusionrec("publish", "events", str(events), "--kafka", stack.bootstrap)
    assert done.returncode == 1
    assert "row 2 refused" in done.stdout and "item_id: Field required" in done.stdout
    assert "published 1 events, refused 1" in done.stdout

    stack.wait("cli items", lambda: stack.known("cli-a") and stack.known("cli-b"))
    port = stack.target.rsplit(":", 1)[1]
    done = fusionrec("similar", "cli-a", "--port", port, "--limit", "3")
    assert done.returncode == 0, done.stderr
    assert "cli-b" in done.stdout and "image" in done.stdout
    stack.wait("cli-user's profile", lambda: not stack.client.recommend("cli-user", 1).cold_start)
    done = fusionrec("recommend", "cli-user", "--port", port, "--limit", "3")
    assert done.returncode == 0, done.stderr
    assert "cli-b" in done.stdout and "cli-a" not in done.stdout
