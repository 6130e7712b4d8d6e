"""
Evaluate a MedJEPA encoder the standard self-supervised way: freeze it, turn every image into one
feature vector, and ask how much of the label is already there.

    python eval.py --ckpt=out-demo/ckpt.pt                      # kNN + linear probe, with baselines
    python eval.py --ckpt=out-demo/ckpt.pt --knn_ks=10,20,100   # extra kNN columns
    python eval.py --ckpt=out-demo/ckpt.pt --tasks=knn --baselines=none --device=cuda

    python eval.py --help                                       # every flag, with its default

No checkpoint yet? Make one with `python medjepa.py` (writes out-demo/ckpt.pt; see its docstring).
On the demo data (6000/999/2001 images at 64 px, encoder width 192) the run takes 1-2 minutes on
2 CPU cores, mostly the two encoder passes and the raw-pixel linear probe. It prints a markdown
table and writes eval.json (every number) and eval.md (the table) next to the checkpoint.

The protocol (SPEC section 4), and why each piece is there:

- Three "encoders" are compared on the same splits, because a number alone says little:
    pretrained   the checkpoint's encoder,
    random-init  the same architecture, untrained (seeded): how much the architecture alone gives,
    raw pixels   each image area-averaged to 16x16 and flattened: how much needs no learning at all.
  Pretraining is only worth something if it beats both.
- kNN (DINO protocol): L2-normalise features, take the k = 20 most cosine-similar TRAIN images of
  each TEST image, each votes for its label with weight exp(sim / T), T = 0.07. No training and no
  hyperparameters tuned, so it measures the geometry of the feature space directly.
- Linear probe: standardise features (statistics from train only), fit a multinomial logistic
  regression on train for each C in a small grid, pick C by VALIDATION accuracy, and evaluate that
  one model on test once. Test never chooses anything; choosing on test inflates the number.
- Metrics: accuracy, balanced accuracy (mean per-class recall: medical data sets are imbalanced and
  "always say the common class" scores high accuracy), macro-F1, and AUROC (one-vs-rest mean for
  multiclass, the positive class for binary) from predicted probabilities.

Adding an evaluation = one function in TASKS that takes features and labels per split and returns
(numbers for eval.json, cells for the table).
"""
import argparse
import difflib
import json
import os
import platform
import re
import sys
import time
import warnings

import numpy as np
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import medjepa


# -----------------------------------------------------------------------------
# defaults (override with --key=value)
ckpt = 'out-demo/ckpt.pt'   # checkpoint written by medjepa.py; eval.json / eval.md go next to it
data_dir = ''               # data set folder; '' = the one the checkpoint was trained on
tasks = 'knn,linear'        # comma-separated keys of TASKS
baselines = 'random,pixels' # rows besides the checkpoint: random-init encoder, raw pixels ('none' = no rows)
device = 'cpu'              # where features are computed ('cpu', 'cuda', 'mps')
dtype = 'auto'              # feature precision: 'float32', 'bfloat16', 'auto' (medjepa.resolve_dtype: bf16 where it is fast)
seed = 0                    # seeds the random-init encoder and the probe
batch_size = 256            # images per forward pass when extracting features
knn_ks = '20'               # comma-separated k values for kNN, e.g. 10,20,100 (20 is the DINO default)
knn_T = 0.07                # kNN vote temperature: weight = exp(cosine_sim / T)
pixel_size = 16             # raw-pixel baseline: images area-averaged to pixel_size x pixel_size
CS = [1e-3, 1e-2, 1e-1, 1e0, 1e1, 1e2]  # linear-probe inverse regularisation strengths tried on val


# -----------------------------------------------------------------------------

SPLITS = ('train', 'val', 'test')
SUPPORTED = ('multiclass', 'binary')


# -----------------------------------------------------------------------------
# features


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


def encoder_features(encoder, images, meta, dev, bs, dtype='float32'):
    """Frozen encoder -> {split: (N, D) float32}, computed once and shared by every task.

    bfloat16 autocast changes the features by ~0.1 % (measured on the demo), far below what moves
    a kNN vote or a probe, and halves the time on CPU.
    """
    encoder.to(dev).eval()
    amp = torch.autocast(dev.split(':')[0], dtype=torch.bfloat16, enabled=(dtype == 'bfloat16'))
    with amp:
        return {s: medjepa.extract_features(encoder, images[s], meta['mean'], meta['std'], device=dev, batch_size=bs)
                for s in SPLITS}


