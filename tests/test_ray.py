"""The Ray backend on a two-node Ray cluster on this host (a head and a second node, each with
its own custom resource; Ray advertises the host's own address, so traffic stays on the host): learning across nodes, kill -9 of a worker, loss of a node, forged
frames, and ``ray job submit -- srl run``.

Tests run in file order; the one that removes the second node comes last.
"""
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import zmq  # noqa: E402

from srl.config import experiment_from_dict  # noqa: E402
from srl.system import wire  # noqa: E402
from srl.experiment import controller_for as Controller  # noqa: E402
from srl.system.name_resolve import RayResolver, ray_namespace  # noqa: E402
from srl.system.ray_scheduler import RayScheduler  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARTPOLE = os.path.join(ROOT, "configs", "cartpole_ppo.yaml")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (3 CPUs, ``srl_head``) + a second node (3 CPUs, ``srl_cpu_node``), both on loopback.
    Fast health checks so a removed node is declared dead within a few seconds. A private
    RAY_TMPDIR keeps this cluster apart from any other Ray instance on the machine."""
    old_tmp = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="srlray-", dir="/tmp")  # short: socket paths
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "resources": {"srl_head": 2}, "include_dashboard": True,  # the job server
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 4}})
    second = c.add_node(num_cpus=3, resources={"srl_cpu_node": 4})
    ray.init(address=c.address)
    c.node_ip = ray.util.get_node_ip_address()
    c.second = second
    c.head_id = ray.get_runtime_context().get_node_id()
    c.second_id = second.node_id
    yield c
    ray.shutdown()
    c.shutdown()
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    if old_tmp is None:
        os.environ.pop("RAY_TMPDIR")
    else:
        os.environ["RAY_TMPDIR"] = old_tmp


def _cfg(tmp_path, *overrides):
    data = yaml.safe_load(open(CARTPOLE))
    data["log"] = {"dir": str(tmp_path), "tensorboard": False, "console": False, "every_s": 0.25}
    base = ["cluster.backend=ray", "stop.mean_return=null", "workers.heartbeat_timeout_s=20",
            "checkpoint.every_seconds=2", "workers.actors.num_cpus=0.5", "workers.trainers.num_cpus=0.5",
            "workers.trainers.resources={srl_head: 1}"]
    return experiment_from_dict(data, base + list(overrides))


def _run(cfg, run_dir, during=None, end_run=False):
    """Run a controller on a RayScheduler in this thread (it installs signal handlers); ``during``
    runs beside it in a thread with the controller and scheduler, and must not raise. With
    ``end_run`` the side thread stops the run (SIGINT, a clean stop) once ``during`` is done, so a
    fault test ends on what it checked, not on a step count a fast run may pass first."""
    scheduler = RayScheduler(cfg.cluster.address)
    controller = Controller(cfg, str(run_dir), scheduler=scheduler)
    errors = []

    def side():
        try:
            during(controller, scheduler)
        except Exception:  # noqa: BLE001 - reported by the test, with its traceback
            errors.append(traceback.format_exc())
        if end_run or errors:
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=side, daemon=True) if during else None
    if thread:
        thread.start()
    try:
        result = controller.run()
    finally:
        scheduler.shutdown()
    if thread:
        thread.join(timeout=30)
    assert not errors, errors[0]
    return result, controller, scheduler


def _recovered(controller, name, before, steps=3000):
    """Wait until ``name`` runs a newer incarnation than ``before`` and reports, then until the
    run has gained ``steps`` more env steps."""
    _wait(lambda: controller.specs[name].incarnation > before and _reported(controller, name),
          timeout_s=90, what=f"{name} back")
    mark = controller.counters["env_steps"]
    _wait(lambda: controller.counters["env_steps"] >= mark + steps, what=f"{steps} env steps after {name} came back")


def _wait(predicate, timeout_s=60.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.05)


def _reported(controller, name):
    """The worker's current incarnation has said something (it is configured and running)."""
    meta, spec = controller.worker_stats.get(name), controller.specs.get(name)
    return meta is not None and spec is not None and meta.get("incarnation") == spec.incarnation


def _checkpoint_version(controller) -> int:
    path = getattr(controller, "last_checkpoint", None)
    return int(os.path.basename(path).split("-")[-1]) if path else -1


def _try_bind(sock, address):
    try:
        sock.bind(address)
        return True
    except zmq.ZMQError:
        return False


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


# --------------------------------------------------------------------------- learning + forged frames


