"""prepare.py brainlobes on a tiny fabricated mricron-data .deb: the official layout and file names
(an ar archive of debian-binary, control.tar.xz and data.tar.xz holding usr/share/mricron/templates/
ch2.nii.gz, aal.nii.gz, aal.nii.txt), served by a file:// URL. The T1 is random, so every patch is
unique and its slice can be found again; the atlas uses regions whose codes span all 8 AAL lobes."""
import gzip
import hashlib
import io
import json
import re
import tarfile

import nibabel as nib
import numpy as np
import pytest

import prepare
from prepare import SPLITS

SHAPE = (40, 36, 60)   # x, y, z: 60 axial slices = slabs 0..5, so every split has one
SIZE, STRIDE = 16, 4   # small patches on a fine grid: many patches, fast
REGIONS = {1: ('Precentral_L', 2001), 2: ('Insula_L', 3001), 3: ('Cingulum_Ant_L', 4001), 4: ('Calcarine_L', 5001),
           5: ('Postcentral_L', 6001), 6: ('Caudate_L', 7001), 7: ('Temporal_Sup_L', 8111), 8: ('Cerebelum_3_L', 9031),
           9: ('Vermis_10', 9170)}  # index: (name, code); 9 is listed but in no voxel
CLASS_OF_LOBE = {2: 0, 3: 1, 4: 1, 5: 2, 6: 3, 7: 4, 8: 5, 9: 6}  # code // 1000 -> class, insula with limbic
TEMPLATES = './usr/share/mricron/templates/'


def gz_nifti(a):
    return gzip.compress(nib.Nifti1Image(a, np.eye(4)).to_bytes(), mtime=0)  # RAS: the axes are x, y, z


