"""
MedJEPA: self-supervised JEPA pretraining for medical images, in one file.

A JEPA (Joint-Embedding Predictive Architecture) learns from unlabeled images by predicting the
*representations* of hidden parts of an image from the visible parts, instead of predicting pixels.
Predicting in latent space lets the encoder ignore unpredictable pixel noise and spend its capacity on
structure. The danger is *collapse*: an encoder that maps every image to the same vector predicts
itself perfectly. SIGReg (LeJEPA, Balestriero & LeCun 2025) prevents it, a statistical test of the
embeddings against an isotropic Gaussian, instead of the EMA teachers and heuristics of I-JEPA / DINO.

Run it:
    python medjepa.py                                  # CPU demo on data/demo (minutes)
    python medjepa.py config/demo_views.py             # LeJEPA's multi-view objective
    python medjepa.py --max_iters=50 --out_dir=out-x   # any global below can be overridden
    torchrun --nproc_per_node=8 medjepa.py config/x.py # data-parallel on 8 GPUs (or CPU/gloo)
then evaluate the checkpoint:
    python eval.py --ckpt=out-demo/ckpt.pt

The file reads top to bottom: config -> data -> model -> masks -> SIGReg -> objectives -> training.
The plumbing a reader may skip (config, data files, checkpoints, DDP, precision, MFU, monitors) is in
medjepa_utils.py. docs/reading_medjepa.md walks through this file.
"""

import functools
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

from medjepa_utils import (  # the plumbing (re-exported)
    advice, AllReduceSum, any_rank, barrier, checkpoint_dims, claim_out_dir, cli, compile_model, ConfigError,
    BadSteps, configure, DataError, describe_run, distributed, effective_rank, estimate_flops,
    evaluate_and_save, exact_sigreg_grads, extract_features, feature_health, fp32, global_mean, knn_predict,
    load_checkpoint, load_split, log_step, mean_cosine, measure_matmul_flops, need, open_data, open_log,
    parse_config, partners_per_image, precision, Prefetcher, read_meta, resolve_dtype, resume, retime_matmul_flops,
    safe_load, save_checkpoint, setup_distributed, stop_signals, to_device, to_float, validate, validate_shared,
    wrap_model)

# -----------------------------------------------------------------------------
# default config values: a CPU-sized demo that trains on data/demo (64 px) in minutes
# I/O
out_dir = 'out-demo'       # checkpoint, log.jsonl and eval results
data_dir = 'data/demo'     # a folder written by prepare.py (data/demo is made if missing)
init_from = 'scratch'      # 'scratch' or 'resume' (continue from out_dir/ckpt.pt)
overwrite = False          # True: a 'scratch' run may replace the run in out_dir (else: refused)
eval_interval = 200        # every this many steps: online kNN on val, checkpoint
log_interval = 10          # every this many steps: print and log losses and monitors
knn_train_size = 3000      # train images in the online kNN's bank
seed = 0                   # all randomness derives from it (data order, masks, init)
# data and augmentation
image_size = 64            # side of the (square) training crops, in pixels
crop_scale = (0.3, 1.0)    # random-resized-crop area range (I-JEPA's only augmentation)
color_jitter = 0.0         # contrast/saturation jitter and brightness shift (0 = off)
brightness = 0.4           # with color_jitter: brightness shift U(-b, b), in units of the data's std
gray_prob = 0.0            # probability of turning a view grayscale
rot90 = False              # also rotate crops by k * 90 degrees (images with no 'up': skin, slides)
# model
patch_size = 8             # ViT patch side; image_size must be a multiple of it
n_layer = 6                # encoder depth
n_head = 3                 # encoder attention heads
n_embd = 192               # encoder width (ViT-Tiny: 192x12, ViT-S: 384x12, ViT-B: 768x12)
pred_n_layer = 3           # predictor depth (objective 'mask')
pred_n_embd = 96           # predictor width: narrow on purpose, it is a bottleneck
pred_n_head = 3            # predictor heads
# objective
objective = 'mask'         # 'mask': masked latent prediction (I-JEPA style); 'views': LeJEPA multi-view
sigreg_lambda = 0.05       # the one knob: loss = (1 - lambda) * prediction + lambda * SIGReg
num_slices = 1024          # SIGReg random 1-D projections per step (1024 beat 256 on val: docs/sigreg.md)
sigreg_on = 'pooled_std'   # 'mask': SIGReg on pooled context vectors standardised over the batch
                           # (a decorrelation penalty), raw ('pooled': LeJEPA's test), all 'tokens', or
                           # 'pooled_std+tokens': the first plus SIGREG_TOKENS raw tokens per image
num_targets = 2            # target blocks per image (I-JEPA: 4; 2 beat 4 on val, docs/design.md)
target_scale = (0.15, 0.2) # area of each target block, as a fraction of the patch grid
target_aspect = (0.75, 1.5)  # aspect ratio range of the target blocks
context_scale = (0.85, 1.0)  # area of the context block before the targets are cut out of it
context_keep = 0.33        # every image sees exactly this fraction of the grid as context
min_keep = 10              # ... and at least this many patches
n_global_views = 2         # 'views' objective: full-size crops per image (LeJEPA: 2); the invariance pulls to their mean
n_local_views = 4          # 'views' objective: small crops per image (besides the global ones)
local_size = 32            # 'views' objective: side of the local crops in pixels
local_scale = (0.05, 0.3)  # 'views' objective: area range of the local crops
proj_dim = 64              # 'views' objective: projector output width (SIGReg acts on it)
view_keep = 1.0            # 'views' objective: fraction of each global view's patches the encoder sees
views_from = 'image'       # 'group': the second view is cut from another photo of the image's group ('views': global
                           # views 2, 3, ..; 'mask': inv_weight's partner), else from the image itself
inv_weight = 0.1           # 'mask' objective: weight of the pooled invariance to a second view (0: off; chosen on
                           # brainlobes' val, docs/design.md); 'views' ignores it (it has its own invariance)
