"""DICOM de-identification (PS3.15 Annex E Basic Profile) on the real DICOM files that ship inside
pydicom, and the `dicom` converter. Nothing here needs the network."""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

import prepare
from prepare import SPLITS

TEST_FILES = Path(pydicom.__file__).parent / 'data' / 'test_files'
# real files: CT and MR images (the MR_small* files are one instance of one series, stored in four
# encodings), RT objects, an SR document, private sequences, an ECG waveform, overlays
FILES = ['CT_small.dcm', 'MR_small.dcm', 'MR_small_RLE.dcm', 'MR_small_bigendian.dcm', 'MR_small_implicit.dcm',
         'JPEG2000.dcm', 'rtplan.dcm', 'rtstruct.dcm', 'rtdose.dcm',
         'test-SR.dcm', 'nested_priv_SQ.dcm', 'priv_SQ.dcm', 'waveform_ecg.dcm', 'examples_overlay.dcm',
         'liver_1frame.dcm']
ROOT = Path(__file__).resolve().parents[1]


def walk(ds):
    """Every element, sequences included, with the dataset holding it."""
    for elem in ds:
        yield elem
        if elem.VR == 'SQ':
            for item in elem.value:
                yield from walk(item)


@pytest.fixture(scope='module')
def deidentified():
    deid = prepare.Deidentifier()
    pairs = []
    for name in FILES:
        original = pydicom.dcmread(TEST_FILES / name, force=True)  # two have no 'DICM' preamble
        pairs.append((name, original, deid(pydicom.dcmread(TEST_FILES / name, force=True))))
    return deid, pairs


def test_table_is_the_pinned_edition_with_its_compound_actions():
    exact, wildcards = prepare.load_deid_table()
    assert len(exact) > 600 and len(wildcards) == 3
    assert exact[0x00100010] == 'Z' and exact[0x00100020] == 'Z/D' and exact[0x0020000D] == 'U'
    assert exact[0x00081140] == 'X/Z/U*' and exact[0x00080080] == 'X/Z/D'
    assert set(exact.values()) >= {'X', 'Z', 'D', 'U', 'X/Z', 'X/D', 'Z/D', 'X/Z/D'}


def test_no_attribute_marked_x_and_no_private_attribute_remains(deidentified):
    deid, pairs = deidentified
    for name, _, ds in pairs:
        for elem in list(walk(ds)) + list(walk(ds.file_meta)):
            assert not elem.tag.is_private, (name, elem.tag)
            assert deid.action(elem.tag) != 'X', (name, elem.tag, elem.name)
    assert any(e.tag.is_private for e in walk(pydicom.dcmread(TEST_FILES / 'nested_priv_SQ.dcm', force=True)))  # there were some
    assert any(e.tag.group & 0xFF00 == 0x6000 and e.tag.element == 0x3000
               for e in pydicom.dcmread(TEST_FILES / 'examples_overlay.dcm'))


def test_names_ids_and_dates_are_emptied_or_replaced(deidentified):
    deid, pairs = deidentified
    checked = 0
    for name, original, ds in pairs:
        for elem in walk(original):
            a = deid.action(elem.tag)
            if a in ('Z', 'D') and elem.VR != 'SQ' and elem.value not in (None, '', b'') and elem.tag in ds:
                assert ds[elem.tag].value != elem.value, (name, elem.name)
                checked += 1
        if 'PatientName' in original:
            assert str(ds.PatientName) == '' and ds.PatientID == 'ANONYMIZED' and ds.get('StudyDate', '') == ''
        assert 'PatientBirthDate' not in ds or ds.PatientBirthDate == ''
        assert ds.PatientIdentityRemoved == 'YES' and ds.DeidentificationMethod.startswith('DICOM PS3.15')
    assert checked > 30
    ct = dict((n, d) for n, _, d in pairs)['CT_small.dcm']
    assert 'InstitutionName' not in ct or ct.InstitutionName in ('', 'ANONYMIZED')