# -----------------------------------------------------------------------------
# metrics and the two probes


def classification_metrics(y_true, y_score):
    """y_true (N,) int labels, y_score (N, K) class scores or probabilities -> dict of floats.

    acc / bal_acc / macro_f1 use the argmax prediction. AUROC ranks the scores: for K = 2 it is the
    AUROC of class 1 (the positive class); for K > 2 it is the mean over classes of the one-vs-rest
    AUROC (MedMNIST's "AUC"), over the classes that have both positives and negatives in y_true
    (with every class present this equals sklearn's roc_auc_score(multi_class='ovr')). NaN if
    undefined (a single class in y_true).
    """
    y_true = np.asarray(y_true).reshape(-1)
    y_score = np.asarray(y_score, dtype=np.float64)
    K = y_score.shape[1]
    y_pred = y_score.argmax(1)
    if K == 2:
        auroc = roc_auc_score(y_true, y_score[:, 1]) if len(np.unique(y_true)) == 2 else float('nan')
    else:
        present = [c for c in range(K) if 0 < (y_true == c).sum() < len(y_true)]
        per_class = [roc_auc_score(y_true == c, y_score[:, c]) for c in present]
        auroc = float(np.mean(per_class)) if per_class else float('nan')
    return {
        'acc': float(accuracy_score(y_true, y_pred)),
        'bal_acc': float(balanced_accuracy_score(y_true, y_pred)),
        'macro_f1': float(f1_score(y_true, y_pred, average='macro', zero_division=0)),
        'auroc': float(auroc),
        'n': int(len(y_true)),
    }


def knn_accuracy(train_x, train_y, test_x, test_y, num_classes, k=20, T=0.07):
    """DINO kNN classifier (medjepa.knn_predict), train = memory bank -> metrics dict on test.

    Despite the name it returns all of classification_metrics; the votes are turned into vote
    shares (rows sum to 1) so that AUROC compares like with like across images.
    """
    scores = medjepa.knn_predict(train_x, train_y, test_x, num_classes, k=k, T=T)  # (Nq, K)
    shares = scores / np.maximum(scores.sum(1, keepdims=True), 1e-12)
    return {**classification_metrics(test_y, shares), 'k': k, 'T': T}


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, Cs=CS, seed=0, num_classes=None, max_iter=1000):
    """Logistic regression on frozen features, C chosen on val, reported on test once.

    For each C: fit on train (standardised with train statistics), score accuracy on val. The model
    with the best val accuracy (ties -> the smaller C, i.e. the simpler model) is the one evaluated
    on test; nothing is refit and test_y is read only for that final score.
    Returns test metrics + 'C' (chosen) + 'val_acc' {C: acc} + 'n_iter' {C: iterations}.
    """
    K = num_classes or int(max(train_y.max(), val_y.max(), test_y.max())) + 1
    # float32: each lbfgs step streams the whole feature matrix through memory twice, so half the
    # bytes is ~1.6x faster (measured); the probe's accuracy does not need float64.
    train_x, val_x, test_x = (np.asarray(x, dtype=np.float32) for x in (train_x, val_x, test_x))
    scaler = StandardScaler().fit(train_x)  # mean/std from train only: val and test stay unseen
    Xtr, Xva, Xte = (scaler.transform(x) for x in (train_x, val_x, test_x))
    val_acc, n_iter, unconverged = {}, {}, []
    best, best_acc = None, -1.0
    for C in sorted(Cs):
        # lbfgs with >2 classes fits the multinomial (softmax) model; the intercept is not penalised.
        # Each C starts from zero: warm starts looked faster but stopped early at large C (measured).
        clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        # One BLAS thread: these matrix products are tiny, and on a shared 2-core machine OpenBLAS's
        # spinning worker threads made the probe 50-100x slower (measured), not faster.
        with warnings.catch_warnings(), threadpool_limits(1, user_api='blas'):
            warnings.simplefilter('ignore', ConvergenceWarning)  # recorded below instead of spammed
            clf.fit(Xtr, train_y)
        n_iter[C] = int(clf.n_iter_.max())
        if n_iter[C] >= max_iter:
            unconverged.append(C)
        val_acc[C] = float(accuracy_score(val_y, clf.predict(Xva)))
        if val_acc[C] > best_acc:  # strict: ties keep the smaller C
            best, best_acc = clf, val_acc[C]
    proba = np.zeros((len(Xte), K))
    proba[:, best.classes_] = best.predict_proba(Xte)  # classes absent from train get probability 0
    return {**classification_metrics(test_y, proba), 'C': float(best.C), 'val_acc': val_acc,
            'n_iter': n_iter, 'unconverged_Cs': unconverged}


