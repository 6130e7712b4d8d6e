"""
docs/nuisances.py: which nuisances of the demo data does an encoder's frozen representation encode?

    python docs/nuisances.py out-demo-views/ckpt.pt            # the checkpoint's encoder
    python docs/nuisances.py out-demo-views/ckpt.pt --random   # the same architecture, untrained
    (--split=val|test|train, --limit=N: the first N lesions only; about 30 s for the 999 val images)

prepare.py draws every demo photo from seeds, so each photo's nuisances (pose, light, vignetting,
hair, blur, noise; the lesion's size, darkness, pigment colour, skin tone, hospital) can be drawn
again exactly as the generator drew them (prepare.render_image(..., record=...)); the replayed photo
must equal the stored one, pixel for pixel, or the script stops. Then, on the features eval.py
uses (the mean of the encoder's output tokens, each dimension standardised):
- R^2 of a ridge regression from the features to each nuisance (5-fold cross-validated on the
  split: 1 = the features hold it exactly, 0 = not linearly at all);
- the largest |correlation| of each nuisance with the top five principal components, which dominate
  the cosine distances of a kNN vote;
- 5-fold cross-validated accuracy of a logistic regression for the class, for scale.
A representation that is good for kNN has the class in its top components and the nuisances out.
docs/design.md reads the output for the `views` demo recipe.
"""
import argparse
import os
import sys

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import cross_val_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import medjepa as mj  # noqa: E402
import prepare  # noqa: E402


def lesion_nuisances(L):
    """What stays fixed across the photos of one lesion (prepare.sample_lesion)."""
    return dict(site=L['site'], size=L['r0'], aspect=L['aspect'], skin_tone=float(np.mean(L['skin'])),
                darkness=L['density'], pigment_blue=float(L['pigment'][2] - L['pigment'][0]),
                texture_contrast=L['contrast'], edge_softness=L['edge'])


def replay(data_dir, split, limit=0):
    """(N, K) nuisances of the split's photos, their names, the class labels and the photos' indices.
    Each lesion's photos are rendered again from their seeds and matched to the stored ones."""
    meta, d = mj.read_meta(data_dir), mj.load_split(data_dir, split)
    if meta.get('name') != 'demo' or meta.get('generator_version') != prepare.DEMO_VERSION:
        sys.exit(f"{data_dir} is not the demo data of generator version {prepare.DEMO_VERSION}: "
                 f"regenerate it with 'python prepare.py demo'")
    size, seed = d['images'].shape[1], meta['seed']
    groups, rows = np.asarray(d['groups']), {}
    for lesion in np.unique(groups)[:limit or None]:
        where = np.flatnonzero(groups == lesion)
        L = prepare.sample_lesion(seed, int(lesion), int(d['labels'][where[0]]))
        for k in range(prepare.IMAGES_PER_LESION):
            rec = lesion_nuisances(L)
            img, _ = prepare.render_image(L, np.random.default_rng([seed, int(lesion), k]), size, record=rec)
            hit = [int(w) for w in where if np.array_equal(d['images'][w], img)]
            if len(hit) != 1:
                sys.exit(f"photo {k} of lesion {lesion} does not match the stored {split} images "
                         f"({len(hit)} matches): was {data_dir} made by another prepare.py?")
            rows[hit[0]] = rec
    idx = np.array(sorted(rows))
    names = list(rows[idx[0]])
    return np.array([[rows[i][n] for n in names] for i in idx], float), names, np.asarray(d['labels'])[idx], idx


def features(c, split, idx, random=False):
    """Frozen features (mean of the output tokens) of the split's photos idx; c: the checkpoint dict."""
    cfg = {**mj.DEFAULTS, **c['config']}
    data_dir = cfg['data_dir']
    meta = mj.read_meta(data_dir)
    torch.manual_seed(0)
    model = mj.build_model(cfg, in_chans=len(meta['mean']))
    if not random:
        model.load_state_dict(c['model'])
    images = mj.load_split(data_dir, split)['images']
    with torch.no_grad():
        return mj.extract_features(model.encoder, images[idx], np.asarray(meta['mean'], np.float32),
                                   np.asarray(meta['std'], np.float32))


def report(X, N, names, y):
    """Printable lines: class accuracy, then R^2 and top-component correlation per nuisance."""
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    _, S, Vt = np.linalg.svd(X, full_matrices=False)
    share, pcs = S**2 / (S**2).sum(), X @ Vt[:5].T  # (N, 5)
    acc = cross_val_score(LogisticRegression(max_iter=2000), X, y, cv=5).mean()
    lines = [f"top-5 principal components hold {100 * share[:5].sum():.0f} % of the variance "
             f"({', '.join(f'{100 * s:.0f}' for s in share[:5])} %); class: logistic regression "
             f"{100 * acc:.1f} % (5-fold)", '', '| nuisance | ridge R^2 | top-5 PC, max abs corr |', '|---|---:|---:|']
    for j, name in enumerate(names):
        t = N[:, j]
        if t.std() == 0:
            continue
        r2 = cross_val_score(RidgeCV(alphas=np.logspace(-2, 3, 12)), X, t, cv=5, scoring='r2').mean()
        corr = np.abs([np.corrcoef(pcs[:, p], t)[0, 1] for p in range(pcs.shape[1])])
        lines.append(f"| {name} | {r2:.2f} | {corr.max():.2f} (PC {int(corr.argmax()) + 1}) |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('ckpt')
    p.add_argument('--random', action='store_true', help='the same architecture, untrained (seed 0)')
    p.add_argument('--split', default='val', choices=['train', 'val', 'test'])
    p.add_argument('--limit', type=int, default=0, help='the first N lesions of the split only (0 = all)')
    a = p.parse_args(argv)
    c = mj.load_checkpoint(a.ckpt, spatial_dims=mj.SPATIAL_DIMS)
    data_dir = c['config']['data_dir']
    N, names, y, idx = replay(data_dir, a.split, a.limit)
    X = features(c, a.split, idx, a.random)
    print(f"{'random-init' if a.random else a.ckpt} on {len(idx)} {a.split} images of {data_dir}:")
    print('\n'.join(report(X, N, names, y)))


if __name__ == '__main__':
    main()
