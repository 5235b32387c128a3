"""End-to-end launch tests on a real two-node SLURM cluster (tests/cluster/slurm_cluster.py).

What each test runs is what the README's "Running on a SLURM cluster" section tells users to type:
``sbatch --nodes=2 --gpus-per-node=2 launch/slurm_resnet152.sh`` with the environment variables the
script documents, and plain ``torchrun --nnodes 2 ...`` in both rendezvous forms. The only test-only
choices are a tiny CPU config (digits, ResNet-20, batch 32, a few dozen steps) and where the servers
listen: moto (S3) and MLflow are reached from inside the nodes' namespaces at the bridge address.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from slurm_cluster import BRIDGE_ADDR, NODES, SlurmCluster, TcpForwarder, netns_pids
from slurm_jobs import REPO, Job, read, sbatch, wait_for

TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
CONFIG = "configs/cpu/digits_resnet20.toml"
# The venv's torchrun, named rather than put first on PATH: PATH decides which `ninja` builds
# DeepSpeed's CPU ops, and the venv's ninja (1.13) and the system's (1.11) hash build commands
# differently, so alternating between them rebuilds the op (a minute or more) in every other run.
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
BUCKET = "ckpt"


def tiny(steps: int, out: Path, *extra: str) -> list[str]:
    """Overrides that make the CPU config a few dozen steps long."""
    return [
        "--data.batch_size=32",
        f"--schedule.max_steps={steps}",
        "--schedule.unit=step",
        "--schedule.milestones=[]",
        "--schedule.warmup=0",
        "--log_every=1",
        "--progress=false",
        f"--output_dir={out}/runs/{{name}}",
        *extra,
    ]


@dataclass
class Services:
    s3_url: str  # as the nodes reach it (bridge address)
    mlflow_uri: str
    fs: object  # s3fs filesystem for the test's own checks
    aws_env: dict[str, str]


@pytest.fixture(scope="module")
def services(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    import s3fs
    from mlflow_server import MlflowServer, make_template_db
    from s3_server import aws_env, start_moto_server

    d = tmp_path_factory.mktemp("cluster-services")
    with start_moto_server(log_dir=d) as local_url:
        # moto listens on loopback, which inside a node is the node's own: forward from the bridge.
        fwd = TcpForwarder("127.0.0.1", int(local_url.rsplit(":", 1)[1]))
        try:
            fs = s3fs.S3FileSystem(endpoint_url=local_url, key="testing", secret="testing", skip_instance_cache=True)
            fs.mkdir(BUCKET)
            with MlflowServer(
                d / "mlflow", host=BRIDGE_ADDR, template_db=make_template_db(d / "template.db")
            ) as mlflow:
                url = f"http://{fwd.address}"
                yield Services(s3_url=url, mlflow_uri=mlflow.uri, fs=fs, aws_env=aws_env(url))
        finally:
            fwd.close()


class Submission:
    """One `sbatch launch/slurm_resnet152.sh` the way the README shows it, plus where its output lands."""

    def __init__(
        self,
        cluster: SlurmCluster,
        services: Services,
        tmp: Path,
        name: str,
        steps: int,
        *overrides: str,
        gpus_per_node: str = "2",
        env: dict[str, str] | None = None,
    ) -> None:
        self.cluster, self.services, self.name = cluster, services, name
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.experiment = f"cluster-{name}"
        env = {
            "TORCHRUN": TORCHRUN,
            "CONFIG": CONFIG,
            "CHECKPOINT_URI": f"s3://{BUCKET}",
            "MLFLOW_TRACKING_URI": services.mlflow_uri,
            "LOG_DIR": str(self.logs / "nodes"),
            "TRAIN_ARGS": " ".join(
                tiny(steps, tmp, f"--tracking.experiment={self.experiment}", "--tracking.system_metrics_interval_s=1")
            ),
            **services.aws_env,
            **(env or {}),
        }
        self.job: Job = sbatch(
            cluster,
            f"--job-name={name}",
            "--nodes=2",
            f"--gpus-per-node={gpus_per_node}",
            f"--output={self.logs}/%x-%j.out",
            "launch/slurm_resnet152.sh",
            *overrides,
            env=env,
        )
        self.run_id = f"{name}-{self.job.id}"

    @property
    def batch_log(self) -> str:
        return read(self.logs / f"{self.name}-{self.job.id}.out")

    def node_log(self, node: str) -> str:
        return read(self.logs / "nodes" / f"{node}.log")

    def stop_record(self, restart: int) -> dict | None:
        """What rank 0 recorded for the batch script after a committed stop (launch/slurm_lib.sh)."""
        from pipeline.core.stop import read_stop_record

        return read_stop_record(self.logs / "nodes" / "launch" / f"job-{self.job.id}-restart-{restart}" / "stop.json")

    def all_logs(self) -> str:
        parts = [f"--- batch log ---\n{self.batch_log[-4000:]}"]
        parts += [f"--- {n}.log ---\n{self.node_log(n)[-6000:]}" for n in NODES]
        return "\n".join(parts)

    def wait_done(self, timeout_s: float) -> dict[str, str]:
        try:
            return self.job.wait(TERMINAL, timeout_s, what=f"({self.name})")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.all_logs()}") from None

    def latest(self) -> str | None:
        path = f"{BUCKET}/{self.run_id}/latest"
        fs = self.services.fs
        fs.invalidate_cache()
        return fs.cat(path).decode().strip() if fs.exists(path) else None

    def mlflow_runs(self) -> list:
        from mlflow import MlflowClient

        client = MlflowClient(self.services.mlflow_uri)
        exp = client.get_experiment_by_name(self.experiment)
        return [] if exp is None else client.search_runs([exp.experiment_id])

    def loss_history(self, run_id: str) -> list[tuple[int, float]]:
        from mlflow import MlflowClient

        hist = MlflowClient(self.services.mlflow_uri).get_metric_history(run_id, "train_loss")
        return sorted((m.step, m.value) for m in hist)


def _pids_on(node: str, *, workers_only: bool = False) -> list[int]:
    """The training processes on ``node`` (torchrun and its workers), or only the workers, by pid."""
    pids = []
    for pid in netns_pids(node):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        worker = b"pipeline/train.py" in cmd and b"torchrun" not in cmd
        if worker or (not workers_only and (b"pipeline/train.py" in cmd or b"torchrun" in cmd)):
            pids.append(pid)
    return pids


def _training_pids() -> dict[str, list[int]]:
    """Training processes still alive on each node."""
    return {node: _pids_on(node) for node in NODES}


# --------------------------------------------------------------------------------------------------


def test_srun_reaches_both_nodes(slurm_cluster: SlurmCluster):
    """The harness itself: one task per node, each node with its own hostname and address."""
    r = slurm_cluster.run(
        "srun",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=2",
        "sh",
        "-c",
        'echo "$(hostname) $SLURM_NODEID $SLURM_GPUS_ON_NODE"',
        timeout=60,
    )
    lines = sorted(r.stdout.split("\n")[:-1])
    assert lines == ["node1 0 2", "node2 1 2"], r.stdout + r.stderr


@pytest.mark.slow
def test_sbatch_two_nodes_usr1_requeue_resume(slurm_cluster: SlurmCluster, services: Services, tmp_path: Path):
    """`sbatch --nodes=2 --gpus-per-node=2 launch/slurm_resnet152.sh`: one rendezvous across both nodes,
    checkpoints in S3, one MLflow run fed by both nodes. Mid-run, `scancel --signal=USR1` (what
    --signal=USR1@T sends near the time limit) makes it save, requeue itself and finish from the
    checkpoint, into the same MLflow run, with the loss curve going on from the resume step."""
    steps = 16
    sub = Submission(slurm_cluster, services, tmp_path, "requeue", steps, "--checkpoint.every_steps=4")
    wait_for(sub.latest, 420, f"a first checkpoint of {sub.run_id}\n{sub.all_logs()}", poll_s=1)
    slurm_cluster.run("scancel", "--signal=USR1", sub.job.id)
    info = sub.wait_done(420)
    assert info["JobState"] == "COMPLETED", sub.all_logs()
    log = sub.batch_log
    assert re.search(
        r"job \d+ \(requeue\) restart 0: 2 nodes \[node1 node2\] x 2 processes, "
        r"rendezvous node1:\d+",
        log,
    ), log

    # Both nodes trained: each node log has its own torchrun, rank 0 saw 4 ranks.
    node_logs = sub.node_log("node1") + sub.node_log("node2")
    for node in NODES:
        assert "torch/distributed/run.py" in sub.node_log(node), sub.all_logs()
    assert "4 ranks on cpu" in node_logs, sub.all_logs()

    # The stop reached every node's workers; the job saved, was requeued once and resumed there.
    assert info.get("Restarts") == "1", info
    assert "requeueing job" in log and re.search(r"job \d+ \(requeue\) restart 1:", log), log
    for node in NODES:
        assert "launch: SIGUSR1: asking the workers to save and stop" in sub.node_log(node), sub.all_logs()
    # The first node to finish reports 75; srun's --kill-on-bad-exit may end the other's wrapper first.
    assert re.search(r"launch: torchrun exited \d+ after SIGUSR1: exit 75", node_logs), sub.all_logs()
    stopped = re.search(r"stopped by SIG\w+ at step (\d+); checkpoint committed", node_logs)
    resumed = re.search(rf"resumed run {sub.run_id} at step (\d+)", node_logs)
    assert stopped and resumed, sub.all_logs()
    assert int(resumed.group(1)) == int(stopped.group(1)) > 0
    # The real signal's name, though the node wrapper passed it on as SIGTERM; the requeue rests on rank 0's
    # stop record for restart 0; a deliberate exit 75 leaves no torchrun traceback or failure table.
    assert "stopped by SIGUSR1 at step" in node_logs, sub.all_logs()
    record = sub.stop_record(0)
    assert record and record["signal"] == "SIGUSR1" and record["checkpoint"] == f"step-{stopped.group(1)}", record
    assert sub.stop_record(1) is None
    assert "torchrun failed" not in node_logs, sub.all_logs()  # a worker torchrun ended while it finished too
    for text in (node_logs, log):
        assert "Traceback" not in text and "ChildFailedError" not in text and "exitcode  :" not in text, sub.all_logs()

    # One MLflow run across both allocations, fed by both nodes; the loss curve continues.
    runs = sub.mlflow_runs()
    assert len(runs) == 1, f"expected one MLflow run across the requeue, got {[r.info.run_id for r in runs]}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("world_size") == "4"
    nodes_reporting = {k.split("/")[1] for k in run.data.metrics if k.startswith("system/")}
    assert nodes_reporting == {"node_0", "node_1"}, sorted(run.data.metrics)
    history = sub.loss_history(run.info.run_id)
    assert [s for s, _ in history] == list(range(1, steps + 1)), history
    assert sub.latest() == f"step-{steps}"
    assert services.fs.exists(f"{BUCKET}/{sub.run_id}/step-{steps}/manifest.json")


@pytest.mark.slow
def test_lost_node_fails_fast_and_resumes(slurm_cluster: SlurmCluster, services: Services, tmp_path: Path):
    """node2 dies mid-run (network silent, slurmd and all its processes killed): the job ends within
    SLURM's node timeout instead of hanging in a collective or a rendezvous, the committed checkpoint
    survives, and once node2 is back the job SLURM requeued resumes from it."""
    steps = 16
    sub = Submission(slurm_cluster, services, tmp_path, "nodefail", steps, "--checkpoint.every_steps=4")
    wait_for(sub.latest, 420, f"a first checkpoint of {sub.run_id}\n{sub.all_logs()}", poll_s=1)
    slurm_cluster.kill_node("node2")
    t_kill = time.monotonic()
    try:
        # SlurmdTimeout is 12 s here; node1's ranks are blocked in a collective that would wait 600 s.
        info = wait_for(
            lambda: (i := sub.job.info()).get("JobState") != "RUNNING" and i,
            120,
            f"job {sub.job.id} to leave RUNNING after node2 died\n{sub.all_logs()}",
            poll_s=1,
        )
        left_after = time.monotonic() - t_kill
        ctld_log = read(slurm_cluster.dir / "log" / "slurmctld.log")
        assert f"requeue job JobId={sub.job.id} due to failure of node node2" in ctld_log, ctld_log[-3000:]
        # Nothing of the job lingers on node1 (node2's processes died with it).
        wait_for(
            lambda: not any(_training_pids().values()),
            60,
            f"training processes to end after the job was killed: {_training_pids()}",
        )
        committed = sub.latest()
        assert committed and services.fs.exists(f"{BUCKET}/{sub.run_id}/{committed}/manifest.json")
    finally:
        slurm_cluster.revive_node("node2")
    assert left_after < 60, f"the job stayed RUNNING {left_after:.0f}s after node2 died ({info})"

    info = sub.wait_done(480)
    assert info["JobState"] == "COMPLETED", sub.all_logs()
    assert int(info.get("Restarts", "0")) == 1, info
    node_logs = sub.node_log("node1") + sub.node_log("node2")
    resumed = re.search(rf"resumed run {sub.run_id} at step (\d+)", node_logs)
    assert resumed and int(resumed.group(1)) == int(committed.removeprefix("step-")), sub.all_logs()
    runs = sub.mlflow_runs()
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_id, r.info.status) for r in runs]
    assert sub.latest() == f"step-{steps}"


@pytest.mark.slow
def test_plain_torchrun_static_rendezvous_two_nodes(slurm_cluster: SlurmCluster, tmp_path: Path):
    """`torchrun --nnodes 2 --node_rank R --master_addr node1 ... pipeline/train.py` typed on each node.
    (The --rdzv_backend c10d --rdzv_endpoint form is the one launch/slurm_resnet152.sh types, above.)"""
    procs = {}
    for rank, node in enumerate(NODES):
        cmd = [
            TORCHRUN,
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(rank),
            "--master_addr",
            "node1",
            "--master_port",
            "29401",
            "pipeline/train.py",
            "--config",
            CONFIG,
            *tiny(4, tmp_path, f"--checkpoint.uri={tmp_path}/ckpt", "--tracking.enabled=false", "--name=plain-static"),
        ]
        log = open(tmp_path / f"{node}.log", "w")
        procs[node] = (
            slurm_cluster.nsexec(node, cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=slurm_cluster.env()),
            log,
        )
    try:
        for node, (p, log) in procs.items():
            rc = p.wait(timeout=300)
            log.close()
            assert rc == 0, f"{node}: torchrun exited {rc}\n" + "\n".join(
                f"--- {n} ---\n{read(tmp_path / f'{n}.log')[-5000:]}" for n in NODES
            )
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()
    assert "2 ranks on cpu" in read(tmp_path / "node1.log") + read(tmp_path / "node2.log")
    assert (tmp_path / "ckpt" / "plain-static" / "latest").read_text().strip() == "step-4"


@pytest.mark.slow
def test_depth_study_as_a_job_array(
    slurm_cluster: SlurmCluster,
    services: Services,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    """pipeline.study's --slurm path submits launch/slurm_depth_study.sh as a job array: one member per
    task, each on its own node, both nested under the study's parent MLflow run."""
    from mlflow import MlflowClient

    from pipeline.study.runner import read_study, run_study

    for k, v in slurm_cluster.env(
        {
            "TORCHRUN": TORCHRUN,
            "MLFLOW_TRACKING_URI": services.mlflow_uri,
            **services.aws_env,
            "LOG_DIR": str(tmp_path / "nodes"),
            # sbatch options for every task, as the script's header documents: 1 "GPU" (1 process) each.
            "SBATCH_GPUS_PER_NODE": "1",
            "SBATCH_OUTPUT": str(tmp_path / "%x-%A_%a.out"),
        }
    ).items():
        monkeypatch.setenv(k, v)
    study = read_study(REPO / "configs/study/digits_depth.toml")
    # out_dir: the member list lives with this test, not in the repository's runs/.
    outcomes = run_study(
        study, overrides=tiny(8, tmp_path, "--checkpoint.uri=s3://ckpt/study"), slurm=True, out_dir=tmp_path / "study"
    )
    printed = capsys.readouterr().out
    assert [o.state for o in outcomes] == ["submitted", "submitted"], printed
    job_id = re.search(r"Submitted batch job (\d+)", printed).group(1)
    for i in range(2):
        info = Job(slurm_cluster, f"{job_id}_{i}").wait(TERMINAL, 420, what="(study member)")
        logs = "\n".join(
            f"--- {p} ---\n{read(p)[-4000:]}"
            for p in sorted(tmp_path.glob("*.out")) + sorted((tmp_path / "nodes").rglob("*.log"))
        )
        assert info["JobState"] == "COMPLETED", logs
    client = MlflowClient(services.mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(study.experiment).experiment_id])
    parent = [x for x in runs if x.data.tags.get("study_role") == "parent"]
    assert len(parent) == 1, [x.data.tags for x in runs]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(c.info.run_name for c in children) == ["plain20", "resnet20"]
    assert all(c.info.status == "FINISHED" for c in children), [(c.info.run_name, c.info.status) for c in children]