# optimisation
batch_size = 64            # images per micro-step per process
gradient_accumulation_steps = 1  # micro-steps per optimiser step, per process
max_iters = 600            # optimiser steps
learning_rate = 2.5e-4     # peak AdamW learning rate ('mask': 2.5e-4 beat 1e-3 on val, docs/design.md)
min_lr = 1e-5              # learning rate at the end of the cosine decay
warmup_iters = 60          # linear warmup steps
weight_decay = 0.05        # AdamW decay, on matrices only
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0            # clip the global gradient norm to this (0 disables)
max_bad_steps = 10         # NaN/inf steps are skipped; this many in a row stop the run
# system
device = 'auto'            # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'             # 'auto', 'float32', 'bfloat16' (autocast), 'float16' (+ GradScaler)
compile = False            # torch.compile the model (pays on GPUs)
num_threads = 0            # CPU threads for torch (0: torch's default)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple))]
DEFAULTS = {k: globals()[k] for k in config_keys}

# -----------------------------------------------------------------------------
# Data: uint8 arrays (N, H, W, C) from prepare.py, memory-mapped (medjepa_utils.open_data); a batch
# goes to the device as uint8 (to_float) and is augmented there, as a whole.


def batch_indices(step, micro, n, batch, world, rank, accum, seed):
    """The images of one micro-batch, from the step alone (no sampler state to save). The stream is an
    endless concatenation of seeded permutations of the data; each step takes the next world * accum *
    batch positions, each (rank, micro-step) its own slice: no overlap, no skip, the same order on resume.
    """
    start = ((step * accum + micro) * world + rank) * batch
    pos = np.arange(start, start + batch)
    epochs, offsets = pos // n, pos % n
    out = np.empty(batch, dtype=np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n)
        out[epochs == e] = perm[offsets[epochs == e]]
    return out


def other_photos(groups, by_group, idx, rng, k=1):
    """For each image idx[i], k other images of its group (views_from='group'): other photos of the same
    lesion, patient or subject, drawn without replacement while the group has k others (then they repeat
    in the same order). The global views of a 'views' step then differ in all that the photos do not
    share (pose, light, hair, camera noise), so the encoder cannot match them by those (MICLe, Azizi et
    al. 2021). An image alone in its group is its own partner: crops of one photo. groups: (N,) ids;
    by_group: np.argsort(groups, kind='stable'), each group's members one slice of it. -> (k, B) indices."""
    B, rows = len(idx), np.arange(len(idx))
    g = groups[by_group]  # the ids in group order
    first = np.searchsorted(g, groups[idx], 'left')  # (B,) where each image's group starts
    count = np.searchsorted(g, groups[idx], 'right') - first
    pool = by_group[np.minimum(first[:, None] + np.arange(count.max()), len(by_group) - 1)]  # (B, C) members
    me = (pool == idx[:, None]).argmax(1)
    pool[rows, me], pool[rows, count - 1] = pool[rows, count - 1], idx  # each image to the end of its members
    out = np.zeros((k, B), dtype=np.int64)
    for j in range(k):  # a partial Fisher-Yates shuffle: draw from the n not yet drawn, move the draw behind them
        n = count - 1 - j
        r = (rng.random(B) * np.maximum(n, 1)).astype(np.int64)
        again = np.where(count > 1, out[np.clip(j - count + 1, 0, None), rows], idx)  # all drawn: repeat
        out[j] = np.where(n > 0, pool[rows, r], again)
        pool[rows, r], pool[rows, np.maximum(n - 1, 0)] = pool[rows, np.maximum(n - 1, 0)], pool[rows, r]
    return out


