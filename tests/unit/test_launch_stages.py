"""One reading of `run:` on every backend: the same stages go through each backend's dryrun() and
come out as the same program (launch/command.py), with each backend's own resource request."""
from __future__ import annotations

import shlex
import sys

import pytest

from torchcapsule.config import KubernetesTarget, SlurmTarget, parse_project
from torchcapsule.errors import BackendError
from torchcapsule.launch.docker import DockerBackend
from torchcapsule.launch.kubernetes import KubernetesBackend
from torchcapsule.launch.local import LocalBackend
from torchcapsule.launch.slurm import SlurmBackend
from torchcapsule.launch.spec import job_spec

PROJECT = """
name: demo
stages:
  evaluate: {run: "evaluate.py"}
  script: {run: "python x.py --a 1"}
  module: {run: "python3 -m pkg"}
  train: {run: "train.py --epochs 2", distributed: ddp, resources: {cpus: 3}}
"""


def _local(project, spec):
    return sys.executable, LocalBackend(project).dryrun(spec).request.argv, None


def _docker(project, spec):
    argv = DockerBackend(project).dryrun(spec).request
    if spec.nodes > 1:  # one container per node: the first node's (the others differ by node only)
        argv = argv.argvs[0]
    at = argv.index(spec.image)
    gpus = argv[argv.index("--gpus") + 1] if "--gpus" in argv else None
    if gpus and gpus.startswith('"device='):  # several nodes: each its own GPUs, by index
        gpus = str(len(gpus.split(",")))
    return "python", argv[at + 1:], gpus


def _slurm(project, spec):
    script = SlurmBackend(project, target=SlurmTarget()).dryrun(spec).text
    step = shlex.split(next(line for line in script.splitlines() if "srun " in line and "scontrol" not in line))
    step = step[step.index("srun") + 1:]
    while step[0].startswith("--"):  # srun's own options
        step = step[1:]
    gpus = next((line.split("=", 1)[1] for line in script.splitlines() if "--gpus-per-node" in line), None)
    return sys.executable, [a for a in step if a != "&"], gpus


def _kubernetes(operator):
    def run(project, spec):
        docs = KubernetesBackend(project, target=KubernetesTarget(operator=operator)).dryrun(spec).request
        if docs[0]["kind"] == "PyTorchJob":
            pod = docs[0]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        else:
            pod = docs[0]["spec"]["template"]["spec"]
        c = pod["containers"][0]
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        return "python", c["command"], None if gpus is None else str(gpus)
    return run


BACKENDS = {"local": _local, "docker": _docker, "slurm": _slurm,
            "kubernetes": _kubernetes("none"), "kubeflow": _kubernetes("kubeflow")}
ONE_MACHINE = ("local",)  # docker runs several nodes as containers on this machine


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSULE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # what the local backend sees: two GPUs
    (tmp_path / "capsule.yaml").write_text(PROJECT)
    return parse_project(PROJECT, tmp_path / "capsule.yaml")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stage,program", [
    ("evaluate", ["PYTHON", "evaluate.py"]),  # a script gets the stage's interpreter
    ("script", ["PYTHON", "x.py", "--a", "1"]),
    ("module", ["PYTHON", "-m", "pkg"]),  # python3 means the stage's interpreter too
])
def test_plain_stage_is_the_same_program_everywhere(project, backend, stage, program):
    python, argv, _ = BACKENDS[backend](project, job_spec(project, stage))
    assert [("PYTHON" if a == python else a) for a in argv] == program


def _torchrun(argv):
    """(launcher, {option: value}, entrypoint) of a torchrun argv."""
    i = next(i for i, a in enumerate(argv) if a.startswith("--"))
    launcher, opts = argv[:i], {}
    while argv[i].startswith("--"):
        opts[argv[i]] = argv[i + 1]
        i += 2
    return launcher, opts, argv[i:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gpus,nodes", [(0, 1), (2, 1), (0, 2), (2, 2)])
def test_ddp_stage_is_the_same_torchrun_everywhere(project, backend, gpus, nodes):
    spec = job_spec(project, "train", gpus=gpus, nodes=nodes)
    if nodes > 1 and backend in ONE_MACHINE:
        with pytest.raises(BackendError, match=f"--nodes {nodes}: the {backend} backend"):
            BACKENDS[backend](project, spec)
        return
    python, argv, requested = BACKENDS[backend](project, spec)
    launcher, opts, program = _torchrun(argv)
    # torchrun, started by torchcapsule's launcher (a preempted job ends 75, not a spent retry)
    assert launcher == [python, "-m", "torchcapsule.launch.torchrun"]
    assert program == ["train.py", "--epochs", "2"]
    # ranks per node: one per GPU, else one per CPU; the backend asks its scheduler for the GPUs
    assert opts["--nproc_per_node"] == str(gpus or 3)
    # (the local backend asks nobody: it checked the GPUs it sees, CUDA_VISIBLE_DEVICES here)
    assert requested == (str(gpus) if gpus and backend != "local" else None)
    assert (opts["--role"], opts["--tee"]) == ("rank", "3")
    if backend == "kubeflow":  # the operator passes the node count and rendezvous (PET_*)
        assert "--nnodes" not in opts and "--rdzv_endpoint" not in opts
    else:
        assert opts["--nnodes"] == str(nodes) and opts["--rdzv_backend"] == "c10d"