@pytest.mark.slow
def test_config_error_on_two_nodes_ends_the_job_once(slurm_cluster: SlurmCluster, services: Services, tmp_path: Path):
    """A config error on every rank of a two-node job: the job ends once (no requeue, although srun's
    --kill-on-bad-exit stops the other node, whose wrapper may report 75), with the worker's exit code 2,
    and the end of the job's .out names the failed node, its log, and shows the error."""
    t0 = time.monotonic()
    sub = Submission(slurm_cluster, services, tmp_path, "cfgerr", 8, "--data.batch_size=0")
    info = sub.wait_done(300)
    took = time.monotonic() - t0
    log = sub.batch_log
    assert info["JobState"] == "FAILED" and info.get("ExitCode") == "2:0", (info, sub.all_logs())
    assert info.get("Restarts") == "0", info
    assert "requeue" not in log.replace("not requeued", ""), log
    assert len(re.findall(r"job \d+ \(cfgerr\) restart", log)) == 1, log
    tail = log.strip().splitlines()[-12:]
    assert re.search(r"training failed \(exit 2\) on node node[12], log \S+/node[12]\.log: not requeued", tail[-1]), log
    assert any("error: data.batch_size = 0: must be >= 1" in line for line in tail), log
    assert not any(sub.stop_record(r) for r in (0, 1))
    print(f"config error job: {took:.0f}s from sbatch to FAILED")