def test_uids_are_remapped_consistently_across_files_of_a_series(deidentified):
    deid, pairs = deidentified
    by_name = {n: (o, d) for n, o, d in pairs}
    copies = [by_name[n] for n in ('MR_small.dcm', 'MR_small_RLE.dcm', 'MR_small_bigendian.dcm', 'MR_small_implicit.dcm')]
    for key in ('StudyInstanceUID', 'SeriesInstanceUID', 'SOPInstanceUID'):  # one series in four files...
        assert len({o[key].value for o, _ in copies}) == 1
        assert len({d[key].value for _, d in copies}) == 1  # ...is still one, under its new UIDs
        assert copies[0][1][key].value != copies[0][0][key].value
    ct = by_name['CT_small.dcm'][1]
    assert ct.SeriesInstanceUID != copies[0][1].SeriesInstanceUID
    for name, original, ds in pairs:
        assert ds.get('SOPClassUID') == original.get('SOPClassUID')  # what the object is, is kept
        for key in ('StudyInstanceUID', 'SeriesInstanceUID', 'SOPInstanceUID', 'FrameOfReferenceUID'):
            if key in original:
                assert ds[key].value.startswith('2.25.') and ds[key].value != original[key].value
                assert ds[key].value == deid.new_uid(original[key].value)
        if 'SOPInstanceUID' in original and original.file_meta.get('MediaStorageSOPInstanceUID') == original.SOPInstanceUID:
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID  # file meta follows the same map
    assert prepare.Deidentifier().new_uid('1.2.3') != deid.new_uid('1.2.3')  # keyed: another run, another map
    rt = by_name['rtstruct.dcm'][1]  # references inside sequences follow the same map
    refs = [e.value for e in walk(rt) if e.keyword == 'ReferencedSOPInstanceUID']
    assert refs and all(r.startswith('2.25.') for r in refs)


def test_files_still_read_and_pixels_are_unchanged(deidentified, tmp_path):
    _, pairs = deidentified
    for name, original, ds in pairs:
        ds.save_as(tmp_path / name, enforce_file_format=False)
        again = pydicom.dcmread(tmp_path / name, force=True)
        assert again.PatientIdentityRemoved == 'YES'
        if name in ('CT_small.dcm', 'MR_small.dcm', 'MR_small_RLE.dcm', 'MR_small_bigendian.dcm', 'rtdose.dcm',
                    'liver_1frame.dcm'):
            assert np.array_equal(again.pixel_array, original.pixel_array), name


def burned(tmp_path, name, value, src='MR_small.dcm'):
    ds = pydicom.dcmread(TEST_FILES / src)
    if value is not None:
        ds.BurnedInAnnotation = value
    ds.save_as(tmp_path / name, enforce_file_format=False)
    return ds