def random_resized_crop(x, size, scale, gen, flip=True, ratio=(3 / 4, 4 / 3), rot90=False):
    """Batched random-resized crop + horizontal flip (+ k * 90 degree turns) as one affine resampling:
    output pixel u in [-1, 1]^2 reads the input at  S R u + c  (S = diag(w, h) the crop's width and height,
    sign of w = flip; R the turn, which maps [-1, 1]^2 onto itself; c the centre). One grid_sample per batch.
    """
    B = x.shape[0]
    dev = x.device
    area = torch.empty(B).uniform_(scale[0], scale[1], generator=gen)
    logr = torch.empty(B).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    w = (area * logr.exp()).sqrt().clamp(max=1.0)  # crop width, fraction of the image
    h = (area / logr.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(B, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(B, generator=gen) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(B, generator=gen) < 0.5, -1.0, 1.0) if flip else torch.ones(B)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    if rot90:  # S R with R = [[cos, -sin], [sin, cos]] at a random multiple of 90 degrees (exact 0/+-1)
        a = torch.randint(0, 4, (B,), generator=gen) * (math.pi / 2)
        cos, sin = a.cos().round(), a.sin().round()
        R = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)  # (B, 2, 2)
        theta[:, :, :2] = theta[:, :, :2] @ R
    grid = F.affine_grid(theta.to(dev, non_blocking=True), (B, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='reflection', align_corners=False)


def color_jitter(x, gen, strength, gray_prob=0.0, brightness=None):
    """Per-image contrast, brightness and saturation jitter, and random grayscale, on normalised images
    or volumes. Without it an encoder may tell images apart by skin tone and lesion darkness alone.
    Contrast and saturation factors are U(1 - strength, 1 + strength); the brightness shift is
    U(-brightness, brightness) in units of the data's std (default strength / 2). A shift must span the
    nuisance it hides: the demo's skin tones lie ~2.5 std apart, so a shift of +-0.4 leaves them legible."""
    if strength <= 0 and gray_prob <= 0:
        return x
    b = strength / 2 if brightness is None else brightness
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per image
    rand = lambda: torch.rand(shape, generator=gen).to(x.device, non_blocking=True)
    factor = lambda: 1 + (rand() * 2 - 1) * strength
    x = x * factor() + (rand() * 2 - 1) * b  # contrast, brightness
    gray = x.mean(1, keepdim=True)
    keep = (rand() >= gray_prob).float()
    return gray + (x - gray) * factor() * keep  # saturation; 0 = grayscale


# -----------------------------------------------------------------------------
# Model: a plain ViT encoder, a narrow predictor, a projector. Parameter names follow the usual ViT
# layout (patch_embed.proj, blocks.i.attn.qkv, blocks.i.mlp.fc1, norm, ...).


def sincos_1d(pos, d):
    """(P,) integer positions -> (P, d) codes: d/2 sines and d/2 cosines at geometric frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d // 2))
    ang = pos.double()[:, None] * omega[None]
    return torch.cat([ang.sin(), ang.cos()], 1)


@functools.lru_cache(maxsize=16)
def sincos_2d(gh, gw, dim):
    """Fixed 2-D sin-cos positions (gh*gw, dim): half the channels encode the row, half the column."""
    assert dim % 4 == 0, 'embedding width must be a multiple of 4 for 2-D sin-cos positions'
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing='ij')
    return torch.cat([sincos_1d(rows.flatten(), dim // 2), sincos_1d(cols.flatten(), dim // 2)], 1).float()


class Attention(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, D // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hd)
        if q.is_cuda or q.dtype == torch.float32:  # flash / memory-efficient kernels
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:  # bf16 on a CPU: SDPA's backward is ~3x slower than matmuls there (docs/scaling.md)
            att = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, nh, T, T)
            if attn_mask is not None:  # True = may attend, as in SDPA
                att = att + torch.where(attn_mask, 0.0, float('-inf')).to(att.dtype)
            y = att.softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""
    def __init__(self, dim, n_head, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, n_head)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


def init_weights(module):
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight.view(m.weight.shape[0], -1), std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ViT(nn.Module):
    """Patchify -> add fixed positions -> keep the chosen patches -> transformer -> final norm.

    forward(x, keep) with keep = (B, K) patch indices runs the encoder on those patches only:
    positions are added *before* gathering, so each kept patch still knows where it came from.
    The only 2-D parts are `conv` and `positions`: medjepa3d.py swaps in Conv3d and 3-D sin-cos.
    """
    conv = nn.Conv2d  # patch embedding: kernel = stride = patch_size
    positions = staticmethod(sincos_2d)  # (*grid, dim) -> (prod(grid), dim)

    def __init__(self, in_chans, patch_size, n_embd, n_layer, n_head):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = self.conv(in_chans, n_embd, patch_size, patch_size)
        self.blocks = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.norm = nn.LayerNorm(n_embd, eps=1e-6)
        init_weights(self)
        # as a Linear layer on the flattened patch (MAE): content enters at the scale of the positions
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def pos_embed(self, grid, device):
        return self.positions(*grid, self.norm.normalized_shape[0]).to(device, non_blocking=True)

    def grid(self, x):
        """The patch grid of an input batch: (gh, gw), or (gd, gh, gw) for volumes."""
        return tuple(s // k for s, k in zip(x.shape[2:], self.patch_embed.proj.kernel_size))

    def forward(self, x, keep=None):
        x = self.patch_embed.proj(x)  # (B, D, gh, gw) or (B, D, gd, gh, gw)
        grid = x.shape[2:]
        x = x.flatten(2).transpose(1, 2) + self.pos_embed(grid, x.device)  # (B, N, D)
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Predictor(nn.Module):
    """Fills in the target blocks from the context: all blocks of all images in ONE transformer pass.

    Sequence = [context (Nc) | mask tokens of block 1 (K) | ... | block M (K)]. The attention mask lets
    every token read the context and mask tokens also their own block, never another block: the M
    predictions stay independent, as if run one by one (four passes took ~1.9x the time of one).
    """
    positions = staticmethod(sincos_2d)  # medjepa3d.py: sincos_3d

    def __init__(self, enc_dim, dim, n_layer, n_head):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.blocks = nn.ModuleList([Block(dim, n_head) for _ in range(n_layer)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, enc_dim)
        init_weights(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, ctx, ctx_idx, tgt_idx, grid):
        B, M, K = tgt_idx.shape
        Nc = ctx_idx.shape[1]
        pos = self.positions(*grid, self.mask_token.shape[0]).to(ctx.device, non_blocking=True)  # (N, dim)
        x = self.embed(ctx) + pos[ctx_idx]  # (B, Nc, dim)
        t = self.mask_token + pos[tgt_idx.view(B, M * K)]  # (B, M*K, dim)
        x = torch.cat([x, t], 1)
        block_id = torch.cat([torch.full((Nc,), -1), torch.arange(M).repeat_interleave(K)])
        block_id = block_id.to(ctx.device, non_blocking=True)  # -1: context, m: a mask token of block m
        allowed = (block_id[None, :] == -1) | (block_id[:, None] == block_id[None, :])  # (L, L) query x key
        for block in self.blocks:
            x = block(x, allowed)
        return self.proj(self.norm(x[:, Nc:]))  # (B, M*K, enc_dim)


class Projector(nn.Module):
    """LeJEPA's small MLP head (with BatchNorm) for the 'views' objective; SIGReg acts on its output."""
    def __init__(self, dim, hidden, out):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                                 nn.Linear(hidden, out))

    def forward(self, x):
        return self.net(x)

# -----------------------------------------------------------------------------
# Multi-block masks (I-JEPA) for a whole batch on a (gh, gw) patch grid (docs/masking.md).
# One target block size (h, w) per batch (scale ~ U(target_scale), aspect ~ U(target_aspect)); per image
# M target blocks and a context block, corners uniform in [0, gh - h] INCLUSIVE; context = context block
# minus the targets. Every image keeps L context patches, fixed by the grid (not by the batch's shortest
# context), a RANDOM subset of its visible ones (not the first: they are the top of the image).


def _uniform(lo, hi, gen):
    return lo + (hi - lo) * torch.rand((), generator=gen).item()


