"""Property-based tests (hypothesis, a test-only dependency): the configurator, the 2-D and 3-D mask
generators and the NIfTI / DICOM readers, on generated input. Examples are derandomised (the same
ones every run, so CI cannot flake) and few enough that the file runs in about 20 s on 2 CPU cores."""
import contextlib
import gzip
import io
import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import medjepa as mj
import medjepa3d as m3
import prepare

pytestmark = pytest.mark.filterwarnings('ignore')  # damaged files make pydicom and nibabel warn, as they should
SETTINGS = dict(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------- configurator

literals = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=False).map(repr),
                     st.tuples(st.floats(-2, 2), st.floats(-2, 2)).map(str),
                     st.tuples(st.integers(-4, 40), st.integers(-4, 40), st.integers(-4, 40)).map(str),
                     st.sampled_from(['True', 'false', '1e999', '-1e999', '()', '[1, 2]', '{1: 2}', '{[]: 1}', 'None',
                                      '(' * 300, '-' * 20000 + '1', '9' * 5000, 'cuda:1', 'cuda:', 'mask', "'x'", '']),
                     st.text(max_size=30))
KEYS = sorted(set(mj.DEFAULTS) | set(m3.DEFAULTS))
args = st.one_of(st.builds(lambda k, v: f'--{k}={v}', st.sampled_from(KEYS), literals),
                 st.builds(lambda k, v: f'--{k}={v}', st.text(max_size=12), st.text(max_size=12)),
                 st.text(max_size=12).map(lambda t: '--' + t.replace('=', '')))


@settings(max_examples=300, **SETTINGS)
@given(st.lists(args, max_size=6), st.sampled_from([mj, m3]))
@example(['--seed={[]: 1}'], mj)  # literal_eval raises TypeError here,
@example(['--seed=' + '-' * 20000 + '1'], mj)  # MemoryError here,
@example(['--patch_size=0'], mj)  # and validate() once divided by this zero
@example(['--patch_size=(4,0,4)'], m3)
def test_configurator_returns_a_valid_config_or_raises_config_error(argv, module):
    """Any --key=value strings: a config that validates, or a ConfigError; no other exception."""
    try:
        cfg = module.validate(mj.configure(argv, module.DEFAULTS))
    except mj.ConfigError as e:
        assert str(e)
        return
    assert set(cfg) == set(module.DEFAULTS)
    for k, v in cfg.items():
        assert type(v) is type(module.DEFAULTS[k]) or isinstance(module.DEFAULTS[k], float) and type(v) is float, k

# ----------------------------------------------------------------------------- 2-D masks


def check_2d(ctx_idx, tgt_idx, B, gh, gw, M, min_keep, context_keep=0.33):
    N = gh * gw
    K = tgt_idx.shape[2]
    assert tgt_idx.shape[:2] == (B, M) and K >= 1
    # exactly L = max(context_keep * N, min_keep) context patches per image, as far as the grid allows
    assert ctx_idx.shape == (B, max(1, min(max(round(context_keep * N), min_keep), N - K)))
    assert (ctx_idx[:, 1:] > ctx_idx[:, :-1]).all()  # sorted, no repeats
    assert ctx_idx.min() >= 0 and max(ctx_idx.max(), tgt_idx.max()) < N and tgt_idx.min() >= 0
    for b in range(B):
        hidden = set(tgt_idx[b].flatten().tolist())
        assert not hidden & set(ctx_idx[b].tolist())  # no target patch is visible
        for m in range(M):  # every target is one axis-aligned h x w rectangle, the same size for all
            r, c = tgt_idx[b, m] // gw, tgt_idx[b, m] % gw
            assert len(set(tgt_idx[b, m].tolist())) == K == (r.max() - r.min() + 1) * (c.max() - c.min() + 1)


scale = st.tuples(st.floats(0.001, 1.0), st.floats(0.001, 1.0)).map(sorted).map(tuple)
aspect = st.tuples(st.floats(0.05, 20.0), st.floats(0.05, 20.0)).map(sorted).map(tuple)


@settings(max_examples=60, **SETTINGS)
@given(st.integers(2, 20), st.integers(2, 20), st.integers(1, 4), st.integers(1, 8), scale, aspect, scale,
       st.floats(0.001, 1.0), st.integers(0, 500), st.integers(0, 2**32 - 1))
def test_2d_masks_are_valid_on_any_grid_and_scales(gh, gw, B, M, target_scale, target_aspect, context_scale, context_keep,
                                                   min_keep, seed):
    ctx_idx, tgt_idx = mj.sample_masks(B, (gh, gw), torch.Generator().manual_seed(seed), num_targets=M,
                                       target_scale=target_scale, target_aspect=target_aspect, context_scale=context_scale,
                                       context_keep=context_keep, min_keep=min_keep)
    check_2d(ctx_idx, tgt_idx, B, gh, gw, M, min_keep, context_keep)


