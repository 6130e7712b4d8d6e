"""
Evaluate a MedJEPA encoder the way self-supervised papers do, next to baselines run with the same
protocol, and draw the pictures that show what it learned.

    python eval.py --ckpt=out-demo-views/ckpt.pt                       # every task the data support
    python eval.py --ckpt=out-demo-views/ckpt.pt --tasks=knn,linear    # the quick frozen-feature part
    python eval.py --ckpt=out-demo-views/ckpt.pt --imagenet=vit_b16.pth   # add an ImageNet ViT-B/16 row
    python eval.py --ckpt=out-demo-views/ckpt.pt --device=cuda --finetune_iters=2000 --seg_epochs=100
    python eval.py --help                                              # every flag, with its default

On the demo data (6000/999/2001 images at 64 px, encoder 6 x 192) the default run takes about
3 minutes on 2 CPU cores. It prints one markdown table per task and writes eval.json (every number,
the settings, seeds and data set), eval.md (the tables) and figures/*.png next to the checkpoint.
docs/evaluation.md explains each protocol at more length.

The lesson: a representation is good if the label is easy to read out of it. The tasks ask that
question in different ways (SPEC.md section 4), each in its own table with one row per encoder:

    knn       no training at all: do the k most similar train images (cosine) share the label?
    linear    a logistic regression on frozen features: is the label linearly there?
    fewshot   the same probe with 1/5/10/20 labels per class, and 1 %/10 %/100 % of the labels
    finetune  the whole encoder trained on the labels (layer-wise lr decay): a good start?
    seg       a per-token linear head on frozen patch tokens -> lesion masks, Dice per class
    domain    kNN per hospital and across hospitals; can a linear probe tell the hospitals apart?

Rows: the checkpoint, the same architecture untrained (random-init: what the architecture alone
gives), raw pixels (what needs no learning), and optionally an ImageNet ViT (what transfer gives).

Honesty rules, enforced by the code and checked by tests/test_eval.py:
  every choice (C of a probe, fine-tuning step, segmentation epoch) is made on VAL; TEST is read
  once per reported number, after the choice; a table never reports the best of several test runs.
  Each table says its split, its number of images and its seeds. Before anything runs, the splits
  are checked for shared patients (groups) and byte-identical images, a leak that would let test
  images into training or selection.

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
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score,
                             roc_auc_score)
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import medjepa


# -----------------------------------------------------------------------------
# defaults (override with --key=value)
ckpt = 'out-demo/ckpt.pt'   # checkpoint written by medjepa.py; eval.json / eval.md / figures/ go next to it
data_dir = ''               # data set folder; '' = the one the checkpoint was trained on
tasks = 'auto'              # comma-separated keys of TASKS (knn,linear,fewshot,finetune,seg,domain); auto = all the data support
baselines = 'random,pixels' # rows besides the checkpoint: random-init encoder, raw pixels ('none' = no rows)
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
finetune_iters = 60         # fine-tuning steps (a short run on CPU; use thousands on a GPU)
finetune_batch = 32         # fine-tuning images per step
finetune_lr = 5e-4          # fine-tuning peak lr of the head and the last block; earlier layers get less
layer_decay = 0.75          # layer-wise lr decay: block i of L gets lr * layer_decay ** (L - i)
finetune_eval_every = 20    # fine-tuning: score val every this many steps (and at step 0); the best val step is tested
seg_train = 1000            # segmentation: train images (random subset) the head is fitted on; 0 = all
seg_epochs = 8              # segmentation: passes over those images; the best val epoch is tested
seg_lr = 3e-3               # segmentation head learning rate (AdamW)
figures = True              # draw figures/*.png next to the checkpoint
embedding = 'pca'           # 2-D embedding map: 'pca' (instant) or 'tsne' (slower, often clearer clusters)
CS = [1e-3, 1e-2, 1e-1, 1e0, 1e1, 1e2]  # linear-probe inverse regularisation strengths tried on val


# -----------------------------------------------------------------------------

SPLITS = ('train', 'val', 'test')
SUPPORTED = ('multiclass', 'binary', 'ordinal', 'multilabel')
# the metric that selects on val and heads the few-shot / domain tables; ordinal grades use QWK (APTOS)
MAIN = {'multiclass': 'acc', 'binary': 'acc', 'ordinal': 'qwk', 'multilabel': 'auroc'}
METRIC_NAMES = {'acc': 'acc', 'bal_acc': 'bal-acc', 'macro_f1': 'macro-F1', 'auroc': 'AUROC', 'qwk': 'QWK'}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm augreg models use 0.5, 0.5


# -----------------------------------------------------------------------------
# data


def check_task(meta):
    """Fail early, with the name of the problem, on label types this version cannot score."""
    task = meta.get('task', 'multiclass')
    if task not in SUPPORTED:
        raise NotImplementedError(f"eval.py does not support task '{task}' (data set '{meta.get('name', '?')}'): "
                                  f"supported are {', '.join(SUPPORTED)}")
    return task


def load_data(ddir):
    """Everything eval needs from a prepare.py folder (docs/data_format.md), memory-mapped.

    -> dict(meta, task, num_classes, images, labels, masks, sites, groups); each of the last five is
    {split: array} or None when the data set lacks it. Labels are (N,) ints, or (N, L) 0/1 for multi-label.
    """
    meta = medjepa.read_meta(ddir)
    task = check_task(meta)
    raw = {s: medjepa.load_split(ddir, s) for s in SPLITS}
    data = {'meta': meta, 'task': task, 'name': meta.get('name', os.path.basename(os.path.normpath(ddir)))}
    for key in ('images', 'labels', 'masks', 'sites', 'groups'):
        data[key] = {s: raw[s][key] for s in SPLITS} if all(raw[s][key] is not None for s in SPLITS) else None
    if data['labels'] is None:
        sys.exit(f"error: {ddir} has no labels for every split; evaluation needs them")
    shape = (-1, meta['num_classes']) if task == 'multilabel' else (-1,)
    data['labels'] = {s: np.asarray(v).astype(np.int64).reshape(shape) for s, v in data['labels'].items()}
    for key in ('sites', 'groups'):
        if data[key] is not None:
            data[key] = {s: np.asarray(v).astype(np.int64).reshape(-1) for s, v in data[key].items()}
    data['num_classes'] = int(meta['num_classes'])
    data['counts'] = {s: int(len(data['labels'][s])) for s in SPLITS}
    return data


def leakage_report(data):
    """Test images that also sit in train or val make every number optimistic (and let selection
    on val see test images). Counts shared group ids (patients / lesions) and byte-identical images
    between each pair of splits. -> {'train/test': {'groups': n, 'images': n}, ...}"""
    digests = {s: {hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).digest()
                   for im in data['images'][s]} for s in SPLITS}
    report = {}
    for a, b in (('train', 'test'), ('val', 'test'), ('train', 'val')):
        shared = len(set(data['groups'][a]) & set(data['groups'][b])) if data['groups'] else 0
        report[f'{a}/{b}'] = {'groups': shared, 'images': len(digests[a] & digests[b])}
    return report


# -----------------------------------------------------------------------------
# metrics


def classification_metrics(y_true, y_score, task='multiclass'):
    """y_true (N,) int labels or (N, L) 0/1, y_score (N, K) class scores or probabilities -> dict.

    acc / bal_acc / macro_f1 use the argmax prediction; balanced accuracy (mean per-class recall)
    matters because "always say the common class" scores high accuracy on imbalanced medical data.
    AUROC ranks the scores: for K = 2 the positive class; for K > 2 the mean one-vs-rest AUROC
    (MedMNIST's "AUC") over the classes with positives and negatives; NaN if undefined.
    'ordinal' adds quadratic weighted kappa (disagreements cost (i - j)^2: grade 4 for a 0 is
    worse than a 1). 'multilabel': per-label AUROC, their mean, and macro-F1 at threshold 0.5.
    """
    y_score = np.asarray(y_score, dtype=np.float64)
    if task == 'multilabel':
        y_true = np.asarray(y_true)
        per = [roc_auc_score(y_true[:, l], y_score[:, l]) if 0 < y_true[:, l].sum() < len(y_true) else float('nan')
               for l in range(y_true.shape[1])]
        return {'auroc': float(np.nanmean(per)) if not np.all(np.isnan(per)) else float('nan'),
                'per_label_auroc': [float(a) for a in per],
                'macro_f1': float(f1_score(y_true, y_score >= 0.5, average='macro', zero_division=0)),
                'n': int(len(y_true))}
    y_true = np.asarray(y_true).reshape(-1)
    K = y_score.shape[1]
    y_pred = y_score.argmax(1)
    if K == 2:
        auroc = roc_auc_score(y_true, y_score[:, 1]) if len(np.unique(y_true)) == 2 else float('nan')
    else:
        present = [c for c in range(K) if 0 < (y_true == c).sum() < len(y_true)]
        per_class = [roc_auc_score(y_true == c, y_score[:, c]) for c in present]
        auroc = float(np.mean(per_class)) if per_class else float('nan')
    out = {'acc': float(accuracy_score(y_true, y_pred)),
           'bal_acc': float(balanced_accuracy_score(y_true, y_pred)),
           'macro_f1': float(f1_score(y_true, y_pred, average='macro', zero_division=0)),
           'auroc': float(auroc), 'n': int(len(y_true))}
    if task == 'ordinal':
        out['qwk'] = float(cohen_kappa_score(y_true, y_pred, weights='quadratic'))
    return out


def dice_per_class(pred, target, num_classes):
    """Per-image Dice 2|P & G| / (|P| + |G|) of every FOREGROUND class c = 1..K-1, averaged over the
    images where the class is in the prediction or the ground truth (an image with neither says
    nothing about c). Background (0) is excluded: it is most of each image and would make every
    model look good. pred, target: (N, *spatial) ints, 2-D or 3-D alike. -> [Dice of class 1, ...]
    """
    pred, target = np.asarray(pred), np.asarray(target)
    axes = tuple(range(1, pred.ndim))
    out = []
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
# encoders and features. A row = dict(name, encoder or None, prep: uint8 (B, H, W, C) -> (B, C, S, S)).


def pixel_features(images_uint8, size=16, mean=None, std=None, chunk=1024):
    """Raw-pixel baseline: (N, H, W, C) uint8 -> (N, size*size*C) float32.

    Area averaging = each output pixel is the mean of the input pixels it covers (adaptive average
    pooling), so no detail is invented and nothing is skipped. Values are scaled to [0, 1], then, if
    mean/std (per channel, [0, 1] units) are given, normalised the way the encoder sees its input,
    so that cosine similarity in kNN is not dominated by overall brightness. Flattened in (h, w, c)
    order. Works in chunks so a memory-mapped split is never converted to float all at once.
    """
    N, H, W, C = images_uint8.shape
    out = np.empty((N, size * size * C), dtype=np.float32)
    for i in range(0, N, chunk):
        x = torch.from_numpy(np.asarray(images_uint8[i:i + chunk], dtype=np.float32) / 255.0)  # (B, H, W, C)
        x = torch.nn.functional.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), size)  # (B, C, size, size)
        x = x.permute(0, 2, 3, 1)  # (B, size, size, C)
        if mean is not None:
            x = (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
        out[i:i + chunk] = x.reshape(len(x), -1).numpy()
    return out


def make_prep(mean, std, dev, size=None):
    """uint8 (B, H, W, C) numpy -> normalised (B, C, S, S) tensor on dev, resized to size if given."""
    def prep(images):
        x = medjepa.to_float(images, mean, std, dev)
        return x if size is None or x.shape[-1] == size else F.interpolate(x, size=(size, size), mode='bilinear',
                                                                           antialias=True, align_corners=False)
    return prep


class PatchPixels(nn.Module):
    """The raw-pixel 'encoder' for segmentation: each token is its patch's normalised pixels."""
    def __init__(self, patch_size):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x):  # (B, C, H, W) -> (B, N, p*p*C), tokens in row-major grid order like the ViT's
        p = self.patch_size
        x = F.unfold(x, p, stride=p)  # (B, C*p*p, N)
        return x.transpose(1, 2)