def test_anonymize_only_cli_refuses_burned_in_text_and_reports_bad_files(tmp_path):
    src = tmp_path / 'in' / 'Doe^John'  # a folder name that identifies: not reused in the output
    src.mkdir(parents=True)
    burned(src, 'a.dcm', 'NO')
    burned(src, 'b.dcm', 'NO', 'CT_small.dcm')
    burned(src, 'c.dcm', 'YES')
    burned(src, 'd.dcm', None)  # unknown: not NO, refused too
    shutil.copy(TEST_FILES / 'rtplan_truncated.dcm', src / 'e.dcm')
    (src / 'notes.txt').write_text('not dicom')
    r = subprocess.run([sys.executable, str(ROOT / 'prepare.py'), 'dicom', '--anonymize_only', str(tmp_path / 'in'),
                        str(tmp_path / 'out')], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = sorted((tmp_path / 'out').rglob('*.dcm'))
    assert len(out) == 2 and 'de-identified 2 file(s)' in r.stdout
    assert 'Burned In Annotation' in r.stdout and 'notes.txt' in r.stdout
    for p in out:
        ds = pydicom.dcmread(p)
        assert p.name == f'{ds.SOPInstanceUID}.dcm' and p.parent.name == ds.SeriesInstanceUID
        assert 'Doe' not in str(p) and str(ds.PatientName) == ''
    r = subprocess.run([sys.executable, str(ROOT / 'prepare.py'), 'dicom', '--anonymize_only', str(tmp_path / 'in'),
                        str(tmp_path / 'out'), '--burned_in=flag'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'not empty' in r.stderr  # never writes over an earlier result


def fabricate_series(root, patients=8, slices=2):
    """Copies of CT_small: one series per patient, with fresh instance UIDs."""
    for p in range(patients):
        series = pydicom.uid.generate_uid()
        for s in range(slices):
            ds = pydicom.dcmread(TEST_FILES / 'CT_small.dcm')
            ds.PatientID, ds.PatientName, ds.SeriesInstanceUID = f'PAT{p:03d}', f'Doe^Patient{p}', series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            ds.BurnedInAnnotation = 'NO'
            ds.save_as(root / f'pat{p}_{s}.dcm', enforce_file_format=False)


def test_dicom_converter_groups_by_patient_and_stores_deidentified_headers(tmp_path):
    src = tmp_path / 'series'
    src.mkdir()
    fabricate_series(src)
    mr = burned(src, 'mr.dcm', 'NO')
    shutil.copy(TEST_FILES / 'MR_truncated.dcm', src / 'broken.dcm')  # pixel data cut short
    (src / 'empty.dcm').write_bytes(b'')
    out = prepare.prepare_dicom(tmp_path / 'data' / 'dicom', source=str(src), size=64, val_fraction=0.2,
                                test_fraction=0.2)
    m = meta(out)
    assert sum(m['counts'].values()) == 17 and m['task'] == 'unlabeled'
    # empty.dcm is unreadable; broken.dcm (MR_small cut short: a secondary image without Burned In
    # Annotation) is refused before its pixels are read
    assert m['skipped']['count'] == 1 and m['refused']['count'] == 1
    assert m['deidentification'].startswith('DICOM PS3.15')
    groups = {s: set(np.load(out / f'{s}_groups.npy').tolist()) for s in SPLITS}
    assert not groups['train'] & groups['val'] and not groups['train'] & groups['test'] and not groups['val'] & groups['test']
    series_of = {}
    text = ''
    for s in SPLITS:
        lines = (out / f'{s}_metadata.jsonl').read_text().splitlines()
        assert len(lines) == m['counts'][s]
        text += ''.join(lines)
        for line, g in zip(lines, np.load(out / f'{s}_groups.npy')):
            h = pydicom.Dataset.from_json(json.loads(line)['header'])
            assert h.PatientIdentityRemoved == 'YES' and str(h.PatientName) == '' and 'PixelData' not in h
            series_of.setdefault(h.SeriesInstanceUID, set()).add(int(g))
    assert 'Doe' not in text and 'PAT00' not in text and mr.SeriesInstanceUID not in text
    assert all(len(g) == 1 for g in series_of.values()) and len(series_of) == 9  # a series = one patient
    # MR_small (64 px, window 600/1600 in its header): rescale + window + uint8, nothing else
    img = [np.load(out / f'{s}_images.npy')[i] for s in SPLITS
           for i, line in enumerate((out / f'{s}_metadata.jsonl').read_text().splitlines())
           if pydicom.Dataset.from_json(json.loads(line)['header']).Modality == 'MR'][0]
    expected = prepare.to_uint8(mr.pixel_array, 600 - 1600 / 2, 600 + 1600 / 2)
    assert np.array_equal(img[..., 0], expected)


def test_dicom_converter_refuses_unknown_burned_in_by_default(tmp_path):
    src = tmp_path / 'series'
    src.mkdir()
    for i in range(3):
        burned(src, f'{i}.dcm', None)
    with pytest.raises(ValueError, match='no usable DICOM'):
        prepare.prepare_dicom(tmp_path / 'data' / 'd', source=str(src), size=32)
    assert not (tmp_path / 'data' / 'd').exists()


def meta(out):
    return json.loads((out / 'meta.json').read_text())


TEXT_VRS = ('PN', 'LO', 'SH', 'DA', 'DT', 'TM', 'UI', 'AE', 'ST', 'LT', 'UT', 'UC', 'AS', 'CS', 'DS', 'IS')


def identifying_strings(paths):
    """The text values of every attribute the profile does not keep (names, IDs, dates, times, places,
    UIDs, free text) in the input files, sequences and file meta included. Left out, as they would be
    found by chance: values under 4 characters (a sex 'M'), the profile's dummy values, values that are
    part of a kept one (InstitutionName 'TOSHIBA' is inside Manufacturer 'TOSHIBA_MEC', which stays) and
    words prepare.py itself writes (an ROI named 'patient'; meta.json says 'grouped by patient')."""
    exact, wildcards = prepare.load_deid_table()  # the pinned table, not the code under test, says what goes
    keeps = lambda tag: exact.get(int(tag), next((a for m, v, a in wildcards if int(tag) & m == v), 'K')) == 'K'
    removed, kept = set(), []
    for path in paths:
        ds = pydicom.dcmread(path, force=True)
        for elem in list(walk(ds)) + list(walk(ds.file_meta)):
            if elem.VR not in TEXT_VRS or elem.value is None:
                continue
            values = [str(v).strip() for v in (elem.value if isinstance(elem.value, pydicom.multival.MultiValue) else [elem.value])]
            if keeps(elem.tag) and not elem.tag.is_private:
                kept += values
            else:
                removed |= {v for v in values if len(v) >= 4}
    ours = Path(prepare.__file__).read_text() + ''.join(prepare.DUMMY.values()) + 'ANONYMIZED'
    return {v for v in removed if v not in ours and not any(v in k for k in kept)}


def test_no_identifying_string_of_the_input_is_anywhere_in_the_output(tmp_path):
    """Every byte of every output file (and every output path) of the anonymiser and of the converter
    is searched for every identifying string of the inputs; none may be found."""
    src = tmp_path / 'in'
    src.mkdir()
    for name in FILES:
        shutil.copy(TEST_FILES / name, src / name)
    fabricate_series(src, patients=3, slices=1)  # converter input: grey images of 3 named patients
    secrets = identifying_strings(sorted(src.iterdir()))
    assert {'CompressedSamples^CT1', '1CT1', 'JFK IMAGING CENTER', 'Doe^Patient0', 'PAT000', '20040119'} <= secrets
    with contextlib.redirect_stdout(io.StringIO()):
        prepare.anonymize_folder(src, tmp_path / 'anon', burned_in='flag')
        prepare.prepare_dicom(tmp_path / 'data', source=str(src), size=32, burned_in='flag', val_fraction=0.34,
                              test_fraction=0.34)
    outputs = [p for d in ('anon', 'data') for p in sorted((tmp_path / d).rglob('*'))]
    assert len([p for p in outputs if p.suffix == '.dcm']) >= 10 and (tmp_path / 'data' / 'train_metadata.jsonl').exists()
    new_uid = re.compile(rb'2\.25\.[0-9]+')  # our random UIDs: their 39 digits would match short numbers by chance
    leaks = [(s, str(p)) for p in outputs for s in secrets if s.encode() in new_uid.sub(b'', bytes(p.relative_to(tmp_path)))
             or p.is_file() and s.encode() in new_uid.sub(b'', p.read_bytes())]
    assert not leaks, sorted({s for s, _ in leaks})


def test_meta_json_keeps_no_input_path_when_folders_are_named_after_patients(tmp_path):
    """Clinical exports often name folders and files after the patient: meta.json (args.source and the
    skipped files) must keep hashes of such paths, never the text; a re-run still finds nothing to do."""
    src = tmp_path / 'Doe^Jane_PAT777'
    src.mkdir()
    fabricate_series(src, patients=3, slices=1)
    (src / 'Doe^Jane_scout.dcm').write_bytes(b'not a DICOM file')  # skipped, with its name
    out = tmp_path / 'data'
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        prepare.prepare_dicom(out, source=str(src), size=32, val_fraction=0.34, test_fraction=0.34)
    assert 'Doe^Jane_scout.dcm' in printed.getvalue()  # the operator is told which file, on the console
    meta = (out / 'meta.json').read_text()
    assert 'Jane' not in meta and 'PAT777' not in meta
    assert json.loads(meta)['skipped']['count'] == 1
    with contextlib.redirect_stdout(io.StringIO()) as again:
        prepare.prepare_dicom(out, source=str(src), size=32, val_fraction=0.34, test_fraction=0.34)
    assert 'nothing to do' in again.getvalue()

# --- every input accounted for: written, refused or unreadable, never lost or overwritten -----------


def bundled_images():
    """Every file shipped with pydicom that has a patient's name and pixel data (about 90: CT, MR, CR,
    US, NM, secondary captures, RT dose, segmentations; raw, RLE, JPEG, JPEG 2000 and big-endian)."""
    out = []
    for path in map(Path, pydicom.data.get_testdata_files()):
        try:
            ds = pydicom.dcmread(path, defer_size=256, force=True)  # large values (the pixels) are not read
            if 'PatientName' in ds and 'PixelData' in ds:
                out.append(path)
        except Exception:
            pass
    return out


def anonymize(src, out, **kw):
    """Run the anonymiser; returns (stdout, {input path: its reported line}, output files)."""
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        prepare.anonymize_folder(src, out, **kw)
    listed = {line.split(': ', 1)[0].strip(): line for line in printed.getvalue().splitlines() if line.startswith('  ')}
    return printed.getvalue(), listed, sorted(out.rglob('*.dcm'))


@pytest.fixture(scope='module')
def bundled(tmp_path_factory):
    """The bundled images copied into one folder, and the anonymiser's run on them for each policy."""
    root = tmp_path_factory.mktemp('bundled')
    (root / 'in').mkdir()
    inputs = []
    for i, path in enumerate(bundled_images()):
        inputs.append(root / 'in' / f'{i:03d}_{path.name}')
        shutil.copy(path, inputs[-1])
    runs = {policy: anonymize(root / 'in', root / policy, burned_in=policy) for policy in ('refuse', 'flag')}
    return root, inputs, runs


@pytest.mark.parametrize('policy', ['refuse', 'flag'])
def test_every_bundled_pydicom_image_is_written_once_or_listed_with_its_reason(bundled, policy):
    """Some of these files are one image in several encodings (MR_small*: same SOP Instance UID,
    different bytes): each must still become its own output file. Counts printed = files on disk."""
    _, inputs, runs = bundled
    assert len(inputs) > 60
    printed, listed, outputs = runs[policy]
    refused = {p for p in inputs if str(p) in listed and 'refused' in listed[str(p)]}
    unreadable = {p for p in inputs if str(p) in listed and 'not a readable DICOM file' in listed[str(p)]}
    written = [p for p in inputs if p not in refused | unreadable]
    assert len(outputs) == len(written) and f'de-identified {len(outputs)} file(s)' in printed
    assert f'{len(refused)} refused, {len(unreadable)} unreadable' in printed
    assert f'refused {len(refused)} input(s)' in printed or not refused
    # no output stands for two inputs: the pixel data of the written inputs are exactly those of the outputs
    pixels = lambda paths: sorted(pydicom.dcmread(p, force=True).PixelData for p in paths)
    assert pixels(written) == pixels(outputs)
    assert not any(p.name.startswith('.') for p in outputs)
    shared = [p for p in written if '_2.dcm' in listed.get(str(p), '') or 'shares its SOP Instance UID' in listed.get(str(p), '')]
    assert shared if policy == 'flag' else True  # MR_small's four encodings are all written
    if policy == 'flag':
        assert not refused and not unreadable
    else:  # the default: images that say NO, and originals of CT/MR/CR/DX/MG without the attribute
        for p in written:
            ds = pydicom.dcmread(p, force=True)
            assert ds.get('BurnedInAnnotation') == 'NO' or 'BurnedInAnnotation' not in ds and \
                ds.Modality in prepare.BURNED_IN_RARE and not {'DERIVED', 'SECONDARY'} & {v.strip() for v in ds.ImageType}
        assert any(pydicom.dcmread(p, force=True).get('Modality') == 'US' for p in refused) and written


def test_no_identifier_of_any_bundled_pydicom_image_is_in_its_output(bundled):
    root, inputs, runs = bundled
    secrets = identifying_strings(inputs)
    assert {'CompressedSamples^CT1', 'CompressedSamples^MR1', 'Lestrade^G', 'Doe^Peter'} <= secrets
    _, _, outputs = runs['flag']
    assert len(outputs) == len(inputs)
    new_uid = re.compile(rb'2\.25\.[0-9]+')
    leaks = {s for p in outputs for s in secrets
             if s.encode() in new_uid.sub(b'', header_bytes(p) + b'\n' + bytes(p.relative_to(root)))}
    assert not leaks, sorted(leaks)


def header_bytes(path):
    """Every byte of a file except its pixel data (pixel values such as '111' would match short strings by
    chance; burned-in text is the policy's business), plus the header decoded and written uncompressed
    (a deflated file's bytes say nothing otherwise): the value of every element, sequences included."""
    ds = pydicom.dcmread(path, force=True)
    raw = path.read_bytes().replace(ds.PixelData, b'') if 'PixelData' in ds else path.read_bytes()
    del ds.PixelData
    values = [repr(e.value) for e in list(walk(ds)) + list(walk(ds.file_meta)) if e.VR != 'SQ']
    return raw + '\n'.join(values).encode()


def test_files_without_uids_get_distinct_visible_names(tmp_path):
    src = tmp_path / 'in'
    src.mkdir()
    for name in ('a.dcm', 'b.dcm'):
        ds = burned(src, name, 'NO', 'CT_small.dcm')
        ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.SOPInstanceUID = ''
        ds.file_meta.MediaStorageSOPInstanceUID = ''
        ds.PixelData = ds.PixelData[:-2] + name.encode()[:1] * 2  # two different images
        ds.save_as(src / name, enforce_file_format=False)
    printed, _, outputs = anonymize(src, tmp_path / 'out')
    assert [p.relative_to(tmp_path / 'out').as_posix() for p in outputs] == \
        ['no-study-uid/no-series-uid/no-instance-uid.dcm', 'no-study-uid/no-series-uid/no-instance-uid_2.dcm']
    assert 'de-identified 2 file(s)' in printed and 'b.dcm: shares its SOP Instance UID' in printed


def test_uid_names_never_come_from_unsafe_values():
    for bad in ('', '   ', '.', '..', '../../etc/passwd', '1.2/3', '1.2\x00', 'a.b', '.1.2', '1.2.', '9' * 65):
        assert prepare.uid_name(bad, 'fallback') == ('1.2' if bad == '1.2\x00' else 'fallback'), bad
    assert prepare.uid_name('2.25.123', 'fallback') == '2.25.123'


def test_person_names_missing_from_the_profile_table_are_emptied_in_sequences_too():
    exact, _ = prepare.load_deid_table()
    reviewer, evaluator = 0x00140104, 0x00142006  # Secondary Reviewer Name, Evaluator Name: PN, not in Table E.1-1
    assert reviewer not in exact and evaluator not in exact
    ds = pydicom.dcmread(TEST_FILES / 'CT_small.dcm')
    ds.add_new(reviewer, 'PN', 'Reviewer^Rita')
    item = pydicom.Dataset()
    item.add_new(evaluator, 'PN', 'Evaluator^Eve')
    item.add_new(0x00081150, 'UI', '1.2.840.10008.5.1.4.1.1.2')  # kept: Referenced SOP Class UID
    ds.add_new(0x00142002, 'SQ', [item])  # Evaluator Sequence, kept by the table: its items are walked
    out = prepare.Deidentifier()(ds)
    names = [str(e.value) for e in walk(out) if e.VR == 'PN']
    assert names and not any(names), names
    assert 'Rita' not in str(out) and 'Eve' not in str(out)


def policy_case(root, name, src, modality=None, image_type=None, value=None):
    ds = pydicom.dcmread(TEST_FILES / src)
    if modality:
        ds.Modality = modality
    if image_type:
        ds.ImageType = image_type
    if value:
        ds.BurnedInAnnotation = value
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(root / name, enforce_file_format=False)


def test_burned_in_policy_follows_the_modality_when_the_attribute_is_absent(tmp_path):
    src = tmp_path / 'in'
    src.mkdir()
    policy_case(src, 'ct_absent.dcm', 'CT_small.dcm')                                       # CT original: kept, warned
    policy_case(src, 'cr_absent.dcm', 'CT_small.dcm', 'CR', ['ORIGINAL', 'PRIMARY'])         # CR original: kept, warned
    policy_case(src, 'ct_yes.dcm', 'CT_small.dcm', value='YES')                              # says text: always refused
    policy_case(src, 'ct_secondary.dcm', 'CT_small.dcm', image_type=['DERIVED', 'SECONDARY'])  # a capture: refused
    policy_case(src, 'us_absent.dcm', 'CT_small.dcm', 'US', ['ORIGINAL', 'PRIMARY'])         # ultrasound: refused
    policy_case(src, 'xa_absent.dcm', 'CT_small.dcm', 'XA', ['ORIGINAL', 'PRIMARY'])         # angiography: refused
    policy_case(src, 'us_no.dcm', 'CT_small.dcm', 'US', ['ORIGINAL', 'PRIMARY'], value='NO')  # says no text: kept
    printed, listed, outputs = anonymize(src, tmp_path / 'default')
    refused = {Path(k).name for k, line in listed.items() if 'refused' in line}
    assert refused == {'ct_yes.dcm', 'ct_secondary.dcm', 'us_absent.dcm', 'xa_absent.dcm'} and len(outputs) == 3
    assert 'YES' in listed[str(src / 'ct_yes.dcm')] and 'modality US' in listed[str(src / 'us_absent.dcm')]
    assert 'warning: 2 written image(s)' in printed
    printed, listed, outputs = anonymize(src, tmp_path / 'checked', burned_in='flag')  # the user looked at the pixels
    assert {Path(k).name for k, line in listed.items() if 'refused' in line} == {'ct_yes.dcm'} and len(outputs) == 6


def test_dicom_converter_counts_refused_and_unreadable_inputs_apart(tmp_path):
    src = tmp_path / 'in'
    src.mkdir()
    fabricate_series(src, patients=3, slices=1)  # Burned In Annotation NO
    policy_case(src, 'ct_absent.dcm', 'CT_small.dcm')
    policy_case(src, 'us_absent.dcm', 'CT_small.dcm', 'US', ['ORIGINAL', 'PRIMARY'])
    policy_case(src, 'ct_yes.dcm', 'CT_small.dcm', value='YES')
    shutil.copy(TEST_FILES / 'rtplan.dcm', src / 'plan.dcm')  # no pixel data
    (src / 'empty.dcm').write_bytes(b'')
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        out = prepare.prepare_dicom(tmp_path / 'data', source=str(src), size=16, val_fraction=0.25, test_fraction=0.25)
    m = meta(out)
    assert sum(m['counts'].values()) == 4 and m['inputs'] == 8
    assert m['refused']['count'] == 2 and m['skipped']['count'] == 2 and m['burned_in_flagged'] == 1
    assert '8 input file(s): 4 converted (4 image(s)), 2 refused, 2 unreadable or not images' in printed.getvalue()
    assert 'refused 2 input(s)' in printed.getvalue()


@pytest.mark.parametrize('case', ['missing', 'file', 'all refused'])
def test_anonymize_only_with_a_wrong_in_or_nothing_written_exits_1_in_one_line(tmp_path, case):
    src = tmp_path / 'in'
    if case == 'file':
        src = Path(shutil.copy(TEST_FILES / 'CT_small.dcm', tmp_path / 'CT_small.dcm'))
    elif case == 'all refused':
        src.mkdir()
        burned(src, 'a.dcm', 'YES')
    r = subprocess.run([sys.executable, str(ROOT / 'prepare.py'), 'dicom', '--anonymize_only', str(src),
                        str(tmp_path / 'out')], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith('prepare.py: error:')]
    assert len(errors) == 1 and {'missing': 'does not exist', 'file': 'is a file, not a folder',
                                 'all refused': 'nothing written'}[case] in errors[0]
    assert not (tmp_path / 'out').exists()
