"""Team servers (pqd.ops.team) for real: a PostgreSQL cluster in a temp folder, an MLflow server and a Prefect
server on it, on loopback; a tracked result, a release and a scheduled flow run against them, read back from
PostgreSQL itself; then everything stopped. One server set for the module."""

import os
import tempfile
from pathlib import Path

import pytest

from support.projects import clone, free_port, ops_env, reproduced_project
from support.servers import served_benchmark_run
from pqd.ops import release, team, tracking

pytestmark = pytest.mark.slow  # starts PostgreSQL, MLflow and Prefect servers (a minute)


@pytest.fixture(scope="module")
def servers():
    folder = Path(tempfile.mkdtemp(prefix="pqd-team-"))  # under /tmp: as root, user postgres must reach it
    folder.chmod(0o755)
    t = team.Team(str(folder / "team"), str(folder / "artifacts"), str(team.find_pg_bin()), free_port(), free_port(),
                  free_port())
    loop = os.environ.get("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS")
    os.environ["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "1"  # scheduled runs within seconds, not a minute
    try:
        pids = team.up(t)
        yield t, pids
    finally:
        team.down(Path(t.folder))
        if loop is None:
            os.environ.pop("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS")
        else:
            os.environ["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = loop


def pg_rows(t: team.Team, db: str, sql: str, *args) -> list[tuple]:
    """Rows straight from PostgreSQL (psycopg2), independent of the MLflow and Prefect clients."""
    import psycopg2

    with psycopg2.connect(t.database_url(db)) as con, con.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


@pytest.fixture()
def project(tmp_path, tmp_path_factory, tiny_pipeline, ts_features, servers, monkeypatch):
    t, _ = servers
    monkeypatch.setenv("MLFLOW_TRACKING_URI", t.mlflow_uri)
    return clone(reproduced_project(tmp_path_factory, tiny_pipeline, ts_features), tmp_path / "p")


def test_team_up_runs_three_servers_on_loopback_and_says_where(servers):
    t, pids = servers
    assert set(pids) == {"mlflow", "prefect"}
    lines = team.status(Path(t.folder))
    assert [ln.split()[:2] for ln in lines[:3]] == [["postgres", "running"], ["mlflow", "running"],
                                                   ["prefect", "running"]]
    assert lines[-1] == f"export MLFLOW_TRACKING_URI={t.mlflow_uri} PREFECT_API_URL={t.prefect_api}"
    assert oct((Path(t.folder) / team.PASSWORD).stat().st_mode & 0o777) == "0o600"
    # both servers made their tables in their own database
    assert pg_rows(t, "mlflow", "SELECT to_regclass('public.experiments') IS NOT NULL") == [(True,)]
    assert pg_rows(t, "prefect", "SELECT to_regclass('public.flow_run') IS NOT NULL") == [(True,)]


def test_a_tracked_result_and_a_release_land_in_postgres(servers, project):
    t, _ = servers
    run = tracking.track(project)
    assert run.created and run.uri == t.mlflow_uri
    assert pg_rows(t, "mlflow", "SELECT status FROM runs WHERE run_uuid = %s", run.run_id) == [("FINISHED",)]
    v = release.register_candidate(project)
    assert (v.alias, v.created) == ("candidate", True)
    assert pg_rows(t, "mlflow", "SELECT name, version FROM model_versions") == [(v.name, int(v.version))]
    assert pg_rows(t, "mlflow", "SELECT alias FROM registered_model_aliases WHERE name = %s", v.name) == [("candidate",)]
    # artifacts under the team's artifact root, served by the MLflow server
    assert any(Path(t.artifacts).rglob("manifest.json"))
    assert tracking.load_sampler(f"models:/{v.name}@candidate", project).sample([0]).shape[0] == 1


def test_a_scheduled_flow_run_against_the_team_prefect_server(servers, project, tmp_path):
    t, _ = servers
    env = ops_env(PREFECT_API_URL=t.prefect_api, PREFECT_HOME=str(tmp_path / "prefect"),
                  MLFLOW_TRACKING_URI=t.mlflow_uri, PREFECT_RUNNER_POLL_FREQUENCY="1")
    def stored(run: dict) -> None:  # in PostgreSQL, read while the runner serves (see served_benchmark_run)
        assert pg_rows(t, "prefect", "SELECT state_type FROM flow_run WHERE id = %s", run["id"]) == [("COMPLETED",)]

    served_benchmark_run(project, t.prefect_api, env, tmp_path / "serve.log", while_serving=stored)
    finished = pg_rows(t, "mlflow", "SELECT e.name FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id "
                                    "JOIN tags g ON g.run_uuid = r.run_uuid WHERE g.key = 'pqd.kind' "
                                    "AND g.value = 'benchmark' AND r.status = 'FINISHED'")
    assert ("pqd-benchmark",) in finished


def test_team_down_stops_all_three(servers, tmp_path):  # the module's last test: it stops the servers
    t, _ = servers
    assert team.down(Path(t.folder)) == ["mlflow", "prefect", "postgres"]
    assert [ln.split()[:2] for ln in team.status(Path(t.folder))[:3]] == [["postgres", "stopped"], ["mlflow", "stopped"],
                                                                         ["prefect", "stopped"]]
    assert team.down(tmp_path) == [] and team.status(tmp_path) == [f"no team servers were set up in {tmp_path}: make team-up"]
