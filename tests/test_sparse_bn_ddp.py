"""Batch norm under DDP: 2 CPU processes (gloo) give the statistics, outputs and gradients of one process holding
the whole batch, for the encoder's sparse batch norm and for the decoder's ``SyncedBatchNorm`` (NCHW and
``channels_last`` maps). Each run has a hard deadline: a hang fails the test."""

import datetime
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mim.backbones.sparse import masked_batch_norm, upsample_active
from mim.sync_batchnorm import SyncedBatchNorm

DEADLINE_S = 120


def _spawn(worker, *args) -> dict:
    """Run ``worker(rank, init_file, results, *args)`` on 2 gloo ranks; their ``results``, or a test failure
    past :data:`DEADLINE_S` seconds."""
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(worker, args=(f"{tmp}/init", results, *args), nprocs=2, join=False,
                                 start_method="spawn")  # fmt: skip
        deadline = time.monotonic() + DEADLINE_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the 2 ranks did not finish in {DEADLINE_S} s (a hang?)")
    return dict(results)


def _init(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip


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
    _init(rank, init_file)
    try:
        half = slice(4 * rank, 4 * rank + 4)
        x, sites, weight, bias, upstream = _data()
        out, grad, rm, rv = _run(x[half], sites[half], weight, bias, upstream[half], sync=True)
        results[rank] = (out, grad, rm, rv)
    finally:
        dist.destroy_process_group()


def test_two_process_sparse_bn_equals_one_process():
    results = _spawn(_worker)
    out, grad, rm, rv = _run(*_data(), sync=False)
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), grad, atol=1e-5, rtol=1e-5)
    for rank in (0, 1):  # every rank keeps the global running statistics
        torch.testing.assert_close(results[rank][2], rm)
        torch.testing.assert_close(results[rank][3], rv)
    # a rank alone (no sync) would have seen other statistics
    alone = _run(*(t[:4] for t in _data()[:2]), *_data()[2:4], _data()[4][:4], sync=False)
    assert not torch.allclose(alone[2], rm)


def _synced_run(x, upstream, memory_format, clamp):
    """Two training steps of a float64 ``SyncedBatchNorm``: output, input / weight / bias gradients, buffers."""
    norm = SyncedBatchNorm(x.shape[1], clamp=clamp, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, x.shape[1]))
        norm.bias.copy_(torch.linspace(-1, 1, x.shape[1]))
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    for _ in range(2):
        out = norm(x)
    (out * upstream).sum().backward()
    assert out.is_contiguous(memory_format=memory_format)
    return out.detach(), x.grad, norm.weight.grad, norm.bias.grad, norm.running_mean, norm.running_var


def _synced_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 12, 6, 6, generator=g, dtype=torch.float64) * 2 + 1, torch.randn(
        8, 12, 6, 6, generator=g, dtype=torch.float64
    )


def _synced_worker(rank: int, init_file: str, results: dict, memory_format, clamp) -> None:
    _init(rank, init_file)
    try:
        x, upstream = _synced_data()
        half = slice(4 * rank, 4 * rank + 4)
        results[rank] = _synced_run(x[half], upstream[half], memory_format, clamp)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_two_process_synced_batch_norm_equals_one_process(memory_format):
    """``channels_last`` maps take the fused (B*H*W, C) path, NCHW ones the masked-BN path; both with a fused
    clamp (bounds that both bind on this data). The weight and bias gradients of the ranks add up to the whole
    batch's (DDP then averages them)."""
    clamp = (0.0, 1.0)
    results = _spawn(_synced_worker, memory_format, clamp)
    out, grad, grad_w, grad_b, rm, rv = _synced_run(*_synced_data(), memory_format, clamp)
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[0][2] + results[1][2], grad_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[0][3] + results[1][3], grad_b, rtol=1e-10, atol=1e-12)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank][4], rm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(results[rank][5], rv, rtol=1e-12, atol=1e-12)
    assert (out == 0).any() and (out == 1).any()  # the clamp binds on both sides
