"""
MedJEPA-3D: the same JEPA, for CT / MRI volumes and for medical video (ultrasound, endoscopy).

Everything that does not depend on the number of spatial axes comes from medjepa.py: the transformer
blocks, the predictor with its block-diagonal attention, the objective (JEPA.mask_loss), SIGReg, the
configurator, the optimiser, the training loop with its logs, checkpoints, DDP and resume. This file
adds only what is 3-D, after V-JEPA (Bardes et al. 2024, https://arxiv.org/abs/2404.08471):

    tubelets      a Conv3d patch embedding: a (pd, ph, pw) box of voxels -> one token. Volumes use
                  cubic or anisotropic boxes (8x8x8, or 4x8x8 for thick slices); video 2x16x16.
    positions     fixed sin-cos codes with the width split in three: depth (or time), row, column,
                  each counted on its own axis, so non-cubic grids (8x4x4) need nothing special.
    masks         V-JEPA's multi-block masks in 3-D: two mask sets per volume, short-range (8 small
                  blocks) and long-range (2 large ones); each block covers a spatial area fraction of
                  the (H, W) patch grid and a depth fraction < 1 of D (cuboids; video: all of T).
                  The context is the EXACT complement of the union of a set's blocks.
    data          (N, D, H, W, C) uint8 volumes memory-mapped from prepare.py; random crops and
                  flips as one affine resampling of the batch on the device.

Run it:
    python medjepa3d.py                                 # CPU demo on data/demo3d (~7.5 min on 2 cores)
    python medjepa3d.py --max_iters=30 --out_dir=out-x  # any global below can be overridden
    python medjepa3d.py --data_dir=data/msd_hippocampus --volume_size="(32,32,32)" --patch_size="(8,8,8)"
    python medjepa3d.py --data_dir=data/demovideo --out_dir=out-demovideo   # clips: `python prepare.py demovideo`
    torchrun --nproc_per_node=8 medjepa3d.py config/x.py
then evaluate the checkpoint (segmentation Dice against a random-init encoder, kNN / linear when labelled):
    python eval.py --ckpt=out-demo3d/ckpt.pt
docs/3d.md explains the choices.
"""

import functools
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import medjepa as mj

# -----------------------------------------------------------------------------
# default config values: a CPU-sized demo on data/demo3d (32^3 voxels) in about 7.5 minutes on 2 cores
# I/O
out_dir = 'out-demo3d'     # checkpoint, log.jsonl and eval results go here
data_dir = 'data/demo3d'   # a folder of volumes written by prepare.py (data/demo3d is generated if missing)
init_from = 'scratch'      # 'scratch' or 'resume' (continue from out_dir/ckpt.pt)
overwrite = False          # 'scratch' into an out_dir that holds a checkpoint: refused, or (True) its run deleted first
eval_interval = 200        # every this many steps: online kNN on val (labelled data sets), checkpoint
log_interval = 10          # every this many steps: print and log the loss terms and monitors
knn_train_size = 3000      # train volumes used as the kNN memory bank of the online monitor
seed = 0                   # everything random derives from this (data order, masks, init)
# data and augmentation
volume_size = (32, 32, 32) # (D, H, W) of the training crops in voxels; video: (T, H, W) frames
crop_scale = (0.4, 1.0)    # volume fraction of the random crops (resized to volume_size)
flip = True                # random left-right flips (the W axis)
intensity_jitter = 0.0     # brightness/contrast jitter strength (0 = off); context and targets get independent draws
video = False              # clips (N, T, H, W, C): blocks span all frames, no time crops; on if meta.json says "video": true
# model
patch_size = (4, 8, 8)     # tubelet (d, h, w); volume_size must be a multiple of it on every axis
n_layer = 4                # encoder depth
n_head = 3                 # encoder attention heads
n_embd = 96                # encoder width; a multiple of 6 (3-D sin-cos positions)
pred_n_layer = 2           # predictor depth
pred_n_embd = 48           # predictor width, a multiple of 6
pred_n_head = 3            # predictor heads
# objective: medjepa.JEPA.mask_loss once per mask set, SIGReg as in 2-D
sigreg_lambda = 0.05       # loss = (1 - lambda) * prediction + lambda * SIGReg
num_slices = 256           # SIGReg random 1-D projections per step (1024: no better on val, docs/design.md)
sigreg_on = 'pooled_std'   # SIGReg on per-volume context vectors, batch-standardised ('pooled_std'), raw ('pooled'), on
                           # every context token ('tokens'), or 'pooled_std+tokens' (plus 8 raw tokens per volume: on
                           # demo3d's val split no Dice gain with eval.py's 48-epoch head, linear probe lower; docs/design.md)
