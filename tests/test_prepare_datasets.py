"""prepare.py's real 2-D data sets, each on a tiny fabricated copy with the official file names,
layout and csv columns. Pixel colours encode the class, so the tests can check that every image
kept its own label through decoding, skipping and splitting."""
import csv
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
import tarfile
import types
import zipfile

import numpy as np
import pytest
from PIL import Image

import prepare
from prepare import SPLITS

SIZE = 16  # output pixels: small keeps these tests fast
ROOT = Path(__file__).resolve().parents[1]


def load(out, split, key):
    return np.load(out / f'{split}_{key}.npy')


def meta(out):
    return json.loads((out / 'meta.json').read_text())


def picture(label, fmt='JPEG', size=(24, 18), mode='RGB'):
    """A flat picture whose red channel says its class: 30 * label + 10."""
    b = io.BytesIO()
    Image.new(mode, size, (30 * label + 10, 100, 200) if mode == 'RGB' else 30 * label + 10).save(b, fmt)
    return b.getvalue()


def red_class(images):
    return np.round((images[..., 0].reshape(len(images), -1).mean(1) - 10) / 30).astype(int)


def write_csv(path, header, rows, delimiter=','):
    with open(path, 'w', newline='') as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)


def zip_of(path, members):
    with zipfile.ZipFile(path, 'w') as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def assert_groups_disjoint(out):
    groups = {s: set(load(out, s, 'groups').tolist()) for s in SPLITS}
    assert not groups['train'] & groups['val'] and not groups['train'] & groups['test'] \
        and not groups['val'] & groups['test']

# --- HAM10000 ------------------------------------------------------------------------------------


def fabricate_ham(root, with_test=True, leave_out=(), also_in_test=()):
    """dataverse_files.zip as Dataverse serves it: two image zips, the metadata, the lesion masks,
    and the ISIC 2018 Task 3 test images with ground truth, plus Dataverse's MANIFEST.TXT. 7 classes x 6
    lesions x 2 photos; one photo is a truncated JPEG and one a zero-byte file. leave_out: members the
    bundle leaves out (over its size limit), as the MANIFEST then says; also_in_test: HAM10000 image ids
    that the test set holds too."""
    rows, jpgs, masks = [], {}, {}
    k = 0
    for dx_i, dx in enumerate(prepare.HAM_CLASSES):
        for lesion in range(6):
            for photo in range(2):
                image_id = f'ISIC_{k:07d}'
                rows.append([f'HAM_{dx_i:02d}{lesion:02d}', image_id, dx, 'histo', '50.0', 'male', 'back',
                             ['vidir_modern', 'rosendahl'][lesion % 2]])
                jpgs[image_id] = picture(dx_i)
                m = io.BytesIO()
                Image.fromarray(np.pad(np.full((8, 12), 255, np.uint8), ((5, 5), (6, 6)))).save(m, 'PNG')
                masks[image_id] = m.getvalue()
                k += 1
    jpgs['ISIC_0000003'] = jpgs['ISIC_0000003'][:60]  # truncated
    jpgs['ISIC_0000005'] = b''                        # zero bytes
    ids = sorted(jpgs)
    write_csv(root / 'HAM10000_metadata.csv', ['lesion_id', 'image_id', 'dx', 'dx_type', 'age', 'sex',
                                               'localization', 'dataset'], rows)
    members = {'HAM10000_images_part_1.zip': zip_of(root / 'p1.zip', {f'{i}.jpg': jpgs[i] for i in ids[:40]}).read_bytes(),
               'HAM10000_images_part_2.zip': zip_of(root / 'p2.zip', {f'{i}.jpg': jpgs[i] for i in ids[40:]}).read_bytes(),
               'HAM10000_metadata.csv': (root / 'HAM10000_metadata.csv').read_bytes(),
               'HAM10000_segmentations_lesion_tschandl.zip': zip_of(root / 'm.zip', {
                   f'HAM10000_segmentations_lesion_tschandl/{i}_segmentation.png': masks[i] for i in ids}).read_bytes()}
    if with_test:  # 7 new lesions, one photo each, one-hot ground truth columns
        test = {f'ISIC_{9000 + c:07d}': c for c in range(7)}
        test.update({i: prepare.HAM_CLASSES.index(next(r[2] for r in rows if r[1] == i)) for i in also_in_test})
        write_csv(root / 'gt.csv', ['image'] + [c.upper() for c in prepare.HAM_CLASSES],
                  [[i] + [float(c == j) for j in range(7)] for i, c in test.items()])
        members['ISIC2018_Task3_Test_GroundTruth.csv'] = (root / 'gt.csv').read_bytes()
        members['ISIC2018_Task3_Test_Images.zip'] = zip_of(root / 't.zip', {
            f'ISIC2018_Task3_Test_Images/{i}.jpg': picture(c) for i, c in test.items()}).read_bytes()
    manifest = ''.join(f'{name} (application/zip) {len(data)} bytes.\r\n' for name, data in members.items()
                       if name not in leave_out)
    manifest += ''.join(f'{name} (application/zip)  skipped because the total size of the download bundle exceeded '
                        f'the limit of 2147483648 bytes.\r\n' for name in leave_out)
    members = {k: v for k, v in members.items() if k not in leave_out}
    members['MANIFEST.TXT'] = manifest.encode()
    return zip_of(root / 'dataverse_files.zip', members), rows