@torch.no_grad()
def encode(encoder, prep, images, bs=256, token_idx=None, amp=False):
    """One frozen pass over a split -> (pooled (N, D) float32 numpy, tokens or None).

    pooled = mean of the output tokens (medjepa.extract_features does the same). tokens: the patch
    tokens of the images in token_idx, (n, gh, gw, D) float16 numpy, for the segmentation head.
    bf16 autocast changes features by ~0.1 % (measured on the demo) and halves CPU time.
    """
    encoder.eval()
    pooled, tokens, grid = [], [], None
    for i in range(0, len(images), bs):
        x = prep(images[i:i + bs])  # (B, C, S, S)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            t = encoder(x)  # (B, N, D)
        pooled.append(t.float().mean(1).cpu())
        if token_idx is not None:
            grid = (x.shape[2] // encoder.patch_size, x.shape[3] // encoder.patch_size)
            sel = token_idx[(token_idx >= i) & (token_idx < i + bs)] - i
            tokens.append(t[torch.as_tensor(sel, device=t.device)].half().cpu())
    pooled = torch.cat(pooled).numpy()
    if token_idx is None:
        return pooled, None
    return pooled, torch.cat(tokens).view(len(token_idx), *grid, -1).numpy()


class LearnedPosViT(medjepa.ViT):
    """Our ViT with the learned position table of an ImageNet checkpoint instead of fixed sin-cos
    positions, resized (bicubic, like timm's resample_abs_pos_embed) to whatever grid it is given."""
    def __init__(self, in_chans, patch_size, n_embd, n_layer, n_head, pos_grid):
        super().__init__(in_chans, patch_size, n_embd, n_layer, n_head)
        self.register_buffer('learned_pos', torch.zeros(1, pos_grid[0] * pos_grid[1], n_embd))
        self.pos_grid = pos_grid

    def pos_embed(self, grid, device):
        pos = self.learned_pos.view(1, *self.pos_grid, -1).permute(0, 3, 1, 2)  # (1, D, gh0, gw0)
        if tuple(grid) != tuple(self.pos_grid):
            pos = F.interpolate(pos, size=tuple(grid), mode='bicubic', align_corners=False)
        return pos.flatten(2).transpose(1, 2)[0].to(device)  # (gh*gw, D)


def imagenet_to_medjepa(sd, in_chans=3):
    """Map a timm-layout ViT state dict (vit_base_patch16_224 and friends; also DeiT, MAE, DINO
    checkpoints, wrapped in 'model' / 'state_dict' or prefixed 'module.') onto medjepa.ViT.

    Our encoder already uses timm's names (patch_embed.proj, blocks.i.norm1 / attn.qkv / attn.proj /
    norm2 / mlp.fc1 / mlp.fc2, norm), so most keys copy as they are. The differences:
      pos_embed (1, 1 + 14*14, D): the class-token position is dropped, the rest -> learned_pos;
      cls_token, dist_token, head*, pre_logits: dropped (we mean-pool patch tokens, no classifier);
      grey / other channel counts: patch weights summed over RGB (timm's adapt_input_conv) or tiled.
    -> (state dict for LearnedPosViT, dict(patch_size, n_embd, n_layer, n_head, pos_grid)).
    Heads are not stored in a state dict: ViTs use 64-dim heads, so n_head = n_embd // 64.
    """
    for wrapper in ('model', 'state_dict', 'teacher'):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    sd = {re.sub(r'^(module\.|backbone\.)', '', k): v for k, v in sd.items()}
    drop = re.compile(r'^(cls_token|dist_token|head|head_dist|pre_logits|fc_norm\.)')
    unknown = [k for k in sd if not drop.match(k) and k != 'pos_embed'
               and not re.match(r'^(patch_embed\.proj\.|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.|norm\.)', k)]
    if unknown or 'pos_embed' not in sd:
        raise ValueError(f"not a timm-layout ViT state dict: unexpected keys {unknown[:5]}" if unknown
                         else "not a timm-layout ViT state dict: no pos_embed")
    out = {k: v for k, v in sd.items() if not drop.match(k) and k != 'pos_embed'}
    w = out['patch_embed.proj.weight']  # (D, 3, p, p)
    if w.shape[1] != in_chans:
        out['patch_embed.proj.weight'] = (w.sum(1, keepdim=True) if in_chans == 1
                                          else w.repeat(1, math.ceil(in_chans / w.shape[1]), 1, 1)[:, :in_chans]
                                          * w.shape[1] / in_chans)
    pos = sd['pos_embed']  # (1, prefix + gh0*gw0, D)
    n_prefix = next(n for n in (0, 1, 2) if math.isqrt(pos.shape[1] - n) ** 2 == pos.shape[1] - n)
    out['learned_pos'] = pos[:, n_prefix:]
    g = math.isqrt(pos.shape[1] - n_prefix)
    D = w.shape[0]
    arch = dict(patch_size=w.shape[-1], n_embd=D, n_head=D // 64, pos_grid=(g, g),
                n_layer=1 + max(int(k.split('.')[1]) for k in out if k.startswith('blocks.')))
    return out, arch


def load_imagenet_encoder(path, in_chans):
    sd = torch.load(path, map_location='cpu', weights_only=True)
    mapped, arch = imagenet_to_medjepa(sd, in_chans)
    enc = LearnedPosViT(in_chans, arch['patch_size'], arch['n_embd'], arch['n_layer'], arch['n_head'], arch['pos_grid'])
    enc.load_state_dict(mapped)  # strict: a missing or extra tensor is an error, not a warning
    return enc, arch


# -----------------------------------------------------------------------------
# frozen-feature probes: kNN and logistic regression


def knn_scores(train_x, train_y, query_x, num_classes, k=20, T=0.07, task='multiclass'):
    """DINO kNN (medjepa.knn_predict) as vote shares (N, K), rows summing to 1, so that AUROC
    compares like with like across images. Multi-label: per label, the share of votes for 'present'."""
    def shares(y, K):
        s = medjepa.knn_predict(train_x, y, query_x, K, k=k, T=T)
        return s / np.maximum(s.sum(1, keepdims=True), 1e-12)
    if task == 'multilabel':
        return np.stack([shares(train_y[:, l], 2)[:, 1] for l in range(train_y.shape[1])], 1)
    return shares(train_y, num_classes)


def knn_accuracy(train_x, train_y, test_x, test_y, num_classes, k=20, T=0.07, task='multiclass'):
    """kNN with the train set as memory bank -> classification_metrics on test, plus k and T."""
    scores = knn_scores(train_x, train_y, test_x, num_classes, k, T, task)
    return {**classification_metrics(test_y, scores, task), 'k': k, 'T': T}


def fit_logreg(X, y, C, seed, num_classes, multilabel=False, max_iter=1000):
    """Logistic regression(s) on standardised features -> (scores function X -> (N, K), iterations).
    Multi-class: one multinomial (softmax) model; multi-label: one binary model per label."""
    targets = [y[:, l] for l in range(y.shape[1])] if multilabel else [y]
    fits = []
    for t in targets:
        if len(np.unique(t)) < 2:  # a label that never varies in this subset: predict it with certainty
            fits.append(int(t[0]))
            continue
        clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        # One BLAS thread: these matrix products are tiny, and on a shared 2-core machine OpenBLAS's
        # spinning worker threads made the probe 50-100x slower (measured), not faster.
        with warnings.catch_warnings(), threadpool_limits(1, user_api='blas'):
            warnings.simplefilter('ignore', ConvergenceWarning)  # recorded via n_iter instead of spammed
            fits.append(clf.fit(X, t))
    def scores(Xq):
        if multilabel:
            return np.stack([np.full(len(Xq), float(f)) if isinstance(f, int) else f.predict_proba(Xq)[:, 1]
                             for f in fits], 1)
        proba = np.zeros((len(Xq), num_classes))
        if isinstance(fits[0], int):
            proba[:, fits[0]] = 1
        else:  # classes absent from train get probability 0
            proba[:, fits[0].classes_] = fits[0].predict_proba(Xq)
        return proba
    return scores, max([int(f.n_iter_.max()) for f in fits if not isinstance(f, int)] or [0])


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, Cs=CS, seed=0, num_classes=None,
                 task='multiclass', unlabeled=None, max_iter=1000):
    """Logistic regression on frozen features, C chosen on val, reported on test once.

    Standardisation statistics come from `unlabeled` (default: train_x; few-shot runs pass the whole
    train set, whose statistics need no labels). For each C: fit on train, score val with MAIN[task].
    The model with the best val score (ties -> the smaller C, the simpler model) is the only one that
    sees test; nothing is refit, and test_y is read once, for that final score.
    -> test metrics + 'C' (chosen) + 'val' {C: val score} + 'select' (metric) + 'n_iter' {C: iters}.
    """
    K = num_classes or int(max(train_y.max(), val_y.max(), test_y.max())) + 1
    # float32: each lbfgs step streams the features through memory twice; half the bytes is ~1.6x faster
    train_x, val_x, test_x = (np.asarray(x, dtype=np.float32) for x in (train_x, val_x, test_x))
    scaler = StandardScaler().fit(train_x if unlabeled is None else np.asarray(unlabeled, np.float32))
    Xtr, Xva = scaler.transform(train_x), scaler.transform(val_x)
    select = MAIN[task]
    val, n_iter, unconverged = {}, {}, []
    best, best_score = None, -np.inf
    for C in sorted(Cs):
        score_fn, n_iter[C] = fit_logreg(Xtr, train_y, C, seed, K, task == 'multilabel', max_iter)
        if n_iter[C] >= max_iter:
            unconverged.append(C)
        val[C] = classification_metrics(val_y, score_fn(Xva), task)[select]
        if val[C] > best_score:  # strict: ties keep the smaller C
            best, best_score, best_C = score_fn, val[C], C
    test = classification_metrics(test_y, best(scaler.transform(test_x)), task)  # the one look at test
    return {**test, 'C': float(best_C), 'val': val, 'select': select, 'n_iter': n_iter, 'unconverged_Cs': unconverged}