@pytest.mark.slow
def test_gpu_less_job_needs_gpus_per_node(slurm_cluster: SlurmCluster, services: Services, tmp_path: Path):
    """`sbatch --gpus-per-node=0`: with GPUS_PER_NODE unset the job ends at once with one line saying what
    to set (no torchrun AssertionError, no requeue); with GPUS_PER_NODE=1 it trains 2 nodes x 1 process."""
    t0 = time.monotonic()
    bad = Submission(slurm_cluster, services, tmp_path / "unset", "nogpu", 4, gpus_per_node="0")
    info = bad.wait_done(120)
    log = bad.batch_log
    assert info["JobState"] == "FAILED" and info.get("ExitCode") == "2:0" and info.get("Restarts") == "0", (info, log)
    assert "GPUS_PER_NODE is unset" in log.strip().splitlines()[-1] and "AssertionError" not in log, log
    t1 = time.monotonic()
    sub = Submission(slurm_cluster, services, tmp_path / "set", "cpu", 4, gpus_per_node="0", env={"GPUS_PER_NODE": "1"})
    info = sub.wait_done(420)
    assert info["JobState"] == "COMPLETED", sub.all_logs()
    assert re.search(r"restart 0: 2 nodes \[node1 node2\] x 1 processes", sub.batch_log), sub.batch_log
    assert "2 ranks on cpu" in sub.node_log("node1") + sub.node_log("node2"), sub.all_logs()
    assert sub.latest() == "step-4"
    print(f"gpu-less jobs: unset {t1 - t0:.0f}s, GPUS_PER_NODE=1 {time.monotonic() - t1:.0f}s")


