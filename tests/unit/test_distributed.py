"""Process topology from torchrun / SLURM variables, and real gloo collectives in 2 processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from netsurv.distributed import dist_env, shard_indices


def test_single_process_without_variables():
    e = dist_env({})
    assert (e.rank, e.world_size, e.local_rank, e.source) == (0, 1, 0, "single")


def test_torchrun_variables_win_over_slurm():
    e = dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                  "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"})
    assert (e.rank, e.world_size, e.local_rank, e.source) == (3, 4, 1, "torchrun")


def test_slurm_step_tasks():
    env = {"SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_NAME": "train"}
    e = dist_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.source) == (1, 2, 1, "slurm")
    assert list(shard_indices(5, e)) == [1, 3]


def test_sbatch_script_without_srun_is_one_process():
    # the batch script of `sbatch --ntasks=2` runs once: no step id, so no peers to wait for
    e = dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train"})
    assert e.world_size == 1
    e = dist_env({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
                  "SLURM_JOB_NAME": "interactive"})
    assert e.world_size == 1


def test_bad_rank_is_an_error():
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        dist_env({"RANK": "2", "WORLD_SIZE": "2"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_barrier_and_gather_in_two_real_processes(tmp_path):
    code = textwrap.dedent("""
        import json, sys
        from netsurv import distributed as d
        env = d.dist_env()
        d.barrier()
        got = d.all_gather_object({"rank": env.rank})
        b = d.broadcast_object("from-zero" if env.rank == 0 else None)
        import torch.distributed as dist
        print(json.dumps({"rank": env.rank, "got": got, "b": b,
                          "pg": dist.is_initialized()}))
    """)
    port = str(_free_port())
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    import json
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=600)  # loaded CI machines
        assert p.returncode == 0, e
        outs.append(json.loads(o.strip().splitlines()[-1]))
    for o in outs:
        assert o["got"] == [{"rank": 0}, {"rank": 1}]
        assert o["b"] == "from-zero" and o["pg"] is True