def test_ham10000_download_lesion_split_isic_test_and_skips(tmp_path, monkeypatch):
    archive, rows = fabricate_ham(tmp_path)
    monkeypatch.setattr(prepare, 'HAM_FILES', {'dataverse_files.zip': (archive.as_uri(), None)})
    out = prepare.prepare_ham10000(tmp_path / 'data' / 'ham10000', size=SIZE, workers=1)
    m = meta(out)
    assert m['classes'] == prepare.HAM_CLASSES and m['licence'] == 'CC BY-NC 4.0' and 'Tschandl' in m['citation']
    assert m['counts']['test'] == 7 and m['counts']['train'] + m['counts']['val'] == 84 - 2
    assert m['skipped']['count'] == 2 and {s['file'].split('/')[-1] for s in m['skipped']['files']} == \
        {'ISIC_0000003.jpg', 'ISIC_0000005.jpg'}
    assert not m['has_masks'] and m['masks_note']  # the ISIC test images have no masks
    assert_groups_disjoint(out)
    for s in SPLITS:  # every image still carries its own class
        assert (red_class(load(out, s, 'images')) == load(out, s, 'labels')).all()
        assert load(out, s, 'images').shape[1:] == (SIZE, SIZE, 3)
    # lesion ids: both photos of a lesion in the same split
    lesion_of = {r[1]: r[0] for r in rows}
    assert m['split_rule'].startswith('grouped by lesion_id')
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prepare.prepare_ham10000(out, size=SIZE, workers=1)  # complete: nothing is redone
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert len(lesion_of) == 84


def test_ham10000_from_source_folder_without_isic_test_has_masks_and_sites(tmp_path):
    archive, _ = fabricate_ham(tmp_path, with_test=False)
    src = prepare.extract(archive, tmp_path / 'my_download')  # a folder the user unpacked
    out = prepare.prepare_ham10000(tmp_path / 'data' / 'ham', source=str(src), size=SIZE, workers=2,
                                   val_fraction=0.2, test_fraction=0.2, isic_test=False)
    m = meta(out)
    assert m['has_masks'] and m['has_sites'] and m['site_names'] == ['rosendahl', 'vidir_modern']
    assert sum(m['counts'].values()) == 82
    assert_groups_disjoint(out)
    for s in SPLITS:
        masks = load(out, s, 'masks')
        assert set(np.unique(masks)) == {0, 1} and 0.2 < masks.mean() < 0.7
        assert set(load(out, s, 'labels').tolist()) == set(range(7))  # stratified: all classes everywhere
    assert not (src / 'HAM10000_images_part_1').exists()  # the user's folder was only read



@pytest.mark.parametrize('left_out', ['HAM10000_images_part_2.zip', 'ISIC2018_Task3_Test_GroundTruth.csv'])
def test_ham10000_bundle_that_leaves_files_out_is_an_error_naming_them(tmp_path, monkeypatch, left_out):
    """Dataverse's bulk zip has a size limit: files over it are left out and named in MANIFEST.TXT."""
    archive, _ = fabricate_ham(tmp_path, leave_out=[left_out])
    monkeypatch.setattr(prepare, 'HAM_FILES', {'dataverse_files.zip': (archive.as_uri(), None)})
    with pytest.raises(FileNotFoundError, match=left_out.replace('.', r'\.') + '.*skipped because'):
        prepare.prepare_ham10000(tmp_path / 'data' / 'ham10000', size=SIZE, workers=1)
    assert not (tmp_path / 'data' / 'ham10000').exists()


