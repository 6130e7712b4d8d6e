"""
Evaluate a MedJEPA encoder the way self-supervised papers do, next to baselines run with the same
protocol, and draw the pictures that show what it learned.

    python eval.py --ckpt=out-demo-views/ckpt.pt                       # every task the data support
    python eval.py --ckpt=out-demo-views/ckpt.pt --tasks=knn,linear    # the quick frozen-feature part
    python eval.py --ckpt=out-demo-views/ckpt.pt --imagenet=vit_b16.pth   # add an ImageNet ViT-B/16 row
    python eval.py --ckpt=out-demo-views/ckpt.pt --device=cuda --finetune_iters=3000 --seg_epochs=50
    python eval.py --help                                              # every flag, with its default

On the demo data (6000/999/2001 images at 64 px, encoder 6 x 192) the run without the supervised row
(--baselines=random,pixels) takes about 3-4 minutes on 2 CPU cores; the supervised row adds its
training (as many steps of 64 images as the pretraining: 810 for config/demo_views.py) and its tasks. It prints one markdown table per
task and writes eval.json (every number, the settings, seeds and data set), eval.md (the tables) and
figures/*.png next to the checkpoint.
docs/evaluation.md explains each protocol at more length.

The lesson: a representation is good if the label is easy to read out of it. Each task asks that
question in its own way, in its own table with one row per encoder:

    knn       no training at all: do the k most similar train images (cosine) share the label?
    linear    a logistic regression on frozen features: is the label linearly there?
    fewshot   the same probe with 1/5/10/20 labels per class, and with 1 %/10 %/100 % of the labels
    finetune  the whole encoder trained on the labels (LP-FT, layer-wise lr decay): a good start?
    seg       a per-token linear head on frozen patch tokens -> masks, Dice per foreground class;
              with --seg_finetune_iters=N also encoder + head fine-tuned end to end
    domain    kNN per hospital and across hospitals; can a linear probe tell the hospitals apart?

Rows: the checkpoint; the same architecture untrained (random-init: what the architecture alone
gives); raw pixels (what needs no learning); the same architecture trained with the labels for the
pretraining's steps (supervised: the ceiling); optionally an ImageNet ViT (what transfer gives).
A checkpoint evaluates on any data set (--data_dir): other image sizes, other channel counts.

Honesty rules, enforced here and checked by tests/test_eval.py: every choice (a probe's C, the
fine-tuning step, the segmentation epoch) is made on VAL; TEST is read once per reported number,
after the choice; no number is the best of several test runs. Each table says its split, number of
images and seeds. The splits are checked for shared patients (groups) and identical images first.

Adding an evaluation = one function in TASKS: (row, data, cfg) -> (numbers for eval.json, table cells).
"""
import argparse
import copy
import difflib
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
import warnings

import numpy as np
import sklearn
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import eval_figures
import medjepa
from eval_figures import atomic_write, format_table, to_json  # the report's plumbing

# -----------------------------------------------------------------------------
# defaults (override with --key=value)
ckpt = 'out-demo/ckpt.pt'   # checkpoint written by medjepa.py; eval.json / eval.md / figures/ go next to it
data_dir = ''               # data set folder; '' = the one the checkpoint was trained on
tasks = 'auto'              # comma-separated: knn,linear,fewshot,finetune,seg,domain; auto = all the data support
baselines = 'random,pixels,supervised'  # rows besides the checkpoint: random-init, raw pixels, supervised ('none' = no rows)
imagenet = ''               # path to an ImageNet ViT state dict (timm layout, e.g. ViT-B/16): adds an 'imagenet' row
imagenet_size = 224         # images are resized to this for the ImageNet row (its training resolution)
device = 'cpu'              # where networks run ('cpu', 'cuda', 'mps')
dtype = 'auto'              # 'float32', 'bfloat16' (autocast), 'auto' (medjepa.resolve_dtype: bf16 where it is fast)
seed = 0                    # seeds the random-init encoder, probes, fine-tuning and the segmentation head
batch_size = 256            # images per forward pass when extracting features
knn_ks = '10,20,100'        # kNN neighbourhood sizes; a k is skipped when k > train images / classes
knn_T = 0.07                # kNN vote temperature: weight = exp(cosine_sim / T)
pixel_size = 16             # raw-pixel baseline: images area-averaged to pixel_size x pixel_size
shots = '1,5,10,20'         # few-shot: labelled train images per class
fractions = '0.01,0.1,1'    # data efficiency: fractions of the train labels (stratified)
fewshot_seeds = 5           # draws per few-shot / fraction setting; the table shows mean +- std
fewshot_C = 1.0             # few-shot / fraction probes: C fixed in advance, never tuned on val (docs/evaluation.md)
finetune_iters = 50         # fine-tuning steps (a short run on CPU; use thousands on a GPU)
finetune_batch = 32         # fine-tuning images per step
finetune_lr = 5e-4          # fine-tuning peak lr of the head and the last block; earlier layers get less
layer_decay = 0.75          # layer-wise lr decay: block i of L gets lr * layer_decay ** (L - i)
finetune_eval_every = 25    # fine-tuning: score val at step 0 and every this many steps; the best is tested
seg_train = 1000            # segmentation: train images (random subset) the head is fitted on; 0 = all
seg_epochs = -1             # segmentation: passes over those images, the best val epoch tested; -1 = 24 for images, 48 for volumes
seg_lr = -1.0               # segmentation head learning rate (AdamW); -1 = 3e-3 for images, 0.1 for volumes (docs/evaluation.md)
seg_finetune_iters = 0      # segmentation: after the frozen fit, train encoder + head end to end this many steps (0 = off)
seg_finetune_lr = 5e-4      # segmentation fine-tuning peak lr of head and last block (earlier: layer_decay; batch etc.: finetune_*)
supervised_iters = -1       # supervised row: steps trained with the labels; -1 = the checkpoint's max_iters, 0 = no row
supervised_lr = 1e-3        # supervised row: peak AdamW lr (warmup 10 % of the steps, then cosine)
supervised_eval_every = 100 # supervised row: score val at step 0 and every this many steps; the best step is kept
figures = True              # draw figures/*.png next to the checkpoint
embedding = 'pca'           # 2-D embedding map: 'pca' (instant) or 'tsne' (slower, often clearer clusters)
KEYS = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
CS = [1e-3, 1e-2, 1e-1, 1e0, 1e1, 1e2]  # linear-probe inverse regularisation strengths tried on val
# -----------------------------------------------------------------------------
SPLITS = ('train', 'val', 'test')
SUPPORTED = ('multiclass', 'binary', 'ordinal', 'multilabel', 'segmentation')  # segmentation: masks only
# the metric that selects on val and heads the per-k / few-shot / domain columns (QWK for ordinal grades, as in APTOS)
MAIN = {'multiclass': 'acc', 'binary': 'acc', 'ordinal': 'qwk', 'multilabel': 'auroc', 'segmentation': 'acc'}  # segmentation: no label task runs
METRIC_NAMES = {'acc': 'acc', 'bal_acc': 'bal-acc', 'macro_f1': 'macro-F1', 'auroc': 'AUROC', 'qwk': 'QWK'}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's augreg models use 0.5, 0.5

# -----------------------------------------------------------------------------
# data and metrics


def check_task(meta):
    """Fail early, with the name of the problem, on label types this version cannot score."""
    task = meta.get('task', 'multiclass')
    if task not in SUPPORTED:
        raise NotImplementedError(f"eval.py does not support task '{task}' (data set '{meta.get('name', '?')}'): "
                                  f"supported are {', '.join(SUPPORTED)}")
    return task


def load_data(ddir):
    """A prepare.py folder (docs/data_format.md), memory-mapped -> dict(meta, task, name, num_classes,
    counts, images, labels, masks, sites, groups); the last five are {split: array} or None when the
    data set lacks them. Labels are (N,) ints, or (N, L) 0/1 for multi-label."""
    meta = medjepa.read_meta(ddir)
    raw = {s: medjepa.load_split(ddir, s) for s in SPLITS}
    data = {'meta': meta, 'task': check_task(meta), 'num_classes': int(meta['num_classes']),
            'name': meta.get('name', os.path.basename(os.path.normpath(ddir)))}
    for key in ('images', 'labels', 'masks', 'sites', 'groups'):
        data[key] = {s: raw[s][key] for s in SPLITS} if all(raw[s][key] is not None for s in SPLITS) else None
        if key in ('labels', 'sites', 'groups') and data[key] is not None:
            shape = (-1, data['num_classes']) if key == 'labels' and data['task'] == 'multilabel' else (-1,)
            data[key] = {s: np.asarray(v).astype(np.int64).reshape(shape) for s, v in data[key].items()}
    if data['labels'] is None:
        sys.exit(f"error: {ddir} has no labels for every split; evaluation needs them")
    data['counts'] = {s: int(len(data['labels'][s])) for s in SPLITS}
    return data


