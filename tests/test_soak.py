"""The fault soak (scripts/soak.py), short: the whole system under at least 20 faults.

Two consumers, the refresher and the API run as `streamlme` processes against the soak's own
Redis (AOF) and broker; consumers, the refresher and Redis are killed at random, Redis once comes
back empty, bad events are mixed in. At the end the statistics must equal one pass over the
accepted rows and the model the batch fit of them (the soak computes both; see its docstring).
"""

from __future__ import annotations

import json
import subprocess
import sys

from stream_helpers import REPO

SOAK = REPO / "scripts" / "soak.py"
CHECKS = ("stats_equal", "model_equal", "versions_increase", "epoch_changes_only_at_resets",
          "no_model_from_lost_state",
          "no_5xx", "api_answered", "dead_letters", "faults_ok", "no_unexpected_exits",
          "sends_ok", "settled", "min_faults")


def test_short_soak_passes_every_check(tmp_path) -> None:
    """35 s of faults (at least 20, every kind at least once) at 500 events/s: every check of
    the soak's report holds, and the report counts what it claims to have done."""
    run = subprocess.run(
        [sys.executable, str(SOAK), "--seconds", "35", "--min-faults", "20", "--seed", "7",
         "--rate", "500", "--groups", "200", "--rebuild-timeout", "60", "--settle-timeout", "60"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    lines = run.stdout.strip().splitlines()
    assert lines, f"the soak printed no report (status {run.returncode}):\n{run.stderr[-3000:]}"
    report = json.loads(lines[-1])
    failed = [name for name in CHECKS if not report["checks"][name]]
    assert not failed, (f"soak checks failed: {failed}; faults {report['faults']}, "
                        f"fault failures {report['fault_failures']}, stats: "
                        f"{report['stats_note']}, model: {report['model_note']}, unexpected "
                        f"exits {report['unexpected_exits']}, 5xx {report['errors_5xx_samples']}, "
                        f"lost-state models {report['models_from_lost_state']}, dead letters "
                        f"{report['dead_letters']}; logs in {report['logs']}")
    assert run.returncode == 0 and report["ok"]
    assert report["stats_equal"] is True and report["model_equal"] is True
    assert report["errors_5xx"] == 0
    assert sum(report["faults"].values()) >= 20
    assert all(report["faults"][kind] >= 1 for kind in
               ("consumer_kill", "refresher_kill", "redis_kill", "redis_empty", "bad_events"))
    assert report["events"] > 5_000 and report["queries"] > 100
    assert report["dead_letters"]["sent"] > 0 and not report["dead_letters"]["missing"]