short_blocks = 8           # short-range mask set: blocks per volume (0 = no such set)
short_scale = (0.15, 0.15) # ... spatial area of each block, fraction of the (H, W) patch grid
long_blocks = 2            # long-range mask set: blocks per volume (0 = no such set)
long_scale = (0.7, 0.7)    # ... spatial area of each block
target_aspect = (0.75, 1.5)  # aspect ratio (h / w) range of the blocks
depth_scale = (0.5, 1.0)   # depth extent of each block, fraction of D (< 1 gives cuboids; video: always 1)
min_keep = 4               # fewest context tokens a mask set may leave
# optimisation
batch_size = 32            # volumes per micro-step per process
gradient_accumulation_steps = 1  # micro-steps per optimiser step in each process (global batch = batch_size x this x processes)
max_iters = 1000           # optimiser steps
learning_rate = 1e-3       # peak AdamW learning rate
min_lr = 1e-5              # learning rate at the end of the cosine decay
warmup_iters = 100         # linear warmup steps
weight_decay = 0.05        # AdamW decay on matrices only
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0            # clip the global gradient norm to this (0 disables)
max_bad_steps = 10         # steps with NaN/inf gradients are skipped; this many in a row stop the run
# system
device = 'auto'            # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'             # 'auto', 'float32', 'bfloat16' (autocast), 'float16' (autocast + GradScaler)
compile = False            # torch.compile the model
num_threads = 0            # CPU threads for torch (0: leave torch's default)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple))]
DEFAULTS = {k: globals()[k] for k in config_keys}
SPATIAL_DIMS = 3  # checkpoints record it: a 3-D checkpoint is never loaded into the 2-D model, nor the reverse
COMPILE_DYNAMIC = None  # mj.compile_model: the context length changes with each mask layout, so dynamic shapes
MODEL_KEYS = ('patch_size', 'n_embd', 'n_layer', 'n_head', 'pred_n_embd', 'pred_n_layer', 'pred_n_head',
              'sigreg_lambda', 'num_slices', 'sigreg_on', 'seed')