def test_ham10000_image_listed_but_absent_is_an_error_not_a_skip(tmp_path):
    archive, _ = fabricate_ham(tmp_path)
    src = prepare.extract(archive, tmp_path / 'my_download')
    (src / 'MANIFEST.TXT').unlink()  # e.g. the files were gathered by hand
    with zipfile.ZipFile(src / 'HAM10000_images_part_2.zip') as z:
        kept = {n: z.read(n) for n in z.namelist()[1:]}  # one image fewer
    zip_of(src / 'HAM10000_images_part_2.zip', kept)
    with pytest.raises(FileNotFoundError, match='1 image'):
        prepare.prepare_ham10000(tmp_path / 'data' / 'ham', source=str(src), size=SIZE, workers=1)
    assert not (tmp_path / 'data' / 'ham').exists()


def test_ham10000_without_the_isic_ground_truth_says_so_instead_of_changing_the_test_split(tmp_path):
    archive, _ = fabricate_ham(tmp_path, with_test=False)
    with pytest.raises(FileNotFoundError, match='isic_test=false'):
        prepare.prepare_ham10000(tmp_path / 'data' / 'ham', source=str(archive), size=SIZE, workers=1)
    out = prepare.prepare_ham10000(tmp_path / 'data' / 'ham', source=str(archive), size=SIZE, workers=1,
                                   isic_test=False, val_fraction=0.2, test_fraction=0.2)
    assert 'isic_test=false' in meta(out)['split_rule'] and meta(out)['args']['isic_test'] is False


def test_ham10000_lesions_with_a_photo_in_the_isic_test_set_leave_train_and_val(tmp_path, monkeypatch):
    """The ISIC ground truth has no HAM10000 lesion ids; image ids are shared, and a HAM10000 photo that is
    also a test image takes its whole lesion (both photos) out of train/val."""
    archive, rows = fabricate_ham(tmp_path, also_in_test=['ISIC_0000010'])
    monkeypatch.setattr(prepare, 'HAM_FILES', {'dataverse_files.zip': (archive.as_uri(), None)})
    out = prepare.prepare_ham10000(tmp_path / 'data' / 'ham10000', size=SIZE, workers=1)
    m = meta(out)
    assert m['counts']['test'] == 8 and m['counts']['train'] + m['counts']['val'] == 84 - 2 - 2
    assert m['test_overlap_lesions_removed'] == 1

# --- MedMNIST ------------------------------------------------------------------------------------


def fabricate_medmnist(path, image_shape, label_cols=1, n=(10, 4, 6), classes=3):
    arrays = {}
    for s, k in zip(SPLITS, n):
        labels = np.arange(k) % classes
        images = np.zeros((k, *image_shape), np.uint8) + (30 * labels + 10).reshape(-1, *[1] * len(image_shape)).astype(np.uint8)
        arrays[f'{s}_images'] = images
        arrays[f'{s}_labels'] = np.stack([labels] * label_cols, 1) if label_cols > 1 else labels[:, None]
    np.savez_compressed(path, **arrays)
    return arrays


@pytest.mark.parametrize('flag,size,shape,cols', [('dermamnist', 64, (64, 64, 3), 1), ('pneumoniamnist', 28, (28, 28), 1),
                                                  ('chestmnist', 28, (28, 28), 14), ('organmnist3d', 64, (64, 64, 64), 1)])
def test_medmnist_official_splits_shapes_and_md5(tmp_path, monkeypatch, flag, size, shape, cols):
    name = f'{flag}.npz' if size == 28 else f'{flag}_{size}.npz'
    www = tmp_path / 'zenodo'
    www.mkdir()
    arrays = fabricate_medmnist(www / name, shape, cols)
    spec = prepare.MEDMNIST['flags'][flag]
    monkeypatch.setitem(spec['md5'], str(size), hashlib.md5((www / name).read_bytes()).hexdigest())
    monkeypatch.setitem(prepare.MEDMNIST, 'url', (www.as_uri() + '/{file}'))
    out = prepare.DATASETS[flag](out_dir=tmp_path / 'data' / flag, size=size)
    m = meta(out)
    assert m['counts'] == {'train': 10, 'val': 4, 'test': 6} and m['classes'] == spec['labels']
    for s in SPLITS:
        images = np.load(out / f'{s}_images.npy', mmap_mode='r')
        expected = arrays[f'{s}_images'] if len(shape) == 3 and shape[-1] == 3 else arrays[f'{s}_images'][..., None]
        assert images.dtype == np.uint8 and (images == expected).all()
        labels = load(out, s, 'labels')
        assert labels.shape == ((len(images), 14) if cols == 14 else (len(images),))
    assert m['task'] == ('multilabel' if flag == 'chestmnist' else 'multiclass')
    assert m.get('spatial_dims') == (3 if '3d' in flag else None) and m['image_size'] == list(shape[:3] if '3d' in flag else shape[:2])