def _rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in env if e.startswith(b"RANK=")).split(b"=", 1)[1])


@pytest.mark.slow
def test_early_stops_requeue_and_a_killed_worker_fails_naming_its_rank(
    slurm_cluster: SlurmCluster, services: Services, tmp_path: Path
):
    """Three jobs, one after another on the two nodes. USR1 1 s after the node launchers start (torchrun still
    starting, no worker yet) and USR1 as soon as the workers exist (their handler not installed yet, about 4 s in):
    both are requeued and complete. A SIGKILLed worker: the job ends FAILED naming the killed rank, with no progress
    line among the error lines, and the surviving node's log says it failed because a peer died."""
    steps = 6
    timings = {}

    def started(sub: Submission) -> bool:
        return all((sub.logs / "nodes" / f"{n}.log").exists() for n in NODES)

    for name, when in (("usr1-rdzv", "1s"), ("usr1-import", "workers")):
        t0 = time.monotonic()
        sub = Submission(slurm_cluster, services, tmp_path / name, name, steps)
        wait_for(lambda s=sub: started(s), 300, f"{name}: the node launchers to start\n{sub.all_logs()}", poll_s=0.1)
        if when == "1s":
            time.sleep(1)
        else:
            wait_for(
                lambda: any(_pids_on(n, workers_only=True) for n in NODES),
                120,
                f"{name}: workers\n{sub.all_logs()}",
                poll_s=0.05,
            )
        slurm_cluster.run("scancel", "--signal=USR1", sub.job.id)
        info = sub.wait_done(480)
        timings[name] = time.monotonic() - t0
        log, node_logs = sub.batch_log, sub.node_log("node1") + sub.node_log("node2")
        assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", (info, sub.all_logs())
        assert "requeueing job" in log and "it is not a stop" not in node_logs, sub.all_logs()
        assert sub.latest() == f"step-{steps}", sub.all_logs()
        if when == "1s":
            assert "with no worker running: stopping torchrun" in node_logs, sub.all_logs()
            assert "stopped during start-up" in log, log
        else:
            assert "still starting: they take the stop when their handler is installed" in node_logs, sub.all_logs()
            assert re.search(r"stopped by SIGUSR1 at step \d+; checkpoint committed", node_logs), sub.all_logs()

    t0 = time.monotonic()
    sub = Submission(slurm_cluster, services, tmp_path / "kill", "kill", 40, "--checkpoint.every_steps=2")
    wait_for(sub.latest, 420, f"a first checkpoint of {sub.run_id}\n{sub.all_logs()}", poll_s=1)
    victim = _pids_on("node2", workers_only=True)[0]
    rank = _rank_of(victim)
    os.kill(victim, signal.SIGKILL)
    info = sub.wait_done(300)
    timings["kill"] = time.monotonic() - t0
    log = sub.batch_log
    assert info["JobState"] == "FAILED" and info.get("Restarts") == "0", (info, sub.all_logs())
    assert re.search(rf"worker rank {rank} on \S+ exited with code 137", log), sub.all_logs()
    assert "training failed (exit 137) on node node2" in log.strip().splitlines()[-1], log
    error_lines = [line for line in log.splitlines() if line.startswith("    | ")]
    assert error_lines and not any(re.search(r"\| error [0-9.]+% \|", line) for line in error_lines), log
    survivor = sub.node_log("node1")
    assert "a peer died" in survivor and "exit 75" not in survivor, sub.all_logs()
    print("early stops and killed worker: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