def leakage_report(data):
    """Test images that also sit in train or val make every number optimistic, and let selection on
    val see test images. Counts shared group ids (patients / lesions) and byte-identical images
    between each pair of splits -> {'train/test': {'groups': n, 'images': n}, ...}."""
    digest = {s: {hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).digest()
                  for im in data['images'][s]} for s in SPLITS}
    return {f'{a}/{b}': {'groups': len(set(data['groups'][a]) & set(data['groups'][b])) if data['groups'] else 0,
                         'images': len(digest[a] & digest[b])}
            for a, b in (('train', 'test'), ('val', 'test'), ('train', 'val'))}


def classification_metrics(y_true, y_score, task='multiclass'):
    """y_true (N,) int labels or (N, L) 0/1, y_score (N, K) class scores or probabilities -> dict.

    acc / bal_acc / macro_f1 use the argmax; balanced accuracy (mean per-class recall) matters because
    "always say the common class" scores high accuracy on imbalanced medical data. AUROC: for K = 2 of
    the positive class, else the mean one-vs-rest AUROC (MedMNIST's "AUC") over classes with positives
    and negatives; NaN if undefined. 'ordinal' adds quadratic weighted kappa (a disagreement costs
    (i - j)^2). 'multilabel': per-label AUROC, their mean, macro-F1 at threshold 0.5."""
    y_score = np.asarray(y_score, dtype=np.float64)
    if task == 'multilabel':
        y_true = np.asarray(y_true)
        per = [roc_auc_score(y_true[:, l], y_score[:, l]) if 0 < y_true[:, l].sum() < len(y_true) else float('nan')
               for l in range(y_true.shape[1])]
        return {'auroc': float(np.nanmean(per)) if not np.all(np.isnan(per)) else float('nan'),
                'per_label_auroc': [float(a) for a in per], 'n': int(len(y_true)),
                'macro_f1': float(f1_score(y_true, y_score >= 0.5, average='macro', zero_division=0))}
    y_true = np.asarray(y_true).reshape(-1)
    K, y_pred = y_score.shape[1], y_score.argmax(1)
    if K == 2:
        auroc = roc_auc_score(y_true, y_score[:, 1]) if len(np.unique(y_true)) == 2 else float('nan')
    else:
        per_class = [roc_auc_score(y_true == c, y_score[:, c]) for c in range(K) if 0 < (y_true == c).sum() < len(y_true)]
        auroc = float(np.mean(per_class)) if per_class else float('nan')
    out = {'acc': float(accuracy_score(y_true, y_pred)), 'bal_acc': float(balanced_accuracy_score(y_true, y_pred)),
           'macro_f1': float(f1_score(y_true, y_pred, average='macro', zero_division=0)),
           'auroc': float(auroc), 'n': int(len(y_true))}
    if task == 'ordinal':
        out['qwk'] = float(cohen_kappa_score(y_true, y_pred, weights='quadratic'))
    return out


def dice_per_class(pred, target, num_classes):
    """Per-image Dice 2|P & G| / (|P| + |G|) of every FOREGROUND class c = 1..K-1, averaged over the
    images where c is in the prediction or the ground truth (an image with neither says nothing
    about c). Background (0) is excluded: it is most of every image and would flatter any model.
    pred, target: (N, *spatial) ints, 2-D or 3-D alike. -> [Dice of class 1, ..., class K-1]."""
    pred, target = np.asarray(pred), np.asarray(target)
    axes, out = tuple(range(1, pred.ndim)), []
    for c in range(1, num_classes):
        p, g = pred == c, target == c
        inter, total = (p & g).sum(axes), p.sum(axes) + g.sum(axes)  # (N,)
        seen = total > 0
        out.append(float((2 * inter[seen] / total[seen]).mean()) if seen.any() else float('nan'))
    return out


def metric_cells(prefix, m):
    """Table cells (in %) for whichever of acc / bal-acc / macro-F1 / AUROC / QWK a result has."""
    return {f'{prefix} {name}': 100 * m[k] for k, name in METRIC_NAMES.items() if k in m}

# -----------------------------------------------------------------------------
# encoders and features. A row = dict(name, encoder: (B, C, S, S) -> (B, N, D) tokens, prep: uint8 images -> input)


