"""Tests for eval.py: the probes get the maths right, select on val only, and the CLI fails clearly.

Run: python -m pytest -q tests/test_eval.py   (a few seconds on 2 CPU cores)
"""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as ev  # noqa: E402  (the repo's eval.py, not the builtin)
import medjepa  # noqa: E402

K = 4  # classes in the synthetic problems below


def clusters(n, seed, D=16, spread=0.1):
    """n points, exactly n/K per class, each class a tight blob around 10 * e_class."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(K), n // K)
    x = 10.0 * np.eye(D)[y] + spread * rng.standard_normal((n, D))
    return x.astype(np.float32), y


# -----------------------------------------------------------------------------
# separable -> perfect, label-free -> chance


def test_knn_is_perfect_on_separable_clusters():  # needs medjepa.knn_predict
    xtr, ytr = clusters(200, 0)
    xte, yte = clusters(100, 1)
    r = ev.knn_accuracy(xtr, ytr, xte, yte, K, k=20)
    assert r['acc'] == 1.0 and r['bal_acc'] == 1.0 and r['auroc'] == 1.0


def test_knn_handles_k_larger_than_the_memory_bank():  # needs medjepa.knn_predict
    xtr, ytr = clusters(8, 0)  # 2 per class, k = 20 > 8
    xte, yte = clusters(40, 1)
    assert ev.knn_accuracy(xtr, ytr, xte, yte, K, k=20)['acc'] == 1.0


def test_linear_probe_is_perfect_on_separable_clusters():
    (xtr, ytr), (xva, yva), (xte, yte) = clusters(200, 0), clusters(100, 1), clusters(100, 2)
    r = ev.linear_probe(xtr, ytr, xva, yva, xte, yte)
    assert r['acc'] == 1.0 and r['bal_acc'] == 1.0 and r['macro_f1'] == 1.0 and r['auroc'] == 1.0
    assert set(r['val']) == set(ev.CS) and all(a == 1.0 for a in r['val'].values())
    assert r['C'] == min(ev.CS)  # every C ties on val: the documented tie-break keeps the smallest


# Permuting the labels makes them independent of the features. Test labels are exactly balanced
# (n/K per class), so whatever the classifier predicts, its expected test accuracy is 1/K and the
# standard deviation is at most sqrt(p (1 - p) / n) (a permutation only lowers it). With n = 800:
# sigma <= 1.53 points; we allow 4 sigma (6.1 points), which a correct probe exceeds with
# probability < 1e-4, while a probe that leaks test labels or reports train accuracy would not
# come near 25 %.
N_CHANCE = 800
CHANCE_TOL = 4 * math.sqrt(0.25 * 0.75 / N_CHANCE)


def permuted(n, seed):
    x, y = clusters(n, seed)
    return x, np.random.default_rng(seed + 100).permutation(y)


def test_knn_is_at_chance_on_permuted_labels():  # needs medjepa.knn_predict
    (xtr, ytr), (xte, yte) = permuted(400, 0), permuted(N_CHANCE, 1)
    acc = ev.knn_accuracy(xtr, ytr, xte, yte, K, k=20)['acc']
    assert abs(acc - 1 / K) < CHANCE_TOL, acc


def test_linear_probe_is_at_chance_on_permuted_labels():
    (xtr, ytr), (xva, yva), (xte, yte) = permuted(400, 0), permuted(200, 1), permuted(N_CHANCE, 2)
    r = ev.linear_probe(xtr, ytr, xva, yva, xte, yte)
    assert abs(r['acc'] - 1 / K) < CHANCE_TOL, r['acc']
    assert abs(r['auroc'] - 0.5) < 0.06, r['auroc']  # OvR AUROC: ~0.5, sd ~0.02 per class here


# -----------------------------------------------------------------------------
# model selection uses val only


def val_vs_test_problem():
    """Binary problem where val and test disagree about C.

    Train: 70 % class 0, feature 0 predicts the class. Val: every image is class 0, so the best
    val accuracy comes from the smallest C (the weights shrink to ~0 and the unpenalised intercept
    predicts the majority class everywhere). Test: balanced and feature-driven, so there a large C
    is best and the smallest C scores 50 %.
    """
    rng = np.random.default_rng(0)
    def make(n, frac1, label_rule=True):
        y = (rng.random(n) < frac1).astype(np.int64)
        x = rng.standard_normal((n, 8))
        x[:, 0] += 1.5 * (2 * y - 1)
        return x, (y if label_rule else np.zeros(n, np.int64))
    xtr, ytr = make(600, 0.3)
    xva, yva = make(300, 0.3, label_rule=False)
    xte, yte = make(600, 0.5)
    return xtr, ytr, xva, yva, xte, yte


def test_linear_probe_picks_the_C_best_on_val_even_when_test_prefers_another():
    xtr, ytr, xva, yva, xte, yte = val_vs_test_problem()
    r = ev.linear_probe(xtr, ytr, xva, yva, xte, yte)
    best_val_C = max(sorted(ev.CS), key=lambda C: r['val'][C])  # first maximum = smallest C
    # what an (illegal) selection on test would pick, computed independently here
    sc = StandardScaler().fit(xtr)
    test_acc = {C: LogisticRegression(C=C, max_iter=1000).fit(sc.transform(xtr), ytr).score(sc.transform(xte), yte)
                for C in ev.CS}
    best_test_C = max(sorted(ev.CS), key=lambda C: test_acc[C])
    assert best_val_C == min(ev.CS) and best_test_C != best_val_C  # the fixture really disagrees
    assert r['C'] == best_val_C
    assert r['acc'] == pytest.approx(test_acc[best_val_C])  # reported: the val-chosen model on test


def test_linear_probe_choice_does_not_depend_on_test_data():
    xtr, ytr, xva, yva, xte, yte = val_vs_test_problem()
    a = ev.linear_probe(xtr, ytr, xva, yva, xte, yte)
    b = ev.linear_probe(xtr, ytr, xva, yva, xte, np.random.default_rng(1).permutation(yte))
    c = ev.linear_probe(xtr, ytr, xva, yva, xte, 1 - yte)
    d = ev.linear_probe(xtr, ytr, xva, yva, 3 * xte + 5, yte)  # test images shifted: e.g. no scaler fit on test
    assert a['C'] == b['C'] == c['C'] == d['C']
    assert a['val'] == b['val'] == c['val'] == d['val']
    assert c['acc'] == pytest.approx(1 - a['acc'])  # only the final test score sees test labels


# -----------------------------------------------------------------------------
# metrics, pixel baseline, table


def test_classification_metrics_equal_sklearn_multiclass():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    p = rng.dirichlet(np.ones(5), 300) + 0.3 * np.eye(5)[y]  # informative but imperfect
    p /= p.sum(1, keepdims=True)
    m = ev.classification_metrics(y, p)
    pred = p.argmax(1)
    assert m['acc'] == pytest.approx(accuracy_score(y, pred))
    assert m['bal_acc'] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m['macro_f1'] == pytest.approx(f1_score(y, pred, average='macro'))
    assert m['auroc'] == pytest.approx(roc_auc_score(y, p, multi_class='ovr', average='macro'))
    assert 0.3 < m['acc'] < 0.95 and m['n'] == 300  # the fixture is neither trivial nor useless


def test_classification_metrics_binary_auroc_is_the_positive_class():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + 0.3 * rng.standard_normal(200), 0, 1)
    m = ev.classification_metrics(y, np.stack([1 - p1, p1], 1))
    assert m['auroc'] == pytest.approx(roc_auc_score(y, p1))
    assert m['acc'] == pytest.approx(accuracy_score(y, (p1 > 0.5).astype(int)))


def test_pixel_features_area_average_by_hand():
    img = np.zeros((1, 4, 4, 2), np.uint8)
    img[0, :, :, 0] = np.arange(16).reshape(4, 4)  # channel 0: 0..15
    img[0, :, :, 1] = 200                          # channel 1: constant
    f = ev.pixel_features(img, size=2)
    # 2x2 blocks of channel 0: (0+1+4+5)/4, (2+3+6+7)/4, (8+9+12+13)/4, (10+11+14+15)/4
    # flattened (h, w, c): block00 c0, block00 c1, block01 c0, block01 c1, ...
    expected = np.array([2.5, 200, 4.5, 200, 10.5, 200, 12.5, 200]) / 255
    assert f.shape == (1, 8) and f.dtype == np.float32
    np.testing.assert_allclose(f[0], expected, rtol=1e-6)


def test_pixel_features_normalise_per_channel_and_chunk():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]
    f = ev.pixel_features(imgs, size=4, mean=mean, std=std, chunk=2)  # chunk boundary mid-batch
    raw = imgs.reshape(5, 4, 2, 4, 2, 3).mean((2, 4)) / 255  # area average by reshaping
    np.testing.assert_allclose(f, ((raw - mean) / std).reshape(5, -1), rtol=1e-5, atol=1e-6)


def test_format_table_contains_every_row_and_number():
    rows = [{'encoder': 'pretrained', 'kNN acc (k=20)': 81.25, 'linear acc': 84.0, 'C (val)': '0.1'},
            {'encoder': 'random-init', 'kNN acc (k=20)': 40.04, 'linear acc': 52.96, 'C (val)': '1'},
            {'encoder': 'raw pixels', 'kNN acc (k=20)': 33.3, 'linear acc': None}]
    out = ev.format_table(rows, title='demo: 6000/1000/2000', notes=['raw pixels: 16x16'])
    lines = out.splitlines()
    assert lines[0] == 'demo: 6000/1000/2000' and 'raw pixels: 16x16' in lines[-1]
    header = next(l for l in lines if l.startswith('| encoder'))
    for col in ('kNN acc (k=20)', 'linear acc', 'C (val)'):
        assert col in header
    for r in rows:
        line = next(l for l in lines if l.startswith(f"| {r['encoder']} |"))
        for v in list(r.values())[1:]:
            want = '-' if v is None else f'{v:.1f}' if isinstance(v, float) else v
            assert f' {want} ' in line, (want, line)
    assert '| raw pixels | 33.3 | - | - |' in out  # missing cells are '-', not blank or 'None'
    assert sum(l.startswith('|') for l in lines) == 2 + len(rows)  # header, rule, one line per row


# -----------------------------------------------------------------------------
# command line and end to end


def test_unknown_task_type_fails_with_a_message_naming_it():
    with pytest.raises(NotImplementedError, match="regression.*boneage"):
        ev.check_task({'task': 'regression', 'name': 'boneage'})
    assert ev.check_task({'task': 'multilabel'}) == 'multilabel'
    assert ev.check_task({}) == 'multiclass'


def test_bad_flag_exits_2_and_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as e:
        ev.parse_args(['--ckp=out/ckpt.pt'])
    assert e.value.code == 2 and '--ckpt' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ev.parse_args(['--tasks=knn,fewshots'])
    assert e.value.code == 2 and 'fewshots' in capsys.readouterr().err
    for bad in ('0', '-2'):  # -1 is the per-dimensionality default, other values below 1 are refused
        with pytest.raises(SystemExit) as e:
            ev.parse_args([f'--seg_epochs={bad}'])
        assert e.value.code == 2 and f'--seg_epochs must be -1' in capsys.readouterr().err
    assert ev.parse_args(['--seg_epochs=-1']).seg_epochs == -1


def test_missing_checkpoint_names_the_path_and_how_to_make_one(tmp_path):
    path = str(tmp_path / 'nope' / 'ckpt.pt')
    with pytest.raises(SystemExit) as e:
        ev.main([f'--ckpt={path}'])
    assert path in str(e.value.code) and 'python medjepa.py' in str(e.value.code)


def write_tiny_data(data, corrupt_test=False, chans=3, size=16):
    """A 3-class data set of 16 px RGB images whose class is the colour (other channel counts: the
    brightness), with a bright square as the lesion mask, two sites and one group per image.
    corrupt_test: the same train and val, but the test split's labels and masks shuffled and its
    images replaced by noise."""
    rng = np.random.default_rng(0)
    data.mkdir()
    for split, n in (('train', 60), ('val', 30), ('test', 30)):
        y = np.arange(n) % 3
        x = rng.integers(0, 60, (n, size, size, chans)) + (80 * np.eye(3)[y] if chans == 3 else 40 * y[:, None])[:, None, None]
        masks = np.zeros((n, size, size), np.uint8)
        for i, (r, c) in enumerate(rng.integers(0, size - 7, (n, 2))):
            masks[i, r:r + 7, c:c + 7] = 1
        x = x + 100 * masks[..., None]  # the lesion is brighter
        sites = (np.arange(n) // 3) % 2
        if split == 'test' and corrupt_test:
            y, x, masks = rng.permutation(y), rng.integers(0, 256, x.shape), masks[rng.permutation(n)]
        arrays = {'images': x.clip(0, 255).astype(np.uint8), 'labels': y, 'masks': masks, 'sites': sites,
                  'groups': np.arange(n) + {'train': 0, 'val': 1000, 'test': 2000}[split]}
        for key, a in arrays.items():
            np.save(data / f'{split}_{key}.npy', a if key in ('images', 'masks') else a.astype(np.int64))
    json.dump({'name': 'tiny', 'task': 'multiclass', 'classes': ['r', 'g', 'b'], 'num_classes': 3,
               'mean': [0.2] * chans, 'std': [0.2] * chans}, open(data / 'meta.json', 'w'))


def write_tiny_checkpoint(out, data, chans=3):
    """An untrained tiny encoder (built, not trained; its config: 6 steps of 16 images) and a short
    training log, as medjepa.py writes."""
    cfg = dict(medjepa.DEFAULTS, data_dir=str(data), patch_size=4, n_layer=1, n_embd=24, n_head=2,
               pred_n_layer=1, pred_n_embd=12, pred_n_head=2, max_iters=6, batch_size=16)
    torch.manual_seed(0)
    model = medjepa.build_model(cfg, chans)
    out.mkdir()
    torch.save({'model': model.state_dict(), 'config': cfg, 'iter_num': 7}, out / 'ckpt.pt')
    with open(out / 'log.jsonl', 'w') as f:
        for it in (1, 2, 3):
            f.write(json.dumps(dict(iter=it, loss=1 / it, pred=0.5 / it, sigreg=2 / it, lr=1e-3, erank=it)) + '\n')
        f.write(json.dumps(dict(iter=3, knn_val=0.4)) + '\n')
    return out / 'ckpt.pt'


@pytest.fixture
def tiny_run(tmp_path):
    write_tiny_data(tmp_path / 'data')
    return write_tiny_checkpoint(tmp_path / 'out', tmp_path / 'data')


# every task, shrunk to seconds on the tiny data
FAST = ['--shots=1,5', '--fractions=0.5,1', '--fewshot_seeds=2', '--finetune_iters=4', '--finetune_eval_every=2',
        '--finetune_batch=16', '--seg_epochs=20', '--seg_lr=0.03', '--seg_finetune_iters=4', '--supervised_eval_every=2',
        '--dtype=float32']  # explicit: 'auto' times bf16 against float32 per run, and two runs compared could differ


def test_end_to_end_writes_tables_json_and_figures_next_to_the_checkpoint(tiny_run, capsys):
    report = ev.main([f'--ckpt={tiny_run}', '--knn_ks=10,20,100'] + FAST)
    out = capsys.readouterr().out
    assert report['tasks'] == ['knn', 'linear', 'fewshot', 'finetune', 'seg', 'domain']  # all the data support
    for name in ('pretrained', 'random-init', 'raw pixels', 'supervised'):
        assert f'| {name} |' in out
    assert '| raw pixels |' not in out.split('**Fine-tuning**')[1].split('**Segmentation**')[0]  # nothing to tune
    assert '| pretrained, fine-tuned |' in out and '| raw pixels, fine-tuned |' not in out  # segmentation too
    for text in ('k=10 acc', '60 train / 30 val / 30 test', 'chosen on val', '1-shot', '50 %', 'Dice foreground',
                 'site probe acc', '0→1 acc', 'k=[100] skipped', 'over 2 draws'):
        assert text in out, text
    saved = json.load(open(tiny_run.parent / 'eval.json'))
    assert saved['counts'] == {'train': 60, 'val': 30, 'test': 30} and saved['iter_num'] == 7
    assert saved['leakage'] == {'train/test': {'groups': 0, 'images': 0}, 'val/test': {'groups': 0, 'images': 0},
                                'train/val': {'groups': 0, 'images': 0}}
    pix, pre = saved['results']['raw pixels'], saved['results']['pretrained']
    assert pix['feature_dim'] == 16 * 16 * 3 and pre['feature_dim'] == 24
    assert pix['linear']['acc'] == 1.0  # colour classes: pixels solve it
    assert pre['linear']['C'] in ev.CS and saved['ckpt_config']['n_embd'] == 24
    assert [r['n_labelled'] for r in pre['fewshot']['shots']['5']['runs']] == [15, 15]  # 5 per class, 2 seeds
    assert pre['fewshot']['fractions']['1.0']['mean'] == pre['linear']['acc']  # 100 % of the labels = the probe
    assert set(pre['finetune']['val']) == {'0', '2', '4'} and pre['finetune']['best_step'] in (0, 2, 4)
    assert pix['seg']['mean_dice'] > 0.8  # a bright square: pixels segment it
    assert set(pre['seg']['finetuned']['val_mean_dice']) == {'0', '2', '4'} and 'finetuned' not in pix['seg']
    assert set(pre['domain']['cross_site']) == {'0->0', '0->1', '1->0', '1->1'}
    sup = saved['results']['supervised']
    assert (sup['classifier']['iters'], sup['classifier']['batch']) == (6, 16)  # the checkpoint's steps and batch
    assert set(sup['classifier']['val']) == {'0', '2', '4', '6'} and 'its own classifier scores test acc' in out
    assert set(sup) >= {'knn', 'linear', 'fewshot', 'finetune', 'seg', 'domain'}  # its features go through every task
    assert (tiny_run.parent / 'eval.md').read_text() in out
    assert report['results']['pretrained']['knn']['k=20']['k'] == 20
    for fig in ('training_curves', 'embedding', 'attention', 'data_efficiency', 'segmentation'):
        assert (tiny_run.parent / 'figures' / f'{fig}.png').stat().st_size > 5000, fig
    assert not list(tiny_run.parent.glob('*.tmp*'))  # atomic writes leave no temp files behind


def selection_records(obj, path=''):
    """Every number eval.json records about a CHOICE (val scores, chosen C / step / epoch), by path."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f'{path}/{k}'
            if k in ('val', 'val_mean_dice', 'C', 'best_step', 'best_epoch'):
                out[p] = v
            else:
                out.update(selection_records(v, p))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(selection_records(v, f'{path}/{i}'))
    return out