def test_medmnist_images_stored_in_fortran_order_are_read_in_their_true_order(tmp_path, monkeypatch):
    """An .npy header can say fortran_order: the bytes are then column-major. Read as C order, every
    picture would be scrambled; each must come out as stored."""
    www = tmp_path / 'zenodo'
    www.mkdir()
    rng = np.random.default_rng(0)
    arrays = {f'{s}_images': np.asfortranarray(rng.integers(0, 256, (k, 28, 28, 3), dtype=np.uint8))
              for s, k in zip(SPLITS, (10, 4, 6))}
    arrays.update({f'{s}_labels': (np.arange(k) % 3)[:, None] for s, k in zip(SPLITS, (10, 4, 6))})
    np.savez_compressed(www / 'bloodmnist.npz', **arrays)
    with zipfile.ZipFile(www / 'bloodmnist.npz') as z, z.open('train_images.npy') as f:
        np.lib.format.read_magic(f)
        assert np.lib.format.read_array_header_1_0(f)[1]  # fortran_order: True
    monkeypatch.setitem(prepare.MEDMNIST['flags']['bloodmnist']['md5'], '28', hashlib.md5((www / 'bloodmnist.npz').read_bytes()).hexdigest())
    monkeypatch.setitem(prepare.MEDMNIST, 'url', www.as_uri() + '/{file}')
    out = prepare.DATASETS['bloodmnist'](out_dir=tmp_path / 'data' / 'bloodmnist')
    for s in SPLITS:
        assert np.array_equal(load(out, s, 'images'), arrays[f'{s}_images'])


def test_medmnist_checksum_mismatch_names_the_file_and_writes_nothing(tmp_path, monkeypatch):
    fabricate_medmnist(tmp_path / 'bloodmnist.npz', (28, 28, 3))  # not the official bytes
    monkeypatch.setitem(prepare.MEDMNIST, 'url', tmp_path.as_uri() + '/{file}')
    with pytest.raises(prepare.ChecksumError, match='bloodmnist.npz'):
        prepare.DATASETS['bloodmnist'](out_dir=tmp_path / 'data' / 'bloodmnist')
    assert not (tmp_path / 'data' / 'bloodmnist').exists()
    with pytest.raises(ValueError, match='28/64'):
        prepare.DATASETS['organmnist3d'](out_dir=tmp_path / 'x', size=128)

def test_cli_checksum_failure_on_a_source_folder_exits_1_naming_the_file(tmp_path):
    src = tmp_path / 'mine'
    src.mkdir()
    fabricate_medmnist(src / 'bloodmnist.npz', (28, 28, 3))
    r = subprocess.run([sys.executable, str(ROOT / 'prepare.py'), 'bloodmnist', f'--source={src}'], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'bloodmnist.npz: md5' in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path / 'data' / 'bloodmnist').exists()

# --- APTOS 2019 ----------------------------------------------------------------------------------


def test_aptos2019_from_the_competition_zip_stratified_with_a_zero_byte_png(tmp_path):
    rows = [(f'{i:012x}', i % 5) for i in range(50)]
    members = {f'train_images/{code}.png': picture(grade, 'PNG', (30, 20)) for code, grade in rows}
    members['train_images/' + rows[7][0] + '.png'] = b''
    write_csv(tmp_path / 'train.csv', ['id_code', 'diagnosis'], rows)
    members['train.csv'] = (tmp_path / 'train.csv').read_bytes()
    members['test.csv'] = b'id_code\n'
    archive = zip_of(tmp_path / 'aptos2019-blindness-detection.zip', members)
    out = prepare.prepare_aptos2019(tmp_path / 'data' / 'aptos', source=str(archive), size=SIZE, workers=1)
    m = meta(out)
    assert m['ordinal'] and len(m['classes']) == 5 and m['skipped']['count'] == 1
    assert sum(m['counts'].values()) == 49
    for s in SPLITS:
        labels = load(out, s, 'labels')
        assert (red_class(load(out, s, 'images')) == labels).all() and set(labels.tolist()) == set(range(5))

