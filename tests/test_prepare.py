"""prepare.py: the demo data set and the shared on-disk format. Small sizes keep this file fast."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402
from prepare import DEMO_CLASSES, IMAGES_PER_LESION, SPLITS, prepare_demo  # noqa: E402

SMALL = dict(size=32, seed=0, n_train=60, n_val=9, n_test=9)  # 20 + 3 + 3 lesions
KEYS = ('images', 'labels', 'masks', 'groups', 'sites')


def load(out, split, key):
    return np.load(Path(out) / f'{split}_{key}.npy')


def meta(out):
    return json.loads((Path(out) / 'meta.json').read_text())


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    return prepare_demo(tmp_path_factory.mktemp('d') / 'demo', workers=1, **SMALL)


def test_same_seed_gives_the_same_bytes_and_another_seed_differs(demo, tmp_path):
    again = prepare_demo(tmp_path / 'again', workers=1, **SMALL)
    other = prepare_demo(tmp_path / 'other', workers=1, **{**SMALL, 'seed': 1})
    for split in SPLITS:
        for key in KEYS:
            assert (demo / f'{split}_{key}.npy').read_bytes() == (again / f'{split}_{key}.npy').read_bytes()
        assert not np.array_equal(load(demo, split, 'images'), load(other, split, 'images'))
    assert (demo / 'meta.json').read_text() == (again / 'meta.json').read_text()


def test_result_does_not_depend_on_the_number_of_workers(demo, tmp_path):
    two = prepare_demo(tmp_path / 'two', workers=2, **SMALL)
    for split in SPLITS:
        for key in KEYS:
            assert np.array_equal(load(demo, split, key), load(two, split, key)), (split, key)


def test_shapes_dtypes_and_counts_match_meta(demo):
    m = meta(demo)
    assert m['counts'] == {'train': 60, 'val': 9, 'test': 9}  # whole lesions of 3 photos
    assert m['classes'] == DEMO_CLASSES and m['num_classes'] == len(DEMO_CLASSES) >= 6
    assert m['image_size'] == [32, 32] and m['channels'] == 3 and m['task'] == 'multiclass'
    assert m['has_masks'] and m['has_groups'] and m['has_sites']
    assert m['args'] == {**SMALL, 'generator_version': prepare.DEMO_VERSION}
    for split in SPLITS:
        n = m['counts'][split]
        expected = {'images': ((n, 32, 32, 3), np.uint8), 'labels': ((n,), np.int64),
                    'masks': ((n, 32, 32), np.uint8), 'groups': ((n,), np.int64), 'sites': ((n,), np.int64)}
        for key, (shape, dtype) in expected.items():
            a = np.load(demo / f'{split}_{key}.npy', mmap_mode='r')  # how training opens them
            assert a.shape == shape and a.dtype == dtype, (split, key)
            assert m['files'][f'{split}_{key}.npy'] == {'shape': list(shape), 'dtype': np.dtype(dtype).name}
    assert set(m['files']) == {f'{s}_{k}.npy' for s in SPLITS for k in KEYS}


def test_default_counts_are_whole_lesions():
    # the documented 6000/999/2001 split; checked on the plan, not by generating 9000 images
    assert [round(n / IMAGES_PER_LESION) * IMAGES_PER_LESION for n in (6000, 1000, 2000)] == [6000, 999, 2001]


def test_splits_are_grouped_by_lesion(demo):
    groups = {s: load(demo, s, 'groups') for s in SPLITS}
    assert not set(groups['train']) & set(groups['val'])
    assert not set(groups['train']) & set(groups['test'])
    assert not set(groups['val']) & set(groups['test'])
    for s in SPLITS:  # every lesion has all its photos, and they agree on class and hospital
        labels, sites = load(demo, s, 'labels'), load(demo, s, 'sites')
        ids, counts = np.unique(groups[s], return_counts=True)
        assert (counts == IMAGES_PER_LESION).all()
        for g in ids:
            assert len(set(labels[groups[s] == g])) == 1 and len(set(sites[groups[s] == g])) == 1
            # and they are the lesion's own: the arrays were not shuffled apart
            lesion = prepare.sample_lesion(SMALL['seed'], int(g), int(labels[groups[s] == g][0]))
            assert sites[groups[s] == g][0] == lesion['site']


def test_photos_of_one_lesion_differ(demo):
    images, groups = load(demo, 'train', 'images'), load(demo, 'train', 'groups')
    same = images[groups == groups[0]]
    assert not np.array_equal(same[0], same[1])  # fresh pose / light / hair / noise per photo


def test_labels_in_range_all_classes_in_train_and_both_sites(demo):
    C = len(DEMO_CLASSES)
    for s in SPLITS:
        y = load(demo, s, 'labels')
        assert y.min() >= 0 and y.max() < C
    train = load(demo, 'train', 'labels')
    assert set(train) == set(range(C))
    assert np.bincount(train).max() - np.bincount(train).min() <= IMAGES_PER_LESION  # balanced
    assert set(load(demo, 'train', 'sites')) == {0, 1}


def test_masks_are_binary_nonempty_and_not_the_whole_image(demo):
    for s in SPLITS:
        masks = load(demo, s, 'masks')
        assert set(np.unique(masks)) <= {0, 1}
        area = masks.reshape(len(masks), -1).mean(1)
        assert (area > 0.01).all() and (area < 0.9).all()


def test_lesion_is_darker_inside_its_mask(demo):
    # the mask marks the lesion, not some other region: pigment makes it darker than the skin
    images, masks = load(demo, 'train', 'images').mean(-1), load(demo, 'train', 'masks').astype(bool)
    inside = np.array([im[m].mean() for im, m in zip(images, masks)])
    outside = np.array([im[~m].mean() for im, m in zip(images, masks)])
    assert np.mean(inside < outside) > 0.8


def test_meta_mean_and_std_match_the_train_images(demo):
    m = meta(demo)
    x = load(demo, 'train', 'images').astype(np.float64) / 255
    np.testing.assert_allclose(m['mean'], x.mean((0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(m['std'], x.std((0, 1, 2)), atol=1e-5)


def test_rerun_with_same_args_does_nothing(demo, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in demo.iterdir()}
    assert prepare_demo(demo, workers=1, **SMALL) == demo
    assert {p.name: p.stat().st_mtime_ns for p in demo.iterdir()} == before
    assert 'up to date' in capsys.readouterr().out


def test_rerun_with_other_args_is_refused_and_leaves_the_folder_alone(demo):
    before = {p.name: p.stat().st_mtime_ns for p in demo.iterdir()}
    with pytest.raises(FileExistsError, match='seed'):
        prepare_demo(demo, workers=1, **{**SMALL, 'seed': 5})
    assert {p.name: p.stat().st_mtime_ns for p in demo.iterdir()} == before


def test_folder_without_meta_is_refused(tmp_path):
    (tmp_path / 'demo').mkdir()
    (tmp_path / 'demo' / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='meta.json'):
        prepare_demo(tmp_path / 'demo', workers=1, **SMALL)


def test_interrupted_run_leaves_no_folder(tmp_path, monkeypatch):
    calls = []

    def crash(*args, **kwargs):  # fail on the 30th photo: some splits already written
        calls.append(1)
        if len(calls) == 30:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = prepare.render_image
    monkeypatch.setattr(prepare, 'render_image', crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_demo(tmp_path / 'demo', workers=1, **SMALL)
    assert len(calls) == 30
    assert list(tmp_path.iterdir()) == []  # neither the data set nor its staging folder


def test_too_few_images_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match='n_train'):
        prepare_demo(tmp_path / 'demo', workers=1, **{**SMALL, 'n_train': 6})


def test_write_split_rejects_bad_arrays(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match='labels'):
        prepare.write_split(tmp_path, 'train', images, labels=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match='masks'):
        prepare.write_split(tmp_path, 'train', images, labels=np.zeros(4, int),
                            masks=np.full((4, 8, 8), 2, np.uint8))
    with pytest.raises(ValueError, match='images'):
        prepare.write_split(tmp_path, 'train', images.astype(np.float32), labels=np.zeros(4, int))


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / 'prepare.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_unknown_dataset_exits_2_and_lists_the_names(tmp_path):
    r = run_cli('nosuch', cwd=tmp_path)
    assert r.returncode == 2 and 'demo' in r.stderr
    r = run_cli(cwd=tmp_path)
    assert r.returncode == 2 and 'demo' in r.stderr


def test_cli_help_lists_datasets_and_options(tmp_path):
    r = run_cli('--help', cwd=tmp_path)
    assert r.returncode == 0 and 'demo' in r.stdout and '--size=64' in r.stdout


def test_cli_unknown_option_names_the_closest(tmp_path):
    r = run_cli('demo', '--sise=32', cwd=tmp_path)
    assert r.returncode == 2 and '--size' in r.stderr
    assert not (tmp_path / 'data').exists()


def test_cli_writes_data_demo_by_default(tmp_path):
    r = run_cli('demo', '--size=32', '--n_train=21', '--n_val=3', '--n_test=3', '--workers=1', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert meta(tmp_path / 'data' / 'demo')['counts'] == {'train': 21, 'val': 3, 'test': 3}
    assert [p.name for p in (tmp_path / 'data').iterdir()] == ['demo']  # no staging folder left
    r = run_cli('demo', '--size=48', '--n_train=21', '--n_val=3', '--n_test=3', cwd=tmp_path)
    assert r.returncode == 1 and 'size' in r.stderr  # refused, with the reason


def test_nuisance_replay_finds_every_photo_and_records_the_generators_draws(demo):
    # docs/nuisances.py draws each photo again from its seeds and matches it to the stored image;
    # what it records must be the generator's own values (the stored hospital ids say so for 'site')
    sys.path.insert(0, str(ROOT / 'docs'))
    import nuisances
    N, names, y, idx = nuisances.replay(demo, 'train')
    assert sorted(idx.tolist()) == list(range(len(load(demo, 'train', 'labels'))))
    assert np.array_equal(N[:, names.index('site')], load(demo, 'train', 'sites')[idx])
    assert np.array_equal(y, load(demo, 'train', 'labels')[idx])
    noise, blur = N[:, names.index('noise')], N[:, names.index('blur')]
    assert noise.min() >= 0.005 and noise.max() <= 0.02 and blur.min() >= 0 and blur.max() <= 0.6
    # a photo's recorded draws are its own: the three photos of a lesion share the lesion's values only
    lesion = load(demo, 'train', 'groups')[idx]
    for name in ('skin_tone', 'size', 'zoom', 'noise'):
        same = [len(set(N[lesion == g, names.index(name)])) == 1 for g in np.unique(lesion)]
        assert all(same) == (name in ('skin_tone', 'size')), name
    # the report reads a nuisance that the features hold in one dimension, and not one they lack
    rng = np.random.default_rng(0)
    X = np.c_[N[:, names.index('skin_tone')], rng.normal(size=(len(N), 4))]
    rows = {r.split(' | ')[0][2:]: r for r in nuisances.report(X, N, names, y) if r.startswith('| ') and '---' not in r}
    assert float(rows['skin_tone'].split(' | ')[1]) > 0.95
    assert float(rows['noise'].split(' | ')[1]) < 0.2
