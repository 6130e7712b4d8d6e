"""prepare.py's video data sets: the synthetic demovideo, and `video`, which reads clips from frame folders,
animated GIFs, multi-page TIFFs and multi-frame DICOM (fabricated here, plus a real ultrasound cine shipped
with pydicom). Clips are stored as uint8 (N, T, H, W, C) with "video": true, docs/data_format.md."""
import json
import os
import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import prepare
from prepare import SPLITS

US_CINE = os.path.join(os.path.dirname(pydicom.__file__), 'data', 'test_files', 'examples_ybr_color.dcm')  # 30 frames


def load(out, split, key):
    return np.load(out / f'{split}_{key}.npy')


def meta(out):
    return json.loads((out / 'meta.json').read_text())


@pytest.fixture(scope='module')
def demovideo(tmp_path_factory):
    """A small demovideo: 16 frames of 16x16, 40 / 16 / 16 clips."""
    return prepare.prepare_demovideo(tmp_path_factory.mktemp('v') / 'demovideo', frames=16, size=16,
                                     n_train=40, n_val=16, n_test=16)


def test_demovideo_is_video_deterministic_split_by_subject_and_balanced(demovideo, tmp_path):
    m = meta(demovideo)
    assert m['video'] is True and m['spatial_dims'] == 3 and m['frames'] == 16 and m['image_size'] == [16, 16, 16]
    assert m['classes'] == prepare.DEMOVIDEO_CLASSES and m['mask_labels'] == ['background', 'chamber', 'wall']
    assert m['counts'] == {'train': 40, 'val': 16, 'test': 16} and m['task'] == 'multiclass'
    assert load(demovideo, 'train', 'images').shape == (40, 16, 16, 16, 1)
    assert set(np.unique(load(demovideo, 'train', 'masks'))) == {0, 1, 2}
    groups = {s: set(load(demovideo, s, 'groups').tolist()) for s in SPLITS}
    assert not groups['train'] & groups['val'] and not groups['train'] & groups['test'] and not groups['val'] & groups['test']
    for s in SPLITS:
        assert len(set(np.bincount(load(demovideo, s, 'labels')).tolist())) == 1  # balanced
    again = prepare.prepare_demovideo(tmp_path / 'again', frames=16, size=16, n_train=40, n_val=16, n_test=16)
    for key in ('images', 'masks', 'labels', 'groups'):
        assert np.array_equal(load(demovideo, 'test', key), load(again, 'test', key))


def test_demovideo_classes_differ_in_motion_not_in_one_frame(tmp_path):
    out = prepare.prepare_demovideo(tmp_path / 'v', frames=32, size=32, n_train=160, n_val=8, n_test=8)
    x, y, masks = load(out, 'train', 'images'), load(out, 'train', 'labels'), load(out, 'train', 'masks')
    area = (masks == 1).sum((2, 3)).astype(float)  # (N, T) chamber area per frame
    change = area.std(1) / area.mean(1)
    normal, hypo = (prepare.DEMOVIDEO_CLASSES.index(c) for c in ('normal', 'hypokinetic'))
    assert change[y == normal].mean() > 2.5 * change[y == hypo].mean()  # the beat is the class
    beats = [np.abs(np.fft.rfft(a - a.mean())).argmax() for a in area]  # dominant frequency of the area
    fast = prepare.DEMOVIDEO_CLASSES.index('fast')
    assert np.median(np.array(beats)[y == fast]) > 1.6 * np.median(np.array(beats)[y == normal])
    brightness = x[:, 0].mean((1, 2, 3))  # one frame: mean brightness does not give the class away
    per_class = [brightness[y == c].mean() for c in range(4)]
    assert max(per_class) - min(per_class) < brightness.std()


# ----------------------------------------------------------------------------- the `video` converter