# --- PatchCamelyon -------------------------------------------------------------------------------


def test_pcam_six_gzipped_hdf5_files_official_splits(tmp_path, monkeypatch):
    """h5py is optional and not installed here: a stand-in module reads the fabricated files (npy
    bytes under the official .h5.gz names), so this checks download, md5, gunzip and the splits."""
    www = tmp_path / 'zenodo'
    www.mkdir()
    md5s, n = {}, {'train': 12, 'valid': 4, 'test': 5}
    for official, k in n.items():
        for key, a in (('x', np.full((k, 96, 96, 3), 7, np.uint8) + np.arange(k, dtype=np.uint8)[:, None, None, None]),
                       ('y', (np.arange(k) % 2).astype(np.uint8).reshape(k, 1, 1, 1))):
            b = io.BytesIO()
            np.save(b, a)
            name = f'camelyonpatch_level_2_split_{official}_{key}.h5.gz'
            (www / name).write_bytes(gzip.compress(b.getvalue()))
            md5s[name] = hashlib.md5((www / name).read_bytes()).hexdigest()
    monkeypatch.setattr(prepare, 'PCAM_MD5', md5s)
    monkeypatch.setattr(prepare, 'PCAM_URL', www.as_uri() + '/{file}')
    monkeypatch.setitem(sys.modules, 'h5py', types.SimpleNamespace(
        File=lambda path, mode: {path.name.split('_')[-1][0]: np.load(path)}))
    out = prepare.prepare_pcam(tmp_path / 'data' / 'pcam')
    assert meta(out)['counts'] == {'train': 12, 'val': 4, 'test': 5}
    assert (load(out, 'val', 'images')[:, 0, 0, 0] == 7 + np.arange(4)).all()
    assert (load(out, 'test', 'labels') == np.arange(5) % 2).all()


def test_pcam_without_h5py_says_how_to_install_it_before_downloading(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'h5py', None)  # import h5py -> ImportError
    with pytest.raises(ValueError, match='pip install h5py'):
        prepare.prepare_pcam(tmp_path / 'data' / 'pcam')
    assert not (tmp_path / 'data').exists()

# --- ChestX-ray14 --------------------------------------------------------------------------------


def test_chestxray14_multilabel_official_test_list_and_patient_grouped_val(tmp_path):
    src = tmp_path / 'nih'
    src.mkdir()
    entries, names = [], []
    for patient in range(1, 41):
        for visit in range(2):
            name = f'{patient:08d}_{visit:03d}.png'
            findings = ['No Finding', 'Effusion|Mass', 'Hernia', 'Atelectasis|Pleural_Thickening'][patient % 4]
            entries.append([name, findings, visit, patient, 58, 'M', 'PA', 1024, 1024, 0.143, 0.143])
            names.append(name)
    write_csv(src / 'Data_Entry_2017_v2020.csv', ['Image Index', 'Finding Labels', 'Follow-up #', 'Patient ID',
                                                  'Patient Age', 'Patient Gender', 'View Position',
                                                  'OriginalImage[Width', 'Height]', 'OriginalImagePixelSpacing[x', 'y]'], entries)
    test_names = [n for n in names if int(n[:8]) > 32]  # the official lists are patient-wise
    (src / 'test_list.txt').write_text('\n'.join(test_names) + '\n')
    (src / 'train_val_list.txt').write_text('\n'.join(n for n in names if n not in test_names) + '\n')
    with tarfile.open(src / 'images_001.tar.gz', 'w:gz') as t:
        for i, name in enumerate(names):
            data = picture(int(name[:8]) % 4, 'PNG', (20, 20), mode='L') if i != 3 else b'\x89PNG broken'
            info = tarfile.TarInfo(f'images/{name}')
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    out = prepare.prepare_chestxray14(tmp_path / 'data' / 'cxr', source=str(src), size=SIZE, workers=1)
    m = meta(out)
    assert m['task'] == 'multilabel' and m['classes'][2] == 'Effusion' and m['counts']['test'] == 16
    assert m['skipped']['count'] == 1 and m['counts']['train'] + m['counts']['val'] == 63
    assert_groups_disjoint(out)
    for s in SPLITS:
        labels, groups = load(out, s, 'labels'), load(out, s, 'groups')
        assert labels.shape[1] == 14 and load(out, s, 'images').shape[1:] == (SIZE, SIZE, 1)
        expected = {0: [], 1: ['Effusion', 'Mass'], 2: ['Hernia'], 3: ['Atelectasis', 'Pleural_Thickening']}
        for y, g in zip(labels, groups):
            assert [c for c, v in zip(prepare.CXR14_FINDINGS, y) if v] == expected[g % 4]
    assert set(load(out, 'test', 'groups').tolist()) == set(range(33, 41))



