"""VectorQuantizer under torch.distributed: two CPU processes (gloo), each with its own batch.

After a training step every rank must hold the same codebook, equal to what one process computes
on the concatenated batch; restart seeds must come from rank 0. The workers save their state and
the checks run here, in the parent.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastvq import VectorQuantizer
from helpers import assert_close

WORLD = 2
E_DIM, N_E = 5, 12
# Different batch sizes per rank: the counts must be summed, not averaged per rank.
BATCH_SIZES = (2, 3)
CONFIGS = {
    "ema": dict(ema=True, decay=0.8, eps=1e-4),
    "ema_restart": dict(ema=True, decay=0.5, restart_threshold=0.9),
    "restart": dict(restart_threshold=1.0),
}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def batches():
    """The same per-rank batches in every process; training steps use two batches per rank."""
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(b, E_DIM, 3, 4, generator=g) for b in BATCH_SIZES] for _ in range(2)]


def make_module(config):
    torch.manual_seed(0)
    module = VectorQuantizer(N_E, E_DIM, beta=0.25, **CONFIGS[config])
    with torch.no_grad():
        module.embedding.weight.normal_()
        module.embedding.weight[8:] += 50.0  # codes 8.. are never chosen: they are the ones to restart
        if module.ema:
            module.embed_sum.copy_(module.embedding.weight)
    return module.train()


def state_of(module):
    state = {k: v.clone() for k, v in module.state_dict().items()}
    state.update(perplexity=module.perplexity.clone(), codebook_usage=module.codebook_usage.clone())
    return state


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for config in CONFIGS:
            module = make_module(config)
            steps = 2 if config == "ema" else 1
            for step in range(steps):
                z = batches()[step][rank].requires_grad_(True)
                z_q, loss, _ = module(z)
                (z_q.sum() + loss).backward()  # the in-place update must not break the backward pass
            results[config] = state_of(module)
        # Eval: statistics stay local (no collective, so one rank may evaluate alone).
        module = make_module("ema").eval()
        if rank == 1:
            module(batches()[0][rank])
        results["eval"] = state_of(module)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    context = mp.spawn(worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False)
    for _ in range(120):  # a hung collective fails the test instead of hanging the suite
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.terminate()
        pytest.fail("distributed workers did not finish within 120 s")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def single_process(config, steps=1):
    module = make_module(config)
    for step in range(steps):
        module(torch.cat(batches()[step]))
    return state_of(module)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_ranks_hold_identical_codebooks(rank_results, config):
    r0, r1 = rank_results[0][config], rank_results[1][config]
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"{config}: {key} differs between ranks"


def test_ema_step_equals_one_process_on_the_concatenated_batch(rank_results):
    expected = single_process("ema", steps=2)
    got = rank_results[0]["ema"]
    assert not torch.equal(got["embedding.weight"], make_module("ema").embedding.weight)
    for key in ("embedding.weight", "cluster_size", "embed_sum", "perplexity", "codebook_usage"):
        assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("config", ["ema_restart", "restart"])
def test_restart_seeds_come_from_rank_0(rank_results, config):
    got = rank_results[0][config]["embedding.weight"]
    initial = make_module(config).embedding.weight.detach()
    expected = single_process(config)
    # Dead: unused by the whole (two-rank) batch; both configs' thresholds restart exactly those.
    all_rows = torch.cat(batches()[0]).permute(0, 2, 3, 1).reshape(-1, E_DIM)
    restarted = torch.bincount(torch.cdist(all_rows, initial).argmin(1), minlength=N_E) == 0
    assert restarted[8:].all()
    assert ((got - initial).abs().amax(1) > 1.0)[restarted].all(), "dead codes were not restarted"
    rank0_rows = batches()[0][0].permute(0, 2, 3, 1).reshape(-1, E_DIM)
    assert torch.cdist(got[restarted], rank0_rows).min(1).values.max() < 1e-5
    # The live codes were updated exactly as in one process (restarts aside, which draw at random).
    assert_close(got[~restarted], expected["embedding.weight"][~restarted], rtol=1e-6, atol=1e-6)
    if config == "ema_restart":
        assert_close(rank_results[0][config]["cluster_size"][restarted], torch.full((int(restarted.sum()),), 0.9))


def test_eval_statistics_stay_local(rank_results):
    module = make_module("ema").eval()
    module(batches()[0][1])
    assert rank_results[1]["eval"]["codebook_usage"] == module.codebook_usage
    assert rank_results[0]["eval"]["codebook_usage"] == 0  # rank 0 never called: nothing was sent to it