def frame(k, size=(20, 24)):
    """Frame k of a fabricated clip: uniform grey 20 * k + 10, so the stored frames tell which were taken."""
    return np.full(size, 20 * k + 10, np.uint8)


def dicom_clip(path, n, patient, burned_in='NO'):
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = '1.2.840.10008.5.1.4.1.1.3.1'  # US multi-frame
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.PatientID, ds.BurnedInAnnotation, ds.Modality = patient, burned_in, 'US'
    ds.Rows, ds.Columns, ds.NumberOfFrames = 20, 24, n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.WindowCenter, ds.WindowWidth = 127.5, 255  # so that 0..255 stays 0..255
    ds.PixelData = np.stack([frame(k) for k in range(n)]).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def fabricate_clips(root, n=12):
    """Two classes; in each, clips in every format the converter reads, plus broken ones."""
    for cls, patient in (('apical', 'P1'), ('parasternal', 'P2')):
        d = root / cls
        for c in range(2):  # folders of frames, named so that text order is wrong (f10 before f2)
            (d / f'folder{c}').mkdir(parents=True)
            for k in range(n):
                Image.fromarray(frame(k)).save(d / f'folder{c}' / f'f{k}.png')
        first, *rest = [Image.fromarray(frame(k)) for k in range(n)]
        first.save(d / 'clip.gif', save_all=True, append_images=rest, duration=40, loop=0)
        pages = [Image.fromarray((1000 * k + 500 * (cls == 'apical')) * np.ones((20, 24), np.uint16)) for k in range(n)]
        pages[0].save(d / 'clip16bit.tif', save_all=True, append_images=pages[1:])  # 16-bit pages
        dicom_clip(d / 'cine.dcm', n, patient)
        dicom_clip(d / 'IM0001', n, patient)  # no suffix: found by its DICM prefix; same patient as cine.dcm
    bad = root / 'apical'
    (bad / 'short').mkdir()
    for k in range(3):
        Image.fromarray(frame(k)).save(bad / 'short' / f'f{k}.png')
    (bad / 'broken').mkdir()
    for k in range(n):
        Image.fromarray(frame(k)).save(bad / 'broken' / f'f{k}.png')
    (bad / 'broken' / 'f4.png').write_bytes((bad / 'broken' / 'f4.png').read_bytes()[:40])  # a truncated frame
    (bad / 'cut.gif').write_bytes((root / 'parasternal' / 'clip.gif').read_bytes()[:300])
    (bad / 'notes.dcm').write_text('not a DICOM file')
    (bad / 'echo.mp4').write_bytes(b'\x00\x00\x00\x18ftypmp42')
    dicom_clip(bad / 'named.dcm', n, 'P9', burned_in='YES')
    (root / 'parasternal' / 'README.txt').write_text('ignored: not a clip')


