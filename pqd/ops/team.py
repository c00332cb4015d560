"""Team servers on loopback (``make team-up`` / ``team-down`` / ``team-status``): a PostgreSQL cluster in a local
folder, an MLflow tracking server with it as backend store (artifacts under a configurable root), and a
Prefect server with it as its database. A user points ``MLFLOW_TRACKING_URI`` and ``PREFECT_API_URL`` at them;
nothing else changes. sqlite and Prefect's ephemeral mode stay the defaults for one person.

The cluster is made once (``initdb``, password authentication on 127.0.0.1 only, a random password kept in
``<dir>/postgres.password``, mode 0600) and started with ``pg_ctl`` from the machine's PostgreSQL server
binaries. PostgreSQL refuses to run as root: as root its commands run as the ``postgres`` user, who owns the
data folder. What runs where is kept in ``<dir>/team.json``; logs are in ``<dir>/logs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from pqd.errors import InputError, PqdError, command

BIN = Path(sys.executable).parent
PG_USER, DB_USER = "postgres", "pqd"  # the OS user that runs PostgreSQL as root; the database role
DATABASES = ("mlflow", "prefect")
STATE, PASSWORD = "team.json", "postgres.password"
START_TIMEOUT_S = 240  # first start: the servers create their tables in PostgreSQL


class TeamError(PqdError, RuntimeError):
    """A team server that cannot be set up, started or stopped."""


@dataclass(frozen=True)
class Team:
    folder: str
    artifacts: str
    pg_bin: str
    pg_port: int
    mlflow_port: int
    prefect_port: int

    @property
    def pgdata(self) -> Path:
        return Path(self.folder) / "postgres"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    def database_url(self, db: str, driver: str = "postgresql") -> str:
        pw = (Path(self.folder) / PASSWORD).read_text().strip()
        return f"{driver}://{DB_USER}:{pw}@127.0.0.1:{self.pg_port}/{db}"


def find_pg_bin(given: str | None = None) -> Path:
    """The folder of the PostgreSQL server binaries (initdb, pg_ctl, postgres): ``given``, else the newest
    /usr/lib/postgresql/<version>/bin, else the one ``pg_config --bindir`` names."""
    candidates = [Path(given)] if given else sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                                                    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
                                                    reverse=True)
    if not given and shutil.which("pg_config"):
        candidates.append(Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()))
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_ctl").is_file():
            return c
    raise InputError(f"PostgreSQL server binaries not found{f' in {given}' if given else ''}: expected initdb and pg_ctl "
                     "(make postgres-server installs Debian's postgresql package; or pass --pg-bin / PG_BIN)")


def _as_pg(cmd: list[str]) -> list[str]:
    """``cmd`` as the postgres user when this process is root (PostgreSQL refuses root)."""
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()] or \
            [ln for ln in r.stdout.splitlines() if ln.strip()] or [f"exit status {r.returncode}"]
        raise TeamError(f"{what} failed: {lines[-1].strip()}")
    return r.stdout


def _give_to_pg(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam(PG_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def init_cluster(t: Team) -> None:
    """initdb once: role ``pqd`` with a random password, password authentication on 127.0.0.1."""
    folder = Path(t.folder)
    if (t.pgdata / "PG_VERSION").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # PostgreSQL runs as user postgres, who must reach the data folder
        closed = [p for p in t.pgdata.parents if p.is_dir() and not p.stat().st_mode & 0o001]
        if closed:
            raise TeamError(f"{closed[0]} is closed to user {PG_USER} (mode {oct(closed[0].stat().st_mode & 0o777)}): "
                            f"PostgreSQL refuses to run as root, so it runs as {PG_USER}, who must reach {t.pgdata}: "
                            f"choose TEAM_DIR (--dir) in an open folder, or chmod o+x {closed[0]}")
    pwfile = folder / PASSWORD
    if not pwfile.is_file():
        pwfile.write_text(secrets.token_urlsafe(24) + "\n")
        pwfile.chmod(0o600)
    t.pgdata.mkdir(mode=0o700, exist_ok=True)
    _give_to_pg(t.pgdata)
    tmp_pw = folder / ".initdb-pw"  # initdb reads it as the postgres user; removed right after
    shutil.copy(pwfile, tmp_pw)
    _give_to_pg(tmp_pw)
    try:
        _run(_as_pg([str(Path(t.pg_bin) / "initdb"), "-D", str(t.pgdata), "-U", DB_USER, f"--pwfile={tmp_pw}",
                     "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8"]),
             f"initdb in {t.pgdata} (as root it runs as user {PG_USER}, who must reach that folder)")
    finally:
        tmp_pw.unlink(missing_ok=True)


def _pg_running(t: Team) -> bool:
    return subprocess.run(_as_pg([str(Path(t.pg_bin) / "pg_ctl"), "-D", str(t.pgdata), "status"]),
                          capture_output=True).returncode == 0


def start_postgres(t: Team) -> None:
    """pg_ctl start on 127.0.0.1:pg_port (no Unix socket outside the data folder), then the two databases."""
    if not _pg_running(t):
        opts = f"-c listen_addresses=127.0.0.1 -c port={t.pg_port} -c unix_socket_directories={t.pgdata}"
        _run(_as_pg([str(Path(t.pg_bin) / "pg_ctl"), "-D", str(t.pgdata), "-l", str(t.pgdata / "server.log"),
                     "-o", opts, "-w", "-t", "60", "start"]), f"pg_ctl start (log: {t.pgdata / 'server.log'})")
    import psycopg2

    con = psycopg2.connect(t.database_url("postgres"))
    con.autocommit = True  # CREATE DATABASE cannot run in a transaction
    try:
        with con.cursor() as cur:
            for db in DATABASES:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE DATABASE {db}")
    finally:
        con.close()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3):
            return True
    except OSError:
        return False


def _spawn(t: Team, name: str, cmd: list[str], env: dict[str, str], health: str) -> int:
    """Start a server in its own session (log in <dir>/logs/<name>.log) and wait until ``health`` answers."""
    logs = Path(t.folder) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _healthy(health):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_pid(proc.pid)
            tail = (logs / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise TeamError(f"{name} server did not start ({logs / f'{name}.log'}: {tail[0][:300]})")
        time.sleep(1)
    return proc.pid


def _stop_pid(pid: int) -> None:
    """SIGTERM to the process group a server was started in, SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it when this process started it (a zombie keeps its group alive)
            except ChildProcessError:
                pass
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def up(t: Team) -> dict[str, int]:
    """PostgreSQL, then MLflow and Prefect on it; returns the servers' pids (already running ones are kept)."""
    init_cluster(t)
    state = read_state(Path(t.folder)) or {}
    pids = state.get("pids", {})
    _write_state(t, pids)  # before anything starts: team-down stops what did start, even after a failure
    start_postgres(t)
    if "://" not in t.artifacts:
        Path(t.artifacts).mkdir(parents=True, exist_ok=True)
    if not _healthy(f"{t.mlflow_uri}/health"):
        pids["mlflow"] = _spawn(t, "mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                                              str(t.mlflow_port), "--workers", "1"],
                                {"MLFLOW_BACKEND_STORE_URI": t.database_url("mlflow", "postgresql+psycopg2"),
                                 "MLFLOW_ARTIFACTS_DESTINATION": t.artifacts}, f"{t.mlflow_uri}/health")
        _write_state(t, pids)
    if not _healthy(f"{t.prefect_api}/health"):
        pids["prefect"] = _spawn(t, "prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                                "--port", str(t.prefect_port)],
                                 {"PREFECT_SERVER_DATABASE_CONNECTION_URL": t.database_url("prefect", "postgresql+asyncpg"),
                                  "PREFECT_HOME": str(Path(t.folder) / "prefect-home"),
                                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": t.prefect_api},
                                 f"{t.prefect_api}/health")
        _write_state(t, pids)
    return pids


def _write_state(t: Team, pids: dict[str, int]) -> None:
    (Path(t.folder) / STATE).write_text(json.dumps({"team": asdict(t), "pids": pids}, indent=2) + "\n")


def read_state(folder: Path) -> dict | None:
    f = folder / STATE
    return json.loads(f.read_text()) if f.is_file() else None


def down(folder: Path) -> list[str]:
    """Stop MLflow, Prefect and PostgreSQL; returns what was stopped."""
    state = read_state(folder)
    if state is None:
        return []
    t = Team(**state["team"])
    stopped = []
    for name, pid in state.get("pids", {}).items():
        _stop_pid(pid)
        stopped.append(name)
    if (t.pgdata / "PG_VERSION").is_file() and _pg_running(t):
        _run(_as_pg([str(Path(t.pg_bin) / "pg_ctl"), "-D", str(t.pgdata), "-m", "fast", "-w", "stop"]), "pg_ctl stop")
        stopped.append("postgres")
    (folder / STATE).write_text(json.dumps({"team": state["team"], "pids": {}}, indent=2) + "\n")
    return stopped


def status(folder: Path) -> list[str]:
    """One line per server: running or not, and where."""
    state = read_state(folder)
    if state is None:
        return [f"no team servers were set up in {folder}: make team-up"]
    t = Team(**state["team"])
    pg = _pg_running(t) if (t.pgdata / "PG_VERSION").is_file() else False
    lines = [f"postgres  {'running' if pg else 'stopped'}  127.0.0.1:{t.pg_port}  data {t.pgdata} "
             f"(databases {', '.join(DATABASES)}; role {DB_USER}, password in {Path(t.folder) / PASSWORD})",
             f"mlflow    {'running' if _healthy(t.mlflow_uri + '/health') else 'stopped'}  {t.mlflow_uri}  "
             f"backend store postgres/mlflow, artifacts {t.artifacts}",
             f"prefect   {'running' if _healthy(t.prefect_api + '/health') else 'stopped'}  {t.prefect_api}  "
             "database postgres/prefect"]
    return lines + [f"export MLFLOW_TRACKING_URI={t.mlflow_uri} PREFECT_API_URL={t.prefect_api}"]


@command("pqd team")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pqd.ops.team", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["up", "down", "status"])
    ap.add_argument("--dir", default=".team", help="where the cluster, logs and state live")
    ap.add_argument("--artifacts", help="MLflow artifact root (default <dir>/mlartifacts; s3://... for a team)")
    ap.add_argument("--pg-port", type=int, default=5433)
    ap.add_argument("--mlflow-port", type=int, default=5000)
    ap.add_argument("--prefect-port", type=int, default=4200)
    ap.add_argument("--pg-bin", help="folder of initdb and pg_ctl (default: the machine's newest PostgreSQL)")
    args = ap.parse_args(argv)
    folder = Path(args.dir).resolve()
    if args.command == "up":
        artifacts = args.artifacts or str(folder / "mlartifacts")
        t = Team(str(folder), artifacts if "://" in artifacts else str(Path(artifacts).resolve()),
                 str(find_pg_bin(args.pg_bin)), args.pg_port, args.mlflow_port, args.prefect_port)
        up(t)
    elif args.command == "down":
        stopped = down(folder)
        print(f"pqd team: stopped {', '.join(stopped) or 'nothing (nothing was running)'}")
        return 0
    print("\n".join(f"pqd team: {ln}" for ln in status(folder)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
