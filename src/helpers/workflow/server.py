"""`tablora server` / `make server`: a shared MLflow tracking server over PostgreSQL.

`mlflow server` with a PostgreSQL backend store (`postgresql+psycopg://`, the psycopg 3 driver)
and proxied artifacts (`--serve-artifacts --artifacts-destination DIR`): a client or a Dask
worker on any machine needs only MLFLOW_TRACKING_URI=http://HOST:PORT, and every artifact goes
through the server into DIR (`mlflow-artifacts:` URIs), never to a path of the machine that
logged it. SQLite stays the embedded default of everything else.

The database is a URL given by the user, or a PostgreSQL cluster of the server's own, made with
`initdb` on first use under .cache/server/postgres and started with `pg_ctl` on 127.0.0.1 only,
with a generated password (scram-sha-256). PostgreSQL refuses to run as root: as root the
cluster belongs to, and runs as, the `postgres` user that Debian's package creates.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from helpers import config

SERVER_DIR = config.CACHE_DIR / "server"
DB_USER = "tablora"
DB_NAME = "mlflow"
PG_SYSTEM_USER = "postgres"  # who runs PostgreSQL when we are root (Debian's package makes it)
DEFAULT_PORT = 5000
DEFAULT_HOST = "127.0.0.1"
INSTALL_HINT = ("install PostgreSQL (Debian/Ubuntu: `apt-get install -y postgresql`; macOS: "
                "`brew install postgresql`), or give a database URL with --db")


class ServerError(RuntimeError):
    """PostgreSQL or the MLflow server could not start; the message says why and what to do."""

    user_facing = True


def pg_bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, else the newest /usr/lib/postgresql/<ver>/bin
    (Debian keeps them off PATH)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                      else 0)
    return versions[-1].parent if versions else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LocalPostgres:
    """A PostgreSQL cluster in `root` (data/, run/ with the socket and log, password), listening
    on 127.0.0.1:`port`. As root it runs as the `postgres` user, which must be able to reach
    `root` (every folder above it searchable by others)."""

    root: Path
    port: int
    bin_dir: Path | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.bin_dir = self.bin_dir or pg_bin_dir()
        if self.bin_dir is None:
            raise ServerError(f"PostgreSQL's initdb and pg_ctl were not found: {INSTALL_HINT}")

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def password(self) -> str:
        return (self.root / "password").read_text().strip()

    def url(self, database: str = DB_NAME) -> str:
        """The SQLAlchemy URL MLflow takes (`postgresql+psycopg://`)."""
        return (f"postgresql+psycopg://{DB_USER}:{quote(self.password, safe='')}@127.0.0.1:"
                f"{self.port}/{database}")

    def _as_owner(self) -> dict[str, Any]:
        """subprocess arguments that run a command as the cluster's owner (postgres when root)."""
        if os.geteuid() != 0:
            return {}
        import pwd

        pw = pwd.getpwnam(PG_SYSTEM_USER)  # KeyError: no such user, reported by _owner()
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [],
                "env": {"PATH": os.environ.get("PATH", ""), "HOME": pw.pw_dir, "LC_ALL": "C"}}

    def _owner(self) -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        import pwd

        try:
            pw = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            raise ServerError(f"PostgreSQL refuses to run as root and there is no "
                              f"`{PG_SYSTEM_USER}` user: {INSTALL_HINT}") from None
        self._check_reachable(self.root)
        return pw.pw_uid, pw.pw_gid

    @staticmethod
    def _check_reachable(path: Path) -> None:
        """The postgres user must traverse every folder above the cluster."""
        for parent in path.parents:
            if parent.exists() and not parent.stat().st_mode & 0o001:
                raise ServerError(
                    f"{parent} is not searchable by the `{PG_SYSTEM_USER}` user, who runs "
                    f"PostgreSQL here (we are root): `chmod o+x {parent}`, or put the cluster "
                    "elsewhere (TABLORA_CACHE=/some/dir), or give a database URL with --db")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root,
                              **self._as_owner())
        if check and done.returncode != 0:
            raise ServerError(f"`{' '.join(cmd)}` failed ({done.returncode}): "
                              f"{(done.stderr or done.stdout).strip()[-2000:]}{self._log_tail()}")
        return done

    def _log_tail(self) -> str:
        log = self.run_dir / "postgres.log"
        if not log.is_file():
            return ""
        return "\nlast lines of " + str(log) + ":\n" + "\n".join(
            log.read_text(errors="replace").splitlines()[-15:])

    def init(self) -> None:
        """initdb on first use: a superuser `tablora` with a generated password."""
        if (self.data_dir / "PG_VERSION").is_file():
            return
        owner = self._owner()
        self.root.mkdir(parents=True, exist_ok=True)
        password = self.root / "password"
        if not password.is_file():
            password.touch(mode=0o600)
            password.write_text(secrets.token_urlsafe(24) + "\n")
        for folder in (self.data_dir, self.run_dir):
            folder.mkdir(mode=0o700, exist_ok=True)
            if owner:
                os.chown(folder, *owner)
        # initdb reads the password from a file only the cluster's owner can read; gone after.
        pwfile = self.run_dir / "initdb.pw"
        pwfile.touch(mode=0o600)
        pwfile.write_text(self.password + "\n")
        if owner:
            os.chown(pwfile, *owner)
        try:
            self._run("initdb", "-D", str(self.data_dir), "-U", DB_USER, f"--pwfile={pwfile}",
                      "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C")
        finally:
            pwfile.unlink(missing_ok=True)

    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.data_dir), check=False).returncode == 0

    def start(self) -> bool:
        """Start the cluster (init first if needed); False when it was already running."""
        self.init()
        if self.running():
            return False
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.run_dir} "
                   "-c max_connections=50")
        self._run("pg_ctl", "start", "-D", str(self.data_dir), "-w", "-t", "60",
                  "-l", str(self.run_dir / "postgres.log"), "-o", options)
        self.create_database()
        return True

    def create_database(self, name: str = DB_NAME) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=DB_USER,
                             password=self.password, dbname="postgres", autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (name,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        if self.data_dir.is_dir():
            self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w",
                      check=False)