def test_video_reads_every_format_with_labels_frame_order_and_stride(tmp_path):
    fabricate_clips(tmp_path / 'src')
    out = prepare.prepare_video(tmp_path / 'video', source=str(tmp_path / 'src'), frames=4, stride=2, size=16,
                                val_fraction=0.2, test_fraction=0.2, workers=2)
    m = meta(out)
    assert m['video'] is True and m['spatial_dims'] == 3 and m['frames'] == 4 and m['frame_stride'] == 2
    assert m['classes'] == ['apical', 'parasternal'] and m['task'] == 'multiclass' and m['image_size'] == [4, 16, 16]
    assert sum(m['counts'].values()) == 12  # 6 good clips per class
    names = {prepare.private_path(p): p.name for p in (tmp_path / 'src').rglob('*')}  # meta.json keeps path hashes
    reasons = {names[s['file']]: s['reason'] for s in m['skipped']['files']}
    assert set(reasons) == {'short', 'broken', 'cut.gif', 'notes.dcm', 'echo.mp4', 'named.dcm'}
    assert 'need 7' in reasons['short'] and 'f4.png' in reasons['broken'] and 'ffmpeg -i <name>' in reasons['echo.mp4']
    assert not any(str(tmp_path) in r or 'echo.mp4' in r for r in reasons.values())
    assert 'Burned In Annotation' in reasons['named.dcm']
    clips = np.concatenate([load(out, s, 'images') for s in SPLITS])
    labels = np.concatenate([load(out, s, 'labels') for s in SPLITS])
    assert clips.shape == (12, 4, 16, 16, 1) and np.bincount(labels).tolist() == [6, 6]
    # 12 frames, 4 taken 2 apart from the middle: frames 2, 4, 6, 8 -> grey 50, 90, 130, 170;
    # 16-bit TIFF pages are stretched over the clip (one scale for all its frames): 0, 85, 170, 255
    assert {tuple(c[:, 8, 8, 0].tolist()) for c in clips} == {(50, 90, 130, 170), (0, 85, 170, 255)}
    assert all((c == c[:, 8:9, 8:9]).all() for c in clips)  # uniform frames stay uniform
    # the two DICOM clips of a patient are in the same split
    groups = {s: load(out, s, 'groups') for s in SPLITS}
    assert sum(len(set(groups[s].tolist())) for s in SPLITS) == len(set(np.concatenate(list(groups.values())).tolist()))
    assert len(set(np.concatenate(list(groups.values())).tolist())) == 10  # 12 clips, 2 patients with 2 clips each


def test_video_on_a_real_ultrasound_cine_keeps_colour_and_refuses_unchecked_burned_in(tmp_path):
    src = tmp_path / 'cines'
    src.mkdir()
    for i in range(5):  # one real cine, filed as five patients
        ds = pydicom.dcmread(US_CINE)
        ds.PatientID = f'P{i}'
        ds.save_as(src / f'cine{i}.dcm')
    with pytest.raises(ValueError, match='no readable image'):  # no Burned In Annotation: refused by default
        prepare.prepare_video(tmp_path / 'refused', source=str(src), frames=8, stride=3, size=32, workers=1,
                              val_fraction=0.2, test_fraction=0.2)
    out = prepare.prepare_video(tmp_path / 'rgb', source=str(src), frames=8, stride=3, size=32, channels=3,
                                burned_in='flag', workers=1, val_fraction=0.2, test_fraction=0.2)
    m = meta(out)
    assert m['task'] == 'unlabeled' and m['channels'] == 3 and sum(m['counts'].values()) == 5
    clip = load(out, 'test', 'images')[0]
    assert clip.shape == (8, 32, 32, 3)
    rgb = pydicom.dcmread(US_CINE).pixel_array  # (30, 240, 320, 3); frames 4, 7, ..., 25 are the middle 22
    expected = np.stack([np.asarray(prepare.square_resize(Image.fromarray(rgb[k]), 32)) for k in range(4, 26, 3)])
    assert np.abs(clip.astype(int) - expected).max() <= 1
    grey = prepare.prepare_video(tmp_path / 'grey', source=str(src), frames=8, stride=3, size=32, burned_in='flag',
                                 workers=1, val_fraction=0.2, test_fraction=0.2)
    assert load(grey, 'test', 'images').shape == (1, 8, 32, 32, 1)


def test_video_options_and_empty_sources_are_refused_with_the_fix(tmp_path):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'notes.txt').write_text('x')
    with pytest.raises(FileNotFoundError, match='no clips'):
        prepare.prepare_video(tmp_path / 'o', source=str(tmp_path / 'empty'))
    with pytest.raises(ValueError, match="'refuse' or 'flag'"):
        prepare.prepare_video(tmp_path / 'o', source=str(tmp_path / 'empty'), burned_in='yes')
    with pytest.raises(ValueError, match='--channels must be 1 or 3'):
        prepare.prepare_video(tmp_path / 'o', source=str(tmp_path / 'empty'), channels=2)
    assert not (tmp_path / 'o').exists()
