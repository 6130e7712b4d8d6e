"""Worker for tests/test_ddp.py: two optimiser steps of medjepa.train_step on a fixed global batch.

The global batch of every step (images, crops and masks) is built from seeds that do not depend on
how it is split, so any (world, accum) split of it must give the update of one process on the whole
batch. Rank r, micro-step m takes chunk m * world + r, the order medjepa.batch_indices uses.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_step.py OUT_DIR
runs every entry of SCENARIOS on 2 gloo ranks and writes OUT_DIR/<name>.rank<r>.pt; the test runs
the same scenarios in one process with run(..., world=1, accum=1) and compares.
"""
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn

import medjepa as mj

GLOBAL_BATCH = 8
TINY = ['--n_layer=2', '--n_embd=32', '--n_head=2', '--pred_n_layer=2', '--pred_n_embd=16', '--pred_n_head=2',
        '--image_size=48', '--patch_size=8', '--num_slices=64', '--device=cpu', '--dtype=float32',
        '--grad_clip=0']  # no clipping: a gradient wrong by a constant factor would be clipped away
# name: (config overrides, accumulation micro-steps per rank under torchrun)
SCENARIOS = {
    'sigreg': (['--sigreg_lambda=0.5'], 1),  # SIGReg weighted up so that an error in it would show
    'sigreg_raw': (['--sigreg_lambda=0.5', '--sigreg_on=pooled'], 1),  # without the global standardisation
    'sigreg_mix': (['--sigreg_lambda=0.5', '--sigreg_on=pooled_std+tokens'], 1),  # standardised vectors + raw tokens
    'inv': (['--sigreg_lambda=0.5', '--inv_weight=1.0'], 1),  # + the pooled invariance, standardised over all ranks
    'accum': (['--sigreg_lambda=0.5'], 2),   # DDP and accumulation together, SIGReg included (exact_sigreg_grads)
    'inv_accum': (['--sigreg_lambda=0.5', '--inv_weight=1.0'], 2),  # the same with the pooled invariance
    'nan': (['--sigreg_lambda=0.5'], 1),     # step 0: NaN targets on rank 1 only; every rank must skip that update
}


def global_batch(cfg, step):
    """The whole batch of one step: (G, C, S, S) images, their jittered copies, one mask draw."""
    gen = torch.Generator().manual_seed(1000 + step)
    S, G = cfg['image_size'], GLOBAL_BATCH
    x = torch.randn(G, 3, S, S, generator=gen)
    grid = (S // cfg['patch_size'],) * 2
    ctx_idx, tgt_idx = mj.sample_masks(G, grid, gen, **{k: cfg[k] for k in mj.MASK_KEYS})
    batch = dict(x=x, x_tgt=x + 0.1 * torch.randn(x.shape, generator=gen), ctx_idx=ctx_idx, tgt_idx=tgt_idx)
    if cfg['inv_weight'] > 0:  # the second view of each image (inv_weight's partner)
        batch['x_p'] = x + torch.randn(x.shape, generator=gen)
    return batch


def run(overrides, world=1, rank=0, accum=1, steps=2, poison=False):
    """Train `steps` steps; return the global loss, the gradients AdamW saw and the final weights.
    poison: NaN target images in the second quarter of step 0's global batch (rank 1's shard on 2 ranks):
    rank 1's loss and every rank's all-reduced gradients are NaN, rank 0's loss is finite."""
    B = GLOBAL_BATCH // (world * accum)
    cfg = mj.validate(mj.configure(TINY + overrides + [f'--batch_size={B}', f'--gradient_accumulation_steps={accum}']))
    torch.manual_seed(cfg['seed'])
    model = mj.build_model(cfg).double()  # float64: the sums over ranks and micro-steps reorder roundings,
    # which in float32 came within 0.8x of the gradient tolerance below (an occasional failure)
    names = [n for n, _ in model.named_parameters()]
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = mj.make_optimizer(model, cfg, 'cpu')
    grads = []  # what the optimiser sees: the gradient after DDP's all-reduce and accumulation
    def record(opt, args, kwargs):  # (found_inf = 1: the fused kernel skips this update)
        if not float(getattr(opt, 'found_inf', 0)):
            grads.append({n: p.grad.clone() for n, p in zip(names, model.parameters())})
    optimizer.register_step_pre_hook(record)
    scaler = torch.amp.GradScaler(enabled=False)
    losses, skipped = [], []
    for step in range(steps):
        full = {k: v.double() if v.is_floating_point() else v for k, v in global_batch(cfg, step).items()}
        if poison and step == 0:
            full['x_tgt'][GLOBAL_BATCH // 4:GLOBAL_BATCH // 2] = float('nan')
        def get_batch(micro):
            j = micro * world + rank
            return {k: v[j * B:(j + 1) * B] for k, v in full.items()}
        loss, stats, _ = mj.train_step(model, optimizer, scaler, get_batch, accum, step, nullcontext(), cfg['grad_clip'])
        skipped.append(bool(stats['skipped']))
        if world > 1:  # each rank's loss uses its shard's prediction term: average them
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    model = model.module if world > 1 else model
    return dict(losses=losses, grads=grads, skipped=skipped, weights={n: p.detach().clone() for n, p in model.named_parameters()})


if __name__ == '__main__':
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    for name, (overrides, accum) in SCENARIOS.items():
        torch.save(run(overrides, world, rank, accum, poison=name == 'nan'), os.path.join(out_dir, f'{name}.rank{rank}.pt'))
    dist.destroy_process_group()
