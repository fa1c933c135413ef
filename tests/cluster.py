"""A real single-node SLURM and a real PostgreSQL, started by the test session in a directory of their own.

SLURM: Debian's `slurmctld`, `slurmd` and `munge`, the settings `../shared/reference/slurm.md` measured (a private
munge socket, `proctrack/pgid`, no accounting, `KillWait=10`, `cred_expire=10` so that a requeued job starts again
within a minute). PostgreSQL: Debian's server, a cluster made with `initdb` in the directory (as the `postgres` user:
initdb refuses root), listening on a free port of 127.0.0.1. `tools/test.sh` installs both where it may; where they
are missing, `missing()` says what, and the tests that need them are skipped with that sentence.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

POSTGRES_BIN = Path("/usr/lib/postgresql")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin() -> Path | None:
    versions = sorted(POSTGRES_BIN.glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


def missing(what: str) -> str | None:
    """Why the tests of `what` ("slurm" or "postgres") cannot run here, or None."""
    if what == "slurm":
        absent = [tool for tool in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol") if not shutil.which(tool)]
        if absent:
            return (f"SLURM is not installed ({', '.join(absent)} missing): tools/test.sh installs it as root with "
                    f"apt-get (slurmctld slurmd slurm-client munge)")
    if what == "postgres":
        if postgres_bin() is None:
            return "PostgreSQL is not installed: tools/test.sh installs it as root with apt-get (postgresql)"
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return "psycopg is not installed: pip install 'smptrain[postgres]' (tools/setup.sh does)"
    if os.geteuid() != 0:
        return f"starting {what} for the tests needs root"
    return None


class Slurm:
    """slurmctld, slurmd and munged for one test session; `env` is what its client commands need."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.processes: list[subprocess.Popen] = []
        root.mkdir(parents=True, exist_ok=True)
        for name in ("state", "spool", "munge"):
            (root / name).mkdir(exist_ok=True)
        os.chmod(root / "munge", 0o755)
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, cpus: int = 2, cred_expire: int = 5) -> "Slurm":
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        munge = self.root / "munge"
        self.processes.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge / 'munge.socket.2'}",
             f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
             f"--seed-file={munge / 'munged.seed'}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self._wait(lambda: (munge / "munge.socket.2").exists(), "munged")
        memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        self.conf.write_text("\n".join([
            "ClusterName=smptrain", f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "AuthType=auth/munge", f"AuthInfo=socket={munge / 'munge.socket.2'},cred_expire={cred_expire}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={self.root / 'state'}", f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}", f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}", f"SlurmdLogFile={self.root / 'slurmd.log'}",
            "ProctrackType=proctrack/pgid", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.root / 'jobcomp.txt'}", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory", "DefMemPerCPU=1024", "KillWait=10", "MinJobAge=600",
            "MailProg=/bin/true", "SchedulerParameters=bf_interval=2,sched_interval=2", "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # CPUs as configured (more jobs at once than cores: they mostly wait)
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN",
            f"PartitionName=main Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""]))
        for daemon in (["slurmctld", "-D", "-f", str(self.conf)], ["slurmd", "-D", "-f", str(self.conf), "-N", self.host]):
            self.processes.append(subprocess.Popen(daemon, env=self.env, stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL))
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T").stdout, "the node to be idle")
        return self

    def stop(self) -> None:
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=30)
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()

    def run(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def sbatch(self, script: Path, *options: str, cwd: Path, env: dict | None = None) -> int:
        done = subprocess.run(["sbatch", "--parsable", *options, str(script)], cwd=cwd, capture_output=True,
                              text=True, timeout=60, env={**self.env, **(env or {})})
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip().split(";")[0])

    def job(self, job: str | int) -> dict:
        """`scontrol show job`'s fields of a job (or an array task, `JOB_TASK`), e.g. JobState, Restarts, ExitCode."""
        text = self.run("scontrol", "show", "job", "-o", str(job)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def tasks(self, job: int) -> dict[int, dict]:
        """Every task of an array job, by task id."""
        found = {}
        for line in self.run("scontrol", "show", "job", "-o", str(job)).stdout.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if fields.get("ArrayTaskId", "").isdigit():
                found[int(fields["ArrayTaskId"])] = fields
        return found

    def wait(self, predicate, what: str, timeout: float = 300) -> None:
        self._wait(predicate, what, timeout)

    def _wait(self, predicate, what: str, timeout: float = 60) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if predicate():
                return
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-2000:] for p in self.root.glob("*.log") if p.is_file())
        raise AssertionError(f"timed out waiting for {what}\n{logs}")


class Postgres:
    """A PostgreSQL server (made by initdb as the `postgres` user) on a free port of 127.0.0.1, in a directory of its
    own under the system's temporary directory: pytest's are private to root, and the server runs as `postgres`."""

    def __init__(self):
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="smptrain-postgres-"))
        self.root, self.bin, self.port = root, postgres_bin(), free_port()
        self.data = root / "data"
        self.process: subprocess.Popen | None = None

    def as_postgres(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True, timeout=120,
                              **kwargs)

    def start(self) -> "Postgres":
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root, "postgres", "postgres")
        self.root.chmod(0o755)
        init = self.as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        assert init.returncode == 0, init.stderr
        self.process = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}", "-c", "fsync=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.time() + 60
        while self.as_postgres(str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)).returncode:
            assert time.time() < end, "PostgreSQL did not start"
            time.sleep(0.2)
        return self

    def fresh_database(self, name: str) -> str:
        """An empty database, and the URL smptrain-tune's documentation gives for it."""
        made = self.as_postgres(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), name)
        assert made.returncode == 0, made.stderr
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.root, ignore_errors=True)
