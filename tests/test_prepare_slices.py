"""prepare.py slices: a 2-D data set cut out of a prepared volume data set. On a small demo3d (16^3 voxels,
label maps, volume labels, subjects in groups) and on fabricated volumes (non-cubic, without masks and
groups). Every expectation is computed here by a plain loop over volumes and slice positions, not by
the code under test. Then medjepa.py trains on slices and eval.py segments them."""
import json
import os

import numpy as np
import pytest

import eval as ev
import medjepa as mj
import prepare
from prepare import SPLITS

TINY = ['--n_layer=2', '--n_embd=32', '--n_head=2', '--pred_n_layer=1', '--pred_n_embd=16', '--pred_n_head=2',
        '--patch_size=4', '--local_size=8', '--n_local_views=2', '--batch_size=16', '--num_slices=32',
        '--knn_train_size=64', '--device=cpu', '--dtype=float32', '--num_threads=1', '--warmup_iters=2']


@pytest.fixture(scope='module')
def demo3d(tmp_path_factory):
    """16^3 voxels, 8 / 4 / 4 volumes of 4 / 2 / 2 subjects, masks 0..3, labels straight / C-shaped / S-shaped spine."""
    return prepare.prepare_demo3d(tmp_path_factory.mktemp('d') / 'demo3d', size=16, n_train=8, n_val=4, n_test=4)


def load(folder, split, key):
    path = os.path.join(folder, f'{split}_{key}.npy')
    return np.load(path) if os.path.exists(path) else None


def expected(source, split, axis, stride, skip_empty, min_foreground=1):
    """The slices the rule implies, in volume order then slice order: a loop over every volume and position."""
    images, masks = load(source, split, 'images'), load(source, split, 'masks')
    out = []
    for v in range(len(images)):
        for p in range(0, images.shape[1 + axis], stride):
            image = np.take(images[v], p, axis=axis)
            mask = np.take(masks[v], p, axis=axis) if masks is not None else None
            foreground = int((mask > 0).sum()) if mask is not None else int((image > 0).any(-1).sum())
            if not skip_empty or foreground >= min_foreground:
                out.append((v, p, image, mask))
    return out


def no_output_left(out):
    return not out.exists() and not list(out.parent.glob(f'.{out.name}.*'))


@pytest.mark.parametrize('axis,stride,skip_empty', [(0, 1, True), (1, 3, False), (2, 2, True), (1, 1, True)])
def test_every_slice_is_its_volumes_slice_with_its_mask_label_group_and_split(demo3d, tmp_path, axis, stride, skip_empty):
    out = prepare.prepare_slices(tmp_path / 's', source=str(demo3d), axis=axis, stride=stride, skip_empty=skip_empty)
    meta = json.loads((out / 'meta.json').read_text())
    for split in SPLITS:
        want = expected(demo3d, split, axis, stride, skip_empty)
        images, masks, index = load(out, split, 'images'), load(out, split, 'masks'), load(out, split, 'slice_index')
        assert images.dtype == np.uint8 and images.shape == (len(want), 16, 16, 1) and meta['counts'][split] == len(want)
        assert index.tolist() == [[v, p] for v, p, _, _ in want]
        assert all(np.array_equal(images[i], im) and np.array_equal(masks[i], m) for i, (_, _, im, m) in enumerate(want))
        vol = index[:, 0]
        assert np.array_equal(load(out, split, 'labels'), load(demo3d, split, 'labels')[vol])
        assert np.array_equal(load(out, split, 'groups'), load(demo3d, split, 'groups')[vol])
        s = meta['slicing']['per_split'][split]
        assert s['slices'] == len(want) and s['slices_taken'] == len(load(demo3d, split, 'images')) * len(range(0, 16, stride))
    groups = {s: set(load(out, s, 'groups').tolist()) for s in SPLITS}
    assert not groups['train'] & groups['val'] and not groups['train'] & groups['test'] and not groups['val'] & groups['test']
    assert meta['task'] == 'multiclass' and meta['classes'] == prepare.DEMO3D_CLASSES and meta['image_size'] == [16, 16]
    assert meta['mask_labels'] == meta['mask_classes'] == prepare.DEMO3D_LABELS and 'spatial_dims' not in meta
    assert meta['source_dataset'] == 'demo3d' and meta['slicing']['axis'] == axis and meta['slicing']['stride'] == stride
    for split in SPLITS:  # the trainer's and evaluator's reader accepts it
        assert mj.load_split(str(out), split)['images'].shape[1:] == (16, 16, 1)


