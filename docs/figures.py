"""
docs/figures.py: the figures of docs/*.md, drawn by the project's own code and from its own runs.

    python docs/figures.py              # every figure -> docs/figures/*.png (about 20 s on a CPU)
    python docs/figures.py masks sigreg # only these groups: masks, sigreg, runs
    python docs/figures.py --train      # first train the RUNS below that have no log yet (~3 min each
                                        # on 2 CPU cores), copying each log.jsonl to docs/figures/logs/
    python docs/figures.py --table      # print every run's command and final numbers as markdown
    python docs/figures.py --probe      # collapse probe of the runs' checkpoints (out-docs/NAME/ckpt.pt) on val
    (--out_root=DIR: where the runs' out_dirs are, default out-docs)

Masks are drawn by medjepa.sample_masks and medjepa3d.sample_masks_3d exactly as training draws them;
SIGReg values are computed by medjepa.sigreg; the training curves are read from the log.jsonl files
that medjepa.py wrote (kept in docs/figures/logs/, so the figures can be redrawn without training).
"""
import json
import os
import subprocess
import sys

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import medjepa as mj  # noqa: E402
import medjepa3d as mj3  # noqa: E402

FIG = os.path.join(ROOT, 'docs', 'figures')
LOGS = os.path.join(FIG, 'logs')

# -----------------------------------------------------------------------------
# The runs behind docs/why_jepa.md and docs/sigreg.md: medjepa.py's defaults of their day (config/demo.py:
# the 'mask' objective on data/demo, 256 slices; config/demo_views.py with 2 local crops of 5-30 % and
# every patch of each view)
# shortened to 300 steps, one knob changed at a time. The flags below restore those settings; one thing
# cannot be restored: contexts were then cut to the batch's shortest, now every image keeps
# context_keep of the grid, so a re-run differs a little from the logs in docs/figures/logs.
# --num_threads=1 because they ran niced on a 2-core machine shared with other jobs.
COMMON = ['--max_iters=300', '--warmup_iters=30', '--eval_interval=100', '--num_threads=1', '--num_targets=4', '--learning_rate=1e-3']
THEN = ['--num_slices=256']
VIEWS_THEN = ['config/demo_views.py', '--n_local_views=2', '--local_scale=(0.05,0.3)', '--view_keep=1',
              '--views_from=image', '--n_global_views=2']
RUNS = {
    'lam0': THEN + ['--sigreg_lambda=0'],
    'lam0.01': THEN + ['--sigreg_lambda=0.01'],
    'lam0.05': THEN + ['--sigreg_lambda=0.05'],  # = the defaults of the day
    'lam0.2': THEN + ['--sigreg_lambda=0.2'],
    'lam0.5': THEN + ['--sigreg_lambda=0.5'],
    'slices8': ['--num_slices=8'],
    'slices32': ['--num_slices=32'],
    'slices1024': ['--num_slices=1024'],
    'views_lam0': VIEWS_THEN + ['--sigreg_lambda=0'],
    'views_lam0.05': VIEWS_THEN,
}


def command(name, out_root='out-docs'):
    return ['python', 'medjepa.py'] + RUNS[name] + COMMON + [f'--out_dir={out_root}/{name}']


def read_log(name):
    path = os.path.join(LOGS, f'{name}.jsonl')
    if not os.path.isfile(path):
        return None
    recs = [json.loads(line) for line in open(path)]
    steps = [r for r in recs if 'loss' in r]
    knn = [r for r in recs if 'knn_val' in r]
    return steps, knn


def train_missing(out_root='out-docs'):
    os.makedirs(LOGS, exist_ok=True)
    for name in RUNS:
        if os.path.isfile(os.path.join(LOGS, f'{name}.jsonl')):
            continue
        cmd = command(name, out_root)
        print(' '.join(cmd), flush=True)
        log = os.path.join(ROOT, out_root, name, 'log.jsonl')
        subprocess.run([sys.executable] + cmd[1:] + ['--overwrite=True'], cwd=ROOT, check=True)  # a clean run
        with open(log) as f, open(os.path.join(LOGS, f'{name}.jsonl'), 'w') as g:
            g.write(f.read())


def final(name):
    """The last logged step (loss terms, monitors) and the last online kNN of a run."""
    steps, knn = read_log(name)
    return steps[-1], knn[-1]['knn_val'] if knn else float('nan')