def fabricate(shape=SHAPE, aal_shape=None):
    """{file name: bytes} of the three files, and the arrays they hold."""
    rng = np.random.default_rng(0)
    t1 = rng.integers(1, 256, shape, dtype=np.uint8)
    aal = np.zeros(aal_shape or shape, np.uint8)
    x, y, z = np.meshgrid(*[np.arange(n) for n in aal.shape], indexing='ij')
    inside = (x >= 3) & (x < aal.shape[0] - 3) & (y >= 5) & (y < aal.shape[1] - 2)  # a border of background
    aal[inside] = (1 + (x // 6 + y // 5 + z // 7) % 8)[inside]
    table = 'index name code\r\n' + ''.join(f'{i} {n} {c}\r\n' for i, (n, c) in REGIONS.items()) + '\r\n'
    files = {'ch2.nii.gz': gz_nifti(t1), 'aal.nii.gz': gz_nifti(aal), 'aal.nii.txt': table.encode()}
    return files, t1, aal


def tar_of(entries, compression='xz'):
    """entries: (name, bytes) for files, (name, None) for folders, (name, (type, target)) for links."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f'w:{compression}') as t:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            elif isinstance(data, tuple):
                info.type, info.linkname = data
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ar_of(members):
    out = b'!<arch>\n'
    for name, data in members:
        out += f'{name:<16}{1674043067:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}'.encode() + b'`\n'
        out += data + (b'\n' if len(data) % 2 else b'')
    return out


def make_deb(path, files, extra=(), data_name='data.tar.xz', replace=None):
    """A .deb as Debian builds it: './' folders first, the templates among other files. replace: entries
    that take the place of the named template files (a link, an absolute path)."""
    entries = [('.', None), ('./usr', None), ('./usr/share', None), ('./usr/share/doc', None),
               ('./usr/share/doc/mricron-data', None), ('./usr/share/doc/mricron-data/copyright', b'BSD-3-clause'),
               ('./usr/share/mricron', None), ('./usr/share/mricron/templates', None),
               (TEMPLATES + 'ch2better.nii.gz', files['ch2.nii.gz'])]
    for name, data in files.items():
        entries += (replace or {}).get(name, [(TEMPLATES + name, data)])
    entries += list(extra)
    control = tar_of([('.', None), ('./control', b'Package: mricron-data\nVersion: 1.2.20211006+dfsg-4\n')])
    compression = {'data.tar.xz': 'xz', 'data.tar.gz': 'gz'}.get(data_name, 'xz')
    path.write_bytes(ar_of([('debian-binary', b'2.0\n'), ('control.tar.xz', control),
                            (data_name, tar_of(entries, compression))]))
    return path


def expected(t1, aal):
    """The data set computed here, independently: {split: (images, labels, slabs)} plus {patch bytes: z}
    for every candidate patch of every slice (kept or not)."""
    lobe_of_region = {i: CLASS_OF_LOBE[c // 1000] for i, (_, c) in REGIONS.items()}
    X, Y, Z = t1.shape
    h = SIZE // 2
    out = {s: ([], [], []) for s in SPLITS}
    z_of = {}
    for z in range(Z):
        for x in range(0, X, STRIDE):
            for y in range(0, Y, STRIDE):
                if aal[x, y, z] == 0:
                    continue
                patch = np.zeros((SIZE, SIZE), np.uint8)  # the part of the square inside the volume
                x0, x1, y0, y1 = max(0, x - h), min(X, x - h + SIZE), max(0, y - h), min(Y, y - h + SIZE)
                patch[x0 - (x - h):x1 - (x - h), y0 - (y - h):y1 - (y - h)] = t1[x0:x1, y0:y1, z]
                z_of[patch.tobytes()] = z
                if z % 10 in (0, 1, 8, 9):
                    continue
                slab = z // 10
                split = 'val' if slab % 5 == 2 else 'test' if slab % 5 == 4 else 'train'
                out[split][0].append(patch[..., None])
                out[split][1].append(lobe_of_region[int(aal[x, y, z])])
                out[split][2].append(slab)
    return {s: tuple(np.array(a) for a in v) for s, v in out.items()}, z_of


def arrays(out):
    return {f.name: f.read_bytes() for f in sorted(out.glob('*.npy'))}


@pytest.fixture
def package(tmp_path, monkeypatch):
    """The fabricated .deb, named and checksummed as the official one, served by a file:// URL; nothing
    installed on this machine is looked at."""
    files, t1, aal = fabricate()
    www = tmp_path / 'www'
    www.mkdir()
    deb = make_deb(www / prepare.BRAINLOBES_DEB['name'], files)
    monkeypatch.setattr(prepare, 'BRAINLOBES_DEB', dict(prepare.BRAINLOBES_DEB, url=deb.as_uri(),
                        size=deb.stat().st_size, sha256=hashlib.sha256(deb.read_bytes()).hexdigest()))
    monkeypatch.setattr(prepare, 'BRAINLOBES_INSTALLED', tmp_path / 'not-installed')
    return deb, files, t1, aal


def test_brainlobes_download_gives_the_patches_labels_and_slabs_of_an_independent_computation(tmp_path, package):
    deb, files, t1, aal = package
    out = prepare.prepare_brainlobes(tmp_path / 'data' / 'brainlobes', size=SIZE, stride=STRIDE)
    assert (tmp_path / 'data' / 'downloads' / 'brainlobes' / deb.name).read_bytes() == deb.read_bytes()
    want, _ = expected(t1, aal)
    m = json.loads((out / 'meta.json').read_text())
    for s in SPLITS:
        images, labels, slabs = want[s]
        assert len(labels) > 0
        np.testing.assert_array_equal(np.load(out / f'{s}_images.npy'), images)
        np.testing.assert_array_equal(np.load(out / f'{s}_labels.npy'), labels)
        np.testing.assert_array_equal(np.load(out / f'{s}_groups.npy'), slabs)
        assert m['counts'][s] == len(labels)
    assert m['classes'] == ['frontal', 'limbic+insula', 'occipital', 'parietal', 'subcortical', 'temporal', 'cerebellum']
    assert set(np.load(out / 'train_labels.npy').tolist()) == set(range(7))  # every lobe, insula with limbic
    assert m['image_size'] == [SIZE, SIZE] and m['channels'] == 1 and m['has_groups']
    assert 'ONE brain' in m['note'] and 'Holmes' in m['citation'] and 'Tzourio-Mazoyer' in m['citation']
    assert 'BSD-3-Clause' in m['licence'] and 'slab % 5 == 2 -> val' in m['split_rule']
    # the three files came out of the package intact, and nothing of them is left in the output
    assert m['input_md5'] == {f: hashlib.md5(b).hexdigest() for f, b in files.items()}
    assert not m['inputs_are_the_packaged_files']  # fabricated, not Debian's: meta.json says so
    assert sorted(p.name for p in out.iterdir()) == sorted(['meta.json'] + [f'{s}_{k}.npy' for s in SPLITS
                                                                           for k in ('images', 'labels', 'groups')])
    before = arrays(out)
    prepare.prepare_brainlobes(tmp_path / 'data' / 'brainlobes', size=SIZE, stride=STRIDE)  # up to date
    assert arrays(out) == before


def test_brainlobes_splits_are_whole_slabs_with_a_gap_between_splits(tmp_path, package):
    """Each patch's slice is found again from its pixels; then: kept slices are 2..7 of their slab, the
    groups are the slabs, val is slab % 5 == 2 and test slab % 5 == 4, and two patches in different
    splits are at least 5 slices (the 4-slice gap plus one) apart."""
    deb, files, t1, aal = package
    out = prepare.prepare_brainlobes(tmp_path / 'bl', size=SIZE, stride=STRIDE)
    _, z_of = expected(t1, aal)
    zs = {}
    for s in SPLITS:
        images = np.load(out / f'{s}_images.npy')
        zs[s] = np.array([z_of[im[..., 0].tobytes()] for im in images])
        assert ((zs[s] % 10 >= 2) & (zs[s] % 10 <= 7)).all()
        np.testing.assert_array_equal(np.load(out / f'{s}_groups.npy'), zs[s] // 10)
    assert set((zs['val'] // 10 % 5).tolist()) == {2} and set((zs['test'] // 10 % 5).tolist()) == {4}
    assert set((zs['train'] // 10 % 5).tolist()) <= {0, 1, 3}
    groups = {s: set((zs[s] // 10).tolist()) for s in SPLITS}
    assert not groups['train'] & groups['val'] and not groups['train'] & groups['test'] and not groups['val'] & groups['test']
    for a, b in (('train', 'val'), ('train', 'test'), ('val', 'test')):
        assert np.abs(zs[a][:, None] - zs[b][None, :]).min() >= 5, (a, b)


def test_brainlobes_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path, package, monkeypatch, capsys):
    deb, *_ = package
    monkeypatch.setitem(prepare.BRAINLOBES_DEB, 'sha256', '0' * 64)
    data = tmp_path / 'data'
    with pytest.raises(prepare.ChecksumError, match=re.escape(f"{deb.name}: sha256 is")):
        prepare.prepare_brainlobes(data / 'brainlobes', size=SIZE, stride=STRIDE)
    assert sorted(p.name for p in data.iterdir()) == ['downloads']  # no output folder, no hidden staging folder
    assert list((data / 'downloads' / 'brainlobes').iterdir()) == []  # the wrong file (and its .part) is gone
    # the same file given with --source is checked too, and the command line says what to do
    assert prepare.main(['brainlobes', f'--source={deb}', f'--out={data / "bl"}']) == 1
    err = capsys.readouterr().err
    assert 'sha256' in err and 'delete it and run again' in err and 'Traceback' not in err
    assert sorted(p.name for p in data.iterdir()) == ['downloads']


def test_brainlobes_source_folder_deb_and_installed_package_give_identical_arrays(tmp_path, package, monkeypatch):
    deb, files, *_ = package
    folder = tmp_path / 'templates'
    folder.mkdir()
    for name, data in files.items():
        folder.joinpath(name).write_bytes(data)
    holding_the_deb = tmp_path / 'debs'
    holding_the_deb.mkdir()
    holding_the_deb.joinpath(deb.name).write_bytes(deb.read_bytes())
    monkeypatch.setitem(prepare.BRAINLOBES_DEB, 'url', (tmp_path / 'nowhere.deb').as_uri())  # no download here
    opts = [f'--size={SIZE}', f'--stride={STRIDE}']
    assert prepare.main(['brainlobes', f'--source={folder}', f'--out={tmp_path / "a"}'] + opts) == 0
    assert prepare.main(['brainlobes', f'--source={deb}', f'--out={tmp_path / "b"}'] + opts) == 0
    assert prepare.main(['brainlobes', f'--source={holding_the_deb}', f'--out={tmp_path / "c"}'] + opts) == 0
    monkeypatch.setattr(prepare, 'BRAINLOBES_INSTALLED', folder)  # as `apt install mricron-data` leaves it
    assert prepare.main(['brainlobes', f'--out={tmp_path / "d"}'] + opts) == 0
    a = arrays(tmp_path / 'a')
    assert len(a) == 9 and a == arrays(tmp_path / 'b') == arrays(tmp_path / 'c') == arrays(tmp_path / 'd')
    unpacked = sorted(p.name for p in (tmp_path / 'downloads' / 'brainlobes').iterdir())  # next to the downloads
    assert unpacked == [deb.name + '.d'] and all((tmp_path / 'downloads' / 'brainlobes' / unpacked[0] / f).read_bytes()
                                                 == data for f, data in files.items())


@pytest.mark.parametrize('case', ['symlink', 'hardlink', 'absolute template', 'absolute other', 'link out'])
def test_brainlobes_refuses_a_deb_with_a_link_or_an_absolute_path(tmp_path, package, case):
    deb, files, *_ = package
    other = TEMPLATES + 'ch2better.nii.gz'
    replace, extra = {}, []
    if case == 'symlink':  # points inside the package: still not the file itself
        replace['ch2.nii.gz'] = [(TEMPLATES + 'ch2.nii.gz', (tarfile.SYMTYPE, 'ch2better.nii.gz'))]
    elif case == 'hardlink':
        replace['aal.nii.gz'] = [(TEMPLATES + 'aal.nii.gz', (tarfile.LNKTYPE, other))]
    elif case == 'absolute template':
        replace['aal.nii.txt'] = [('/usr/share/mricron/templates/aal.nii.txt', files['aal.nii.txt'])]
    elif case == 'absolute other':
        extra = [('/etc/cron.d/evil', b'* * * * * root true')]
    else:
        extra = [('./usr/share/doc/mricron-data/x', (tarfile.SYMTYPE, '../../../../../etc/passwd'))]
    bad = make_deb(tmp_path / 'mricron-data_bad_all.deb', files, extra=extra, replace=replace)
    with pytest.raises(prepare.UnsafeArchiveError, match='refusing'):
        prepare.prepare_brainlobes(tmp_path / 'data' / 'bl', source=str(bad), size=SIZE, stride=STRIDE)
    assert not (tmp_path / 'data').exists()  # refused before anything was written, unpacked files included


def test_brainlobes_bad_inputs_are_one_clear_error_naming_the_fix(tmp_path, package):
    deb, files, *_ = package
    cases = []
    missing = tmp_path / 'missing'
    missing.mkdir()
    for name in ('ch2.nii.gz', 'aal.nii.gz'):
        missing.joinpath(name).write_bytes(files[name])
    cases.append((missing, FileNotFoundError, r'holds no aal\.nii\.txt.*apt install mricron-data'))
    grid = tmp_path / 'grid'
    grid.mkdir()
    other, _, _ = fabricate(aal_shape=(40, 36, 50))
    for name, data in {**files, 'aal.nii.gz': other['aal.nii.gz']}.items():
        grid.joinpath(name).write_bytes(data)
    cases.append((grid, ValueError, r'40x36x60 voxels.*40x36x50.*same mricron-data package'))
    unlisted = tmp_path / 'unlisted'
    unlisted.mkdir()
    for name, data in {**files, 'aal.nii.txt': b'1 Precentral_L 2001\n2 Insula_L 3001\n'}.items():
        unlisted.joinpath(name).write_bytes(data)
    cases.append((unlisted, ValueError, r'region indices 3, 4, 5.*does not list'))
    zstd = tmp_path / 'zstd.deb'
    zstd.write_bytes(ar_of([('debian-binary', b'2.0\n'), ('control.tar.zst', b'x'), ('data.tar.zst', b'\x28\xb5\x2f\xfd')]))
    cases.append((zstd, ValueError, r'zstd.*dpkg-deb -x'))
    truncated = tmp_path / 'truncated.deb'
    truncated.write_bytes(deb.read_bytes()[:5000])
    cases.append((truncated, ValueError, 'damaged Debian package'))
    for k, (source, error, match) in enumerate(cases):
        with pytest.raises(error, match=match):
            prepare.prepare_brainlobes(tmp_path / 'data' / f'bl{k}', source=str(source), size=SIZE, stride=STRIDE)
        assert not (tmp_path / 'data' / f'bl{k}').exists()
    assert [p.name for p in (tmp_path / 'data').iterdir()] == []  # no staging folder left either
