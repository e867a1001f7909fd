"""``spo launch-plan``: the multi-node launch of one GPU stage, written out from its arguments.

Either the ``accelerate launch`` command to run on each node (rank 0's address is the rendezvous), or a
Kubernetes manifest: a headless Service plus an Indexed Job whose pod ``i`` is machine rank ``i``
(``JOB_COMPLETION_INDEX``) and reaches rank 0 as ``<name>-0.<name>``. Nothing is started here.
"""

from __future__ import annotations

import shlex
from typing import Any

from spo.errors import SPOError
from spo.pipeline_spec import STAGE_BY_CLI, STAGE_BY_NAME, STAGES

GPU_STAGES = tuple(s.cli for s in STAGES if s.gpu)


def stage_cli(stage: str) -> str:
    spec = STAGE_BY_CLI.get(stage) or STAGE_BY_NAME.get(stage)
    if spec is None or not spec.gpu:
        raise SPOError(f"launch-plan is for the GPU stages ({', '.join(GPU_STAGES)}), not {stage!r}")
    return spec.cli


def accelerate_args(
    stage: str,
    nodes: int,
    gpus_per_node: int,
    main_ip: str,
    rank: int | str,
    port: int = 29500,
    config_file: str | None = None,
    spo_args: tuple[str, ...] = (),
) -> list[str]:
    """``accelerate launch`` arguments for machine ``rank`` (an int, or a shell expression such as
    ``$JOB_COMPLETION_INDEX``) of ``nodes`` machines with ``gpus_per_node`` GPUs each."""
    if nodes < 1 or gpus_per_node < 1:
        raise SPOError("--nodes and --gpus-per-node must be at least 1")
    args = ["accelerate", "launch"]
    if config_file:
        args += ["--config_file", config_file]
    else:
        args += ["--multi_gpu"] if nodes * gpus_per_node > 1 else []
    args += [
        "--num_machines", str(nodes),
        "--machine_rank", str(rank),
        "--num_processes", str(nodes * gpus_per_node),  # accelerate counts processes over all machines
        "--main_process_ip", main_ip,
        "--main_process_port", str(port),
        "-m", "spo.cli", stage_cli(stage), *spo_args,
    ]  # fmt: skip
    return args


def node_commands(stage: str, nodes: int, gpus_per_node: int, main_ip: str, **kwargs: Any) -> list[str]:
    """One shell command per node, rank 0 first (it must be reachable at ``main_ip``)."""
    return [
        shlex.join(accelerate_args(stage, nodes, gpus_per_node, main_ip, rank, **kwargs)) for rank in range(nodes)
    ]


def kubernetes_manifests(
    stage: str,
    nodes: int,
    gpus_per_node: int,
    image: str,
    claim: str,
    name: str | None = None,
    port: int = 29500,
    config_file: str | None = None,
    spo_args: tuple[str, ...] = (),
    namespace: str = "default",
) -> list[dict[str, Any]]:
    """A headless Service and an Indexed Job running ``stage`` on ``nodes`` pods of ``gpus_per_node`` GPUs,
    with the shared claim mounted at /data (project root /data/spo, as in deploy/prefect-kubernetes.yaml)."""
    name = name or f"spo-{stage_cli(stage)}"
    main = f"{name}-0.{name}"  # pod hostname of index 0 under the headless service
    args = accelerate_args(
        stage, nodes, gpus_per_node, main, "$(JOB_COMPLETION_INDEX)", port, config_file,
        ("--set", "paths.root=/data/spo", *spo_args),
    )  # fmt: skip
    labels = {"app.kubernetes.io/name": name}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": "None", "selector": labels, "ports": [{"port": port, "name": "rendezvous"}]},
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": 0,  # a failed rank fails the job; rerun with --resume latest
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "subdomain": name,
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "spo",
                            "image": image,
                            "workingDir": "/opt/spo",
                            "command": args[:1],
                            "args": args[1:],
                            "env": [{"name": "HF_HOME", "value": "/data/hf"}],
                            "resources": {"limits": {"nvidia.com/gpu": gpus_per_node}},
                            "ports": [{"containerPort": port}],
                            "volumeMounts": [
                                {"name": "shared", "mountPath": "/data"},
                                {"name": "shm", "mountPath": "/dev/shm"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "shared", "persistentVolumeClaim": {"claimName": claim}},
                        {"name": "shm", "emptyDir": {"medium": "Memory"}},
                    ],
                },
            },
        },
    }
    return [service, job]