def test_no_choice_depends_on_the_test_split(tmp_path):
    """Two data sets identical in train and val; in the second, test labels are permuted, test images
    are noise and test masks shuffled. If any selection (probe C, few-shot C, fine-tuning step,
    segmentation epoch, site-probe C) looked at a test image or label, some choice would differ."""
    reports = []
    for name, corrupt in (('clean', False), ('corrupt', True)):
        write_tiny_data(tmp_path / name, corrupt_test=corrupt)
        ckpt = write_tiny_checkpoint(tmp_path / f'out-{name}', tmp_path / name)
        reports.append(ev.main([f'--ckpt={ckpt}', '--figures=false'] + FAST)['results'])
    clean, corrupt = (selection_records(r) for r in reports)
    assert len(clean) > 40 and clean == corrupt
    pix = [r['raw pixels'] for r in reports]
    assert pix[0]['linear']['acc'] == 1.0 and pix[1]['linear']['acc'] < 0.7  # the corruption reached the test numbers
    assert pix[0]['seg']['mean_dice'] > 0.8 > pix[1]['seg']['mean_dice']


@pytest.mark.parametrize('task', ['multilabel', 'ordinal'])
def test_end_to_end_on_multilabel_and_ordinal_labels(tmp_path, capsys, task):
    """Multi-label: each image may show any of 3 colours (per-label AUROC, no k-shot); ordinal: 3
    brightness grades (selection and the extra column use quadratic weighted kappa)."""
    rng = np.random.default_rng(0)
    data = tmp_path / 'data'
    data.mkdir()
    for split, n in (('train', 60), ('val', 30), ('test', 30)):
        if task == 'multilabel':
            y = np.stack([np.arange(n) % 2, np.arange(n) // 2 % 2, np.arange(n) // 4 % 2], 1)
            x = rng.integers(0, 60, (n, 16, 16, 3)) + 120 * y[:, None, None, :]
        else:
            y = np.arange(n) % 3
            x = rng.integers(0, 60, (n, 16, 16, 3)) + 60 * y[:, None, None, None]
        np.save(data / f'{split}_images.npy', x.astype(np.uint8))
        np.save(data / f'{split}_labels.npy', y.astype(np.int64))
    json.dump({'name': 'tiny', 'task': task, 'classes': ['a', 'b', 'c'], 'num_classes': 3,
               'mean': [0.3] * 3, 'std': [0.2] * 3}, open(data / 'meta.json', 'w'))
    ckpt = write_tiny_checkpoint(tmp_path / 'out', data)
    report = ev.main([f'--ckpt={ckpt}'] + FAST)
    assert report['tasks'] == ['knn', 'linear', 'fewshot', 'finetune']  # no masks, no sites
    pix = report['results']['raw pixels']
    sup = report['results']['supervised']['classifier']  # trained with BCE per label / classes, chosen on val
    assert sup['select'] == pix['linear']['select'] and sup['iters'] == 6
    if task == 'multilabel':
        assert pix['linear']['select'] == 'auroc' and pix['linear']['auroc'] == 1.0
        assert len(pix['linear']['per_label_auroc']) == 3 and pix['fewshot']['shots'] == {}
        assert 'k=20 AUROC' in capsys.readouterr().out
    else:
        assert pix['linear']['select'] == 'qwk' and pix['linear']['qwk'] == 1.0
        assert 'linear QWK' in capsys.readouterr().out
    assert (ckpt.parent / 'figures' / 'attention.png').exists()


def test_imagenet_row_runs_every_frozen_task_from_a_weights_file(tiny_run, capsys):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_eval_tasks import timm_vit_state_dict
    path = tiny_run.parent / 'vit_tiny_imagenet.pth'
    torch.save(timm_vit_state_dict(D=64, depth=2, p=8, grid=4, classes=10), path)
    report = ev.main([f'--ckpt={tiny_run}', f'--imagenet={path}', '--imagenet_size=32', '--baselines=none',
                      '--tasks=knn,linear,seg', '--figures=false'])
    assert report['results']['imagenet']['feature_dim'] == 64
    assert report['results']['imagenet']['seg']['n'] == 30  # 4x4 tokens of 8 px -> 32 px logits -> 16 px masks
    assert report['settings']['seg_lr'] == 3e-3  # images' default head rate (volumes: 0.1)
    assert report['settings']['seg_epochs'] == 24  # and epochs (volumes: 48)
    assert len(report['results']['imagenet']['seg']['val_mean_dice']) == 24
    assert '| imagenet |' in capsys.readouterr().out


@pytest.mark.parametrize('chans', [1, 4])
def test_an_rgb_checkpoint_evaluates_on_grey_or_multichannel_images_of_another_size(tmp_path, capsys, chans):
    """Cross-data-set transfer: the checkpoint saw 16 px RGB images, the data set holds 24 px images with
    1 channel (X-ray) or 4 (MRI sequences). The patch filters are adapted (ev.adapt_patch_embed), the
    sin-cos positions fit any grid; every task runs, and the notes say what was adapted."""
    write_tiny_data(tmp_path / 'rgb')
    ckpt = write_tiny_checkpoint(tmp_path / 'out', tmp_path / 'rgb')
    write_tiny_data(tmp_path / 'other', chans=chans, size=24)
    home = ckpt.parent / 'eval.json'
    home.write_text('{"dataset": "the checkpoint\'s own evaluation"}\n')
    report = ev.main([f'--ckpt={ckpt}', f'--data_dir={tmp_path / "other"}', '--tasks=knn,linear,seg', '--figures=false',
                      '--seg_epochs=2', '--supervised_iters=0'])
    # the transfer results go to eval_other.*: the checkpoint's own evaluation stays where it was
    assert home.read_text() == '{"dataset": "the checkpoint\'s own evaluation"}\n'
    assert not (ckpt.parent / 'eval.prev.json').exists()
    assert json.load(open(ckpt.parent / 'eval_other.json'))['data_dir'] == str(tmp_path / 'other')
    assert (ckpt.parent / 'eval_other.md').exists()
    assert set(report['results']) == {'pretrained', 'random-init', 'raw pixels'}  # --supervised_iters=0: no such row
    pre = report['results']['pretrained']
    assert pre['feature_dim'] == 24 and pre['seg']['n'] == 30 and pre['knn']['k=10']['n'] == 30  # every task scored test
    assert f'The checkpoint saw 3-channel images; its patch filters were adapted to {chans}' in capsys.readouterr().out


def test_a_killed_runs_log_a_failing_figure_or_old_results_never_cost_or_fake_the_evaluation(tiny_run, monkeypatch, capsys):
    """A torn last log line (a killed run) is skipped; a figure that fails is a warning, written after
    eval.json and eval.md; an earlier evaluation's eval.json is moved to eval.prev.json, not left as current."""
    out = tiny_run.parent
    with open(out / 'log.jsonl', 'a') as f:
        f.write('{"iter": 4, "loss": 0.2')  # torn
    (out / 'eval.json').write_text('{"dataset": "another data set"}\n')
    import eval_figures

    def broken(*args):
        raise RuntimeError('no display')
    monkeypatch.setattr(eval_figures, 'fig_embedding', broken)
    report = ev.main([f'--ckpt={tiny_run}', '--tasks=knn', '--baselines=none', '--figures=true'])
    assert 'warning: figure figures/embedding.png not drawn' in capsys.readouterr().out
    assert 'figures/training_curves.png' in report['figures'] and 'figures/embedding.png' not in report['figures']
    saved = json.load(open(out / 'eval.json'))
    assert saved['dataset'] == 'tiny' and saved['figures'] == report['figures']
    assert json.load(open(out / 'eval.prev.json')) == {'dataset': 'another data set'}


def test_help_lists_every_flag(capsys):
    """`python eval.py --help` prints every flag with its default (a '%' in a comment once crashed it)."""
    with pytest.raises(SystemExit) as e:
        ev.parse_args(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f'--{k}' in out for k in ev.KEYS)
