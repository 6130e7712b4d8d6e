"""
Prepare data sets for MedJEPA as flat numpy arrays that training memory-maps.

    python prepare.py demo                  # synthetic dermoscopy, 64 px: 15-30 s on 2 CPU cores, 148 MB
    python prepare.py demo --size=224       # the same photos at 224 px: 3-5 minutes, 1.8 GB
    python prepare.py ham10000              # downloads 3 GB from Harvard Dataverse, lesion-grouped splits
    python prepare.py dermamnist --size=64  # any MedMNIST v3 set, 2-D or 3-D, official splits, md5-checked
    python prepare.py demo3d                # synthetic CT-like volumes with organ masks, 32^3: about 10 s
    python prepare.py demovideo             # synthetic echo-like clips, 32 frames of 32x32: about 10 s
    python prepare.py msd_hippocampus       # 27 MB of MRI volumes -> (N, 48, 48, 48, 1) at 1 mm, z-scored
    python prepare.py brainlobes            # 16 MB: patches of one real brain MRI labelled by lobe, 7 classes
    python prepare.py slices --source=data/demo3d   # 2-D slices of any prepared volume set, masks and labels kept
    python prepare.py nifti --source=scans/ --modality=ct                   # CT window, spacing, crop/pad
    python prepare.py video --source=clips/ --frames=16 --stride=2          # frame folders, GIF, TIFF, DICOM cines
    python prepare.py aptos2019 --source=aptos2019-blindness-detection.zip   # behind a login: bring the file
    python prepare.py dicom --source=my_scans/ --burned_in=flag              # de-identified on the way
    python prepare.py dicom --anonymize_only IN OUT                          # de-identify files, nothing else
    python prepare.py --help                # every data set and its options

Every data set lands in data/<name>/ in one format (docs/data_format.md has the details):

    {train,val,test}_images.npy   uint8 (N, H, W, C), or (N, D, H, W, C) for volumes, (N, T, H, W, C) for clips
    {train,val,test}_labels.npy   int64 (N,), or (N, L) 0/1 for multi-label sets, -1 when unlabelled
    {train,val,test}_masks.npy    uint8 (N, H, W) / (N, D, H, W) segmentation  (when the data set has them)
    {train,val,test}_groups.npy   int64 (N,), e.g. lesion or patient ids        (when it has them)
    {train,val,test}_sites.npy    int64 (N,), the acquiring hospital/device     (when it has them)
    meta.json                     class names, counts, train mean/std, shapes, source, licence, args,
                                  and the inputs that were skipped as unreadable

With the defaults, `demo` gives 6,000 / 999 / 2,001 images (2,000 / 333 / 667 lesions x 3 images).
The folder appears only when it is complete (we write into a hidden sibling and rename at the end),
and running the same command again does nothing. Real data sets (docs/datasets.md: source, licence,
size, split rule of each) are downloaded into data/downloads/<name>/ with resume and checksums, or
taken from --source=PATH (a folder or an archive already on disk).

Adding a data set is one function prepare_<name>(out_dir, ...) that fills a staging folder with
write_split() + write_meta(), plus one line in DATASETS at the bottom of this file.
"""

import argparse
import csv
import difflib
import errno
import functools
import gzip
import hashlib
import hmac
import inspect
import io
import json
import lzma
import math
import multiprocessing as mp
import os
import re
import secrets
import shutil
import stat
import sys
import tarfile
import time
import typing
import urllib.error
import urllib.request
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from tqdm import tqdm

SPLITS = ('train', 'val', 'test')

# -----------------------------------------------------------------------------
# The on-disk format, shared by every data set


def write_split(tmp_dir, split, images, labels, masks=None, groups=None, sites=None, mask_max=1):
    """Check one split against the format and save it as {split}_{images,labels,...}.npy.
    images: uint8 (N, H, W, C), or (N, D, H, W, C) for volumes. masks: uint8 (N, H, W) / (N, D, H, W)
    with values 0..mask_max (0/1 unless a data set's meta.json names more mask labels)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if images.dtype != np.uint8 or images.ndim not in (4, 5):
        raise ValueError(f"{split} images must be uint8 (N, H, W, C) or (N, D, H, W, C), "
                         f"got {images.dtype} {images.shape}")
    N = len(images)
    arrays = {'images': images, 'labels': labels, 'masks': masks, 'groups': groups, 'sites': sites}
    for key in ('labels', 'groups', 'sites'):
        a = arrays[key]
        if a is None:
            continue
        a = np.asarray(a)
        # int32 ids from a CSV are fine, floats are a bug upstream: never round them silently
        if not np.issubdtype(a.dtype, np.integer) or len(a) != N:
            raise ValueError(f"{split} {key} must be N={N} integers, got {a.dtype} {a.shape}")
        arrays[key] = a.astype(np.int64, copy=False)
    if masks is not None:
        if masks.dtype != np.uint8 or masks.shape != images.shape[:-1] or masks.max(initial=0) > mask_max:
            raise ValueError(f"{split} masks must be uint8 0..{mask_max} of shape {images.shape[:-1]}")
    for key, a in arrays.items():
        if a is not None:
            np.save(Path(tmp_dir) / f'{split}_{key}.npy', a)


def channel_stats(images):
    """Per-channel mean and std of uint8 (N, ..., C) images scaled to [0, 1], in bounded memory; std 1.0 for a
    channel without variation (below)."""
    C = images.shape[-1]
    total, total_sq, count = np.zeros(C), np.zeros(C), 0
    step = max(1, 2**22 // math.prod(images.shape[1:]))  # ~32 MB of float64 per chunk, any image size
    for i in range(0, len(images), step):
        x = np.asarray(images[i:i + step], dtype=np.float64).reshape(-1, C) / 255.0
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    # A channel without variation (an empty modality, a grey picture stored as RGB with a zero channel) has
    # std 0, and (x - mean) / 0 makes every training step NaN. Below one grey level (1/255) a channel carries
    # next to nothing, and dividing by its tiny std would blow its rare other values up: std 1.0 then only
    # centres it. medjepa_utils.read_meta refuses std <= 0 in any meta.json.
    std = np.where(std < 1 / 255, 1.0, std)
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def write_meta(tmp_dir, name, classes, split_rule, source, licence, citation, args,
               task='multiclass', **extra):
    """Write meta.json. Shapes, counts and mean/std are read back from the saved arrays, so the
    metadata cannot disagree with what is on disk."""
    tmp_dir = Path(tmp_dir)
    files = {}
    for path in sorted(tmp_dir.glob('*.npy')):
        a = np.load(path, mmap_mode='r')
        files[path.name] = {'shape': list(a.shape), 'dtype': str(a.dtype)}
    train = np.load(tmp_dir / 'train_images.npy', mmap_mode='r')
    mean, std = channel_stats(train)
    has = lambda key: all(f'{s}_{key}.npy' in files for s in SPLITS)
    meta = {
        'name': name, 'task': task, 'classes': list(classes), 'num_classes': len(classes),
        'channels': int(train.shape[-1]), 'image_size': list(train.shape[1:-1]),
        **({'spatial_dims': 3} if train.ndim == 5 else {}),  # volumes: image_size is [D, H, W]
        'counts': {s: files[f'{s}_labels.npy']['shape'][0] for s in SPLITS},
        'split_rule': split_rule, 'source': source, 'licence': licence, 'citation': citation,
        **extra,
        'mean': mean, 'std': std, 'files': files,
        'has_masks': has('masks'), 'has_groups': has('groups'), 'has_sites': has('sites'),
        'args': args,
    }
    with open(tmp_dir / 'meta.json', 'w') as f:
        json.dump(meta, f, indent=2)
    return meta


def is_up_to_date(out_dir, args):
    """True (and says so) if out_dir already holds this data set made with these args; False if absent.
    Anything else there is refused: we never overwrite a folder someone may still need."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return False
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()  # an empty folder holds nothing to lose
        return False
    meta_path = out_dir / 'meta.json'
    if not meta_path.exists():
        raise FileExistsError(f"{out_dir} exists but has no meta.json: it is not a prepared data set. "
                              f"Delete it or pick another --out.")
    with open(meta_path) as f:
        old = json.load(f).get('args')
    if old != args:
        diff = ', '.join(f"{k}: {(old or {}).get(k)!r} there vs {args.get(k)!r} now"
                         for k in sorted(set(old or {}) | set(args)) if (old or {}).get(k) != args.get(k))
        raise FileExistsError(f"{out_dir} was prepared with different arguments ({diff}). "
                              f"Delete it (rm -r {out_dir}) or pick another --out.")
    print(f"{out_dir} is up to date (same arguments), nothing to do")
    return True


@contextmanager
def staging_dir(out_dir):
    """Yield a hidden sibling folder to write into; rename it to out_dir only if the block finishes.
    rename() within one file system is atomic, so a crash or Ctrl-C can leave a stray hidden
    .<name>.tmp-<pid> folder at worst, never a half-written out_dir that looks complete."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f'.{out_dir.name}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, out_dir)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OSError(e.errno, f"disk full while writing {out_dir} ({e.filename or e}): free space on that disk "
                               f"(or use another --out) and run the same command again; nothing was written "
                               f"to {out_dir}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after a successful rename


def disk_size(path):
    return sum(p.stat().st_size for p in Path(path).rglob('*') if p.is_file())

# -----------------------------------------------------------------------------
# Getting the original files: download (resumable, checksummed), unpack (safely), or --source
#
# Every real data set starts from its official files. Without --source they are downloaded into
# data/downloads/<name>/ (next to the output folder); with --source=PATH a folder or archive already
# on disk is used instead, which is the offline path. Archives found there are unpacked next to the
# downloads, never into the user's folder, and every file with a published checksum (md5 or sha256) is verified.


class ChecksumError(ValueError):
    pass


class UnsafeArchiveError(ValueError):
    pass


CHECKSUM_KINDS = {32: 'md5', 64: 'sha256'}  # a published checksum's algorithm, told by its length in hex


def file_hash(path, algorithm='md5'):
    h = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def verify(path, checksum, name=None):
    """Raise ChecksumError, naming the file, if checksum (an md5 or sha256 in hex, told apart by length) is
    given and path does not have it."""
    if not checksum:
        return
    algorithm = CHECKSUM_KINDS[len(checksum)]
    if (got := file_hash(path, algorithm)) != checksum.lower():
        raise ChecksumError(f"{name or Path(path).name}: {algorithm} is {got}, the official file has {checksum}. "
                            f"The file is damaged or not the official one: delete it and run again.")


def download(url, dest, checksum=None):
    """Fetch url into dest with a progress bar. Bytes land in dest.part first; an interrupted download
    resumes from there with an HTTP Range request, and dest appears only once its checksum (md5 or sha256)
    matches."""
    dest = Path(dest)
    if dest.exists():
        verify(dest, checksum)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + '.part')
    have = part.stat().st_size if part.exists() else 0
    headers = {'User-Agent': 'medjepa-prepare'} | ({'Range': f'bytes={have}-'} if have else {})
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416 "range not satisfiable": the .part already holds the whole file
            raise OSError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
        response = None
    except (urllib.error.URLError, OSError) as e:  # no network, DNS failure, refused, timed out
        raise OSError(f"could not download {url}: {getattr(e, 'reason', e)}. Check the network, or fetch "
                      f"the file another way and pass its folder with --source=PATH") from e
    if response is not None:
        with response:
            if have and getattr(response, 'status', None) != 206:
                have = 0  # the server (or a file:// URL) ignored Range: start again from byte 0
            size = response.headers.get('Content-Length')
            with open(part, 'ab' if have else 'wb') as f, \
                    tqdm(total=int(size) + have if size else None, initial=have, unit='B', unit_scale=True,
                         desc=dest.name, disable=None) as bar:
                for block in iter(lambda: response.read(1 << 20), b''):
                    f.write(block)
                    bar.update(len(block))
    try:
        verify(part, checksum, name=dest.name)
    except ChecksumError:
        part.unlink()  # resuming a wrong file could never succeed
        raise
    os.replace(part, dest)
    return dest


def resolve_member(name, links, follow_last=True, depth=0):
    """Where an archive member named `name` really lands, as a tuple of path parts under the folder it
    unpacks into, following the symbolic links that earlier members made (links: {parts: target}) the
    way the operating system will; None if it leaves the folder (an absolute path, a '..' too many, a
    link that points out, a loop). follow_last=False: the name itself is being made (a link), not opened."""
    if depth > 40 or name.startswith(('/', '\\')) or re.match(r'[A-Za-z]:', name):
        return None
    parts = [c for c in name.split('/') if c not in ('', '.')]
    out = []
    for i, c in enumerate(parts):
        if c == '..':
            if not out:
                return None
            out.pop()
            continue
        out.append(c)
        target = links.get(tuple(out))
        if target is not None and (follow_last or i < len(parts) - 1):
            real = resolve_member('/'.join(out[:-1] + [target]) if not target.startswith('/') else target,
                                  links, True, depth + 1)
            if real is None:
                return None
            out = list(real)
    return tuple(out)


def check_members(archive, members):
    """Refuse, before anything is written, an archive with a member that would land outside the folder it
    unpacks into. members: (name, kind, link target) in archive order, kind 'file', 'dir', 'symlink' or
    'hardlink'. Each destination is resolved through the links made before it, and every link again at
    the end (a link made harmless-looking can be redirected by a later member), so a tar with x -> '.',
    x/y -> '..', then y/file is refused. Does not rely on tarfile's extraction filters."""
    links = {}

    def refuse(name, what='member'):
        raise UnsafeArchiveError(f"{archive.name}: {what} {name!r} points outside the folder it unpacks into; "
                                 f"refusing to unpack this archive (nothing was written)")
    for name, kind, target in members:
        where = resolve_member(name, links, follow_last=kind != 'symlink')
        if where is None or not where and kind != 'dir':  # () is the folder itself: fine as a folder ('./' in tars)
            refuse(name)
        if kind == 'symlink':
            if resolve_member('/'.join(where[:-1] + (target,)) if not target.startswith('/') else target, links) is None:
                refuse(name, 'link')
            links[where] = target
        elif kind == 'hardlink' and not resolve_member(target, links):  # relative to the archive's root
            refuse(name, 'link')
    for where, target in links.items():
        if resolve_member('/'.join(where), links) is None:
            refuse('/'.join(where), 'link')