# -----------------------------------------------------------------------------
# tasks: (features per split, labels per split, settings) -> (numbers for eval.json, table cells)


def task_knn(X, y, cfg):
    results, cells = {}, {}
    for k in cfg['knn_ks']:
        r = knn_accuracy(X['train'], y['train'], X['test'], y['test'], cfg['num_classes'], k=k, T=cfg['knn_T'])
        results[f'k={k}'] = r
        cells[f'kNN acc (k={k})'] = 100 * r['acc']
    return results, cells


def task_linear(X, y, cfg):
    r = linear_probe(X['train'], y['train'], X['val'], y['val'], X['test'], y['test'],
                     Cs=cfg['Cs'], seed=cfg['seed'], num_classes=cfg['num_classes'])
    cells = {'linear acc': 100 * r['acc'], 'linear bal-acc': 100 * r['bal_acc'],
             'linear AUROC': 100 * r['auroc'], 'C (val)': f"{r['C']:g}"}
    return r, cells


TASKS = {'knn': task_knn, 'linear': task_linear}


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
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def check_task(meta):
    """Fail early, with the name of the problem, on label types this version cannot score."""
    task = meta.get('task', 'multiclass')
    if task not in SUPPORTED:
        raise NotImplementedError(
            f"eval.py does not support task '{task}' (data set '{meta.get('name', '?')}') yet: "
            f"supported are {', '.join(SUPPORTED)}. Multi-label evaluation (per-label AUROC) is planned.")
    return task


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    """--key=value flags for the globals at the top; their comments are the --help text."""
    g = globals()
    keys = ['ckpt', 'data_dir', 'tasks', 'baselines', 'device', 'dtype', 'seed', 'batch_size',
            'knn_ks', 'knn_T', 'pixel_size']
    with open(__file__) as f:
        helps = dict(re.findall(r"^(\w+) = .*?# (.*)$", f.read(), re.M))
    p = argparse.ArgumentParser(description='\n\n'.join(__doc__.strip().split('\n\n')[:2]), allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for k in keys:
        p.add_argument(f'--{k}', type=type(g[k]), default=g[k], help=f"{helps.get(k, '')} (default: {g[k]!r})")
    args, unknown = p.parse_known_args(argv)
    for u in unknown:
        name = u.split('=', 1)[0].lstrip('-')
        close = difflib.get_close_matches(name, keys, n=1)
        hint = f"did you mean --{close[0]}?" if close else f"valid flags: {', '.join('--' + k for k in keys)}"
        p.error(f"unknown flag {u!r}; {hint}")
    args.tasks = [t for t in args.tasks.split(',') if t]
    for t in args.tasks:
        if t not in TASKS:
            p.error(f"unknown task {t!r} in --tasks; choose from {', '.join(TASKS)}")
    args.baselines = [] if args.baselines in ('', 'none') else args.baselines.split(',')
    for b in args.baselines:
        if b not in ('random', 'pixels'):
            p.error(f"unknown baseline {b!r} in --baselines; choose from random, pixels (or none)")
    if args.dtype not in ('auto', 'float32', 'bfloat16'):
        p.error(f"--dtype must be auto, float32 or bfloat16, got {args.dtype!r}")
    try:
        args.knn_ks = [int(k) for k in args.knn_ks.split(',')]
        assert all(k > 0 for k in args.knn_ks)
    except (ValueError, AssertionError):
        p.error(f"--knn_ks must be comma-separated positive integers, got {args.knn_ks!r}")
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
    meta = medjepa.read_meta(ddir)
    check_task(meta)
    data = {s: medjepa.load_split(ddir, s) for s in SPLITS}
    for s in SPLITS:
        if data[s]['labels'] is None:
            sys.exit(f"error: split '{s}' of {ddir} has no labels; kNN / linear probe need them")
    images = {s: data[s]['images'] for s in SPLITS}
    labels = {s: np.asarray(data[s]['labels']).astype(np.int64).reshape(-1) for s in SPLITS}
    counts = {s: int(len(labels[s])) for s in SPLITS}
    cfg = {'num_classes': int(meta['num_classes']), 'seed': args.seed, 'knn_ks': args.knn_ks,
           'knn_T': args.knn_T, 'Cs': CS}

    # each encoder row: a function returning {split: features}, called once
    in_chans = images['train'].shape[-1]
    dtype = medjepa.resolve_dtype(args.dtype, args.device)
    def pretrained():
        model = medjepa.build_model(config, in_chans)
        model.load_state_dict(ckpt['model'])  # strict: a mismatch is a bug, not a warning
        return encoder_features(model.encoder, images, meta, args.device, args.batch_size, dtype)
    def random_init():
        torch.manual_seed(args.seed)
        model = medjepa.build_model(config, in_chans)
        return encoder_features(model.encoder, images, meta, args.device, args.batch_size, dtype)
    def pixels():
        return {s: pixel_features(images[s], args.pixel_size, meta['mean'], meta['std']) for s in SPLITS}
    encoders = [('pretrained', pretrained)]
    encoders += [('random-init', random_init)] if 'random' in args.baselines else []
    encoders += [('raw pixels', pixels)] if 'pixels' in args.baselines else []

    results, rows = {}, []
    for name, features in encoders:
        t1 = time.time()
        X = features()
        res = {'feature_dim': int(X['train'].shape[1]), 'feature_time_s': round(time.time() - t1, 2)}
        row = {'encoder': name}
        for t in args.tasks:
            t2 = time.time()
            res[t], cells = TASKS[t](X, labels, cfg)
            res[t + '_time_s'] = round(time.time() - t2, 2)
            row.update(cells)
        results[name] = res
        rows.append(row)
        print(f"{name}: {res['feature_dim']}-dim features in {res['feature_time_s']:.1f}s, "
              + ', '.join(f"{t} in {res[t + '_time_s']:.1f}s" for t in args.tasks))
        if 'linear' in res and res['linear']['C'] in res['linear']['unconverged_Cs']:
            # usually harmless (a fit stopped early is still a regularised fit), but say so
            print(f"  note: at the chosen C={res['linear']['C']:g} lbfgs stopped at max_iter before its tolerance")

    dname = meta.get('name', os.path.basename(os.path.normpath(ddir)))
    title = (f"**{dname}**: {counts['train']} train / {counts['val']} val / {counts['test']} test images, "
             f"{cfg['num_classes']} classes; metrics on **test**, in %; seed {args.seed} "
             f"(pretraining seed {config.get('seed', '?')}); linear-probe C chosen on val from "
             f"{', '.join(f'{c:g}' for c in CS)}; checkpoint {args.ckpt} (iter {ckpt.get('iter_num', '?')})")
    notes = [f"kNN: DINO protocol, cosine similarity, T={args.knn_T}, train set as memory bank. "
             "Linear: standardised features, multinomial logistic regression (lbfgs), refit-free. "
             f"Encoder features: mean-pooled tokens, {dtype}."]
    if 'random' in args.baselines:
        notes.append(f"random-init: the same architecture, untrained (torch.manual_seed({args.seed})).")
    if 'pixels' in args.baselines:
        D = results['raw pixels']['feature_dim']
        notes.append(f"raw pixels: images area-averaged to {args.pixel_size}x{args.pixel_size}, "
                     f"normalised with the data set mean/std, flattened ({D} dims); no encoder.")
    table = format_table(rows, title=title, notes=notes)
    elapsed = time.time() - t0

    out_dir = os.path.dirname(os.path.abspath(args.ckpt))
    report = {
        'dataset': dname, 'data_dir': ddir, 'task': meta.get('task', 'multiclass'), 'classes': meta.get('classes'),
        'counts': counts,
        'class_counts': {s: np.bincount(labels[s], minlength=cfg['num_classes']).tolist() for s in SPLITS},
        'report_split': 'test', 'selection_split': 'val',
        'seed': args.seed, 'pretrain_seed': config.get('seed'), 'Cs': CS, 'feature_dtype': dtype,
        'ckpt': args.ckpt, 'iter_num': ckpt.get('iter_num'), 'ckpt_config': config, 'eval_args': vars(args),
        'results': results, 'elapsed_s': round(elapsed, 2),
        'versions': {'python': platform.python_version(), 'torch': torch.__version__, 'numpy': np.__version__,
                     'sklearn': sklearn.__version__},
    }
    atomic_write(os.path.join(out_dir, 'eval.json'), json.dumps(to_json(report), indent=2) + '\n')
    atomic_write(os.path.join(out_dir, 'eval.md'), table)
    print()
    print(table)
    print(f"wrote {os.path.join(out_dir, 'eval.json')} and eval.md; total {elapsed:.1f}s")
    return report


if __name__ == '__main__':
    main()