def fabricate_cxr14(src, old_entries=False):
    """The Box page's csv and lists (v2020 labels: patient % 4 picks the findings) and one tarball."""
    src.mkdir()
    entries, names = [], []
    for patient in range(1, 13):
        name = f'{patient:08d}_000.png'
        entries.append([name, ['No Finding', 'Effusion|Mass', 'Hernia', 'Atelectasis'][patient % 4], 0, patient])
        names.append(name)
    header = ['Image Index', 'Finding Labels', 'Follow-up #', 'Patient ID']
    write_csv(src / 'Data_Entry_2017_v2020.csv', header, entries)
    if old_entries:  # the 2017 labels: here all 'Hernia', so that reading this file shows
        write_csv(src / 'Data_Entry_2017.csv', header, [[e[0], 'Hernia', 0, e[3]] for e in entries])
    (src / 'test_list.txt').write_text('\n'.join(names[8:]) + '\n')
    (src / 'train_val_list.txt').write_text('\n'.join(names[:8]) + '\n')
    with tarfile.open(src / 'images_001.tar.gz', 'w:gz') as t:
        for name in names:
            data = picture(int(name[:8]) % 4, 'PNG', (20, 20), mode='L')
            info = tarfile.TarInfo(f'images/{name}')
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_chestxray14_prefers_the_2020_labels_and_records_which_file(tmp_path):
    fabricate_cxr14(tmp_path / 'nih', old_entries=True)
    out = prepare.prepare_chestxray14(tmp_path / 'data' / 'cxr', source=str(tmp_path / 'nih'), size=SIZE, workers=1,
                                      val_fraction=0.25)
    assert meta(out)['labels_file'] == 'Data_Entry_2017_v2020.csv'
    hernia = prepare.CXR14_FINDINGS.index('Hernia')
    labels = np.concatenate([load(out, s, 'labels') for s in SPLITS])
    assert labels[:, hernia].sum() == 3  # patients 2, 6, 10; the 2017 file would say all 12


def test_chestxray14_missing_lists_stop_it_before_any_download(tmp_path, monkeypatch):
    fabricate_cxr14(tmp_path / 'box')
    monkeypatch.setattr(prepare, 'CXR14_FILES', {'images_001.tar.gz': ((tmp_path / 'box' / 'images_001.tar.gz').as_uri(), None)})
    with pytest.raises(FileNotFoundError, match='train_val_list.txt, test_list.txt'):
        prepare.prepare_chestxray14(tmp_path / 'data' / 'cxr', size=SIZE, workers=1)
    downloads = tmp_path / 'data' / 'downloads' / 'chestxray14'
    assert not downloads.exists() or not list(downloads.rglob('*.tar.gz*'))  # not one byte of a tarball
    downloads.mkdir(parents=True, exist_ok=True)
    for name in ('Data_Entry_2017_v2020.csv', 'train_val_list.txt', 'test_list.txt'):
        shutil.copy(tmp_path / 'box' / name, downloads / name)
    out = prepare.prepare_chestxray14(tmp_path / 'data' / 'cxr', size=SIZE, workers=1, val_fraction=0.25)
    assert sum(meta(out)['counts'].values()) == 12

# --- folder --------------------------------------------------------------------------------------