def table():
    print('| run | command | loss | pred | sigreg | emb_std | erank | kNN val (steps 100 / 200 / 300) |')
    print('|---|---|---:|---:|---:|---:|---:|---|')
    for name in RUNS:
        if read_log(name) is None:
            continue
        last, _ = final(name)
        knn = ' / '.join(f"{100 * r['knn_val']:.1f}" for r in read_log(name)[1])
        print(f"| {name} | `{' '.join(command(name))}` | {last['loss']:.4f} | {last['pred']:.4f} | "
              f"{last['sigreg']:.2f} | {last['emb_std']:.4f} | {last['erank']:.1f} | {knn} |")

def probe(out_root='out-docs'):
    """How collapsed is each run's final encoder? Frozen mean-pooled features of the demo val split
    (medjepa.extract_features, as the kNN monitor): the mean cosine similarity between two different
    images, the effective rank, and the share of the variance on the first 1 and 5 principal axes."""
    import torch.nn.functional as F
    meta, val = mj.read_meta(os.path.join(ROOT, 'data/demo')), mj.load_split(os.path.join(ROOT, 'data/demo'), 'val')
    print('| run | mean cosine between images | effective rank | variance on PC 1 / PCs 1-5 |')
    print('|---|---:|---:|---|')
    for name in RUNS:
        path = os.path.join(ROOT, out_root, name, 'ckpt.pt')
        if not os.path.isfile(path):
            continue
        ckpt = mj.load_checkpoint(path)
        model = mj.build_model(ckpt['config'])
        model.load_state_dict(ckpt['model'])
        f = torch.from_numpy(mj.extract_features(model.encoder, val['images'], meta['mean'], meta['std']))
        u = F.normalize(f, dim=1)
        n = len(u)
        cos = ((u @ u.T).sum() - n) / (n * n - n)  # the diagonal is 1
        s = torch.linalg.svdvals(f - f.mean(0)) ** 2
        var = s / s.sum()
        print(f'| {name} | {cos:.4f} | {mj.effective_rank(f):.1f} | {100 * var[0]:.1f} % / {100 * var[:5].sum():.1f} % |')

# -----------------------------------------------------------------------------
# Masks


COLORS = np.array([[0.90, 0.10, 0.10], [1.00, 0.60, 0.00], [0.60, 0.10, 0.80], [0.00, 0.70, 0.30],
                   [0.95, 0.85, 0.10], [0.10, 0.80, 0.90], [0.90, 0.30, 0.70], [0.50, 0.50, 0.10]])


def demo_images(n):
    """n val images of data/demo, or grey squares when the demo data are missing."""
    path = os.path.join(ROOT, 'data', 'demo', 'val_images.npy')
    if os.path.isfile(path):
        imgs = np.load(path, mmap_mode='r')
        return [np.asarray(imgs[i]) for i in (0, 7, 14, 21)[:n]]
    return [np.full((64, 64, 3), 128, np.uint8)] * n


def draw_mask_2d(ax, img, grid, ctx, tgt, title):
    """img (H, W, 3) uint8; ctx (Nc,) and tgt (M, K) patch indices on the (gh, gw) grid."""
    gh, gw = grid
    H, W = img.shape[:2]
    ph, pw = H // gh, W // gw
    out = img.astype(float) / 255
    shade = np.full((gh, gw), True)
    shade.flat[ctx.numpy()] = False
    for r in range(gh):
        for c in range(gw):
            if shade[r, c]:  # hidden from the context encoder
                out[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] *= 0.25
    ax.imshow(out, extent=(0, gw, gh, 0), interpolation='nearest')
    for m, block in enumerate(tgt):
        rows, cols = np.unravel_index(block.numpy(), grid)
        r0, c0 = rows.min(), cols.min()
        ax.add_patch(plt.Rectangle((c0, r0), cols.max() - c0 + 1, rows.max() - r0 + 1, fill=True,
                                   facecolor=(*COLORS[m], 0.25), edgecolor=COLORS[m], lw=2))
    ax.set_xticks(range(gw + 1))
    ax.set_yticks(range(gh + 1))
    ax.set_xticklabels([])
    ax.set_yticklabels([])
    ax.grid(color='white', lw=0.3, alpha=0.5)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=9)