def start_mlflow(db_url: str, artifacts: Path, host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT, workers: int = 0, allowed_hosts: str = "",
                 log: Path | None = None) -> subprocess.Popen:
    """`mlflow server` over `db_url` with proxied artifacts in `artifacts`; returns once it
    answers /health. The database URL goes through the environment (MLFLOW_BACKEND_STORE_URI),
    not the command line, where `ps` would show its password."""
    artifacts = Path(artifacts).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--serve-artifacts",
           "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port)]
    if workers:
        cmd += ["--workers", str(workers)]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": db_url}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    deadline = time.monotonic() + 180  # first start: MLflow migrates the empty database
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log).read_text(errors="replace")[-3000:] if log else ""
            raise ServerError(f"mlflow server exited with {proc.returncode} before answering "
                              f"on {url}{': ' + tail if tail else ''}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    stop_process(proc)
    raise ServerError(f"mlflow server did not answer on {url}/health within 180 s")


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop the server: SIGTERM to `mlflow server` alone (it forwards it to uvicorn, which stops
    its workers; a SIGTERM to the whole group makes uvicorn restart the workers it loses), then
    SIGKILL whatever is left of its process group."""
    import signal

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def serve(db: str = "", host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          artifacts: Path | None = None, db_port: int = 0, workers: int = 0,
          allowed_hosts: str = "") -> int:
    """Run the server until Ctrl-C: over `db` (a SQLAlchemy URL), else over a PostgreSQL
    cluster of its own in .cache/server/postgres (started here, stopped on exit)."""
    import signal

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill PID` stops it as cleanly as Ctrl-C
    artifacts = Path(artifacts or SERVER_DIR / "artifacts")
    pg = None
    started = False
    if not db:
        port_file = SERVER_DIR / "postgres" / "port"
        if not db_port:
            db_port = int(port_file.read_text()) if port_file.is_file() else free_port()
        pg = LocalPostgres(SERVER_DIR / "postgres", db_port)
        print(f"PostgreSQL: {pg.data_dir} on 127.0.0.1:{db_port}", flush=True)
        started = pg.start()
        port_file.write_text(f"{db_port}\n")
        db = pg.url()
    shown = db.split("@")[-1]
    try:
        proc = start_mlflow(db, artifacts, host, port, workers, allowed_hosts,
                            log=SERVER_DIR / "mlflow-server.log")
        print(f"MLflow server: http://{host}:{port} (backend store postgresql @{shown}, "
              f"artifacts proxied into {artifacts}; log {SERVER_DIR / 'mlflow-server.log'})\n"
              f"Point clients and workers at it: export MLFLOW_TRACKING_URI=http://"
              f"{socket.gethostname() if host == '0.0.0.0' else host}:{port}\n"
              "Ctrl-C stops it.", flush=True)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            stop_process(proc)
    finally:
        if pg is not None and started:
            pg.stop()
