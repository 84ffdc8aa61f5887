"""KMeansRouter under data-parallel training: two CPU processes (gloo) keep one set of centroids.

The processes see different batches (of different sizes); the synchronised router must equal one
process's router fed the concatenation of both ranks' tokens, and without sync the ranks differ.
"""

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from routed.routers.kmeans import KMeansRouter

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this torch build")

WORLD, H, D, C, STEPS = 2, 2, 16, 4, 3
SHAPES = {0: (2, 30), 1: (3, 17)}  # [batch, seq] per rank: the ranks need not hold equal batches
TIMEOUT_S = 120


def _batch(rank: int, step: int) -> torch.Tensor:
    """``[B, H, N, D]`` vectors around fixed directions (the same on every rank), noise per rank and step."""
    dirs = F.normalize(torch.randn(H, C, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    g = torch.Generator().manual_seed(1000 * rank + step)
    B, N = SHAPES[rank]
    truth = torch.randint(0, C, (B, H, N), generator=g)
    x = dirs[torch.arange(H).view(1, H, 1), truth] + 0.3 * torch.randn(B, H, N, D, generator=g)
    return x * (1 + torch.rand(B, H, N, 1, generator=g))


def _concatenated(step: int) -> torch.Tensor:
    """All ranks' tokens as one ``[1, H, T, D]`` batch, in the order the router flattens them (rank, batch, seq)."""
    parts = [_batch(r, step).transpose(0, 1).reshape(H, -1, D) for r in range(WORLD)]
    return torch.cat(parts, 1)[None]


def _train(km: KMeansRouter, batch) -> dict:
    """Initialise on step 0 (training mode), then ``STEPS`` EMA updates; returns the centroids along the way."""
    km.train()
    out = {}
    for step in range(STEPS + 1):
        x = batch(step)
        a = km.assign(x)
        if step == 0:
            out["init"] = km.centroids.clone()
        km.update(x, a)
    out["final"] = km.centroids.clone()
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # a lost peer fails, never hangs
    try:
        res = {}
        torch.manual_seed(rank)  # different random (pre-init) centroids per rank, as without a shared seed
        res["sync"] = _train(KMeansRouter(H, D, C, decay=0.9), lambda s: _batch(rank, s))
        res["nosync"] = _train(KMeansRouter(H, D, C, decay=0.9, sync_distributed=False), lambda s: _batch(rank, s))
        groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank must create every group
        res["own_group"] = _train(KMeansRouter(H, D, C, decay=0.9, process_group=groups[rank]),
                                  lambda s: _batch(rank, s))
        # Rank 0 alone evaluates an untrained router first (no collective may run there), then both train.
        km = KMeansRouter(H, D, C, decay=0.9)
        if rank == 0:
            km.eval().assign(_batch(0, 10))
        res["eval_first"] = _train(km, lambda s: _batch(rank, s))
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs the scenarios on two processes; returns each rank's results."""
    tmp = tmp_path_factory.mktemp("kmeans_dist")
    ctx = mp.start_processes(_worker, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):  # raises with the worker's traceback if one failed
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} k-means processes did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _single(**kw) -> KMeansRouter:
    return KMeansRouter(H, D, C, decay=0.9, **kw)


@needs_gloo
def test_synchronised_ranks_equal_one_process_on_the_concatenation(ranks):
    want = _train(_single(), _concatenated)
    for key in ("init", "final"):
        assert torch.equal(ranks[0]["sync"][key], ranks[1]["sync"][key]), key  # identical, bit for bit
        torch.testing.assert_close(ranks[0]["sync"][key], want[key], rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(want["final"], want["init"])  # the updates did move the centroids


@needs_gloo
def test_without_sync_each_rank_clusters_its_own_batches(ranks):
    for key in ("init", "final"):
        assert not torch.allclose(ranks[0]["nosync"][key], ranks[1]["nosync"][key], atol=1e-3), key
    for r in range(WORLD):  # exactly the single-process router on the rank's own data
        want = _train(_single(sync_distributed=False), lambda s, r=r: _batch(r, s))
        assert torch.equal(ranks[r]["nosync"]["final"], want["final"])


@needs_gloo
def test_a_group_of_one_process_does_not_synchronise(ranks):
    for r in range(WORLD):
        assert torch.equal(ranks[r]["own_group"]["final"], ranks[r]["nosync"]["final"])


@needs_gloo
def test_state_from_a_first_use_in_evaluation_is_broadcast_at_training(ranks):
    ref = _single().eval()
    ref.assign(_batch(0, 10))  # rank 0's evaluation-time initialisation ...
    ref.train()
    init = ref.centroids.clone()
    want = _train(ref, _concatenated)  # ... then the synchronised updates (no re-initialisation)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["eval_first"]["init"], init, rtol=0, atol=0)
        torch.testing.assert_close(ranks[r]["eval_first"]["final"], want["final"], rtol=0, atol=1e-6)


def test_one_process_never_communicates(monkeypatch):
    """Without an initialised process group the router runs as before: no collective is even called."""
    if dist.is_available():
        assert not dist.is_initialized()

        def forbidden(*args, **kwargs):
            raise AssertionError("a collective ran in a single process")

        for fn in ("all_reduce", "all_gather", "broadcast", "get_world_size"):
            monkeypatch.setattr(dist, fn, forbidden)
    got = _train(_single(), lambda s: _batch(0, s))
    want = _train(_single(sync_distributed=False), lambda s: _batch(0, s))
    assert torch.equal(got["final"], want["final"])
