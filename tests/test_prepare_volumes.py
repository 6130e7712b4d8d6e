"""prepare.py's 3-D data sets (MSD, BraTS 2021, any NIfTI folder) on tiny fabricated volumes, plus
nibabel's own example files. Volumes are stored as uint8 (N, D, H, W, C), docs/data_format.md."""
import hashlib
import io
import json
import os
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
    """x-gradient image (brighter to the right) and a label map: 1 on the left half, 2 in a corner."""
    x = np.linspace(0, 1, shape[0])[:, None, None] * np.ones(shape)
    image = np.stack([x * (100 + 10 * c) + seed for c in range(channels)], -1) if channels > 1 else x * 100 + seed
    label = np.zeros(shape, np.uint8)
    label[:shape[0] // 2] = 1
    label[-3:, -3:, -3:] = 2
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
    monkeypatch.setitem(prepare.MSD_TASKS, 'msd_hippocampus', ('Task04_Hippocampus', hashlib.md5(tar.read_bytes()).hexdigest()))
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
    out = prepare.prepare_nifti(tmp_path / 'data' / 'n', source=str(src), size=SIZE, workers=1,
                                val_fraction=0.2, test_fraction=0.2)
    m = meta(out)
    assert m['task'] == 'unlabeled' and sum(m['counts'].values()) == 6
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
    out = prepare.prepare_nifti(tmp_path / 'data' / 'real', source=str(real), labels=str(labels), size=SIZE,
                                workers=2, val_fraction=0.2, test_fraction=0.2)
    m = meta(out)
    assert m['channels'] == 2 and m['has_masks'] and m['task'] == 'segmentation' and m['mask_labels'] == ['0', '1']
    assert 0.2 < load(out, 'train', 'masks').mean() < 0.8