def test_skip_empty_removes_exactly_the_slices_without_foreground(demo3d, tmp_path):
    every = prepare.prepare_slices(tmp_path / 'all', source=str(demo3d), axis=2, skip_empty=False)
    kept = prepare.prepare_slices(tmp_path / 'kept', source=str(demo3d), axis=2, skip_empty=True)
    dense = prepare.prepare_slices(tmp_path / 'dense', source=str(demo3d), axis=2, min_foreground=20)
    for split in SPLITS:
        all_index, all_masks = load(every, split, 'slice_index'), load(every, split, 'masks')
        area = (all_masks > 0).sum((1, 2))
        assert (area == 0).sum() > 0  # the volumes' sides hold no organ: there is something to skip
        assert load(kept, split, 'slice_index').tolist() == all_index[area > 0].tolist()
        assert load(dense, split, 'slice_index').tolist() == all_index[area >= 20].tolist()
        assert np.array_equal(load(kept, split, 'images'), load(every, split, 'images')[area > 0])
    meta = json.loads((kept / 'meta.json').read_text())['slicing']
    assert meta['per_split']['train']['skipped_empty'] == int(((load(every, 'train', 'masks') > 0).sum((1, 2)) == 0).sum())
    assert 'label > 0' in meta['empty_rule']


def fabricate(folder, shape=(6, 10, 8), channels=2, n=(3, 2, 2), task='unlabeled', masks=False, groups=None):
    """A prepared-looking volume folder: random volumes with some all-zero slices (no signal)."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for split, count in zip(SPLITS, n):
        x = rng.integers(1, 256, (count, *shape, channels), dtype=np.uint8)
        x[:, 0] = 0                 # D = 0: no signal at all
        x[:, :, 1, :, 0] = 0        # H = 1: the first channel is empty, the others are not: signal
        x[:, :, 2:4] = 0            # H = 2: no signal; H = 3: one pixel of signal (next line)
        x[:, 1, 3, 4] = 5
        np.save(folder / f'{split}_images.npy', x)
        np.save(folder / f'{split}_labels.npy', np.full(count, -1, np.int64))
        if masks:
            np.save(folder / f'{split}_masks.npy', (x[..., 0] > 128).astype(np.uint8))
        if groups is not None:
            np.save(folder / f'{split}_groups.npy', np.asarray(groups[split], np.int64))
        np.save(folder / f'{split}_sites.npy', np.arange(count) % 2)
    meta = dict(name='vols', task=task, classes=[], num_classes=0, channels=channels, spatial_dims=3,
                image_size=list(shape), mean=[0.5] * channels, std=[0.3] * channels, spacing=[3.0, 1.0, 1.5],
                mask_labels=['background', 'bright'] if masks else None, split_rule='by volume', source='fabricated')
    (folder / 'meta.json').write_text(json.dumps(meta))
    return folder


def test_without_masks_empty_means_no_signal_and_each_volume_is_its_own_subject(tmp_path):
    src = fabricate(tmp_path / 'vols')
    out = prepare.prepare_slices(tmp_path / 's', source=str(src), axis=1, pad_square=False)
    meta = json.loads((out / 'meta.json').read_text())
    first = 0
    for split in SPLITS:
        want = expected(src, split, 1, 1, True)
        assert [p for v, p, _, _ in want if v == 0] == [0, 1, 3, 4, 5, 6, 7, 8, 9]  # H = 2 has no signal
        images = load(out, split, 'images')
        assert images.shape == (len(want), 6, 8, 2)  # D x W: not square, kept as it is
        assert all(np.array_equal(images[i], im) for i, (_, _, im, _) in enumerate(want))
        assert np.array_equal(load(out, split, 'groups'), load(out, split, 'slice_index')[:, 0] + first)
        assert (load(out, split, 'labels') == -1).all() and load(out, split, 'masks') is None
        assert np.array_equal(load(out, split, 'sites'), load(out, split, 'slice_index')[:, 0] % 2)
        first += len(load(src, split, 'images'))
    assert meta['task'] == 'unlabeled' and meta['image_size'] == [6, 8] and meta['spacing'] == [3.0, 1.5]
    assert 'any channel > 0' in meta['slicing']['empty_rule'] and 'own subject' in meta['groups_rule']
    few = prepare.prepare_slices(tmp_path / 'few', source=str(src), axis=1, min_foreground=2, pad_square=False)
    assert load(few, 'train', 'slice_index')[:, 1].tolist() == [0, 1, 4, 5, 6, 7, 8, 9] * 3  # H = 3: 1 px
    fewer = prepare.prepare_slices(tmp_path / 'fewer', source=str(src), axis=0, min_foreground=2)
    assert 0 not in load(fewer, 'train', 'slice_index')[:, 1]  # D = 0 is all zero


def test_non_square_slices_are_padded_to_a_centred_square_with_background(tmp_path):
    src = fabricate(tmp_path / 'vols', masks=True, task='segmentation')
    out = prepare.prepare_slices(tmp_path / 's', source=str(src), axis=2, skip_empty=False)  # D x H = 6 x 10
    images, masks = load(out, 'val', 'images'), load(out, 'val', 'masks')
    assert images.shape == (2 * 8, 10, 10, 2) and masks.shape == (2 * 8, 10, 10)
    x, m = load(src, 'val', 'images'), load(src, 'val', 'masks')
    assert np.array_equal(images[:, 2:8], np.concatenate([np.moveaxis(x[v], 2, 0) for v in range(2)]))
    assert np.array_equal(masks[:, 2:8], np.concatenate([np.moveaxis(m[v], 2, 0) for v in range(2)]))
    assert not images[:, :2].any() and not images[:, 8:].any() and not masks[:, :2].any() and not masks[:, 8:].any()
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['slicing']['offset'] == [2, 0] and meta['slicing']['slice_size'] == [6, 10]
    assert meta['task'] == 'segmentation' and meta['mask_labels'] == ['background', 'bright']


def two_d_source(folder):
    folder.mkdir()
    for split in SPLITS:
        np.save(folder / f'{split}_images.npy', np.zeros((2, 8, 8, 1), np.uint8))
        np.save(folder / f'{split}_labels.npy', np.zeros(2, np.int64))
    (folder / 'meta.json').write_text(json.dumps(dict(name='flat', task='multiclass', classes=['a'], num_classes=1)))
    return folder


@pytest.mark.parametrize('case,says', [
    ('2d', 'holds 2-D images'), ('missing', 'no such folder'), ('axis', '--axis must be 0 (D), 1 (H) or 2 (W)'),
    ('stride', '--stride and --min_foreground must be at least 1'), ('crossing', 'are in both train and test'),
    ('nothing', 'no slice of the train split has'), ('empty', '--source is required'), ('same', 'is the source folder')])
def test_bad_input_is_one_error_line_and_leaves_no_output(demo3d, tmp_path, capsys, case, says):
    source = {'2d': lambda: two_d_source(tmp_path / 'flat'), 'missing': lambda: tmp_path / 'nowhere',
              'crossing': lambda: fabricate(tmp_path / 'v', groups={'train': [0, 1, 2], 'val': [3, 4], 'test': [5, 1]}),
              'empty': lambda: ''}.get(case, lambda: demo3d)()
    out = tmp_path / 'out' if case != 'same' else source
    extra = {'axis': ['--axis=3'], 'stride': ['--stride=0'], 'nothing': ['--min_foreground=100000']}.get(case, [])
    assert prepare.main(['slices', f'--source={source}', f'--out={out}', *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('prepare.py: error: ') and says in err[0], err
    if case != 'same':
        assert no_output_left(out)


def test_same_command_does_nothing_other_options_are_refused_a_changed_source_is_cut_again(tmp_path, capsys):
    src = prepare.prepare_demo3d(tmp_path / 'demo3d', size=16, n_train=4, n_val=2, n_test=2)
    out = prepare.prepare_slices(tmp_path / 's', source=str(src))
    stamp = (out / 'train_images.npy').stat().st_mtime_ns
    capsys.readouterr()
    prepare.prepare_slices(out, source=str(src))
    assert 'up to date' in capsys.readouterr().out and (out / 'train_images.npy').stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match='axis: 0 there vs 1 now'):
        prepare.prepare_slices(out, source=str(src), axis=1)
    x = np.load(src / 'test_images.npy')
    np.save(src / 'test_images.npy', 255 - x)  # the source is made again, differently
    prepare.prepare_slices(out, source=str(src))
    assert 'cutting them again' in capsys.readouterr().out
    assert np.array_equal(load(out, 'test', 'images'), (255 - x).reshape(-1, 16, 16, 1))  # axial: no slice is empty
    assert not list(tmp_path.glob('.s.*'))  # the old folder was removed once the new one was in place
    prepare.prepare_slices(out, source=str(src))
    assert 'up to date' in capsys.readouterr().out


def test_medjepa_trains_on_slices_and_eval_segments_them(demo3d, tmp_path):
    data = prepare.prepare_slices(tmp_path / 's', source=str(demo3d))
    out = str(tmp_path / 'out')
    mj.main(TINY + [f'--data_dir={data}', f'--out_dir={out}', '--image_size=16', '--max_iters=6',
                    '--log_interval=1', '--eval_interval=3'])
    recs = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert len([r for r in recs if 'loss' in r]) == 6 and all(np.isfinite(r['loss']) for r in recs if 'loss' in r)
    assert any('knn_val' in r for r in recs)  # the slices carry their volume's label: the online kNN ran
    report = ev.main([f'--ckpt={out}/ckpt.pt', '--tasks=knn,linear,seg', '--seg_epochs=2', '--knn_ks=5',
                      '--figures=false', '--supervised_iters=2'])
    assert set(report['results']) == {'pretrained', 'random-init', 'supervised', 'raw pixels'}
    for row in report['results'].values():
        assert len(row['seg']['dice']) == len(prepare.DEMO3D_LABELS) - 1 and 0 <= row['seg']['mean_dice'] <= 1
        assert 0 <= row['knn']['k=5']['acc'] <= 1 and 0 <= row['linear']['acc'] <= 1
    assert report['leakage'] == {pair: {'groups': 0, 'images': 0} for pair in ('train/test', 'val/test', 'train/val')}
    assert 'Dice liver' in open(os.path.join(out, 'eval.md')).read()


def test_non_square_segmentation_slices_train_and_evaluate(tmp_path):
    """Slices of 6 x 10 pixels, not padded: medjepa.py trains on square crops of them, eval.py runs the
    encoder on the whole slice and segments it (the patch grid is 1 x 2 of 4-px patches, logits resized)."""
    src = fabricate(tmp_path / 'vols', shape=(6, 10, 16), channels=1, n=(16, 4, 4), masks=True, task='segmentation')
    data = prepare.prepare_slices(tmp_path / 's', source=str(src), axis=2, pad_square=False)
    assert mj.read_meta(str(data))['image_size'] == [6, 10]
    out = str(tmp_path / 'out')
    mj.main(TINY + [f'--data_dir={data}', f'--out_dir={out}', '--image_size=8', '--max_iters=3'])
    report = ev.main([f'--ckpt={out}/ckpt.pt', '--tasks=seg', '--seg_epochs=2', '--figures=false'])
    assert set(report['results']) == {'pretrained', 'random-init', 'raw pixels'}  # segmentation: no supervised row
    for row in report['results'].values():
        assert len(row['seg']['dice']) == 1 and 0 <= row['seg']['mean_dice'] <= 1
