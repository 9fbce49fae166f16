"""A real two-node Slurm cluster on one Linux machine, for tests/test_slurm.py.

Each node is a network namespace with its own address (a veth pair on a bridge), its own hostname
(a UTS namespace) and its own /etc/hosts (bind-mounted in a private mount namespace); one slurmd
runs in each. slurmctld and munged run outside them, on the bridge's address. The file system is
shared, as on a cluster. Everything the cluster writes (slurm.conf, gres.conf, the munge key and
socket, state, spool, pid and log files) lives under one temporary directory that is removed
afterwards; nothing in /etc is changed. Requires root (namespaces, bridges), `ip`, `nsenter`,
`unshare`, and Debian's `slurmctld slurmd slurm-client munge` (Slurm 22.05):

    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge

Why this shape (measured on Slurm 22.05.8): `ip netns exec` remounts /sys and slurmd then fails
("No filesystem mounted on /sys/fs/cgroup"), so nodes are entered with nsenter (network only) plus
unshare (hostname, /etc/hosts). A NodeName must be the node's resolvable hostname (job scripts see
NodeNames in SLURM_JOB_NODELIST), and torchrun's c10d rendezvous decides which agent hosts the store
by resolving its own hostname, so every node needs its own. munged refuses a socket whose directory
or any parent lacks o+x, which rules out pytest's 0700 temporary directories.

Requeued jobs: Slurm holds one for AuthInfo's cred_expire so the previous attempt's credential
expires (120 s by default; 5 s here), and the scheduler's main loop runs every sched_interval
(60 s by default; 1 s here), so a requeued test job starts again ~6 s later. Releasing it earlier
(`scontrol update StartTime=now`) makes it fail: "Killing non-startable batch job: Job credential
revoked".

Each node has 2 CPUs (SlurmdParameters=config_overrides, whatever the machine has) and 2 fake GPUs
(gres.conf File= pointing at character devices with no driver behind them): a job asking for GPUs
gets SLURM_GPUS_ON_NODE and CUDA_VISIBLE_DEVICES as on a GPU cluster, one asking for none sees a
CPU-only allocation.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NODES = ("node1", "node2")
CONTROLLER = "scpctl"
CPUS_PER_NODE = 2
GPUS_PER_NODE = 2
_PREFIX = "scpt"  # network namespaces scpt<pid>n<i>, bridge scpt<pid>br: <pid> is the creating process
_NAME_RE = re.compile(rf"^{_PREFIX}(\d+)(?:n\d+|br)$")
PACKAGES = "slurmctld slurmd slurm-client munge"
_TOOLS = ("ip", "nsenter", "unshare", "mount", "hostname", "slurmctld", "slurmd", "munged", "mungekey", "sbatch",
          "scontrol", "squeue", "scancel", "sinfo", "srun")


# Debian installs the daemons in /usr/sbin, which a non-login PATH may lack.
PATH = os.pathsep.join(dict.fromkeys([*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/sbin"]))


def _run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": PATH}, **kw)


def unavailable(slurm: bool = True) -> str | None:
    """Why this machine cannot run the cluster (a skip reason), or None."""
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (network namespaces, a bridge, bind mounts); CI runs as root"
    tools = _TOOLS if slurm else _TOOLS[:5]
    missing = [t for t in tools if shutil.which(t, path=PATH) is None]
    if missing:
        return (f"missing {' '.join(missing)}: apt-get install -y --no-install-recommends {PACKAGES} "
                "(.ci/run installs them)")
    probe = f"{_PREFIX}{os.getpid()}probe"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns(ns: str) -> None:
    """SIGKILL what still runs in a namespace this module created, then delete it."""
    pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    for _ in range(50):
        if not _run("ip", "netns", "pids", ns, check=False).stdout.split():
            break
        time.sleep(0.1)
    _run("ip", "netns", "del", ns, check=False)


def remove_stale() -> None:
    """What a test process that died without tearing down left: its daemons (found by the pid
    files in its cluster directory, and only when their command line names that directory), the
    directory, its namespaces and bridge."""
    for d in Path("/tmp").glob("scp-slurm-*"):
        try:
            owner = int((d / "owner").read_text())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        for pidfile in [*d.glob("run/*.pid"), d / "munge" / "munged.pid"]:
            with contextlib.suppress(OSError, ValueError, ProcessLookupError):
                pid = int(pidfile.read_text().split()[0])
                if str(d) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME_RE.match(name)
        if m and not _alive(int(m[1])):
            _kill_netns(name)
    for line in _run("ip", "-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        m = _NAME_RE.match(name)
        if m and not _alive(int(m[1])):
            _run("ip", "link", "del", name, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Nodes:
    """Two "machines": network namespaces with their own address, hostname and /etc/hosts.
    `wrap(node, argv)` is the command line that runs argv on that node."""

    def __init__(self, root: Path, names: tuple[str, ...] = NODES) -> None:
        self.root = root
        self.names = names
        pid = os.getpid()
        self.subnet = f"10.200.{100 + pid % 150}"
        self.controller_addr = f"{self.subnet}.254"
        self.bridge = f"{_PREFIX}{pid}br"
        self.netns = {n: f"{_PREFIX}{pid}n{i + 1}" for i, n in enumerate(names)}
        self.addr = {n: f"{self.subnet}.{i + 1}" for i, n in enumerate(names)}
        self.hosts = root / "hosts"
        self._made: list[str] = []

    def __enter__(self) -> Nodes:
        remove_stale()
        try:
            self.hosts.write_text("127.0.0.1 localhost\n" + f"{self.controller_addr} {CONTROLLER}\n"
                                  + "".join(f"{a} {n}\n" for n, a in self.addr.items()))
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            self._made.append(self.bridge)
            _run("ip", "addr", "add", f"{self.controller_addr}/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            for i, (node, ns) in enumerate(self.netns.items()):
                _run("ip", "netns", "add", ns)
                self._made.append(ns)
                host_end = f"{self.bridge[:-2]}v{i + 1}"
                _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _run("ip", "link", "set", host_end, "master", self.bridge)
                _run("ip", "link", "set", host_end, "up")
                for cmd in (("ip", "addr", "add", f"{self.addr[node]}/24", "dev", "eth0"),
                            ("ip", "link", "set", "eth0", "up"), ("ip", "link", "set", "lo", "up")):
                    _run("ip", "netns", "exec", ns, *cmd)  # ip only: /sys remounting does not matter here
        except BaseException:
            self.close()
            raise
        return self

    def wrap(self, node: str, argv: list[str]) -> list[str]:
        script = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare", "--uts", "--mount", "--propagation",
                "private", "sh", "-c", script, "node", node, str(self.hosts), *argv]

    def close(self) -> None:
        for name in reversed(self._made):
            if name == self.bridge:
                _run("ip", "link", "del", name, check=False)
            else:
                _kill_netns(name)
        self._made.clear()

    def __exit__(self, *exc) -> None:
        self.close()


def _slurm_conf(d: Path, nodes: Nodes, ctld_port: int, slurmd_port: int) -> str:
    node_lines = "".join(
        f"NodeName={n} NodeAddr={nodes.addr[n]} CPUs={CPUS_PER_NODE} Boards=1 SocketsPerBoard=1 "
        f"CoresPerSocket={CPUS_PER_NODE} ThreadsPerCore=1 RealMemory=1000 Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN\n"
        for n in nodes.names)
    return f"""\