def pixel_features(images_uint8, size=16, mean=None, std=None, chunk=1024):
    """Raw-pixel baseline: (N, H, W, C) uint8 -> (N, size*size*C) float32, flattened in (h, w, c) order.
    Area averaging (each output pixel = mean of the input pixels it covers) invents and skips nothing;
    normalising with mean/std ([0, 1] units) as the encoder's input is keeps brightness from dominating
    cosine similarity. In chunks, so a memory-mapped split is never converted to float all at once."""
    N, C, d = len(images_uint8), images_uint8.shape[-1], images_uint8.ndim - 2
    size = size if d == 2 else max(1, size // 2)  # volumes: (size/2)^3 cells, as many features as 2-D's size^2 * 2
    out = np.empty((N, size ** d * C), dtype=np.float32)
    pool = F.adaptive_avg_pool2d if d == 2 else F.adaptive_avg_pool3d
    for i in range(0, N, chunk):
        x = torch.from_numpy(np.asarray(images_uint8[i:i + chunk], dtype=np.float32) / 255.0)  # (B, *spatial, C)
        x = pool(x.movedim(-1, 1), size).movedim(1, -1)  # (B, size, size(, size), C)
        if mean is not None:
            x = (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
        out[i:i + chunk] = x.reshape(len(x), -1).numpy()
    return out


def make_prep(mean, std, dev, size=None):
    """uint8 (B, H, W, C) numpy -> normalised (B, C, S, S) tensor on dev, resized to size if given."""
    def prep(images):
        x = medjepa.to_float(images, mean, std, dev)
        return x if size in (None, x.shape[-1]) else F.interpolate(x, size=(size, size), mode='bilinear', antialias=True)
    return prep


def as_tuple(patch, d):
    """A patch size as one side per spatial axis: 8 -> (8, 8); (4, 8, 8) stays."""
    return tuple(patch) if isinstance(patch, (tuple, list)) else (patch,) * d


class PatchPixels(nn.Module):
    """The raw-pixel 'encoder' for segmentation: each token is its patch's pixels, (B, N, C*p*p)
    (volumes: C*pd*ph*pw), in the same row-major grid order as the ViT's tokens."""
    def __init__(self, patch_size):
        super().__init__()
        self.patch_size = patch_size

    def grid(self, x):
        return tuple(s // p for s, p in zip(x.shape[2:], as_tuple(self.patch_size, x.ndim - 2)))

    def forward(self, x):
        if x.ndim == 4:
            return F.unfold(x, self.patch_size, stride=self.patch_size).transpose(1, 2)
        (B, C), (gd, gh, gw), (pd, ph, pw) = x.shape[:2], self.grid(x), as_tuple(self.patch_size, 3)
        x = x.reshape(B, C, gd, pd, gh, ph, gw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, gd, gh, gw, C, pd, ph, pw)
        return x.reshape(B, gd * gh * gw, C * pd * ph * pw)


@torch.no_grad()
def encode(encoder, prep, images, bs=256, token_idx=None, amp=False):
    """One frozen pass over a split -> (pooled (N, D) float32, tokens of the images in token_idx as
    (n, *grid, D) float16, or None). pooled = mean of the output tokens, as medjepa.extract_features.
    bf16 autocast changes features by ~0.1 % (measured on the demo) and halves the CPU time."""
    encoder.eval()
    pooled, tokens = [], []
    for i in range(0, len(images), bs):
        x = prep(images[i:i + bs])  # (B, C, S, S)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            t = encoder(x)  # (B, N, D)
        pooled.append(t.float().mean(1).cpu())
        if token_idx is not None:
            grid = encoder.grid(x)  # (gh, gw) or (gd, gh, gw)
            sel = token_idx[(token_idx >= i) & (token_idx < i + bs)] - i
            tokens.append(t[torch.as_tensor(sel, device=t.device)].half().cpu())
    tokens = torch.cat(tokens).view(len(token_idx), *grid, -1).numpy() if token_idx is not None else None
    return torch.cat(pooled).numpy(), tokens


class LearnedPosViT(medjepa.ViT):
    """Our ViT with an ImageNet checkpoint's learned position table instead of fixed sin-cos positions,
    resized (bicubic, like timm's resample_abs_pos_embed) to whatever patch grid it is given."""
    def __init__(self, in_chans, patch_size, n_embd, n_layer, n_head, pos_grid):
        super().__init__(in_chans, patch_size, n_embd, n_layer, n_head)
        self.pos_grid = tuple(pos_grid)
        self.register_buffer('learned_pos', torch.zeros(1, pos_grid[0] * pos_grid[1], n_embd))

    def pos_embed(self, grid, device):
        pos = self.learned_pos.view(1, *self.pos_grid, -1).permute(0, 3, 1, 2)  # (1, D, gh0, gw0)
        if tuple(grid) != self.pos_grid:
            pos = F.interpolate(pos, size=tuple(grid), mode='bicubic', align_corners=False)
        return pos.flatten(2)[0].T.to(device)  # (gh*gw, D)


def adapt_patch_embed(w, in_chans):
    """Patch-embedding filters (D, C, *patch) -> (D, in_chans, *patch), for weights trained on another
    number of channels (ImageNet or our own RGB checkpoint on grey X-rays, a grey one on 4-channel MRI).
    Every new channel gets the old filters' sum / in_chans, so an image whose channels are all equal,
    (g, ..., g), gives the same tokens as before: RGB -> grey sums the filters, grey -> RGB repeats / 3."""
    if w.shape[1] == in_chans:
        return w
    return (w.sum(1, keepdim=True) / in_chans).repeat(1, in_chans, *[1] * (w.ndim - 2))


TIMM_VIT_KEY = re.compile(r'^(patch_embed\.proj|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)|norm)\.')


def imagenet_to_medjepa(sd, in_chans=3):
    """Map a timm-layout ViT state dict (vit_base_patch16_224; DeiT / MAE / DINO checkpoints too, wrapped
    in 'model' / 'state_dict' / 'teacher' or prefixed 'module.') onto LearnedPosViT.

    medjepa.ViT already uses timm's names (patch_embed.proj, blocks.i.norm1 / attn.qkv / attn.proj /
    norm2 / mlp.fc1 / mlp.fc2, norm): those copy as they are. pos_embed (1, 1 + 14*14, D) loses its
    class-token entry and becomes learned_pos; cls_token, head* and the like are dropped (we mean-pool
    patch tokens); for grey input the RGB patch filters are summed (a grey g is (g, g, g)); anything
    else (e.g. torchvision's names) is a ValueError naming the keys. -> (state dict, architecture);
    heads are not in a state dict, but ViTs use 64-dim heads: n_head = n_embd // 64."""
    for wrapper in ('model', 'state_dict', 'teacher'):
        sd = sd[wrapper] if isinstance(sd.get(wrapper), dict) else sd
    sd = {re.sub(r'^(module|backbone)\.', '', k): v for k, v in sd.items()}
    drop = re.compile(r'^(cls_token|dist_token|head|head_dist|pre_logits)\b')
    unknown = [k for k in sd if not (drop.match(k) or TIMM_VIT_KEY.match(k) or k == 'pos_embed')]
    if unknown or 'pos_embed' not in sd:
        raise ValueError(f"not a timm-layout ViT state dict: {f'unexpected keys {unknown[:5]}' if unknown else 'no pos_embed'}")
    out = {k: v for k, v in sd.items() if TIMM_VIT_KEY.match(k)}
    w = out['patch_embed.proj.weight']  # (D, 3, p, p)
    out['patch_embed.proj.weight'] = adapt_patch_embed(w, in_chans)
    pos = sd['pos_embed']  # (1, prefix tokens + gh0*gw0, D)
    n_prefix = next(n for n in (0, 1, 2) if math.isqrt(pos.shape[1] - n) ** 2 == pos.shape[1] - n)
    out['learned_pos'] = pos[:, n_prefix:]
    g, D = math.isqrt(pos.shape[1] - n_prefix), w.shape[0]
    return out, dict(patch_size=w.shape[-1], n_embd=D, n_head=D // 64, pos_grid=(g, g),
                     n_layer=1 + max(int(k.split('.')[1]) for k in out if k.startswith('blocks.')))


def load_imagenet_encoder(path, in_chans):
    mapped, arch = imagenet_to_medjepa(medjepa.safe_load(path), in_chans)
    enc = LearnedPosViT(in_chans, **arch)
    enc.load_state_dict(mapped)  # strict: a missing or extra tensor is an error, not a warning
    return enc, arch

# -----------------------------------------------------------------------------
# frozen-feature probes: kNN and logistic regression


def knn_accuracy(train_x, train_y, test_x, test_y, num_classes, k=20, T=0.07, task='multiclass'):
    """DINO kNN (medjepa.knn_predict), train = memory bank -> classification_metrics on test, k, T.
    Votes become vote shares (rows sum to 1) so that AUROC compares like with like across images;
    multi-label: per label, the share of the votes that say 'present'."""
    def shares(y, K):
        s = medjepa.knn_predict(train_x, y, test_x, K, k=k, T=T)
        return s / np.maximum(s.sum(1, keepdims=True), 1e-12)
    if task == 'multilabel':
        scores = np.stack([shares(train_y[:, l], 2)[:, 1] for l in range(train_y.shape[1])], 1)
    else:
        scores = shares(train_y, num_classes)
    return {**classification_metrics(test_y, scores, task), 'k': k, 'T': T}


def fit_logreg(X, y, C, seed, num_classes, multilabel=False, max_iter=1000):
    """Logistic regression on standardised features -> (scores function X -> (N, K), iterations used).
    Multi-class: one multinomial (softmax) model; multi-label: one binary model per label. A label
    that never varies in the training subset is predicted as that constant."""
    fits = []
    for t in ([y[:, l] for l in range(y.shape[1])] if multilabel else [y]):
        if len(np.unique(t)) < 2:
            fits.append(int(t[0]))
            continue
        # One BLAS thread: these matrix products are tiny, and on a shared 2-core machine OpenBLAS's
        # spinning worker threads made the probe 50-100x slower (measured), not faster.
        with warnings.catch_warnings(), threadpool_limits(1, user_api='blas'):
            warnings.simplefilter('ignore', ConvergenceWarning)  # recorded via n_iter instead of spammed
            fits.append(LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(X, t))
    def scores(Xq):
        if multilabel:
            return np.stack([np.full(len(Xq), float(f)) if isinstance(f, int) else f.predict_proba(Xq)[:, 1]
                             for f in fits], 1)
        proba = np.zeros((len(Xq), num_classes))  # classes absent from train get probability 0
        if isinstance(fits[0], int):
            proba[:, fits[0]] = 1
        else:
            proba[:, fits[0].classes_] = fits[0].predict_proba(Xq)
        return proba
    return scores, max([int(f.n_iter_.max()) for f in fits if not isinstance(f, int)] or [0])


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, Cs=CS, seed=0, num_classes=None,
                 task='multiclass', unlabeled=None, max_iter=1000):
    """Logistic regression on frozen features, C chosen on val, reported on test once.

    Standardisation statistics come from `unlabeled` (default train_x; few-shot runs pass the whole
    train set: statistics need no labels). Each C is fitted on train and scored on val (MAIN[task]);
    only the best (ties -> the smaller C) sees test, once, with no refit. val_x = None: no selection,
    Cs holds the one C fixed in advance (few-shot: no val set of that size exists to choose on).
    -> test metrics + 'C' (chosen) + 'val' {C: val score} + 'select' + 'n_iter' {C: iterations}."""
    K = num_classes or int(max(train_y.max(), test_y.max(), -1 if val_y is None else val_y.max())) + 1
    # float32: each lbfgs step streams the features through memory twice; half the bytes is ~1.6x faster
    train_x, test_x = np.asarray(train_x, dtype=np.float32), np.asarray(test_x, dtype=np.float32)
    scaler = StandardScaler().fit(train_x if unlabeled is None else np.asarray(unlabeled, np.float32))
    Xtr, Xva = scaler.transform(train_x), None if val_x is None else scaler.transform(np.asarray(val_x, np.float32))
    if val_x is None and len(Cs) != 1:
        raise ValueError(f'without a val set there is nothing to choose on: pass one C, not {Cs}')
    select, val, n_iter, best = MAIN[task] if val_x is not None else None, {}, {}, (-np.inf, None, None)
    for C in sorted(Cs):
        scores, n_iter[C] = fit_logreg(Xtr, train_y, C, seed, K, task == 'multilabel', max_iter)
        if Xva is None:
            best = (None, C, scores)
            break
        val[C] = classification_metrics(val_y, scores(Xva), task)[select]
        if val[C] > best[0]:  # strict: ties keep the smaller C
            best = (val[C], C, scores)
    test = classification_metrics(test_y, best[2](scaler.transform(test_x)), task)  # the one look at test
    return {**test, 'C': float(best[1]), 'val': val, 'select': select, 'n_iter': n_iter,
            'unconverged_Cs': [C for C in n_iter if n_iter[C] >= max_iter]}


def few_shot_indices(labels, k, seed):
    """k train images of every class (all of them if a class has fewer), as sorted indices. Nested:
    the 1-shot images of a seed are among its 5-shot images, and so on, which smooths the curve."""
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]))


