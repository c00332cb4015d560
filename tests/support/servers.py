"""Helpers for tests that talk to real servers on loopback (Prefect's REST API) and stop what they started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable

from support.projects import BIN, ROOT


def api(url: str, path: str, body: dict | None = None):
    """GET (or POST ``body`` as JSON) ``url + path``; the decoded JSON answer."""
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode() if body is not None else None,
                                 headers={"content-type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this test started, then SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def served_benchmark_run(project: Path, api_url: str, env: dict[str, str], log: Path,
                         while_serving: Callable[[dict], None] = lambda run: None) -> dict:
    """Serve the benchmark deployment against the Prefect API at ``api_url`` with a cron schedule every 10 s
    (a seconds field keeps the test short; the default is nightly) until one scheduled run completes; checks the
    deployment, calls ``while_serving(run)`` and returns that flow run. Checks of the run's stored state belong in
    ``while_serving``: a runner that shuts down cancels every flow run whose process it still tracks, and the
    process of a run that has just reported COMPLETED may still be exiting (its state then reads CANCELLED)."""
    serve = subprocess.Popen([str(BIN / "python"), "-m", "flows.benchmark", "serve", "--root", str(project),
                              "--cron", "* * * * * */10", "--stage", "select"], cwd=ROOT, env=env,
                             stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        completed = []
        while not completed:
            assert serve.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no scheduled run completed:\n" + log.read_text()[-3000:]
            time.sleep(3)
            completed = api(api_url, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
        deployment = api(api_url, f"/deployments/{completed[0]['deployment_id']}")
        assert deployment["name"] == "pqd-benchmark-nightly"
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["* * * * * */10"]
        assert completed[0]["parameters"]["root"] == str(project)
        while_serving(completed[0])
        return completed[0]
    finally:
        stop(serve)