def few_shot_indices(labels, k, seed):
    """k train images of every class (all of them if a class has fewer), sorted indices.
    Nested: the 1-shot images of a seed are among its 5-shot images, etc., which smooths the curve."""
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]))


def fraction_indices(labels, frac, seed):
    """A random fraction of the train images: stratified (at least one per class) for single-label
    data, a plain random subset for multi-label. Sorted indices."""
    rng = np.random.default_rng(seed)
    if labels.ndim == 2:
        return np.sort(rng.permutation(len(labels))[:max(1, round(frac * len(labels)))])
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    return np.sort(np.concatenate([idx[:max(1, round(frac * len(idx)))] for idx in by_class]))


# -----------------------------------------------------------------------------
# fine-tuning end to end


def layerwise_param_groups(encoder, head, lr, decay, weight_decay=0.05):
    """AdamW groups with layer-wise lr decay (BEiT / MAE fine-tuning): the head and final norm get lr,
    block i of L gets lr * decay^(L - i), the patch embedding lr * decay^(L + 1). Early layers hold
    generic features that a few labels should nudge, not rewrite. No decay on biases and norms."""
    L = len(encoder.blocks)
    def depth(name):
        if name.startswith('blocks.'):
            return int(name.split('.')[1]) + 1
        return 0 if name.startswith('patch_embed') or name == 'learned_pos' else L + 1
    groups = {}
    named = [(depth(n), p) for n, p in encoder.named_parameters()] + [(L + 1, p) for p in head.parameters()]
    for d, p in named:
        g = groups.setdefault((d, p.ndim >= 2), {'params': [], 'base_lr': lr * decay ** (L + 1 - d),
                                                 'weight_decay': weight_decay if p.ndim >= 2 else 0.0})
        g['params'].append(p)
    return list(groups.values())