ClusterName=scptest
SlurmctldHost={CONTROLLER}({nodes.controller_addr})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={d}/plugstack.conf
TmpFS={d}/tmp
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
MinJobAge=600
GresTypes=gpu
{node_lines}PartitionName=debug Nodes={",".join(nodes.names)} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged + slurmctld outside the nodes, one slurmd per node; `env` is what a client (sbatch,
    scontrol) needs. Use as a context manager; on exit every job is cancelled and every process and
    file of the cluster removed."""

    def __init__(self, base: Path | None = None) -> None:
        # A directory with o+x on it and every parent (munged checks), not pytest's 0700 tmp_path.
        self.dir = Path(tempfile.mkdtemp(prefix="scp-slurm-", dir=base or "/tmp"))
        self.dir.chmod(0o755)
        (self.dir / "owner").write_text(str(os.getpid()))
        self.nodes = Nodes(self.dir)
        self.conf = self.dir / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "PATH": PATH, "SLURM_CONF": str(self.conf)}
        for k in list(self.env):  # a test run inside a Slurm job must not leak that job into ours
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del self.env[k]

    # -- life cycle ---------------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        d = self.dir
        for sub in ("munge", "state", "spool", "run", "log", "tmp", "fakegpu"):
            (d / sub).mkdir(mode=0o755)
        (d / "munge").chmod(0o755)
        (d / "plugstack.conf").write_text("")
        for i in range(GPUS_PER_NODE):
            # Character devices (NVIDIA's major number; no driver behind them): slurmd rejects plain
            # files ("not a valid character or block device") and then sets no CUDA_VISIBLE_DEVICES.
            os.mknod(d / "fakegpu" / f"nvidia{i}", 0o600 | stat.S_IFCHR, os.makedev(195, i))
        self.conf.write_text(_slurm_conf(d, self.nodes, _free_port(), 6818))
        (d / "gres.conf").write_text(f"Name=gpu File={d}/fakegpu/nvidia[0-{GPUS_PER_NODE - 1}]\n")
        key = d / "munge" / "munge.key"
        _run("mungekey", "-c", "-k", str(key))
        key.chmod(0o600)
        self._spawn("munged", ["munged", "-F", "-f", f"--key-file={key}", f"--socket={d}/munge/munge.socket",
                               f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/log/munged.log",
                               f"--seed-file={d}/munge/munged.seed"])
        self._wait(lambda: (d / "munge" / "munge.socket").exists(), 10, "munged socket")
        self.nodes.__enter__()
        # slurmctld in the machine's network namespace (on the bridge's address), but with the
        # controller's hostname and the cluster's /etc/hosts.
        script = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'
        self._spawn("slurmctld", ["unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c", script,
                                  "ctl", CONTROLLER, str(self.nodes.hosts),
                                  "slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.scontrol("ping", check=False).stdout.count("UP") > 0, 20, "slurmctld")
        for node in self.nodes.names:
            self._spawn(f"slurmd-{node}", self.nodes.wrap(node, ["slurmd", "-D", "-f", str(self.conf), "-N", node]))
        self._wait(self._all_idle, 30, "both nodes idle")

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.dir / "log" / f"{name}.stdout", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env)
        out.close()

    def _wait(self, ok, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}\n{self.logs()}")
            if ok():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{what}: not ready after {timeout:.0f} s\n{self.logs()}")

    def _all_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2], strict=False))
        return all(states.get(n, "").startswith("idle") for n in self.nodes.names)

    def close(self) -> None:
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                end = time.monotonic() + 10
                while time.monotonic() < end and self.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
                    time.sleep(0.5)
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        self.nodes.close()  # kills what is left on the nodes (job steps) with the namespaces
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- clients ------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, env: dict | None = None, inherit: bool = True,
            cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """A client command; `env` on top of the cluster's (or instead of it: inherit=False)."""
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                           env={**self.env, **(env or {})} if inherit else env)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: rc={p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("scontrol", *args, check=check)

    def sbatch(self, *args: str, env: dict | None = None, inherit: bool = True, cwd: Path | None = None) -> int:
        """The job id. sbatch passes its whole environment to the job (Slurm's default)."""
        out = self.run("sbatch", "--parsable", *args, env=env, inherit=inherit, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, Reason, ExitCode, StdOut, ...)."""
        out = self.scontrol("show", "job", "-o", str(job_id)).stdout
        fields: dict[str, str] = {}
        for m in re.finditer(r"(\w[\w:/]*)=(.*?)(?= \w[\w:/]*=|$)", out.strip()):
            fields[m[1]] = m[2]
        return fields

    def wait_job(self, job_id: int, until, timeout: float = 300,
                 on_requeue: tuple[str, ...] = ()) -> dict[str, str]:
        """Poll until `until(job)` holds (sbatch --wait polls slowly). `on_requeue`: `scontrol
        update` fields for a requeued job while it waits for its BeginTime (e.g. TimeLimit=10).
        Never StartTime=now: a requeued job waits AuthInfo's cred_expire (5 s here, 120 s by
        default) for the previous attempt's credential to expire; started earlier, it fails with
        "Job credential revoked" (measured)."""
        end = time.monotonic() + timeout
        updated = None
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if (on_requeue and job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime"
                    and updated != job.get("Restarts")):
                self.scontrol("update", f"JobId={job_id}", *on_requeue)
                updated = job.get("Restarts")
            if time.monotonic() > end:
                raise TimeoutError(f"job {job_id}: {job}\n{self.logs()}")
            time.sleep(0.25)

    def wait_done(self, job_id: int, timeout: float = 300) -> dict[str, str]:
        return self.wait_job(job_id, lambda j: j.get("JobState") in FINAL, timeout)

    def logs(self, lines: int = 30) -> str:
        parts = []
        for f in sorted((self.dir / "log").glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            if text:
                parts.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(parts)


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


if __name__ == "__main__":  # bring a cluster up by hand: python -m tests.slurm_cluster
    reason = unavailable()
    if reason:
        raise SystemExit(reason)
    t0 = time.monotonic()
    for sig in (signal.SIGINT, signal.SIGTERM):  # tear down on either (a background job ignores SIGINT)
        signal.signal(sig, lambda *_: sys.exit(0))
    with SlurmCluster() as c:
        print(f"cluster up in {time.monotonic() - t0:.1f} s: SLURM_CONF={c.conf}")
        print(c.run("sinfo").stdout)
        print(c.run("srun", "-N2", "hostname", timeout=60).stdout)
        if "--hold" in sys.argv:  # until SIGINT/SIGTERM
            signal.pause()
        t1 = time.monotonic()
    print(f"down in {time.monotonic() - t1:.1f} s")