def test_folder_with_class_subfolders_flat_and_csv(tmp_path):
    root = tmp_path / 'pics'
    for c, name in enumerate(['benign', 'malignant']):
        (root / name).mkdir(parents=True)
        for i in range(20):
            (root / name / f'{i}.png').write_bytes(picture(c, 'PNG'))
    (root / 'benign' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really')
    out = prepare.prepare_folder(tmp_path / 'data' / 'f', source=str(root), size=SIZE, workers=1)
    m = meta(out)
    assert m['classes'] == ['benign', 'malignant'] and sum(m['counts'].values()) == 40 and m['skipped']['count'] == 1
    for s in SPLITS:
        assert (red_class(load(out, s, 'images')) == load(out, s, 'labels')).all()

    flat = tmp_path / 'flat'
    flat.mkdir()
    for i in range(12):
        (flat / f'{i}.jpg').write_bytes(picture(1))
    out = prepare.prepare_folder(tmp_path / 'data' / 'flat', source=str(flat), size=SIZE, channels=1, workers=1)
    assert meta(out)['task'] == 'unlabeled' and (load(out, 'train', 'labels') == -1).all()
    assert load(out, 'train', 'images').shape[1:] == (SIZE, SIZE, 1)

    write_csv(tmp_path / 'labels.csv', ['path', 'label', 'group'],
              [[f'{name}/{i}.png', name, f'patient{i % 10}'] for name in ('benign', 'malignant') for i in range(20)])
    out = prepare.prepare_folder(tmp_path / 'data' / 'csv', source=str(root), csv=str(tmp_path / 'labels.csv'),
                                 size=SIZE, workers=1, val_fraction=0.2, test_fraction=0.2)
    assert_groups_disjoint(out)


@pytest.mark.parametrize('size, channels', [(64, 1), (28, 1), (224, 1), (64, 3)])
def test_grey_images_end_with_a_runnable_recommended_command(tmp_path, capsys, size, channels):
    flat = tmp_path / 'flat'
    flat.mkdir()
    for i in range(12):
        (flat / f'{i}.png').write_bytes(picture(i % 2, 'PNG'))
    out = prepare.prepare_folder(tmp_path / 'data' / 'g', source=str(flat), size=size, channels=channels, workers=1)
    nexts = [l for l in capsys.readouterr().out.splitlines() if l.startswith('next:')]
    if channels == 3:  # nothing measured on real colour images: no recommendation
        assert nexts == []
        return
    assert len(nexts) == 1
    argv = nexts[0].split('(')[0].split()[3:]  # after 'next: python medjepa.py'
    assert argv[0] == 'config/brainlobes.py' and f'--data_dir={out}' in argv
    import medjepa
    cfg = medjepa.validate(medjepa.configure([str(ROOT / argv[0])] + argv[1:], medjepa.DEFAULTS))  # a valid run
    assert cfg['objective'] == 'views' and cfg['data_dir'] == str(out) and cfg['image_size'] == size
    assert cfg['image_size'] // cfg['patch_size'] >= 7


def test_split_whose_files_are_all_corrupt_fails_and_leaves_nothing(tmp_path):
    root = tmp_path / 'pics'
    root.mkdir()
    for i in range(10):
        (root / f'{i}.png').write_bytes(b'')
    with pytest.raises(ValueError, match='no readable image'):
        prepare.prepare_folder(tmp_path / 'data' / 'f', source=str(root), size=SIZE, workers=1)
    assert list((tmp_path / 'data').iterdir()) == []  # neither the folder nor its staging copy


def test_pcam_with_real_hdf5_files_when_h5py_is_installed(tmp_path):
    h5py = pytest.importorskip('h5py')  # optional dependency: docs/datasets.md
    for official, k in {'train': 6, 'valid': 3, 'test': 3}.items():
        with h5py.File(tmp_path / f'camelyonpatch_level_2_split_{official}_x.h5', 'w') as f:
            f['x'] = np.full((k, 96, 96, 3), k, np.uint8)
        with h5py.File(tmp_path / f'camelyonpatch_level_2_split_{official}_y.h5', 'w') as f:
            f['y'] = (np.arange(k) % 2).astype(np.uint8).reshape(k, 1, 1, 1)
    out = prepare.prepare_pcam(tmp_path / 'data' / 'pcam', source=str(tmp_path))  # unpacked .h5: no md5 to check
    assert meta(out)['counts'] == {'train': 6, 'val': 3, 'test': 3}
    assert (load(out, 'train', 'images') == 6).all() and (load(out, 'val', 'labels') == [0, 1, 0]).all()
