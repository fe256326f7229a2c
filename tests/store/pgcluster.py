"""A throwaway PostgreSQL server for the store tests.

``find_server()`` says where PostgreSQL is: the URL in ``ISSC_TEST_PG_URL`` (an
existing server; the role must be allowed to CREATE DATABASE), or the server binaries
(``initdb``, ``pg_ctl`` on PATH, or Debian's ``/usr/lib/postgresql/*/bin``), from
which ``TempCluster`` makes a cluster in a temporary directory, listening on a unix
socket only (no port to collide with, nothing on the network), with fsync off (a test
database need not survive a power cut). PostgreSQL refuses to run as root, so as root
the cluster belongs to, and runs as, the ``postgres`` system user if there is one,
else ``nobody``.

Run as a script it starts a cluster, prints its admin URL and waits for Ctrl-C, for
trying things by hand: ``python tests/store/pgcluster.py``.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ENV_URL = "ISSC_TEST_PG_URL"
ROLE = "issc"
_CONF = """
listen_addresses = ''
unix_socket_directories = '{socket_dir}'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 50
"""


class ServerUnavailable(Exception):
    """No PostgreSQL server can be had here; the message says why."""


def find_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: from PATH, else the newest Debian one."""
    on_path = shutil.which("pg_ctl")
    if on_path is not None:
        bindir = Path(on_path).resolve().parent
        if (bindir / "initdb").exists():
            return bindir
    candidates = glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path))

    for pg_ctl in sorted(candidates, key=version, reverse=True):
        bindir = Path(pg_ctl).parent
        if (bindir / "initdb").exists():
            return bindir
    return None


def _unprivileged_user() -> pwd.struct_passwd | None:
    """Who runs the server: nobody-like when we are root, ourselves otherwise (None)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServerUnavailable("running as root and there is no 'postgres' or 'nobody' user")


@dataclass
class TempCluster:
    """A PostgreSQL cluster in a temporary directory; ``stop()`` removes it."""

    bindir: Path
    base: Path
    user: pwd.struct_passwd | None

    @classmethod
    def start(cls, bindir: Path) -> TempCluster:
        """initdb and start a cluster. Raises ServerUnavailable with the server's log."""
        user = _unprivileged_user()
        # /tmp, not pytest's tmp dir: that one is private to root, and the server's user
        # must reach its data directory. The socket path must also stay under ~100 bytes.
        base = Path(tempfile.mkdtemp(prefix="issc-pg-", dir="/tmp" if user else None))
        cluster = cls(bindir, base, user)
        try:
            cluster._init_and_start()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base / "sock"

    @property
    def log_file(self) -> Path:
        return self.base / "server.log"

    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{ROLE}@/{database}?host={self.socket_dir}"

    def _run(self, *args: str, timeout: float = 120) -> None:
        kwargs: dict[str, object] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        done = subprocess.run(
            args,
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"},
            **kwargs,  # type: ignore[call-overload]
        )
        if done.returncode != 0:
            log = (
                self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
            )
            raise ServerUnavailable(
                f"{Path(args[0]).name} failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-2000:]}\n{log}"
            )

    def _init_and_start(self) -> None:
        self.socket_dir.mkdir()
        if self.user is not None:
            for path in (self.base, self.socket_dir):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self._run(
            str(self.bindir / "initdb"),
            "--pgdata",
            str(self.data_dir),
            "--username",
            ROLE,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        )
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(_CONF.format(socket_dir=self.socket_dir))
        self._run(
            str(self.bindir / "pg_ctl"),
            "start",
            "--pgdata",
            str(self.data_dir),
            "--log",
            str(self.log_file),
            "--wait",
            "--timeout",
            "60",
        )

    def stop(self) -> None:
        """Stop the server (if it runs) and remove everything it had."""
        if (self.data_dir / "postmaster.pid").exists():
            # If it will not stop, removing its directory makes it exit within a minute.
            with contextlib.suppress(ServerUnavailable, subprocess.TimeoutExpired):
                self._run(
                    str(self.bindir / "pg_ctl"),
                    "stop",
                    "--pgdata",
                    str(self.data_dir),
                    "--mode",
                    "immediate",
                    "--wait",
                )
        shutil.rmtree(self.base, ignore_errors=True)


_names = itertools.count(1)


def fresh_database_name() -> str:
    """A database (or schema) name that no other test of this or a concurrent run uses."""
    return f"issc_test_{os.getpid()}_{next(_names)}"


if __name__ == "__main__":
    found = find_bindir()
    if found is None:
        raise SystemExit("no PostgreSQL server binaries found (apt-get install postgresql)")
    cluster = TempCluster.start(found)
    print(cluster.admin_url(), flush=True)
    try:
        input("PostgreSQL is running; press Enter or Ctrl-C to stop it\n")
    except (KeyboardInterrupt, EOFError):
        pass
    finally:
        cluster.stop()
