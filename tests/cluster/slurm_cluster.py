"""A real two-node SLURM cluster on one Linux machine, for the launch tests.

    cluster = SlurmCluster(workdir); cluster.up()     # or: python tests/cluster/slurm_cluster.py up
    subprocess.run(["sbatch", ...], env=cluster.env())
    cluster.down()                                    # idempotent; also cleans up a crashed earlier run

Layout (every name starts with ``slt`` so that teardown can find exactly what this file created):

    host network namespace          slt-node1 (net, UTS, IPC ns)  slt-node2 (net, UTS, IPC ns)
    munged, slurmctld  ── sltbr0 ── eth0 10.201.0.11 ─ slurmd    eth0 10.201.0.12 ─ slurmd
    10.201.0.1 (bridge address)

Why it is built this way (each point was found by trying):
- one slurmd per node, each in its own network namespace so that two nodes can use the same ports and
  a rendezvous on "node1" really crosses a network, in its own UTS namespace so that ``hostname``
  (which torchrun's c10d rendezvous compares with the endpoint) is the node name, and with its own
  /dev/shm and SysV IPC, so ranks on different nodes cannot meet through shared memory;
- ``nsenter --net`` rather than ``ip netns exec``: the latter remounts /sys and slurmd then fails in its
  cgroup setup; with ProctrackType=proctrack/linuxproc and TaskPlugin=task/none no cgroup is needed;
- munged and slurmctld run in the host namespace; the munge socket is a path, which every namespace
  reaches through the shared filesystem; slurmctld listens on the bridge address;
- node names go into /etc/hosts (restored byte for byte at teardown), as on a real cluster;
- GPUs are declared as GRES backed by stand-in device nodes, so ``--gpus-per-node`` is accepted and the
  launch script's GPU arithmetic is exercised exactly as users type it.

A run that died without teardown leaves a record in ``STATE_FILE``; the next ``up()`` or ``down()``
uses it to stop leftover daemons and restore /etc/hosts before doing anything else.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # tests/servers.py, also when this file runs as a script

import servers  # noqa: E402

PREFIX = "slt"
BRIDGE = f"{PREFIX}br0"
SUBNET = "10.201.0"
BRIDGE_ADDR = f"{SUBNET}.1"
CTL_NAME = f"{PREFIX}ctl"
CTL_PORT = 16817  # not SLURM's 6817, so a site's real slurmctld on this machine is never touched
SLURMD_PORT = 16818
NODES = {"node1": f"{SUBNET}.11", "node2": f"{SUBNET}.12"}
GPUS_PER_NODE = 2
STATE_FILE = Path("/run") / f"{PREFIX}-cluster.json"
HOSTS = Path("/etc/hosts")
HOSTS_MARK = f"# {PREFIX}-cluster test harness"
PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the test cluster; the message says why (used as the skip reason)."""


def netns_name(node: str) -> str:
    return f"{PREFIX}-{node}"


def _run(cmd: list[str], *, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True, **kw)


def _missing_tools() -> list[str]:
    return [t for t in DAEMONS + ("munge", "ip", "nsenter", "unshare") if shutil.which(t) is None]


def ensure_installed(log: Path | None = None) -> None:
    """Install SLURM and munge with apt-get when they are missing.

    ClusterUnavailable (a skip) where the cluster cannot run at all: not Linux, not root, no apt-get.
    A failing apt-get is an error: root with apt-get is where the cluster is expected to run (CI).
    """
    if not sys.platform.startswith("linux"):
        raise ClusterUnavailable("the SLURM test cluster needs Linux network namespaces")
    if os.geteuid() != 0:
        raise ClusterUnavailable("the SLURM test cluster needs root (network namespaces, /etc/hosts, daemons)")
    missing = _missing_tools()
    if not missing:
        return
    apt = shutil.which("apt-get")
    if apt is None:
        raise ClusterUnavailable(f"{', '.join(missing)} missing and no apt-get to install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = open(log, "a") if log else subprocess.DEVNULL
    try:
        # The lock timeout waits out an unattended upgrade instead of failing on a busy dpkg lock.
        for cmd in (
            [apt, "-o", "DPkg::Lock::Timeout=300", "update", "-q"],
            [
                apt,
                "-o",
                "DPkg::Lock::Timeout=300",
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                *PACKAGES,
                "iproute2",
                "util-linux",
                "procps",
            ],
        ):
            r = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900)
            if r.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(cmd)} failed with exit code {r.returncode}" + (f"; log: {log}" if log else "")
                )
    finally:
        if log:
            out.close()
    still = _missing_tools()
    if still:
        raise RuntimeError(f"apt-get installed {' '.join(PACKAGES)} but {', '.join(still)} is still missing")