@settings(max_examples=60, **SETTINGS)
@given(st.integers(1, 24), st.sampled_from([4, 8, 16]), st.integers(-1, 8), scale, aspect, scale, st.integers(-5, 300),
       st.floats(-0.5, 1.5))
def test_2d_mask_settings_give_valid_masks_or_a_config_error(g, patch, M, target_scale, target_aspect, context_scale,
                                                             min_keep, scale_lo):
    """Through the configurator, as a user sets them: validate() rejects what cannot work, by name."""
    argv = [f'--image_size={g * patch}', f'--patch_size={patch}', f'--num_targets={M}', f'--min_keep={min_keep}',
            f'--target_scale=({scale_lo}, {target_scale[1]})', f'--target_aspect={target_aspect}',
            f'--context_scale={context_scale}']
    try:
        cfg = mj.validate(mj.configure(argv))
    except mj.ConfigError as e:
        assert any(k in str(e) for k in ('image_size', 'num_targets', 'min_keep', 'target_scale', 'target_aspect',
                                          'context_scale', 'patch_size')), str(e)
        return
    ctx_idx, tgt_idx = mj.sample_masks(3, (g, g), torch.Generator().manual_seed(0), **{k: cfg[k] for k in mj.MASK_KEYS})
    check_2d(ctx_idx, tgt_idx, 3, g, g, M, min_keep)

# ----------------------------------------------------------------------------- 3-D masks


@settings(max_examples=60, **SETTINGS)
@given(st.integers(1, 8), st.integers(2, 10), st.integers(2, 10), st.integers(1, 3), st.integers(1, 10), scale, aspect,
       scale, st.integers(0, 2000), st.booleans(), st.integers(0, 2**32 - 1))
