"""SIGReg under data parallelism: 2 gloo processes must agree with 1 process on the whole batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import medjepa as mj

N, K = 64, 16


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 8, generator=g), torch.randn(8, K, generator=g)


def _reference():
    """One process: SIGReg of a linear embedding of the whole batch, its value and gradients."""
    x, w = _data()
    w = w.clone().requires_grad_()
    z = (x @ w).detach().requires_grad_()
    loss = mj.sigreg(x @ w, step=7, num_slices=32)
    loss.backward()
    zloss = mj.sigreg(z, step=7, num_slices=32)
    zloss.backward()
    return loss.item(), w.grad, z.grad


def _worker(rank, world, init_file, out_file):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    x, w = _data()
    w = w.clone().requires_grad_()
    shard = x.chunk(world)[rank]
    z = (shard @ w).detach().requires_grad_()
    zloss = mj.sigreg(z, step=7, num_slices=32)
    zloss.backward()
    loss = mj.sigreg(shard @ w, step=7, num_slices=32)
    loss.backward()
    dist.all_reduce(w.grad)  # what DDP does with parameter gradients: average over ranks
    w.grad /= world
    torch.save(dict(loss=loss.item(), wgrad=w.grad, zgrad=z.grad), f'{out_file}.{rank}')
    dist.destroy_process_group()


def test_sigreg_on_two_gloo_processes_equals_one_process(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / 'rdv'), str(tmp_path / 'out')), nprocs=world)
    ref_loss, ref_wgrad, ref_zgrad = _reference()
    outs = [torch.load(f'{tmp_path}/out.{r}', weights_only=True) for r in range(world)]
    for r, o in enumerate(outs):
        assert o['loss'] == pytest.approx(ref_loss, rel=1e-5)  # every rank sees the global statistic
        torch.testing.assert_close(o['wgrad'], ref_wgrad, rtol=1e-4, atol=1e-6)  # parameter gradient after DDP
        # each rank's embedding gradient is world x its slice of the global one; DDP's averaging
        # over ranks then divides by world (a plain all_reduce would leave it world times too small)
        torch.testing.assert_close(o['zgrad'] / world, ref_zgrad.chunk(world)[r], rtol=1e-4, atol=1e-7)
