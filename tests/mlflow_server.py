"""A real `mlflow server` for tests: 127.0.0.1 only, one worker, no job execution, proxied
artifacts; can be stopped and started again on the same port, store and artifacts."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (lean: one worker, no job execution, proxied artifacts),
    stopped and started again on the same port, store and artifacts."""

    def __init__(self, root: Path, backend: str | None = None, admin_password: str | None = None):
        """`backend`: the backend store URI (default: sqlite in `root`; e.g. a PostgreSQL database).
        `admin_password`: run MLflow's basic-auth app (users and permissions in `root`), user `admin`."""
        self.root, self.port, self.proc = root, free_port(), None
        self.backend = backend or f"sqlite:///{root / 'server.db'}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_password = admin_password

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(k, None)
        auth = []
        if self.admin_password:
            auth = ["--app-name", "basic-auth"]
            env.update(MLFLOW_AUTH_ADMIN_PASSWORD=self.admin_password, MLFLOW_FLASK_SERVER_SECRET_KEY="tests")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", self.backend,
             "--artifacts-destination", str(self.root / "artifacts"), *auth],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "server.log", "a"), env=env, start_new_session=True,
            cwd=self.root)   # the auth app keeps its users in ./basic_auth.db
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
        self.stop()
        pytest.fail("mlflow server did not become healthy")

    def reap(self) -> None:
        """After someone else killed it (the fault hook): collect the process."""
        if self.proc is not None:
            self.proc.wait(timeout=30)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.reap()

    def client(self):
        return mlflow.MlflowClient(self.url, self.url)


PG = dict(host="127.0.0.1", port=5432, user="postgres")


def postgres_database(name: str):
    """A fresh PostgreSQL database on the machine's server (trust auth) for one test: (uri, drop)."""
    import psycopg2

    def admin(sql: str) -> None:
        con = psycopg2.connect(dbname="postgres", **PG)
        con.autocommit = True
        try:
            con.cursor().execute(sql)
        finally:
            con.close()

    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin(f'CREATE DATABASE "{name}"')
    return (f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{name}",
            lambda: admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