def test_3d_masks_are_exact_complements_on_any_grid_and_scales(gd, gh, gw, B, num, area, asp, depth, min_keep, video, seed):
    grid, N = (gd, gh, gw), gd * gh * gw
    ctx_idx, tgt_idx = m3.sample_masks_3d(B, grid, torch.Generator().manual_seed(seed), num, area, asp, depth, min_keep, video)
    K = tgt_idx.shape[2]
    assert tgt_idx.shape[:2] == (B, 1) and K >= 1 and ctx_idx.shape == (B, N - K) and N - K >= 1
    for b in range(B):  # context = exactly the tokens no block hides
        assert sorted(ctx_idx[b].tolist() + tgt_idx[b, 0].tolist()) == list(range(N))
    if N - K < min_keep:  # the documented fallback for grids too small for min_keep: a single block
        d, r, c = (tgt_idx[0, 0] // (gh * gw), tgt_idx[0, 0] // gw % gh, tgt_idx[0, 0] % gw)
        assert K == math.prod(int(a.max() - a.min() + 1) for a in (d, r, c))
    if video:  # blocks span every frame
        assert K % gd == 0


@settings(max_examples=40, **SETTINGS)
@given(st.tuples(*[st.sampled_from([4, 8, 16, 32])] * 3), st.tuples(*[st.sampled_from([0, 2, 4, 8])] * 3),
       st.integers(-1, 9), st.integers(-1, 3), scale, st.floats(-0.5, 1.5), st.integers(-3, 100))
def test_3d_mask_settings_give_valid_masks_or_a_config_error(volume, patch, short, long, area, depth_lo, min_keep):
    argv = [f'--volume_size={volume}', f'--patch_size={patch}', f'--short_blocks={short}', f'--long_blocks={long}',
            f'--short_scale={area}', f'--depth_scale=({depth_lo}, 1.0)', f'--min_keep={min_keep}', '--n_embd=96']
    try:
        cfg = m3.validate(mj.configure(argv, m3.DEFAULTS))
    except mj.ConfigError as e:
        assert any(k in str(e) for k in ('volume_size', 'patch_size', 'blocks', 'scale', 'min_keep', 'grid')), str(e)
        return
    batch = m3.make_batch(cfg, np.zeros((2, *volume, 1), np.uint8), [0.5], [0.2], step=0, micro=0, device='cpu')
    N = math.prod(v // p for v, p in zip(volume, patch))
    assert len(batch['masks']) == (short > 0) + (long > 0)
    for ctx_idx, tgt_idx in batch['masks']:
        assert ctx_idx.shape[1] + tgt_idx.shape[2] == N and ctx_idx.shape[1] >= 1

# ----------------------------------------------------------------------------- NIfTI and DICOM readers on damaged files

NIBABEL_DATA = Path(nib.__file__).parent / 'tests' / 'data'
NIFTI = {name: (gzip.decompress if name.endswith('.gz') else bytes)((NIBABEL_DATA / name).read_bytes())
         for name in ('resampled_anat_moved.nii', 'example_nifti2.nii.gz', 'standard.nii.gz')}
DICOM_DATA = Path(pydicom.__file__).parent / 'data' / 'test_files'
DICOM = {name: (DICOM_DATA / name).read_bytes() for name in ('CT_small.dcm', 'MR_small.dcm', 'MR_small_implicit.dcm')}


@st.composite
def damage(draw, files, header_bytes):
    """How to damage one of `files`: (name, cut) truncates it to `cut` bytes, (name, [(byte, bit), ...])
    flips 1-4 bits, mostly in the first header_bytes (where a flip changes shapes, lengths, VRs)."""
    name = draw(st.sampled_from(sorted(files)))
    n = len(files[name])
    if draw(st.booleans()):
        return name, draw(st.integers(0, n - 1))
    return name, draw(st.lists(st.tuples(st.one_of(st.integers(0, min(header_bytes, n) - 1), st.integers(0, n - 1)),
                                         st.integers(0, 7)), min_size=1, max_size=4))


def damaged(files, how):
    name, cut_or_flips = how
    data = bytearray(files[name])
    if isinstance(cut_or_flips, int):
        return bytes(data[:cut_or_flips])
    for byte, bit in cut_or_flips:
        data[byte] ^= 1 << bit
    return bytes(data)


@settings(max_examples=150, **SETTINGS)
@given(damage(NIFTI, header_bytes=560), st.booleans())
@example(('example_nifti2.nii.gz', [(44, 0)]), False)  # dim[3] 12 -> 2**32 + 12: 5.5 TB of int16 claimed
@example(('example_nifti2.nii.gz', [(407, 5)]), False)  # nibabel's OrientationError
def test_read_nifti_on_damaged_files_returns_a_volume_or_raises_value_error(tmp_path_factory, how, gz):
    """Including headers whose flipped bits claim terabytes of voxels: refused before any allocation."""
    data = damaged(NIFTI, how)
    path = tmp_path_factory.mktemp('nii') / ('x.nii.gz' if gz else 'x.nii')
    path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
    try:
        a = prepare.read_nifti(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    assert a.dtype == np.float32 and a.ndim == 4 and min(a.shape) >= 1


@settings(max_examples=100, **SETTINGS)
@given(damage(DICOM, header_bytes=2000))
@example(('MR_small.dcm', [(858, 7)]))  # flips that once crashed anonymize_folder: a VR pydicom does not know,
@example(('MR_small_implicit.dcm', [(399, 2)]))  # a tag cut short (OSError),
@example(('MR_small_implicit.dcm', [(415, 2)]))  # an ambiguous VR it cannot resolve (AttributeError)
def test_anonymizer_skips_or_deidentifies_a_damaged_file(tmp_path_factory, how):
    """pydicom decodes lazily, so a damaged file can fail in de-identification or encoding, not only in
    dcmread: either way it is reported as unreadable (and, being the only input, the run fails with
    nothing written), and anything written is de-identified."""
    root = tmp_path_factory.mktemp('anon')
    (root / 'in').mkdir()
    (root / 'in' / 'x.dcm').write_bytes(damaged(DICOM, how))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        try:
            out = prepare.anonymize_folder(root / 'in', root / 'out', burned_in='flag')
        except ValueError as e:
            assert 'nothing written' in str(e) and 'not a readable DICOM file' in printed.getvalue()
            assert not (root / 'out').exists()
            return
    written = list(out.rglob('*.dcm'))
    assert len(written) == 1
    for p in written:
        assert pydicom.dcmread(p, force=True).PatientIdentityRemoved == 'YES'


@settings(max_examples=15, **SETTINGS)
@given(damage(DICOM, header_bytes=2000))
def test_dicom_converter_skips_or_converts_a_damaged_file(tmp_path_factory, how):
    """prepare.py's documented behaviour for an unreadable input: it is listed in meta.json's `skipped`
    with its reason, and the rest of the folder is converted; never an exception."""
    root = tmp_path_factory.mktemp('dicom')
    src = root / 'in'
    src.mkdir()
    for p in range(3):  # three good patients, so that the split has a group for each of train/val/test
        ds = pydicom.dcmread(DICOM_DATA / 'CT_small.dcm')
        ds.PatientID, ds.BurnedInAnnotation, ds.SOPInstanceUID = f'P{p}', 'NO', pydicom.uid.generate_uid()
        ds.save_as(src / f'good{p}.dcm', enforce_file_format=False)
    (src / 'damaged.dcm').write_bytes(damaged(DICOM, how))
    with contextlib.redirect_stdout(io.StringIO()):
        out = prepare.prepare_dicom(root / 'data', source=str(src), size=16, burned_in='flag',
                                    val_fraction=0.34, test_fraction=0.34)
    meta = json.loads((out / 'meta.json').read_text())
    assert [s['file'] for s in meta['skipped']['files']] in ([], [prepare.private_path(src / 'damaged.dcm')])
    assert sum(meta['counts'].values()) >= 3
