"""deploy/: the Ray cluster launcher config, the KubeRay RayJob, the Dockerfile and the cluster
experiment are valid for their tools and agree with each other (image, Ray version, custom
resources, shared run directory)."""
import copy
import json
import os
import re
import shlex

import pytest
import yaml

from srl.config import load_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
LAUNCHER = os.path.join(DEPLOY, "ray-cluster.yaml")
RAYJOB = os.path.join(DEPLOY, "kuberay-rayjob.yaml")
DOCKERFILE = os.path.join(DEPLOY, "Dockerfile")
EXPERIMENT = os.path.join(DEPLOY, "cartpole-cluster.yaml")


def _launcher():
    return yaml.safe_load(open(LAUNCHER))


def _rayjob():
    docs = list(yaml.safe_load_all(open(RAYJOB)))
    return next(d for d in docs if d["kind"] == "RayJob"), docs


def _dockerfile():
    """Instructions as (KEYWORD, argument text), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", open(DOCKERFILE).read())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerfile_args():
    return dict(arg.split("=", 1) for kw, arg in _dockerfile() if kw == "ARG" and "=" in arg)


# --------------------------------------------------------------------------- Ray cluster launcher


def test_launcher_config_passes_rays_own_validation():
    """What `ray up` runs before it touches a cloud: defaults filled in, then the JSON schema."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    pytest.importorskip("jsonschema")
    prepared = util.prepare_config(_launcher())
    util.validate_config(prepared)
    assert set(prepared["available_node_types"]) == {"head", "cpu-actors", "gpu-learn"}


def test_launcher_validation_catches_a_typo():
    """The schema check above is not vacuous: an unknown key is refused."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    jsonschema = pytest.importorskip("jsonschema")
    bad = copy.deepcopy(_launcher())
    bad["available_node_types"]["cpu-actors"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        util.validate_config(util.prepare_config(bad))


def test_launcher_node_roles():
    cfg = _launcher()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head"
    assert types["head"]["resources"].get("CPU") == 0, "no srl worker may land on the head"
    assert types["cpu-actors"]["resources"].get("cpu_node", 0) > 0
    assert types["gpu-learn"]["resources"].get("GPU", 0) >= 1
    assert "--volume /shared:/shared" in cfg["docker"]["run_options"]
    assert cfg["docker"]["image"].endswith("-gpu")


# --------------------------------------------------------------------------- KubeRay RayJob


def test_rayjob_manifest_shape():
    job, docs = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    for key in ("entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes"):
        assert key in spec, key
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu-actors", "gpu-learn"}
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    # every pod mounts the shared run directory from the claim this file defines
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups.values()]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/shared"]]["persistentVolumeClaim"]["claimName"] in claims
    # Kubernetes GPUs match Ray's
    gpu = groups["gpu-learn"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"]


def test_rayjob_entrypoint_is_a_valid_srl_command():
    from srl.cli import _parser

    job, _ = _rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["srl", "run"]
    args = _parser().parse_args(argv[1:])
    assert args.ray == "auto" and args.run_dir.startswith("/shared/")
    assert args.config == "/home/ray/srl/deploy/cartpole-cluster.yaml"  # where the image puts it
    workdir = next(arg for kw, arg in _dockerfile() if kw == "WORKDIR")
    assert args.config.startswith(workdir + "/deploy/")


def _kuberay_custom_resources(group) -> dict:
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}  # KubeRay's quoted JSON string


# --------------------------------------------------------------------------- the three agree


def test_images_and_ray_versions_agree():
    job, _ = _rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    images = {c["image"] for spec in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
              for c in spec["template"]["spec"]["containers"]}
    assert images == {_launcher()["docker"]["image"]}
    assert cluster["rayVersion"] == _dockerfile_args()["RAY_VERSION"]


def test_cluster_experiment_fits_the_nodes():
    cfg = load_experiment(EXPERIMENT)
    assert cfg.cluster.backend == "ray" and cfg.log.dir.startswith("/shared/")
    w = cfg.workers
    launcher_types = _launcher()["available_node_types"]
    job, _ = _rayjob()
    kuberay_groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    for role in (w.actors, w.policies, w.trainers):
        for name in role.resources:  # each custom resource is offered by some node type
            assert any(name in t.get("resources", {}) for t in launcher_types.values()), name
            assert any(name in _kuberay_custom_resources(g) for g in kuberay_groups), name
    # the GPU roles fit on one GPU node together
    gpus = w.policies.count * w.policies.num_gpus + w.trainers.count * w.trainers.num_gpus
    assert gpus <= launcher_types["gpu-learn"]["resources"]["GPU"]
    assert w.policies.device == "cuda" and w.trainers.device == "cuda"


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_sanity():
    instructions = _dockerfile()
    keywords = [kw for kw, _ in instructions]
    known = {"ARG", "FROM", "WORKDIR", "COPY", "RUN", "ENV", "USER", "CMD", "LABEL", "EXPOSE", "ENTRYPOINT"}
    assert set(keywords) <= known, set(keywords) - known
    first = next(i for i, kw in enumerate(keywords) if kw != "ARG")
    assert keywords[first] == "FROM" and keywords.count("FROM") == 1
    base = instructions[first][1]
    assert base.startswith("rayproject/ray:${RAY_VERSION}-${PYTHON}-${FLAVOR}")
    args = _dockerfile_args()
    major, minor = (int(x) for x in args["RAY_VERSION"].split(".")[:2])
    assert (major, minor) >= (2, 9)  # pyproject's ray extra: ray[default]>=2.9
    assert args["FLAVOR"] in ("cpu", "gpu")
    # everything it copies exists in the build context (the repository root)
    for kw, arg in instructions:
        if kw == "COPY":
            sources = [s for s in arg.split() if not s.startswith("--")][:-1]
            for src in sources:
                assert os.path.exists(os.path.join(ROOT, src)), src
        assert not (kw == "ADD" and "://" in arg), "no remote ADD"
    runs = " ".join(arg for kw, arg in instructions if kw == "RUN")
    assert 'pip install --no-cache-dir ".[ray]"' in runs and "import srl" in runs
    user = [arg for kw, arg in instructions if kw == "USER"]
    assert user and user[-1] not in ("root", "0"), "the image must not run as root"
    ignore = open(DOCKERFILE + ".dockerignore").read().split()
    assert ".venv" in ignore and "runs" in ignore and ".git" in ignore


def test_dockerfile_builds_if_docker_is_here():
    """A real build only where docker and network are at hand (never in CI)."""
    import shutil
    import subprocess

    if not shutil.which("docker") or os.environ.get("SRL_DOCKER_BUILD") != "1":
        pytest.skip("set SRL_DOCKER_BUILD=1 on a machine with docker to build the image")
    subprocess.run(["docker", "build", "-f", DOCKERFILE, "-t", "srl:test", ROOT], check=True)