def _blocks(B, M, h, w, gh, gw, gen):
    """(B, M, gh, gw) bool: M axis-aligned h x w blocks per image at uniform positions."""
    top = torch.randint(0, gh - h + 1, (B, M, 1, 1), generator=gen)
    left = torch.randint(0, gw - w + 1, (B, M, 1, 1), generator=gen)
    r = torch.arange(gh).view(1, 1, gh, 1)
    c = torch.arange(gw).view(1, 1, 1, gw)
    return (r >= top) & (r < top + h) & (c >= left) & (c < left + w)


def block_size(scale, aspect, gh, gw, gen, max_h=None, max_w=None):
    s, ar = _uniform(*scale, gen), _uniform(*aspect, gen)
    h = round(math.sqrt(s * gh * gw * ar))
    w = round(math.sqrt(s * gh * gw / ar))
    return min(max(h, 1), max_h or gh), min(max(w, 1), max_w or gw)


MASK_KEYS = ('num_targets', 'target_scale', 'target_aspect', 'context_scale', 'context_keep', 'min_keep')


def sample_masks(B, grid, gen, *, num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                 context_scale=(0.85, 1.0), context_keep=0.33, min_keep=10, max_tries=20):
    """Return ctx_idx (B, L) and tgt_idx (B, M, K) patch indices (row-major on the grid), where
    L = max(context_keep * gh * gw, min_keep) whatever B is (less only where the grid cannot give it)."""
    gh, gw = grid
    N, M = gh * gw, num_targets
    # targets never span a whole side, so one block can never hide the entire image
    h, w = block_size(target_scale, target_aspect, gh, gw, gen, max(gh - 1, 1), max(gw - 1, 1))
    ch, cw = block_size(context_scale, (1.0, 1.0), gh, gw, gen)
    L = max(1, min(max(round(context_keep * N), min_keep), N - h * w))  # N - h*w: a tiny grid's best (>= 1)
    tgt = torch.zeros(B, M, gh, gw, dtype=torch.bool)
    ctx = torch.zeros(B, gh, gw, dtype=torch.bool)
    todo = torch.arange(B)
    for _ in range(max_tries):
        t = _blocks(len(todo), M, h, w, gh, gw, gen)
        c = _blocks(len(todo), 1, ch, cw, gh, gw, gen)[:, 0] & ~t.any(1)
        tgt[todo], ctx[todo] = t, c
        todo = todo[c.flatten(1).sum(1) < L]
        if len(todo) == 0:
            break
    for i in todo.tolist():  # bounded fallback for images that never reached L
        ctx[i] = ~tgt[i].any(0)
        if ctx[i].sum() < L:
            tgt[i, 1:] = tgt[i, :1]  # all M predictions aim at one block: its complement is large
            ctx[i] = ~tgt[i, 0]
    tgt_idx = tgt.flatten(2).nonzero()[:, 2].view(B, M, h * w)
    ctx = ctx.flatten(1)  # (B, N)
    score = torch.rand(B, N, generator=gen) + (~ctx).float() * 2  # visible patches first, in random order
    ctx_idx = score.argsort(1)[:, :L].sort(1).values
    return ctx_idx, tgt_idx

# -----------------------------------------------------------------------------
# SIGReg: Sketched Isotropic Gaussian Regularisation (LeJEPA) with the Epps-Pulley test
# (docs/sigreg.md): z ~ N(0, I) iff every 1-D projection a.z is N(0, 1) (Cramer-Wold), and
# a 1-D law is N(0, 1) iff its characteristic function is exp(-t^2/2). Per step: M random unit
# directions a_m (seeded by the step: the same on every rank), projections x_nm = a_m . z_n, and
#   EP_m = N * integral [ (c_m(t) - exp(-t^2/2))^2 + s_m(t)^2 ] exp(-t^2/2) dt,   SIGReg = mean_m EP_m
#   c_m(t) = mean_n cos(t x_nm), s_m(t) = mean_n sin(t x_nm); trapezoid rule, 17 knots on [0, 3], doubled.
# A Gaussian batch scores ~1.06 per slice, a collapsed one ~0.40 * N. Under DDP, sums over ranks through
# an autograd-aware all-reduce (AllReduceSum) give every rank the global statistic and its gradient.


SIGREG_TOKENS = 8  # sigreg_on='pooled_std+tokens': context tokens per image that the token term sees
_EP_T = torch.linspace(0, 3, 17, dtype=torch.float64)
_EP_PHI = torch.exp(-_EP_T ** 2 / 2)  # the N(0, 1) characteristic function at the knots
_EP_W = torch.full((17,), 2 * 3 / 16, dtype=torch.float64)
_EP_W[0] = _EP_W[-1] = 3 / 16  # trapezoid on [0, 3], doubled for [-3, 0]
_EP_W = _EP_W * _EP_PHI  # times the Gaussian weighting exp(-t^2/2)


def standardise(z, eps=1e-6, local=False):
    """(N, K) -> (N, K): each dimension to zero mean, unit variance over the global batch (BatchNorm
    without affine). sigreg_on='pooled_std' scores SIGReg on this: blind to the mean and scale, it then
    acts as a decorrelation penalty, not as LeJEPA's Gaussian test (docs/sigreg.md)."""
    z, mean = fp32(z), (lambda t: t) if local else global_mean
    mu = mean(z.mean(0))  # (K,)
    var = mean((z - mu).pow(2).mean(0))  # (K,) biased, as BatchNorm's
    return (z - mu) / (var + eps).sqrt()


def sigreg(z, step, num_slices=256, seed=0, local=False):
    """SIGReg of embeddings z (N, K) -> scalar. Same directions on every rank for a given step.
    local=True: this rank's z alone (monitors that only rank 0 computes)."""
    with torch.autocast(z.device.type, enabled=False):  # cos(t x) and the N-fold sum need fp32
        return _sigreg(fp32(z), step, num_slices, seed, local)


