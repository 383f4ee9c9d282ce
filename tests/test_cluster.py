"""The cluster configs users deploy: valid against the schema inside the installed Ray, and they
start the pipeline entrypoint that exists in this repo."""

import json
import shlex
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"


def _entrypoint_script(command: str) -> Path:
    args = shlex.split(command)
    assert args[0] == "python", command
    return ROOT / args[1]


def test_launcher_yaml_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any("gpu" in name for name in types if name != config["head_node_type"])


def test_launcher_yaml_rejected_when_broken():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as err:
        assert "eight" in str(err)
    else:
        raise AssertionError("a string max_workers passed the schema")


def test_kuberay_manifests_parse_and_run_the_pipeline():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"
    ]

    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    script = _entrypoint_script(job["spec"]["entrypoint"])
    assert script.is_file(), f"RayJob entrypoint {script} does not exist"
    config_arg = shlex.split(job["spec"]["entrypoint"])
    config_path = ROOT / config_arg[config_arg.index("--config") + 1]
    assert config_path.is_file()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert "working_dir" in runtime_env


def test_runtime_env_and_configs_load():
    from pocl_ray.config import load_config

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert any(p.startswith("transformers") for p in env["pip"])
    for name in ("quickstart.yaml", "testbed.yaml", "gpt2-dolly.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.curriculum.plan == "pocl"


# -- locked clusters: Ray token authentication everywhere a dashboard or job API listens ---------


def _kuberay():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    return [("raycluster.yaml", cluster["spec"]), ("rayjob.yaml", job["spec"]["rayClusterSpec"])]


def test_kuberay_clusters_enable_token_auth():
    for name, spec in _kuberay():
        # KubeRay >= 1.5.1's RayCluster field (the CRD's AuthOptions: mode is "disabled" or "token").
        assert spec.get("authOptions") == {"mode": "token"}, name
        head = spec["headGroupSpec"]
        for container in [*head["template"]["spec"]["containers"]] + [
            c for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]
        ]:
            # The operator sets RAY_AUTH_MODE / RAY_AUTH_TOKEN itself; a manifest that also set them
            # (e.g. RAY_AUTH_MODE=disabled) would fight it.
            assert not {e["name"] for e in container.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, name


def test_launcher_cluster_starts_every_node_with_token_auth():
    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts), starts
    # The token reaches every node at the path Ray reads by default.
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    head = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head, "the head's dashboard is reached through the SSH tunnel only"


def test_no_manifest_exposes_an_unauthenticated_dashboard():
    texts = {p.name: p.read_text() for p in [CLUSTER / "cluster.yaml", *(CLUSTER / "kuberay").glob("*.yaml")]}
    for name, text in texts.items():
        assert "RAY_AUTH_MODE=disabled" not in text and "mode: disabled" not in text, name
    for name, spec in _kuberay():
        if spec["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "0.0.0.0":
            assert spec["authOptions"]["mode"] == "token", name