@torch.no_grad()
def predict(encoder, head, prep, images, task, bs=256, amp=False):
    """Class probabilities (N, K): softmax, or sigmoid per label for multi-label."""
    encoder.eval()
    out = []
    for i in range(0, len(images), bs):
        x = prep(images[i:i + bs])
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = head(encoder(x).mean(1)).float()
        out.append((logits.sigmoid() if task == 'multilabel' else logits.softmax(1)).cpu())
    return torch.cat(out).numpy()


def classifier_loss(logits, y, task):
    """Cross-entropy; for multi-label, one binary cross-entropy per label."""
    return F.binary_cross_entropy_with_logits(logits, y.float()) if task == 'multilabel' else F.cross_entropy(logits, y)


def fit_head(feats, y, task, num_classes, max_iter=500):
    """A linear head on frozen features, the "LP" of LP-FT: logistic regression on standardised
    features by full-batch L-BFGS (like the probe's solver), with the standardisation folded into
    the weights afterwards, so that it applies to raw features. (N, D) -> nn.Linear(D, K)."""
    x, y = torch.as_tensor(feats, dtype=torch.float32), torch.as_tensor(y)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    head = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=max_iter, history_size=20, line_search_fn='strong_wolfe')
    def closure():
        opt.zero_grad()
        loss = classifier_loss(head(z), y, task) + 1e-4 * head.weight.pow(2).sum()  # a little L2, like C = 1e4 / N
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():  # w.(x - mu)/sd + b  =  (w/sd).x + (b - (w/sd).mu)
        head.weight /= sd
        head.bias -= head.weight @ mu
    return head


def finetune(encoder, prep, train_feats, data, cfg):
    """Fine-tune a copy of the encoder + a linear head on the train labels; pick the step on val; test once.

    LP-FT (Kumar et al. 2022): the head first learns on the frozen train features (train_feats), so
    fine-tuning starts from a sensible classifier; a random head's large early gradients would
    scramble the pretrained features before it has learned anything. Then warmup + cosine lr, AdamW
    with layer-wise decay, random-resized crops and flips. At step 0 (the probe head on the untouched
    encoder) and every finetune_eval_every steps the val score (MAIN metric) is measured and the
    weights of the best step are kept; at the end those weights, and only they, are scored on test.
    A chosen step 0 means: within this budget, fine-tuning did not beat its starting point on val.
    """
    images, labels, task, K = data['images'], data['labels'], data['task'], data['num_classes']
    dev, amp, iters = cfg['device'], cfg['dtype'] == 'bfloat16', cfg['finetune_iters']
    head = fit_head(train_feats, labels['train'], task, K).to(dev)
    model = copy.deepcopy(encoder).to(dev)
    opt = torch.optim.AdamW(layerwise_param_groups(model, head, cfg['finetune_lr'], cfg['layer_decay']))
    gen, rng = torch.Generator().manual_seed(cfg['seed']), np.random.default_rng(cfg['seed'])
    n, B, warm = len(labels['train']), min(cfg['finetune_batch'], len(labels['train'])), max(1, iters // 10)
    select, val, best = MAIN[task], {}, (-np.inf, None, None)
    for step in range(iters + 1):
        if step % cfg['finetune_eval_every'] == 0 or step == iters:  # step 0 = LP-FT's starting point
            val[step] = classification_metrics(labels['val'], predict(model, head, prep, images['val'], task, amp=amp),
                                               task)[select]
            if val[step] > best[0]:  # strict: ties keep the earlier step
                best = (val[step], step, copy.deepcopy((model.state_dict(), head.state_dict())))
        if step == iters:
            break
        model.train()
        lr_scale = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, iters - warm)))
        for g in opt.param_groups:
            g['lr'] = g['base_lr'] * lr_scale
        idx = np.sort(rng.choice(n, B, replace=False))
        x = prep(images['train'][idx])  # (B, C, S, S)
        x = medjepa.random_resized_crop(x, x.shape[-1], (0.5, 1.0), gen)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = head(model(x).mean(1)).float()  # (B, K)
        loss = classifier_loss(logits, torch.as_tensor(labels['train'][idx], device=dev), task)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), 1.0)
        opt.step()
    model.load_state_dict(best[2][0])
    head.load_state_dict(best[2][1])
    test = classification_metrics(labels['test'], predict(model, head, prep, images['test'], task, amp=amp), task)
    return {**test, 'best_step': best[1], 'val': val, 'select': select, 'final_loss': float(loss.detach()) if iters else None}


# -----------------------------------------------------------------------------
# segmentation: a light head on frozen patch tokens. It works on a token GRID of any dimension,
# (N, gh, gw, D) for images or (N, gd, gh, gw, D) for volumes, so the 3-D code can reuse it.


def seg_logits(head, tokens, patch, out_size):
    """tokens (B, *grid, D) -> per-pixel class logits (B, K, *out_size).

    The head maps each token to K x p^d logits, one K-vector per pixel of its patch (a 'sub-pixel'
    linear decoder, as in SETR-naive / Segmenter's linear baseline), which are put back in place.
    If the grid of patches does not cover out_size exactly (e.g. a resized input), the logits are
    resized (bilinear / trilinear).
    """
    B, grid = tokens.shape[0], tokens.shape[1:-1]
    d, p = len(grid), patch
    x = head(tokens)  # (B, *grid, K * p^d)
    K = x.shape[-1] // p ** d
    x = x.view(B, *grid, K, *([p] * d))  # (B, g1..gd, K, p..p)
    x = x.permute(0, d + 1, *[i for j in range(d) for i in (1 + j, d + 2 + j)])  # (B, K, g1, p, g2, p, ...)
    x = x.reshape(B, K, *[g * p for g in grid])  # (B, K, g1*p, ..., gd*p)
    if tuple(x.shape[2:]) != tuple(out_size):
        x = F.interpolate(x, size=tuple(out_size), mode='bilinear' if d == 2 else 'trilinear', align_corners=False)
    return x


