"""The cluster launchers (launch/tpu_pod.sh, launch/slurm_gpu.sbatch + slurm_task.sh) and main's --coordinator=auto.

gcloud, srun, scontrol, curl, getent and the Python processes are fakes on PATH that record their argv (and the
JAX_* environment) as JSON lines; the TPU fake runs each ssh command in a shell per fake worker home.
"""

import json
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_POD = REPO / "launch" / "tpu_pod.sh"
SBATCH = REPO / "launch" / "slurm_gpu.sbatch"
TASK = REPO / "launch" / "slurm_task.sh"
# A main.py override that breaks naive quoting: spaces, both quotes, $, ; and a glob.
TRICKY = '--config.data.rl_path=/d/it\'s a "b" $HOME; *.jsonl'

_RECORD = """
import json, os, sys
def record(tool, **extra):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(dict(tool=tool, argv=sys.argv[1:], cwd=os.getcwd(),
                                env={k: v for k, v in os.environ.items() if k.startswith(("JAX_", "SGLANG_"))},
                                **extra)) + "\\n")
"""
FAKES = {
    # describe: FAKE_TPU_STATE or "not found"; ssh/scp: replayed on every FAKE_WORKERS/w<N> home.
    "gcloud": """
import shutil, subprocess
record("gcloud")
args = sys.argv[1:]
verb = args[3]
if verb == "describe":
    state = os.environ.get("FAKE_TPU_STATE")
    print(state or "", file=sys.stdout if state else sys.stderr)
    sys.exit(0 if state else 1)
root = os.environ.get("FAKE_WORKERS")
if root and verb in ("ssh", "scp"):
    pos = [a for a in args[4:] if not a.startswith("--")]
    for w in sorted(os.listdir(root)):
        home = os.path.join(root, w)
        if verb == "scp":
            shutil.copy(pos[0], os.path.join(home, pos[1].split(":", 1)[1]))
            continue
        cmd = next(a for a in args if a.startswith("--command="))[len("--command="):]
        env = dict(os.environ, HOME=home, FAKE_WORKER=w[1:])
        rc = subprocess.run(["sh", "-c", cmd], cwd=home, env=env).returncode
        if rc:
            sys.exit(rc)
""",
    "curl": """
record("curl")
if any("metadata.google.internal" in a for a in sys.argv):
    print(os.environ["FAKE_WORKER"])
""",
    "scontrol": """
record("scontrol")
print("\\n".join(os.environ["FAKE_HOSTS"].split()))
""",
    "getent": """
record("getent")
print(os.environ["FAKE_ADDR"], sys.argv[2])
""",
    # The sglang step serves until killed; the train step runs its command once per task, as srun numbers them.
    "srun": """
import signal, subprocess, time
record("srun")
args = sys.argv[1:]
i = next(i for i, a in enumerate(args) if not a.startswith("--"))
opts = dict(a[2:].split("=", 1) for a in args[:i])
if args[i + 1] == "sglang":
    signal.signal(signal.SIGTERM, lambda *_: (record("srun-sglang-stopped"), sys.exit(0)))
    time.sleep(60)
    sys.exit(1)
for pid, node in enumerate(opts["nodelist"].split(",")):
    env = dict(os.environ, SLURM_PROCID=str(pid), SLURMD_NODENAME=node, SLURM_LOCALID="0")
    rc = subprocess.run(args[i:], cwd=opts["chdir"], env=env).returncode
    if rc:
        sys.exit(rc)
""",
    # Stands for a Python: makes a venv (a copy of itself), installs nothing, records main's argv.
    "fakepython": """
import shutil, time
args = sys.argv[1:]
if args[:2] == ["-m", "venv"]:
    os.makedirs(os.path.join(args[2], "bin"))
    shutil.copy(__file__, os.path.join(args[2], "bin", "python"))
    sys.exit(0)
record("python")
if args[:2] == ["-m", "pixel_reasoner_jax.main"]:
    time.sleep(float(os.environ.get("FAKE_MAIN_SLEEP", "0")))
    sys.exit(int(os.environ.get("FAKE_MAIN_RC", "0")))
""",
}


