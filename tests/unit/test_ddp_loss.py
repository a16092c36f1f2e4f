"""Global risk sets under DDP: 2 real gloo processes give the single-process loss and gradient;
the samplers give every rank its part of the same global batches and never pad."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from netsurv.training.ddp import GlobalBatchSampler, eval_batches, eval_shard

WORKER = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from netsurv.survival.losses import cox_ph_loss, nll_logistic_hazard
    from netsurv.training.ddp import global_cox_loss, global_nll_loss


    def run(sizes, kind):
        n, d = sum(sizes), 5
        rank, world = dist.get_rank(), dist.get_world_size()
        g = torch.Generator().manual_seed(0)       # the same fixed global batch on every rank
        x = torch.randn(n, d, generator=g)
        time = torch.randint(1, 12, (n,), generator=g).float()   # ties on purpose (Efron)
        event = (torch.rand(n, generator=g) < 0.6).float()
        bins = torch.randint(0, 4, (n,), generator=g)

        def make_net():
            torch.manual_seed(1)
            return torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 1 if kind != "nll" else 4))

        ref = make_net()                            # one process, the whole batch
        out = ref(x)
        if kind == "nll":
            ref_loss = nll_logistic_hazard(out, bins, event)
        else:
            ref_loss = cox_ph_loss(out[:, 0], time, event)
        ref_loss.backward()
        ref_grad = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])

        net = DDP(make_net())
        lo = sum(sizes[:rank])
        sl = slice(lo, lo + sizes[rank])
        out = net(x[sl])
        if kind == "nll":
            loss, n_glob = global_nll_loss(out, bins[sl], event[sl])
            shown = loss.detach().clone()
            dist.all_reduce(shown)
            shown /= world                          # what sync_dist / DDP averaging see
        elif kind == "cox":
            loss, has_event, n_glob = global_cox_loss(out[:, 0], time[sl], event[sl])
            shown = loss.detach()
        else:                                       # per-rank risk sets (what DDP did before)
            loss = cox_ph_loss(out[:, 0], time[sl], event[sl])
            n_glob, shown = n, loss.detach()
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in net.module.parameters()])
        return {"rank": rank, "loss": float(shown), "ref": float(ref_loss),
                "n": n_glob, "grad_diff": float((grad - ref_grad).abs().max()),
                "grad_scale": float(ref_grad.abs().max())}


    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    print(json.dumps([run(c["sizes"], c["kind"]) for c in json.loads(sys.argv[1])]))
    dist.barrier()
    dist.destroy_process_group()  # no rank exits with live gloo threads (SIGABRT under load)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [{"sizes": [16, 16], "kind": "cox"}, {"sizes": [20, 12], "kind": "cox"},
         {"sizes": [16, 16], "kind": "cox_naive"}, {"sizes": [20, 12], "kind": "nll"}]


@pytest.fixture(scope="module")
def two_ranks():
    """{(sizes, kind): [result of rank 0, result of rank 1]}, from one pair of processes."""
    port = str(_free_port())
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(CASES)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=180)
        assert p.returncode == 0, e[-3000:]
        outs.append(json.loads(o.strip().splitlines()[-1]))
    return {(tuple(c["sizes"]), c["kind"]): [outs[0][i], outs[1][i]]
            for i, c in enumerate(CASES)}


@pytest.mark.parametrize("sizes", [[16, 16], [20, 12]])
def test_global_cox_loss_and_gradient_equal_one_process(two_ranks, sizes):
    for o in two_ranks[tuple(sizes), "cox"]:
        assert o["n"] == 32
        assert o["loss"] == pytest.approx(o["ref"], abs=1e-5)
        # each rank's loss is the global loss, the gather's backward sums over ranks and DDP
        # averages: exactly the single-process gradient
        assert o["grad_diff"] < 1e-5 * max(1.0, o["grad_scale"])


def test_per_rank_risk_sets_would_differ(two_ranks):
    # the check above can fail: per-rank Cox losses (no gather) give another loss and gradient
    outs = two_ranks[(16, 16), "cox_naive"]
    assert max(abs(o["loss"] - o["ref"]) for o in outs) > 1e-2
    assert outs[0]["grad_diff"] > 1e-3


def test_nll_mean_over_the_global_batch_with_uneven_ranks(two_ranks):
    for o in two_ranks[(20, 12), "nll"]:
        assert o["n"] == 32
        assert o["loss"] == pytest.approx(o["ref"], abs=1e-5)
        assert o["grad_diff"] < 1e-5 * max(1.0, o["grad_scale"])


@pytest.mark.parametrize("n,batch,world", [(37, 8, 2), (37, 8, 3), (33, 8, 2), (10, 4, 4)])
def test_ranks_share_the_single_process_batches(n, batch, world):
    one = GlobalBatchSampler(n, batch, seed=5)
    ranks = [GlobalBatchSampler(n, batch, rank=r, world_size=world, seed=5) for r in range(world)]
    for s in (one, *ranks):
        s.set_epoch(3)
    single = [sorted(b) for b in one]
    parts = [list(s) for s in ranks]
    assert len({len(p) for p in parts}) == 1                      # same number of steps
    assert all(len(p) == len(s) for p, s in zip(parts, ranks))
    joined = [sorted(sum((p[k] for p in parts), [])) for k in range(len(parts[0]))]
    rest = n % batch
    if 0 < rest < world:            # a last batch smaller than the ranks is dropped
        assert joined == single[:-1] and len(single[-1]) == rest
    else:
        assert joined == single
    for k in range(len(joined)):    # sizes on the ranks differ by at most one, none empty
        sizes = [len(p[k]) for p in parts]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    one.set_epoch(4)
    assert [sorted(b) for b in one] != single                     # a new permutation per epoch
    assert len(one) == len(single) and sorted(sum(single, [])) == list(range(n))


def test_batch_size_below_the_number_of_processes_is_an_error():
    with pytest.raises(ValueError, match="global number of patients"):
        GlobalBatchSampler(10, 2, rank=0, world_size=4)


def test_evaluation_shards_cover_every_patient_once():
    for n, world in [(7, 2), (3, 4), (10, 3)]:
        shards = [eval_shard(n, r, world) for r in range(world)]
        assert sorted(np.concatenate(shards).tolist()) == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert eval_batches([4, 6, 8, 10, 12], 2) == [[4, 6], [8, 10], [12]]