def train_segmentation(tokens, masks, patch, num_classes, cfg):
    """Fit standardise + Linear(D, K p^d) on frozen tokens; pick the epoch on val mean Dice; test once.
    tokens / masks: {split: array}. -> (results, test predictions (N, *spatial) uint8)."""
    torch.manual_seed(cfg['seed'])
    D = tokens['train'].shape[-1]
    flat = tokens['train'].reshape(-1, D).astype(np.float32)
    mu, sd = torch.from_numpy(flat.mean(0)), torch.from_numpy(flat.std(0) + 1e-6)  # train statistics only
    linear = nn.Linear(D, num_classes * patch ** (tokens['train'].ndim - 2))
    head = lambda t: linear((t - mu) / sd)  # standardise, then one linear map per token
    opt = torch.optim.AdamW(linear.parameters(), lr=cfg['seg_lr'], weight_decay=1e-4)
    out_size = masks['train'].shape[1:]
    rng = np.random.default_rng(cfg['seed'])

    def run(split):  # -> predicted label maps (N, *spatial)
        with torch.no_grad():
            return np.concatenate([seg_logits(head, torch.from_numpy(tokens[split][i:i + 64]).float(), patch,
                                              out_size).argmax(1).numpy().astype(np.uint8)
                                   for i in range(0, len(tokens[split]), 64)])

    val, best = {}, (-np.inf, None, None)
    for epoch in range(1, cfg['seg_epochs'] + 1):
        for b in np.array_split(rng.permutation(len(tokens['train'])), max(1, len(tokens['train']) // 32)):
            b = np.sort(b)
            logits = seg_logits(head, torch.from_numpy(tokens['train'][b]).float(), patch, out_size)
            loss = F.cross_entropy(logits, torch.from_numpy(np.asarray(masks['train'][b], dtype=np.int64)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val[epoch] = float(np.nanmean(dice_per_class(run('val'), masks['val'], num_classes)))
        if val[epoch] > best[0]:
            best = (val[epoch], epoch, copy.deepcopy(linear.state_dict()))
    linear.load_state_dict(best[2])
    pred = run('test')  # the one look at test
    dice = dice_per_class(pred, masks['test'], num_classes)
    return {'dice': dice, 'mean_dice': float(np.nanmean(dice)), 'best_epoch': best[1], 'val_mean_dice': val,
            'n_train': len(tokens['train']), 'n': len(pred)}, pred


# -----------------------------------------------------------------------------
# tasks: (row, data, cfg) -> (numbers for eval.json, table cells). row['X'] = {split: (N, D) features}.


def task_knn(row, data, cfg):
    results, cells, task = {}, {}, data['task']
    for k in cfg['knn_ks']:
        r = knn_accuracy(row['X']['train'], data['labels']['train'], row['X']['test'], data['labels']['test'],
                         data['num_classes'], k=k, T=cfg['knn_T'], task=task)
        results[f'k={k}'] = r
        cells[f'k={k} {METRIC_NAMES[MAIN[task]]}'] = 100 * r[MAIN[task]]
    k = 20 if 20 in cfg['knn_ks'] else cfg['knn_ks'][0]
    cells.update({c: v for c, v in metric_cells(f'k={k}', results[f'k={k}']).items() if c not in cells})
    return results, cells


def task_linear(row, data, cfg):
    X, y = row['X'], data['labels']
    r = linear_probe(X['train'], y['train'], X['val'], y['val'], X['test'], y['test'], Cs=cfg['Cs'],
                     seed=cfg['seed'], num_classes=data['num_classes'], task=data['task'])
    return r, {**metric_cells('linear', r), 'C (val)': f"{r['C']:g}"}


def task_fewshot(row, data, cfg):
    """Few-shot (k per class) and data efficiency (fraction of labels), fewshot_seeds draws each."""
    X, y, task = row['X'], data['labels'], data['task']
    main = MAIN[task]
    def probe(idx):
        return linear_probe(X['train'][idx], y['train'][idx], X['val'], y['val'], X['test'], y['test'], Cs=cfg['Cs'],
                            seed=cfg['seed'], num_classes=data['num_classes'], task=task, unlabeled=X['train'])
    def summary(runs):
        v = np.array([r[main] for r in runs])
        return {'mean': float(v.mean()), 'std': float(v.std(ddof=1)) if len(v) > 1 else 0.0, 'runs': runs,
                'n_labelled': [int(r['n_labelled']) for r in runs]}
    results, cells = {'shots': {}, 'fractions': {}}, {}
    settings = [('shots', k, lambda s, k=k: few_shot_indices(y['train'], k, s)) for k in cfg['shots']
                if task != 'multilabel']  # "k per class" has no meaning when images carry several labels
    settings += [('fractions', f, lambda s, f=f: fraction_indices(y['train'], f, s)) for f in cfg['fractions']]
    for kind, value, draw in settings:
        if kind == 'fractions' and value >= 1:  # all labels: one deterministic run (= the linear task)
            full = row['results'].get('linear') or probe(np.arange(len(y['train'])))
            runs = [{**full, 'n_labelled': len(y['train'])}]
        else:
            runs = []
            for s in range(cfg['fewshot_seeds']):
                idx = draw(s)
                runs.append({**probe(idx), 'seed': s, 'n_labelled': len(idx)})
        results[kind][value] = summary(runs)
        col = f'{value}-shot' if kind == 'shots' else f'{100 * value:g} %'
        m = results[kind][value]
        cells[col] = f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}" if len(runs) > 1 else 100 * m['mean']
    return results, cells


def task_finetune(row, data, cfg):
    if row['encoder'] is None or isinstance(row['encoder'], PatchPixels):
        return None, {}  # nothing to fine-tune in raw pixels
    r = finetune(row['encoder'], row['prep'], row['X']['train'], data, cfg)
    return r, {**metric_cells('fine-tuned', r), 'step (val)': r['best_step']}


def task_seg(row, data, cfg):
    tok = row['tokens']
    masks = {s: data['masks'][s][row['token_idx'][s]] for s in SPLITS}
    r, pred = train_segmentation(tok, masks, row['seg_patch'], cfg['seg_classes'], cfg)
    row['seg_pred'] = pred[:8]  # for the overlay figure
    names = cfg['seg_names']
    cells = {f'Dice {names[c]}': 100 * d for c, d in enumerate(r['dice'], start=1)}
    if len(r['dice']) > 1:
        cells['mean Dice'] = 100 * r['mean_dice']
    return r, {**cells, 'epoch (val)': r['best_epoch']}


def task_domain(row, data, cfg):
    """kNN per site (train bank: all sites), across sites (bank: one site, queries: another), and a
    linear probe that predicts the site: high = the features encode the hospital, a shift risk."""
    X, y, S, task = row['X'], data['labels'], data['sites'], data['task']
    main, name = MAIN[task], METRIC_NAMES[MAIN[task]]
    k, K = 20, data['num_classes']
    sites = sorted(set(S['train']) & set(S['test']))
    res, cells = {'per_site': {}, 'cross_site': {}}, {}
    for b in sites:
        q = S['test'] == b
        res['per_site'][b] = knn_accuracy(X['train'], y['train'], X['test'][q], y['test'][q], K, k, cfg['knn_T'], task)
        cells[f'site {b} {name}'] = 100 * res['per_site'][b][main]
    for a in sites:
        for b in sites:
            bank, q = S['train'] == a, S['test'] == b
            r = knn_accuracy(X['train'][bank], y['train'][bank], X['test'][q], y['test'][q], K, k, cfg['knn_T'], task)
            res['cross_site'][f'{a}->{b}'] = r
            cells[f'{a}→{b} {name}'] = 100 * r[main]
    n_sites = int(max(S[s].max() for s in SPLITS)) + 1
    probe = linear_probe(X['train'], S['train'], X['val'], S['val'], X['test'], S['test'], Cs=cfg['Cs'],
                         seed=cfg['seed'], num_classes=n_sites)
    chance = float(np.bincount(S['test'], minlength=n_sites).max() / len(S['test']))
    res['site_probe'] = {**probe, 'majority_baseline': chance}
    cells.update({'site probe acc': 100 * probe['acc'], 'site probe AUROC': 100 * probe['auroc'],
                  'majority site': 100 * chance})
    return res, cells


TASKS = {'knn': task_knn, 'linear': task_linear, 'fewshot': task_fewshot, 'finetune': task_finetune,
         'seg': task_seg, 'domain': task_domain}


def captions(data, cfg):
    """One line per task table: what was done, on which split, with how many images and seeds."""
    n, K = data['counts'], data['num_classes']
    sel = f"chosen on val ({n['val']} images)"
    return {
        'knn': f"**kNN** (DINO protocol: cosine on L2-normalised features, the k nearest of the {n['train']} "
               f"train images vote with exp(sim / {cfg['knn_T']})): test, {n['test']} images; no training, nothing selected.",
        'linear': f"**Linear probe** (logistic regression on standardised frozen features): C from "
                  f"{{{', '.join(f'{c:g}' for c in cfg['Cs'])}}} {sel}; test, {n['test']} images; seed {cfg['seed']}.",
        'fewshot': f"**Few-shot / data efficiency**: the same linear probe on k train images per class, or on a "
                   f"stratified fraction of the {n['train']} train labels; {MAIN[data['task']]} on test ({n['test']} "
                   f"images), mean ± std over {cfg['fewshot_seeds']} draws (seeds 0-{cfg['fewshot_seeds'] - 1}); "
                   f"C {sel} for each draw; 100 % = the linear probe.",
        'finetune': f"**Fine-tuning** end to end ({cfg['finetune_iters']} steps of {cfg['finetune_batch']} images, "
                    f"AdamW, lr {cfg['finetune_lr']:g}, layer decay {cfg['layer_decay']}, crops + flips): step {sel} "
                    f"every {cfg['finetune_eval_every']} steps; test, {n['test']} images; seed {cfg['seed']}, one run.",
        'seg': f"**Segmentation** on frozen patch tokens (standardised with train statistics, then one linear map giving a logit per class per pixel), "
               f"trained on {cfg.get('seg_n_train')} train masks for up to {cfg['seg_epochs']} epochs, epoch {sel} "
               f"by mean Dice; per-image Dice on test ({n['test']} images), background excluded; seed {cfg['seed']}.",
        'domain': f"**Domain shift** (sites = hospitals / devices): kNN (k=20) per test site with every train image, "
                  f"then a→b = train images of site a only, test images of site b; a linear probe predicting the "
                  f"site (C {sel}); test, {n['test']} images.",
    }


# -----------------------------------------------------------------------------
# figures (matplotlib, PNG). Each one is readable on its own: title, axes, legend.


def fig_training_curves(log_path, path, plt):
    recs = [json.loads(line) for line in open(log_path) if line.strip()]
    steps = [r for r in recs if 'loss' in r]
    knn = [r for r in recs if 'knn_val' in r]
    fig, ax = plt.subplots(1, 4, figsize=(18, 3.8))
    for key in ('loss', 'pred', 'sigreg'):
        ax[0].plot([r['iter'] for r in steps], [r[key] for r in steps], label=key)
    ax[0].set(yscale='log', title='pretraining loss terms', xlabel='step', ylabel='value (log scale)')
    ax[1].plot([r['iter'] for r in steps], [r['lr'] for r in steps], label='learning rate')
    ax[1].set(title='learning rate', xlabel='step', ylabel='lr')
    ax[2].plot([r['iter'] for r in knn], [100 * r['knn_val'] for r in knn], 'o-', label='online kNN (val)')
    ax[2].set(title='online kNN accuracy on val', xlabel='step', ylabel='accuracy (%)')
    ax[3].plot([r['iter'] for r in steps], [r['erank'] for r in steps], label='effective rank (RankMe)')
    ax[3].set(title='embedding effective rank (collapse monitor)', xlabel='step', ylabel='effective rank')
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_embedding(rows, data, method, seed_, path, plt):
    """2-D map of the test features of each network row, coloured by class (and by site)."""
    rows = [r for r in rows if r['name'] != 'raw pixels'][:3]
    by_site = data['sites'] is not None
    fig, ax = plt.subplots(1 + by_site, len(rows), figsize=(5 * len(rows), 4.6 * (1 + by_site)), squeeze=False)
    y = data['labels']['test']
    for j, row in enumerate(rows):
        x = StandardScaler().fit_transform(row['X']['test'])
        if method == 'tsne':
            from sklearn.manifold import TSNE
            z = TSNE(2, init='pca', random_state=seed_).fit_transform(x)
        else:
            z = x @ np.linalg.svd(x - x.mean(0), full_matrices=False)[2][:2].T  # first two principal components
        colourings = [('class', y if y.ndim == 1 else y.argmax(1), data['meta'].get('classes'))]
        if by_site:
            colourings.append(('site', data['sites']['test'], None))
        for i, (what, c, names) in enumerate(colourings):
            a = ax[i, j]
            for v in np.unique(c):
                a.scatter(*z[c == v].T, s=4, alpha=0.6, label=names[v] if names else f'{what} {v}')
            a.set(title=f'{row["name"]}: test features, by {what}', xlabel=f'{method} 1', ylabel=f'{method} 2')
            a.legend(markerscale=3, fontsize=7, loc='best')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def attention_received(encoder, x):
    """Mean attention each patch RECEIVES in the last block (over heads and all query patches):
    which parts of the image the encoder reads to build every token. (B, C, H, W) -> (B, gh, gw)."""
    attn, grab = encoder.blocks[-1].attn, {}
    hook = attn.register_forward_pre_hook(lambda m, args: grab.setdefault('x', args[0]))
    encoder.eval()(x)
    hook.remove()
    B, T, D = grab['x'].shape
    q, k, _ = attn.qkv(grab['x']).view(B, T, 3, attn.n_head, D // attn.n_head).permute(2, 0, 3, 1, 4)
    a = (q @ k.transpose(-2, -1) / math.sqrt(D // attn.n_head)).softmax(-1)  # (B, nh, T, T)
    p = encoder.patch_size
    return a.mean((1, 2)).view(B, x.shape[2] // p, x.shape[3] // p)


def fig_attention(rows, data, idx, path, plt):
    rows = [r for r in rows if isinstance(r['encoder'], medjepa.ViT)]
    images = data['images']['test'][idx]
    fig, ax = plt.subplots(1 + len(rows), len(idx), figsize=(1.9 * len(idx), 2.1 * (1 + len(rows))), squeeze=False)
    classes = data['meta'].get('classes')
    for j, i in enumerate(idx):
        lab = data['labels']['test'][i]
        ax[0, j].imshow(images[j].squeeze(), cmap='gray' if images.shape[-1] == 1 else None)
        ax[0, j].set_title(classes[lab] if classes and np.ndim(lab) == 0 else f'test #{i}', fontsize=7)
    for r, row in enumerate(rows, start=1):
        att = attention_received(row['encoder'], row['prep'](images))
        att = F.interpolate(att[:, None].float(), size=images.shape[1:3], mode='bilinear')[:, 0].cpu().numpy()
        for j in range(len(idx)):
            ax[r, j].imshow(images[j].squeeze(), cmap='gray' if images.shape[-1] == 1 else None)
            ax[r, j].imshow(att[j], cmap='inferno', alpha=0.6)
        ax[r, 0].set_ylabel(row['name'], fontsize=8)
    for a in ax.flat:
        a.set_xticks([])
        a.set_yticks([])
    ax[0, 0].set_ylabel('test image', fontsize=8)
    fig.suptitle('last-block attention received per patch (bright = attended; mean over heads and queries)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_data_efficiency(results, task, path, plt):
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, res in results.items():
        if 'fewshot' not in res:
            continue
        for a, kind, scale in ((ax[0], 'shots', 1), (ax[1], 'fractions', 100)):
            pts = sorted(res['fewshot'][kind].items())
            if pts:
                a.errorbar([scale * k for k, _ in pts], [100 * m['mean'] for _, m in pts],
                           yerr=[100 * m['std'] for _, m in pts], marker='o', capsize=3, label=name)
    metric = METRIC_NAMES[MAIN[task]]
    ax[0].set(xscale='log', title='few-shot linear probe', xlabel='labelled images per class', ylabel=f'test {metric} (%)')
    ax[1].set(xscale='log', title='data efficiency', xlabel='% of train labels used', ylabel=f'test {metric} (%)')
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_segmentation(rows, data, path, plt):
    rows = [r for r in rows if 'seg_pred' in r]
    n = min(6, len(rows[0]['seg_pred']))
    fig, ax = plt.subplots(len(rows), n, figsize=(2 * n, 2.2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        idx = row['token_idx']['test'][:n]
        for j in range(n):
            img, gt = data['images']['test'][idx[j]], data['masks']['test'][idx[j]]
            ax[r, j].imshow(img.squeeze(), cmap='gray' if img.shape[-1] == 1 else None)
            ax[r, j].contour(gt > 0, levels=[0.5], colors='lime', linewidths=1)
            ax[r, j].contour(row['seg_pred'][j] > 0, levels=[0.5], colors='magenta', linewidths=1, linestyles='--')
            ax[r, j].set_xticks([])
            ax[r, j].set_yticks([])
        ax[r, 0].set_ylabel(row['name'], fontsize=8)
    ax[0, 0].plot([], [], color='lime', label='ground truth')
    ax[0, 0].plot([], [], color='magenta', ls='--', label='prediction')
    fig.legend(loc='lower center', ncol=2)
    fig.suptitle('segmentation on test images: frozen patch tokens + linear head')
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_figures(rows, results, data, cfg, out_dir):
    """All figures into out_dir/figures/; the training curves come from out_dir/log.jsonl if present."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig_dir = os.path.join(out_dir, 'figures')
    os.makedirs(fig_dir, exist_ok=True)
    made = []
    def save(name, fn, *a):
        fn(*a, os.path.join(fig_dir, name), plt)
        made.append(name)
    log = os.path.join(out_dir, 'log.jsonl')
    if os.path.isfile(log):
        save('training_curves.png', fig_training_curves, log)
    save('embedding.png', fig_embedding, rows, data, cfg['embedding'], cfg['seed'])
    y = data['labels']['test']
    idx = [int(np.flatnonzero(y == c)[0]) for c in np.unique(y)][:8] if y.ndim == 1 else list(range(8))
    save('attention.png', fig_attention, rows, data, idx)
    if any('fewshot' in r for r in results.values()):
        save('data_efficiency.png', fig_data_efficiency, results, data['task'])
    if any('seg_pred' in r for r in rows):
        save('segmentation.png', fig_segmentation, rows, data)
    return [os.path.join('figures', m) for m in made]


# -----------------------------------------------------------------------------
# output


def format_table(rows, title='', notes=()):
    """rows: list of dicts {column: value} -> markdown table string.

    Columns appear in first-seen order; floats print with one decimal (we pass percentages),
    None / missing as '-', anything else with str(). Number columns are right-aligned.
    """
    cols = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    def cell(v):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return '-'
        return f'{v:.1f}' if isinstance(v, (float, np.floating)) else str(v)
    numeric = [all(isinstance(r.get(c), (int, float, np.number)) for r in rows if r.get(c) is not None) for c in cols]
    lines = [title, ''] if title else []
    lines.append('| ' + ' | '.join(cols) + ' |')
    lines.append('|' + '|'.join('---:' if num else '---' for num in numeric) + '|')
    lines += ['| ' + ' | '.join(cell(r.get(c)) for c in cols) + ' |' for r in rows]
    if notes:
        lines += [''] + list(notes)
    return '\n'.join(lines) + '\n'


def atomic_write(path, text):
    """Write to a temp file, then rename: a crash never leaves a half-written eval.json."""
    tmp = f'{path}.tmp-{os.getpid()}'  # per process: two evals of one checkpoint never share a temp file
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def to_json(obj):
    """NaN is not valid JSON: write null instead; numpy scalars / odd config values become plain."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


# -----------------------------------------------------------------------------
# command line


def supported_tasks(data):
    """The tasks a data set can feed, and why the others cannot run."""
    why_not = {}
    if data['masks'] is None:
        why_not['seg'] = 'the data set has no masks'
    if data['sites'] is None or len(set(data['sites']['train']) & set(data['sites']['test'])) < 2:
        why_not['domain'] = 'the data set has no sites (or only one)'
    return [t for t in TASKS if t not in why_not], why_not


def parse_args(argv=None):
    """--key=value flags for the globals at the top; their comments are the --help text."""
    g = globals()
    keys = [k for k in ('ckpt', 'data_dir', 'tasks', 'baselines', 'imagenet', 'imagenet_size', 'device', 'dtype',
                        'seed', 'batch_size', 'knn_ks', 'knn_T', 'pixel_size', 'shots', 'fractions', 'fewshot_seeds',
                        'finetune_iters', 'finetune_batch', 'finetune_lr', 'layer_decay', 'finetune_eval_every',
                        'seg_train', 'seg_epochs', 'seg_lr', 'figures', 'embedding')]
    with open(__file__) as f:
        helps = dict(re.findall(r"^(\w+) = .*?# (.*)$", f.read(), re.M))
    p = argparse.ArgumentParser(description='\n\n'.join(__doc__.strip().split('\n\n')[:2]), allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    def boolean(s):
        if s.lower() not in ('true', 'false', '1', '0'):
            raise argparse.ArgumentTypeError(f'expected true or false, got {s!r}')
        return s.lower() in ('true', '1')
    for k in keys:
        typ = boolean if isinstance(g[k], bool) else float if isinstance(g[k], float) else type(g[k])
        p.add_argument(f'--{k}', type=typ, default=g[k], help=f"{helps.get(k, '')} (default: {g[k]!r})")
    args, unknown = p.parse_known_args(argv)
    for u in unknown:
        name = u.split('=', 1)[0].lstrip('-')
        close = difflib.get_close_matches(name, keys, n=1)
        hint = f"did you mean --{close[0]}?" if close else f"valid flags: {', '.join('--' + k for k in keys)}"
        p.error(f"unknown flag {u!r}; {hint}")
    args.tasks = [t for t in args.tasks.split(',') if t]
    for t in args.tasks:
        if t not in TASKS and t != 'auto':
            p.error(f"unknown task {t!r} in --tasks; choose from auto, {', '.join(TASKS)}")
    args.baselines = [] if args.baselines in ('', 'none') else args.baselines.split(',')
    for b in args.baselines:
        if b not in ('random', 'pixels'):
            p.error(f"unknown baseline {b!r} in --baselines; choose from random, pixels (or none)")
    if args.dtype not in ('auto', 'float32', 'bfloat16'):
        p.error(f"--dtype must be auto, float32 or bfloat16, got {args.dtype!r}")
    if args.embedding not in ('pca', 'tsne'):
        p.error(f"--embedding must be pca or tsne, got {args.embedding!r}")
    for key, typ in (('knn_ks', int), ('shots', int), ('fractions', float)):
        try:
            setattr(args, key, [typ(v) for v in getattr(args, key).split(',') if v])
            assert all(v > 0 for v in getattr(args, key))
        except (ValueError, AssertionError):
            p.error(f"--{key} must be comma-separated positive numbers, got {getattr(args, key)!r}")
    if any(f > 1 for f in args.fractions):
        p.error(f"--fractions are fractions of the labels, in (0, 1]; got {args.fractions}")
    return args


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    if not os.path.isfile(args.ckpt):
        sys.exit(f"error: checkpoint {args.ckpt!r} not found. Train one first with `python medjepa.py` "
                 f"(it writes out-demo/ckpt.pt), or pass --ckpt=path/to/ckpt.pt")
    ckpt = medjepa.load_checkpoint(args.ckpt)
    config = ckpt['config']
    ddir = args.data_dir or config['data_dir']
    data = load_data(ddir)
    n, task, K = data['counts'], data['task'], data['num_classes']
    ok, why_not = supported_tasks(data)
    todo = ok if args.tasks == ['auto'] else args.tasks
    for t in todo:
        if t not in ok:
            sys.exit(f"error: task '{t}' cannot run on {ddir}: {why_not[t]}")
    leaks = leakage_report(data)
    if any(v for pair in leaks.values() for v in pair.values()):
        print(f"WARNING: splits share groups or identical images, every number below is optimistic: {leaks}")

    dev, in_chans = args.device, data['images']['train'].shape[-1]
    dtype = medjepa.resolve_dtype(args.dtype, dev)
    cfg = {**vars(args), 'dtype': dtype, 'Cs': CS,
           'knn_ks': [k for k in args.knn_ks if k <= n['train'] / K] or [min(args.knn_ks)]}
    # segmentation: a seeded subset of train (tokens are big), all of val and test
    token_idx = None
    if 'seg' in todo:
        n_seg = n['train'] if args.seg_train <= 0 else min(args.seg_train, n['train'])
        token_idx = {'train': np.sort(np.random.default_rng(args.seed).permutation(n['train'])[:n_seg]),
                     'val': np.arange(n['val']), 'test': np.arange(n['test'])}
        cfg['seg_classes'] = int(max(int(np.max(data['masks'][s])) for s in SPLITS)) + 1
        cfg['seg_names'] = data['meta'].get('mask_classes') or ['background'] + (
            ['foreground'] if cfg['seg_classes'] == 2 else [f'class {c}' for c in range(1, cfg['seg_classes'])])
        cfg['seg_n_train'] = n_seg

    # the rows: name, encoder (a module mapping (B, C, S, S) -> (B, N, D) tokens), input preparation
    mean, std = data['meta']['mean'], data['meta']['std']
    def jepa(trained):
        torch.manual_seed(args.seed)
        model = medjepa.build_model(config, in_chans)
        if trained:
            model.load_state_dict(ckpt['model'])  # strict: a mismatch is a bug, not a warning
        return model.encoder.to(dev)
    rows = [dict(name='pretrained', make=lambda: jepa(True), prep=make_prep(mean, std, dev))]
    if 'random' in args.baselines:
        rows.append(dict(name='random-init', make=lambda: jepa(False), prep=make_prep(mean, std, dev)))
    if 'pixels' in args.baselines:
        rows.append(dict(name='raw pixels', make=lambda: PatchPixels(config['patch_size']), prep=make_prep(mean, std, 'cpu')))
    if args.imagenet:
        gm, gs = [float(np.mean(IMAGENET_MEAN))] * in_chans, [float(np.mean(IMAGENET_STD))] * in_chans
        im_mean, im_std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else (gm, gs)
        rows.append(dict(name='imagenet', make=lambda: load_imagenet_encoder(args.imagenet, in_chans)[0].to(dev),
                         prep=make_prep(im_mean, im_std, dev, args.imagenet_size)))

    results, tables = {}, {t: [] for t in todo}
    for row in rows:
        t1 = time.time()
        row['encoder'] = row.pop('make')()
        pixels = isinstance(row['encoder'], PatchPixels)
        row['X'], row['tokens'] = {}, {}
        for s in SPLITS:
            idx = token_idx[s] if token_idx else None
            if pixels:  # area-averaged pixels for the probes; patch pixels as 'tokens' for segmentation
                row['X'][s] = pixel_features(data['images'][s], args.pixel_size, mean, std)
                if idx is not None:
                    row['tokens'][s] = encode(row['encoder'], row['prep'], data['images'][s], 1024, idx)[1]
            else:
                row['X'][s], row['tokens'][s] = encode(row['encoder'], row['prep'], data['images'][s],
                                                       args.batch_size, idx, amp=dtype == 'bfloat16')
        row['token_idx'], row['seg_patch'] = token_idx, row['encoder'].patch_size
        res = row['results'] = {'feature_dim': int(row['X']['train'].shape[1]),
                                'feature_time_s': round(time.time() - t1, 2)}
        for t in todo:
            t2 = time.time()
            r, cells = TASKS[t](row, data, cfg)
            if r is not None:
                res[t], res[t + '_time_s'] = r, round(time.time() - t2, 2)
                tables[t].append({'encoder': row['name'], **cells})
        row['tokens'] = None  # the biggest arrays: free them before the next row
        results[row['name']] = res
        print(f"{row['name']}: {res['feature_dim']}-dim features in {res['feature_time_s']:.1f}s, "
              + ', '.join(f"{t} in {res[t + '_time_s']:.1f}s" for t in todo if t + '_time_s' in res), flush=True)

    out_dir = os.path.dirname(os.path.abspath(args.ckpt))
    figs = draw_figures(rows, results, data, cfg, out_dir) if args.figures else []
    caps = captions(data, cfg)
    head = (f"**{data['name']}** ({task}, {K} classes): {n['train']} train / {n['val']} val / {n['test']} test "
            f"images. Checkpoint {args.ckpt} (iter {ckpt.get('iter_num', '?')}, pretraining seed "
            f"{config.get('seed', '?')}). All numbers in %, on **test**; every choice made on **val**.")
    notes = ["Rows: pretrained = the checkpoint's encoder (mean-pooled tokens); random-init = the same "
             f"architecture untrained (torch.manual_seed({args.seed})); raw pixels = images area-averaged to "
             f"{args.pixel_size}x{args.pixel_size}, normalised (segmentation: each patch's pixels)"
             + (f"; imagenet = {args.imagenet} at {args.imagenet_size} px" if args.imagenet else '') + f". Features in {dtype}."]
    if any(v for pair in leaks.values() for v in pair.values()):
        notes.append(f"**WARNING: leakage between splits** (shared groups / identical images): {leaks}")
    skipped = [k for k in args.knn_ks if k not in cfg['knn_ks']]
    if skipped:
        notes.append(f"kNN k={skipped} skipped: more than train images / classes ({n['train']}/{K}).")
    md = head + '\n\n' + '\n'.join(format_table(tables[t], title=caps[t]) for t in todo if tables[t])
    md += '\n' + '\n'.join(notes) + '\n' + (f"\nFigures: {', '.join(figs)}\n" if figs else '')
    elapsed = time.time() - t0

    report = {
        'dataset': data['name'], 'data_dir': ddir, 'task': task, 'classes': data['meta'].get('classes'),
        'counts': n, 'class_counts': ({s: np.bincount(data['labels'][s], minlength=K).tolist() for s in SPLITS}
                                      if task != 'multilabel' else {s: data['labels'][s].sum(0).tolist() for s in SPLITS}),
        'report_split': 'test', 'selection_split': 'val', 'leakage': leaks, 'tasks': todo,
        'tasks_not_run': why_not, 'seed': args.seed, 'pretrain_seed': config.get('seed'), 'Cs': CS,
        'feature_dtype': dtype, 'ckpt': args.ckpt, 'iter_num': ckpt.get('iter_num'), 'ckpt_config': config,
        'settings': cfg,
        'results': results, 'figures': figs, 'elapsed_s': round(elapsed, 2),
        'versions': {'python': platform.python_version(), 'torch': torch.__version__, 'numpy': np.__version__,
                     'sklearn': sklearn.__version__},
    }
    atomic_write(os.path.join(out_dir, 'eval.json'), json.dumps(to_json(report), indent=2) + '\n')
    atomic_write(os.path.join(out_dir, 'eval.md'), md)
    print()
    print(md)
    print(f"wrote {os.path.join(out_dir, 'eval.json')}, eval.md and {len(figs)} figures; total {elapsed:.1f}s")
    return report


if __name__ == '__main__':
    main()