@pytest.fixture
def fake(tmp_path):
    """(environment with the fakes first on PATH, function returning the recorded calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{_RECORD}\n{body}")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "TPU_", "JAX_", "SGLANG_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_LOG=str(log))
    env.pop("DRY_RUN", None)

    def calls(tool=None):
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return [r for r in rows if tool is None or r["tool"] == tool]

    return env, calls


def _run(cmd, env, **extra):
    return subprocess.run(
        [str(c) for c in cmd], env={**env, **extra}, capture_output=True, text=True, timeout=60
    )


def _posix_quoted(s: str) -> str:
    """launch/common.sh's q."""
    return "'" + s.replace("'", "'\\''") + "'"


# ------------------------------------------------------------------------------------------------ TPU pod


def _tpu_args(*extra):
    return [TPU_POD, "--name=pr-pod", "--zone=us-central2-b", "--project=proj", "--accelerator-type=v4-16",
            "--version=tpu-ubuntu2204-base", "--workdir=/mnt/shared/run 1", *extra, "--", "--config.grpo.steps=3",
            TRICKY]  # fmt: skip


def test_tpu_dry_run_prints_every_command_and_runs_none(fake):
    env, calls = fake
    out = _run(_tpu_args("--dry-run"), env)
    assert out.returncode == 0, out.stderr
    assert calls() == []  # not even the describe ran
    lines = [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("#")]
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone=us-central2-b", "--project=proj"]
    assert lines[0] == [*tpu, "describe", "pr-pod", *where, "--format=value(state)"]
    assert lines[1] == [*tpu, "create", "pr-pod", *where, "--accelerator-type=v4-16",
                        "--version=tpu-ubuntu2204-base"]  # fmt: skip
    assert lines[2][:5] == [*tpu, "scp"] and lines[2][-1] == "--worker=all"
    setup, start = lines[3], lines[4]
    for cmd in (setup, start):
        assert cmd[:6] == [*tpu, "ssh", "pr-pod"] and "--worker=all" in cmd
    setup_cmd = setup[-1].removeprefix("--command=")
    assert "pip install --quiet -r src/requirements-tpu.txt -c src/requirements.lock" in setup_cmd
    start_cmd = start[-1].removeprefix("--command=")
    assert ("../.venv/bin/python -m pixel_reasoner_jax.main --config=configs/grpo.py:7b "
            "'--workdir=/mnt/shared/run 1' --coordinator=auto --config.grpo.steps=3 "
            + _posix_quoted(TRICKY)) in start_cmd  # fmt: skip
    assert "nohup setsid" in start_cmd and "../logs/worker-$W.log" in start_cmd


def test_tpu_launch_on_two_fake_workers(fake, tmp_path):
    """Setup and a detached start replayed on two worker homes: one log per worker, the override intact."""
    env, calls = fake
    workers = tmp_path / "workers"
    for w in ("w0", "w1"):
        (workers / w).mkdir(parents=True)
    env.update(FAKE_WORKERS=str(workers), TPU_START_CHECK_S="0", FAKE_MAIN_SLEEP="2")
    out = _run(_tpu_args(f"--python={tmp_path / 'bin' / 'fakepython'}"), env)
    assert out.returncode == 0, out.stdout + out.stderr
    verbs = [c["argv"][3] for c in calls("gcloud")]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh"]  # no slice yet: created
    for w in ("w0", "w1"):
        remote = workers / w / "pixel_reasoner_jax"
        assert (remote / "src" / "launch" / "tpu_pod.sh").is_file()  # the checkout arrived
        assert (remote / "src" / "requirements-tpu.txt").is_file()
        assert (remote / "logs" / f"worker-{w[1:]}.pid").is_file()
    deadline = time.monotonic() + 30  # the detached mains record once they start
    while len(mains := [c for c in calls("python") if "pixel_reasoner_jax.main" in c["argv"]]) < 2:
        assert time.monotonic() < deadline, calls("python")
        time.sleep(0.1)
    installs = [c for c in calls("python") if c["argv"][:3] == ["-m", "pip", "install"] and "-r" in c["argv"]]
    assert len(installs) == 2 and all(c["argv"][-3:] == ["src/requirements-tpu.txt", "-c", "src/requirements.lock"]
                                      for c in installs)  # fmt: skip
    for c in mains:
        assert c["argv"] == [
            "-m",
            "pixel_reasoner_jax.main",
            "--config=configs/grpo.py:7b",
            "--workdir=/mnt/shared/run 1",
            "--coordinator=auto",
            "--config.grpo.steps=3",
            TRICKY,
        ]
        assert c["cwd"].endswith("pixel_reasoner_jax/src")
    assert sorted(pathlib.Path(c["cwd"]).parts[-3] for c in mains) == ["w0", "w1"]


