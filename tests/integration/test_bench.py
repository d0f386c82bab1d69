"""scripts/bench.py as a user runs it: one cheap section end to end (its own
daemon, a reader process, real shm), its JSON, and --compare against a
baseline that lacks the section's ratios (they are "new", not a failure)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

try:
    import iceoryx2  # noqa: F401  (only whether it is there)

    HAVE_ICEORYX2 = True
except ImportError:
    HAVE_ICEORYX2 = False


def test_pipeline_section_runs_and_compares_with_an_older_baseline(tmp_path: Path) -> None:
    baseline = tmp_path / "old.json"
    baseline.write_text(
        json.dumps(
            {
                "options": {"quick": True},
                "ratios": {"memory.efficiency_first_failure": {"value": 0.99, "better": "higher"}},
            }
        )
    )
    out = tmp_path / "run.json"
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "bench.py"),
            "--quick",
            "--rounds",
            "1",
            "--only",
            "pipeline",
            "--json",
            str(out),
            "--compare",
            str(baseline),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run = json.loads(out.read_text())
    sizes = run["sections"]["pipeline"]["sizes"]
    assert set(sizes) == {"1MiB", "16MiB"}
    for label, row in sizes.items():
        assert {"shmarena", "shared_memory", "shm_reused", "queue"} <= set(row), label
        assert all(figures["samples"] >= 1 for figures in row.values())
        assert f"pipeline.shmarena_vs_shared_memory@{label}" in run["ratios"]
        assert (f"pipeline.shmarena_over_iceoryx2@{label}" in run["ratios"]) == HAVE_ICEORYX2
    targets = [t["name"] for t in run["targets"]]
    assert any(name.startswith("pipeline") for name in targets), targets
    # The baseline knew none of the pipeline's ratios, and this run lacks its one.
    assert " new" in done.stdout and " gone" in done.stdout, done.stdout