def _sigreg(z, step, num_slices, seed, local=False):
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    A = torch.randn(z.shape[1], num_slices, generator=gen, dtype=torch.float64).to(z, non_blocking=True)
    A = A / A.norm(dim=0, keepdim=True)  # (K, M) unit directions
    xt = (z @ A)[..., None] * _EP_T.to(z, non_blocking=True)  # (N, M, T)
    # sums and counts over ranks, not means of per-rank means: ranks may hold different numbers of
    # rows (sigreg_on='tokens' with 3-D contexts of varying length)
    c, s, n = xt.cos().sum(0), xt.sin().sum(0), torch.tensor(float(len(z)), dtype=z.dtype, device=z.device)
    if distributed() and not local:
        c, s = AllReduceSum.apply(c), AllReduceSum.apply(s)
        dist.all_reduce(n)  # (a count: no gradient)
    c, s = c / n, s / n  # (M, T) empirical characteristic function of the global batch: real, imaginary
    ep = ((c - _EP_PHI.to(z, non_blocking=True)) ** 2 + s ** 2) @ _EP_W.to(z, non_blocking=True)  # (M,)
    return n * ep.mean()

# -----------------------------------------------------------------------------
# The objectives. Both return (loss, stats) from one forward() so that DDP sees every call.


class JEPA(nn.Module):
    Encoder, Predictor = ViT, Predictor  # medjepa3d.py: their 3-D subclasses

    def __init__(self, cfg, in_chans=3):
        super().__init__()
        self.cfg = cfg
        self.encoder = self.Encoder(in_chans, cfg['patch_size'], cfg['n_embd'], cfg['n_layer'], cfg['n_head'])
        if cfg['objective'] == 'mask':
            self.predictor = self.Predictor(cfg['n_embd'], cfg['pred_n_embd'], cfg['pred_n_layer'],
                                            cfg['pred_n_head'])
        else:
            self.projector = Projector(cfg['n_embd'], 4 * cfg['proj_dim'], cfg['proj_dim'])

    def forward(self, batch, step, reg_grad=None):
        if self.cfg['objective'] == 'mask':
            return self.mask_loss(batch['x'], batch['x_tgt'], batch['ctx_idx'], batch['tgt_idx'], step,
                                  reg_grad=reg_grad[0] if reg_grad else None, x_p=batch.get('x_p'),
                                  inv_grad=reg_grad[1] if reg_grad and len(reg_grad) > 1 else None)
        return self.views_loss(batch['globals'], batch['locals'], step, batch.get('keep'))

    def mask_sets(self, batch):  # the (ctx_idx, tgt_idx) pairs of a batch: one here, several in 3-D
        return [(batch['ctx_idx'], batch['tgt_idx'])]

    def sigreg_inputs(self, batch):
        """The inputs of the whole-batch terms (exact_sigreg_grads): sigreg_input of each mask set, then,
        with a second view (inv_weight > 0), pooled_invariance's two pooled vectors."""
        zs = [self.encoder(batch['x'], ctx) for ctx, _ in self.mask_sets(batch)]
        out = [self.sigreg_input(z) for z in zs]
        return out if 'x_p' not in batch else out + [self.pooled_context(zs[0]), self.targets(batch['x_p']).mean(1)]

    def sigreg_input(self, z):
        """What SIGReg scores, from the context tokens z (B, Nc, D): one pooled vector per image (B, D),
        every token (B*Nc, D) with sigreg_on='tokens', or with 'pooled_std+tokens' (B, 1 + S, D): the
        pooled vector, then S = SIGREG_TOKENS context tokens evenly spaced through the context."""
        on = self.cfg['sigreg_on']
        if on == 'pooled_std+tokens':
            n = min(SIGREG_TOKENS, z.shape[1])
            pick = torch.linspace(0, z.shape[1] - 1, n, device=z.device).round().long()
            return torch.cat([z.mean(1, keepdim=True), z[:, pick]], 1)
        return z.reshape(-1, z.shape[-1]) if on == 'tokens' else z.mean(1)

    def sigreg_loss(self, reg_in, step, local=False):
        """SIGReg over the global batch of sigreg_input ('mask'; standardised first for 'pooled_std')
        or of the projector's output ('views'). 'pooled_std+tokens' adds the two SIGRegs: standardised
        pooled vectors, and the raw tokens (their own slice directions), whose mean and scale count."""
        c, on = self.cfg, self.cfg['sigreg_on']
        if c['objective'] == 'mask' and on == 'pooled_std+tokens' and reg_in.dim() == 3:  # (B, 1 + S, D)
            tokens = reg_in[:, 1:].reshape(-1, reg_in.shape[-1])  # (B*S, D)
            return (sigreg(standardise(reg_in[:, 0], local=local), step, c['num_slices'], c['seed'], local)
                    + sigreg(tokens, step, c['num_slices'], c['seed'] + 1, local))
        std = on in ('pooled_std', 'pooled_std+tokens') and c['objective'] == 'mask'  # (the val monitor: pooled)
        reg_in = standardise(reg_in, local=local) if std else reg_in
        return sigreg(reg_in, step, c['num_slices'], c['seed'], local)

    @torch.no_grad()
    def sigreg_probe(self, feats):
        """What SIGReg tests, from frozen pooled features (N, D) (the val monitor): the projector's output
        ('views', BatchNorm in eval mode), the pooled vector, or None ('tokens')."""
        if self.cfg['objective'] == 'views':
            was = self.projector.training
            out = self.projector.eval()(feats)
            self.projector.train(was)
            return out
        return None if self.cfg['sigreg_on'] == 'tokens' else feats  # (N, D): the pooled vectors, raw

    @torch.no_grad()
    def targets(self, x_tgt):
        """Targets: the same encoder on the full image, layer-normed, no gradient. (B, N, D)"""
        h = self.encoder(x_tgt)
        return F.layer_norm(h, h.shape[-1:])

    def mask_loss(self, x, x_tgt, ctx_idx, tgt_idx, step, h=None, reg_grad=None, x_p=None, inv_grad=None):
        """MedJEPA objective: predict the (stop-gradient, layer-normed) full-image representation of each
        target block from the context, plus SIGReg against collapse. No EMA teacher. h: self.targets(x_tgt)
        if the caller has it (3-D: several mask sets). reg_grad: SIGReg's gradient w.r.t. sigreg_input on
        the whole accumulated batch (exact_sigreg_grads); the term is then <sigreg_input, reg_grad>.
        x_p: a second view of each image (inv_weight > 0), whose pooled targets the pooled context should
        follow (pooled_invariance); inv_grad: that term's gradient w.r.t. pooled_context(z) on the whole
        accumulated batch, as reg_grad."""
        c, lam = self.cfg, self.cfg['sigreg_lambda']
        B, M, K = tgt_idx.shape
        grid = self.encoder.grid(x)
        h = self.targets(x_tgt) if h is None else h  # (B, N, D); x_tgt = x up to photometric jitter
        with torch.no_grad():
            target = h.gather(1, tgt_idx.view(B, M * K, 1).expand(-1, -1, h.shape[-1]))  # (B, M*K, D)
        z = self.encoder(x, ctx_idx)  # (B, Nc, D) context tokens only
        pred = self.predictor(z, ctx_idx, tgt_idx, grid)  # (B, M*K, D)
        pred_loss = F.mse_loss(fp32(pred), fp32(target))
        inv = None
        if x_p is not None and reg_grad is None:  # (inv_weight > 0)
            inv = self.pooled_invariance(self.pooled_context(z), self.targets(x_p).mean(1))
        task = pred_loss if inv is None else pred_loss + c['inv_weight'] * inv
        pooled, reg_in = z.mean(1), self.sigreg_input(z)  # (B, D) one vector per image; (B or B*Nc, D)
        if reg_grad is None:
            reg = self.sigreg_loss(reg_in, step)
            loss = (1 - lam) * task + lam * reg
        else:  # the whole batch's terms, from their gradients (their values: exact_sigreg_grads)
            reg = torch.full((), math.nan, device=x.device)
            loss = (1 - lam) * task + (fp32(reg_in) * reg_grad).sum()
            if inv_grad is not None:
                loss = loss + (fp32(self.pooled_context(z)) * inv_grad).sum()
        stats = dict(pred=pred_loss.detach(), sigreg=reg.detach(), emb=pooled.detach())
        return loss, stats if inv is None else dict(stats, inv=inv.detach())

    @staticmethod
    def pooled_context(z):  # (B, Nc, D) context tokens -> (B, D): layer-normed as the targets, mean-pooled
        return F.layer_norm(z, z.shape[-1:]).mean(1)

    @staticmethod
    def pooled_invariance(a, p):
        """inv_weight's term. a: (B, D) pooled_context of the context tokens; p: (B, D) the mean-pooled
        targets of a second view of each image (layer-normed, no gradient). Each dimension
        standardised over the global batch, then the mean squared difference: 2 (1 - correlation) per
        dimension, averaged. Standardised, because a bare squared distance also falls when every image
        shrinks towards the batch mean, which the default SIGReg (batch-standardised) cannot see. Beside
        SIGReg's decorrelation it makes a Barlow-Twins-like pair: with views_from='group' the second view
        is another photo of the lesion, so what the photos share (the lesion) is kept in the pooled
        vector the probes read, and what they do not (skin, light, camera) is not rewarded."""
        return F.mse_loss(standardise(a), standardise(p).detach())  # (standardise: in float32)

    def views_loss(self, g, l, step, keep=None):
        """LeJEPA objective: each view's embedding should match the mean of the global views', and each
        view's embeddings be N(0, I) (SIGReg). g: (Vg, B, C, S, S) global crops, l: (Vl, B, C, s, s);
        keep: (Vg * B, K) the patches each global view's encoder sees (view_keep < 1), or None: all."""
        c, lam = self.cfg, self.cfg['sigreg_lambda']
        Vg, B = g.shape[:2]
        feats = [self.encoder(g.flatten(0, 1), keep).mean(1)]  # (Vg*B, D)
        if l.shape[0] > 0:
            feats.append(self.encoder(l.flatten(0, 1)).mean(1))
        emb = torch.cat(feats)
        z = fp32(self.projector(emb)).view(Vg + l.shape[0], B, -1)  # (V, B, K)
        mu = z[:Vg].mean(0)  # (B, K) centre: the global views only
        pred_loss = (z - mu).pow(2).mean()
        reg = torch.stack([sigreg(zv, step, c['num_slices'], c['seed']) for zv in z]).mean()
        loss = (1 - lam) * pred_loss + lam * reg
        return loss, dict(pred=pred_loss.detach(), sigreg=reg.detach(), emb=emb[:B].detach())