def fraction_indices(labels, frac, seed):
    """A random fraction of the train images as sorted indices: stratified, with at least one image
    per class, for single-label data; a plain random subset for multi-label data."""
    rng = np.random.default_rng(seed)
    if labels.ndim == 2:
        return np.sort(rng.permutation(len(labels))[:max(1, round(frac * len(labels)))])
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    return np.sort(np.concatenate([idx[:max(1, round(frac * len(idx)))] for idx in by_class]))

# -----------------------------------------------------------------------------
# fine-tuning end to end


def layerwise_param_groups(encoder, head, lr, decay, weight_decay=0.05):
    """AdamW groups with layer-wise lr decay (BEiT / MAE fine-tuning): the head and the final norm get
    lr, block i of L gets lr * decay^(L - i), the patch embedding lr * decay^(L + 1). Early layers hold
    generic features that a few labels should nudge, not rewrite. No weight decay on biases and norms."""
    L, groups = len(encoder.blocks), {}
    depth = lambda name: int(name.split('.')[1]) + 1 if name.startswith('blocks.') else 0 if name.startswith('patch_embed') else L + 1
    for d, p in [(depth(n), p) for n, p in encoder.named_parameters()] + [(L + 1, p) for p in head.parameters()]:
        groups.setdefault((d, p.ndim >= 2), {'params': [], 'base_lr': lr * decay ** (L + 1 - d),
                                             'weight_decay': weight_decay if p.ndim >= 2 else 0.0})['params'].append(p)
    return list(groups.values())


def classifier_loss(logits, y, task):
    """Cross-entropy; for multi-label, one binary cross-entropy per label."""
    return F.binary_cross_entropy_with_logits(logits, y.float()) if task == 'multilabel' else F.cross_entropy(logits, y)


def fit_head(feats, y, task, num_classes, max_iter=500):
    """The "LP" of LP-FT: logistic regression on standardised frozen features by full-batch L-BFGS,
    the standardisation then folded into the weights so that the head reads raw features. -> nn.Linear."""
    x, y = torch.as_tensor(feats, dtype=torch.float32), torch.as_tensor(y)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    head = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=max_iter, history_size=20, line_search_fn='strong_wolfe')
    def closure():
        opt.zero_grad()
        loss = classifier_loss(head((x - mu) / sd), y, task) + 1e-4 * head.weight.pow(2).sum()  # a little L2
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():  # w . (x - mu) / sd + b  =  (w / sd) . x + (b - (w / sd) . mu)
        head.weight /= sd
        head.bias -= head.weight @ mu
    return head


@torch.no_grad()
def predict(encoder, head, prep, images, task, bs=256, amp=False):
    """Class probabilities (N, K): softmax, or a sigmoid per label for multi-label."""
    encoder.eval()
    out = []
    for i in range(0, len(images), bs):
        x = prep(images[i:i + bs])
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = head(encoder(x).mean(1)).float()
        out.append((logits.sigmoid() if task == 'multilabel' else logits.softmax(1)).cpu())
    return torch.cat(out).numpy()


def end_to_end(model, head, loss_on, score_val, n, iters, lr, cfg):
    """The fine-tuning loop of classification and segmentation (LP-FT, Kumar et al. 2022): the head
    arrives trained on frozen features, so that a random head's large early gradients do not scramble
    the pretrained ones. AdamW with layer-wise decay, warmup + cosine lr, loss_on(sorted batch of
    finetune_batch of the n train items) -> loss. score_val() is read at step 0 (the frozen-feature
    head, encoder untouched) and every finetune_eval_every steps; the best step's weights are loaded
    back into model and head. A chosen step 0 says: within this budget, fine-tuning did not beat its
    own starting point. -> (best step, {step: val score})."""
    opt = torch.optim.AdamW(layerwise_param_groups(model, head, lr, cfg['layer_decay']))
    rng, warm = np.random.default_rng(cfg['seed']), max(1, iters // 10)
    val, best = {}, (-np.inf, None, None)
    for step in range(iters + 1):
        if step % cfg['finetune_eval_every'] == 0 or step == iters:
            val[step] = score_val()
            if val[step] > best[0]:  # strict: ties keep the earlier step
                best = (val[step], step, copy.deepcopy((model.state_dict(), head.state_dict())))
        if step == iters:
            break
        model.train()
        scale = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, iters - warm)))
        for g in opt.param_groups:
            g['lr'] = g['base_lr'] * scale
        loss = loss_on(np.sort(rng.choice(n, min(cfg['finetune_batch'], n), replace=False)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), 1.0)
        opt.step()
    model.load_state_dict(best[2][0])
    head.load_state_dict(best[2][1])
    return best[1], val


def train_classifier(model, head, prep, augment, data, iters, lr, cfg):
    """Train model + a linear head on its mean-pooled tokens with the train labels (end_to_end; augment:
    the batch's random crops); the step is picked on val; the best step's weights see test, once."""
    images, labels, task, dev, amp = data['images'], data['labels'], data['task'], cfg['device'], cfg['dtype'] == 'bfloat16'
    def loss_on(idx):
        x = augment(prep(images['train'][idx]))  # (B, C, *spatial)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = head(model(x).mean(1)).float()  # (B, K)
        return classifier_loss(logits, torch.as_tensor(labels['train'][idx], device=dev), task)
    score = lambda split: classification_metrics(labels[split], predict(model, head, prep, images[split], task, amp=amp), task)
    step, val = end_to_end(model, head, loss_on, lambda: score('val')[MAIN[task]], len(labels['train']), iters, lr, cfg)
    return {**score('test'), 'best_step': step, 'val': val, 'select': MAIN[task]}


def finetune(encoder, prep, train_feats, data, cfg):
    """Fine-tune a copy of the encoder + a linear head fitted on its frozen features (LP-FT), with crops
    and flips."""
    head = fit_head(train_feats, data['labels']['train'], data['task'], data['num_classes']).to(cfg['device'])
    gen = torch.Generator().manual_seed(cfg['seed'])
    crop = lambda x: medjepa.random_resized_crop(x, x.shape[-1], (0.5, 1.0), gen)
    return train_classifier(copy.deepcopy(encoder).to(cfg['device']), head, prep, crop, data, cfg['finetune_iters'],
                            cfg['finetune_lr'], cfg)