def archive_stamp(archive):
    """What ties an unpacked copy to its archive: name, size, modification time (and, once read, md5)."""
    st = Path(archive).stat()
    return {'archive': str(Path(archive).resolve()), 'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def extract(archive, dest):
    """Unpack a zip or tar(.gz/.bz2/.xz) into dest. Refuses, before writing anything, members that
    would land outside dest, through links included (check_members); skips devices. Unpacks into
    dest.tmp and renames, then records the archive's size, time and md5 in <dest>.archive.json: an
    unchanged archive is not unpacked again, a changed one (or another archive with the same name) is."""
    archive, dest = Path(archive), Path(dest)
    marker = dest.with_name(dest.name + '.archive.json')
    stamp = archive_stamp(archive)
    if dest.exists():
        old = json.loads(marker.read_text()) if marker.exists() else {}
        if all(old.get(k) == v for k, v in stamp.items()):
            return dest
        if old.get('archive') == stamp['archive'] and old.get('size') == stamp['size'] and old.get('md5') == file_hash(archive):
            marker.write_text(json.dumps({**stamp, 'md5': old['md5']}))  # touched or copied, not changed
            return dest
        print(f"{archive.name} is not the archive {dest} was unpacked from (or it changed): unpacking it again")
    md5 = file_hash(archive)
    tmp = dest.with_name(dest.name + '.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                infos = z.infolist()
                check_members(archive, [  # zipfile writes a link as a file holding its target: checked as a link
                    (i.filename, 'symlink', z.read(i).decode(errors='replace')) if stat.S_ISLNK(i.external_attr >> 16)
                    else (i.filename, 'dir' if i.is_dir() else 'file', None) for i in infos])
                z.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                members = [m for m in t.getmembers() if m.isfile() or m.isdir() or m.issym() or m.islnk()]
                check_members(archive, [(m.name, 'symlink' if m.issym() else 'hardlink' if m.islnk() else
                                         'dir' if m.isdir() else 'file', m.linkname or None) for m in members])
                # Python >= 3.12 (and 3.11.4+) also checks with its own 'data' filter: a second lock, not the first
                t.extractall(tmp, members=members, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
        else:
            raise ValueError(f"{archive}: not a zip or tar archive")
        if dest.exists():
            shutil.rmtree(dest)  # an unpacked copy of another archive, or of an older version of this one
        marker.unlink(missing_ok=True)
        os.rename(tmp, dest)
        marker.write_text(json.dumps({**stamp, 'md5': md5}))
    except getattr(tarfile, 'FilterError', ()) as e:  # the second lock caught what the first let through
        raise UnsafeArchiveError(f"{archive.name}: {e}; refusing to unpack this archive") from e
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(f"{archive}: damaged archive ({type(e).__name__}: {e}): delete it and fetch it again") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def deb_files(deb, wanted, dest):
    """Copy the files `wanted` (paths inside the package, e.g. 'usr/share/mricron/templates/ch2.nii.gz') out of
    a Debian package into the folder dest, under their base names; returns {base name: path}. A .deb is an
    ar archive: b'!<arch>\\n', then per member a 60-byte header (name 16, mtime 12, uid 6, gid 6, mode 8,
    size 10, b'`\\n') and the data, padded to an even length. Its members are debian-binary, control.tar.*
    and data.tar.{xz,gz,bz2} (zstd is refused: the standard library cannot read it). Only data.tar is read,
    in one pass, and only the wanted files are kept; as in extract, any member that would land outside
    the folder refuses the package (check_members), and so does a wanted file that is not a regular file
    (a link), all before anything is written."""
    deb, dest = Path(deb), Path(dest)
    damaged = f"{deb}: damaged Debian package"
    members = {}
    with open(deb, 'rb') as f:
        if f.read(8) != b'!<arch>\n':
            raise ValueError(f"{deb}: not a Debian package (no ar archive header)")
        end = deb.stat().st_size
        while header := f.read(60):
            size = header[48:58].strip()
            if len(header) < 60 or header[58:60] != b'`\n' or not size.isdigit() or f.tell() + int(size) > end:
                raise ValueError(f"{damaged} (a bad or truncated ar member): delete it and fetch it again")
            members[header[:16].decode('ascii', 'replace').strip().rstrip('/')] = (f.tell(), int(size))
            f.seek(int(size) + int(size) % 2, 1)  # GNU ar ends names with '/'; data is padded to even length
        data = [name for name in members if name.startswith('data.tar')]
        if len(data) != 1:
            raise ValueError(f"{deb}: not a Debian package (members {', '.join(members)}; no single data.tar.*)")
        data = data[0]
        compression = {'data.tar': '', 'data.tar.gz': 'gz', 'data.tar.xz': 'xz', 'data.tar.bz2': 'bz2'}.get(data)
        if compression is None:
            raise ValueError(f"{deb.name}: its {data} is compressed in a way Python's standard library cannot read"
                             f"{' (zstd)' if data.endswith('.zst') else ''}: unpack it with `dpkg-deb -x {deb.name} "
                             f"DIR` (or install the package) and pass the folder holding the files with --source")
        offset, size = members[data]
        f.seek(offset)
        blob = io.BytesIO(f.read(size))
    want = {resolve_member(w, {}): w for w in wanted}
    listing, found = [], {}
    try:
        with tarfile.open(fileobj=blob, mode=f'r|{compression}') as t:
            for m in t:
                if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                    continue  # devices and fifos are never written
                kind = 'symlink' if m.issym() else 'hardlink' if m.islnk() else 'dir' if m.isdir() else 'file'
                listing.append((m.name, kind, m.linkname or None))
                if (w := want.get(resolve_member(m.name, {}))) is not None:
                    if kind != 'file':
                        raise UnsafeArchiveError(f"{deb.name}: {m.name!r} is a {kind}, not a file; refusing this "
                                                 f"package (nothing was written)")
                    found[w] = t.extractfile(m).read()
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise ValueError(f"{damaged} ({data}: {type(e).__name__}: {e}): delete it and fetch it again") from e
    check_members(deb, listing)
    if missing := [w for w in wanted if w not in found]:
        raise FileNotFoundError(f"{deb.name} holds no {', '.join(missing)}: not the package this data set needs")
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for w in wanted:
        out[Path(w).name] = path = dest / Path(w).name
        path.with_name(path.name + '.part').write_bytes(found[w])
        os.replace(path.with_name(path.name + '.part'), path)  # whole or absent, never half-written
    return out


ARCHIVE_SUFFIXES = ('.zip', '.tar', '.tar.gz', '.tgz', '.tar.bz2', '.tar.xz')


def is_archive(path):
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def visible(path):
    """False for macOS '._*' resource forks and '__MACOSX' folders, which copy tools leave in archives."""
    return not any(part.startswith('._') or part == '__MACOSX' for part in path.parts)


def get_raw(name, out_dir, source='', files=None, how_to_get=None):
    """The folders holding a data set's original files, every archive among them unpacked.
    source '': download `files` ({file name: (url, md5 or sha256 or None)}) into <out_dir>/../downloads/<name>/;
    data sets behind a login have no `files` and stop here with `how_to_get`.
    source = a folder: used in place (read only); source = an archive: unpacked into the downloads.
    Files with a known checksum are verified in every case."""
    downloads = Path(out_dir).parent / 'downloads' / name
    if not source:
        if not files:
            raise ValueError(f"{name} cannot be downloaded automatically. {how_to_get}\n"
                             f"Then run: python prepare.py {name} --source=PATH (a folder or archive)")
        print(f"downloading {name} into {downloads} (a re-run resumes where this one stopped)")
        for file_name, (url, checksum) in files.items():
            download(url, downloads / file_name, checksum)
        roots = [downloads]
    else:
        source = Path(source)
        if source.is_dir():
            roots = [source]
        elif source.is_file():
            roots = [extract(source, downloads / (source.name + '.d'))]
        else:
            raise FileNotFoundError(f"--source={source} does not exist")
        for file_name, (url, checksum) in (files or {}).items():
            found = [p for p in roots[0].rglob(file_name) if visible(p)]
            if found and checksum:
                verify(found[0], checksum)
    # unpack archives inside (HAM10000's image zips, ChestX-ray14's tarballs, an MSD task's tar), once
    done, todo, claimed = set(), True, set()
    while todo:
        todo = [p for r in roots for p in sorted(r.rglob('*')) if p.is_file() and is_archive(p)
                and visible(p) and p not in done]
        for p in todo:
            done.add(p)
            stem = p.name[:-len(next(s for s in ARCHIVE_SUFFIXES if p.name.lower().endswith(s)))]
            dest = downloads / 'unpacked' / stem
            marker = dest.with_name(stem + '.archive.json')
            owner = json.loads(marker.read_text()).get('archive') if marker.exists() else None
            if dest in claimed or owner not in (None, str(p.resolve())):  # two archives of one name: both kept
                dest = dest.with_name(f"{stem}-{hashlib.md5(str(p.resolve()).encode()).hexdigest()[:8]}")
            claimed.add(dest)
            unpacked = extract(p, dest)
            if not any(r == unpacked or r in unpacked.parents for r in roots):  # else a root covers it
                roots.append(unpacked)
    return roots


def find(roots, pattern, required=True):
    """The first file under roots whose name matches pattern (shell-style), or an error naming it."""
    for root in roots:
        for p in sorted(Path(root).rglob(pattern)):
            if p.is_file() and visible(p):
                return p
    if required:
        raise FileNotFoundError(f"no file named {pattern} under {', '.join(map(str, roots))}")
    return None


def files_under(root):
    """Every visible file under root, sorted, following symbolic links to folders (a class folder that
    is a link to another disk is common; Path.rglob skips them). A link back to a folder already being
    walked (a loop) or to one walked already is not followed again."""
    out, seen = [], {os.path.realpath(root)}
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in sorted(dirs) if os.path.realpath(os.path.join(folder, d)) not in seen]
        seen.update(os.path.realpath(os.path.join(folder, d)) for d in dirs)
        out += [Path(folder) / n for n in names]
    return sorted(p for p in out if p.is_file() and visible(p))


def index_files(roots, suffixes):
    """{file stem: path} of every visible file under roots ending in one of suffixes."""
    return {p.name[:len(p.name) - len(s)]: p for root in roots for p in sorted(Path(root).rglob('*'))
            if p.is_file() and visible(p) for s in suffixes if p.name.lower().endswith(s)}


def read_table(path):
    """Rows of a csv (or Dataverse's tab-separated .tab) file as dicts."""
    with open(path, newline='', encoding='utf-8-sig') as f:
        header = f.readline()
        f.seek(0)
        return list(csv.DictReader(f, delimiter='\t' if '\t' in header else ','))

# -----------------------------------------------------------------------------
# Splits, decoding and the skip report, shared by the real data sets


def split_by_group(groups, val_fraction, test_fraction, seed, strata=None):
    """Assign every item to 'train' / 'val' / 'test' so that no group (lesion, patient, subject) is in
    two splits. Groups are shuffled with the seed; with strata (e.g. the class of each item) the groups
    of each stratum are dealt out separately, so class proportions carry over to every split.
    Returns an array of split names, one per item."""
    groups = np.asarray(groups)
    unique = sorted(set(groups.tolist()))
    stratum = {}
    for g, s in zip(groups.tolist(), (strata if strata is not None else [0] * len(groups))):
        stratum.setdefault(g, s)  # a group's stratum is that of its first item
    rng = np.random.default_rng(seed)
    where = {}
    for s in sorted(set(stratum.values())):
        members = [unique[i] for i in rng.permutation(len(unique)) if stratum[unique[i]] == s]
        n_test, n_val = round(len(members) * test_fraction), round(len(members) * val_fraction)
        for k, g in enumerate(members):
            where[g] = 'test' if k < n_test else 'val' if k < n_test + n_val else 'train'
    out = np.array([where[g] for g in groups.tolist()], dtype=object)
    for split, fraction in (('train', 1), ('val', val_fraction), ('test', test_fraction)):
        if fraction > 0 and not (out == split).any():
            raise ValueError(f"the {split} split is empty: {len(unique)} groups are too few for "
                             f"val/test fractions {val_fraction}/{test_fraction}")
    return out


def default_workers(workers):
    """0 means: every core this process may use."""
    if workers:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def parallel_map(fn, jobs, workers):
    """fn over jobs in order, on `workers` processes (forked where possible: prepare.py is a plain script)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    ctx = mp.get_context('fork') if 'fork' in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(workers) as pool:
        yield from pool.imap(fn, jobs)


def to_uint8(a, lo, hi):
    """Map [lo, hi] linearly onto 0..255, clipping outside."""
    return np.round(np.clip((np.asarray(a, np.float32) - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def square_resize(im, size, resample=Image.BICUBIC):
    """Centre square crop, then resize to size x size. Pillow's resize filters widen their support when
    shrinking, so a 1024-px radiograph becomes 224 px without aliasing."""
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return im.resize((size, size), resample)


def picture_array(im, size, channels, lo_hi=None):
    """A decoded Pillow picture -> uint8 (size, size, channels). 16-bit / float pixels are stretched from
    lo_hi = (lo, hi), by default the picture's own min..max."""
    if im.mode.startswith('I') or im.mode == 'F':
        a = np.asarray(im, np.float32)
        lo, hi = lo_hi or (a.min(), a.max())
        im = Image.fromarray(to_uint8(a, lo, hi))
    a = np.asarray(square_resize(im.convert('RGB' if channels == 3 else 'L'), size), np.uint8)
    return a if a.ndim == 3 else a[..., None]


def load_picture(path, size, channels):
    """One photo or radiograph -> uint8 (size, size, channels). Raises if the file is damaged:
    load() decodes now, so a truncated JPEG fails here and not later."""
    with Image.open(path) as im:
        im.load()
        return picture_array(im, size, channels)


def load_mask(path, size):
    with Image.open(path) as im:
        return (np.asarray(square_resize(im.convert('L'), size, Image.NEAREST)) > 127).astype(np.uint8)


def decode_pictures(job):
    """Worker: [(i, path, mask_path)] -> [(i, image, mask, error)]. A file that does not decode is
    reported (error set), never fatal: one bad JPEG must not cost a 10,000-image conversion."""
    size, channels, items = job
    out = []
    for i, path, mask_path in items:
        try:
            out.append((i, load_picture(path, size, channels),
                        load_mask(mask_path, size) if mask_path else None, None))
        except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
            out.append((i, None, None, f"{type(e).__name__}: {e}"))
    return out


def convert_split(tmp, split, paths, decode, shape, skipped, workers=1, mask_paths=None, mask_max=1,
                  chunk=32, **arrays):
    """Decode paths (in parallel) into {split}_images.npy through a memory-mapped staging array, so
    memory stays bounded whatever the data set's size. Unreadable files are left out, with their rows
    of labels/groups/sites (given in **arrays), and listed in `skipped`.
    decode: worker (size-independent args in the job) returning [(i, image, mask, error)];
    shape: one image's shape, e.g. (224, 224, 3) or (64, 64, 64, 1)."""
    N = len(paths)
    if N == 0:
        raise ValueError(f"the {split} split is empty: too few inputs for the split fractions")
    partial = Path(tmp) / f'.{split}.partial'
    partial.mkdir()
    images = np.lib.format.open_memmap(partial / 'images.npy', 'w+', np.uint8, (N, *shape))
    masks = (np.lib.format.open_memmap(partial / 'masks.npy', 'w+', np.uint8, (N, *shape[:-1]))
             if mask_paths is not None else None)
    jobs = [(shape, [(i, paths[i], mask_paths[i] if mask_paths is not None else None)
                     for i in range(j, min(j + chunk, N))]) for j in range(0, N, chunk)]
    keep = []
    for results in tqdm(parallel_map(decode, jobs, workers), total=len(jobs), desc=f'  {split}',
                        unit='chunk', disable=None):
        for i, image, mask, error in results:
            if error:  # volume items are (channel paths, label, ...): name the first file
                item = paths[i]
                skipped.append({'file': str(item[0][0] if isinstance(item, tuple) else item), 'reason': error})
                continue
            images[len(keep)] = image  # kept images are packed to the front, in order
            if masks is not None:
                masks[len(keep)] = mask
            keep.append(i)
    if not keep:
        raise ValueError(f"no readable image in the {split} split ({N} files, all skipped: "
                         f"{skipped[-1]['reason'] if skipped else '?'})")
    n, keep = len(keep), np.array(keep)
    write_split(tmp, split, images[:n], masks=masks[:n] if masks is not None else None, mask_max=mask_max,
                **{k: np.asarray(v)[keep] for k, v in arrays.items() if v is not None})
    del images, masks
    shutil.rmtree(partial)
    return keep


def decode_2d(job):
    (size, _, channels), items = job
    return decode_pictures((size, channels, items))


def private_path(path):
    """What meta.json keeps of a path that may name a patient (clinical folders often do): a hash."""
    return 'sha256:' + hashlib.sha256(str(path).encode()).hexdigest()[:16] if path else ''


def report_skipped(skipped, private=False, title='skipped {n} unreadable input(s)', limit=20):
    """Print the inputs that were left out; returns what meta.json records about them (with
    private=True, for DICOM and clinical video, hashes of their paths: the console has the names).
    title says what they are: unreadable, or refused by a policy (DICOM's burned-in text).
    limit: how many to print (None: all, where no meta.json keeps the list)."""
    if skipped:
        print(title.format(n=len(skipped)) + ':')
        for s in skipped[:limit]:
            print(f"  {s['file']}: {s['reason']}")
        if limit is not None and len(skipped) > limit:
            print(f"  ... and {len(skipped) - limit} more (all listed in meta.json{', as path hashes' if private else ''})")
    files = [dict(file=private_path(s['file']), reason=private_reason(s['reason'], s['file'])) for s in skipped[:10000]] \
        if private else skipped[:10000]
    return {'count': len(skipped), 'files': files}


def private_reason(reason, path):
    """A skip reason without the path's names: error messages quote file paths (docs/reliability.md)."""
    reason = re.sub(r"""[^\s'"]*[/\\][^\s'"]*""", '<path>', reason)
    for part in sorted((p for p in Path(path).parts if len(p) > 2), key=len, reverse=True):
        reason = reason.replace(part, '<name>')
    return reason


def finish(out_dir, t0):
    meta = json.loads((Path(out_dir) / 'meta.json').read_text())
    print(f"done: train/val/test = {'/'.join(str(meta['counts'][s]) for s in SPLITS)}, "
          f"{disk_size(out_dir) / 1e6:.0f} MB in {out_dir}, {time.time() - t0:.1f} s")
    if meta.get('channels') == 1 and meta.get('spatial_dims', 2) == 2:
        size = meta['image_size'][0]  # grey 2-D images: the recipe that beat random init on real MRI
        patch = max((d for d in range(1, 17) if size % d == 0 and size // d >= 7), default=1)  # a grid >= 7
        sizes = '' if size == 64 else f' --image_size={size} --patch_size={patch}'
        print(f"next: python medjepa.py config/brainlobes.py --data_dir={out_dir} --out_dir=out-{Path(out_dir).name}"
              f"{sizes}   (grey images: the views recipe measured on real MRI, docs/results.md)")
    return Path(out_dir)


def announce(name):
    """Print where a data set comes from, its licence and how to cite it (SOURCES below)."""
    info = SOURCES[name]
    print(f"{name}: {info['source']}\n  licence: {info['licence']}\n  cite: {info['citation']}")
    return info

# -----------------------------------------------------------------------------
# demo: synthetic dermoscopy where the class is in the texture and nothing else


DEMO_CLASSES = ['smooth', 'irregular_border', 'globules', 'radial_streaks',
                'reticular_network', 'target_rings', 'vascular_dots']
DEMO_VERSION = 3        # bump whenever the pictures change: old folders are then refused, not reused
IMAGES_PER_LESION = 3   # photos per lesion; the splits are made of whole lesions

# palettes in display (gamma-encoded) RGB; rendering mixes light linearly, so we decode with **2.2
SKIN_LIGHT, SKIN_DARK = np.array([0.96, 0.80, 0.72]), np.array([0.45, 0.30, 0.22])
PIGMENT_BROWN, PIGMENT_BLUEGREY = np.array([0.30, 0.16, 0.08]), np.array([0.32, 0.33, 0.42])
BLOOD = np.array([0.80, 0.12, 0.18])
HAIR = np.array([0.10, 0.07, 0.05])
# two hospitals' cameras: a 3x3 colour response and a gamma; applied last, like a sensor would
SITE_MATRIX = [np.eye(3), np.array([[0.92, 0.10, 0.00], [0.03, 0.95, 0.05], [0.00, 0.12, 0.98]])]
SITE_GAMMA = [2.2, 1.7]


def smoothstep(a, b, x):
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def border_radius(lesion, theta):
    """Lesion radius (64-px units) in direction theta: an ellipse times 1 + sum_k a_k cos(k theta + p_k).
    Every class gets gentle low harmonics; only 'irregular_border' gets strong high ones."""
    a = math.sqrt(lesion['aspect'])
    ellipse = 1.0 / np.sqrt((np.cos(theta) / a)**2 + (np.sin(theta) * a)**2)
    k, amp, phase = lesion['harm_k'], lesion['harm_amp'], lesion['harm_phase']
    wiggle = 1.0 + (amp * np.cos(k * theta[..., None] + phase)).sum(-1)
    return lesion['radius_scale'] * ellipse * np.maximum(wiggle, 0.3)


def sample_lesion(seed, lesion_id, label):
    """Everything that stays fixed across the photos of one lesion: class, shape, texture layout,
    colours, hospital. Lengths are in pixels of a 64-px image at zoom 1 ("64-px units").
    Size, darkness, colour and site are drawn the same way whatever the class."""
    rng = np.random.default_rng([seed, lesion_id])
    L = {'label': label, 'site': int(rng.integers(2)), 'r0': rng.uniform(16, 25),
         'aspect': rng.uniform(1.0, 1.35), 'radius_scale': 1.0}
    k = np.arange(2, 21)
    amp = np.where(k <= 4, rng.uniform(0, 0.05, k.size), 0.0)
    if label == 1:  # lobulated + jagged: strong harmonics 5-11, weaker 12-20
        amp = amp + np.where((k >= 5) & (k <= 11), rng.uniform(0.03, 0.09, k.size), 0.0)
        amp = amp + np.where(k >= 12, rng.uniform(0.0, 0.03, k.size), 0.0)
    L.update(harm_k=k, harm_amp=amp, harm_phase=rng.uniform(0, 2 * np.pi, k.size))
    # rescale so that the area is pi r0^2 for every class: a jagged border must not mean a bigger lesion
    theta = np.linspace(0, 2 * np.pi, 1024, endpoint=False)
    L['radius_scale'] = L['r0'] / np.sqrt(np.mean(border_radius(L, theta)**2))
    # tabulate once: per-pixel harmonics would cost (H, W, 19) cosines for every photo
    L['radius_table'] = border_radius(L, theta)

    tone = rng.random()**1.3
    skin = (1 - tone) * SKIN_LIGHT + tone * SKIN_DARK
    L['skin'] = np.clip(skin * rng.uniform(0.95, 1.05, 3), 0, 1)**2.2
    blue = rng.uniform(0, 0.6)  # deeper pigment looks blue-grey
    pigment = (1 - blue) * PIGMENT_BROWN + blue * PIGMENT_BLUEGREY
    L['pigment'] = np.clip(pigment * rng.uniform(0.7, 1.3), 0, 1)**2.2
    L['blood'] = BLOOD**2.2
    L['density'] = rng.uniform(0.4, 0.8)     # mean pigment density = how dark the lesion is
    L['fade'] = rng.uniform(0.0, 0.3)        # lighter towards the border
    L['edge'] = rng.uniform(0.4, 1.2)        # border softness
    L['contrast'] = rng.uniform(0.3, 0.42)  # std of the texture, in density units
    # a few soft blotches, in every class, so that "any variation at all" is not a texture cue
    L['blotch_xy'] = rng.uniform(-0.6, 0.6, (4, 2)) * L['r0']
    L['blotch_sigma'] = rng.uniform(0.35, 0.7, 4) * L['r0']
    L['blotch_w'] = rng.normal(0, 1, 4)

    if label in (2, 6):  # dots on a jittered grid: evenly spread, like real globules / vessels
        spacing = rng.uniform(4.0, 5.5) if label == 2 else rng.uniform(3.2, 4.2)
        n = int(np.ceil(2.6 * L['r0'] / spacing)) + 1
        gx, gy = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1))
        xy = np.stack([gx.ravel(), gy.ravel()], 1) * spacing
        xy = xy + rng.uniform(-0.3, 0.3, xy.shape) * spacing + rng.uniform(0, spacing, 2)
        angle = rng.uniform(0, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        xy = xy @ np.array([[c, s], [-s, c]])
        keep = rng.random(len(xy)) < 0.75  # drop some at random so that no regular lattice shows
        inside = np.hypot(*xy.T) < 0.8 * border_radius(L, np.arctan2(xy[:, 1], xy[:, 0]))
        L['dots'] = xy[keep & inside]
        dot_sigma = rng.uniform(0.7, 1.1) if label == 2 else rng.uniform(0.55, 0.75)
        L['dot_sigma'] = dot_sigma * rng.uniform(0.8, 1.25, len(L['dots']))
    elif label == 3:  # ~20 streaks around the rim, slightly wavy and twisted
        L['n_streaks'] = int(round(2 * np.pi * L['r0'] / rng.uniform(3.5, 5.0)))
        L['streak_phase'] = rng.uniform(0, 2 * np.pi)
        L['streak_wobble'] = rng.uniform(0, 0.4, 3) / np.arange(1, 4)
        L['streak_wobble_phase'] = rng.uniform(0, 2 * np.pi, 3)
        L['streak_twist'] = rng.uniform(-1.0, 1.0)
        L['streak_start'] = rng.uniform(0.45, 0.6)
    elif label == 4:  # a mesh of thin lines, gently warped so it reads as a network, not a grid
        L['net_angle'] = rng.uniform(0, np.pi)
        L['net_spacing'] = rng.uniform(4.0, 5.5)
        L['net_width'] = rng.uniform(0.45, 0.65)
        L['net_warp_k'] = rng.normal(0, 1, (3, 2)) * (2 * np.pi / rng.uniform(10, 25, (3, 1)))
        L['net_warp_amp'] = rng.uniform(0.4, 1.0, (3, 2))
        L['net_warp_phase'] = rng.uniform(0, 2 * np.pi, (3, 2))
    elif label == 5:  # concentric rings that follow the border
        L['ring_spacing'] = rng.uniform(4.5, 6.5)
        L['ring_phase'] = rng.uniform(0, 2 * np.pi)
    return L


def lesion_texture(L, lx, ly, rn, theta, mask):
    """The class signal. Returns (pigment, blood): raw fields over the pixels; render_image makes
    each zero-mean inside the lesion, so texture moves pixels around the lesion's base colour
    without changing its average: mean colour and darkness carry no class information."""
    d2 = lambda xy: (lx[..., None] - xy[:, 0])**2 + (ly[..., None] - xy[:, 1])**2  # (H, W, n)
    blotches = (L['blotch_w'] * np.exp(-d2(L['blotch_xy']) / (2 * L['blotch_sigma']**2))).sum(-1)
    label = L['label']
    if label in (2, 6):
        tex = np.exp(-d2(L['dots']) / (2 * L['dot_sigma']**2)).sum(-1) if len(L['dots']) else 0 * lx
        if label == 6:  # vessels are red, not brown: a separate colour direction
            return blotches, tex
    elif label == 3:
        k = np.arange(1, 4)
        wobble = (L['streak_wobble'] * np.sin(k * theta[..., None] + L['streak_wobble_phase'])).sum(-1)
        angle = L['n_streaks'] * (theta + wobble + L['streak_twist'] * rn) + L['streak_phase']
        tex = ((1 + np.cos(angle)) / 2)**4 * smoothstep(L['streak_start'], L['streak_start'] + 0.25, rn)
    elif label == 4:
        c, s = np.cos(L['net_angle']), np.sin(L['net_angle'])
        uv = np.stack([c * lx + s * ly, -s * lx + c * ly], -1)  # (H, W, 2)
        k, amp, ph = L['net_warp_k'], L['net_warp_amp'], L['net_warp_phase']
        uv = uv + (amp * np.sin((lx[..., None, None] * k[:, 0, None] + ly[..., None, None] * k[:, 1, None])
                                + ph)).sum(-2)
        dist = (uv / L['net_spacing'] - np.round(uv / L['net_spacing'])) * L['net_spacing']
        lines = np.exp(-dist**2 / (2 * L['net_width']**2)).max(-1)
        tex = lines * (1 - smoothstep(0.7, 1.0, rn))  # networks thin out towards the border
    elif label == 5:
        rings = (1 + np.cos(2 * np.pi * rn * L['r0'] / L['ring_spacing'] + L['ring_phase'])) / 2
        tex = rings**2
    else:  # 0 and 1: structureless, only the blotches
        return blotches, None
    return standardise(tex, mask) + 0.3 * standardise(blotches, mask), None


def standardise(x, mask=None):
    """Zero mean, unit std (inside mask if given)."""
    v = x[mask] if mask is not None else x
    return (x - v.mean()) / (v.std() + 1e-8)


def gaussian_blur(x, sigma):
    """Separable Gaussian blur over the first two axes of (H, W) or (H, W, C)."""
    if sigma < 0.1:
        return x
    r = int(math.ceil(3 * sigma))
    k = np.exp(-np.arange(-r, r + 1)**2 / (2 * sigma**2))
    k /= k.sum()
    H, W = x.shape[:2]
    pad = [(r, r), (0, 0)] + [(0, 0)] * (x.ndim - 2)
    xp = np.pad(x, pad, mode='reflect')
    x = sum(k[i] * xp[i:i + H] for i in range(2 * r + 1))
    xp = np.pad(x, [pad[1], pad[0]] + pad[2:], mode='reflect')
    return sum(k[i] * xp[:, i:i + W] for i in range(2 * r + 1))


def hair_alpha(rng, size):
    """0-5 dark curved hairs: opacity (H, W) in [0, 1]. Points along quadratic Bezier curves are
    splatted bilinearly and blurred, far cheaper than a distance to every segment."""
    n_hairs = 0 if rng.random() < 0.5 else int(rng.integers(1, 6))
    sigma = rng.uniform(0.35, 0.7) * size / 64  # half-thickness in pixels
    density = np.zeros(size * size)
    for _ in range(n_hairs):
        # draw in fractions of the image so the same hairs appear at every --size
        p0 = rng.uniform(-0.1, 1.1, 2)
        angle, length, bend = rng.uniform(0, 2 * np.pi), rng.uniform(0.4, 1.2), rng.normal(0, 0.2)
        darkness = rng.uniform(1.0, 2.5)  # peak optical density of this hair
        direction = np.array([np.cos(angle), np.sin(angle)])
        p2 = p0 + length * direction
        p1 = (p0 + p2) / 2 + bend * length * np.array([-direction[1], direction[0]])
        t = np.linspace(0, 1, int(3 * length * size) + 2)[:, None]  # 3 points per pixel
        xy = ((1 - t)**2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2) * size - 0.5
        # after the unit-sum blur a line of weight w per point peaks at 3 w / (sqrt(2 pi) sigma)
        w = darkness * math.sqrt(2 * np.pi) * sigma / 3
        x0, y0 = np.floor(xy[:, 0]).astype(int), np.floor(xy[:, 1]).astype(int)
        fx, fy = xy[:, 0] - x0, xy[:, 1] - y0
        for dx, dy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                           (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            x, y = x0 + dx, y0 + dy
            ok = (x >= 0) & (x < size) & (y >= 0) & (y < size)
            density += np.bincount(y[ok] * size + x[ok], wt[ok] * w, minlength=size * size)
    return 1 - np.exp(-gaussian_blur(density.reshape(size, size), sigma))


def render_image(L, rng, size, record=None):
    """One photo of lesion L: a fresh pose, light, camera blur, noise and hair. Returns (image uint8
    (H, W, 3), mask uint8 (H, W)). Random draws do not depend on size, so --size changes only the
    resolution of the very same pictures. record: a dict that receives the photo's nuisance draws
    (docs/nuisances.py asks which of them an encoder's features encode)."""
    record = {} if record is None else record
    scale = size / 64
    zoom, rot, flip = rng.uniform(0.9, 1.1), rng.uniform(0, 2 * np.pi), rng.choice([-1.0, 1.0])
    cx, cy = rng.uniform(0.32, 0.68, 2) * size
    record.update(zoom=zoom, flip=flip, centre_x=cx / size, centre_y=cy / size)
    # pixel centres -> lesion frame (64-px units): undo the translation, rotation, mirror and zoom
    y, x = np.mgrid[0:size, 0:size] + 0.5
    c, s = np.cos(rot), np.sin(rot)
    lx = (c * (x - cx) + s * (y - cy)) / (zoom * scale)
    ly = flip * (-s * (x - cx) + c * (y - cy)) / (zoom * scale)
    r, theta = np.hypot(lx, ly), np.arctan2(ly, lx)
    R = np.interp(theta, np.linspace(0, 2 * np.pi, 1024, endpoint=False), L['radius_table'],
                  period=2 * np.pi)  # = border_radius(L, theta), tabulated
    rn = r / R                                         # 0 at the centre, 1 on the border
    mask = r < R
    alpha = 1 / (1 + np.exp(-np.clip((R - r) / L['edge'], -30, 30)))  # soft border

    # texture around the base colour: zero mean inside the lesion, std = L['contrast']
    pigment, blood = lesion_texture(L, lx, ly, rn, theta, mask)
    density = L['density'] * (1 - L['fade'] * rn**2) + L['contrast'] * standardise(pigment, mask)
    density = alpha * np.clip(density, 0, 1)
    img = L['skin'] + density[..., None] * (L['pigment'] - L['skin'])  # (H, W, 3), linear light
    if blood is not None:  # red dots: move along the red direction, again zero mean in the lesion
        lesion_colour = L['skin'] + L['density'] * (L['pigment'] - L['skin'])
        red = np.clip(L['contrast'] * standardise(blood, mask), -0.2, 1.0)
        img = img + (alpha * red)[..., None] * (L['blood'] - lesion_colour)

    # nuisances, in the order light meets them: hair on the skin, uneven light, the dermoscope's
    # dark corners, lens blur, then the hospital's camera response, sensor noise, 8-bit quantisation
    a = hair_alpha(rng, size)[..., None]
    img = img * (1 - a) + a * (HAIR**2.2 * rng.uniform(0.5, 2.0))
    gx, gy = rng.normal(0, 0.15, 2)
    exposure = rng.uniform(0.8, 1.15)
    light = exposure * (1 + gx * (x / size - 0.5) * 2 + gy * (y / size - 0.5) * 2)
    rr = np.hypot(x - size / 2, y - size / 2) / (size / 2)
    strong = rng.random() < 0.5
    v, r_in = (rng.uniform(0.7, 1.0), rng.uniform(0.95, 1.25)) if strong else \
              (rng.uniform(0.0, 0.4), rng.uniform(0.6, 1.0))
    vignette = v * smoothstep(r_in, r_in + 0.35, rr)  # darkening of the dermoscope's corners
    img = img * (np.clip(light, 0.3, None) * (1 - vignette))[..., None]
    blur = rng.uniform(0.0, 0.6)
    img = gaussian_blur(img, blur * scale)
    img = np.clip(img @ SITE_MATRIX[L['site']].T * rng.uniform(0.96, 1.04, 3), 0, 1)
    img = img**(1 / SITE_GAMMA[L['site']])
    noise = rng.uniform(0.005, 0.02)
    img = img + rng.normal(0, noise, img.shape)
    record.update(hair=float(a.mean()), light_x=gx, light_y=gy, exposure=exposure, vignette=float(vignette.mean()),
                  blur=blur, noise=noise)
    img = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return img, mask.astype(np.uint8)


def render_lesions(job):
    """Worker: render IMAGES_PER_LESION photos of each (lesion_id, label) in job. Each lesion and each
    photo has its own seed derived from (seed, lesion_id, k), so the result is the same whatever the
    number of workers or the chunking."""
    seed, size, lesions = job
    images = np.empty((len(lesions) * IMAGES_PER_LESION, size, size, 3), np.uint8)
    masks = np.empty((len(lesions) * IMAGES_PER_LESION, size, size), np.uint8)
    sites = np.empty(len(lesions) * IMAGES_PER_LESION, np.int64)
    i = 0
    for lesion_id, label in lesions:
        L = sample_lesion(seed, lesion_id, label)
        for k in range(IMAGES_PER_LESION):
            images[i], masks[i] = render_image(L, np.random.default_rng([seed, lesion_id, k]), size)
            sites[i] = L['site']
            i += 1
    return images, masks, sites


def prepare_demo(out_dir='data/demo', size: int = 64, seed: int = 0, n_train: int = 6000,
                 n_val: int = 1000, n_test: int = 2000, workers: int | None = None):
    """
    Synthetic dermoscopy: 7 lesion classes that differ ONLY in border shape or inner texture.

    Why it needs learning. Lesion size, position, darkness, colour, skin tone and hospital are drawn
    independently of the class, and each texture is made zero-mean inside the lesion, so the
    average colour of a lesion says nothing about its class (a logistic regression on global colour
    statistics, lesion area and centroid stays near chance). The class is in 1.5-5 px structures:
    dark globules, rim streaks, a line network, rings, red dots, or a jagged border. On top sit the
    nuisances a real encoder must see through: pose, zoom, mirror, blur, noise, uneven light,
    dermoscope vignetting, hair, and two hospitals whose cameras render colour differently.

    Why groups. Each lesion is photographed IMAGES_PER_LESION times (same lesion, fresh pose, light,
    hair and noise). Splitting photos at random would put near-copies of a test lesion in train; the
    HAM10000 lesson. So lesions are split, and the groups arrays hold the lesion ids.

    Counts are whole lesions: round(n / 3) lesions per split, so 6000/1000/2000 -> 6000/999/2001.
    Classes are balanced within each split. Returns out_dir.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    args = {'size': size, 'seed': seed, 'n_train': n_train, 'n_val': n_val, 'n_test': n_test,
            'generator_version': DEMO_VERSION}
    if size < 16:
        raise ValueError(f"--size must be at least 16 (got {size}): the textures need the pixels")
    n_lesions = {s: round(n / IMAGES_PER_LESION) for s, n in zip(SPLITS, (n_train, n_val, n_test))}
    if n_lesions['train'] < len(DEMO_CLASSES) or min(n_lesions.values()) < 1:
        raise ValueError(f"need n_train >= {IMAGES_PER_LESION * len(DEMO_CLASSES)} (every class in "
                         f"train) and n_val, n_test >= {IMAGES_PER_LESION} (one lesion); got "
                         f"{n_train}/{n_val}/{n_test}")
    if is_up_to_date(out_dir, args):
        return out_dir
    if not workers:  # the cores this process may use (can be fewer than the machine has)
        workers = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    print(f"generating demo data: {size} px, seed {seed}, {workers} worker(s) -> {out_dir}")

    # the master seed fixes which lesion gets which class and where each photo lands in its split;
    # the pictures themselves come from per-lesion seeds (see render_lesions)
    rng = np.random.default_rng(seed)
    plan, next_id = {}, 0
    for split in SPLITS:
        n = n_lesions[split]
        labels = rng.permutation(np.arange(n) % len(DEMO_CLASSES))  # balanced within each split
        ids = np.arange(next_id, next_id + n)
        next_id += n
        plan[split] = (ids, labels, rng.permutation(n * IMAGES_PER_LESION))
    with staging_dir(out_dir) as tmp:
        for split in SPLITS:
            ids, labels, dest = plan[split]
            N = len(ids) * IMAGES_PER_LESION
            images = np.empty((N, size, size, 3), np.uint8)
            masks = np.empty((N, size, size), np.uint8)
            sites = np.empty(N, np.int64)
            chunk = 16  # lesions per job: small enough to keep both cores busy to the end
            jobs = [(seed, size, list(zip(ids[i:i + chunk].tolist(), labels[i:i + chunk].tolist())))
                    for i in range(0, len(ids), chunk)]
            print(f"  {split:5s}: {N:6d} images of {len(ids)} lesions ...", end='', flush=True)
            t_split = time.time()
            results = parallel_map(render_lesions, jobs, workers)  # in order, whatever the workers
            start = 0
            for im, ma, si in results:  # photo k of the split (lesion-major order) goes to dest[k]
                where = dest[start:start + len(im)]
                images[where], masks[where], sites[where] = im, ma, si
                start += len(im)
            write_split(tmp, split, images=images,
                        labels=np.repeat(labels, IMAGES_PER_LESION)[np.argsort(dest)],
                        masks=masks, groups=np.repeat(ids, IMAGES_PER_LESION)[np.argsort(dest)],
                        sites=sites)
            print(f" {time.time() - t_split:.1f} s")
        write_meta(tmp, 'demo', DEMO_CLASSES,
                   split_rule=f"grouped by lesion_id: the {IMAGES_PER_LESION} photos of a lesion "
                              f"are in one split; classes balanced within each split",
                   source="synthetic, generated by prepare.py demo",
                   licence="CC0-1.0 (generated data, no rights reserved)", citation=None,
                   seed=seed, generator_version=DEMO_VERSION, images_per_lesion=IMAGES_PER_LESION,
                   args=args)
    print(f"done: train/val/test = {n_lesions['train'] * IMAGES_PER_LESION}/"
          f"{n_lesions['val'] * IMAGES_PER_LESION}/{n_lesions['test'] * IMAGES_PER_LESION} images, "
          f"{disk_size(out_dir) / 1e6:.0f} MB on disk in {out_dir}, {time.time() - t0:.1f} s")
    return out_dir

# -----------------------------------------------------------------------------
# demo3d: synthetic abdominal CT-like volumes with labelled organs, for medjepa3d.py


DEMO3D_LABELS = ['background', 'liver', 'kidney', 'spine']  # mask values 0..3
DEMO3D_CLASSES = ['straight spine', 'C-shaped scoliosis', 'S-shaped scoliosis']  # volume label: the spine's course
DEMO3D_VERSION = 2       # bump whenever the volumes change (1: the label was a liver lesion of a few voxels)
SCANS_PER_SUBJECT = 2    # two scans of each subject (fresh pose, noise, bias field); splits by subject
SPINE_CURVE = 0.25       # the spine's largest sideways shift in a curved class, in units of the half-width


def demo3d_subject(rng, label):
    """One subject's anatomy: (name, centre (z, y, x), radii, in-plane angle, intensity, wobble) per organ,
    the spine (centre, radius, intensity, vertebrae, curve), the trunk. The label is the spine's course:
    straight, one bend (C) or two (S); its sideways shift, a function of the height z, is what the three
    classes differ in, so the class is a matter of arrangement that the rest of the column predicts,
    not of intensity."""
    u = rng.uniform
    wobble = lambda: (u(0.05, 0.2), rng.normal(0, 3, (3, 3)), u(0, 2 * np.pi, 3))  # amplitude, frequencies, phases
    liver_c, liver_r = np.array([u(-0.1, 0.2), u(-0.2, 0.0), u(-0.4, -0.25)]), np.array([0.65, 0.5, 0.48]) * u(0.85, 1.15, 3)
    organs = [('liver', liver_c, liver_r, u(-0.4, 0.4), u(0.48, 0.62), wobble())]
    kz, ky, kr = u(-0.35, -0.05), u(0.2, 0.35), np.array([0.36, 0.2, 0.17]) * u(0.85, 1.15, 3)
    for side in (-1, 1):
        organs.append(('kidney', np.array([kz + u(-0.05, 0.05), ky, side * u(0.38, 0.5)]), kr * u(0.9, 1.1, 3),
                       side * u(0.2, 0.5), u(0.66, 0.78), wobble()))
    spine = (np.array([0, u(0.45, 0.55), u(-0.04, 0.04)]), u(0.12, 0.16), u(0.88, 0.98), u(6, 9))
    body = (u(0.8, 0.92), u(0.6, 0.72), u(0.3, 0.4))  # x and y radii of the trunk, soft-tissue intensity
    curve = (label, u(0.8, 1.2) * SPINE_CURVE * rng.choice([-1, 1]), u(-0.3, 0.3))  # class, signed amplitude, phase
    return organs, (*spine, curve), body


def spine_shift(z, curve):
    """Sideways (x) shift of the spine's centre at height z in [-1, 1]: 0, a * cos(pi (z + phase) / 2)
    (one bend) or a * sin(pi (z + phase)) (two bends, opposite ways)."""
    label, a, phase = curve
    if label == 0:
        return 0 * z
    return a * (np.cos(np.pi * (z + phase) / 2) if label == 1 else np.sin(np.pi * (z + phase)))


def render_demo3d(subject, rng, size):
    """One scan of a subject -> (uint8 (S, S, S, 1) volume, uint8 (S, S, S) label map). Axes (z, y, x)."""
    organs, spine, body = subject
    u = rng.uniform
    ang, shift = u(-0.15, 0.15), rng.uniform(-0.08, 0.08, 3)  # pose of this scan
    g = (np.arange(size) + 0.5) / size * 2 - 1
    z, y, x = np.meshgrid(g, g, g, indexing='ij')
    ca, sa = np.cos(ang), np.sin(ang)
    z, y, x = z - shift[0], ca * (y - shift[1]) - sa * (x - shift[2]), sa * (y - shift[1]) + ca * (x - shift[2])
    soft = lambda f: 1 / (1 + np.exp(np.clip(f / 0.06, -50, 50)))  # partial-volume edge, f < 0 inside
    image = 0.03 + np.zeros_like(x)  # air
    labels = np.zeros(x.shape, np.uint8)
    def paint(f, value, label):
        nonlocal image
        a = soft(f)
        image = image * (1 - a) + value * a
        if label:
            labels[f < 0] = label
    paint((x / body[0]) ** 2 + (y / body[1]) ** 2 - 1, body[2], 0)
    for name, c, r, theta, value, (amp, freq, phase) in organs:
        dz, dy, dx = z - c[0], y - c[1], x - c[2]
        ct, st = np.cos(theta), np.sin(theta)
        q = np.stack([dz / r[0], (ct * dy - st * dx) / r[1], (st * dy + ct * dx) / r[2]])
        bumps = sum(np.sin(np.tensordot(freq[i], q, 1) + phase[i]) for i in range(3)) / 3
        paint((q ** 2).sum(0) - 1 + amp * bumps, value, DEMO3D_LABELS.index(name))
    (sc, sr, sv, sf, curve) = spine  # a column along z whose radius swells at every vertebra, bent sideways
    paint(((y - sc[1]) ** 2 + (x - sc[2] - spine_shift(z, curve)) ** 2) / (sr * (1 + 0.25 * np.cos(sf * np.pi * z))) ** 2 - 1,
          sv, DEMO3D_LABELS.index('spine'))
    # the scanner: a smooth multiplicative bias field, gain and offset, noise
    coef = rng.normal(0, 0.12, 4)
    image = image * np.exp(coef[0] * z + coef[1] * y + coef[2] * x + coef[3] * (x * x + y * y)) * u(0.9, 1.1) + u(-0.03, 0.03)
    image = image + rng.normal(0, u(0.02, 0.06), image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)[..., None], labels


def write_subjects(tmp, seed, n_subjects, per_subject, shape, classes, mask_labels, make_subject, render, what):
    """The synthetic 3-D demos' splits: subjects with classes balanced in each split, `per_subject`
    renders of each (volumes or clips with masks) from the subject's own generator [seed, id], so a
    subject does not depend on the others; shuffled so that a subject's renders are not neighbours."""
    rng, next_id = np.random.default_rng(seed), 0
    for split in SPLITS:
        n = n_subjects[split]
        ids = np.arange(next_id, next_id + n)
        next_id += n
        labels = rng.permutation(np.arange(n) % len(classes))
        images = np.empty((n * per_subject, *shape, 1), np.uint8)
        masks = np.empty((n * per_subject, *shape), np.uint8)
        for k, (i, label) in enumerate(zip(ids, labels)):
            sub_rng = np.random.default_rng([seed, int(i)])
            subject = make_subject(sub_rng, label)
            for j in range(per_subject):
                images[k * per_subject + j], masks[k * per_subject + j] = render(subject, sub_rng)
        order = rng.permutation(len(images))
        write_split(tmp, split, images=images[order], labels=np.repeat(labels, per_subject)[order],
                    masks=masks[order], groups=np.repeat(ids, per_subject)[order], mask_max=len(mask_labels) - 1)
        print(f"  {split:5s}: {len(images)} {what} of {n} subjects")


def prepare_demo3d(out_dir='data/demo3d', size: int = 32, seed: int = 0, n_train: int = 600,
                   n_val: int = 100, n_test: int = 200):
    """
    Synthetic abdominal CT-like volumes for the 3-D model, size^3 voxels, deterministic from the seed.

    Each subject has a trunk, a liver, two kidneys and a spine, with their own shape (ellipsoids with
    random radii, in-plane rotation and a low-frequency surface wobble), position and intensity; in
    a third of the subjects the spine runs straight, in a third it bends once to one side (C-shaped
    scoliosis), in a third twice (S-shaped), by up to about a quarter of the trunk's half-width.
    Every subject is scanned SCANS_PER_SUBJECT times, each with a fresh pose, gain, multiplicative
    bias field and noise. Voxel labels: 0 background, 1 liver, 2 kidney, 3 spine (masks); volume
    label: straight / C-shaped / S-shaped (labels, balanced in each split). Splits are by subject (groups).
    The 600 / 100 / 200 default takes about 10 s and 59 MB (volumes and masks).
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    args = {'size': size, 'seed': seed, 'n_train': n_train, 'n_val': n_val, 'n_test': n_test,
            'generator_version': DEMO3D_VERSION}
    n_subjects = {s: round(n / SCANS_PER_SUBJECT) for s, n in zip(SPLITS, (n_train, n_val, n_test))}
    if size < 16 or min(n_subjects.values()) < 1:
        raise ValueError(f"need --size >= 16 and at least {SCANS_PER_SUBJECT} volumes per split, got size {size}, "
                         f"{n_train}/{n_val}/{n_test}")
    if is_up_to_date(out_dir, args):
        return out_dir
    print(f"generating demo3d volumes: {size}^3 voxels, seed {seed} -> {out_dir}")
    with staging_dir(out_dir) as tmp:
        write_subjects(tmp, seed, n_subjects, SCANS_PER_SUBJECT, (size,) * 3, DEMO3D_CLASSES, DEMO3D_LABELS,
                       demo3d_subject, lambda subject, rng: render_demo3d(subject, rng, size), 'volumes')
        write_meta(tmp, 'demo3d', DEMO3D_CLASSES,
                   split_rule=f"by subject: the {SCANS_PER_SUBJECT} scans of a subject are in one split; "
                              f"classes balanced within each split",
                   source="synthetic, generated by prepare.py demo3d",
                   licence="CC0-1.0 (generated data, no rights reserved)", citation=None, args=args,
                   mask_labels=DEMO3D_LABELS, mask_classes=DEMO3D_LABELS, seed=seed,
                   generator_version=DEMO3D_VERSION, scans_per_subject=SCANS_PER_SUBJECT,
                   axes='(N, D, H, W, C) = (volume, z, y, x, channel), synthetic isotropic voxels')
    return finish(out_dir, t0)

# -----------------------------------------------------------------------------
# demovideo: synthetic echocardiography-like clips whose class is in the motion, for medjepa3d.py


DEMOVIDEO_CLASSES = ['normal', 'hypokinetic', 'irregular', 'fast']  # clip label: how the chamber beats
DEMOVIDEO_LABELS = ['background', 'chamber', 'wall']  # mask values 0..2, one label map per frame
DEMOVIDEO_VERSION = 1   # bump whenever the clips change
CLIPS_PER_SUBJECT = 2   # two acquisitions of each subject (fresh probe pose, gain, speckle, start in the beat)


def demovideo_subject(rng, label):
    """One subject's heart (chamber size, shape, wall, echogenicity, tissue texture) and beat. Only the
    beat depends on the class: normal and irregular lose 22-35 % of the chamber radius in systole,
    hypokinetic 5-12 %; the period is 9-14 frames, 4.5-6.5 for fast, and irregular beats last
    anywhere from 0.5 to 1.6 times it (regular ones within 3 %)."""
    u = rng.uniform
    heart = dict(r=u(0.13, 0.2), aspect=u(0.7, 1.0), tilt=u(-0.6, 0.6), wall=u(0.06, 0.09),
                 blood=u(0.03, 0.1), muscle=u(0.55, 0.8), tissue=u(0.25, 0.4),
                 texture=[rng.normal(0, 1, (2, 2)), u(0, 2 * np.pi, (2, 2)), u(2, 6, (2, 2))])
    amp = u(0.05, 0.12) if label == 1 else u(0.22, 0.35)
    period = u(4.5, 6.5) if label == 3 else u(9, 14)
    spread = (0.5, 1.6) if label == 2 else (0.97, 1.03)
    return heart, amp, period, spread


def render_demovideo(subject, rng, frames, size):
    """One clip of a subject -> (uint8 (T, S, S, 1) frames, uint8 (T, S, S) label maps). A fan-shaped
    sector from a probe at the top, speckle (70 % a fixed pattern, 30 % renewed every frame), depth
    attenuation, gain and log compression; the chamber (dark blood) and its wall (bright muscle of
    constant area, so it thickens as the chamber shrinks) change with the beat."""
    heart, amp, period, spread = subject
    u = rng.uniform
    # the beat: a systole (first 40 % of each beat) of sin^2 contraction, started at a random phase
    lengths = period * u(*spread, size=frames + 2)
    edges = np.concatenate([[0], np.cumsum(lengths)]) - u(0, lengths[0])
    t = np.arange(frames)
    k = np.searchsorted(edges, t, side='right') - 1
    frac = (t - edges[k]) / lengths[k]
    contraction = np.where(frac < 0.4, np.sin(np.pi * frac / 0.4) ** 2, 0.0)
    r_in = heart['r'] * (1 - amp * contraction)  # (T,)
    r_out = np.sqrt(r_in ** 2 + (heart['r'] + heart['wall']) ** 2 - heart['r'] ** 2)
    # geometry: y = depth 0..1 from the top, x = -0.5..0.5; the probe's apex, tilt and fan this time
    g = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(g, g - 0.5, indexing='ij')
    y0, x0, tilt, half, depth = u(-0.03, 0.03), u(-0.05, 0.05), u(-0.08, 0.08), u(0.6, 0.75), u(0.9, 1.0)
    r, phi = np.hypot(y - y0, x - x0), np.arctan2(x - x0, y - y0)
    sector = (r < depth) & (np.abs(phi - tilt) < half)
    cy, cx = u(0.45, 0.6), x0 + u(-0.08, 0.08)
    angle = heart['tilt'] + u(-0.15, 0.15)  # the probe sees the heart a little turned each time
    ct, st = np.cos(angle), np.sin(angle)
    dy, dx = ct * (y - cy) - st * (x - cx), st * (y - cy) + ct * (x - cx)
    d = np.hypot(dx, dy / heart['aspect'])[None]  # (1, S, S) elliptic distance from the chamber's centre
    edge = 1.5 / size
    soft = lambda f: np.clip(f / edge + 0.5, 0, 1)
    freq, phase, scale = heart['texture']
    texture = 1 + 0.25 * sum(np.sin(freq[i, 0] * scale[i, 0] * y + freq[i, 1] * scale[i, 1] * x + phase[i, 0])
                             for i in range(2)) / 2
    image = heart['tissue'] * texture * np.ones((frames, 1, 1))
    image = image + (heart['muscle'] - image) * soft(r_out[:, None, None] - d)
    image = image + (heart['blood'] - image) * soft(r_in[:, None, None] - d)
    # speckle, mean 1: 70 % a fixed pattern, 30 % renewed every frame
    def grains(n):  # (size, size, n) fully developed speckle: |complex Gaussian| blurred to ~1 px grains
        return np.abs(gaussian_blur(rng.normal(0, 1, (size, size, n)) + 1j * rng.normal(0, 1, (size, size, n)), 0.7))
    still, moving = grains(1)[..., 0], grains(frames).transpose(2, 0, 1)
    speckle = 0.7 * still / still.mean() + 0.3 * moving / moving.mean()
    image = image * speckle * np.exp(-u(0.3, 1.2) * r) * u(0.8, 1.25)
    image = np.log1p(10 * np.clip(image, 0, None)) / np.log1p(10) + rng.normal(0, 0.02, image.shape)
    image = np.where(sector, np.clip(image, 0, 1), 0)
    labels = np.where(d < r_in[:, None, None], 1, np.where(d < r_out[:, None, None], 2, 0)) * sector
    return (image * 255).round().astype(np.uint8)[..., None], labels.astype(np.uint8)


def prepare_demovideo(out_dir='data/demovideo', frames: int = 32, size: int = 32, seed: int = 0,
                      n_train: int = 600, n_val: int = 100, n_test: int = 200):
    """
    Synthetic echocardiography-like clips for medjepa3d.py, (frames, size, size, 1), deterministic from
    the seed. A heart chamber seen in an ultrasound sector beats; the 4 classes (DEMOVIDEO_CLASSES)
    differ only in the beat (demovideo_subject), so one frame says next to nothing about the class.
    Every subject is filmed CLIPS_PER_SUBJECT times (fresh probe pose, gain, speckle, start of the
    beat). Masks: 0 background, 1 chamber, 2 wall, per frame. Splits by subject, classes balanced.
    The 600 / 100 / 200 default takes about 10 s and 60 MB (half of it masks).
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    args = {'frames': frames, 'size': size, 'seed': seed, 'n_train': n_train, 'n_val': n_val, 'n_test': n_test,
            'generator_version': DEMOVIDEO_VERSION}
    n_subjects = {s: round(n / CLIPS_PER_SUBJECT) for s, n in zip(SPLITS, (n_train, n_val, n_test))}
    if size < 16 or frames < 4 or min(n_subjects.values()) < 1:
        raise ValueError(f"need --size >= 16, --frames >= 4 and at least {CLIPS_PER_SUBJECT} clips per split, got "
                         f"size {size}, frames {frames}, {n_train}/{n_val}/{n_test}")
    if is_up_to_date(out_dir, args):
        return out_dir
    print(f"generating demovideo clips: {frames} frames of {size}x{size}, seed {seed} -> {out_dir}")
    with staging_dir(out_dir) as tmp:
        write_subjects(tmp, seed, n_subjects, CLIPS_PER_SUBJECT, (frames, size, size), DEMOVIDEO_CLASSES,
                       DEMOVIDEO_LABELS, demovideo_subject, lambda subject, rng: render_demovideo(subject, rng, frames, size),
                       'clips')
        write_meta(tmp, 'demovideo', DEMOVIDEO_CLASSES,
                   split_rule=f"by subject: the {CLIPS_PER_SUBJECT} clips of a subject are in one split; "
                              f"classes balanced within each split",
                   source="synthetic, generated by prepare.py demovideo",
                   licence="CC0-1.0 (generated data, no rights reserved)", citation=None, args=args,
                   video=True, frames=frames, frame_stride=1, mask_labels=DEMOVIDEO_LABELS,
                   mask_classes=DEMOVIDEO_LABELS, seed=seed, generator_version=DEMOVIDEO_VERSION,
                   clips_per_subject=CLIPS_PER_SUBJECT,
                   axes='(N, T, H, W, C) = (clip, frame, row = depth from the probe, column, channel)')
    return finish(out_dir, t0)

# -----------------------------------------------------------------------------
# The real data sets: one function each. They share the steps above:
#   args -> is_up_to_date -> get_raw -> split_by_group -> staging_dir { convert_split / write_split
#   per split, write_meta } -> finish


SOURCES = {
    'ham10000': dict(
        source="Harvard Dataverse doi:10.7910/DVN/DBW86T (HAM10000 images, metadata, lesion masks; "
               "ISIC 2018 Task 3 test images and ground truth)",
        licence="CC BY-NC 4.0", citation="Tschandl P, Rosendahl C, Kittler H. The HAM10000 dataset, a large "
        "collection of multi-source dermatoscopic images of common pigmented skin lesions. Sci Data 5, 180161 (2018)"),
    'medmnist': dict(
        source="Zenodo record 10519652 (MedMNIST v3 / MedMNIST+)", licence="CC BY 4.0 (dermamnist: CC BY-NC 4.0)",
        citation="Yang J et al. MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical "
                 "image classification. Sci Data 10, 41 (2023)"),
    'aptos2019': dict(
        source="Kaggle competition aptos2019-blindness-detection (login and rule acceptance required)",
        licence="Kaggle competition rules (non-commercial research use)",
        citation="Karthik, Maggie, Dane S. APTOS 2019 Blindness Detection. Kaggle (2019)"),
    'pcam': dict(
        source="Zenodo record 2546921 (PatchCamelyon)", licence="CC0 1.0",
        citation="Veeling BS et al. Rotation equivariant CNNs for digital pathology. MICCAI 2018; "
                 "Ehteshami Bejnordi B et al. JAMA 318(22), 2199-2210 (2017)"),
    'chestxray14': dict(
        source="NIH Clinical Center, https://nihcc.app.box.com/v/ChestXray-NIHCC", licence="CC0 1.0 "
        "(NIH asks for the citation and an acknowledgement of the NIH Clinical Center)",
        citation="Wang X et al. ChestX-ray8: Hospital-scale chest X-ray database and benchmarks on "
                 "weakly-supervised classification and localization of common thorax diseases. CVPR 2017"),
    'msd': dict(
        source="Medical Segmentation Decathlon, http://medicaldecathlon.com (tar files mirrored for MONAI)",
        licence="CC BY-SA 4.0", citation="Antonelli M et al. The Medical Segmentation Decathlon. "
        "Nat Commun 13, 4128 (2022); Simpson AL et al. arXiv:1902.09063 (2019)"),
    'brats2021': dict(
        source="RSNA-ASNR-MICCAI BraTS 2021 (registration on Synapse, syn25829067, or the Kaggle copy)",
        licence="the BraTS 2021 data use agreement (research use, cite the papers below)",
        citation="Baid U et al. The RSNA-ASNR-MICCAI BraTS 2021 benchmark on brain tumor segmentation and "
                 "radiogenomic classification. arXiv:2107.02314 (2021); Menze BH et al. IEEE TMI 34(10) (2015)"),
    'brainlobes': dict(
        source="Debian package mricron-data 1.2.20211006+dfsg-4 (deb.debian.org): ch2.nii.gz (Colin27 average T1) "
               "and aal.nii.gz / aal.nii.txt (AAL atlas) from usr/share/mricron/templates",
        licence="BSD-3-Clause (the package's debian/copyright); the template's and the atlas' authors ask to be cited",
        citation="Holmes CJ et al. Enhancement of MR images using registration for signal averaging. J Comput Assist "
                 "Tomogr 22(2), 324-333 (1998); Tzourio-Mazoyer N et al. Automated anatomical labeling of "
                 "activations in SPM using a macroscopic anatomical parcellation of the MNI MRI single-subject "
                 "brain. NeuroImage 15(1), 273-289 (2002)"),
    'local': dict(source="a local folder", licence="as the owner of the files says", citation=None),
}

# --- HAM10000 ------------------------------------------------------------------------------------

HAM_CLASSES = ['akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc']  # dx codes, in HAM10000's order
HAM_FILES = {'dataverse_files.zip': (
    'https://dataverse.harvard.edu/api/access/dataset/:persistentId/?persistentId=doi:10.7910/DVN/DBW86T', None)}


HAM_PAGE = 'https://dataverse.harvard.edu/dataset.xhtml?persistentId=doi:10.7910/DVN/DBW86T'


def dataverse_missing(roots):
    """What a Dataverse bundle left out. Its zip holds MANIFEST.TXT, one line per file: 'NAME (type) N bytes.'
    when the file is in the zip, any other text (over the bundle's size limit, an I/O error) when it is
    not. Returns a line for every file that is left out (and not found elsewhere under roots, e.g.
    fetched by hand since) or whose size differs from the manifest's."""
    problems = []
    for manifest in (p for r in roots for p in sorted(Path(r).rglob('MANIFEST.TXT')) if visible(p)):
        for line in filter(None, map(str.strip, manifest.read_text(errors='replace').splitlines())):
            included = re.fullmatch(r'(.+?) \([^()]*\) (\d+) bytes\.', line)
            name = included.group(1) if included else line.split(' (')[0]
            here = [p for r in roots for p in Path(r).rglob(name) if p.is_file() and visible(p)] if name else []
            if not included and not here:
                problems.append(f"{name}: {line[len(name):].strip()}")
            elif included and not any(p.stat().st_size == int(included.group(2)) for p in here):
                problems.append(f"{name}: MANIFEST.TXT says {included.group(2)} bytes, "
                                f"{'not found' if not here else f'{here[0].stat().st_size} bytes here'}")
    return problems


def prepare_ham10000(out_dir='data/ham10000', source: str = '', size: int = 224, isic_test: bool = True,
                     val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0, workers: int = 0):
    """
    HAM10000 dermoscopy: 10,015 JPEGs (600x450) of ~7,470 lesions, 7 classes (HAM_CLASSES).

    Why groups. Many lesions were photographed several times; an image-level split would put
    near-copies of a test lesion in train. So splits are made of whole lesions (lesion_id), stratified
    by diagnosis. With isic_test=true (the default) the ISIC 2018 Task 3 test set with its ground truth
    (Dataverse added it in 2023) is the test split and HAM10000 is split into train/val only; a download
    without it is an error, not a quiet switch to another rule (isic_test=false: test = test_fraction of
    the HAM10000 lesions). The test set's ground truth names no HAM10000 lesion, so a lesion photographed
    for both cannot be found; a photo in both (the same ISIC image id) can, and its lesion is kept out of
    train/val. Every file the download should hold must be there: a file left out of the Dataverse bundle
    (its MANIFEST.TXT) or an image listed in the metadata but absent is an error; a file that is there but
    does not decode is skipped and listed. Lesion masks (HAM10000_segmentations_lesion_tschandl) are
    saved when every image of every split has one. Images: centre square crop, resized to size.
    """
    t0 = time.time()
    args = {'source': source, 'size': size, 'isic_test': isic_test, 'val_fraction': val_fraction,
            'test_fraction': test_fraction, 'seed': seed}
    if is_up_to_date(out_dir, args):
        return Path(out_dir)
    info = announce('ham10000')
    roots = get_raw('ham10000', out_dir, source, HAM_FILES)
    if missing := dataverse_missing(roots):
        raise FileNotFoundError(f"the HAM10000 download is incomplete: {len(missing)} file(s) left out of the Dataverse "
                                f"bundle ({'; '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}). Download "
                                f"each from {HAM_PAGE} into {Path(out_dir).parent / 'downloads' / 'ham10000'} "
                                f"(or next to your --source) and run again")
    rows = read_table(find(roots, 'HAM10000_metadata*'))
    jpgs, masks = index_files(roots, ['.jpg']), index_files(roots, ['_segmentation.png'])
    gt = find(roots, 'ISIC2018_Task3_Test_GroundTruth*', required=False) if isic_test else None
    if isic_test and not gt:
        raise FileNotFoundError(f"no ISIC2018_Task3_Test_GroundTruth file in the download, so the ISIC 2018 test set "
                                f"cannot be the test split: get it from {HAM_PAGE}, or run with --isic_test=false "
                                f"to draw the test split from HAM10000's lesions (test_fraction {test_fraction})")
    test_rows, overlap = [], set()
    if gt:  # two layouts exist: HAM10000-style columns (dx, lesion_id), or one 0/1 column per class
        for r in read_table(gt):
            image = r.get('image_id') or r.get('image')
            dx = r['dx'] if 'dx' in r else HAM_CLASSES[int(np.argmax([float(r[c.upper()]) for c in HAM_CLASSES]))]
            test_rows.append({'image_id': image, 'dx': dx, 'lesion_id': r.get('lesion_id') or f'test:{image}',
                              'dataset': r.get('dataset', '')})
        # the lesion ids of the two sets do not share a namespace; ISIC image ids do: a HAM10000 lesion with
        # a photo in the test set (or, where the ground truth has lesion ids, the same id) leaves train/val
        test_ids = {r['image_id'] for r in test_rows} | {r['lesion_id'] for r in test_rows}
        overlap = {r['lesion_id'] for r in rows if r['image_id'] in test_ids or r['lesion_id'] in test_ids}
        rows = [r for r in rows if r['lesion_id'] not in overlap]
        print(f"  {len(overlap)} HAM10000 lesion(s) with a photo in the ISIC 2018 test set kept out of train/val")
    lesion_ids = {l: i for i, l in enumerate(sorted({r['lesion_id'] for r in rows + test_rows}))}
    site_names = sorted({r.get('dataset', '') for r in rows + test_rows} - {''})
    split = split_by_group([r['lesion_id'] for r in rows], val_fraction, 0 if gt else test_fraction, seed,
                           strata=[r['dx'] for r in rows])
    parts = {s: [r for r, sp in zip(rows, split) if sp == s] for s in SPLITS}
    if gt:
        parts['test'] = test_rows
    all_rows = [r for s in SPLITS for r in parts[s]]
    with_masks = bool(masks) and all(r['image_id'] in masks for r in all_rows)
    with_sites = bool(site_names) and all(r.get('dataset') for r in all_rows)
    absent = [r['image_id'] + '.jpg' for r in all_rows if r['image_id'] not in jpgs]
    if absent:
        raise FileNotFoundError(f"{len(absent)} image(s) listed in the metadata or ground truth are not in the "
                                f"download ({', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}): an image "
                                f"zip is missing or incomplete. Get the files from {HAM_PAGE} and run again")
    skipped = []
    with staging_dir(out_dir) as tmp:
        for s in SPLITS:
            part = parts[s]
            print(f"  {s}: {len(part)} images of {len({r['lesion_id'] for r in part})} lesions")
            convert_split(tmp, s, [jpgs[r['image_id']] for r in part], decode_2d, (size, size, 3), skipped,
                          default_workers(workers),
                          mask_paths=[masks[r['image_id']] for r in part] if with_masks else None,
                          labels=[HAM_CLASSES.index(r['dx']) for r in part],
                          groups=[lesion_ids[r['lesion_id']] for r in part],
                          sites=[site_names.index(r['dataset']) for r in part] if with_sites else None)
        write_meta(tmp, 'ham10000', HAM_CLASSES, args=args, **info,
                   split_rule=("grouped by lesion_id, stratified by dx; " +
                               ("test = ISIC 2018 Task 3 test set (with ground truth); train/val from HAM10000 "
                                "without the lesions that have a photo in it" if gt else
                                f"val/test fractions {val_fraction}/{test_fraction} of lesions (--isic_test=false)"))
                   + f", seed {seed}", test_overlap_lesions_removed=len(overlap) if gt else None,
                   site_names=site_names if with_sites else None, masks_note=None if with_masks else
                   "no masks: the lesion masks are missing for some images (the ISIC 2018 test set has none)",
                   skipped=report_skipped(skipped))
    return finish(out_dir, t0)

# --- MedMNIST ------------------------------------------------------------------------------------

MEDMNIST = json.loads((Path(__file__).resolve().parent / 'tables' / 'medmnist.json').read_text())


def copy_npy_data(f, shape, fortran, dtype, out, name, block=2**26):
    """Copy the data of an .npy file (f just past its header) into out (shape `shape`), about `block` bytes
    at a time. The header's fortran_order flag says the array is stored column-major: the bytes are then
    those of out's transpose, so they are read along out's last axes instead of its first."""
    if len(shape) == 0 or math.prod(shape) == 0:
        return
    order = shape[::-1] if fortran else shape  # the shape of the bytes as stored, C order
    # walk the first d stored axes one index at a time and axis d in steps, so a read is at most `block`
    d = next(k for k in range(len(order)) if math.prod(order[k + 1:]) * dtype.itemsize <= block)
    rest = math.prod(order[d + 1:])
    step = max(1, block // (rest * dtype.itemsize))
    for index in np.ndindex(*order[:d]):
        for i in range(0, order[d], step):
            n = min(step, order[d] - i)
            data = f.read(n * rest * dtype.itemsize)
            if len(data) != n * rest * dtype.itemsize:
                raise ValueError(f"{name}: the file ends early (truncated download?): delete it and run again")
            a = np.frombuffer(data, dtype).reshape(n, *order[d + 1:])
            where = (*index, slice(i, i + n))
            if fortran:  # stored axes are out's in reverse: index from the end, and transpose the block
                out[(Ellipsis, *where[::-1])] = a.T
            else:
                out[where] = a


def prepare_medmnist(flag, out_dir=None, size: int = 28, source: str = ''):
    """
    A MedMNIST v3 data set ({flag}.npz, or {flag}_{size}.npz for 64/128/224 px; 3-D: 28 and 64 only),
    with its official splits and labels, md5-checked. 2-D: (N, size, size, C); 3-D: (N, D, H, W, 1).
    Labels: multi-class -> (N,) class ids; chestmnist (multi-label) -> (N, 14) 0/1;
    retinamnist (ordinal) -> (N,) grades with "ordinal": true. The images are copied from the npz in
    chunks (the 224-px files are many GB), never loaded whole.
    """
    t0 = time.time()
    spec = MEDMNIST['flags'][flag]
    if str(size) not in spec['md5']:
        raise ValueError(f"{flag} is published at --size={'/'.join(spec['md5'])}, not {size}")
    out_dir = out_dir or f'data/{flag}' + (f'_{size}' if size != 28 else '')
    args = {'source': source, 'size': size}
    if is_up_to_date(out_dir, args):
        return Path(out_dir)
    info = announce('medmnist')
    file_name = f'{flag}.npz' if size == 28 else f'{flag}_{size}.npz'
    files = {file_name: (MEDMNIST['url'].format(file=file_name), spec['md5'][str(size)])}
    npz = find(get_raw(flag, out_dir, source, files), file_name)
    task = spec['task']
    with staging_dir(out_dir) as tmp, zipfile.ZipFile(npz) as z:
        for s in SPLITS:
            with z.open(f'{s}_images.npy') as f:  # stream the array out of the (compressed) npz
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                                         np.lib.format.read_array_header_2_0)(f)
                colour = '3d' not in flag and len(shape) == 4
                images = np.lib.format.open_memmap(tmp / f'.{s}_partial.npy', 'w+', np.uint8,
                                                   shape if colour else (*shape, 1))
                copy_npy_data(f, shape, fortran, dtype, images if colour else images[..., 0], f'{npz.name}: {s}_images')
            with z.open(f'{s}_labels.npy') as f:
                labels = np.load(f).astype(np.int64)  # (N, 1), or (N, 14) for chestmnist
            write_split(tmp, s, images, labels if task.startswith('multi-label') else labels[:, 0])
            del images
            os.remove(tmp / f'.{s}_partial.npy')
        write_meta(tmp, flag, spec['labels'], args=args, **{**info, 'licence': spec['license']},
                   task='multilabel' if task.startswith('multi-label') else 'multiclass',
                   ordinal=task == 'ordinal-regression', medmnist_task=task,
                   split_rule="official MedMNIST splits", file=file_name)
    return finish(out_dir, t0)

# --- APTOS 2019 ----------------------------------------------------------------------------------

APTOS_CLASSES = ['0 no DR', '1 mild', '2 moderate', '3 severe', '4 proliferative DR']
APTOS_HOW = ("APTOS 2019 is a Kaggle competition: sign in at https://www.kaggle.com/c/aptos2019-blindness-"
             "detection, accept its rules, then download aptos2019-blindness-detection.zip (web page, or "
             "`kaggle competitions download -c aptos2019-blindness-detection`).")


def prepare_aptos2019(out_dir='data/aptos2019', source: str = '', size: int = 224, val_fraction: float = 0.15,
                      test_fraction: float = 0.15, seed: int = 0, workers: int = 0):
    """
    APTOS 2019 fundus photos: train.csv (id_code, diagnosis 0-4) + train_images/<id_code>.png, 3,662
    images. Kaggle's own test set has no public labels, so all three splits come from train.csv:
    stratified by grade, one image per eye (no patient ids are published). Labels are the ordinal
    grades 0-4 (meta: "ordinal": true).
    """
    t0 = time.time()
    args = {'source': source, 'size': size, 'val_fraction': val_fraction, 'test_fraction': test_fraction, 'seed': seed}
    if is_up_to_date(out_dir, args):
        return Path(out_dir)
    info = announce('aptos2019')
    roots = get_raw('aptos2019', out_dir, source, how_to_get=APTOS_HOW)
    rows = read_table(find(roots, 'train.csv'))
    pngs = index_files(roots, ['.png'])
    skipped = [{'file': r['id_code'] + '.png', 'reason': 'listed in train.csv but not found'}
               for r in rows if r['id_code'] not in pngs]
    rows = [r for r in rows if r['id_code'] in pngs]
    split = split_by_group([r['id_code'] for r in rows], val_fraction, test_fraction, seed,
                           strata=[r['diagnosis'] for r in rows])
    with staging_dir(out_dir) as tmp:
        for s in SPLITS:
            part = [r for r, sp in zip(rows, split) if sp == s]
            convert_split(tmp, s, [pngs[r['id_code']] for r in part], decode_2d, (size, size, 3), skipped,
                          default_workers(workers), labels=[int(r['diagnosis']) for r in part])
        write_meta(tmp, 'aptos2019', APTOS_CLASSES, args=args, **info, ordinal=True,
                   split_rule=f"stratified by grade, val/test fractions {val_fraction}/{test_fraction}, seed {seed}",
                   skipped=report_skipped(skipped))
    return finish(out_dir, t0)

# --- PatchCamelyon -------------------------------------------------------------------------------

PCAM_URL = 'https://zenodo.org/records/2546921/files/{file}?download=1'
PCAM_MD5 = {  # of the .h5.gz files as Zenodo (and the Google Drive copy) serve them, the values torchvision checks.
    # The PCam README (github.com/basveeling/pcam) lists the valid and test md5s swapped; these are the files' own.
    'camelyonpatch_level_2_split_train_x.h5.gz': '1571f514728f59376b705fc836ff4b63',
    'camelyonpatch_level_2_split_train_y.h5.gz': '35c2d7259d906cfc8143347bb8e05be7',
    'camelyonpatch_level_2_split_valid_x.h5.gz': 'd5b63470df7cfa627aeec8b9dc0c066e',
    'camelyonpatch_level_2_split_valid_y.h5.gz': '2b85f58b927af9964a4c15b8f7e8f179',
    'camelyonpatch_level_2_split_test_x.h5.gz': 'd8c2d60d490dbd479f8199bdfa0cf6ec',
    'camelyonpatch_level_2_split_test_y.h5.gz': '60a7035772fbdb7f34eb86d4420cf66a',
}


def prepare_pcam(out_dir='data/pcam', source: str = ''):
    """
    PatchCamelyon: 96x96 RGB lymph-node patches, label 1 = tumour tissue in the central 32x32 region;
    official splits 262,144 / 32,768 / 32,768. The files are HDF5, which needs h5py: the one data set
    with an optional dependency (docs/datasets.md says why). Its x files are copied in chunks.
    """
    t0 = time.time()
    args = {'source': source}
    if is_up_to_date(out_dir, args):
        return Path(out_dir)
    try:
        import h5py  # checked before downloading 7 GB that could not be read
    except ImportError:
        raise ValueError("pcam is stored as HDF5, which needs h5py: pip install h5py "
                         "(optional: no other data set uses it)") from None
    info = announce('pcam')
    roots = get_raw('pcam', out_dir, source, {f: (PCAM_URL.format(file=f), md5) for f, md5 in PCAM_MD5.items()})
    with staging_dir(out_dir) as tmp:
        for s, official in zip(SPLITS, ('train', 'valid', 'test')):
            arrays = {}
            for key in ('x', 'y'):
                name = f'camelyonpatch_level_2_split_{official}_{key}.h5'
                h5 = find(roots, name, required=False)
                if h5 is None:  # HDF5 needs random access: gunzip once, next to the download
                    gz = find(roots, name + '.gz')
                    h5 = Path(out_dir).parent / 'downloads' / 'pcam' / name
                    if not h5.exists():
                        with gzip.open(gz) as fin, open(h5.with_name(name + '.tmp'), 'wb') as fout:
                            shutil.copyfileobj(fin, fout, 1 << 22)
                        os.replace(h5.with_name(name + '.tmp'), h5)
                arrays[key] = h5py.File(h5, 'r')[key]
            x = arrays['x']
            images = np.lib.format.open_memmap(tmp / f'.{s}_partial.npy', 'w+', np.uint8, x.shape)
            for i in range(0, len(x), 4096):
                images[i:i + 4096] = x[i:i + 4096]
            write_split(tmp, s, images, np.asarray(arrays['y']).reshape(-1).astype(np.int64))
            del images
            os.remove(tmp / f'.{s}_partial.npy')
        write_meta(tmp, 'pcam', ['no tumour', 'tumour'], args=args, **info,
                   split_rule="official PCam splits (train / valid / test files)")
    return finish(out_dir, t0)

# --- ChestX-ray14 --------------------------------------------------------------------------------

CXR14_FINDINGS = ['Atelectasis', 'Cardiomegaly', 'Effusion', 'Infiltration', 'Mass', 'Nodule', 'Pneumonia',
                  'Pneumothorax', 'Consolidation', 'Edema', 'Emphysema', 'Fibrosis', 'Pleural_Thickening', 'Hernia']
CXR14_FILES = {f'images_{i + 1:03d}.tar.gz': (f'https://nihcc.box.com/shared/static/{key}.gz', None) for i, key in
               enumerate(['vfk49d74nhbxq3nqjg0900w5nvkorp5c', 'i28rlmbvmfjbl8p2n3ril0pptcmcu9d1',
                          'f1t00wrtdk94satdfb9olcolqx20z2jp', '0aowwzs5lhjrceb3qp67ahp0rd1l1etg',
                          'v5e3goj22zr6h8tzualxfsqlqaygfbsn', 'asi7ikud9jwnkrnkj99jnpfkjdes7l6l',
                          'jn1b4mw4n6lnh74ovmcjb8y48h8xj07n', 'tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j',
                          'upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj', 'l6nilvfa9cg3s28tqv1qc1olm3gnz54p',
                          'hhq8fkdgvcari67vfhs7ppg2w6ni4jze', 'ioqwiy20ihqwyr8pf4c24eazhh281pbu'])}


CXR14_ENTRIES = ['Data_Entry_2017_v2020.csv', 'Data_Entry_2017.csv', 'Data_Entry_2017*.csv']  # newest first
CXR14_LISTS = ['Data_Entry_2017*.csv', 'train_val_list.txt', 'test_list.txt']


def prepare_chestxray14(out_dir='data/chestxray14', source: str = '', size: int = 224, val_fraction: float = 0.1,
                        seed: int = 0, workers: int = 0):
    """
    NIH ChestX-ray14: 112,120 frontal radiographs (1024x1024 PNG) of 30,805 patients; labels are the 14
    findings of Data_Entry_2017_v2020.csv (the 2020 relabelling; else Data_Entry_2017.csv) ('Finding
    Labels', '|'-separated; 'No Finding' = all zeros) as
    (N, 14) 0/1 targets ("task": "multilabel"). Test = the official test_list.txt; val = a patient-grouped
    part of train_val_list.txt (the official lists are already patient-wise). groups = Patient ID.
    Grey, 1 channel. The 12 image tarballs download by script; the csv and the two lists are on the
    NIH Box page only (put them in data/downloads/chestxray14/ or in --source): checked before any download.
    """
    t0 = time.time()
    args = {'source': source, 'size': size, 'val_fraction': val_fraction, 'seed': seed}
    if is_up_to_date(out_dir, args):
        return Path(out_dir)
    info = announce('chestxray14')
    # the lists and the csv are on the Box web page only: look for them before 45 GB of tarballs download
    where = Path(source) if source and Path(source).is_dir() else None if source else \
        Path(out_dir).parent / 'downloads' / 'chestxray14'
    if where is not None:
        missing = [name for name in CXR14_LISTS if find([where], name, required=False) is None]
        if missing:
            raise FileNotFoundError(f"{', '.join(missing)} not found in {where}: they are on the NIH Box page only "
                                    f"(https://nihcc.app.box.com/v/ChestXray-NIHCC); save them there and run again "
                                    f"(nothing was downloaded)")
    roots = get_raw('chestxray14', out_dir, source, CXR14_FILES)
    entry_file = next(filter(None, (find(roots, name, required=False) for name in CXR14_ENTRIES)), None) \
        or find(roots, CXR14_ENTRIES[-1])  # (raises, naming it)
    print(f"  labels from {entry_file.name}")
    entries = {r['Image Index']: r for r in read_table(entry_file)}
    lists = {name: find(roots, f'{name}.txt').read_text().split() for name in ('train_val_list', 'test_list')}
    pngs = index_files(roots, ['.png'])
    skipped = [{'file': f, 'reason': 'listed but not found (or not in the Data_Entry csv)'}
               for f in lists['train_val_list'] + lists['test_list'] if f not in entries or f[:-4] not in pngs]
    train_val = [f for f in lists['train_val_list'] if f in entries and f[:-4] in pngs]
    split = split_by_group([entries[f]['Patient ID'] for f in train_val], val_fraction, 0, seed)
    parts = {'train': [f for f, s in zip(train_val, split) if s == 'train'],
             'val': [f for f, s in zip(train_val, split) if s == 'val'],
             'test': [f for f in lists['test_list'] if f in entries and f[:-4] in pngs]}
    with staging_dir(out_dir) as tmp:
        for s in SPLITS:
            findings = [entries[f]['Finding Labels'].split('|') for f in parts[s]]
            convert_split(tmp, s, [pngs[f[:-4]] for f in parts[s]], decode_2d, (size, size, 1), skipped,
                          default_workers(workers),
                          labels=np.array([[c in fs for c in CXR14_FINDINGS] for fs in findings], np.int64),
                          groups=[int(entries[f]['Patient ID']) for f in parts[s]])
        write_meta(tmp, 'chestxray14', CXR14_FINDINGS, args=args, **info, task='multilabel',
                   split_rule=f"test = official test_list.txt; train/val from train_val_list.txt grouped by "
                              f"Patient ID (val fraction {val_fraction}, seed {seed})", labels_file=entry_file.name,
                   skipped=report_skipped(skipped))
    return finish(out_dir, t0)

# --- volumes: MSD, BraTS 2021, any NIfTI folder ---------------------------------------------------
#
# Every 3-D data set goes through one pipeline, load_volume (docs/3d.md says why):
#   1. read     nibabel, closest canonical (RAS+) orientation, transposed from NIfTI's (x, y, z) to
#               (z, y, x) = (slice, row, column); the voxel size in mm from the reoriented header.
#   2. resample to the target spacing (--spacing, mm): linear for images (antialiased when
#               shrinking), nearest for label maps. The field of view in mm is kept.
#   3. intensities, by modality, each channel on its own:
#               CT   clip to a window (--window=level,width in Hounsfield units), scale to 0..255
#               MRI  clip to the 0.5-99.5 percentiles, z-score over the foreground (the voxels above
#                    the 0.5th percentile: the non-zero voxels of skull-stripped or masked scans),
#                    map z in MRI_Z_RANGE onto 0..255; background voxels are 0
#   4. crop/pad to size^3 voxels: a box centred on the bounding box of the foreground (CT: the body,
#               voxels above CT_BODY_HU), kept inside the volume; an axis shorter than the box is
#               centred and padded with 0 (label 0). Nothing is squashed: a voxel is `spacing` mm.
# meta.json records the spacing, modality, intensity mapping (and its inverse) and the box in mm.

SOFT_TISSUE_WINDOW = (40.0, 400.0)  # CT level, width in HU: -160..240 HU, the usual abdominal soft-tissue window
CT_BODY_HU = -500.0                 # CT voxels above this are the body (air is -1000 HU, fat -100)
MRI_PERCENTILES = (0.5, 99.5)       # MRI: clip to these percentiles of the volume before the z-score
MRI_Z_RANGE = (-3.0, 3.0)           # MRI: z-scores in this range fill 0..255 (one grey level = 6/255 = 0.024 sd)


def resize_volume(v, shape, nearest=False):
    """(Z, Y, X) -> shape (D, H, W). Pillow resizes each slice in-plane, then the depth axis as one
    (Z, H*W) picture: both steps antialias when shrinking, unlike plain interpolation."""
    D, H, W = shape
    f = Image.NEAREST if nearest else Image.BILINEAR
    v = np.stack([np.asarray(Image.fromarray(s).resize((W, H), f)) for s in np.asarray(v, np.float32)])
    return np.asarray(Image.fromarray(v.reshape(len(v), H * W)).resize((H * W, D), f)).reshape(D, H, W)


NIFTI_ERRORS = (OSError, EOFError, ValueError, OverflowError, zlib.error, nib.filebasedimages.ImageFileError,
                nib.spatialimages.HeaderDataError, nib.orientations.OrientationError)  # nibabel on damaged files


def read_nifti(path, spacing=False):
    """A NIfTI file as float32 (Z, Y, X, C), RAS-oriented. A damaged file or header raises ValueError
    naming the file, and nothing else (tests/test_properties.py feeds it truncated and bit-flipped files).
    spacing=True: also the voxel size in mm along (Z, Y, X), read from the reoriented header."""
    try:
        img = nib.load(str(path))
        shape, dtype = img.header.get_data_shape(), img.header.get_data_dtype()
        # a flipped bit in the header can claim terabytes, which nibabel would allocate before reading:
        # check the claim against what the file can hold (deflate expands at most 1032:1)
        room = os.path.getsize(path) * (1032 if str(path).endswith('.gz') else 1)
        if len(shape) not in (3, 4) or min(shape) < 1 or math.prod(shape) * dtype.itemsize > room:
            raise ValueError(f"the header's shape {shape} of {dtype} is not a 3-D or 4-D volume that fits in the file")
        img = nib.as_closest_canonical(img)
        a = np.asarray(img.dataobj, np.float32)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3][::-1])
    except NIFTI_ERRORS as e:
        raise ValueError(f"{path} is not a readable NIfTI volume ({type(e).__name__}: {e})") from e
    a = (a[..., None] if a.ndim == 3 else a).transpose(2, 1, 0, 3)
    return (a, zooms) if spacing else a


def resample_spacing(v, spacing, target, nearest=False):
    """(Z, Y, X) volume with voxel size `spacing` (mm) -> the same field of view at voxel size `target`:
    shape round(shape * spacing / target), so the physical extent is kept (to half a voxel per axis)."""
    shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(v.shape, spacing, target))
    return resize_volume(v, shape, nearest)


def mri_zscore(v, percentiles=MRI_PERCENTILES):
    """-> (float32 z-scores, bool foreground): clip to the percentiles, then subtract the mean and divide
    by the standard deviation of the foreground, the voxels above the low percentile."""
    lo, hi = np.percentile(v, percentiles)
    v = np.clip(v, lo, hi)
    fg = v > lo
    if not fg.any():  # a constant volume: nothing to scale
        return np.zeros(v.shape, np.float32), fg
    mean, std = v[fg].mean(dtype=np.float64), v[fg].std(dtype=np.float64)
    return ((v - mean) / max(std, 1e-6)).astype(np.float32), fg


def normalise_intensity(v, recipe):
    """One channel (Z, Y, X) in scanner units -> (uint8, bool foreground), by recipe['modality']."""
    if recipe['modality'] == 'CT':
        level, width = recipe['window']
        return to_uint8(v, level - width / 2, level + width / 2), v > CT_BODY_HU
    z, fg = mri_zscore(v)
    return np.where(fg, to_uint8(z, *MRI_Z_RANGE), 0).astype(np.uint8), fg


def box_starts(foreground, size):
    """First index, per axis, of a size^3 box centred on the foreground's bounding box and kept inside
    the volume; an axis shorter than size is centred instead (a negative start: padding)."""
    starts = []
    for axis, n in enumerate(foreground.shape):
        if n <= size:
            starts.append(-((size - n) // 2))
            continue
        hit = np.flatnonzero(foreground.any(axis=tuple(a for a in range(foreground.ndim) if a != axis)))
        centre = (hit[0] + hit[-1] + 1) / 2 if len(hit) else n / 2
        starts.append(int(np.clip(round(centre - size / 2), 0, n - size)))
    return starts


def take_box(a, starts, size):
    """a[s:s + size] on each of the first three axes; 0 where the box leaves the array."""
    out = np.zeros((size, size, size) + a.shape[3:], a.dtype)
    src, dst = [], []
    for s, n in zip(starts, a.shape[:3]):
        lo, hi = max(s, 0), min(s + size, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = a[tuple(src)]
    return out


def volume_recipe(modality, spacing, window=''):
    """Check and parse the volume options: modality 'ct' / 'mri', --spacing '1.5' (isotropic) or 'z,y,x'
    in mm, --window 'level,width' in HU (CT only; '' = SOFT_TISSUE_WINDOW)."""
    modality = str(modality).upper()
    if modality not in ('CT', 'MRI'):
        raise ValueError(f"--modality must be ct (Hounsfield units, windowed) or mri (z-scored over the "
                         f"foreground), got {modality.lower() or 'nothing'!r}")
    try:
        s = tuple(float(x) for x in str(spacing).split(','))
        s = s * 3 if len(s) == 1 else s
        assert len(s) == 3 and min(s) > 0
    except (ValueError, AssertionError):
        raise ValueError(f"--spacing must be one voxel size in mm (e.g. 1.5) or three, z,y,x (e.g. 3,1,1), "
                         f"all > 0; got {spacing!r}") from None
    if modality == 'MRI':
        if window:
            raise ValueError(f"--window={window} is a CT setting (Hounsfield units); MRI has no absolute unit "
                             f"and is z-scored over the foreground instead: drop --window")
        return {'modality': modality, 'spacing': s}
    try:
        w = tuple(float(x) for x in window.split(',')) if window else SOFT_TISSUE_WINDOW
        assert len(w) == 2 and w[1] > 0
    except (ValueError, AssertionError):
        raise ValueError(f"--window must be level,width in Hounsfield units with width > 0, e.g. 40,400 (soft "
                         f"tissue), 400,1800 (bone), -600,1500 (lung); got {window!r}") from None
    return {'modality': modality, 'spacing': s, 'window': w}


def intensity_meta(recipe):
    """What meta.json says about the stored intensities: the mapping and how to undo it."""
    if recipe['modality'] == 'CT':
        level, width = recipe['window']
        lo, hi = level - width / 2, level + width / 2
        return {'modality': 'CT', 'window': {'level': level, 'width': width}, 'hu_range': [lo, hi],
                'to_uint8': f"u = round(255 * clip((HU - ({lo:g})) / {width:g}, 0, 1))",
                'from_uint8': f"HU = {lo:g} + u / 255 * {width:g} (values outside the window were clipped)"}
    (p_lo, p_hi), (z_lo, z_hi) = MRI_PERCENTILES, MRI_Z_RANGE
    return {'modality': 'MRI', 'percentiles': [p_lo, p_hi], 'z_range': [z_lo, z_hi],
            'foreground': f"voxels above the {p_lo:g}th percentile of their volume, after resampling "
                          f"(the non-zero voxels of skull-stripped or masked scans)",
            'to_uint8': f"z = (clip(v, p{p_lo:g}, p{p_hi:g}) - foreground mean) / foreground std; "
                        f"u = round(255 * clip((z - ({z_lo:g})) / {z_hi - z_lo:g}, 0, 1)) on the foreground, 0 elsewhere",
            'from_uint8': f"z = {z_lo:g} + u / 255 * {z_hi - z_lo:g} (foreground voxels)"}


def load_volume(channel_paths, label_path, size, recipe):
    """One subject -> (uint8 (size, size, size, C), uint8 (size, size, size) label map or None), through
    the four steps above. recipe: volume_recipe's dict plus 'channels' and 'label_values' (the label
    file's values, in the order that numbers them 0..K)."""
    chans, spacing = [], None
    for p in channel_paths:
        a, sp = read_nifti(p, spacing=True)
        if chans and a.shape[:3] != chans[0].shape[:3]:
            raise ValueError(f"{Path(p).name} is {a.shape[:3]} voxels but {Path(channel_paths[0]).name} is "
                             f"{chans[0].shape[:3]}: the channels of a subject must share one grid")
        chans.append(a)
        spacing = spacing or sp
    chans = np.concatenate(chans, axis=-1)
    if chans.shape[-1] != recipe['channels']:
        raise ValueError(f"{chans.shape[-1]} channels, the data set has {recipe['channels']}")
    channels, foreground = [], None
    for c in range(chans.shape[-1]):
        v = chans[..., c]
        finite = np.isfinite(v)
        if not finite.any():
            raise ValueError("no finite voxel (all NaN or inf)")
        v = np.where(finite, v, v[finite].min())  # NaN outside the brain (SPM) = background
        u, fg = normalise_intensity(resample_spacing(v, spacing, recipe['spacing']), recipe)
        channels.append(u)
        foreground = fg if foreground is None else foreground | fg
    starts = box_starts(foreground, size)
    image = take_box(np.stack(channels, axis=-1), starts, size)
    if label_path is None:
        return image, None
    seg = np.round(read_nifti(label_path)[..., 0])
    if seg.shape != chans.shape[:3]:
        raise ValueError(f"label volume {seg.shape} does not match the image {chans.shape[:3]}")
    values = np.asarray(recipe['label_values'])
    if not np.isin(seg, values).all():
        raise ValueError(f"label values {sorted(set(np.unique(seg).tolist()) - set(values.tolist()))} are not "
                         f"among the data set's labels {values.tolist()}")
    seg = np.searchsorted(values, seg).astype(np.float32)  # e.g. BraTS 0/1/2/4 -> 0/1/2/3
    seg = resample_spacing(seg, spacing, recipe['spacing'], nearest=True)
    return image, take_box(seg.astype(np.uint8), starts, size)


def decode_volumes(job):
    """Worker: [(i, (channel paths, recipe), label path)] -> [(i, image, mask, error)]."""
    (size, *_), items = job
    out = []
    for i, (channel_paths, recipe), label_path in items:
        try:
            out.append((i, *load_volume(channel_paths, label_path, size, recipe), None))
        except Exception as e:  # read_nifti's ValueError; anything else is skipped too, with its name
            out.append((i, None, None, f"{type(e).__name__}: {e}"))
    return out


def write_volumes(tmp, name, subjects, split, size, channels, mask_labels, skipped, workers, args, info, rule,
                  recipe, **extra):
    """Shared tail of the 3-D data sets. subjects: [(channel paths, label path or None)];
    split: their split names; recipe: volume_recipe(...). Every subject is its own group. Labels are -1:
    these are segmentation (or unlabelled) sets, their targets are the masks."""
    has_masks = bool(mask_labels) and all(label is not None for _, label in subjects)
    recipe = {**recipe, 'channels': channels, 'label_values': [v for v, _ in mask_labels or []]}
    spacing = recipe['spacing']
    print(f"  {recipe['modality']}, resampled to {'x'.join(f'{s:g}' for s in spacing)} mm (z, y, x), "
          f"box {size}^3 voxels = {' x '.join(f'{size * s:g}' for s in spacing)} mm")
    for s in SPLITS:
        ids = [i for i, sp in enumerate(split) if sp == s]
        print(f"  {s}: {len(ids)} volumes")
        convert_split(tmp, s, [(subjects[i][0], recipe) for i in ids], decode_volumes,
                      (size, size, size, channels), skipped, workers, chunk=1,
                      mask_paths=[subjects[i][1] for i in ids] if has_masks else None,
                      mask_max=len(mask_labels or [0]) - 1, labels=np.full(len(ids), -1), groups=ids)
    write_meta(tmp, name, [], args=args, **info, task='segmentation' if has_masks else 'unlabeled',
               split_rule=rule, mask_labels=[n for _, n in mask_labels] if has_masks else None,
               modality=recipe['modality'], spacing=list(spacing), field_of_view_mm=[size * s for s in spacing],
               intensity=intensity_meta(recipe),
               crop=f"a {size}^3-voxel box centred on the foreground's bounding box, inside the volume; "
                    f"axes shorter than the box centred and padded with 0 (label 0)",
               axes='(N, D, H, W, C) = (volume, z, y, x, channel), RAS orientation, voxels of `spacing` mm',
               skipped=report_skipped(skipped), **extra)


MSD_TASKS = {  # the four smallest tasks; md5 = the one MONAI's DecathlonDataset checks; then the modality and
    # the default spacing (mm) and box (voxels), chosen to hold the labelled organ (docs/datasets.md): heart
    # 160 mm around the chest's centre, hippocampus the whole ~35x50x35 mm crop, prostate 96 mm around the
    # pelvis' centre, spleen 384 mm (the whole abdomen)
    'msd_heart': ('Task02_Heart', '06ee59366e1e5124267b774dbd654057', 'MRI', 2.5, 64),
    'msd_hippocampus': ('Task04_Hippocampus', '9d24dba78a72977dbd1d2e110310f31b', 'MRI', 1.0, 48),
    'msd_prostate': ('Task05_Prostate', '35138f08b1efaef89d7424d2bcc928db', 'MRI', 1.5, 64),
    'msd_spleen': ('Task09_Spleen', '410d4a301da4e5b2f6f86ec3ddba524e', 'CT', 4.0, 96),
}


def prepare_msd(name, out_dir=None, source: str = '', size: int = 0, spacing: str = '', window: str = '',
                folds: int = 5, fold: int = 0, test_fraction: float = 0.2, seed: int = 0, workers: int = 0):
    """
    A Medical Segmentation Decathlon task: TaskXX_Name.tar with dataset.json, imagesTr/labelsTr (NIfTI)
    and imagesTs (no labels, not used). The labelled subjects are split once: test_fraction of them
    (seeded) is the test split, the rest is cut into `folds` folds by subject and fold `fold` is val
    (run folds 0..folds-1 into separate --out folders for cross-validation). The tars hold macOS '._*'
    files next to the real ones; they are never read. Masks: label maps 0..K named by dataset.json.
    size / spacing (mm) / window (CT only): 0 or '' = the task's defaults in MSD_TASKS.
    """
    t0 = time.time()
    task, md5, modality, default_spacing, default_size = MSD_TASKS[name]
    size, spacing = size or default_size, spacing or str(default_spacing)
    recipe = volume_recipe(modality, spacing, window)
    out_dir = out_dir or f'data/{name}' + (f'_fold{fold}' if fold else '')
    args = {'source': source, 'size': size, 'spacing': spacing, 'window': window, 'folds': folds, 'fold': fold,
            'test_fraction': test_fraction, 'seed': seed}
    if not 0 <= fold < folds:
        raise ValueError(f"--fold must be in 0..{folds - 1}, got {fold}")
    if is_up_to_date(out_dir, args):
        return Path(out_dir)
    info = announce('msd')
    roots = get_raw(name, out_dir, source,
                    {f'{task}.tar': (f'https://msd-for-monai.s3-us-west-2.amazonaws.com/{task}.tar', md5)})
    dataset_json = find(roots, 'dataset.json')
    spec = json.loads(dataset_json.read_text())
    base = dataset_json.parent
    subjects = [([base / t['image']], base / t['label']) for t in spec['training']]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(subjects))
    n_test = round(len(subjects) * test_fraction)
    split = np.empty(len(subjects), dtype=object)
    split[order[:n_test]] = 'test'
    rest = order[n_test:]
    split[rest] = np.where(np.arange(len(rest)) % folds == fold, 'val', 'train')
    mask_labels = sorted((int(k), v) for k, v in spec['labels'].items())
    with staging_dir(out_dir) as tmp:
        write_volumes(tmp, name, subjects, split, size, len(spec['modality']), mask_labels, [],
                      default_workers(workers), args, info,
                      rule=f"by subject: test = {test_fraction} of the labelled subjects, the rest in {folds} "
                           f"folds, fold {fold} = val (seed {seed})", recipe=recipe,
                      modalities=[spec['modality'][k] for k in sorted(spec['modality'], key=int)], task_name=task)
    return finish(out_dir, t0)


BRATS_MODALITIES = ['flair', 't1', 't1ce', 't2']
BRATS_HOW = ("BraTS 2021 needs a registration: https://www.synapse.org/#!Synapse:syn25829067 (or the Kaggle "
             "copy 'brats-2021-task1'); download the training data (BraTS2021_Training_Data.tar).")


def prepare_brats2021(out_dir='data/brats2021', source: str = '', size: int = 96, spacing: str = '2',
                      val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0, workers: int = 0):
    """
    BraTS 2021 (task 1): one folder per subject with BraTS2021_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz
    (240x240x155 at 1 mm, skull-stripped). 4 MRI channels in BRATS_MODALITIES order, each z-scored over
    its brain (non-zero) voxels; the seg labels 0/1/2/4 become 0/1/2/3. The default 96^3 box at 2 mm
    (192 mm) holds the whole brain. Split by subject.
    """
    t0 = time.time()
    recipe = volume_recipe('MRI', spacing)
    args = {'source': source, 'size': size, 'spacing': spacing, 'val_fraction': val_fraction,
            'test_fraction': test_fraction, 'seed': seed}
    if is_up_to_date(out_dir, args):
        return Path(out_dir)
    info = announce('brats2021')
    roots = get_raw('brats2021', out_dir, source, how_to_get=BRATS_HOW)
    flairs = sorted((p for r in roots for p in r.rglob('*_flair.nii*') if visible(p)), key=lambda p: p.name)
    subjects = []
    for flair in flairs:
        stem, ext = flair.name.split('_flair')
        seg = flair.with_name(f'{stem}_seg{ext}')
        subjects.append(([flair.with_name(f'{stem}_{m}{ext}') for m in BRATS_MODALITIES], seg if seg.exists() else None))
    if not subjects:
        raise FileNotFoundError(f"no BraTS2021_*_flair.nii.gz under {', '.join(map(str, roots))}")
    split = split_by_group(list(range(len(subjects))), val_fraction, test_fraction, seed)
    mask_labels = [(0, 'background'), (1, 'necrotic tumour core'), (2, 'peritumoral edema'), (4, 'enhancing tumour')]
    with staging_dir(out_dir) as tmp:
        write_volumes(tmp, 'brats2021', subjects, split, size, 4, mask_labels, [], default_workers(workers), args,
                      info, rule=f"by subject, val/test fractions {val_fraction}/{test_fraction}, seed {seed}",
                      recipe=recipe, modalities=BRATS_MODALITIES)
    return finish(out_dir, t0)


def auto_spacing(files, size):
    """The isotropic voxel size (mm) at which the median volume's longest side fits in `size` voxels,
    from the headers alone (unreadable files are left to the converter, which reports them)."""
    sides = []
    for p in files:
        try:
            header = nib.load(str(p)).header
            sides.append(max(n * float(z) for n, z in zip(header.get_data_shape()[:3], header.get_zooms()[:3])))
        except Exception:
            continue
    if not sides:
        raise ValueError("no readable NIfTI header to choose --spacing=auto from: give --spacing in mm")
    return f"{float(np.median(sides)) / size:.3g}"


def prepare_nifti(out_dir='data/nifti', source: str = '', labels: str = '', modality: str = '', size: int = 64,
                  spacing: str = 'auto', window: str = '', val_fraction: float = 0.15, test_fraction: float = 0.15,
                  seed: int = 0, workers: int = 0):
    """
    Any folder of NIfTI volumes (*.nii, *.nii.gz, searched recursively), each its own subject; a 4-D
    file's 4th axis is the channels (all files need the same count). --modality=ct|mri (required: it
    decides the intensity normalisation), --window=level,width for CT (default 40,400, soft tissue).
    --spacing=auto: the isotropic voxel size at which the median volume's longest side fits the box.
    --labels=FOLDER: label volumes with the same file names, saved as masks (values 0..K, any
    integers, mapped in sorted order).
    """
    t0 = time.time()
    recipe = volume_recipe(modality, 1.0 if spacing == 'auto' else spacing, window)
    args = {'source': source, 'labels': labels, 'modality': modality, 'size': size, 'spacing': spacing,
            'window': window, 'val_fraction': val_fraction, 'test_fraction': test_fraction, 'seed': seed}
    if is_up_to_date(out_dir, args):
        return Path(out_dir)
    info = SOURCES['local']
    roots = get_raw('nifti', out_dir, source, how_to_get="Give the folder with --source.")
    files = sorted(p for r in roots for p in r.rglob('*.nii*') if visible(p) and p.name.endswith(('.nii', '.nii.gz')))
    if not files:
        raise FileNotFoundError(f"no .nii / .nii.gz file under {source}")
    if spacing == 'auto':
        recipe = volume_recipe(modality, auto_spacing(files, size), window)
    skipped, channels = [], None
    for p in files:  # the channel count from the first readable header; a bad header is skipped later
        try:
            shape = nib.load(str(p)).shape
            channels = shape[3] if len(shape) == 4 else 1
            break
        except Exception:
            continue
    label_of = {p: Path(labels) / p.name if labels else None for p in files}
    mask_labels = None
    if labels:
        values = set()
        for p, lab in label_of.items():
            if not lab.exists():
                raise FileNotFoundError(f"--labels: no {p.name} in {labels}")
            try:
                values |= set(np.unique(np.round(np.asarray(nib.load(str(lab)).dataobj))).astype(int).tolist())
            except Exception:
                pass  # reported when its subject is converted
        mask_labels = [(v, str(v)) for v in sorted(values)]
    split = split_by_group(list(range(len(files))), val_fraction, test_fraction, seed)
    with staging_dir(out_dir) as tmp:
        write_volumes(tmp, 'nifti', [([p], label_of[p]) for p in files], split, size, channels or 1, mask_labels,
                      skipped, default_workers(workers), args, info,
                      rule=f"by file, val/test fractions {val_fraction}/{test_fraction}, seed {seed}",
                      recipe=recipe, source_files=[str(p) for p in files])
    return finish(out_dir, t0)

# --- brainlobes: 2-D patches of one real brain MRI, labelled by lobe -------------------------------

BRAINLOBES_DEB = dict(  # Debian's mricron-data: the files below are in its usr/share/mricron/templates/
    name='mricron-data_1.2.20211006+dfsg-4_all.deb',
    url='http://deb.debian.org/debian/pool/main/m/mricron/mricron-data_1.2.20211006+dfsg-4_all.deb',
    size=16122652, sha256='d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f')
BRAINLOBES_INSTALLED = Path('/usr/share/mricron/templates')  # where `apt install mricron-data` puts them
BRAINLOBES_FILES = {  # the files used, with their md5 in that package's md5sums (other copies: used, with a note)
    'ch2.nii.gz': 'cedf2b7d8656dc2f35dd86a57e0318e8',   # Colin27 average T1, 181x217x181 uint8, 1 mm
    'aal.nii.gz': '2e7f077885659926ff0bb4702e9d7f56',   # AAL atlas: region index 0..116 per voxel, same grid
    'aal.nii.txt': '0eb4c3db6e127dab71638ff603170c05',  # one line per region: "index name code"
}
BRAINLOBES_CLASSES = ['frontal', 'limbic+insula', 'occipital', 'parietal', 'subcortical', 'temporal', 'cerebellum']
AAL_LOBES = {2: 'frontal', 3: 'limbic+insula', 4: 'limbic+insula', 5: 'occipital', 6: 'parietal',
             7: 'subcortical', 8: 'temporal', 9: 'cerebellum'}  # AAL code // 1000 -> class; 3 insula, 4 limbic
SLAB = 10             # axial slices per slab, the unit of the split (groups)
SLAB_KEEP = (2, 8)    # slices z % SLAB in [2, 8) are kept: 4 slices (4 mm) between neighbouring slabs


def brainlobes_files(source, out_dir):
    """{name: path} of BRAINLOBES_FILES. source: a folder holding them (searched recursively), a folder
    holding the .deb, or the .deb; '': the installed package if it is there, else the .deb downloaded
    into data/downloads/brainlobes/. The official .deb is sha256-checked; a .deb's three files are
    copied out next to the downloads, into data/downloads/brainlobes/<.deb name>.d/ (as get_raw unpacks)."""
    deb, roots = None, []
    if source and Path(source).is_file():
        deb = Path(source)
        if deb.name == BRAINLOBES_DEB['name']:
            verify(deb, BRAINLOBES_DEB['sha256'])
    elif not source and all((BRAINLOBES_INSTALLED / f).is_file() for f in BRAINLOBES_FILES):
        roots = [BRAINLOBES_INSTALLED]
        print(f"  reading the installed mricron-data in {BRAINLOBES_INSTALLED}")
    else:
        if not source:
            print(f"  {BRAINLOBES_DEB['name']}: {BRAINLOBES_DEB['size'] / 1e6:.1f} MB")
        roots = get_raw('brainlobes', out_dir, source,  # downloads, or checks an official .deb in the folder
                        {BRAINLOBES_DEB['name']: (BRAINLOBES_DEB['url'], BRAINLOBES_DEB['sha256'])})
    files = {f: find(roots, f, required=False) for f in BRAINLOBES_FILES}
    if deb is None and not all(files.values()):
        deb = find(roots, 'mricron-data*.deb', required=False)
        if deb is None:
            raise FileNotFoundError(
                f"--source={source} holds no {', '.join(f for f, p in files.items() if p is None)} and no "
                f"mricron-data .deb: pass the folder holding {', '.join(BRAINLOBES_FILES)} (after `apt install "
                f"mricron-data` that is {BRAINLOBES_INSTALLED}) or the .deb itself, or leave --source out to download")
    if deb is not None:
        print(f"  reading {', '.join(BRAINLOBES_FILES)} out of {deb.name}")
        files = deb_files(deb, [f'usr/share/mricron/templates/{f}' for f in BRAINLOBES_FILES],
                          Path(out_dir).parent / 'downloads' / 'brainlobes' / (deb.name + '.d'))
    return files


def aal_lobes(table_path):
    """aal.nii.txt -> int64 array: class index (BRAINLOBES_CLASSES) of each AAL region index, -1 for none."""
    regions = {}
    for line in Path(table_path).read_text(errors='replace').splitlines():
        fields = line.split()
        if len(fields) != 3 or not (fields[0].isdigit() and fields[2].isdigit()):
            continue  # blank lines, a header (a region left out this way is caught: its voxels are unlisted)
        index, code = int(fields[0]), int(fields[2])
        if code // 1000 not in AAL_LOBES:
            raise ValueError(f"{table_path}: region {fields[1]} has code {code}, in no lobe this data set knows "
                             f"(code // 1000 must be one of {sorted(AAL_LOBES)})")
        regions[index] = BRAINLOBES_CLASSES.index(AAL_LOBES[code // 1000])
    if not regions:
        raise ValueError(f"{table_path}: no 'index name code' line")
    lut = np.full(max(regions) + 1, -1, np.int64)
    lut[list(regions)] = list(regions.values())
    return lut


def lobe_patches(t1, lobe, size, stride):
    """Patches of the T1 around labelled centres. t1: uint8 (X, Y, Z); lobe: int (X, Y, Z), -1 outside the
    lobes. Centres: every axial slice z whose z % SLAB is in SLAB_KEEP's range, every (x, y) on a grid of
    `stride` voxels from 0 whose voxel has a lobe. Patch: size x size of slice z centred on the voxel
    (zero beyond the volume). Returns images uint8 (N, size, size, 1), labels, z, in (z, x, y) order."""
    h = size // 2
    pad = np.pad(t1, ((h, size - 1 - h), (h, size - 1 - h), (0, 0)))  # pad[x + h, y + h, z] = t1[x, y, z]
    z, i, j = np.nonzero(lobe[::stride, ::stride].transpose(2, 0, 1) >= 0)
    keep = (z % SLAB >= SLAB_KEEP[0]) & (z % SLAB < SLAB_KEEP[1])
    z, x, y = z[keep], i[keep] * stride, j[keep] * stride
    images = np.empty((len(z), size, size, 1), np.uint8)
    for k in range(len(z)):
        images[k, ..., 0] = pad[x[k]:x[k] + size, y[k]:y[k] + size, z[k]]
    return images, lobe[x, y, z], z


def slab_split(z):
    """Split of each axial slice: slab z // SLAB, val if slab % 5 == 2, test if slab % 5 == 4, else train."""
    slab = np.asarray(z) // SLAB
    return np.where(slab % 5 == 2, 'val', np.where(slab % 5 == 4, 'test', 'train'))


def prepare_brainlobes(out_dir='data/brainlobes', source: str = '', size: int = 64, stride: int = 8):
    """
    One real brain, cut into 2-D patches labelled by lobe: a small real-image check that pretraining pays
    off, with no registration and 16 MB to download. Input: the Colin27 average T1 (ch2.nii.gz, 181x217x181
    at 1 mm) and the AAL atlas on the same grid (aal.nii.gz + aal.nii.txt), from Debian's mricron-data.
    Each labelled voxel's class is the lobe of its AAL region (code // 1000; insula merged into limbic):
    BRAINLOBES_CLASSES. A patch is the size x size square of an axial slice centred on a labelled voxel
    of a stride-voxel grid (lobe_patches), grey, label = that voxel's lobe. Split by axial slab of SLAB
    slices (groups = slab): 4 slices dropped between slabs, slab % 5 == 2 val, == 4 test (slab_split).
    With the defaults: 8,341 / 2,904 / 2,613 patches. It is ONE brain: the test split is other slices
    of the same head, so this tests whether features see anatomy; it is not a benchmark.
    """
    t0 = time.time()
    args = {'source': source, 'size': size, 'stride': stride}
    if size < 8 or stride < 1:
        raise ValueError(f"--size must be at least 8 and --stride at least 1 (got {size}, {stride})")
    if is_up_to_date(out_dir, args):
        return Path(out_dir)
    info = announce('brainlobes')
    files = brainlobes_files(source, out_dir)
    with staging_dir(out_dir) as tmp:
        (t1, t1_mm), (aal, aal_mm) = (read_nifti(files[f], spacing=True) for f in ('ch2.nii.gz', 'aal.nii.gz'))
        if t1.shape != aal.shape or t1.shape[-1] != 1 or t1_mm != aal_mm:
            raise ValueError(f"ch2.nii.gz ({'x'.join(map(str, t1.shape[2::-1]))} voxels of {t1_mm[::-1]} mm) and "
                             f"aal.nii.gz ({'x'.join(map(str, aal.shape[2::-1]))} of {aal_mm[::-1]} mm) are not one "
                             f"3-D grid: take both from the same mricron-data package")
        t1, aal = t1[..., 0].transpose(2, 1, 0), aal[..., 0].transpose(2, 1, 0)  # read_nifti's (z, y, x) -> (x, y, z)
        if t1.min() < 0 or t1.max() > 255 or (t1 != np.round(t1)).any():
            raise ValueError(f"ch2.nii.gz: intensities {t1.min():g}..{t1.max():g} are not the uint8 "
                             f"0..255 of the Colin27 template in mricron-data")
        lut = aal_lobes(files['aal.nii.txt'])
        listed = lambda r: r == int(r) and 0 < r < len(lut) and lut[int(r)] >= 0
        unknown = [r for r in np.unique(aal).tolist() if r != 0 and not listed(r)]
        if unknown:
            raise ValueError(f"aal.nii.gz holds region indices {', '.join(f'{r:g}' for r in unknown[:10])} that "
                             f"aal.nii.txt does not list: take both from the same mricron-data package")
        lobe = np.where(aal > 0, lut[aal.astype(np.int64)], -1)  # every value is now 0 or a listed region
        images, labels, z = lobe_patches(t1.astype(np.uint8), lobe, size, stride)
        split = slab_split(z)
        for s in SPLITS:
            if not (split == s).any():
                raise ValueError(f"the {s} split is empty: the volume's {t1.shape[2]} axial slices are too few "
                                 f"for slabs of {SLAB} (5 slabs at least)")
            write_split(tmp, s, images[split == s], labels[split == s], groups=z[split == s] // SLAB)
            print(f"  {s}: {int((split == s).sum())} patches from {len(set((z[split == s] // SLAB).tolist()))} slabs")
        checksums = {f: file_hash(p) for f, p in files.items()}
        official = checksums == BRAINLOBES_FILES
        if not official:
            print(f"  note: these files differ from {BRAINLOBES_DEB['name']}'s (md5), so the counts may differ "
                  f"from the documented ones")
        write_meta(tmp, 'brainlobes', BRAINLOBES_CLASSES, args=args, **info,
                   split_rule=f"by axial slab of {SLAB} slices (groups = slab = z // {SLAB}); slices with z % {SLAB} "
                              f"in {{{', '.join(str(k) for k in range(SLAB) if not SLAB_KEEP[0] <= k < SLAB_KEEP[1])}}} are dropped, a "
                              f"{SLAB - SLAB_KEEP[1] + SLAB_KEEP[0]}-slice gap between neighbouring slabs; "
                              f"slab % 5 == 2 -> val, slab % 5 == 4 -> test, the rest train",
                   note="ONE brain (the Colin27 average of 27 scans of one person): the splits are other slices of "
                        "the same head. A test of whether features see anatomy, not a benchmark.",
                   patch={'size': size, 'stride': stride, 'centre': 'the labelled voxel at row/column size // 2'},
                   axes="(N, H, W, C) = (patch, x: left to right, y: posterior to anterior, grey): an axial slice "
                        "of the RAS-oriented T1, 1 mm pixels",
                   lobes_from="AAL code // 1000: 2 frontal, 3 insula + 4 limbic, 5 occipital, 6 parietal, "
                              "7 subcortical, 8 temporal, 9 cerebellum",
                   input_md5=checksums, inputs_are_the_packaged_files=official)
    return finish(out_dir, t0)  # its next: line runs config/brainlobes.py, as for every grey 2-D set

# --- any folder of pictures ----------------------------------------------------------------------

PICTURE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')


def prepare_folder(out_dir='data/folder', source: str = '', csv: str = '', size: int = 224, channels: int = 3,
                   val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0, workers: int = 0):
    """
    Pictures from a folder, labelled one of three ways:
      class sub-folders   source/<class>/*.png       -> classes = the folder names, sorted
      a flat folder       source/*.png               -> unlabelled (labels -1, task "unlabeled")
      --csv=FILE          columns path,label[,group] -> paths relative to the csv (or to --source)
    Split stratified by label; by `group` when the csv has one (e.g. a patient id).
    """
    t0 = time.time()
    args = {'source': source, 'csv': csv, 'size': size, 'channels': channels, 'val_fraction': val_fraction,
            'test_fraction': test_fraction, 'seed': seed}
    if channels not in (1, 3):
        raise ValueError(f"--channels must be 1 or 3, got {channels}")
    if is_up_to_date(out_dir, args):
        return Path(out_dir)
    if csv:
        rows = read_table(csv)
        base = Path(source) if source else Path(csv).parent
        paths = [base / r['path'] for r in rows]
        names = [r['label'] for r in rows]
        groups = [r['group'] for r in rows] if rows and 'group' in rows[0] else None
    else:
        roots = get_raw('folder', out_dir, source, how_to_get="Give the folder with --source.")
        paths = [p for r in roots for p in files_under(r) if p.suffix.lower() in PICTURE_SUFFIXES]
        flat = all(p.parent in roots for p in paths)
        names = None if flat else [p.parent.name for p in paths]
        groups = None
    if not paths:
        raise FileNotFoundError(f"no pictures ({', '.join(PICTURE_SUFFIXES)}) in {source or csv}")
    classes = sorted(set(names)) if names else []
    labels = np.array([classes.index(n) for n in names] if names else [-1] * len(paths))
    group_ids = np.unique(groups, return_inverse=True)[1] if groups else np.arange(len(paths))
    split = split_by_group(group_ids, val_fraction, test_fraction, seed, strata=labels)
    skipped = []
    with staging_dir(out_dir) as tmp:
        for s in SPLITS:
            ids = np.flatnonzero(split == s)
            convert_split(tmp, s, [paths[i] for i in ids], decode_2d, (size, size, channels), skipped,
                          default_workers(workers), labels=labels[ids], groups=group_ids[ids] if groups else None)
        write_meta(tmp, 'folder', classes, args=args, **SOURCES['local'],
                   task='multiclass' if classes else 'unlabeled',
                   split_rule=f"{'grouped by the csv group column, ' if groups else ''}stratified by label, "
                              f"val/test fractions {val_fraction}/{test_fraction}, seed {seed}",
                   skipped=report_skipped(skipped))
    return finish(out_dir, t0)

# --- DICOM: de-identification (PS3.15 Annex E) and the converter ---------------------------------
#
# The Basic Application Level Confidentiality Profile gives every attribute that can identify a
# person one action (tables/dicom_ps3.15_table_E.1-1.tsv, a pinned copy of Table E.1-1):
#   X remove   Z empty it   D replace with a dummy value   U replace the UID   K keep   C clean
# A compound such as X/Z or X/Z/D lets the de-identifier pick according to the attribute's type in
# the IOD (X for optional, Z for type 2, D for type 1). We do not carry the IOD tables, so we take the
# LAST action: it is conformant whatever the type (an empty optional attribute is legal, a dummy value
# satisfies type 1) and it keeps the file readable by strict tools. Other rules of the profile:
#   - every private attribute (odd group) goes, as do the curve (50xx) and overlay text/data rows;
#   - sequences are walked recursively; D/Z/C on a sequence empties it (no item can leak text),
#     U* (e.g. Referenced Image Sequence) keeps it and remaps the UIDs inside;
#   - UIDs map through a keyed hash: new = 2.25.<first 128 bits of HMAC-SHA256(run key, old)>. The
#     same old UID gives the same new one for the whole run (a series stays a series, references
#     stay valid) and the key is random and never stored, so nobody can go back;
#   - person names (VR PN) the table does not explicitly keep are emptied, also those it does not list;
#   - pixels are never edited, so burned-in text is a policy (burned_in_refusal, docs/datasets.md):
#     Burned In Annotation (0028,0301) YES is refused; absent, it is refused for the kinds of images that
#     often show text unless the user checked the pixels (burned_in='flag');
#   - Patient Identity Removed (0012,0062) = YES and De-identification Method (0012,0063) are set.

DEID_TABLE = Path(__file__).resolve().parent / 'tables' / 'dicom_ps3.15_table_E.1-1.tsv'
DUMMY = {'DA': '19000101', 'TM': '000000', 'DT': '19000101000000', 'AS': '000Y', 'DS': '0', 'IS': '0'}
NUMERIC_VRS = ('US', 'SS', 'UL', 'SL', 'FL', 'FD', 'SV', 'UV', 'AT')
BINARY_VRS = ('OB', 'OW', 'OF', 'OD', 'OL', 'OV', 'UN')


def load_deid_table(path=DEID_TABLE):
    """{tag: action} for plain tags, [(mask, value, action)] for rows with x wildcards like 50xxxxxx."""
    exact, wildcards = {}, []
    for line in open(path):
        if line.startswith('#') or not line.strip():
            continue
        tag, action, _name = line.rstrip('\n').split('\t')
        if 'x' in tag:
            wildcards.append((int(''.join('0' if c == 'x' else 'F' for c in tag), 16), int(tag.replace('x', '0'), 16), action))
        else:
            exact[int(tag, 16)] = action
    return exact, wildcards


class Deidentifier:
    """Applies the profile; one instance per run, so that UIDs map the same way across files."""

    def __init__(self, table_path=DEID_TABLE):
        self.exact, self.wildcards = load_deid_table(table_path)
        self.key = secrets.token_bytes(32)
        sha = hashlib.sha256(Path(table_path).read_bytes()).hexdigest()[:12]
        self.method = f"DICOM PS3.15 E.1 Basic Profile, table sha256 {sha}"  # LO: 64 chars at most

    def new_uid(self, uid):
        digest = hmac.new(self.key, str(uid).strip().encode(), hashlib.sha256).digest()
        return '2.25.' + str(int.from_bytes(digest[:16], 'big'))

    def action(self, tag):
        a = self.exact.get(int(tag)) or next((a for mask, value, a in self.wildcards if int(tag) & mask == value), 'K')
        return a.split('/')[-1].rstrip('*')  # the last of a compound action, see above

    def clean(self, ds):
        for elem in list(ds):  # a copy: we delete while walking
            if elem.tag.is_private:
                del ds[elem.tag]
                continue
            a, vr = self.action(elem.tag), str(elem.VR)
            if vr == 'PN' and a == 'K' and self.exact.get(int(elem.tag)) != 'K':
                a = 'Z'  # a person's name the table does not list (e.g. Evaluator Name): emptied, never kept
            if a == 'X':
                del ds[elem.tag]
            elif vr == 'SQ':
                if a in ('Z', 'D', 'C'):
                    elem.value = []
                else:  # K or U*: keep the items, de-identify inside them
                    for item in elem.value:
                        self.clean(item)
            elif a == 'U' and elem.value:
                elem.value = ([self.new_uid(u) for u in elem.value] if elem.VM > 1 else self.new_uid(elem.value))
            elif a in ('Z', 'D', 'C'):
                if a == 'Z' or vr in BINARY_VRS or vr == 'UR':
                    elem.value = b'' if vr in BINARY_VRS else None if vr.startswith(NUMERIC_VRS) else ''
                elif vr == 'UI':
                    elem.value = self.new_uid(elem.value or 'dummy')
                else:
                    elem.value = 0 if vr.startswith(NUMERIC_VRS) else DUMMY.get(vr, 'ANONYMIZED')
        return ds

    def __call__(self, ds):
        """De-identify ds in place (its file meta too: Media Storage SOP Instance UID is a U row)."""
        self.clean(ds)
        if getattr(ds, 'file_meta', None) is not None:
            self.clean(ds.file_meta)
        ds.PatientIdentityRemoved = 'YES'
        ds.DeidentificationMethod = self.method
        code = pydicom.Dataset()
        code.CodeValue, code.CodingSchemeDesignator = '113100', 'DCM'
        code.CodeMeaning = 'Basic Application Confidentiality Profile'
        ds.DeidentificationMethodCodeSequence = [code]
        return ds


BURNED_IN_POLICIES = ('refuse', 'flag')
BURNED_IN_RARE = ('CT', 'MR', 'CR', 'DX', 'MG')  # modalities whose original images rarely carry burned-in text
SECONDARY_CAPTURE = '1.2.840.10008.5.1.4.1.1.7'  # SOP Class UID prefix of the secondary capture images


def burned_in_refusal(ds, policy):
    """Why an image is refused under the burned-in text policy (docs/datasets.md), or '' if it may be used.
    Pixels are never cleaned here, so Burned In Annotation (0028,0301) YES is always refused. When the
    attribute is absent (or empty), the risk depends on where the image comes from: screen captures,
    ultrasound, angiography, endoscopy and derived or secondary images often show the patient's name;
    the original images of CT, MR, CR, DX and MG rarely do. 'refuse' keeps only the latter (with a
    warning); 'flag' means the user looked at the pixels, and keeps every image without the attribute."""
    if policy not in BURNED_IN_POLICIES:
        raise ValueError(f"--burned_in must be 'refuse' or 'flag', got {policy!r}")
    value = str(ds.get('BurnedInAnnotation', '') or '').strip().upper()
    if value == 'NO':
        return ''
    if value == 'YES':
        return ("refused: Burned In Annotation is YES (the pixels show text, maybe a name; prepare.py does not "
                "clean pixels: blank the text with an imaging tool and set it to NO)")
    if policy == 'flag':
        return ''
    modality = str(ds.get('Modality', '') or '').strip().upper()
    image_type = ds.get('ImageType') or []
    image_type = {str(v).strip().upper() for v in ([image_type] if isinstance(image_type, str) else image_type)}
    why = ('a secondary capture' if str(ds.get('SOPClassUID', '')).startswith(SECONDARY_CAPTURE) else
           f"ImageType {'/'.join(sorted(image_type & {'DERIVED', 'SECONDARY'}))}" if image_type & {'DERIVED', 'SECONDARY'}
           else f"modality {modality or 'not given'}" if modality not in BURNED_IN_RARE else '')
    if not why:
        return ''
    return (f"refused: Burned In Annotation is {'absent' if not value else repr(value)} and the image is {why}, "
            f"where text in the pixels is common (look at them, then use --burned_in=flag)")


def burned_in_unknown(ds):
    """True if the image does not say whether its pixels hold text (kept with a warning, or flagged)."""
    return str(ds.get('BurnedInAnnotation', '') or '').strip().upper() != 'NO'


def dicom_files(root):
    return [p for p in files_under(root) if p.name != 'DICOMDIR']


UID_NAME = re.compile(r'[0-9]+(\.[0-9]+)*')


def uid_name(value, fallback):
    """A UID as a file or folder name, or fallback when it is empty or holds anything but digits and dots
    (never an empty name, a hidden '.dcm', a '/' or '..')."""
    value = str(value or '').strip().rstrip('\x00')
    return value if UID_NAME.fullmatch(value) and len(value) <= 64 else fallback


def check_input_folder(path, what):
    """A folder of inputs given on the command line: missing or a file is a one-line error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist: give the folder that holds the files")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} {path} is a file, not a folder: give the folder that holds the files "
                                 f"(put a single file in a folder of its own)")
    return path


def anonymize_folder(in_dir, out_dir, burned_in='refuse'):
    """`python prepare.py dicom --anonymize_only IN OUT`: every DICOM file under IN, de-identified, into
    OUT/<new study UID>/<new series UID>/<new SOP instance UID>.dcm (the original names and folders
    may carry names, so they are not reused). Every input ends as exactly one output file, a refusal or
    an unreadable file, each listed with its reason. Inputs that share a SOP Instance UID (one image in
    two encodings, or copies) are kept apart as <uid>_2.dcm, ... and listed. Nothing written at all is an
    error: OUT is then not created."""
    in_dir, out_dir = check_input_folder(in_dir, 'IN'), Path(out_dir)
    burned_in_refusal(pydicom.Dataset(), burned_in)  # the policy's spelling, before any work
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; pick another OUT")
    files = dicom_files(in_dir)
    if not files:
        raise FileNotFoundError(f"no files under IN {in_dir}")
    deid, unreadable, refused, renamed, unknown = Deidentifier(), [], [], [], []
    with staging_dir(out_dir) as tmp:
        for p in files:
            try:  # pydicom decodes values lazily: a damaged file can fail in dcmread, de-identification or encoding
                ds = pydicom.dcmread(p)
                refusal = burned_in_refusal(ds, burned_in)
                if not refusal:
                    flagged = burned_in_unknown(ds)
                    encoded = io.BytesIO()
                    deid(ds).save_as(encoded, enforce_file_format=False)
            except Exception as e:
                unreadable.append({'file': str(p), 'reason': f"not a readable DICOM file ({type(e).__name__}: {e})"})
                continue
            if refusal:
                refused.append({'file': str(p), 'reason': refusal})
                continue
            folder = tmp / uid_name(ds.get('StudyInstanceUID'), 'no-study-uid') / \
                uid_name(ds.get('SeriesInstanceUID'), 'no-series-uid')
            folder.mkdir(parents=True, exist_ok=True)
            stem = uid_name(ds.get('SOPInstanceUID'), 'no-instance-uid')
            dest, k = folder / f'{stem}.dcm', 1
            while dest.exists():  # never over another output: one UID in two files, or no UID at all
                k += 1
                dest = folder / f'{stem}_{k}.dcm'
            with open(dest, 'xb') as f:  # (a full disk is not skipped)
                f.write(encoded.getvalue())
            if k > 1:
                renamed.append({'file': str(p), 'reason': f"shares its SOP Instance UID with an earlier input: "
                                                          f"written as {dest.relative_to(tmp)}"})
            if flagged:
                unknown.append(p)
        written = sum(1 for _ in tmp.rglob('*.dcm'))  # what is on disk, not what we meant to write
        report_skipped(unreadable, limit=None)  # no meta.json here: the console is the only list
        report_skipped(refused, title='refused {n} input(s) for burned-in text (docs/datasets.md, dicom)', limit=None)
        report_skipped(renamed, title='kept apart {n} input(s) whose SOP Instance UID another input has', limit=None)
        if unknown:
            print(f"warning: {len(unknown)} written image(s) do not say whether their pixels show text (no Burned "
                  f"In Annotation): " + ('you checked them (--burned_in=flag)' if burned_in == 'flag' else
                                         f"{'/'.join(BURNED_IN_RARE)} originals, where it is rare; look at a few"))
        print(f"de-identified {written} file(s) into {out_dir} ({len(files)} input(s): {written} written, "
              f"{len(refused)} refused, {len(unreadable)} unreadable)")
        if not written:
            raise ValueError(f"nothing written: none of the {len(files)} file(s) under {in_dir} could be de-identified "
                             f"(the reasons are listed above)")
    return out_dir


def dicom_frames(ds, size, window, channels=1, keep=None):
    """Pixel data -> list of uint8 (size, size, channels): modality rescale (slope, intercept) to real units
    (e.g. Hounsfield), then the window (--window=center,width, else the file's first window, else the
    0.5-99.5 percentiles of all frames), MONOCHROME1 inverted so that dense is bright. Colour becomes
    luminance (channels=1) or stays RGB (channels=3, where grey is repeated). keep: the frame indices
    to return (default all)."""
    a = ds.pixel_array.astype(np.float32)
    frames = int(ds.get('NumberOfFrames', 1) or 1)
    colour = int(ds.get('SamplesPerPixel', 1)) == 3
    if frames == 1:
        a = a[None]
    if colour and channels == 1:
        a = a @ np.array([0.299, 0.587, 0.114], np.float32)  # pixel_array gives RGB
    elif not colour:
        a = a * float(ds.get('RescaleSlope', 1) or 1) + float(ds.get('RescaleIntercept', 0) or 0)
    first = lambda v: float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
    if colour:
        lo, hi = 0.0, 255.0
    elif window:
        c, w = (float(x) for x in window.split(','))
        lo, hi = c - w / 2, c + w / 2
    elif 'WindowCenter' in ds and 'WindowWidth' in ds:
        c, w = first(ds.WindowCenter), first(ds.WindowWidth)
        lo, hi = c - w / 2, c + w / 2
    else:
        lo, hi = np.percentile(a, [0.5, 99.5])
    out = []
    for f in (a if keep is None else a[list(keep)]):
        img = to_uint8(f, lo, hi)
        if ds.get('PhotometricInterpretation') == 'MONOCHROME1':
            img = 255 - img
        im = square_resize(Image.fromarray(img), size)
        out.append(np.asarray(im.convert('RGB') if channels == 3 else im).reshape(size, size, channels))
    return out


def prepare_dicom(out_dir='data/dicom', source: str = '', size: int = 224, window: str = '',
                  burned_in: str = 'refuse', val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0):
    """
    A folder of DICOM series (any layout, any file names) -> grey 2-D images, one per frame, with
    de-identified metadata: {split}_metadata.jsonl holds, line i for image i, the DICOM JSON model of
    the de-identified header (pixel data left out) plus the frame number. Split grouped by patient:
    groups are small integers numbered from the original Patient IDs inside this run, which are never
    written. Unlabelled (labels -1). Also: --anonymize_only IN OUT de-identifies files without
    converting (see anonymize_folder).
    """
    t0 = time.time()
    args = {'source': private_path(source), 'size': size, 'window': window, 'burned_in': burned_in,
            'val_fraction': val_fraction, 'test_fraction': test_fraction, 'seed': seed}
    if is_up_to_date(out_dir, args):
        return Path(out_dir)
    burned_in_refusal(pydicom.Dataset(), burned_in)  # the policy's spelling, before any work
    roots = get_raw('dicom', out_dir, source, how_to_get="Give the folder with --source.")
    deid, skipped, refused, images, headers, patients = Deidentifier(), [], [], [], [], []
    n_flagged = n_used = 0
    files = [p for r in roots for p in dicom_files(r)]
    for p in files:
        try:
            ds = pydicom.dcmread(p)
            if 'PixelData' not in ds:
                raise ValueError("no pixel data: not an image")
            refusal = burned_in_refusal(ds, burned_in)
            if refusal:
                refused.append({'file': str(p), 'reason': refusal})
                continue
            frames = dicom_frames(ds, size, window)
            patient = str(ds.get('PatientID', '')) or str(ds.get('StudyInstanceUID', p))  # read before de-id
            flagged = burned_in_unknown(ds)
            del ds.PixelData
            header = deid(ds).to_json_dict(bulk_data_threshold=1 << 30, bulk_data_element_handler=lambda e: None)
        except Exception as e:  # pydicom: InvalidDicomError, missing pixel handlers, truncated data...
            skipped.append({'file': str(p), 'reason': f"{type(e).__name__}: {e}"})
            continue
        n_used += 1
        n_flagged += flagged * len(frames)
        patients += [patient] * len(frames)
        headers += [{'frame': k, 'burned_in_flag': flagged, 'header': header} for k in range(len(frames))]
        images += frames
    print(f"{len(files)} input file(s): {n_used} converted ({len(images)} image(s)), {len(refused)} refused, "
          f"{len(skipped)} unreadable or not images")
    if not images:
        report_skipped(skipped, title='skipped {n} input(s), unreadable or not images')
        report_skipped(refused, title='refused {n} input(s) for burned-in text (docs/datasets.md, dicom)')
        raise ValueError(f"no usable DICOM image under {source}")
    groups = np.unique(patients, return_inverse=True)[1]
    split = split_by_group(groups, val_fraction, test_fraction, seed)
    with staging_dir(out_dir) as tmp:
        for s in SPLITS:
            ids = np.flatnonzero(split == s)
            write_split(tmp, s, np.stack([images[i] for i in ids]), np.full(len(ids), -1), groups=groups[ids])
            with open(tmp / f'{s}_metadata.jsonl', 'w') as f:
                for i in ids:
                    f.write(json.dumps(headers[i]) + '\n')
        write_meta(tmp, 'dicom', [], args=args, **SOURCES['local'], task='unlabeled',
                   split_rule=f"grouped by patient, val/test fractions {val_fraction}/{test_fraction}, seed {seed}",
                   deidentification=deid.method, burned_in_policy=burned_in, burned_in_flagged=n_flagged,
                   metadata_files=[f'{s}_metadata.jsonl' for s in SPLITS], inputs=len(files),
                   skipped=report_skipped(skipped, private=True, title='skipped {n} input(s), unreadable or not images'),
                   refused=report_skipped(refused, private=True, title='refused {n} input(s) for burned-in text '
                                                                      '(docs/datasets.md, dicom)'))
        if n_flagged:
            print(f"warning: {n_flagged} image(s) do not say whether their pixels show text (no Burned In "
                  f"Annotation); each has burned_in_flag in its metadata line")
    return finish(out_dir, t0)

# --- video: clips from frame folders, GIF / multi-page TIFF, multi-frame DICOM ------------------
#
# A clip is stored as `frames` frames, (N, T, H, W, C), with "video": true in meta.json; medjepa3d.py
# reads that flag and trains with --video=True (blocks span all frames, no crops in time). What the
# dependencies can decode: a folder of frame pictures (PNG, JPEG, BMP; in natural name order, so
# frame_2 comes before frame_10), an animated GIF or a multi-page TIFF (Pillow), a multi-frame DICOM
# such as an ultrasound cine (pydicom). AVI / MP4 need a video decoder (ffmpeg), which is not a
# dependency: such files are listed as skipped with the ffmpeg command that turns them into frames.

FRAME_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp')  # a folder holding these is one clip, a picture per frame
CLIP_SUFFIXES = ('.gif', '.tif', '.tiff', '.dcm')   # a file with one of these is one clip
MOVIE_SUFFIXES = ('.avi', '.mp4', '.mov', '.mkv', '.webm', '.mpg', '.mpeg', '.wmv')  # need ffmpeg: reported


def natural_key(path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r'(\d+)', path.name)]


def is_dicom(path):
    """A .dcm file, or a file without suffix that starts like DICOM (128-byte preamble, then 'DICM')."""
    if path.suffix:
        return path.suffix.lower() == '.dcm'
    with open(path, 'rb') as f:
        return f.read(132)[128:] == b'DICM'


def find_clips(roots):
    """Every clip under roots: the folders that hold frame pictures, and the clip files (GIF, TIFF, DICOM,
    and movies, which are reported) outside those folders."""
    files = [p for r in roots for p in files_under(r)]
    frame_dirs = {p.parent for p in files if p.suffix.lower() in FRAME_SUFFIXES}
    clips = [p for p in files if p.parent not in frame_dirs
             and (p.suffix.lower() in CLIP_SUFFIXES + MOVIE_SUFFIXES or is_dicom(p))]
    return sorted(frame_dirs) + clips


def sample_frames(n, frames, stride):
    """The indices of `frames` frames, `stride` apart, from the middle of an n-frame clip."""
    span = (frames - 1) * stride + 1
    if n < span:
        raise ValueError(f"{n} frame(s); --frames={frames} --stride={stride} need {span}: lower --stride or --frames")
    start = (n - span) // 2
    return list(range(start, start + span, stride))


def load_clip(path, frames, stride, size, channels, window='', burned_in='refuse'):
    """One clip -> uint8 (frames, size, size, channels). Pictures with 16-bit or float pixels are
    stretched from the clip's min..max (one scale for all its frames); DICOM as in dicom_frames."""
    path = Path(path)
    if path.suffix.lower() in MOVIE_SUFFIXES:
        raise ValueError(f"{path.suffix} needs a video decoder (ffmpeg), not a dependency of prepare.py: turn it "
                         f"into a folder of frames, e.g. mkdir {path.stem} && ffmpeg -i {path.name} {path.stem}/%05d.png")
    if path.is_file() and is_dicom(path):
        ds = pydicom.dcmread(path)
        if 'PixelData' not in ds:
            raise ValueError("no pixel data")
        if refusal := burned_in_refusal(ds, burned_in):
            raise ValueError(refusal)
        keep = sample_frames(int(ds.get('NumberOfFrames', 1) or 1), frames, stride)
        return np.stack(dicom_frames(ds, size, window, channels, keep))
    pages = []
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.is_file() and visible(p) and p.suffix.lower() in FRAME_SUFFIXES),
                       key=natural_key)
        for i in sample_frames(len(files), frames, stride):
            try:
                with Image.open(files[i]) as im:
                    im.load()
                    pages.append(im.copy())
            except Exception as e:  # name the frame: the clip is the folder
                raise ValueError(f"frame {files[i].name}: {type(e).__name__}: {e}") from e
    else:
        with Image.open(path) as im:  # an animated GIF or a multi-page TIFF
            for i in sample_frames(getattr(im, 'n_frames', 1), frames, stride):
                im.seek(i)
                im.load()
                pages.append(im.copy())
    deep = [np.asarray(p, np.float32) for p in pages if p.mode.startswith('I') or p.mode == 'F']
    lo_hi = (min(a.min() for a in deep), max(a.max() for a in deep)) if deep else None
    return np.stack([picture_array(p, size, channels, lo_hi) for p in pages])


def decode_clips(job, stride=1, window='', burned_in='refuse'):
    """Worker: [(i, clip path, None)] -> [(i, clip, None, error)]; a clip that does not decode is reported."""
    (frames, size, _, channels), items = job
    out = []
    for i, path, _ in items:
        try:
            out.append((i, load_clip(path, frames, stride, size, channels, window, burned_in), None, None))
        except Exception as e:  # Pillow, pydicom and the checks above
            out.append((i, None, None, f"{type(e).__name__}: {e}"))
    return out


def prepare_video(out_dir='data/video', source: str = '', frames: int = 16, stride: int = 2, size: int = 112,
                  channels: int = 1, window: str = '', burned_in: str = 'refuse', val_fraction: float = 0.15,
                  test_fraction: float = 0.15, seed: int = 0, workers: int = 0):
    """
    Clips from a folder, labelled like `folder`: class sub-folders (source/<class>/<clip>) or a flat
    folder (unlabelled). A clip is a folder of frame pictures, an animated GIF, a multi-page TIFF or a
    multi-frame DICOM; `frames` frames `stride` apart are taken from its middle (shorter clips are
    skipped and listed), each centre-cropped to a square and resized to size x size. DICOM: --window
    and --burned_in as in `dicom` (only pixels are stored, no header); clips of one Patient ID stay in
    one split. Split stratified by label. AVI / MP4: convert to frame folders with ffmpeg first.
    """
    t0 = time.time()
    args = {'source': private_path(source), 'frames': frames, 'stride': stride, 'size': size, 'channels': channels,
            'window': window, 'burned_in': burned_in, 'val_fraction': val_fraction,
            'test_fraction': test_fraction, 'seed': seed}
    if channels not in (1, 3) or frames < 1 or stride < 1:
        raise ValueError(f"--channels must be 1 or 3 and --frames, --stride at least 1; got {channels}, {frames}, {stride}")
    burned_in_refusal(pydicom.Dataset(), burned_in)  # checks the policy's spelling before any work
    if is_up_to_date(out_dir, args):
        return Path(out_dir)
    roots = get_raw('video', out_dir, source, how_to_get="Give the folder with --source.")
    paths = find_clips(roots)
    if not paths:
        raise FileNotFoundError(f"no clips under {source}: folders of {', '.join(FRAME_SUFFIXES)} frames or "
                                f"{', '.join(CLIP_SUFFIXES)} files (docs/datasets.md, video)")
    flat = all(p.parent in roots for p in paths)
    names = None if flat else [p.parent.name for p in paths]
    classes = sorted(set(names)) if names else []
    labels = np.array([classes.index(n) for n in names] if names else [-1] * len(paths))
    patients = [str(p) for p in paths]  # DICOM clips of one patient share a group; any other clip is its own
    for k, p in enumerate(paths):
        if p.is_file() and is_dicom(p):
            try:
                patients[k] = 'patient ' + str(pydicom.dcmread(p, stop_before_pixels=True).get('PatientID', '') or p)
            except Exception:
                pass  # unreadable: reported when it is decoded
    group_ids = np.unique(patients, return_inverse=True)[1]
    split = split_by_group(group_ids, val_fraction, test_fraction, seed, strata=labels)
    skipped = []
    decode = functools.partial(decode_clips, stride=stride, window=window, burned_in=burned_in)
    with staging_dir(out_dir) as tmp:
        for s in SPLITS:
            ids = np.flatnonzero(split == s)
            convert_split(tmp, s, [paths[i] for i in ids], decode, (frames, size, size, channels), skipped,
                          default_workers(workers), chunk=4, labels=labels[ids], groups=group_ids[ids])
        write_meta(tmp, 'video', classes, args=args, **SOURCES['local'], task='multiclass' if names else 'unlabeled',
                   split_rule=f"stratified by label, DICOM clips grouped by patient, val/test fractions "
                              f"{val_fraction}/{test_fraction}, seed {seed}",
                   video=True, frames=frames, frame_stride=stride,
                   axes='(N, T, H, W, C) = (clip, frame, row, column, channel)',
                   skipped=report_skipped(skipped, private=True))
    return finish(out_dir, t0)

# -----------------------------------------------------------------------------
# slices: a 2-D data set cut out of a prepared volume data set (demo3d, msd_*, brats2021, nifti, ...)

SLICE_AXES = ('D', 'H', 'W')  # --axis=0/1/2 of the source's (N, D, H, W, C) volumes
SLICE_COPY = ('modality', 'modalities', 'intensity', 'ordinal', 'site_names', 'mask_labels', 'mask_classes')


def volume_source(source):
    """A folder written by prepare.py that holds volumes -> (meta, {split: {key: memory-mapped array or None}}).
    ValueError / FileNotFoundError naming the problem and the fix when it is not one."""
    src = Path(source)
    if not source:
        raise ValueError("--source is required: a folder of volumes written by prepare.py, "
                         "e.g. --source=data/demo3d (make it with python prepare.py demo3d)")
    if not src.is_dir():
        raise FileNotFoundError(f"--source={source}: no such folder. Prepare the volumes first "
                                f"(e.g. python prepare.py demo3d) or fix the path")
    if not (src / 'meta.json').is_file():
        raise FileNotFoundError(f"--source={source} has no meta.json: it is not a data set written by prepare.py")
    try:
        meta = json.loads((src / 'meta.json').read_text())
    except ValueError as e:
        raise ValueError(f"--source={source}: meta.json is not valid JSON ({e}); prepare the source again") from None
    arrays = {}
    for split in SPLITS:
        arrays[split] = {key: np.load(src / f'{split}_{key}.npy', mmap_mode='r', allow_pickle=False)
                         if (src / f'{split}_{key}.npy').is_file() else None
                         for key in ('images', 'labels', 'masks', 'groups', 'sites')}
        x = arrays[split]['images']
        if x is None or arrays[split]['labels'] is None:
            raise FileNotFoundError(f"--source={source} lacks {split}_images.npy or {split}_labels.npy: "
                                    f"the data set is incomplete, prepare it again")
        if meta.get('spatial_dims', 2) != 3 or x.ndim != 5:
            raise ValueError(f"--source={source} holds 2-D images {x.dtype} {tuple(x.shape)}, not volumes "
                             f"(N, D, H, W, C): slices cuts volume data sets (demo3d, msd_*, brats2021, nifti, ...)"
                             if x.ndim == 4 else f"--source={source}: {split}_images.npy is {x.dtype} "
                             f"{tuple(x.shape)} but meta.json's spatial_dims is {meta.get('spatial_dims', 2)}; "
                             f"prepare the source again")
        if x.dtype != np.uint8 or len(x) == 0:
            raise ValueError(f"--source={source}: {split}_images.npy is {x.dtype} {tuple(x.shape)}, not non-empty "
                             f"uint8 (N, D, H, W, C); prepare the source again")
        for key, a in arrays[split].items():
            if a is not None and len(a) != len(x):
                raise ValueError(f"--source={source}: {split}_{key}.npy has {len(a)} rows but {split}_images.npy "
                                 f"{len(x)}; prepare the source again")
        m = arrays[split]['masks']
        if m is not None and (m.dtype != np.uint8 or m.shape != x.shape[:-1]):
            raise ValueError(f"--source={source}: {split}_masks.npy is {m.dtype} {tuple(m.shape)}, not uint8 "
                             f"{tuple(x.shape[:-1])}; prepare the source again")
    if len({arrays[s]['images'].shape[1:] for s in SPLITS}) != 1:
        raise ValueError(f"--source={source}: the splits hold volumes of different shapes "
                         f"({', '.join(str(tuple(arrays[s]['images'].shape[1:])) for s in SPLITS)}); prepare it again")
    for key in ('masks', 'groups', 'sites'):  # optional files: all three splits or none (docs/data_format.md)
        if len({arrays[s][key] is None for s in SPLITS}) != 1:
            raise ValueError(f"--source={source} has {key} for some splits only; prepare the source again")
    if arrays['train']['groups'] is not None:
        ids = {s: set(np.asarray(arrays[s]['groups']).tolist()) for s in SPLITS}
        for a, b in (('train', 'val'), ('train', 'test'), ('val', 'test')):
            if ids[a] & ids[b]:
                shared = sorted(ids[a] & ids[b])
                raise ValueError(f"--source={source}: {len(shared)} subject id(s) (groups) are in both {a} and {b} "
                                 f"(e.g. {', '.join(map(str, shared[:5]))}), so their slices would be too: prepare "
                                 f"the source with a split by subject")
    return meta, arrays


def source_fingerprint(source):
    """sha256 of the source's meta.json and of each array file's name, size and modification time: it
    changes whenever the source is prepared again or an array is rewritten (the arrays are not read)."""
    h = hashlib.sha256((Path(source) / 'meta.json').read_bytes())
    for p in sorted(Path(source).glob('*.npy')):
        st = p.stat()
        h.update(f"{p.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def kept_slices(a, axis, positions, min_foreground, chunk):
    """Which chosen slices of each volume of a split have at least min_foreground foreground pixels ->
    (volumes, len(positions)) bool. Foreground: label > 0 in the mask when there are masks, else a pixel
    with any channel > 0 (prepare.py stores air, padding and MRI background as 0)."""
    keep = np.empty((len(a['images']), len(positions)), bool)
    other = tuple(d + 1 for d in range(3) if d != axis)  # the slice's two axes in (n, D, H, W)
    for i in range(0, len(keep), chunk):
        fg = (np.asarray(a['masks'][i:i + chunk]) > 0 if a['masks'] is not None
              else (np.asarray(a['images'][i:i + chunk]) > 0).any(-1))
        keep[i:i + chunk] = np.take(fg, positions, axis=axis + 1).sum(other) >= min_foreground
    return keep


def write_slices(tmp, split, a, axis, keep, positions, size, offset, chunk, groups, mask_max):
    """Cut the kept slices of one split's volumes (a: {key: array}) into {split}_*.npy, volume by volume in
    slice order, each at `offset` (top, left) in a zero (label 0) image of `size` (H, W). groups: one id per
    volume. A memory-mapped staging array keeps memory bounded (as convert_split)."""
    vol, pos = np.nonzero(keep)
    (top, left), C = offset, a['images'].shape[-1]
    H, W = (a['images'].shape[1 + d] for d in range(3) if d != axis)  # a slice's rows and columns
    inside = (slice(None), slice(top, top + H), slice(left, left + W))
    partial = Path(tmp) / f'.{split}.partial'
    partial.mkdir()
    images = np.lib.format.open_memmap(partial / 'images.npy', 'w+', np.uint8, (len(vol), *size, C))
    masks = (np.lib.format.open_memmap(partial / 'masks.npy', 'w+', np.uint8, (len(vol), *size))
             if a['masks'] is not None else None)
    k = 0
    for i in range(0, len(keep), chunk):
        x = np.asarray(a['images'][i:i + chunk])
        m = np.asarray(a['masks'][i:i + chunk]) if masks is not None else None
        for j in range(len(x)):
            p = positions[keep[i + j]]
            cut = lambda v: np.moveaxis(np.take(v, p, axis=axis), axis, 0)  # (len(p), rows, columns[, C])
            images[k:k + len(p)][inside] = cut(x[j])
            if masks is not None:
                masks[k:k + len(p)][inside] = cut(m[j])
            k += len(p)
    write_split(tmp, split, images, labels=np.asarray(a['labels'])[vol], masks=masks, groups=np.asarray(groups)[vol],
                sites=np.asarray(a['sites'])[vol] if a['sites'] is not None else None, mask_max=mask_max)
    np.save(Path(tmp) / f'{split}_slice_index.npy', np.stack([vol, positions[pos]], 1).astype(np.int64))
    del images, masks
    shutil.rmtree(partial)


def prepare_slices(out_dir=None, source: str = '', axis: int = 0, stride: int = 1, skip_empty: bool = True,
                   min_foreground: int = 1, pad_square: bool = True):
    """
    A 2-D data set of slices cut out of a prepared volume data set (any folder prepare.py wrote with
    (N, D, H, W, C) images: demo3d, msd_*, brats2021, nifti, the *mnist3d sets, video clips), for
    medjepa.py and eval.py. --axis: 0 = D (axial for NIfTI volumes, time for clips), 1 = H, 2 = W;
    --stride=k: every k-th slice, from the first. --skip_empty: drop the slices with fewer than
    --min_foreground foreground pixels: label > 0 in the volume's mask, or, for sets without masks, any
    channel > 0. Each slice keeps its volume's split, group (the subject; each volume is its own
    subject when the source has no groups), site, label (a volume's label on all its slices: task and
    classes stay the source's) and mask (the slice of its label map, mask_labels carried over).
    --pad_square: a non-square slice is padded with 0 (label 0) to a centred square (medjepa.py trains on
    square crops, which would stretch it). Default --out: <source>_slices. A source prepared again since
    (source_fingerprint) is cut again; other changed options are refused, as everywhere.
    """
    t0 = time.time()
    if axis not in (0, 1, 2):
        raise ValueError(f"--axis must be 0 (D), 1 (H) or 2 (W) of the (N, D, H, W, C) volumes, got {axis}")
    if stride < 1 or min_foreground < 1:
        raise ValueError(f"--stride and --min_foreground must be at least 1, got {stride} and {min_foreground}")
    meta, arrays = volume_source(source)
    out_dir = Path(out_dir or f"{source.rstrip('/')}_slices")
    if out_dir.resolve() == Path(source).resolve():
        raise ValueError(f"--out={out_dir} is the source folder: pick another --out")
    args = {'source': str(Path(source)), 'axis': axis, 'stride': stride, 'skip_empty': skip_empty,
            'min_foreground': min_foreground, 'pad_square': pad_square, 'source_fingerprint': source_fingerprint(source)}
    try:
        old = json.loads((out_dir / 'meta.json').read_text()).get('args') or {}
    except (OSError, ValueError, AttributeError):
        old = {}
    stale = (old.get('source_fingerprint') not in (None, args['source_fingerprint'])
             and {**old, 'source_fingerprint': None} == {**args, 'source_fingerprint': None})
    if stale:
        print(f"{out_dir}: {source} was prepared again since these slices were made: cutting them again")
    elif is_up_to_date(out_dir, args):
        return out_dir
    shape = arrays['train']['images'].shape[1:]  # (D, H, W, C)
    rows, cols = [d for d in range(3) if d != axis]
    H, W = shape[rows], shape[cols]
    size = (max(H, W),) * 2 if pad_square else (H, W)
    offset = ((size[0] - H) // 2, (size[1] - W) // 2)
    positions = np.arange(0, shape[axis], stride)
    chunk = max(1, 2**28 // math.prod(shape))  # volumes read at a time: ~256 MB of uint8
    has_masks, has_groups = arrays['train']['masks'] is not None, arrays['train']['groups'] is not None
    foreground = "label > 0 in the volume's mask" if has_masks else "a pixel with any channel > 0"
    print(f"slices of {source} ({meta.get('name', '?')}: volumes {'x'.join(map(str, shape[:3]))}, {shape[3]} "
          f"channel(s)) along axis {axis} ({SLICE_AXES[axis]}), every {stride}: {len(positions)} per volume, "
          f"{size[0]}x{size[1]} px" + (f", skipping slices with < {min_foreground} foreground pixels" if skip_empty else ''))
    counts, first_id = {}, 0
    previous = out_dir.parent / f'.{out_dir.name}.previous-{os.getpid()}' if stale else None
    try:
        with staging_dir(out_dir) as tmp:
            for split in SPLITS:
                a = arrays[split]
                keep = (kept_slices(a, axis, positions, min_foreground, chunk) if skip_empty
                        else np.ones((len(a['images']), len(positions)), bool))
                if not keep.any():
                    raise ValueError(f"no slice of the {split} split has {min_foreground} foreground pixel(s) "
                                     f"({foreground}): lower --min_foreground or pass --skip_empty=False")
                # no groups in the source: each volume is its own subject, numbered across the splits
                groups = a['groups'] if has_groups else np.arange(first_id, first_id + len(keep))
                first_id += len(keep)
                write_slices(tmp, split, a, axis, keep, positions, size, offset, chunk, groups,
                             mask_max=max(1, len(meta.get('mask_labels') or []) - 1))
                counts[split] = {'volumes': len(keep), 'volumes_with_slices': int(keep.any(1).sum()),
                                 'slices_taken': keep.size, 'skipped_empty': int((~keep).sum()), 'slices': int(keep.sum())}
                print(f"  {split:5s}: {keep.sum()} slices from {keep.any(1).sum()} of {len(keep)} volumes"
                      + (f" ({counts[split]['skipped_empty']} empty ones skipped)" if skip_empty else ''))
            task, extra = meta.get('task', 'multiclass'), {key: meta[key] for key in SLICE_COPY if key in meta}
            if 'spacing' in meta:  # the slices' pixel size (mm), rows then columns
                extra['spacing'] = [meta['spacing'][rows], meta['spacing'][cols]]
            write_meta(tmp, 'slices', meta.get('classes') or [], task=task, args=args,
                       split_rule=f"each slice stays in its volume's split; the source's rule: "
                                  f"{meta.get('split_rule', 'not recorded')}",
                       source=f"slices of the data set '{meta.get('name', '?')}' in {source} (prepare.py slices); "
                              f"its source: {meta.get('source', 'not recorded')}",
                       licence=meta.get('licence'), citation=meta.get('citation'),
                       source_dataset=meta.get('name'), source_image_size=meta.get('image_size'),
                       source_video=bool(meta.get('video', False)),
                       slicing={'axis': axis, 'axis_name': SLICE_AXES[axis], 'stride': stride,
                                'positions': f"{SLICE_AXES[axis]} = 0, {stride}, {2 * stride}, ... < {shape[axis]}",
                                'skip_empty': skip_empty, 'min_foreground': min_foreground,
                                'empty_rule': f"skipped: slices with fewer than {min_foreground} foreground pixel(s), "
                                              f"foreground = {foreground}" if skip_empty else "none skipped",
                                'pad_square': pad_square, 'slice_size': [H, W], 'offset': list(offset),
                                'per_split': counts},
                       label_rule=("each slice has its volume's label (classes and task as in the source), whether "
                                   "or not the slice shows what the label is about"
                                   if task not in ('segmentation', 'unlabeled')
                                   else f"no image labels (-1, task '{task}' as in the source)")
                                  + ("; masks: the slice of the volume's label map, values named by mask_labels"
                                     if has_masks else ''),
                       groups_rule="the source's groups (subject ids)" if has_groups else
                                   "the source has no groups: each volume is its own subject, numbered across splits",
                       axes=f"(N, H, W, C) = (slice, source axis {SLICE_AXES[rows]}, source axis {SLICE_AXES[cols]}, "
                            f"channel) of the source's (N, D, H, W, C); the source's axes: {meta.get('axes', 'not recorded')}",
                       slice_index="{split}_slice_index.npy: int64 (N, 2) = (volume row in the source's split, slice "
                                   "position along the axis)",
                       **extra)
            if previous is not None:  # the stale folder goes aside only now that its successor is complete
                os.rename(out_dir, previous)
    finally:
        if previous is not None and previous.exists():
            if out_dir.exists():
                shutil.rmtree(previous)
            else:  # the new folder could not be put in place: the old one comes back
                os.rename(previous, out_dir)
    return finish(out_dir, t0)

# -----------------------------------------------------------------------------
# command line: python prepare.py <dataset> [--key=value ...]


DATASETS = {
    'demo': prepare_demo,
    'demo3d': prepare_demo3d,
    'demovideo': prepare_demovideo,
    'ham10000': prepare_ham10000,
    **{flag: functools.partial(prepare_medmnist, flag) for flag in MEDMNIST['flags']},
    'aptos2019': prepare_aptos2019,
    'pcam': prepare_pcam,
    'chestxray14': prepare_chestxray14,
    **{name: functools.partial(prepare_msd, name, size=t[4], spacing=f'{t[3]:g}',  # the help shows the task's defaults
                               **({'window': '{:g},{:g}'.format(*SOFT_TISSUE_WINDOW)} if t[2] == 'CT' else {}))
       for name, t in MSD_TASKS.items()},
    'brats2021': prepare_brats2021,
    'brainlobes': prepare_brainlobes,
    'folder': prepare_folder,
    'dicom': prepare_dicom,
    'nifti': prepare_nifti,
    'video': prepare_video,
    'slices': prepare_slices,
}


def cli_type(param):
    """The type a --key=value string becomes: the annotation (int | None -> int), else the default's."""
    kind = param.annotation
    if kind is inspect.Parameter.empty:
        kind = type(param.default) if param.default is not None else str
    kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    if kind is bool:
        return lambda v: {'true': True, '1': True, 'false': False, '0': False}[v.lower()]
    return kind


def options(fn):
    """A data set's options: its keyword parameters, minus out_dir (which is --out)."""
    return {name: p for name, p in inspect.signature(fn).parameters.items() if name != 'out_dir'}


def default_out(name, fn):
    out = inspect.signature(fn).parameters['out_dir'].default
    return out or ('<source>_slices' if fn is prepare_slices else f'data/{name}')


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    epilog = 'options per data set (--key=value):\n' + '\n'.join(
        f"  {name}: --out={default_out(name, fn)} " + ' '.join(f"--{k}={p.default}" for k, p in options(fn).items())
        for name, fn in DATASETS.items()) + '\n  dicom also: --anonymize_only IN OUT (de-identify files, no arrays)'
    parser = argparse.ArgumentParser(
        prog='prepare.py', description="Prepare a data set in data/<name>/ (docs/data_format.md, docs/datasets.md).",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument('dataset', choices=list(DATASETS), help='which data set to prepare')
    known, rest = parser.parse_known_args(argv)
    fn = DATASETS[known.dataset]
    sub = argparse.ArgumentParser(prog=f'prepare.py {known.dataset}', allow_abbrev=False)
    sub.add_argument('--out', default=None, help='output folder')
    for name, p in options(fn).items():
        sub.add_argument(f'--{name}', type=cli_type(p), default=p.default)
    valid = ['out'] + list(options(fn))
    if known.dataset == 'dicom':
        sub.add_argument('--anonymize_only', nargs=2, metavar=('IN', 'OUT'),
                         help='de-identify the DICOM files under IN into OUT, nothing else')
        valid.append('anonymize_only')
    for token in rest:  # name the closest valid option instead of argparse's bare "unrecognized"
        key = token[2:].split('=', 1)[0] if token.startswith('--') else None
        if key is not None and key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            sub.error(f"unknown option --{key}" + (f"; did you mean --{close[0]}?" if close else
                                                   f"; valid: {' '.join('--' + v for v in valid)}"))
    opts = vars(sub.parse_args(rest))
    out = opts.pop('out')  # None: the function's default (medmnist and msd name it after --size / --fold)
    try:
        if opts.get('anonymize_only'):
            anonymize_folder(*opts['anonymize_only'], burned_in=opts['burned_in'])
        else:
            opts.pop('anonymize_only', None)
            fn(**({'out_dir': out} if out else {}), **opts)
    except (OSError, ValueError) as e:  # missing files, checksums, refused folders, bad options
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