def test_tpu_reuses_a_ready_slice_and_reports_a_run_that_dies(fake, tmp_path):
    env, calls = fake
    (tmp_path / "workers" / "w0").mkdir(parents=True)
    env.update(FAKE_WORKERS=str(tmp_path / "workers"), FAKE_TPU_STATE="READY", TPU_START_CHECK_S="1",
               FAKE_MAIN_RC="3")  # fmt: skip
    out = _run(_tpu_args(f"--python={tmp_path / 'bin' / 'fakepython'}"), env)
    assert out.returncode != 0
    assert "reusing TPU pr-pod" in out.stdout
    assert [c["argv"][3] for c in calls("gcloud")] == ["describe", "scp", "ssh", "ssh"]


def test_tpu_git_checkout_and_attach(fake, tmp_path):
    """--git clones on the workers instead of copying; --attach streams the run and passes its failure on."""
    env, calls = fake
    out = _run(_tpu_args("--dry-run", "--git=https://example.com/pr.git", "--ref=v1.2"), env)
    assert out.returncode == 0, out.stderr
    assert " scp " not in out.stdout
    assert ("rm -rf pixel_reasoner_jax/src && git clone --quiet https://example.com/pr.git pixel_reasoner_jax/src"
            " && git -C pixel_reasoner_jax/src checkout --quiet --detach v1.2") in out.stdout  # fmt: skip
    remote = tmp_path / "workers" / "w0" / "pixel_reasoner_jax"
    (remote / "src").mkdir(parents=True)  # set up by an earlier launch
    (remote / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(tmp_path / "bin" / "fakepython", remote / ".venv" / "bin" / "python")
    env.update(FAKE_WORKERS=str(tmp_path / "workers"), FAKE_TPU_STATE="READY")
    for rc in (0, 3):
        out = _run(_tpu_args("--skip-setup", "--attach"), env, FAKE_MAIN_RC=str(rc))
        assert (out.returncode == 0) == (rc == 0), (
            out.stderr
        )  # the run's status, though tee ends the pipeline
        assert "pixel_reasoner_jax.main" in calls("python")[-1]["argv"]
    assert [c["argv"][3] for c in calls("gcloud")] == ["describe", "ssh"] * 2
    assert (remote / "logs" / "worker-0.log").is_file()


def test_tpu_stop_and_the_guard_against_a_second_run(fake, tmp_path):
    env, calls = fake
    logs = tmp_path / "workers" / "w0" / "pixel_reasoner_jax" / "logs"
    logs.mkdir(parents=True)
    running = subprocess.Popen(["sleep", "60"])
    try:
        (logs / "worker-0.pid").write_text(f"{running.pid}\n")
        env.update(FAKE_WORKERS=str(tmp_path / "workers"), FAKE_TPU_STATE="READY")
        out = _run(_tpu_args(), env)
        assert out.returncode != 0 and "a run is still going" in out.stderr
        out = _run([TPU_POD, "--name=pr-pod", "--zone=z", "--stop"], env)
        assert out.returncode == 0, out.stderr
        assert running.wait(timeout=30) == -15  # SIGTERM
        assert not (logs / "worker-0.pid").exists()
    finally:
        running.kill()


def test_tpu_refuses_a_slice_that_is_not_ready_and_bad_options(fake):
    env, calls = fake
    out = _run(_tpu_args(), env, FAKE_TPU_STATE="PREEMPTED")
    assert out.returncode == 2 and "state PREEMPTED, expected READY" in out.stderr
    assert [c["argv"][3] for c in calls()] == ["describe"]
    out = _run([TPU_POD, "--zone=z", "--workdir=/w"], env)
    assert out.returncode == 2 and "--name" in out.stderr
    out = _run([TPU_POD, "--name=n", "--zone=z", "--workdir=/w", "--config.x=1"], env)
    assert out.returncode == 2 and "after --" in out.stderr
    out = _run([TPU_POD, "--name=n", "--zone=z", "--workdir=runs/x"], env)
    assert out.returncode == 2 and "absolute path" in out.stderr
    assert len(calls()) == 1  # bad options fail before any gcloud call


# ------------------------------------------------------------------------------------------------ SLURM


def _slurm_env(env, hosts, **extra):
    return {**env, "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_JOB_ID": "77", "FAKE_HOSTS": " ".join(hosts),
            "SLURM_SUBMIT_DIR": str(REPO), "MODEL_DIR": "/shared/ckpt", "WORKDIR": "/shared/run", **extra}  # fmt: skip


def _slurm_dry_run(env, *flags):
    out = _run([SBATCH, *flags, "--", "--config.grpo.steps=3", TRICKY], env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    sglang = next(line for line in lines if line.startswith("srun") and " sglang " in line)
    train = next(line for line in lines if line.startswith("srun") and " train " in line)
    assert sglang.endswith(" &")  # in the background
    return lines, shlex.split(sglang[:-2]), shlex.split(train)


def test_slurm_dry_run_one_trainer_one_sglang_node(fake):
    env, calls = fake
    lines, sglang, train = _slurm_dry_run(
        _slurm_env(env, ["gpu01", "gpu02"], SLURM_GPUS_ON_NODE="8"), "--dry-run"
    )
    assert [c["argv"] for c in calls()] == [["show", "hostnames", "gpu[01-04]"]]  # only scontrol ran
    assert lines[0] == "export GPUS_PER_NODE=8 SGLANG_DETERMINISTIC=0 NO_PROXY=gpu02 no_proxy=gpu02"
    assert sglang[:4] == ["srun", "--nodes=1", "--ntasks=1", "--nodelist=gpu02"]
    assert "--ntasks-per-node=1" in sglang and "--output=/shared/run/slurm-77/sglang-%N.log" in sglang
    assert sglang[-5:] == [f"{REPO}/launch/slurm_task.sh", "sglang", "/shared/ckpt", "30000", "8"]
    assert train[:4] == ["srun", "--nodes=1", "--ntasks=1", "--nodelist=gpu01"]
    i = train.index(f"{REPO}/launch/slurm_task.sh")
    assert train[i + 1 :] == [
        "train", "python", "-m", "pixel_reasoner_jax.main", "--config=configs/grpo.py:7b", "--workdir=/shared/run",
        "--coordinator=gpu01:12345", "--num_processes=1", "--config.model.checkpoint=/shared/ckpt",
        "--config.rollout.backend=sglang", "--config.rollout.sglang_urls=http://gpu02:30000",
        "--config.grpo.steps=3", TRICKY,
    ]  # fmt: skip


def test_slurm_dry_run_two_trainers_two_sglang_nodes(fake):
    env, _ = fake
    env = _slurm_env(env, ["gpu01", "gpu02", "gpu03", "gpu04"], TRAIN_NODES="2", DRY_RUN="1",
                     SGLANG_DETERMINISTIC="1", SGLANG_PORT="31000", NO_PROXY="proxy.example")  # fmt: skip
    lines, sglang, train = _slurm_dry_run(env)  # DRY_RUN=1 from the environment
    assert lines[0].startswith("export GPUS_PER_NODE=8 SGLANG_DETERMINISTIC=1 ")
    assert "NO_PROXY=proxy.example,gpu03,gpu04" in lines[0]
    assert "--nodes=2" in sglang and "--nodelist=gpu03,gpu04" in sglang and sglang[-2:] == ["31000", "8"]
    assert "--nodes=2" in train and "--ntasks=2" in train and "--nodelist=gpu01,gpu02" in train
    assert "--coordinator=gpu01:12345" in train and "--num_processes=2" in train
    assert "--config.rollout.sglang_urls=http://gpu03:31000,http://gpu04:31000" in train
    assert train[-1] == TRICKY


def test_slurm_runs_servers_then_numbered_trainers(fake):
    """The batch script for real on fake srun: servers in the background, every /health polled, trainer
    processes 0..n-1 with the coordinator of the first trainer node, then the servers stopped."""
    env, calls = fake
    env = _slurm_env(env, ["a1", "a2", "a3", "a4"], TRAIN_NODES="2", SLURM_GPUS_ON_NODE="2",
                     TRAIN_PYTHON=str(pathlib.Path(env["PATH"].split(os.pathsep)[0]) / "fakepython"))  # fmt: skip
    out = _run([SBATCH, "--deterministic", "--", TRICKY], env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [c["argv"][-1] for c in calls("curl")] == ["http://a3:30000/health", "http://a4:30000/health"]
    srun = calls("srun")
    roles = [s["argv"][s["argv"].index(f"{REPO}/launch/slurm_task.sh") + 1] for s in srun]
    assert roles == ["sglang", "train"]
    assert srun[0]["env"]["SGLANG_DETERMINISTIC"] == "1"
    assert len(calls("srun-sglang-stopped")) == 1
    mains = sorted(calls("python"), key=lambda c: c["env"]["JAX_PROCESS_ID"])
    assert [m["env"]["JAX_PROCESS_ID"] for m in mains] == ["0", "1"]
    for m in mains:
        assert m["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1"  # all of the node's GPUs, not Slurm's one per task
        assert m["cwd"] == str(REPO)
        assert m["argv"][m["argv"].index("--workdir=/shared/run") + 1 :] == [
            "--coordinator=a1:12345", "--num_processes=2", "--config.model.checkpoint=/shared/ckpt",
            "--config.rollout.backend=sglang", "--config.rollout.sglang_urls=http://a3:30000,http://a4:30000",
            TRICKY,
        ]  # fmt: skip


def test_slurm_rejects_a_split_that_does_not_fit(fake):
    env, _ = fake
    out = _run([SBATCH, "--dry-run"], _slurm_env(env, ["a1", "a2"], TRAIN_NODES="2"))
    assert out.returncode == 2 and "ROLLOUT_NODES=0" in out.stderr
    out = _run([SBATCH, "--dry-run"], _slurm_env(env, ["a1", "a2", "a3"], ROLLOUT_NODES="1"))
    assert out.returncode == 2 and "allocation has 3 nodes" in out.stderr
    out = _run([SBATCH, "--dry-run"], {**_slurm_env(env, ["a1", "a2"]), "MODEL_DIR": ""})
    assert out.returncode == 2 and "MODEL_DIR is required" in out.stderr


def test_slurm_task_serves_on_the_node_address(fake, tmp_path):
    env, calls = fake
    env = {**env, "SLURMD_NODENAME": "gpu03", "FAKE_ADDR": "10.1.2.3",
           "SGLANG_PYTHON": str(tmp_path / "bin" / "fakepython")}  # fmt: skip
    out = _run([TASK, "sglang", "/shared/ckpt", "30000", "8"], env)
    assert out.returncode == 0, out.stderr
    argv = calls("python")[0]["argv"]
    assert argv[:4] == ["-m", "sglang.launch_server", "--model-path", "/shared/ckpt"]
    assert argv[argv.index("--host") + 1] == "10.1.2.3" and argv[argv.index("--dp-size") + 1] == "8"
    assert "--enable-deterministic-inference" not in argv
    serve = [TASK, "sglang", "/shared/ckpt", "30000", "8"]
    out = _run(serve, env, SGLANG_DETERMINISTIC="1", SGLANG_BIND="0.0.0.0")
    assert out.returncode == 0, out.stderr
    argv = calls("python")[1]["argv"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[-3:] == ["--enable-deterministic-inference", "--sampling-backend", "pytorch"]
    out = _run(serve, env, FAKE_ADDR="127.0.1.1")
    assert out.returncode == 2 and "loopback 127.0.1.1" in out.stderr


def test_launch_scripts_are_shellcheck_clean():
    if not (shellcheck := next((p for p in os.environ["PATH"].split(os.pathsep)
                                if os.access(os.path.join(p, "shellcheck"), os.X_OK)), None)):  # fmt: skip
        pytest.skip("shellcheck not installed")
    scripts = sorted(str(p) for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))
    cmd = [os.path.join(shellcheck, "shellcheck"), "-x", *scripts]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


# ------------------------------------------------------------------------------------------------ main.py


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--coordinator=auto"], dict(num_processes=None, process_id=None)),
        (["--coordinator=auto", "--num_processes=4", "--process_id=2"], dict(num_processes=4, process_id=2)),
        (["--coordinator=h1:1234", "--num_processes=2", "--process_id=1"],
         dict(coordinator_address="h1:1234", num_processes=2, process_id=1)),
    ],
)  # fmt: skip
def test_main_coordinator_auto_lets_jax_detect_the_cluster(monkeypatch, argv, expected):
    import jax
    from absl import flags

    from pixel_reasoner_jax import main as entry

    seen = []  # (arguments, JAX_COORDINATOR_ADDRESS) of each call; JAX reads that variable when no address
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "auto")  # as a launcher might export it
    env_address = lambda: os.environ.get("JAX_COORDINATOR_ADDRESS")  # noqa: E731
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append((kw, env_address())))
    flags.FLAGS(["main", *argv], known_only=True)
    try:
        entry._init_distributed()
    finally:
        flags.FLAGS.unparse_flags()
    assert seen == [(expected, None if "auto" in argv[0] else "auto")]