def fig_masks_2d():
    """Row 1: four demo images with the masks of one training batch (64 px, patch 8: 8 x 8 grid).
    Row 2: the same sampler on the 14 x 14 grid of a 224-px image with 16-px patches."""
    cfg = mj.DEFAULTS
    fig, axes = plt.subplots(2, 4, figsize=(12, 7))
    for row, (grid, size) in enumerate([((8, 8), 64), ((14, 14), 224)]):
        gen = torch.Generator().manual_seed(1)
        ctx, tgt = mj.sample_masks(4, grid, gen, **{k: cfg[k] for k in mj.MASK_KEYS})
        imgs = demo_images(4) if row == 0 else [np.full((size, size, 3), 200, np.uint8)] * 4
        for b in range(4):
            draw_mask_2d(axes[row, b], imgs[b], grid, ctx[b], tgt[b],
                         f'{grid[0]}x{grid[1]} grid: context {ctx.shape[1]} of {grid[0] * grid[1]} patches,\n'
                         f'{tgt.shape[1]} target blocks of {tgt.shape[2]} patches')
    fig.suptitle('medjepa.sample_masks, default settings: coloured boxes = target blocks (predicted); '
                 'bright patches = context (seen); dark = hidden', fontsize=10)
    fig.tight_layout()
    save(fig, 'masks_2d.png')