# --------------------------------------------------------------------------------------------------
# Teardown pieces: each is safe to call when the thing it removes does not exist.


def _pid_alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rsplit(")", 1)[-1].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_pids(pids: list[int], *, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after ``grace_s``."""
    pids = [p for p in pids if p > 1 and p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.1)
        pids = [p for p in pids if _pid_alive(p)]
        if not pids:
            return


def netns_pids(node: str) -> list[int]:
    """Every process inside a node's network namespace: its slurmd, slurmstepds and all job processes."""
    r = _run(["ip", "netns", "pids", netns_name(node)], check=False)
    return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []


def _restore_hosts(original: str | None) -> None:
    if original is not None:
        current = HOSTS.read_text()
        if current != original:
            # Written in place: /etc/hosts is often a bind mount that a rename would not replace.
            with open(HOSTS, "r+") as f:
                f.write(original)
                f.truncate()
        return
    # No saved copy (an older crash): drop only the lines this harness marks as its own.
    lines = HOSTS.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if not ln.rstrip().endswith(HOSTS_MARK)]
    if kept != lines:
        with open(HOSTS, "r+") as f:
            f.write("".join(kept))
            f.truncate()


def teardown_network() -> None:
    for node in NODES:
        _run(["ip", "netns", "delete", netns_name(node)], check=False)
    _run(["ip", "link", "delete", BRIDGE], check=False)
    # veth pairs disappear asynchronously with their namespace; wait so that a quick re-up does not clash.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        links = _run(["ip", "-o", "link"], check=False).stdout
        if f"{PREFIX}-n" not in links and BRIDGE not in links:
            return
        time.sleep(0.2)


def leftovers() -> list[str]:
    """What a previous run (or this one) left behind; empty after a clean teardown."""
    found = []
    ns = _run(["ip", "netns", "list"], check=False).stdout
    found += [f"netns {n}" for n in (netns_name(x) for x in NODES) if n in ns]
    if BRIDGE in _run(["ip", "-o", "link"], check=False).stdout:
        found.append(f"bridge {BRIDGE}")
    if HOSTS.exists() and HOSTS_MARK in HOSTS.read_text():
        found.append("/etc/hosts entries")
    if STATE_FILE.exists():
        try:
            for name, pid in json.loads(STATE_FILE.read_text()).get("pids", {}).items():
                if _pid_alive(pid) and name.split("-")[0] in _cmdline(pid):
                    found.append(f"{name} (pid {pid})")
        except (OSError, ValueError):
            found.append(str(STATE_FILE))
    return found


def cleanup_stale() -> None:
    """Undo whatever an earlier, crashed run of this harness left, using its state file."""
    state: dict = {}
    if STATE_FILE.exists():
        try:
            state = json.loads(STATE_FILE.read_text())
        except (OSError, ValueError):
            state = {}
    for node in NODES:
        _kill_pids(netns_pids(node), grace_s=2)
    daemons = [
        pid for name, pid in state.get("pids", {}).items() if _pid_alive(pid) and name.split("-")[0] in _cmdline(pid)
    ]
    _kill_pids(daemons, grace_s=3)
    teardown_network()
    _restore_hosts(state.get("hosts"))
    STATE_FILE.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------


class TcpForwarder(servers.TcpForwarder):
    """Listens on the bridge address and pipes connections to a server bound to 127.0.0.1.

    Test servers (moto, MLflow) usually bind loopback, which inside a node's namespace is that node's
    own loopback; this makes them reachable from the nodes at ``BRIDGE_ADDR:port``. It listens from
    construction on (on a free port) until ``close()``.
    """

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = BRIDGE_ADDR) -> None:
        super().__init__(target_host, target_port, listen_host=listen_host, connect_timeout=10, name="slt-forwarder")
        self.start()

    def close(self) -> None:
        self.stop()