def train_supervised(encoder, prep, data, config, cfg):
    """The supervised row, the ceiling: the untrained architecture and a fresh linear head trained with
    the labels for as many steps of as many images as the pretraining had (config), with its crops and
    flips; AdamW, one lr for all layers, warmup + cosine, the step chosen on val. Trains encoder in place."""
    torch.manual_seed(cfg['seed'])
    head = nn.Linear(encoder.norm.normalized_shape[0], data['num_classes']).to(cfg['device'])
    gen, scale = torch.Generator().manual_seed(cfg['seed']), config['crop_scale']
    if data['images']['train'].ndim == 5:  # volumes: medjepa3d's crops (and flips of the W axis)
        import medjepa3d
        crop = lambda x: medjepa3d.random_crop_3d(x, x.shape[2:], scale, gen, config['flip'], config.get('video', False))
    else:
        crop = lambda x: medjepa.random_resized_crop(x, x.shape[-1], scale, gen)
    batch = config['batch_size'] * config.get('gradient_accumulation_steps', 1)
    run = {**cfg, 'layer_decay': 1.0, 'finetune_batch': batch, 'finetune_eval_every': cfg['supervised_eval_every']}
    r = train_classifier(encoder, head, prep, crop, data, cfg['supervised_iters'], cfg['supervised_lr'], run)
    return {**r, 'iters': cfg['supervised_iters'], 'batch': batch, 'lr': cfg['supervised_lr']}

# -----------------------------------------------------------------------------
# segmentation: a light head on frozen patch tokens. It works on a token GRID of any dimension,
# (N, gh, gw, D) for images or (N, gd, gh, gw, D) for volumes, so that 3-D code can reuse it.


def seg_logits(head, tokens, patch, out_size):
    """tokens (B, *grid, D) -> per-pixel class logits (B, K, *out_size). The head maps each token to
    K x p^d logits, one K-vector per pixel of its patch (a 'sub-pixel' linear decoder, like Segmenter's
    linear baseline), put back in place; a grid that misses out_size (resized input) is interpolated."""
    B, grid = tokens.shape[0], tokens.shape[1:-1]
    d, p = len(grid), as_tuple(patch, len(grid))  # anisotropic 3-D patches: (pd, ph, pw)
    x = head(tokens)  # (B, *grid, K * p^d)
    K = x.shape[-1] // math.prod(p)
    x = x.view(B, *grid, K, *p)  # (B, g1..gd, K, p1..pd)
    x = x.permute(0, d + 1, *[i for j in range(d) for i in (1 + j, d + 2 + j)])  # (B, K, g1, p, g2, p, ...)
    x = x.reshape(B, K, *[g * q for g, q in zip(grid, p)])  # (B, K, g1*p1, ..., gd*pd)
    if tuple(x.shape[2:]) != tuple(out_size):
        x = F.interpolate(x, size=tuple(out_size), mode='bilinear' if d == 2 else 'trilinear', align_corners=False)
    return x


class SegHead(nn.Linear):
    """Linear(D, K p^d) on tokens standardised with fixed train statistics mu, sd (buffers: they move
    with .to() and stay fixed when fine-tuning changes the tokens)."""
    def __init__(self, mu, sd, out_features):
        super().__init__(len(mu), out_features)
        self.register_buffer('mu', mu), self.register_buffer('sd', sd)

    def forward(self, t):
        return super().forward((t - self.mu) / self.sd)


@torch.no_grad()
def segment(logits, n, bs=64):
    """logits(batch slice) -> (B, K, *spatial)  =>  predicted label maps (n, *spatial) uint8."""
    return np.concatenate([logits(slice(i, i + bs)).argmax(1).cpu().numpy().astype(np.uint8) for i in range(0, n, bs)])