def fig_masks_3d():
    """medjepa3d's two mask sets on its default 8 x 4 x 4 token grid, two volumes of one batch:
    one layout per batch, each volume sees it under its own flips; every depth slice drawn."""
    cfg = mj3.DEFAULTS
    grid = tuple(v // p for v, p in zip(cfg['volume_size'], cfg['patch_size']))
    gen = torch.Generator().manual_seed(4)  # a draw where both volumes show different flips
    sets = [('short-range', cfg['short_blocks'], cfg['short_scale']), ('long-range', cfg['long_blocks'], cfg['long_scale'])]
    fig, axes = plt.subplots(4, grid[0], figsize=(1.3 * grid[0], 6.2))
    N = int(np.prod(grid))
    for s, (name, num, scale) in enumerate(sets):
        ctx, tgt = mj3.sample_masks_3d(2, grid, gen, num, scale, cfg['target_aspect'], cfg['depth_scale'], cfg['min_keep'])
        for b in range(2):
            hidden = np.zeros(N, bool)
            hidden[tgt[b, 0].numpy()] = True
            hidden = hidden.reshape(grid)
            for d in range(grid[0]):
                ax = axes[2 * s + b, d]
                ax.imshow(hidden[d], cmap='RdYlBu_r', vmin=-0.3, vmax=1.3, interpolation='nearest')
                ax.set_xticks(np.arange(-0.5, grid[2], 1))
                ax.set_yticks(np.arange(-0.5, grid[1], 1))
                ax.set_xticklabels([])
                ax.set_yticklabels([])
                ax.tick_params(length=0)
                ax.grid(color='k', lw=0.4)
                if 2 * s + b == 0:
                    ax.set_title(f'depth {d}', fontsize=8)
                if d == 0:
                    ax.set_ylabel(f'{name}\nvolume {b}\n{tgt.shape[2]} hidden, {ctx.shape[1]} seen', fontsize=8)
    fig.suptitle(f'medjepa3d.sample_masks_3d, default settings, {grid[0]}x{grid[1]}x{grid[2]} token grid: '
                 'red = target (hidden), blue = context', fontsize=10)
    fig.tight_layout()
    save(fig, 'masks_3d.png')

# -----------------------------------------------------------------------------
# SIGReg


def sigreg_examples(N=512, K=64, seed=0):
    """Batches of N embeddings of width K that SIGReg should and should not accept."""
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(N, K, generator=g)
    u = (torch.rand(N, K, generator=g) * 2 - 1) * 3 ** 0.5  # uniform, mean 0, variance 1
    rank2 = torch.randn(N, 2, generator=g) @ torch.randn(2, K, generator=g) / 2 ** 0.5
    centres = torch.randn(8, K, generator=g)
    clusters = centres[torch.randint(0, 8, (N,), generator=g)] + 0.1 * torch.randn(N, K, generator=g)
    clusters = clusters / clusters.std()
    return {
        'N(0, I)': gauss,
        'N(0, 0.3^2 I): too narrow': 0.3 * torch.randn(N, K, generator=g),
        'uniform in a cube, variance 1': u,
        '8 clusters, variance 1': clusters,
        'rank 2, variance 1': rank2,
        'collapsed: all 0': torch.zeros(N, K),
    }


def fig_sigreg():
    """Left: the 1-D projections along one random direction. Middle: their empirical characteristic
    function against exp(-t^2/2) on SIGReg's 17 knots. Right: SIGReg (medjepa.sigreg, 256 slices)."""
    ex = sigreg_examples()
    t = mj._EP_T.numpy()
    a = torch.randn(64, generator=torch.Generator().manual_seed(5))
    a = a / a.norm()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    xs = np.linspace(-4, 4, 200)
    axes[0].plot(xs, np.exp(-xs ** 2 / 2) / np.sqrt(2 * np.pi), 'k--', lw=1.5, label='N(0, 1) density')
    axes[1].plot(t, np.exp(-t ** 2 / 2), 'k--', lw=1.5, label='exp(-t^2/2)')
    vals = {}
    for i, (name, z) in enumerate(ex.items()):
        x = (z @ a).numpy()
        col = f'C{i}'
        if x.std() > 0:
            axes[0].hist(x, bins=40, range=(-4, 4), density=True, histtype='step', color=col, lw=1.3, label=name)
        else:
            axes[0].axvline(0, color=col, lw=1.3, label=name + ' (a spike at 0)')
        c = np.cos(t[None] * x[:, None]).mean(0)
        axes[1].plot(t, c, 'o-', ms=3, color=col, label=name)
        vals[name] = mj.sigreg(z, step=0).item()
    axes[0].set_title('projections x = a . z on one random unit direction a', fontsize=10)
    axes[0].set_xlabel('x')
    axes[0].legend(fontsize=6.5, loc='upper left')
    axes[0].set_ylim(0, 1.6)
    axes[1].set_title('empirical characteristic function, real part c(t) = mean cos(t x)\n'
                      '(the 17 knots of medjepa._EP_T)', fontsize=10)
    axes[1].set_xlabel('t')
    axes[1].legend(fontsize=7)
    names = list(vals)
    axes[2].barh(range(len(names)), [vals[n] for n in names], color=[f'C{i}' for i in range(len(names))])
    axes[2].set_xscale('log')
    axes[2].set_yticks(range(len(names)))
    axes[2].set_yticklabels(names, fontsize=8)
    axes[2].invert_yaxis()
    for i, n in enumerate(names):
        axes[2].text(vals[n], i, f' {vals[n]:.2f}', va='center', fontsize=8)
    axes[2].set_title('medjepa.sigreg(z): mean Epps-Pulley statistic\nover 256 slices (N = 512, K = 64)', fontsize=10)
    axes[2].set_xlim(0.5, 2e3)
    fig.tight_layout()
    save(fig, 'sigreg_distributions.png')
    return vals


def fig_sigreg_scaling():
    """Left: SIGReg of N(0, s^2 I) against s (minimum at s = 1). Right: against the batch size N,
    for a Gaussian batch (a constant ~1.06 bias) and a collapsed one (~0.41 N)."""
    g = torch.Generator().manual_seed(0)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    s = np.geomspace(0.05, 5, 41)
    base = torch.randn(512, 64, generator=g)
    axes[0].plot(s, [mj.sigreg(float(v) * base, step=0).item() for v in s], 'o-', ms=3)
    axes[0].set_xscale('log')
    axes[0].set_yscale('log')
    axes[0].axvline(1, color='k', ls=':', lw=1)
    axes[0].set_xlabel('scale s of the embeddings z ~ N(0, s^2 I)')
    axes[0].set_ylabel('SIGReg')
    axes[0].set_title('N = 512, K = 64: the test wants unit scale', fontsize=10)
    Ns = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    gauss = [mj.sigreg(torch.randn(n, 64, generator=g), step=0).item() for n in Ns]
    coll = [mj.sigreg(torch.zeros(n, 64), step=0).item() for n in Ns]
    axes[1].plot(Ns, coll, 'o-', ms=3, label='collapsed (all 0)')
    axes[1].plot(Ns, gauss, 'o-', ms=3, label='N(0, I)')
    axes[1].set_xscale('log')
    axes[1].set_yscale('log')
    axes[1].set_xlabel('batch size N')
    axes[1].set_title('the statistic is N x a distance: grows with N\nfor a wrong distribution, stays ~1 for the right one', fontsize=10)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save(fig, 'sigreg_scaling.png')
    return dict(zip(Ns, zip(gauss, coll)))

# -----------------------------------------------------------------------------
# Training runs


def plot_runs(names, labels, fname, title):
    logs = {n: read_log(n) for n in names}
    names = [n for n in names if logs[n] is not None]
    if not names:
        print(f'skipped {fname}: no logs in {LOGS} (python docs/figures.py --train)')
        return
    fig, axes = plt.subplots(1, 5, figsize=(19, 3.6))
    keys = [('pred', 'prediction loss (MSE)', True), ('sigreg', 'SIGReg statistic (logged even at lambda 0)', True),
            ('emb_std', 'emb_std: spread of unit-norm embeddings', True), ('erank', 'erank: effective rank (batch of 64: at most 64)', False)]
    for i, n in enumerate(names):
        steps, knn = logs[n]
        it = [r['iter'] for r in steps]
        for ax, (k, _, _) in zip(axes, keys):
            ax.plot(it, [r[k] for r in steps], color=f'C{i}', lw=1.2, label=labels[n])
        axes[4].plot([r['iter'] for r in knn], [100 * r['knn_val'] for r in knn], 'o-', color=f'C{i}', label=labels[n])
    for ax, (k, t, log) in zip(axes, keys):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel('step')
        if log:
            ax.set_yscale('log')
    axes[4].axhline(100 / 7, color='k', ls=':', lw=1, label='chance (7 classes)')
    axes[4].set_title('online kNN accuracy on val (%)', fontsize=9)
    axes[4].set_xlabel('step')
    axes[4].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save(fig, fname)


def fig_runs():
    plot_runs(['lam0', 'lam0.05'], {'lam0': 'sigreg_lambda=0 (no SIGReg)', 'lam0.05': 'sigreg_lambda=0.05 (default)'},
              'collapse_mask.png', "objective 'mask' on data/demo, 300 steps: without SIGReg the embeddings collapse")
    plot_runs(['views_lam0', 'views_lam0.05'], {'views_lam0': 'sigreg_lambda=0 (no SIGReg)', 'views_lam0.05': 'sigreg_lambda=0.05 (default)'},
              'collapse_views.png', "objective 'views' (config/demo_views.py), 300 steps, with and without SIGReg")
    lams = ['lam0', 'lam0.01', 'lam0.05', 'lam0.2', 'lam0.5']
    plot_runs(lams, {n: f'sigreg_lambda={n[3:]}' for n in lams}, 'sigreg_lambda.png',
              "objective 'mask', 300 steps: the SIGReg weight lambda (loss = (1 - lambda) pred + lambda SIGReg)")
    sl = ['slices8', 'slices32', 'lam0.05', 'slices1024']
    plot_runs(sl, {'slices8': 'num_slices=8', 'slices32': 'num_slices=32', 'lam0.05': 'num_slices=256 (default)',
                   'slices1024': 'num_slices=1024'}, 'sigreg_slices.png',
              "objective 'mask', lambda 0.05, 300 steps: the number of random directions per step")


def save(fig, name):
    os.makedirs(FIG, exist_ok=True)
    fig.savefig(os.path.join(FIG, name), dpi=90)
    plt.close(fig)
    print(f'wrote docs/figures/{name}')


GROUPS = {'masks': [fig_masks_2d, fig_masks_3d], 'sigreg': [fig_sigreg, fig_sigreg_scaling], 'runs': [fig_runs]}

if __name__ == '__main__':
    args = sys.argv[1:]
    torch.set_num_threads(1)
    out_root = next((a.split('=', 1)[1] for a in args if a.startswith('--out_root=')), 'out-docs')
    if '--train' in args:
        train_missing(out_root)
    if '--table' in args or '--probe' in args:
        table() if '--table' in args else probe(out_root)
        sys.exit(0)
    groups = [a for a in args if not a.startswith('--')] or list(GROUPS)
    for g in groups:
        if g not in GROUPS:
            sys.exit(f"unknown figure group '{g}': choose from {', '.join(GROUPS)}")
        for f in GROUPS[g]:
            out = f()
            if out is not None:
                print(out)