class SlurmCluster:
    """Bring-up and teardown of the two-node cluster; ``workdir`` holds configs, spool and logs."""

    def __init__(self, workdir: str | Path, *, slurmd_timeout_s: int = 12, cred_expire_s: int = 10) -> None:
        self.dir = Path(workdir).resolve()
        self.conf = self.dir / "etc" / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.slurmd_timeout_s = slurmd_timeout_s
        self.cred_expire_s = cred_expire_s
        self.procs: dict[str, subprocess.Popen] = {}
        self._state: dict = {"pids": {}, "hosts": None}
        self.is_up = False

    # --- environment for clients ------------------------------------------------------------------
    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for sbatch/srun/squeue; sbatch passes it on to the job (--export=ALL)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del env[k]  # a surrounding allocation must not leak into the test cluster's jobs
        env.update(extra or {})
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return _run(list(cmd), check=check, timeout=timeout, env=kw.pop("env", None) or self.env(), **kw)

    # --- bring-up -----------------------------------------------------------------------------------
    def up(self, *, timeout_s: float = 60) -> SlurmCluster:
        ensure_installed(self.dir / "apt.log" if self.dir.exists() else None)
        cleanup_stale()
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._record()
            self._network()
            self._hosts()
            self._write_config()
            self._munge()
            self._slurmctld()
            for node in NODES:
                self._slurmd(node)
            self._wait_idle(timeout_s)
        except BaseException:
            self.down()
            raise
        self.is_up = True
        return self

    def _record(self) -> None:
        self._state["pids"] = {name: p.pid for name, p in self.procs.items()}
        STATE_FILE.write_text(json.dumps(self._state))

    def _network(self) -> None:
        probe = _run(["ip", "netns", "add", netns_name("probe")], check=False)
        if probe.returncode != 0:
            raise ClusterUnavailable(f"cannot create network namespaces here: {probe.stderr.strip()}")
        _run(["ip", "netns", "delete", netns_name("probe")], check=False)
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])
        for i, (node, addr) in enumerate(NODES.items(), start=1):
            ns, host_if = netns_name(node), f"{PREFIX}-n{i}-h"
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "link", "set", host_if, "master", BRIDGE, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _hosts(self) -> None:
        original = HOSTS.read_text()
        self._state["hosts"] = original
        self._record()
        lines = [f"{BRIDGE_ADDR} {CTL_NAME} {HOSTS_MARK}"] + [f"{a} {n} {HOSTS_MARK}" for n, a in NODES.items()]
        with open(HOSTS, "a") as f:
            f.write(("" if original.endswith("\n") or not original else "\n") + "\n".join(lines) + "\n")

    def _write_config(self) -> None:
        d = self.dir
        for sub in ("etc", "munge", "ctld", "log", "dev", *(f"spool/{n}" for n in NODES)):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # gres/gpu drops GPUs without a File, and a File must be a device node: stand-ins with
        # /dev/null's numbers. Slurm only stat()s them (no device cgroup with task/none).
        for i in range(GPUS_PER_NODE):
            dev = d / "dev" / f"nvidia{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        cpus = 2  # declared, not detected: config_overrides keeps a smaller or larger machine usable
        nodes = "\n".join(
            f"NodeName={n} NodeAddr={a} CPUs={cpus} RealMemory=2000 Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN"
            for n, a in NODES.items()
        )
        self.conf.write_text(f"""\
# Generated by tests/cluster/slurm_cluster.py for a throwaway two-node test cluster.
ClusterName={PREFIX}test
SlurmctldHost={CTL_NAME}({BRIDGE_ADDR})
SlurmctldPort={CTL_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}
CredType=cred/munge
StateSaveLocation={d}/ctld
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/ctld/slurmctld.pid
SlurmdPidFile={d}/spool/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
# Scheduling passes every 2 s instead of 30-60 s, so a requeued job starts as soon as it may.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout={self.slurmd_timeout_s}
# Finished jobs stay visible to scontrol for the tests' checks.
MinJobAge=3600
# SIGTERM-to-SIGKILL grace when a job is killed (default 30 s): shorter keeps node-failure tests short.
KillWait=10
InactiveLimit=0
JobRequeue=1
{nodes}
PartitionName=batch Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        (self.dir / "etc" / "gres.conf").write_text(
            f"NodeName={','.join(NODES)} Name=gpu File={d}/dev/nvidia[0-{GPUS_PER_NODE - 1}]\n"
        )

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.dir / "log" / f"{name}.out", "ab")
        p = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env(), start_new_session=True
        )
        log.close()
        self.procs[name] = p
        self._record()
        return p

    def _munge(self) -> None:
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munge_socket.parent.chmod(0o755)
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.dir}/munge/munged.pid",
                f"--log-file={self.dir}/log/munged.log",
                f"--seed-file={self.dir}/munge/seed",
            ],
        )
        self._wait(
            lambda: _run(["munge", "-S", str(self.munge_socket), "-n"], check=False).returncode == 0,
            "munged to answer",
            20,
        )

    def _slurmctld(self) -> None:
        # slurmctld insists that the local hostname is SlurmctldHost's name: give it its own UTS namespace.
        self._spawn(
            "slurmctld",
            ["unshare", "--uts", "sh", "-c", f'hostname {CTL_NAME} && exec slurmctld -D -i -f "$SLURM_CONF"'],
        )
        self._wait(
            lambda: self.run("scontrol", "ping", check=False, timeout=10).stdout.count("UP") > 0,
            "slurmctld to answer scontrol ping",
            30,
        )

    def _slurmd(self, node: str) -> None:
        self._spawn(f"slurmd-{node}", self._on_node(node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)]))

    def _wait_idle(self, timeout_s: float) -> None:
        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10).stdout.split("\n")
            states = dict(line.split() for line in out if line.strip())
            return all(states.get(n, "").startswith("idle") for n in NODES)

        self._wait(idle, "both nodes to be idle", timeout_s)

    def _wait(self, cond, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cond():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}:\n{self.logs()}")
            time.sleep(0.25)
        raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}:\n{self.logs()}")

    # --- operations used by tests -------------------------------------------------------------------
    def logs(self, tail: int = 40) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"==> {f.name} <==\n" + "\n".join(lines))
        return "\n".join(out)

    def kill_node(self, node: str) -> None:
        """The node dies: its network goes silent first (no FIN or RST reaches the peers, as after a power
        loss), then its slurmd and every process on it are SIGKILLed."""
        _run(["ip", "-n", netns_name(node), "link", "set", "eth0", "down"])
        for pid in netns_pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p = self.procs[f"slurmd-{node}"]
        p.wait(timeout=10)
        deadline = time.monotonic() + 10
        while netns_pids(node) and time.monotonic() < deadline:
            time.sleep(0.1)

    def revive_node(self, node: str) -> None:
        """The node boots again: network up and a fresh slurmd, which re-registers with slurmctld."""
        _run(["ip", "-n", netns_name(node), "link", "set", "eth0", "up"])
        self._slurmd(node)

    @staticmethod
    def _on_node(node: str, cmd: list[str]) -> list[str]:
        """``cmd`` as it runs on ``node``: its network, its hostname, its own /dev/shm and SysV IPC.

        A private /dev/shm keeps the two nodes from meeting through shared memory, which real nodes
        cannot do (NCCL, gloo and DeepSpeed all use shm between ranks of one node).
        """
        return [
            "nsenter",
            f"--net=/var/run/netns/{netns_name(node)}",
            "unshare",
            "--uts",
            "--ipc",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'mount -t tmpfs -o mode=1777 {PREFIX}-shm /dev/shm && hostname {node} && exec "$@"',
            "sh",
            *cmd,
        ]

    def nsexec(self, node: str, cmd: list[str], **kw) -> subprocess.Popen:
        """Start a command on a node, outside SLURM (for plain multi-node torchrun)."""
        return subprocess.Popen(self._on_node(node, cmd), **kw)

    # --- teardown -----------------------------------------------------------------------------------
    def down(self) -> None:
        """Stop every job process and daemon, remove namespaces and bridge, restore /etc/hosts."""
        # Everything a job started lives in a node's namespace: no scancel needed, nothing escapes.
        for node in NODES:
            _kill_pids(netns_pids(node), grace_s=3)
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                _kill_pids([p.pid], grace_s=5)
                p.wait(timeout=10)
        teardown_network()
        _restore_hosts(self._state.get("hosts"))
        STATE_FILE.unlink(missing_ok=True)
        self.is_up = False


def main(argv: list[str]) -> int:
    """Manual use: ``up DIR`` (stays up until Ctrl-C or SIGTERM), ``down`` (cleans up a crashed run)."""
    if argv[:1] == ["down"]:
        cleanup_stale()
        left = leftovers()
        print("clean" if not left else f"left over: {left}")
        return 0 if not left else 1
    if len(argv) == 2 and argv[0] == "up":

        def stop(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        # A background job's SIGINT is ignored: SIGTERM must end it just as cleanly.
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        c = SlurmCluster(argv[1])
        try:
            c.up()
            print(f"cluster up: export SLURM_CONF={c.conf}   (Ctrl-C or kill {os.getpid()} tears it down)", flush=True)
            signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            c.down()
        return 0
    print(main.__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
