"""prepare.py's 3-D data sets (MSD, BraTS 2021, any NIfTI folder) on tiny fabricated volumes, plus
nibabel's own example files. Volumes are stored as uint8 (N, D, H, W, C), docs/data_format.md."""
import hashlib
import io
import json
import os
import shutil
import tarfile

import nibabel as nib
import numpy as np
import pytest

import prepare
from prepare import SPLITS

SIZE = 8
NIBABEL_DATA = os.path.join(os.path.dirname(nib.__file__), 'tests', 'data')


def load(out, split, key):
    return np.load(out / f'{split}_{key}.npy')


def meta(out):
    return json.loads((out / 'meta.json').read_text())


def volume(seed, shape=(12, 14, 10), channels=1):
    """x-gradient image (brighter to the right) and a label map: 1 on the left half, 2 a small box on the right."""
    x = np.linspace(0, 1, shape[0])[:, None, None] * np.ones(shape)
    image = np.stack([x * (100 + 10 * c) + seed for c in range(channels)], -1) if channels > 1 else x * 100 + seed
    label = np.zeros(shape, np.uint8)
    label[:shape[0] // 2] = 1
    label[8:11, 5:9, 3:7] = 2
    return image.astype(np.float32), label


def save(path, array):
    nib.Nifti1Image(array, np.eye(4)).to_filename(str(path))
    return path


def fabricate_msd(root, task, n=10, channels=1, modality=None):
    base = root / task
    for sub in ('imagesTr', 'labelsTr', 'imagesTs'):
        (base / sub).mkdir(parents=True)
    training = []
    for i in range(n):
        image, label = volume(i, channels=channels)
        save(base / 'imagesTr' / f'case_{i:03d}.nii.gz', image)
        save(base / 'labelsTr' / f'case_{i:03d}.nii.gz', label)
        (base / 'imagesTr' / f'._case_{i:03d}.nii.gz').write_bytes(b'\x00\x05\x16\x07 mac resource fork')
        training.append({'image': f'./imagesTr/case_{i:03d}.nii.gz', 'label': f'./labelsTr/case_{i:03d}.nii.gz'})
    save(base / 'imagesTs' / 'case_100.nii.gz', volume(100, channels=channels)[0])
    spec = {'name': task, 'licence': 'CC-BY-SA 4.0', 'tensorImageSize': '4D' if channels > 1 else '3D',
            'modality': modality or {'0': 'MRI'}, 'labels': {'0': 'background', '1': 'Anterior', '2': 'Posterior'},
            'numTraining': n, 'numTest': 1, 'training': training, 'test': ['./imagesTs/case_100.nii.gz']}
    (base / 'dataset.json').write_text(json.dumps(spec))
    (base / '._dataset.json').write_bytes(b'\x00\x05\x16\x07')
    tar = root / f'{task}.tar'
    with tarfile.open(tar, 'w') as t:
        t.add(base, arcname=task)
    return tar


def test_msd_hippocampus_download_folds_by_subject_masks_and_axes(tmp_path, monkeypatch):
    tar = fabricate_msd(tmp_path / 'www', 'Task04_Hippocampus')
    monkeypatch.setitem(prepare.MSD_TASKS, 'msd_hippocampus',
                        ('Task04_Hippocampus', hashlib.md5(tar.read_bytes()).hexdigest(), 'MRI', 1.0, 48))
    monkeypatch.setattr(prepare, 'get_raw', wrap_url(prepare.get_raw, tar.as_uri()))
    outs = [prepare.DATASETS['msd_hippocampus'](out_dir=tmp_path / 'data' / f'h{k}', size=SIZE, fold=k, workers=1)
            for k in (0, 1)]
    m = meta(outs[0])
    assert m['counts'] == {'train': 6, 'val': 2, 'test': 2} and m['spatial_dims'] == 3
    assert m['task'] == 'segmentation' and m['mask_labels'] == ['background', 'Anterior', 'Posterior']
    assert m['image_size'] == [SIZE] * 3 and m['channels'] == 1 and m['skipped']['count'] == 0  # no '._' file read
    images, masks = load(outs[0], 'train', 'images'), load(outs[0], 'train', 'masks')
    assert images.shape == (6, SIZE, SIZE, SIZE, 1) and masks.shape == (6, SIZE, SIZE, SIZE)
    assert set(np.unique(masks)) == {0, 1, 2}
    # axes are (z, y, x): the left half in x is label 1, and x grows brighter along the last axis
    assert (masks[:, :, :, :SIZE // 2 - 1] == 1).mean() > 0.95 and (masks[:, :, :, SIZE // 2 + 1:] == 1).mean() == 0
    assert (np.diff(images[..., 0].astype(int), axis=3) >= 0).all()
    for out in outs:
        groups = {s: set(load(out, s, 'groups').tolist()) for s in SPLITS}
        assert not groups['train'] & groups['val'] and not (groups['train'] | groups['val']) & groups['test']
    test_groups = [set(load(o, 'test', 'groups').tolist()) for o in outs]
    val_groups = [set(load(o, 'val', 'groups').tolist()) for o in outs]
    assert test_groups[0] == test_groups[1] and not val_groups[0] & val_groups[1]  # folds differ, test is fixed


def wrap_url(get_raw, url):
    """Point the MSD download at the fabricated tar (the real URL is on S3)."""
    def patched(name, out_dir, source='', files=None, how_to_get=None):
        files = {k: (url, md5) for k, (_, md5) in (files or {}).items()}
        return get_raw(name, out_dir, source, files, how_to_get)
    return patched


def test_msd_prostate_two_modalities_from_source_tar(tmp_path):
    tar = fabricate_msd(tmp_path, 'Task05_Prostate', channels=2, modality={'0': 'T2', '1': 'ADC'})
    out = prepare.DATASETS['msd_prostate'](out_dir=tmp_path / 'data' / 'p', source=str(tar), size=SIZE, workers=1)
    m = meta(out)
    assert m['channels'] == 2 and m['modalities'] == ['T2', 'ADC'] and len(m['mean']) == 2
    assert load(out, 'val', 'images').shape[-1] == 2


def test_brats2021_four_modalities_and_label_4_becomes_3(tmp_path):
    src = tmp_path / 'BraTS2021_Training_Data'
    for i in range(8):
        d = src / f'BraTS2021_{i:05d}'
        d.mkdir(parents=True)
        image, label = volume(i)
        for m in prepare.BRATS_MODALITIES:
            save(d / f'BraTS2021_{i:05d}_{m}.nii.gz', image)
        save(d / f'BraTS2021_{i:05d}_seg.nii.gz', np.where(label == 2, 4, label).astype(np.uint8))
    out = prepare.prepare_brats2021(tmp_path / 'data' / 'brats', source=str(src), size=SIZE, workers=1)
    m = meta(out)
    assert m['channels'] == 4 and len(m['mask_labels']) == 4 and sum(m['counts'].values()) == 8
    assert set(np.unique(load(out, 'train', 'masks'))) == {0, 1, 3}


def test_nifti_folder_real_nibabel_files_and_a_bad_header(tmp_path):
    src = tmp_path / 'scans'
    src.mkdir()
    for i in range(6):
        save(src / f'scan{i}.nii.gz', volume(i)[0])
    broken = bytearray((src / 'scan0.nii.gz').read_bytes())
    (src / 'broken.nii').write_bytes(b'\x00' * 348)  # sizeof_hdr 0: not a NIfTI header
    (src / 'truncated.nii.gz').write_bytes(bytes(broken[:len(broken) // 2]))
    out = prepare.prepare_nifti(tmp_path / 'data' / 'n', source=str(src), modality='mri', size=SIZE, workers=1,
                                val_fraction=0.2, test_fraction=0.2)
    m = meta(out)
    assert m['task'] == 'unlabeled' and sum(m['counts'].values()) == 6
    assert m['spacing'] == [14 / SIZE] * 3  # auto: the longest side, 14 mm, fills the box
    assert m['skipped']['count'] == 2 and {os.path.basename(s['file']) for s in m['skipped']['files']} == \
        {'broken.nii', 'truncated.nii.gz'}
    assert not m['has_masks']

    # nibabel's real example files: a 4-D fMRI run (2 volumes -> 2 channels), with label volumes
    real = tmp_path / 'real'
    real.mkdir()
    data = nib.load(os.path.join(NIBABEL_DATA, 'example4d.nii.gz'))
    assert data.shape == (128, 96, 24, 2)
    labels = tmp_path / 'labels'
    labels.mkdir()
    for i in range(5):
        nib.save(data, str(real / f'run{i}.nii.gz'))
        lab = (np.asarray(data.dataobj)[..., 0] > np.median(np.asarray(data.dataobj)[..., 0])).astype(np.uint8)
        nib.save(nib.Nifti1Image(lab, data.affine), str(labels / f'run{i}.nii.gz'))
    out = prepare.prepare_nifti(tmp_path / 'data' / 'real', source=str(real), labels=str(labels), modality='mri',
                                size=SIZE, workers=2, val_fraction=0.2, test_fraction=0.2)
    m = meta(out)
    assert m['channels'] == 2 and m['has_masks'] and m['task'] == 'segmentation' and m['mask_labels'] == ['0', '1']
    images, masks = load(out, 'train', 'images')[..., 0], load(out, 'train', 'masks')
    assert m['spacing'] == [256 / SIZE] * 3  # auto: the 128 x 2 mm side fills the box
    assert images[masks == 1].mean() > images[masks == 0].mean() + 50  # labels cropped with their image

# ----------------------------------------------------------------------------- the volume pipeline, step by step

REAL_NIFTI = ['anatomical.nii', 'example4d.nii.gz', 'example_nifti2.nii.gz', 'functional.nii',
              'reoriented_anat_moved.nii', 'resampled_anat_moved.nii', 'standard.nii.gz']


def canonical_by_hand(img):
    """The (z, y, x) array and spacing the closest RAS orientation should give, worked out from the affine
    without nibabel's orientation code: each voxel axis goes to the world axis its column points along
    most, flipped when it points the other way; its spacing is the length of that column."""
    a = np.asarray(img.dataobj, np.float32)
    a = a[..., None] if a.ndim == 3 else a
    cols = img.affine[:3, :3]
    world = [int(np.argmax(np.abs(cols[:, j]))) for j in range(3)]  # 0 = x (R), 1 = y (A), 2 = z (S)
    assert sorted(world) == [0, 1, 2]
    for j in range(3):
        if cols[world[j], j] < 0:
            a = np.flip(a, j)
    order = [world.index(w) for w in (2, 1, 0)]  # voxel axes holding z, y, x
    return a.transpose(*order, 3), tuple(float(np.linalg.norm(cols[:, j])) for j in order)


@pytest.mark.parametrize('name', REAL_NIFTI)
def test_nifti_round_trip_on_nibabels_real_files_keeps_orientation_spacing_and_values(name, tmp_path):
    src = nib.load(os.path.join(NIBABEL_DATA, name))
    a, spacing = prepare.read_nifti(os.path.join(NIBABEL_DATA, name), spacing=True)
    expected, expected_spacing = canonical_by_hand(src)
    assert a.shape == expected.shape and spacing == pytest.approx(expected_spacing, rel=1e-5)
    assert np.allclose(a, expected, equal_nan=True)  # values and their places, NaN where the file has NaN
    # the same image stored in another orientation (x and y swapped, two axes flipped, affine to match)
    # reads back as the same array with the same spacing
    moved = src.as_reoriented(np.array([[1, -1], [0, 1], [2, -1]]))
    assert nib.aff2axcodes(moved.affine) != nib.aff2axcodes(src.affine)
    nib.save(moved, str(tmp_path / name))
    b, spacing_b = prepare.read_nifti(tmp_path / name, spacing=True)
    assert b.shape == a.shape and spacing_b == pytest.approx(spacing, rel=1e-5)
    assert np.allclose(a, b, atol=1e-3 * max(1.0, float(np.nanmax(np.abs(a)))), equal_nan=True)


def test_resampling_to_a_target_spacing_keeps_the_physical_size():
    a, spacing = prepare.read_nifti(os.path.join(NIBABEL_DATA, 'anatomical.nii'), spacing=True)
    v = a[..., 0]
    for target in ((2.0, 2.0, 2.0), (spacing[0] * 0.5, 3.0, 1.5), (1.0, 4.0, 5.0)):
        r = prepare.resample_spacing(v, spacing, target)
        for n, s, m, t in zip(v.shape, spacing, r.shape, target):
            assert abs(n * s - m * t) <= t / 2 + 1e-6  # the same extent in mm, to half a voxel
        def centroid(x, sp):  # the brightness centroid in mm stays where it was
            idx = np.indices(x.shape).reshape(3, -1) + 0.5
            w = np.clip(x, 0, None).reshape(-1)
            return (idx * w).sum(1) / w.sum() * np.array(sp)
        assert np.allclose(centroid(v, spacing), centroid(r, target), atol=max(target) * 0.5)
        assert v.min() - 1 <= r.min() and r.max() <= v.max() + 1  # linear: no overshoot
    labels = np.zeros(v.shape, np.float32)
    labels[v > np.percentile(v, 60)], labels[v > np.percentile(v, 95)] = 1, 4
    r = prepare.resample_spacing(labels, spacing, (1.3, 1.3, 1.3), nearest=True)
    assert set(np.unique(r)) == {0, 1, 4}  # nearest: no label in between appears


def test_ct_window_maps_the_window_ends_to_0_and_255_and_meta_inverts_it():
    recipe = prepare.volume_recipe('ct', '1', '40,400')  # -160..240 HU
    hu = np.array([-1000, -160, -159.2, 40, 239.2, 240, 3000], np.float32).reshape(1, 1, 7)
    u, body = prepare.normalise_intensity(hu, recipe)
    assert u.ravel().tolist() == [0, 0, 1, 128, 254, 255, 255] and body.ravel().tolist() == [False] + [True] * 6
    inverse = prepare.intensity_meta(recipe)
    assert inverse['hu_range'] == [-160, 240] and inverse['from_uint8'].startswith('HU = -160 + u / 255 * 400')
    assert np.allclose(-160 + u[0, 0, 1:-1] / 255 * 400, hu[0, 0, 1:-1], atol=400 / 255 / 2)
    assert prepare.volume_recipe('ct', '2')['window'] == prepare.SOFT_TISSUE_WINDOW


def test_mri_zscore_is_over_the_foreground_and_its_uint8_map_is_the_documented_one():
    rng = np.random.default_rng(0)
    v = np.zeros((20, 24, 24), np.float32)  # a skull-stripped scan: exact zeros around the brain
    v[3:17, 4:20, 5:21] = rng.gamma(4.0, 100.0, (14, 16, 16)) + 300
    z, fg = prepare.mri_zscore(v)
    assert fg.sum() == (v > 0).sum() - (v[v > 0] <= np.percentile(v, 0.5)).sum()  # the brain, not the zeros
    assert abs(z[fg].mean()) < 1e-4 and abs(z[fg].std() - 1) < 1e-4
    clipped = np.clip(v, *np.percentile(v, [0.5, 99.5]))  # by hand: clip, then the foreground statistics
    assert np.allclose(z[fg], (clipped[fg] - clipped[fg].mean()) / clipped[fg].std(), atol=1e-4)
    u, _ = prepare.normalise_intensity(v, prepare.volume_recipe('mri', '1'))
    assert (u[~fg] == 0).all()
    info = prepare.intensity_meta(prepare.volume_recipe('mri', '1'))
    lo, hi = info['z_range']
    back = lo + u[fg] / 255 * (hi - lo)  # the inverse meta.json documents
    inside = (z[fg] > lo) & (z[fg] < hi)
    assert np.abs(back[inside] - z[fg][inside]).max() <= (hi - lo) / 255 / 2 + 1e-6


def test_crop_pad_gives_the_fixed_size_centred_on_the_foreground():
    fg = np.zeros((40, 10, 30), bool)
    fg[25:35, 2:8, 3:9] = True  # off-centre along z and x; the y axis is shorter than the box
    starts = prepare.box_starts(fg, 16)
    assert starts == [22, -3, 0]  # z: centred on 25..35; y: padded 3 before, 3 after; x: clamped inside
    a = np.arange(40 * 10 * 30).reshape(40, 10, 30)
    box = prepare.take_box(a, starts, 16)
    assert box.shape == (16, 16, 16) and (box[:, :3] == 0).all() and (box[:, 13:] == 0).all()
    assert np.array_equal(box[:, 3:13], a[22:38, :, 0:16])
    assert (prepare.take_box(fg, starts, 16).sum() == fg.sum())  # the foreground is all in the box
    odd = np.ones((5, 5, 5), bool)  # a short axis: its centre voxel lands on the box's centre
    box = prepare.take_box(odd * np.arange(1, 6)[:, None, None], prepare.box_starts(odd, 9), 9)
    assert box[:, 4, 4].tolist() == [0, 0, 1, 2, 3, 4, 5, 0, 0]
    assert prepare.box_starts(np.zeros((30, 30, 30), bool), 10) == [10, 10, 10]  # no foreground: the centre


def test_whole_pipeline_on_a_real_file_is_orientation_window_and_padding_by_hand(tmp_path):
    """anatomical.nii (LAS, 2 mm) as 'CT' at its own spacing: no resampling, so the stored volume must be
    the hand-made canonical array, windowed with the documented formula, centred in the box."""
    src = tmp_path / 'in'
    src.mkdir()
    for i in range(5):
        shutil.copy(os.path.join(NIBABEL_DATA, 'anatomical.nii'), src / f's{i}.nii')
    size, window = 44, (6000.0, 10000.0)
    out = prepare.prepare_nifti(tmp_path / 'out', source=str(src), modality='ct', spacing='2', size=size,
                                window='6000,10000', workers=1, val_fraction=0.2, test_fraction=0.2)
    m = meta(out)
    assert m['spacing'] == [2.0] * 3 and m['modality'] == 'CT' and m['field_of_view_mm'] == [88.0] * 3
    assert m['intensity']['window'] == {'level': 6000.0, 'width': 10000.0}
    v, _ = canonical_by_hand(nib.load(os.path.join(NIBABEL_DATA, 'anatomical.nii')))
    v = v[..., 0]
    lo = window[0] - window[1] / 2
    expected = np.round(np.clip((v - lo) / window[1], 0, 1) * 255)
    pad = [(size - n) // 2 for n in v.shape]
    stored = load(out, 'test', 'images')[0, ..., 0].astype(float)
    inner = stored[pad[0]:pad[0] + v.shape[0], pad[1]:pad[1] + v.shape[1], pad[2]:pad[2] + v.shape[2]]
    assert np.array_equal(inner, expected)
    assert stored.sum() == inner.sum()  # padding is 0


def test_volume_options_are_checked_with_messages_naming_the_fix(tmp_path):
    (tmp_path / 'v').mkdir()
    save(tmp_path / 'v' / 'a.nii.gz', volume(0)[0])
    for kw, msg in (({}, '--modality must be ct'), ({'modality': 'pet'}, "got 'pet'"),
                    ({'modality': 'mri', 'window': '40,400'}, 'drop --window'),
                    ({'modality': 'ct', 'window': '40'}, 'level,width'),
                    ({'modality': 'ct', 'spacing': '1,2'}, 'z,y,x'), ({'modality': 'mri', 'spacing': '-1'}, 'all > 0')):
        with pytest.raises(ValueError, match=msg):
            prepare.prepare_nifti(tmp_path / 'o', source=str(tmp_path / 'v'), **kw)
    with pytest.raises(ValueError, match='drop --window'):
        prepare.DATASETS['msd_heart'](out_dir=tmp_path / 'h', window='40,400')
    assert prepare.main(['nifti', f'--source={tmp_path / "v"}', f'--out={tmp_path / "o"}']) == 1  # no traceback


def test_label_values_outside_the_data_sets_labels_are_reported_not_renumbered(tmp_path):
    image, label = volume(0)
    label[0, 0, 0] = 7
    recipe = {**prepare.volume_recipe('mri', '1'), 'channels': 1, 'label_values': [0, 1, 2]}
    with pytest.raises(ValueError, match=r'label values \[7.0\] are not among'):
        prepare.load_volume([save(tmp_path / 'i.nii.gz', image)], save(tmp_path / 'l.nii.gz', label), 8, recipe)