def test_cartpole_learns_across_two_nodes_and_drops_forged_frames(cluster, tmp_path):
    cfg = _cfg(tmp_path, "stop.env_steps=40000", "workers.actors.count=2",
               "workers.actors.resources={srl_cpu_node: 1}")
    forged = {}

    def forge(controller, scheduler):
        names = RayResolver(ray_namespace(controller.run_dir))
        _wait(lambda: names.get("trainer/0/samples") and _reported(controller, "trainer/0"), what="trainer")
        ctx = zmq.Context.instance()
        for address in (names.get("trainer/0/samples"), controller.stats_address):
            sock = ctx.socket(zmq.PUSH)
            sock.connect(address)
            sock.send_multipart(wire.encode("sample", None, {"forged": True}, key=b"not the run's secret"))
            sock.send_multipart(wire.encode("sample", None, {"forged": True}, key=None))  # no tag at all
            sock.close(linger=2000)
        forged["sent"] = 4

    run_dir = tmp_path / "run"
    result, controller, scheduler = _run(cfg, run_dir, during=forge)

    # workers sat on both nodes, as their resources asked
    assert {scheduler.node_id(f"actor/{i}") for i in range(2)} == {cluster.second_id}
    assert scheduler.node_id("trainer/0") == cluster.head_id
    # ... and bound the node's address, published through Ray's KV store
    assert controller.stats_address.startswith(f"tcp://{cluster.node_ip}:")
    assert RayResolver(ray_namespace(str(run_dir))).keys("") == []  # ... and names were cleared
    # the return clearly improved
    rows = _rows(run_dir)
    first = next(r["charts/episodic_return"] for r in rows if r.get("charts/episodic_return"))
    assert result.reason == "env_steps" and result.restarts == 0
    assert result.mean_return is not None and result.mean_return > max(100.0, 3 * first), (first, result)
    # every forged frame was dropped and counted: 2 at the trainer, 2 at the controller
    assert forged.get("sent") == 4
    assert rows[-1]["dropped_frames"] >= 4, rows[-1]
    # the per-run secret stays out of every file of the run
    secret = controller.key
    assert secret is not None and len(secret) == 32
    for folder, _, files in os.walk(run_dir):
        for name in files:
            blob = open(os.path.join(folder, name), "rb").read()
            assert secret not in blob and secret.hex().encode() not in blob, name


# --------------------------------------------------------------------------- kill -9


def test_kill_9_actor_worker_mid_run_recovers(cluster, tmp_path):
    cfg = _cfg(tmp_path, "stop.wall_s=200", "workers.actors.count=2")
    killed = {}

    def kill(controller, scheduler):
        _wait(lambda: _reported(controller, "actor/1") and controller.counters["env_steps"] > 4000,
              what="actor/1 running")
        killed["pid"] = scheduler.pid("actor/1")
        os.kill(killed["pid"], signal.SIGKILL)
        _recovered(controller, "actor/1", before=0)
        killed["new_pid"] = scheduler.pid("actor/1")

    result, controller, scheduler = _run(cfg, tmp_path / "run", during=kill, end_run=True)
    assert result.reason == "SIGINT"
    assert result.restarts >= 1 and _rows(tmp_path / "run")[-1]["restarts"] >= 1
    assert killed["new_pid"] != killed["pid"]
    assert controller.worker_stats["actor/1"]["incarnation"] == 1  # the new process reported in


def test_kill_9_trainer_resumes_and_moved_policy_worker_rejoins(cluster, tmp_path):
    """The trainer comes back from its last checkpoint. The policy worker comes back on another
    port (the test holds its old one), so the controller restarts the actors that used it."""
    cfg = _cfg(tmp_path, "stop.wall_s=200", "workers.actors.count=2", "workers.actors.inline_policy=false",
               "workers.actors.ring=2", "workers.policies.count=1", "workers.policies.num_cpus=0.5")
    seen = {}

    def kill(controller, scheduler):
        names = RayResolver(ray_namespace(controller.run_dir))
        everyone = [f"{kind}/{i}" for kind, i in controller.worker_plan()]
        _wait(lambda: all(n in controller.specs and _reported(controller, n) for n in everyone),
              what="every worker running")
        _wait(lambda: _checkpoint_version(controller) > 0, what="a checkpoint of trained weights")
        seen["ckpt_version"] = _checkpoint_version(controller)
        os.kill(scheduler.pid("trainer/0"), signal.SIGKILL)
        _wait(lambda: controller.specs["trainer/0"].incarnation == 1 and _reported(controller, "trainer/0")
              and "version" in controller.worker_stats["trainer/0"], timeout_s=90, what="trainer back")
        seen["resumed_version"] = controller.worker_stats["trainer/0"]["version"]
        # (if the trainer came back on another port, the policy worker and actors restart too)
        _wait(lambda: all(_reported(controller, n) for n in everyone), timeout_s=90, what="everyone back")

        before = {n: controller.specs[n].incarnation for n in everyone}
        old = seen["old_address"] = names.get("policy/0/inference")
        os.kill(scheduler.pid("policy/0"), signal.SIGKILL)
        squat = zmq.Context.instance().socket(zmq.ROUTER)
        # hold the old port (free once the killed process is reaped): the new one must move
        _wait(lambda: _try_bind(squat, old), timeout_s=10, what="the old port")
        try:
            _wait(lambda: controller.specs["policy/0"].incarnation > before["policy/0"]
                  and _reported(controller, "policy/0"), timeout_s=90, what="policy worker back")
            seen["new_address"] = names.get("policy/0/inference")
            for i in range(2):  # the actors that used the old address were restarted
                _recovered(controller, f"actor/{i}", before[f"actor/{i}"], steps=1000)
        finally:
            squat.close(linger=0)

    result, controller, scheduler = _run(cfg, tmp_path / "run", during=kill, end_run=True)
    assert result.reason == "SIGINT"
    assert seen["ckpt_version"] > 0 and seen["resumed_version"] >= seen["ckpt_version"], seen
    assert seen["new_address"] not in (None, seen["old_address"]), seen
    assert result.restarts >= 4  # trainer, policy worker, and both actors that used the policy worker


