"""Sparse batch norm under DDP: 2 CPU processes (gloo) give the statistics, outputs and input
gradients of one process holding the whole batch."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mim.backbones.sparse import masked_batch_norm, upsample_active


def _data():
    g = torch.Generator().manual_seed(0)
    active = torch.rand(8, 1, 2, 2, generator=g) > 0.6
    active[:, 0, 0, 0] = True
    sites = upsample_active(active, (8, 8)).float()
    x = (torch.randn(8, 6, 8, 8, generator=g) * 2 + 3) * sites
    weight, bias = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    upstream = torch.randn(8, 6, 8, 8, generator=g)
    return x, sites, weight, bias, upstream


def _run(x, sites, weight, bias, upstream, sync):
    x = x.clone().requires_grad_()
    rm, rv = torch.zeros(6), torch.ones(6)
    out = masked_batch_norm(x, sites, rm, rv, weight, bias, 0.1, 1e-5, sync=sync)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, rm, rv


def _worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        half = slice(4 * rank, 4 * rank + 4)
        x, sites, weight, bias, upstream = _data()
        out, grad, rm, rv = _run(x[half], sites[half], weight, bias, upstream[half], sync=True)
        results[rank] = (out, grad, rm, rv)
    finally:
        dist.destroy_process_group()


def test_two_process_sparse_bn_equals_one_process(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    out, grad, rm, rv = _run(*_data(), sync=False)
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), grad, atol=1e-5, rtol=1e-5)
    for rank in (0, 1):  # every rank keeps the global running statistics
        torch.testing.assert_close(results[rank][2], rm)
        torch.testing.assert_close(results[rank][3], rv)
    # a rank alone (no sync) would have seen other statistics
    alone = _run(*(t[:4] for t in _data()[:2]), *_data()[2:4], _data()[4][:4], sync=False)
    assert not torch.allclose(alone[2], rm)
