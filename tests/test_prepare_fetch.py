"""prepare.py's shared plumbing for real data sets: download (resume, checksums), safe unpacking,
splits that keep groups apart. Everything is served from this machine: file:// URLs and a local
http.server in a thread."""
import hashlib
import http.server
import io
import json
import os
import re
import tarfile
import threading
import zipfile
from functools import partial

import numpy as np
import pytest

import prepare


def md5(b):
    return hashlib.md5(b).hexdigest()


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and honours 'Range: bytes=N-' like a real file server; counts requests."""
    requests = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        RangeHandler.requests.append((self.path, self.headers.get('Range')))
        path = self.translate_path(self.path.split('?')[0])
        if not os.path.isfile(path):
            return self.send_error(404)
        data = open(path, 'rb').read()
        start = int(self.headers['Range'].split('=')[1].rstrip('-')) if self.headers.get('Range') else 0
        if start >= len(data) and start:
            return self.send_error(416)
        self.send_response(206 if start else 200)
        self.send_header('Content-Length', str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture
def server(tmp_path):
    root = tmp_path / 'www'
    root.mkdir()
    RangeHandler.requests = []
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()
    httpd.server_close()


def test_download_from_a_file_url_checks_the_md5(tmp_path):
    src = tmp_path / 'official.npz'
    src.write_bytes(b'x' * 5000)
    dest = prepare.download(src.as_uri(), tmp_path / 'dl' / 'official.npz', md5(b'x' * 5000))
    assert dest.read_bytes() == b'x' * 5000
    assert not (tmp_path / 'dl' / 'official.npz.part').exists()


def test_checksum_mismatch_is_an_error_naming_the_file_and_leaves_nothing(tmp_path):
    src = tmp_path / 'camelyonpatch_level_2_split_test_y.h5.gz'
    src.write_bytes(b'not the official bytes')
    with pytest.raises(prepare.ChecksumError, match='camelyonpatch_level_2_split_test_y.h5.gz'):
        prepare.download(src.as_uri(), tmp_path / 'dl' / src.name, '0' * 32)
    assert list((tmp_path / 'dl').iterdir()) == []


def test_download_checks_a_sha256_told_apart_from_an_md5_by_its_length(tmp_path):
    src = tmp_path / 'mricron-data_1.2.20211006+dfsg-4_all.deb'
    src.write_bytes(b'!<arch>\n' * 100)
    sha256 = hashlib.sha256(src.read_bytes()).hexdigest()
    assert prepare.download(src.as_uri(), tmp_path / 'dl' / src.name, sha256).read_bytes() == src.read_bytes()
    with pytest.raises(prepare.ChecksumError, match=re.escape(f'{src.name}: sha256 is {sha256}')):
        prepare.download(src.as_uri(), tmp_path / 'dl2' / src.name, '0' * 64)
    assert list((tmp_path / 'dl2').iterdir()) == []  # the .part of a wrong file is gone


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    root, url = server
    payload = bytes(range(256)) * 400  # 100 kB
    (root / 'Task04_Hippocampus.tar').write_bytes(payload)
    dest = tmp_path / 'dl' / 'Task04_Hippocampus.tar'
    dest.parent.mkdir()
    (tmp_path / 'dl' / 'Task04_Hippocampus.tar.part').write_bytes(payload[:30000])  # a previous run died here
    prepare.download(f'{url}/Task04_Hippocampus.tar', dest, md5(payload))
    assert dest.read_bytes() == payload
    assert RangeHandler.requests == [('/Task04_Hippocampus.tar', 'bytes=30000-')]  # only the rest was sent


def test_complete_part_file_is_finished_without_sending_it_again(server, tmp_path):
    root, url = server
    (root / 'f.bin').write_bytes(b'abc' * 100)
    (tmp_path / 'f.bin.part').write_bytes(b'abc' * 100)
    prepare.download(f'{url}/f.bin', tmp_path / 'f.bin', md5(b'abc' * 100))  # server answers 416
    assert (tmp_path / 'f.bin').read_bytes() == b'abc' * 100


def test_existing_download_is_not_fetched_again(server, tmp_path):
    root, url = server
    (tmp_path / 'f.bin').write_bytes(b'done')
    prepare.download(f'{url}/f.bin', tmp_path / 'f.bin', md5(b'done'))
    assert RangeHandler.requests == []


def test_server_that_ignores_range_restarts_from_zero(tmp_path):
    src = tmp_path / 'f.bin'
    src.write_bytes(b'0123456789' * 100)
    (tmp_path / 'out.bin.part').write_bytes(b'garbage!')  # file:// ignores Range: must not append
    prepare.download(src.as_uri(), tmp_path / 'out.bin', md5(b'0123456789' * 100))
    assert (tmp_path / 'out.bin').read_bytes() == b'0123456789' * 100


def make_zip(path, members):
    with zipfile.ZipFile(path, 'w') as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def make_tar(path, members, links=()):
    with tarfile.open(path, 'w') as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, target, kind in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            t.addfile(info)
    return path


def test_extract_unpacks_zip_and_tar_and_is_not_redone(tmp_path):
    z = prepare.extract(make_zip(tmp_path / 'a.zip', {'d/x.txt': b'1'}), tmp_path / 'za')
    t = prepare.extract(make_tar(tmp_path / 'a.tar', {'d/y.txt': b'2'}), tmp_path / 'ta')
    assert (z / 'd/x.txt').read_bytes() == b'1' and (t / 'd/y.txt').read_bytes() == b'2'
    (z / 'd/x.txt').write_bytes(b'changed')
    prepare.extract(tmp_path / 'a.zip', tmp_path / 'za')  # complete: left alone
    assert (z / 'd/x.txt').read_bytes() == b'changed'


@pytest.mark.parametrize('name', ['../evil.txt', 'd/../../evil.txt', '/tmp/medjepa-evil.txt'])
def test_extract_refuses_paths_escaping_the_folder(tmp_path, name):
    for archive in (make_zip(tmp_path / 'bad.zip', {'ok.txt': b'1', name: b'pwned'}),
                    make_tar(tmp_path / 'bad.tar', {'ok.txt': b'1', name: b'pwned'})):
        with pytest.raises(prepare.UnsafeArchiveError, match='outside'):
            prepare.extract(archive, tmp_path / 'out' / 'x')
        assert not (tmp_path / 'out' / 'x').exists() and not (tmp_path / 'out' / 'x.tmp').exists()
    assert not (tmp_path / 'evil.txt').exists() and not os.path.exists('/tmp/medjepa-evil.txt')


@pytest.mark.parametrize('link', [('d/link', '../../secret', tarfile.SYMTYPE), ('d/link', '/etc/passwd', tarfile.SYMTYPE),
                                  ('hard', '../secret', tarfile.LNKTYPE)])
def test_extract_refuses_tar_links_pointing_outside(tmp_path, link):
    archive = make_tar(tmp_path / 'links.tar', {'d/ok.txt': b'1'}, links=[link])
    with pytest.raises(prepare.UnsafeArchiveError, match='link'):
        prepare.extract(archive, tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_extract_keeps_links_that_stay_inside(tmp_path):
    archive = make_tar(tmp_path / 'ok.tar', {'d/ok.txt': b'1'}, links=[('d/alias.txt', 'ok.txt', tarfile.SYMTYPE)])
    out = prepare.extract(archive, tmp_path / 'out')
    assert (out / 'd/alias.txt').read_bytes() == b'1'


def test_extract_accepts_the_folder_itself_as_a_member(tmp_path):
    src = tmp_path / 'src'
    (src / 'd').mkdir(parents=True)
    (src / 'd' / 'x.txt').write_bytes(b'1')
    with tarfile.open(tmp_path / 'dot.tar', 'w') as t:  # as `tar -C src -cf dot.tar .` makes it: './' comes first
        t.add(src, arcname='.')
    assert [m.name for m in tarfile.open(tmp_path / 'dot.tar')][0] == '.'
    assert (prepare.extract(tmp_path / 'dot.tar', tmp_path / 'out') / 'd' / 'x.txt').read_bytes() == b'1'


def test_extract_refuses_zip_symlink_pointing_outside(tmp_path):
    archive = tmp_path / 'link.zip'
    with zipfile.ZipFile(archive, 'w') as z:
        info = zipfile.ZipInfo('link')
        info.external_attr = (0o120777 << 16)  # a unix symbolic link; its data is the target
        z.writestr(info, '../../etc/passwd')
    with pytest.raises(prepare.UnsafeArchiveError, match='link'):
        prepare.extract(archive, tmp_path / 'out')


def test_source_archive_and_nested_archives_are_unpacked_next_to_the_output(tmp_path):
    inner = make_zip(tmp_path / 'HAM10000_images_part_1.zip', {'ISIC_0000001.jpg': b'jpg'})
    outer = make_zip(tmp_path / 'dataverse_files.zip', {'HAM10000_images_part_1.zip': inner.read_bytes(),
                                                        '._HAM10000_images_part_1.zip': b'mac junk'})
    roots = prepare.get_raw('ham10000', tmp_path / 'data' / 'ham10000', str(outer))
    assert all(str(r).startswith(str(tmp_path / 'data' / 'downloads' / 'ham10000')) for r in roots)
    assert prepare.find(roots, 'ISIC_0000001.jpg').read_bytes() == b'jpg'
    assert len(roots) == 2  # the '._' resource fork was not taken for an archive


def test_gated_data_set_without_source_says_where_to_get_it(tmp_path):
    with pytest.raises(ValueError, match='kaggle.com/c/aptos2019'):
        prepare.prepare_aptos2019(tmp_path / 'aptos')
    with pytest.raises(ValueError, match='synapse'):
        prepare.prepare_brats2021(tmp_path / 'brats')
    assert not (tmp_path / 'aptos').exists()


def test_split_by_group_keeps_groups_whole_and_strata_balanced():
    groups = np.repeat(np.arange(200), 3)
    strata = np.repeat(np.arange(200) % 4, 3)
    split = prepare.split_by_group(groups, 0.15, 0.15, seed=0, strata=strata)
    for g in range(200):
        assert len(set(split[groups == g])) == 1
    for s, frac in (('train', 0.7), ('val', 0.15), ('test', 0.15)):
        assert abs((split == s).mean() - frac) < 0.03
        for c in range(4):  # every class in every split, in proportion
            assert abs((strata[split == s] == c).mean() - 0.25) < 0.05
    assert (prepare.split_by_group(groups, 0.15, 0.15, 0, strata) == split).all()  # seeded


def test_split_with_too_few_groups_is_a_clear_error():
    with pytest.raises(ValueError, match='too few'):
        prepare.split_by_group([0, 0, 1], 0.15, 0.15, seed=0)


@pytest.mark.parametrize('links', [
    [('x', '.', tarfile.SYMTYPE), ('x/y', '..', tarfile.SYMTYPE)],            # x/y looks like root, is its parent
    [('a', 'b', tarfile.SYMTYPE), ('b', '..', tarfile.SYMTYPE)],              # a -> b first, b -> .. after
    [('d', '.', tarfile.SYMTYPE), ('y', 'd/d/d/..', tarfile.SYMTYPE)],        # '..' after three harmless hops
    [('loop', 'loop', tarfile.SYMTYPE)],                                        # a link to itself
])
def test_extract_follows_links_made_by_earlier_members_and_refuses_escapes(tmp_path, links):
    """Each link alone looks harmless to a check of its own text; resolved the way the OS will, through the
    links made before it (and every link again at the end), each leaves the folder."""
    (tmp_path / 'box').mkdir()
    archive = tmp_path / 'box' / 'links.tar'
    with tarfile.open(archive, 'w') as t:
        for name, target, kind in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            t.addfile(info)
        info = tarfile.TarInfo('y/pwned.txt')  # lands in the parent of the folder if the links are followed
        info.size = 5
        t.addfile(info, io.BytesIO(b'pwned'))
    with pytest.raises(prepare.UnsafeArchiveError, match='outside'):
        prepare.extract(archive, tmp_path / 'box' / 'out')
    assert sorted(p.name for p in (tmp_path / 'box').iterdir()) == ['links.tar']
    assert not (tmp_path / 'pwned.txt').exists() and not (tmp_path / 'box' / 'pwned.txt').exists()


def test_extract_refuses_a_hard_link_through_a_symbolic_link(tmp_path):
    archive = make_tar(tmp_path / 'h.tar', {}, links=[('up', '..', tarfile.SYMTYPE), ('passwd', 'up/secret', tarfile.LNKTYPE)])
    with pytest.raises(prepare.UnsafeArchiveError, match='link'):
        prepare.extract(archive, tmp_path / 'sub' / 'out')


def test_extract_keeps_inside_links_through_other_links(tmp_path):
    archive = make_tar(tmp_path / 'ok.tar', {'d/e/f.txt': b'1'},
                       links=[('x', 'd', tarfile.SYMTYPE), ('g', 'x/e/../e/f.txt', tarfile.SYMTYPE)])
    out = prepare.extract(archive, tmp_path / 'out')
    assert (out / 'g').read_bytes() == b'1'


def test_a_changed_archive_is_unpacked_again_an_unchanged_one_is_not(tmp_path):
    archive = make_zip(tmp_path / 'a.zip', {'x.txt': b'first'})
    out = prepare.extract(archive, tmp_path / 'out')
    record = json.loads((tmp_path / 'out.archive.json').read_text())
    assert record['size'] == archive.stat().st_size and record['md5'] == md5(archive.read_bytes())
    assert record['mtime_ns'] == archive.stat().st_mtime_ns
    os.utime(archive, ns=(1, 1))  # touched (or copied), same bytes: reused, the record follows
    (out / 'x.txt').write_bytes(b'edited by hand')
    prepare.extract(archive, tmp_path / 'out')
    assert (out / 'x.txt').read_bytes() == b'edited by hand'
    assert json.loads((tmp_path / 'out.archive.json').read_text())['mtime_ns'] == 1
    make_zip(archive, {'x.txt': b'second', 'new.txt': b'2'})  # a new version under the same name
    os.utime(archive, ns=(1, 1))  # even with the old time stamp
    prepare.extract(archive, tmp_path / 'out')
    assert (out / 'x.txt').read_bytes() == b'second' and (out / 'new.txt').exists()


def test_an_unpacked_copy_without_a_record_is_not_trusted(tmp_path):
    archive = make_zip(tmp_path / 'a.zip', {'x.txt': b'new'})
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'x.txt').write_bytes(b'old, from who knows where')
    prepare.extract(archive, tmp_path / 'out')
    assert (tmp_path / 'out' / 'x.txt').read_bytes() == b'new'


def test_nested_archives_with_the_same_name_are_both_unpacked(tmp_path):
    src = tmp_path / 'src'
    for part, image in (('a', 'ISIC_1.jpg'), ('b', 'ISIC_2.jpg')):
        (src / part).mkdir(parents=True)
        make_zip(src / part / 'images.zip', {image: part.encode()})
    roots = prepare.get_raw('x', tmp_path / 'data' / 'x', str(src))
    assert prepare.find(roots, 'ISIC_1.jpg').read_bytes() == b'a' and prepare.find(roots, 'ISIC_2.jpg').read_bytes() == b'b'


def test_folder_follows_class_folders_that_are_symbolic_links(tmp_path):
    from PIL import Image
    elsewhere = tmp_path / 'other_disk' / 'malignant'
    elsewhere.mkdir(parents=True)
    root = tmp_path / 'pics'
    (root / 'benign').mkdir(parents=True)
    for i in range(10):
        Image.new('RGB', (8, 8), (10, 10, 10)).save(root / 'benign' / f'{i}.png')
        Image.new('RGB', (8, 8), (200, 10, 10)).save(elsewhere / f'{i}.png')
    (root / 'malignant').symlink_to(elsewhere, target_is_directory=True)
    (root / 'benign' / 'loop').symlink_to(root, target_is_directory=True)  # a loop is walked once
    out = prepare.prepare_folder(tmp_path / 'data' / 'f', source=str(root), size=8, workers=1,
                                 val_fraction=0.2, test_fraction=0.2)
    m = json.loads((out / 'meta.json').read_text())
    assert m['classes'] == ['benign', 'malignant'] and sum(m['counts'].values()) == 20
    for s in prepare.SPLITS:
        images, labels = np.load(out / f'{s}_images.npy'), np.load(out / f'{s}_labels.npy')
        assert ((images[:, 0, 0, 0] > 100) == (labels == 1)).all()