def validate(c):
    """The 3-D rules, then the ones shared with medjepa.py (medjepa.validate_shared). A data set whose
    meta.json says "video": true (prepare.py demovideo, video) is trained as video."""
    if not c['video'] and os.path.isfile(os.path.join(c['data_dir'], 'meta.json')):
        c = {**c, 'video': bool(mj.read_meta(c['data_dir']).get('video'))}
    need = mj.need
    mj.validate_shared(c)  # first: its range checks keep the rules below from dividing by zero
    grid = [v // p for v, p in zip(c['volume_size'], c['patch_size'])]
    need(all(p >= 1 and v % p == 0 for v, p in zip(c['volume_size'], c['patch_size'])),
         f"volume_size={c['volume_size']} is not a multiple of patch_size={c['patch_size']} on every axis")
    need(grid[1] >= 2 and grid[2] >= 2,
         f"the patch grid {tuple(grid)} needs at least 2 x 2 patches in (H, W) for block masks: smaller patch_size")
    need(c['n_embd'] % 6 == 0 and c['pred_n_embd'] % 6 == 0,
         f"n_embd={c['n_embd']} and pred_n_embd={c['pred_n_embd']} must be multiples of 6 (3-D sin-cos positions)")
    need(c['short_blocks'] >= 0 and c['long_blocks'] >= 0 and c['short_blocks'] + c['long_blocks'] >= 1,
         "short_blocks and long_blocks must be >= 0 and not both 0")
    for k in ('crop_scale', 'short_scale', 'long_scale', 'depth_scale'):
        lo, hi = c[k]
        need(0 < lo <= hi <= 1, f"{k}={c[k]} must satisfy 0 < low <= high <= 1")
    need(c['intensity_jitter'] >= 0, f"intensity_jitter={c['intensity_jitter']} must be >= 0")
    return c

# -----------------------------------------------------------------------------
# Model: medjepa's ViT, predictor and objective with a Conv3d tubelet embedding and 3-D positions


@functools.lru_cache(maxsize=16)
def sincos_3d(gd, gh, gw, dim):
    """Fixed 3-D sin-cos positions (gd*gh*gw, dim), depth-major like the tokens: a third of the
    channels encodes the depth (or time) index, a third the row, a third the column."""
    assert dim % 6 == 0, 'embedding width must be a multiple of 6 for 3-D sin-cos positions'
    d, h, w = torch.meshgrid(torch.arange(gd), torch.arange(gh), torch.arange(gw), indexing='ij')
    return torch.cat([mj.sincos_1d(a.flatten(), dim // 3) for a in (d, h, w)], 1).float()


class ViT3D(mj.ViT):
    """(B, C, D, H, W) -> (B, gd*gh*gw, n_embd) tokens; patch_size is the tubelet (pd, ph, pw)."""
    conv = nn.Conv3d
    positions = staticmethod(sincos_3d)


class Predictor3D(mj.Predictor):
    positions = staticmethod(sincos_3d)


class JEPA3D(mj.JEPA):
    """medjepa's JEPA with 3-D parts. A batch holds several mask sets for the same volumes (short- and
    long-range): the full-volume targets are computed once, then mask_loss runs once per set."""
    Encoder, Predictor = ViT3D, Predictor3D

    def forward(self, batch, step, reg_grad=None):
        h = self.targets(batch['x_tgt'])  # (B, N, D), shared by the mask sets
        reg_grad = reg_grad or [None] * len(batch['masks'])  # (exact gradient accumulation: mj.exact_sigreg_grads)
        outs = [self.mask_loss(batch['x'], batch['x_tgt'], ctx, tgt, step, h, g)
                for (ctx, tgt), g in zip(batch['masks'], reg_grad)]
        n = len(outs)
        loss = sum(loss for loss, _ in outs) / n
        stats = dict(pred=sum(s['pred'] for _, s in outs) / n, sigreg=sum(s['sigreg'] for _, s in outs) / n,
                     emb=outs[0][1]['emb'])
        return loss, stats

    def mask_sets(self, batch):  # (JEPA.sigreg_inputs and mj.estimate_flops go through it)
        return batch['masks']


def build_model(cfg, in_chans=1):
    return JEPA3D({**{k: cfg[k] for k in MODEL_KEYS}, 'objective': 'mask'}, in_chans)

# -----------------------------------------------------------------------------
# 3-D multi-block masks (V-JEPA), on a (gd, gh, gw) token grid.
#
# One mask set = `num` blocks of d x h x w tokens: h, w from a spatial area fraction ~ U(scale) of
# the (gh, gw) plane and an aspect ~ U(target_aspect) (medjepa.block_size; h < gh and w < gw, so a
# block never hides a whole slice), d = depth fraction ~ U(depth_scale) of gd (video: d = gd, every
# frame). Targets = the union of the blocks; context = everything else, exactly.
#
# Equal lengths without truncation: a batch is one tensor, so every volume must keep the same number
# of context tokens. Instead of cutting contexts to the shortest (I-JEPA, V-JEPA; medjepa.sample_masks
# keeps a random subset), one block layout is drawn per micro-batch and each volume sees it under its
# own random flips of the depth, row and column axes (and a row/column transpose on square planes):
# a bijection of the grid, so every volume hides exactly as many tokens, in blocks, and its context is
# the exact complement. Layouts differ between micro-batches, ranks and steps; flips keep placement
# symmetric, so the last slice is as likely to be hidden as the first.


def _blocks_3d(num, size, grid, gen):
    """(num, gd, gh, gw) bool: num boxes of `size` tokens, top-left-front uniform in [0, g - s] inclusive."""
    axes = [torch.arange(g) for g in grid]
    box = torch.ones(num, *grid, dtype=torch.bool)
    for a, (g, s) in enumerate(zip(grid, size)):
        start = torch.randint(0, g - s + 1, (num,), generator=gen).view(num, 1)
        inside = (axes[a][None] >= start) & (axes[a][None] < start + s)  # (num, g)
        box &= inside.view(num, *[g if i == a else 1 for i in range(3)])
    return box


def sample_masks_3d(B, grid, gen, num=8, scale=(0.15, 0.15), aspect=(0.75, 1.5), depth_scale=(0.5, 1.0),
                    min_keep=4, video=False, max_tries=20):
    """One mask set for B volumes -> ctx_idx (B, Nc), tgt_idx (B, 1, K) with Nc + K = gd*gh*gw."""
    gd, gh, gw = grid
    N = gd * gh * gw
    for _ in range(max_tries):
        h, w = mj.block_size(scale, aspect, gh, gw, gen, max(gh - 1, 1), max(gw - 1, 1))
        d = gd if video else min(gd, max(1, round(mj._uniform(*depth_scale, gen) * gd)))
        blocks = _blocks_3d(num, (d, h, w), grid, gen)
        if N - int(blocks.any(0).sum()) >= min_keep:
            break
    else:  # a tiny grid: one block leaves at least gd * (gh*gw - (gh-1)(gw-1)) >= 1 tokens
        blocks = blocks[:1]
    layout = blocks.any(0)  # (gd, gh, gw)
    tgt = torch.empty(B, gd, gh, gw, dtype=torch.bool)
    flips = torch.rand(B, 4, generator=gen) < 0.5
    for b in range(B):
        t = layout.flip([a for a in range(3) if flips[b, a]])
        tgt[b] = t.transpose(1, 2) if gh == gw and flips[b, 3] else t
    tgt = tgt.flatten(1)  # (B, N), the same count in every row
    K = int(layout.sum())
    tgt_idx = tgt.nonzero()[:, 1].view(B, 1, K)
    ctx_idx = (~tgt).nonzero()[:, 1].view(B, N - K)
    return ctx_idx, tgt_idx

# -----------------------------------------------------------------------------
# Data: (N, D, H, W, C) uint8 volumes (docs/data_format.md), normalised by medjepa.to_float


def random_crop_3d(x, size, scale, gen, flip=True, video=False):
    """Batched random crop + resize + left-right flip of (B, C, D, H, W) volumes, as one affine
    resampling: output voxel u in [-1, 1]^3 reads the input at  s * u + c  per axis (s = crop side,
    c = centre, sign of s on W = flip). Sides are (volume fraction)^(1/3); video keeps all frames."""
    B, dev = x.shape[0], x.device
    side = torch.empty(B).uniform_(scale[0], scale[1], generator=gen) ** (1 / (2 if video else 3))
    theta = torch.zeros(B, 3, 4)  # rows act on (x = W, y = H, z = D), affine_grid's order
    for row in range(3):
        s = torch.ones(B) if (video and row == 2) else side
        theta[:, row, row] = s
        theta[:, row, 3] = (torch.rand(B, generator=gen) * 2 - 1) * (1 - s)
    if flip:
        theta[:, 0, 0] *= torch.where(torch.rand(B, generator=gen) < 0.5, -1.0, 1.0)
    grid = F.affine_grid(theta.to(dev, non_blocking=True), (B, x.shape[1], *size), align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='reflection', align_corners=False)


def make_batch(cfg, volumes, mean, std, step, micro, device, rank=0):
    """One micro-batch: crops on the device and one mask per mask set, from seeds derived from the step."""
    gen = mj.batch_generator(cfg, step, micro, rank)
    x = mj.to_float(volumes, mean, std, device)  # (B, C, D, H, W)
    x = random_crop_3d(x, cfg['volume_size'], cfg['crop_scale'], gen, cfg['flip'], cfg['video'])
    grid = tuple(v // p for v, p in zip(cfg['volume_size'], cfg['patch_size']))
    masks = []
    for num, scale in ((cfg['short_blocks'], cfg['short_scale']), (cfg['long_blocks'], cfg['long_scale'])):
        if num > 0:
            ctx, tgt = sample_masks_3d(x.shape[0], grid, gen, num, scale, cfg['target_aspect'], cfg['depth_scale'],
                                       cfg['min_keep'], cfg['video'])
            masks.append((mj.to_device(ctx, device), mj.to_device(tgt, device)))
    jitter = lambda v: mj.color_jitter(v, gen, cfg['intensity_jitter'])
    return dict(x=jitter(x), x_tgt=jitter(x), masks=masks)


extract_features = mj.extract_features  # mean-pooled tokens; to_float and the ViT take volumes as they are
feature_health = mj.feature_health  # the val-feature monitors of the online evaluation

# -----------------------------------------------------------------------------
# Training: medjepa's loop, with this module's model, batches and config


def main(argv=None):
    return mj.main(argv, impl=sys.modules[__name__])


if __name__ == '__main__':
    mj.cli(mj.main, sys.modules[__name__])
