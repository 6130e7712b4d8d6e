"""
The figures eval.py draws next to the checkpoint (matplotlib, PNG), each readable on its own: title,
axes, legend. draw_figures is the one entry point; eval.py calls it after every task has run.

    training_curves  the pretraining log: loss terms, learning rate, online kNN, effective rank
    embedding        2-D PCA / t-SNE of each network row's test features, by class and by site
    attention        the attention each patch receives in the last block, per ViT row
    data_efficiency  few-shot and fraction-of-labels curves, every row
    segmentation     test images with ground-truth and predicted contours, every row

It also holds the plumbing of eval.py's report (eval.py imports it): format_table (markdown), to_json
(NaN -> null) and atomic_write (a crash never leaves a half-written eval.json).
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.preprocessing import StandardScaler

import medjepa


def finish(fig, axes, path, legend=True):
    for a in axes:
        if legend:
            a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def fig_training_curves(plt, path, log_path):
    recs = []
    for line in open(log_path):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line, left by a killed run
            continue
    steps, knn = [r for r in recs if 'loss' in r], [r for r in recs if 'knn_val' in r]
    fig, ax = plt.subplots(1, 4, figsize=(18, 3.8))
    for key in ('loss', 'pred', 'sigreg'):
        ax[0].plot([r['iter'] for r in steps], [r[key] for r in steps], label=key)
    ax[1].plot([r['iter'] for r in steps], [r['lr'] for r in steps], label='learning rate')
    ax[2].plot([r['iter'] for r in knn], [100 * r['knn_val'] for r in knn], 'o-', label='online kNN (val)')
    ax[3].plot([r['iter'] for r in steps], [r['erank'] for r in steps], label='effective rank (RankMe)')
    ax[0].set(yscale='log', title='pretraining loss terms', xlabel='step', ylabel='value (log scale)')
    ax[1].set(title='learning rate schedule', xlabel='step', ylabel='learning rate')
    ax[2].set(title='online kNN accuracy on val', xlabel='step', ylabel='accuracy (%)')
    ax[3].set(title='embedding effective rank (collapse monitor)', xlabel='step', ylabel='effective rank')
    finish(fig, ax, path)


def fig_embedding(plt, path, rows, data, method, seed_):
    """The test features of each network row in 2-D (PCA or t-SNE), coloured by class and by site."""
    rows = [r for r in rows if isinstance(r['encoder'], medjepa.ViT)]
    y, colourings = data['labels']['test'], [('class', data['meta'].get('classes'))]
    y = y if y.ndim == 1 else y.argmax(1)  # multi-label: colour by the first present label
    colourings += [('site', None)] if data['sites'] is not None else []
    fig, ax = plt.subplots(len(colourings), len(rows), figsize=(6.5 * len(rows), 4.6 * len(colourings)), squeeze=False)
    for j, row in enumerate(rows):
        x = StandardScaler().fit_transform(row['X']['test'])
        if method == 'tsne':
            from sklearn.manifold import TSNE
            z = TSNE(2, init='pca', random_state=seed_).fit_transform(x)
        else:
            z = x @ np.linalg.svd(x, full_matrices=False)[2][:2].T  # first two principal components (x is centred)
        for i, (what, names) in enumerate(colourings):
            c = y if what == 'class' else data['sites']['test']
            for v in np.unique(c):
                ax[i, j].scatter(*z[c == v].T, s=4, alpha=0.6, label=names[v] if names else f'{what} {v}')
            ax[i, j].set(title=f"{row['name']}: test features by {what}", xlabel=f'{method} 1', ylabel=f'{method} 2')
            ax[i, j].legend(markerscale=3, fontsize=7, loc='center left', bbox_to_anchor=(1, 0.5))
    finish(fig, ax.flat, path, legend=False)


@torch.no_grad()
def attention_received(encoder, x):
    """Mean attention each patch RECEIVES in the last block, over heads and all query patches: what the
    encoder reads to build every token (it has no class token to ask). (B, C, H, W) -> (B, gh, gw)."""
    attn, grab = encoder.blocks[-1].attn, {}
    hook = attn.register_forward_pre_hook(lambda m, args: grab.setdefault('x', args[0]))
    encoder.eval()(x)
    hook.remove()
    B, T, D = grab['x'].shape
    q, k, _ = attn.qkv(grab['x']).view(B, T, 3, attn.n_head, D // attn.n_head).permute(2, 0, 3, 1, 4)
    a = (q @ k.transpose(-2, -1) / math.sqrt(D // attn.n_head)).softmax(-1)  # (B, nh, T, T)
    return a.mean((1, 2)).view(B, x.shape[2] // encoder.patch_size, x.shape[3] // encoder.patch_size)


def show(a, img, title=None):
    a.imshow(img.squeeze(), cmap='gray' if img.shape[-1] == 1 else None)
    a.set(xticks=[], yticks=[], title=title)
    a.title.set_fontsize(7)


def fig_attention(plt, path, rows, data, idx):
    rows = [r for r in rows if isinstance(r['encoder'], medjepa.ViT)]
    images, y, classes = data['images']['test'][idx], data['labels']['test'][idx], data['meta'].get('classes')
    fig, ax = plt.subplots(1 + len(rows), len(idx), figsize=(1.9 * len(idx), 2.1 * (1 + len(rows))), squeeze=False)
    for j in range(len(idx)):
        show(ax[0, j], images[j], classes[y[j]] if classes and y.ndim == 1 else f'test #{idx[j]}')
    for r, row in enumerate(rows, start=1):
        att = attention_received(row['encoder'], row['prep'](images))[:, None].float()
        att = F.interpolate(att, size=images.shape[1:3], mode='bilinear')[:, 0].cpu().numpy()
        for j in range(len(idx)):
            show(ax[r, j], images[j])
            ax[r, j].imshow(att[j], cmap='inferno', alpha=0.6)
        ax[r, 0].set_ylabel(row['name'], fontsize=8)
    ax[0, 0].set_ylabel('test image', fontsize=8)
    fig.suptitle('last-block attention received by each patch (bright = attended; mean over heads and queries)')
    finish(fig, [], path)


def fig_data_efficiency(plt, path, results, metric):
    fig, ax = plt.subplots(1, 2, figsize=(11, 4), subplot_kw={'xscale': 'log'})
    for name, res in results.items():
        for a, kind, scale in ((ax[0], 'shots', 1), (ax[1], 'fractions', 100)):
            pts = sorted(res.get('fewshot', {}).get(kind, {}).items())
            if pts:
                a.errorbar([scale * k for k, _ in pts], [100 * m['mean'] for _, m in pts],
                           yerr=[100 * m['std'] for _, m in pts], marker='o', capsize=3, label=name)
                a.set_xticks([scale * k for k, _ in pts], [f'{scale * k:g}' for k, _ in pts], minor=False)
                a.minorticks_off()
    ax[0].set(title='few-shot linear probe (mean ± std over draws)',
              xlabel='labelled train images per class', ylabel=f'test {metric} (%)')
    ax[1].set(title='data efficiency: linear probe', xlabel='% of the train labels', ylabel=f'test {metric} (%)')
    finish(fig, ax, path)


def fig_segmentation(plt, path, rows, data):
    rows = [r for r in rows if 'seg_pred' in r]
    n = min(6, len(rows[0]['seg_pred']))
    fig, ax = plt.subplots(len(rows), n, figsize=(2 * n, 2.2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for j, i in enumerate(row['token_idx']['test'][:n]):
            image, mask, pred = data['images']['test'][i], data['masks']['test'][i], row['seg_pred'][j]
            if image.ndim == 4:  # a volume: its middle slice
                image, mask, pred = image[len(image) // 2], mask[len(mask) // 2], pred[len(pred) // 2]
            show(ax[r, j], image)
            ax[r, j].contour(mask > 0, levels=[0.5], colors='lime', linewidths=1)
            ax[r, j].contour(pred > 0, levels=[0.5], colors='magenta', linewidths=1, linestyles='--')
        ax[r, 0].set_ylabel(row['name'], fontsize=8)
    ax[0, 0].plot([], [], color='lime', label='ground truth')
    ax[0, 0].plot([], [], color='magenta', ls='--', label='prediction')
    fig.legend(loc='lower center', ncol=2)
    fig.suptitle('segmentation of test images: frozen patch tokens + linear head (foreground contours)')
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)


def draw_figures(rows, results, data, cfg, out_dir, metric, folder='figures'):
    """Every figure the run can feed, into out_dir/folder/ -> their paths relative to out_dir."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    y = data['labels']['test']
    idx = [int(np.flatnonzero(y == c)[0]) for c in np.unique(y)][:8] if y.ndim == 1 else list(range(8))
    log = os.path.join(out_dir, 'log.jsonl')
    todo = [('training_curves', fig_training_curves, (log,), os.path.isfile(log)),
            ('embedding', fig_embedding, (rows, data, cfg['embedding'], cfg['seed']), True),
            ('attention', fig_attention, (rows, data, idx), any(isinstance(r['encoder'], medjepa.ViT) for r in rows)
             and data['images']['test'].ndim == 4),
            ('data_efficiency', fig_data_efficiency, (results, metric), any('fewshot' in r for r in results.values())),
            ('segmentation', fig_segmentation, (rows, data), any('seg_pred' in r for r in rows))]
    os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
    made = []
    for name, fn, args, ok in todo:
        if ok:
            path = os.path.join(folder, f'{name}.png')
            try:  # figures are optional: one that cannot be drawn is a warning, never a lost evaluation
                fn(plt, os.path.join(out_dir, path), *args)
                made.append(path)
            except Exception as e:
                print(f"warning: figure {path} not drawn ({type(e).__name__}: {e})")
            plt.close('all')
    return made

# -----------------------------------------------------------------------------
# the report: markdown tables, JSON, atomic writes


def format_table(rows, title='', notes=()):
    """rows: list of dicts {column: value} -> markdown table. Columns in first-seen order; floats with one
    decimal (we pass percentages), None / missing as '-', the rest with str(); numbers right-aligned."""
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