def train_segmentation(tokens, masks, patch, num_classes, cfg):
    """Standardise tokens (train statistics) + Linear(D, K p^d), trained with cross-entropy; the epoch
    is chosen on val mean Dice, then test is scored once. tokens / masks: {split: array}.
    -> (results, test predictions (N, *spatial) uint8, the chosen SegHead)."""
    torch.manual_seed(cfg['seed'])
    D, out_size = tokens['train'].shape[-1], masks['train'].shape[1:]
    flat = tokens['train'].reshape(-1, D).astype(np.float32)
    head = SegHead(torch.from_numpy(flat.mean(0)), torch.from_numpy(flat.std(0) + 1e-6),
                   num_classes * math.prod(as_tuple(patch, tokens['train'].ndim - 2)))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg['seg_lr'], weight_decay=1e-4)
    rng = np.random.default_rng(cfg['seed'])
    logits = lambda split, b: seg_logits(head, torch.from_numpy(tokens[split][b]).float(), patch, out_size)
    val_dice = lambda split: float(np.nanmean(dice_per_class(segment(lambda b: logits(split, b), len(tokens[split])),
                                                             masks[split], num_classes)))
    val, best = {}, (-np.inf, None, None)
    for epoch in range(1, cfg['seg_epochs'] + 1):
        for b in np.array_split(rng.permutation(len(tokens['train'])), max(1, len(tokens['train']) // 32)):
            b = np.sort(b)
            loss = F.cross_entropy(logits('train', b), torch.from_numpy(np.asarray(masks['train'][b], dtype=np.int64)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val[epoch] = val_dice('val')
        if val[epoch] > best[0]:
            best = (val[epoch], epoch, copy.deepcopy(head.state_dict()))
    head.load_state_dict(best[2])
    pred = segment(lambda b: logits('test', b), len(tokens['test']))  # the one look at test
    dice = dice_per_class(pred, masks['test'], num_classes)
    return {'dice': dice, 'mean_dice': float(np.nanmean(dice)), 'best_epoch': best[1], 'val_mean_dice': val,
            'n_train': len(tokens['train']), 'n': len(pred)}, pred, head


def finetune_segmentation(encoder, prep, head, images, idx, masks, cfg):
    """A copy of the encoder and of the frozen-token head (train_segmentation's choice) trained end to
    end (end_to_end) with per-pixel cross-entropy on the same train images, no augmentation (a crop
    would have to move the masks too); step chosen on val mean Dice, test once. images: {split: array},
    the rows idx[split] of which match masks[split]. -> (results, test predictions)."""
    dev, amp, K = cfg['device'], cfg['dtype'] == 'bfloat16', cfg['seg_classes']
    model, head = copy.deepcopy(encoder).to(dev), copy.deepcopy(head).to(dev)
    def logits(split, b):  # -> (B, K, *spatial)
        x = prep(images[split][idx[split][b]])  # (B, C, *spatial)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            t = model(x).float().view(len(x), *model.grid(x), -1)  # (B, *grid, D)
        return seg_logits(head, t, model.patch_size, masks[split].shape[1:])  # the head in float32, as when frozen
    def predict_split(split):
        model.eval()
        return segment(lambda b: logits(split, b), len(idx[split]))
    loss_on = lambda b: F.cross_entropy(logits('train', b), torch.as_tensor(masks['train'][b], dtype=torch.long, device=dev))
    score = lambda: float(np.nanmean(dice_per_class(predict_split('val'), masks['val'], K)))
    step, val = end_to_end(model, head, loss_on, score, len(idx['train']), cfg['seg_finetune_iters'],
                           cfg['seg_finetune_lr'], cfg)
    pred = predict_split('test')  # the one look at test
    dice = dice_per_class(pred, masks['test'], K)
    return {'dice': dice, 'mean_dice': float(np.nanmean(dice)), 'best_step': step, 'val_mean_dice': val, 'n': len(pred)}, pred

# -----------------------------------------------------------------------------
# tasks: (row, data, cfg) -> (numbers for eval.json, table cells). row['X'] = {split: (N, D) features}.


def task_knn(row, data, cfg):
    X, y, task, res, cells = row['X'], data['labels'], data['task'], {}, {}
    for k in cfg['knn_ks']:
        res[f'k={k}'] = knn_accuracy(X['train'], y['train'], X['test'], y['test'], data['num_classes'], k, cfg['knn_T'], task)
        cells[f'k={k} {METRIC_NAMES[MAIN[task]]}'] = 100 * res[f'k={k}'][MAIN[task]]
    k = 20 if 20 in cfg['knn_ks'] else cfg['knn_ks'][0]
    # the same vote on val: the number to compare runs and settings by (the test columns are reported, never chosen on)
    res['val'] = knn_accuracy(X['train'], y['train'], X['val'], y['val'], data['num_classes'], k, cfg['knn_T'], task)
    cells.update({c: v for c, v in metric_cells(f'k={k}', res[f'k={k}']).items() if c not in cells})
    cells[f'k={k} {METRIC_NAMES[MAIN[task]]} (val)'] = 100 * res['val'][MAIN[task]]
    return res, cells


def task_linear(row, data, cfg):
    X, y = row['X'], data['labels']
    r = linear_probe(X['train'], y['train'], X['val'], y['val'], X['test'], y['test'], Cs=cfg['Cs'],
                     seed=cfg['seed'], num_classes=data['num_classes'], task=data['task'])
    return r, {**metric_cells('linear', r), 'C (val)': f"{r['C']:g}"}


def task_fewshot(row, data, cfg):
    """Few-shot (k labels per class) and data efficiency (a fraction of the labels), fewshot_seeds
    draws each, with C fixed in advance (fewshot_C): choosing it on the labelled val set would use
    more labels than the setting has (999 for "1-shot"). 100 % of the labels is the linear task."""
    X, y, task = row['X'], data['labels'], data['task']
    def probe(idx):
        return linear_probe(X['train'][idx], y['train'][idx], None, None, X['test'], y['test'], Cs=[cfg['fewshot_C']],
                            seed=cfg['seed'], num_classes=data['num_classes'], task=task, unlabeled=X['train'])
    settings = [('shots', k, few_shot_indices) for k in cfg['shots'] if task != 'multilabel']  # k per class: single-label only
    settings += [('fractions', f, fraction_indices) for f in cfg['fractions']]
    res, cells = {'shots': {}, 'fractions': {}}, {}
    for kind, value, draw in settings:
        if kind == 'fractions' and value >= 1:
            runs = [{**(row['results'].get('linear') or task_linear(row, data, cfg)[0]), 'n_labelled': len(y['train'])}]
        else:
            runs = [{**probe(idx), 'seed': s, 'n_labelled': len(idx)}
                    for s, idx in ((s, draw(y['train'], value, s)) for s in range(cfg['fewshot_seeds']))]
        v = np.array([r[MAIN[task]] for r in runs])
        res[kind][value] = m = {'mean': float(v.mean()), 'std': float(v.std(ddof=1)) if len(v) > 1 else 0.0, 'runs': runs}
        col = f'{value}-shot' if kind == 'shots' else f'{100 * value:g} %'
        cells[col] = f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}" if len(runs) > 1 else 100 * m['mean']
    return res, cells


def task_finetune(row, data, cfg):
    if isinstance(row['encoder'], PatchPixels):
        return None, {}  # nothing to fine-tune in raw pixels
    r = finetune(row['encoder'], row['prep'], row['X']['train'], data, cfg)
    return r, {**metric_cells('fine-tuned', r), 'step (val)': r['best_step']}


# BraTS evaluates tumour regions, not labels: enhancing tumour (ET = label 4), tumour core (TC = 1 + 4)
# and whole tumour (WT = 1 + 2 + 4). prepare.py stores the labels 0/1/2/4 as 0/1/2/3.
BRATS_LABELS = ['background', 'necrotic tumour core', 'peritumoral edema', 'enhancing tumour']
BRATS_REGIONS = {'ET': (3,), 'TC': (1, 3), 'WT': (1, 2, 3)}


def region_dice(pred, target, regions):
    """Dice of unions of labels, per image as dice_per_class -> {region: Dice}."""
    return {name: dice_per_class(np.isin(pred, labels), np.isin(target, labels), 2)[0] for name, labels in regions.items()}


def task_seg(row, data, cfg):
    """Frozen tokens; with seg_finetune_iters, also the encoder fine-tuned: a second table row."""
    masks = {s: data['masks'][s][row['token_idx'][s]] for s in SPLITS}
    r, pred, head = train_segmentation(row['tokens'], masks, row['encoder'].patch_size, cfg['seg_classes'], cfg)
    row['seg_pred'] = pred[:8]  # for the overlay figure
    def cells(r, pred):
        c = {f"Dice {cfg['seg_names'][k]}": 100 * d for k, d in enumerate(r['dice'], start=1)}
        if list(cfg['seg_names']) == BRATS_LABELS:
            r['brats_regions'] = region_dice(pred, masks['test'], BRATS_REGIONS)
            c.update({f'Dice {k}': 100 * v for k, v in r['brats_regions'].items()})
        return {**c, **({'mean Dice': 100 * r['mean_dice']} if len(r['dice']) > 1 else {}), 'epoch (val)': r['best_epoch']}
    table = [cells(r, pred)]
    if cfg['seg_finetune_iters'] > 0 and not isinstance(row['encoder'], PatchPixels):  # raw pixels: nothing to tune
        ft, ft_pred = finetune_segmentation(row['encoder'], row['prep'], head, data['images'], row['token_idx'], masks, cfg)
        r['finetuned'] = {**ft, 'best_epoch': r['best_epoch']}
        table.append({'encoder': f"{row['name']}, fine-tuned", **cells(r['finetuned'], ft_pred), 'step (val)': ft['best_step']})
    return r, table


def task_domain(row, data, cfg):
    """kNN (k=20) per test site with all train images as the bank, then across sites (bank: train
    images of site a, queries: test images of site b), and a linear probe that predicts the site from
    the features: far above the majority rate = the features encode the hospital, a shift risk."""
    X, y, S, task, K = row['X'], data['labels'], data['sites'], data['task'], data['num_classes']
    main, name, T = MAIN[task], METRIC_NAMES[MAIN[task]], cfg['knn_T']
    sites = sorted(set(S['train']) & set(S['test']))
    res, cells = {'per_site': {}, 'cross_site': {}}, {}
    for b in sites:
        q = S['test'] == b
        res['per_site'][b] = knn_accuracy(X['train'], y['train'], X['test'][q], y['test'][q], K, 20, T, task)
        cells[f'site {b} {name}'] = 100 * res['per_site'][b][main]
    for a in sites:
        for b in sites:
            bank, q = S['train'] == a, S['test'] == b
            res['cross_site'][f'{a}->{b}'] = knn_accuracy(X['train'][bank], y['train'][bank], X['test'][q], y['test'][q],
                                                           K, 20, T, task)
            cells[f'{a}→{b} {name}'] = 100 * res['cross_site'][f'{a}->{b}'][main]
    n_sites = int(max(S[s].max() for s in SPLITS)) + 1
    probe = linear_probe(X['train'], S['train'], X['val'], S['val'], X['test'], S['test'], Cs=cfg['Cs'],
                         seed=cfg['seed'], num_classes=n_sites)
    majority = float(np.bincount(S['test'], minlength=n_sites).max() / len(S['test']))
    res['site_probe'] = {**probe, 'majority_baseline': majority}
    return res, {**cells, 'site probe acc': 100 * probe['acc'], 'site probe AUROC': 100 * probe['auroc'],
                 'majority site': 100 * majority}


TASKS = {'knn': task_knn, 'linear': task_linear, 'fewshot': task_fewshot, 'finetune': task_finetune,
         'seg': task_seg, 'domain': task_domain}


def captions(data, c):
    """The line above each task's table: what was done, on which split, how many images, which seeds."""
    n = data['counts']
    test, sel = f"test, {n['test']} images", f"chosen on val ({n['val']} images)"
    return {'knn': f"**kNN** (DINO protocol: cosine on L2-normalised features; the k nearest of {n['train']} train images "
                   f"vote with weight exp(sim / {c['knn_T']})): {test}; nothing trained, nothing selected. The (val) column: the same vote "
                   f"on the {n['val']} val images, for comparing runs and settings.",
            'linear': f"**Linear probe** (logistic regression on standardised frozen features): C from "
                      f"{{{', '.join(f'{C:g}' for C in c['Cs'])}}} {sel}; {test}; seed {c['seed']}.",
            'fewshot': f"**Few-shot and data efficiency**: the linear probe on k train images per class, or on a stratified "
                       f"fraction of the train labels, C = {c['fewshot_C']:g} fixed in advance (no val labels; 100 % is the "
                       f"linear probe, C {sel}); {test}; {MAIN[data['task']]}, mean ± std over "
                       f"{c['fewshot_seeds']} draws (seeds 0-{c['fewshot_seeds'] - 1}).",
            'finetune': f"**Fine-tuning** end to end, LP-FT ({c['finetune_iters']} steps of {c['finetune_batch']} images, "
                        f"AdamW, lr {c['finetune_lr']:g}, layer decay {c['layer_decay']}, crops, flips): step {sel} at 0 (the "
                        f"probe head, encoder untouched) and every {c['finetune_eval_every']}; {test}; seed {c['seed']}.",
            'seg': f"**Segmentation** from frozen patch tokens (standardised, one linear map to a logit per class per pixel) "
                   f"fitted on {c.get('seg_n_train')} train masks (AdamW, lr {c['seg_lr']:g}), epoch (of {c['seg_epochs']}) "
                   f"{sel} by mean Dice; "
                   f"per-image Dice per foreground class, background excluded; {test}; seed {c['seed']}."
                   + (f" Fine-tuned rows: encoder and that head trained end to end from there ({c['seg_finetune_iters']} "
                      f"steps of {c['finetune_batch']} images, AdamW, lr {c['seg_finetune_lr']:g}, layer decay "
                      f"{c['layer_decay']}, no augmentation), step {sel} at 0 (the frozen head) and every "
                      f"{c['finetune_eval_every']}." if c.get('seg_finetune_iters', 0) > 0 else ''),
            'domain': f"**Domain shift** across sites (hospitals / devices): kNN (k=20) per test site with all train images; "
                      f"a→b = train images of site a, test images of site b; a linear probe predicting the site from the "
                      f"features, C {sel}; {test}."}

# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    """--key=value flags for the globals at the top; their comments are the --help text."""
    g = globals()
    with open(__file__) as f:
        helps = dict(re.findall(r"^(\w+) = .*?# (.*)$", f.read(), re.M))
    p = argparse.ArgumentParser(description='\n\n'.join(__doc__.strip().split('\n\n')[:2]), allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    def boolean(v):
        if v.lower() not in ('true', 'false', '1', '0'):
            raise ValueError(v)
        return v.lower() in ('true', '1')
    for k in KEYS:
        p.add_argument(f'--{k}', type=boolean if isinstance(g[k], bool) else type(g[k]), default=g[k],
                       help=f"{helps.get(k, '')} (default: {g[k]!r})".replace('%', '%%'))  # argparse formats %
    args, unknown = p.parse_known_args(argv)
    for u in unknown:
        close = difflib.get_close_matches(u.split('=', 1)[0].lstrip('-'), KEYS, n=1)
        p.error(f"unknown flag {u!r}; " + (f"did you mean --{close[0]}?" if close else f"valid flags: --{', --'.join(KEYS)}"))
    for key, valid in (('tasks', ['auto', *TASKS]), ('baselines', ['random', 'pixels', 'supervised', 'none'])):
        setattr(args, key, [v for v in getattr(args, key).split(',') if v not in ('', 'none')])
        for v in set(getattr(args, key)) - set(valid):
            p.error(f"unknown {key[:-1]} {v!r} in --{key}; choose from {', '.join(valid)}")
    for key, valid in (('dtype', ('auto', 'float32', 'bfloat16')), ('embedding', ('pca', 'tsne'))):
        if getattr(args, key) not in valid:
            p.error(f"--{key} must be one of {', '.join(valid)}, got {getattr(args, key)!r}")
    if args.fewshot_C <= 0:
        p.error(f"--fewshot_C must be positive, got {args.fewshot_C}")
    if args.supervised_iters < -1:
        p.error(f"--supervised_iters must be -1 (the checkpoint's max_iters), 0 (no row) or a number of steps, got {args.supervised_iters}")
    for key in ('batch_size', 'fewshot_seeds', 'finetune_batch', 'finetune_eval_every', 'supervised_eval_every'):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be at least 1, got {getattr(args, key)}")
    if args.seg_epochs < 1 and args.seg_epochs != -1:
        p.error(f"--seg_epochs must be -1 (24 for images, 48 for volumes) or at least 1, got {args.seg_epochs}")
    for key, typ, top in (('knn_ks', int, np.inf), ('shots', int, np.inf), ('fractions', float, 1)):
        try:
            setattr(args, key, [typ(v) for v in getattr(args, key).split(',') if v])
            assert all(0 < v <= top for v in getattr(args, key))
        except (ValueError, AssertionError):
            p.error(f"--{key} must be comma-separated numbers in (0, {top}], got {getattr(args, key)!r}")
    return args


def build_rows(args, ckpt, data):
    """The encoders compared, each a dict(name, make: () -> encoder module, prep: uint8 -> input tensor,
    and for the supervised row fit: (encoder, cfg) -> its classifier's results, training the encoder)."""
    config, dev, in_chans = ckpt['config'], args.device, data['images']['train'].shape[-1]
    mean, std = data['meta']['mean'], data['meta']['std']
    dims = medjepa.checkpoint_dims(ckpt)
    if dims != data['meta'].get('spatial_dims', 2):
        sys.exit(f"error: {args.ckpt} is a {dims}-D model but {data['name']} holds "
                 f"{'volumes' if dims == 2 else '2-D images'}: pass a matching --ckpt or --data_dir")
    if dims == 3:
        import medjepa3d
    build = medjepa3d.build_model if dims == 3 else medjepa.build_model
    def jepa(trained):
        torch.manual_seed(args.seed)
        model = build(config, in_chans)
        if trained:  # another data set may have other channels: adapt the filters; any image size works
            sd = {k: adapt_patch_embed(v, in_chans) if k.endswith('patch_embed.proj.weight') else v
                  for k, v in ckpt['model'].items()}
            model.load_state_dict(sd)  # strict: a mismatch is a bug, not a warning
        return model.encoder.to(dev)
    rows = [dict(name='pretrained', make=lambda: jepa(True), prep=make_prep(mean, std, dev))]
    if 'random' in args.baselines:
        rows.append(dict(name='random-init', make=lambda: jepa(False), prep=make_prep(mean, std, dev)))
    if 'supervised' in args.baselines and args.supervised_iters != 0 and data['task'] != 'segmentation':
        prep = make_prep(mean, std, dev)
        rows.append(dict(name='supervised', make=lambda: jepa(False), prep=prep,
                         fit=lambda enc, cfg: train_supervised(enc, prep, data, config, cfg)))
    if 'pixels' in args.baselines:
        rows.append(dict(name='raw pixels', make=lambda: PatchPixels(config['patch_size']), prep=make_prep(mean, std, 'cpu')))
    if args.imagenet:
        im_mean, im_std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ([np.mean(IMAGENET_MEAN)], [np.mean(IMAGENET_STD)])
        rows.append(dict(name='imagenet', make=lambda: load_imagenet_encoder(args.imagenet, in_chans)[0].to(dev),
                         prep=make_prep(im_mean, im_std, dev, args.imagenet_size)))
    return rows


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    if not os.path.isfile(args.ckpt):
        sys.exit(f"error: checkpoint {args.ckpt!r} not found. Train one first with `python medjepa.py` "
                 f"(it writes out-demo/ckpt.pt), or pass --ckpt=path/to/ckpt.pt")
    ckpt = medjepa.load_checkpoint(args.ckpt)
    out_dir = os.path.dirname(os.path.abspath(args.ckpt))
    config = ckpt['config']
    args.supervised_iters = int(config['max_iters']) if args.supervised_iters < 0 else args.supervised_iters
    ddir = args.data_dir or config['data_dir']
    # results on the checkpoint's own data: eval.*; on another data set B: eval_B.* and figures_B/, so a
    # transfer evaluation never displaces the home one (and an earlier one of each becomes *.prev.*)
    tag = '' if os.path.abspath(ddir) == os.path.abspath(config['data_dir']) else \
        '_' + re.sub(r'[^A-Za-z0-9_.-]', '_', os.path.basename(os.path.normpath(ddir)))
    for name in (f'eval{tag}.json', f'eval{tag}.md'):  # an earlier evaluation's results never pass for this one's
        if os.path.isfile(os.path.join(out_dir, name)):
            os.replace(os.path.join(out_dir, name), os.path.join(out_dir, name.replace('.', '.prev.', 1)))
    data = load_data(ddir)
    n, task, K = data['counts'], data['task'], data['num_classes']
    why_not = {'seg': 'the data set has no masks'} if data['masks'] is None else {}
    volumes = data['meta'].get('spatial_dims', 2) == 3
    if volumes:
        why_not['finetune'] = 'classification fine-tuning is 2-D only for now (volumes: probes; segmentation fine-tunes)'
    if task == 'segmentation':
        why_not.update({t: 'the data set has no volume-level labels, only masks'
                        for t in ('knn', 'linear', 'fewshot', 'finetune', 'domain')})
    if data['sites'] is None or len(set(data['sites']['train']) & set(data['sites']['test'])) < 2:
        why_not['domain'] = 'the data set has no sites, or only one in train and test'
    todo = [t for t in TASKS if t not in why_not] if args.tasks == ['auto'] else args.tasks
    for t in todo:
        if t in why_not:
            sys.exit(f"error: task '{t}' cannot run on {ddir}: {why_not[t]}")
    leaks = leakage_report(data)
    leaky = any(v for pair in leaks.values() for v in pair.values())
    if leaky:
        print(f"WARNING: splits share groups or identical images, every number below is optimistic: {leaks}")
    dtype = medjepa.resolve_dtype(args.dtype, args.device)
    cfg = {**vars(args), 'dtype': dtype, 'Cs': CS, 'knn_ks': [k for k in args.knn_ks if k <= n['train'] / max(K, 1)] or [1]}
    token_idx = None
    if 'seg' in todo:  # patch tokens are big: a seeded subset of train, all of val and test
        n_seg = n['train'] if args.seg_train <= 0 else min(args.seg_train, n['train'])
        token_idx = {'train': np.sort(np.random.default_rng(args.seed).permutation(n['train'])[:n_seg]),
                     'val': np.arange(n['val']), 'test': np.arange(n['test'])}
        cfg['seg_classes'] = int(max(np.max(data['masks'][s]) for s in SPLITS)) + 1
        cfg['seg_names'] = data['meta'].get('mask_classes') or ['background'] + (
            ['foreground'] if cfg['seg_classes'] == 2 else [f'class {c}' for c in range(1, cfg['seg_classes'])])
        cfg['seg_n_train'] = n_seg
        if args.seg_lr < 0:  # a volume's head learns K*pd*ph*pw logits per token: at 3e-3 it is far from done
            cfg['seg_lr'] = 0.1 if volumes else 3e-3
        if args.seg_epochs < 0:  # every row's head near its plateau on val (docs/evaluation.md)
            cfg['seg_epochs'] = 48 if volumes else 24

    rows, results, tables = build_rows(args, ckpt, data), {}, {t: [] for t in todo}
    for row in rows:
        t1 = time.time()
        row['encoder'], row['token_idx'] = row.pop('make')(), token_idx
        fit = row.pop('fit')(row['encoder'], cfg) if 'fit' in row else None  # the supervised row learns first
        t_fit, t1 = time.time() - t1, time.time()
        pixels = isinstance(row['encoder'], PatchPixels)
        row['X'], row['tokens'] = {}, {}
        for s in SPLITS:  # one frozen pass per split: pooled features for every task, patch tokens for seg
            row['X'][s], row['tokens'][s] = encode(row['encoder'], row['prep'], data['images'][s], args.batch_size,
                                                   token_idx and token_idx[s], amp=dtype == 'bfloat16' and not pixels)
            if pixels:  # the probes see area-averaged pixels; segmentation sees each patch's pixels
                row['X'][s] = pixel_features(data['images'][s], args.pixel_size, data['meta']['mean'], data['meta']['std'])
        res = row['results'] = {'feature_dim': int(row['X']['train'].shape[1]), 'feature_time_s': round(time.time() - t1, 2)}
        if fit:
            res.update(classifier=fit, train_time_s=round(t_fit, 2))
        for t in todo:
            t2 = time.time()
            r, cells = TASKS[t](row, data, cfg)
            if r is not None:
                res[t], res[t + '_time_s'] = r, round(time.time() - t2, 2)
                tables[t] += [{'encoder': row['name'], **c} for c in (cells if isinstance(cells, list) else [cells])]
        row['tokens'] = None  # the biggest arrays: free them before the next row
        results[row['name']] = res
        print(f"{row['name']}: " + (f"trained with the labels in {t_fit:.1f}s, " if fit else '')
              + f"{res['feature_dim']}-dim features in {res['feature_time_s']:.1f}s, "
              + ', '.join(f"{t} in {res[t + '_time_s']:.1f}s" for t in todo if t + '_time_s' in res), flush=True)

    figs = []  # drawn once the numbers are on disk (below)
    caps = captions(data, cfg)
    notes = ["Rows: pretrained = the checkpoint's encoder (mean-pooled tokens); random-init = the same architecture "
             f"untrained (torch.manual_seed({args.seed})); raw pixels = images area-averaged to "
             + (f"{args.pixel_size}x{args.pixel_size}" if data['images']['train'].ndim == 4 else f"{max(1, args.pixel_size // 2)}^3")
             + " and normalised (segmentation: each patch's pixels)"
             + (f"; imagenet = {args.imagenet} at {args.imagenet_size} px" if args.imagenet else '') + f". Features in {dtype}."]
    if 'supervised' in results:
        c, m = results['supervised']['classifier'], METRIC_NAMES[MAIN[task]]
        notes.append(f"supervised = the same architecture trained with the train labels ({c['iters']} steps of {c['batch']} "
                     f"images as in pretraining, its crops and flips, AdamW lr {c['lr']:g}, warmup + cosine, linear head on "
                     f"mean-pooled tokens), step {c['best_step']} chosen on val: the ceiling; its own classifier scores "
                     f"test {m} {100 * c[MAIN[task]]:.1f}.")
    w = ckpt['model'].get('encoder.patch_embed.proj.weight')
    if w is not None and w.shape[1] != data['images']['train'].shape[-1]:
        notes.append(f"The checkpoint saw {w.shape[1]}-channel images; its patch filters were adapted to "
                     f"{data['images']['train'].shape[-1]} (adapt_patch_embed).")
    if leaky:
        notes.append(f"**WARNING: leakage between splits** (shared groups / identical images): {leaks}")
    if set(args.knn_ks) - set(cfg['knn_ks']):
        notes.append(f"kNN k={sorted(set(args.knn_ks) - set(cfg['knn_ks']))} skipped: more than train images / classes "
                     f"({n['train']}/{K}).")
    md = (f"**{data['name']}** ({task}, {K} classes): {n['train']} train / {n['val']} val / {n['test']} test images. "
          f"Checkpoint {args.ckpt} (iter {ckpt.get('iter_num', '?')}, pretraining seed {config.get('seed', '?')}). "
          f"All numbers in %, on **test**; every choice made on **val**.\n\n"
          + '\n'.join(format_table(tables[t], title=caps[t]) for t in todo if tables[t])
          + '\n' + '\n'.join(notes) + '\n')
    elapsed = time.time() - t0
    label_counts = (lambda y: y.sum(0)) if task == 'multilabel' else (lambda y: np.bincount(y[y >= 0], minlength=K))
    report = {
        'dataset': data['name'], 'data_dir': ddir, 'task': task, 'classes': data['meta'].get('classes'), 'counts': n,
        'class_counts': {s: label_counts(data['labels'][s]) for s in SPLITS}, 'report_split': 'test',
        'selection_split': 'val', 'leakage': leaks, 'tasks': todo, 'tasks_not_run': why_not, 'seed': args.seed,
        'pretrain_seed': config.get('seed'), 'Cs': CS, 'feature_dtype': dtype, 'ckpt': args.ckpt,
        'iter_num': ckpt.get('iter_num'), 'ckpt_config': config, 'settings': cfg, 'results': results, 'figures': figs,
        'elapsed_s': round(elapsed, 2), 'versions': {'python': platform.python_version(), 'torch': torch.__version__,
                                                     'numpy': np.__version__, 'sklearn': sklearn.__version__},
    }
    json_path, md_path = os.path.join(out_dir, f'eval{tag}.json'), os.path.join(out_dir, f'eval{tag}.md')
    atomic_write(json_path, json.dumps(to_json(report), indent=2) + '\n')
    atomic_write(md_path, md)
    if args.figures:  # optional, so after the numbers are safe; a figure that fails is a warning (eval_figures)
        figs = report['figures'] = eval_figures.draw_figures(rows, results, data, cfg, out_dir,
                                                             METRIC_NAMES[MAIN[task]], 'figures' + tag)
        md += f"\nFigures: {', '.join(figs)}\n" if figs else ''
        atomic_write(json_path, json.dumps(to_json(report), indent=2) + '\n')
        atomic_write(md_path, md)
    print('\n' + md)
    print(f"wrote {json_path}, eval{tag}.md and {len(figs)} figures; total {elapsed:.1f}s")
    return report


if __name__ == '__main__':
    try:
        main()
    except (medjepa.ConfigError, FileNotFoundError) as e:  # bad data, a torch too old to load safely: one line
        print(f'eval.py: error: {e}', file=sys.stderr)
        sys.exit(2)