SPATIAL_DIMS = 2  # images; checkpoints record it, so a 3-D one is never loaded into this model
COMPILE_DYNAMIC = False  # compile_model: one static graph per shape
MODEL_KEYS = ('patch_size', 'n_embd', 'n_layer', 'n_head', 'pred_n_embd', 'pred_n_layer', 'pred_n_head',
              'objective', 'proj_dim', 'sigreg_lambda', 'num_slices', 'sigreg_on', 'seed', 'inv_weight')


def build_model(cfg, in_chans=3):
    cfg = {'inv_weight': 0.0, **cfg}  # (a checkpoint from before inv_weight was trained without it)
    return JEPA({k: cfg[k] for k in MODEL_KEYS}, in_chans)

# -----------------------------------------------------------------------------
# Batches: every random number of a micro-batch comes from a generator seeded by (seed, step, micro, rank)


def batch_generator(cfg, step, micro, rank):
    """One micro-batch's generator: resuming redraws the same batches; ranks and micro-steps differ."""
    seed = np.random.SeedSequence([cfg['seed'], step, micro, rank]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))


def make_batch(cfg, images, mean, std, step, micro, device, rank=0, partners=None):
    """Augment one micro-batch on the device and draw its masks, from seeds derived from the step.
    partners: (n_global_views - 1, B, ...) the images global views 2, 3, .. are cropped from ('views'), or
    (1, B, ...) the images of inv_weight's second view ('mask'); default: the images themselves."""
    gen = batch_generator(cfg, step, micro, rank)
    x = to_float(images, mean, std, device)
    jitter = lambda v: color_jitter(v, gen, cfg['color_jitter'], cfg['gray_prob'], cfg['brightness'])
    if cfg['objective'] == 'mask':
        x0, x = x, random_resized_crop(x, cfg['image_size'], cfg['crop_scale'], gen, rot90=cfg['rot90'])
        grid = (cfg['image_size'] // cfg['patch_size'],) * 2
        ctx_idx, tgt_idx = sample_masks(x.shape[0], grid, gen, **{k: cfg[k] for k in MASK_KEYS})
        out = dict(x=jitter(x), x_tgt=jitter(x), ctx_idx=to_device(ctx_idx, device),
                   tgt_idx=to_device(tgt_idx, device))
        if cfg['inv_weight'] > 0:  # the second view: its own crop of a partner photo, or of the image
            x_p = x0 if partners is None else to_float(partners[0], mean, std, device)
            out['x_p'] = jitter(random_resized_crop(x_p, cfg['image_size'], cfg['crop_scale'], gen,
                                                    rot90=cfg['rot90']))
        return out
    crop = lambda v, size, scale: jitter(random_resized_crop(v, size, scale, gen, rot90=cfg['rot90']))
    Vg = cfg['n_global_views']
    sources = [x] * Vg if partners is None else [x] + [to_float(p, mean, std, device) for p in partners]
    g = torch.stack([crop(v, cfg['image_size'], cfg['crop_scale']) for v in sources])  # (Vg, B, C, S, S)
    loc = [crop(x, cfg['local_size'], cfg['local_scale'])
           for _ in range(cfg['n_local_views'])]
    loc = torch.stack(loc) if loc else x.new_zeros(0, *x.shape[:2], cfg['local_size'], cfg['local_size'])
    if cfg['view_keep'] == 1:
        return dict(globals=g, locals=loc)
    # token dropping: each global view keeps its own random subset of its patches (positions stay theirs)
    n = (cfg['image_size'] // cfg['patch_size']) ** 2
    keep = torch.rand(Vg * x.shape[0], n, generator=gen).argsort(1)[:, :max(1, round(cfg['view_keep'] * n))]
    return dict(globals=g, locals=loc, keep=to_device(keep, device))  # keep: (Vg * B, K) patch indices

# -----------------------------------------------------------------------------
# Training


def lr_at(it, c):
    """Linear warmup, then cosine decay from learning_rate to min_lr at max_iters."""
    if it < c['warmup_iters']:
        return c['learning_rate'] * (it + 1) / c['warmup_iters']
    frac = min(1.0, (it - c['warmup_iters']) / max(1, c['max_iters'] - c['warmup_iters']))
    return c['min_lr'] + 0.5 * (1 + math.cos(math.pi * frac)) * (c['learning_rate'] - c['min_lr'])


def make_optimizer(model, cfg, dev):
    """AdamW, weight decay on matrices only; fused (one kernel for all tensors: ~2x faster on a CPU)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases, norms, mask token
    fused = dev.startswith('cuda') or (dev == 'cpu' and torch.__version__ >= '2.4')
    return torch.optim.AdamW([{'params': decay, 'weight_decay': cfg['weight_decay']},
                              {'params': no_decay, 'weight_decay': 0.0}],
                             lr=cfg['learning_rate'], betas=(cfg['beta1'], cfg['beta2']), fused=fused or None)


def train_step(model, optimizer, scaler, get_batch, accum, step, autocast, grad_clip):
    """`accum` micro-batches (get_batch(micro)) forward and backward, then clipping and AdamW -> the mean
    loss (on the device), the last micro-step's stats, the FLOPs. K micro-steps of 'mask' equal a K-times bigger
    batch, SIGReg and the pooled invariance included ('views': SIGReg per micro-step, docs/scaling.md)."""
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    raw = model.module if ddp else model
    lam = raw.cfg['sigreg_lambda']
    exact = accum > 1 and raw.cfg['objective'] == 'mask' and (lam > 0 or raw.cfg.get('inv_weight', 0) > 0)
    t = time.time()
    batches = [get_batch(m) for m in range(accum)] if exact else None
    loss_sum, flops, data_time = 0.0, 0, time.time() - t
    reg_grads, reg, inv = [None] * accum, 0, None
    if exact:
        reg_grads, reg, inv = exact_sigreg_grads(raw, batches, step, autocast, accum)
    for micro in range(accum):
        t = time.time()
        batch = batches[micro] if exact else get_batch(micro)
        data_time, flops = data_time + time.time() - t, flops + estimate_flops(raw, batch)
        if ddp:  # only the last micro-step all-reduces gradients; the others just accumulate
            model.require_backward_grad_sync = micro == accum - 1
        with autocast:
            loss, stats = model(batch, step, reg_grad=reg_grads[micro])
        scaler.scale(loss / accum).backward()
        if exact:  # the loss less the surrogates (the whole-batch values are added below)
            loss_sum = loss_sum + (1 - lam) * stats['pred']
        else:
            loss_sum = loss_sum + loss.detach()
    if exact:
        loss_sum, stats['sigreg'] = loss_sum + accum * lam * reg, reg
        if inv is not None:
            loss_sum, stats['inv'] = loss_sum + accum * (1 - lam) * raw.cfg['inv_weight'] * inv, inv
    scaler.unscale_(optimizer)  # (no-op without fp16 GradScaler)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    skipped = ~torch.isfinite(norm)  # NaN/inf would poison weights and moments: skip (same on every rank)
    if optimizer.defaults.get('fused') and not scaler.is_enabled():  # in the kernel: no host sync
        optimizer.found_inf = skipped.float()
        optimizer.step()
        del optimizer.found_inf
    elif not skipped.item():  # (unfused, or fp16's GradScaler: one sync)
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / accum, dict(stats, skipped=skipped, data_time=data_time), flops


def get_batch(cfg, impl, data, step, micro, dev, rank, world):
    """This rank's micro-batch `micro` of step `step` (sorted indices: the memory map is read in order)."""
    idx = np.sort(batch_indices(step, micro, len(data['images']), cfg['batch_size'], world, rank,
                                cfg['gradient_accumulation_steps'], cfg['seed']))
    kw = {}
    if cfg.get('views_from') == 'group':  # global views 2, 3, .. or the 'mask' second view: other photos
        rng = np.random.default_rng([cfg['seed'], step, micro, rank, 1])
        others = other_photos(data['groups'], data['by_group'], idx, rng, partners_per_image(cfg))
        kw['partners'] = [data['images'][o] for o in others]
    return impl.make_batch(cfg, data['images'][idx], data['mean'], data['std'], step, micro, dev, rank, **kw)


def main(argv=None, impl=None):
    """Config: defaults < config files < --key=value, checked before any work (exit code 2), then train."""
    impl = impl or sys.modules[__name__]
    return train(parse_config(argv, impl), impl)


def train(cfg, impl=None):
    """The training loop. impl: the module of the data-dependent parts (build_model, make_batch, ...):
    this one, or medjepa3d, so images and volumes share this loop, its logs and its checkpoints."""
    impl = impl or sys.modules[__name__]
    ddp, rank, world, dev = setup_distributed(cfg)
    master, accum = rank == 0, cfg['gradient_accumulation_steps']  # (per process)
    with claim_out_dir(cfg, rank, ddp, dev):  # one run per out_dir: a lock, no silent overwrite
        if cfg['num_threads'] > 0:
            torch.set_num_threads(cfg['num_threads'])
        dtype, _, autocast = precision(cfg['dtype'], dev)
        data = open_data(cfg, impl, master, ddp, dev)
        images, ckpt_path = data['images'], os.path.join(cfg['out_dir'], 'ckpt.pt')
        torch.manual_seed(cfg['seed'])
        model = impl.build_model(cfg, images.shape[-1]).to(dev)
        optimizer = make_optimizer(model, cfg, dev)
        scaler = torch.amp.GradScaler(enabled=(dtype == 'float16'))  # (loss scaling: fp16 only)
        iter_num, best_knn = 0, 0.0
        if cfg['init_from'] == 'resume':
            iter_num, best_knn = resume(ckpt_path, cfg, impl, model, optimizer, dev, master)
        model, raw_model = wrap_model(model, cfg, impl, dev, ddp, master)  # SyncBatchNorm, compile, DDP
        if master:
            peak = describe_run(cfg, data, raw_model, dev, dtype, world)  # (and the MFU denominator)
            log = open_log(cfg, iter_num)  # (scratch: deletes an earlier run's files)
        with stop_signals() as stop:  # SIGTERM / SIGUSR1 (pre-emption): finish the step, save, exit
            t0, tdata, flops, imgs = time.time(), 0.0, 0.0, 0  # since the last log line
            stopping, bad, first = False, BadSteps(cfg, master), iter_num
            batches = Prefetcher(lambda s, m: get_batch(cfg, impl, data, s, m, dev, rank, world), accum)
            while iter_num < cfg['max_iters']:
                if master and iter_num > first and iter_num % cfg['eval_interval'] == 0:  # (not on resume)
                    # online kNN on val, monitors, then a checkpoint
                    best_knn = evaluate_and_save(cfg, impl, raw_model, optimizer, data, iter_num, best_knn,
                                                 log, dev, autocast)
                    peak = retime_matmul_flops(peak, dev, dtype)  # (a busy start-up times it too low)
                    t0, tdata, flops, imgs = time.time(), 0.0, 0.0, 0  # img/s and MFU: training time only
                lr = lr_at(iter_num, cfg)
                for group in optimizer.param_groups:
                    group['lr'] = lr
                batch = functools.partial(batches, iter_num)  # micro -> batch (made in the background)
                loss, stats, f = train_step(model, optimizer, scaler, batch, accum, iter_num, autocast,
                                            cfg['grad_clip'])
                iter_num, flops, tdata = iter_num + 1, flops + f * world, tdata + stats['data_time']
                imgs += cfg['batch_size'] * accum * world
                bad.add(stats['skipped'])  # (read on log steps: no sync)
                log_now = iter_num % cfg['log_interval'] == 0 or iter_num == cfg['max_iters']
                if log_now:
                    bad.check(iter_num)  # (may stop the run)
                if log_now and master:
                    if dev.startswith('cuda'):
                        torch.cuda.synchronize()
                    dt = time.time() - t0
                    log_step(log, iter_num, loss, stats, lr, imgs / dt, tdata / dt, flops / dt / peak, bad.n)
                    t0, tdata, flops, imgs = time.time(), 0.0, 0.0, 0
                # a signal stops every rank at the same step (DDP: an all-reduce, on log steps only)
                stopping = (not ddp or log_now) and any_rank(bool(stop), ddp, dev)
                if stopping:
                    break
            batches.close()
            if master:
                if stopping:
                    print(f'stopped by a signal at step {iter_num} (resume with --init_from=resume)')
                evaluate_and_save(cfg, impl, raw_model, optimizer, data, iter_num, best_knn, log, dev,
                                  autocast, knn=not stopping)
                log.close()
                print(f'saved {ckpt_path}')
            if ddp:  # wait for rank 0's evaluation and save (a rank that leaves early can abort the other)
                barrier(dev)
                dist.destroy_process_group()
    return raw_model


if __name__ == '__main__':
    cli(main, sys.modules[__name__])