# --------------------------------------------------------------------------- Python API


def test_user_classes_reach_ray_workers(cluster, tmp_path, monkeypatch):
    """The example's own env and policy classes, from a module only the driver can import."""
    import importlib

    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))  # the driver's sys.path only
    example = importlib.import_module("custom_env_policy")
    exp = example.build(steps=3000)
    exp.config.log.dir = str(tmp_path)
    exp.config.workers.actors.num_cpus = exp.config.workers.trainers.num_cpus = 0.5
    exp.run_dir = str(tmp_path / "run")
    result = exp.run(backend="ray")
    assert result.env_steps >= 3000 and result.restarts == 0
    assert yaml.safe_load(open(tmp_path / "run" / "config.yaml"))["policy"]["type"] == "LayerNormPolicy"


# --------------------------------------------------------------------------- srl run --ray


@pytest.mark.parametrize("argv, address", [
    (["--ray", "10.0.0.1:6379", "seed=3"], "10.0.0.1:6379"),
    (["seed=3", "--ray"], "auto"),
    (["--ray", "seed=3"], "auto"),  # a bare --ray followed by an override
])
def test_cli_ray_flag_sets_the_backend_before_the_run(monkeypatch, tmp_path, argv, address):
    from srl import cli
    from srl.experiment import Experiment

    seen = {}

    def fake_run(self, backend=None):
        seen.update(cluster=(self.config.cluster.backend, self.config.cluster.address), seed=self.config.seed,
                    run_dir=self.run_dir)
        raise KeyboardInterrupt  # stop here: nothing runs

    monkeypatch.setattr(Experiment, "run", fake_run)
    assert cli.main(["run", CARTPOLE, *argv, "--run-dir", str(tmp_path / "r")]) == 130
    assert seen == {"cluster": ("ray", address), "seed": 3, "run_dir": str(tmp_path / "r")}


# --------------------------------------------------------------------------- ray job submit -- srl run


def test_ray_job_submit_srl_run_writes_one_run_dir(cluster, tmp_path):
    """What `ray job submit -- srl run exp.yaml --ray --run-dir DIR` does: the entrypoint runs on
    the head as a Ray job, joins the cluster through RAY_ADDRESS, and everything lands in DIR."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    run_dir = tmp_path / "shared" / "my-run"
    client = JobSubmissionClient(f"http://{cluster.webui_url}")
    entrypoint = " ".join([
        sys.executable, "-m", "srl.cli", "run", CARTPOLE, "--ray", "--run-dir", str(run_dir),
        "stop.env_steps=3000", "stop.mean_return=null", "workers.actors.num_cpus=0.5",
        "workers.trainers.num_cpus=0.5", f"log.dir={tmp_path / 'elsewhere'}", "log.console=false"])
    job = client.submit_job(entrypoint=entrypoint)
    done = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    _wait(lambda: client.get_job_status(job) in done, timeout_s=120, what="the job")
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "RAY_ADDRESS" in logs and "final: env_steps=" in logs
    saved = yaml.safe_load(open(run_dir / "config.yaml"))
    assert saved["cluster"]["backend"] == "ray" and saved["cluster"]["address"] == "auto"
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "result.json").exists()
    assert os.listdir(run_dir / "tb")  # TensorBoard events
    assert any(n == "model.safetensors" for n in _all_files(run_dir / "checkpoints"))
    assert not (tmp_path / "elsewhere").exists()


def _all_files(root):
    return [n for _, _, files in os.walk(root) for n in files]


# --------------------------------------------------------------------------- node loss (last: removes a node)


def test_lost_node_workers_move_to_head(cluster, tmp_path):
    cfg = _cfg(tmp_path, "stop.wall_s=200", "workers.actors.count=3")
    moved = {}

    def lose_node(controller, scheduler):
        actors = [f"actor/{i}" for i in range(3)]
        _wait(lambda: all(_reported(controller, a) for a in actors), what="actors running")
        moved["before"] = {a: scheduler.node_id(a) for a in actors}
        on_second = [a for a, node in moved["before"].items() if node == cluster.second_id]
        assert on_second, f"SPREAD put no actor on the second node: {moved['before']}"
        moved["lost"] = on_second
        cluster.remove_node(cluster.second, allow_graceful=False)
        for a in on_second:
            _recovered(controller, a, before=0)
        moved["after"] = {a: scheduler.node_id(a) for a in actors}

    result, controller, scheduler = _run(cfg, tmp_path / "run", during=lose_node, end_run=True)
    assert result.reason == "SIGINT"
    assert result.restarts >= len(moved["lost"])
    assert set(moved["after"].values()) == {cluster.head_id}, moved
