"""The two-node Slurm cluster itself (scripts/slurm-multinode.sh): each node is its own host,
with its own hostname and address, and the single-node cluster is untouched beside it."""
from __future__ import annotations

import os
import subprocess


def test_a_two_node_step_runs_once_on_each_node_with_its_own_address(slurm_multinode, tmp_path):
    env = {**os.environ, **slurm_multinode}
    r = subprocess.run(
        ["srun", "-N2", "--ntasks-per-node=1", "--chdir", str(tmp_path), "python3", "-c",
         "import os, socket; h = socket.gethostname(); "
         "print(os.environ['SLURM_NODEID'], h, socket.gethostbyname(h))"],
        capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = sorted(tuple(line.split()) for line in r.stdout.splitlines())
    assert rows == [("0", "capsule-mn1", "10.231.0.11"), ("1", "capsule-mn2", "10.231.0.12")]


def test_the_single_node_cluster_is_a_different_cluster(slurm_multinode):
    multi = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                           env={**os.environ, **slurm_multinode}).stdout
    assert "ClusterName             = capsulemn" in multi and "SlurmctldPort           = 6827" in multi
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    single = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, env=env).stdout
    assert "capsule-mn1" not in single
