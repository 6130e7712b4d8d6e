"""Faults and bad input (docs/reliability.md has the table): kill -9 during training and
during a checkpoint write, torn checkpoints, a full disk, NaN/inf steps, bad config values, bad data."""
import errno
import io
import json
import os
import signal
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import medjepa as mj
import medjepa_utils
import medjepa3d as m3
import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--n_layer=2', '--n_embd=32', '--n_head=2', '--pred_n_layer=1', '--pred_n_embd=16', '--pred_n_head=2',
        '--image_size=32', '--patch_size=8', '--local_size=16', '--batch_size=16', '--num_slices=32',
        '--knn_train_size=64', '--device=cpu', '--dtype=float32', '--num_threads=1']


def make_data(d, task='unlabeled', n_train=64, n_val=16):
    """Random 32 px images in the project's format; 'unlabeled' (labels -1, no kNN monitor) or 'multiclass'."""
    rng = np.random.default_rng(0)
    os.makedirs(d, exist_ok=True)
    for split, n in [('train', n_train), ('val', n_val)]:
        np.save(os.path.join(d, f'{split}_images.npy'), rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
        labels = rng.integers(0, 2, n) if task == 'multiclass' else np.full(n, -1)
        np.save(os.path.join(d, f'{split}_labels.npy'), labels.astype(np.int64))
    classes = ['a', 'b'] if task == 'multiclass' else []
    with open(os.path.join(d, 'meta.json'), 'w') as f:
        json.dump(dict(name='tiny', task=task, classes=classes, num_classes=len(classes), mean=[0.5] * 3, std=[0.3] * 3), f)
    return str(d)


@pytest.fixture(scope='module')
def unlabeled(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp('unlabeled'))


def run_args(data, out, *extra):
    return TINY + [f'--data_dir={data}', f'--out_dir={out}', '--max_iters=24', '--eval_interval=5',
                   '--log_interval=1', '--warmup_iters=4'] + list(extra)


@pytest.fixture(scope='module')
def reference(unlabeled, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    out = str(tmp_path_factory.mktemp('ref') / 'out')
    mj.main(run_args(unlabeled, out))
    return mj.load_checkpoint(os.path.join(out, 'ckpt.pt'))


def assert_same_weights(a, b):
    assert a['iter_num'] == b['iter_num']
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], rtol=1e-5, atol=1e-6, msg=k)


def start(args, code=None):
    """medjepa.py (or a python snippet that runs it) in a subprocess with unbuffered output."""
    cmd = [sys.executable, '-u'] + (['-c', code] if code else ['medjepa.py']) + args
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))


def wait_for(p, prefix):
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return
    raise AssertionError(f"the run ended before printing {prefix!r}:\n{''.join(seen[-30:])}")

# ----------------------------------------------------------------------------- kill -9, torn checkpoints


def test_kill_9_mid_training_then_resume_ends_with_the_same_weights(unlabeled, reference, tmp_path):
    """Unlabelled data (no kNN monitor) still get a checkpoint every eval_interval steps."""
    out = str(tmp_path / 'out')
    p = start(run_args(unlabeled, out))
    wait_for(p, 'step 13:')  # checkpoints were written at steps 5 and 10
    p.kill()
    p.wait(timeout=60)
    assert p.returncode == -9
    assert mj.load_checkpoint(os.path.join(out, 'ckpt.pt'))['iter_num'] == 10
    mj.main(run_args(unlabeled, out, '--init_from=resume'))
    assert_same_weights(reference, mj.load_checkpoint(os.path.join(out, 'ckpt.pt')))


TORN_WRITER = '''
import io, sys, time, torch, medjepa
real_save = torch.save
def torn_save(obj, f):  # from step 10 on, write half of the checkpoint and hang, to be killed there
    buf = io.BytesIO()
    real_save(obj, buf)
    data = buf.getvalue()
    f.write(data if obj['iter_num'] < 10 else data[:len(data) // 2])
    if obj['iter_num'] >= 10:
        f.flush()
        print('HALF-WRITTEN', f.name, flush=True)
        time.sleep(600)
torch.save = torn_save
medjepa.main(sys.argv[1:])
'''


def test_kill_9_mid_checkpoint_write_keeps_the_last_checkpoint_and_resume_ends_with_the_same_weights(
        unlabeled, reference, tmp_path):
    out = tmp_path / 'out'
    p = start(run_args(unlabeled, out), TORN_WRITER)
    wait_for(p, 'HALF-WRITTEN')
    stale = [f for f in os.listdir(out) if f.startswith('ckpt.pt.tmp-')]
    assert stale, os.listdir(out)
    p.kill()
    p.wait(timeout=60)
    assert mj.load_checkpoint(str(out / 'ckpt.pt'))['iter_num'] == 5  # the last complete one
    mj.main(run_args(unlabeled, out, '--init_from=resume'))
    assert_same_weights(reference, mj.load_checkpoint(str(out / 'ckpt.pt')))
    assert not [f for f in os.listdir(out) if '.tmp-' in f]  # the killed writer's file was removed


def test_torn_checkpoint_is_detected_and_the_previous_one_is_kept(unlabeled, reference, tmp_path):
    out = tmp_path / 'out'
    mj.main(run_args(unlabeled, out, '--max_iters=7'))  # checkpoints at 5, then 7 (5 becomes ckpt.prev.pt)
    assert mj.load_checkpoint(str(out / 'ckpt.prev.pt'))['iter_num'] == 5
    (out / 'ckpt.pt').write_bytes((out / 'ckpt.pt').read_bytes()[:5000])  # torn: e.g. a copy cut short
    with pytest.raises(RuntimeError, match=r"cannot be read.*ckpt\.prev\.pt: mv it to .*ckpt\.pt"):
        mj.main(run_args(unlabeled, out, '--init_from=resume'))
    os.replace(out / 'ckpt.prev.pt', out / 'ckpt.pt')  # the way out the message gives
    mj.main(run_args(unlabeled, out, '--init_from=resume'))
    assert_same_weights(reference, mj.load_checkpoint(str(out / 'ckpt.pt')))

# ----------------------------------------------------------------------------- full disk


def full_disk_open(limit):
    """open() whose files accept `limit` bytes, then fail like a full disk (ENOSPC)."""
    class Full(io.FileIO):
        def write(self, b):
            if self.tell() + len(b) > limit:
                super().write(bytes(b)[:max(0, limit - self.tell())])
                raise OSError(errno.ENOSPC, 'No space left on device')
            return super().write(b)
    return lambda path, mode='r', *a, **k: Full(path, mode.replace('b', '')) if 'w' in mode else open(path, mode, *a, **k)


def test_disk_full_while_saving_a_checkpoint_keeps_the_old_one(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    mj.save_checkpoint(path, {'iter_num': 1, 'w': torch.ones(1000)})
    before = open(path, 'rb').read()
    monkeypatch.setattr(medjepa_utils, 'open', full_disk_open(2000), raising=False)  # save_checkpoint's open() only
    with pytest.raises(OSError, match=r'disk full while writing the checkpoint .*ckpt\.pt: free space') as e:
        mj.save_checkpoint(path, {'iter_num': 2, 'w': torch.zeros(100000)})
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert open(path, 'rb').read() == before and mj.load_checkpoint(path)['iter_num'] == 1
    assert os.listdir(tmp_path) == ['ckpt.pt']  # no partial file left to fill the disk further


def test_disk_full_while_preparing_a_data_set_leaves_no_partial_folder(tmp_path, monkeypatch):
    old = make_data(tmp_path / 'data' / 'other')  # a data set prepared earlier, next to the new one
    before = {f: open(os.path.join(old, f), 'rb').read() for f in os.listdir(old)}
    real_save = np.save

    def full_save(path, a, *args, **kw):  # the third array written finds the disk full half-way
        full_save.calls += 1
        if full_save.calls == 3:
            with open(path, 'wb') as f:
                f.write(b'\x93NUMPY' + b'\0' * 100)
            raise OSError(errno.ENOSPC, 'No space left on device', str(path))
        return real_save(path, a, *args, **kw)
    full_save.calls = 0
    monkeypatch.setattr(prepare.np, 'save', full_save)
    with pytest.raises(OSError, match=r'disk full while writing .*demo.*free space') as e:
        prepare.prepare_demo(tmp_path / "data" / "demo", size=16, n_train=42, n_val=21, n_test=21, workers=1)
    assert e.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path / 'data')) == ['other']  # no demo/, no hidden staging folder
    assert {f: open(os.path.join(old, f), 'rb').read() for f in os.listdir(old)} == before

# ----------------------------------------------------------------------------- NaN / inf


def poison(monkeypatch, bad_steps, seen=None):
    """The loss turns NaN at the given steps (and so do the gradients); seen[step] = the weights then."""
    real = mj.JEPA.forward

    def forward(self, batch, step, **kw):
        if seen is not None:
            seen[step] = {k: v.clone() for k, v in self.state_dict().items()}
        loss, stats = real(self, batch, step, **kw)
        return (loss * float('nan') if step in bad_steps else loss), stats
    monkeypatch.setattr(mj.JEPA, 'forward', forward)


def test_nonfinite_steps_are_skipped_and_counted(unlabeled, tmp_path, monkeypatch, capsys):
    seen = {}
    poison(monkeypatch, {3, 4}, seen)
    out = tmp_path / 'out'
    model = mj.main(run_args(unlabeled, out, '--max_iters=8', '--max_bad_steps=3'))
    assert 'update skipped (2 in a row, 2 in all)' in capsys.readouterr().out
    for k in seen[3]:  # steps 3 and 4 did not move the weights; the others did
        assert torch.equal(seen[3][k], seen[5][k]), k
    assert any(not torch.equal(seen[2][k], seen[3][k]) for k in seen[3])
    assert all(v.isfinite().all() for v in model.state_dict().values())
    logged = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['skipped'] for r in logged if 'loss' in r] == [0, 0, 0, 1, 2, 2, 2, 2]  # iter 4 logs step 3


def test_repeated_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(unlabeled, tmp_path, monkeypatch):
    seen = {}
    poison(monkeypatch, set(range(8, 100)), seen)  # the 9th step and all after it
    out = tmp_path / 'out'
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(FloatingPointError, match='4 non-finite steps in a row at step 12.*learning_rate.*dtype=float32'):
        mj.main(run_args(unlabeled, out, '--max_bad_steps=4'))
    assert signal.getsignal(signal.SIGTERM) is before  # train()'s pre-emption handler is gone with it
    ckpt = mj.load_checkpoint(str(out / 'ckpt.pt'))  # written after 5 steps, then after 10 with the weights of 8
    assert ckpt['iter_num'] == 10
    for k, v in ckpt['model'].items():
        assert v.isfinite().all() and torch.equal(v, seen[8][k]), k


def test_weights_made_infinite_by_a_huge_learning_rate_are_never_saved(unlabeled, tmp_path):
    out = tmp_path / 'out'
    mj.main(run_args(unlabeled, out, '--max_iters=5'))
    good = (out / 'ckpt.pt').read_bytes()
    with pytest.raises(FloatingPointError, match='weights hold NaN/inf at step 10: not saving'):
        mj.main(run_args(unlabeled, out, '--init_from=resume', '--learning_rate=1e39', '--max_bad_steps=100'))
    assert (out / 'ckpt.pt').read_bytes() == good

# ----------------------------------------------------------------------------- bad config values


@pytest.mark.parametrize('arg,msg', [
    ('--patch_size=0', 'patch_size=0 must be at least 1'),
    ('--n_head=0', 'n_head=0 must be at least 1'),
    ('--target_scale=(0.0,0.2)', r'target_scale=\(0.0, 0.2\) must satisfy 0 < low'),
    ('--context_scale=(0.9,1.2)', 'context_scale'),
    ('--target_aspect=(0,1)', 'target_aspect'),
    ('--grad_clip=-1', 'grad_clip=-1.0 must be >= 0'),
    ('--weight_decay=-0.1', 'weight_decay=-0.1 must be >= 0'),
    ('--beta2=1.0', r'beta2=1.0 must be in \[0, 1\)'),
    ('--min_lr=0.1', 'min_lr=0.1 at most learning_rate'),
    ('--learning_rate=0', 'learning_rate=0.0 must be > 0'),
    ('--learning_rate=1e999', 'finite'),
    ('--warmup_iters=-1', 'warmup_iters=-1 must be >= 0'),
    ('--seed=-1', 'seed=-1 must be >= 0'),
    ('--max_bad_steps=0', 'max_bad_steps=0 must be at least 1'),
    ('--device=gpu', "device 'gpu' is not one of"),
    ('--device=cuda:x', "device 'cuda:x'"),
    ('--out_dir=', "out_dir='' must be non-empty"),
    ('--local_size=0', 'local_size=0 must be at least 1'),
    ('--n_local_views=-1', 'n_local_views=-1 must be >= 0'),
    ('--knn_train_size=0', 'knn_train_size=0'),
    ('--gray_prob=1.5', 'gray_prob'),
    ('--context_keep=0', r'context_keep=0.0 must lie in \(0, 1\]'),
    ('--sigreg_lambda=2', 'sigreg_lambda'),
])
def test_bad_config_values_are_rejected_naming_the_key(arg, msg):
    with pytest.raises(mj.ConfigError, match=msg):
        mj.validate(mj.configure([arg]))


@pytest.mark.parametrize('arg,msg', [
    ('--patch_size=(0,8,8)', r'patch_size=\(0, 8, 8\) must be at least 1'),
    ('--volume_size=(32,0,32)', 'volume_size'),
    ('--depth_scale=(0.5,1.5)', 'depth_scale'),
    ('--min_keep=0', 'min_keep=0 must be at least 1'),
    ('--beta1=-0.1', 'beta1'),
])
def test_bad_3d_config_values_are_rejected_naming_the_key(arg, msg):
    with pytest.raises(mj.ConfigError, match=msg):
        m3.validate(mj.configure([arg], m3.DEFAULTS))


def test_accumulation_counts_micro_steps_per_process_so_any_world_size_validates(monkeypatch):
    for world in ('1', '2', '3', '8'):
        monkeypatch.setenv('WORLD_SIZE', world)
        for accum in (1, 2, 3):
            assert mj.validate(mj.configure([f'--gradient_accumulation_steps={accum}']))['gradient_accumulation_steps'] == accum


def test_a_bad_value_on_the_command_line_exits_2_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, 'medjepa.py', '--beta1=1.5', f'--out_dir={tmp_path}/o'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'beta1=1.5 must be in [0, 1)' in r.stderr and 'Traceback' not in r.stderr
    assert not os.path.exists(tmp_path / 'o')

# ----------------------------------------------------------------------------- bad data


def break_data(d, how):
    if how == 'empty dir':
        shutil.rmtree(d)
        os.makedirs(d)
    elif how == 'count mismatch':
        np.save(os.path.join(d, 'train_labels.npy'), np.full(10, -1, np.int64))
    elif how == 'float images':
        np.save(os.path.join(d, 'train_images.npy'), np.zeros((64, 32, 32, 3), np.float32))
    elif how == 'no images':
        np.save(os.path.join(d, 'train_images.npy'), np.zeros((0, 32, 32, 3), np.uint8))
    elif how == 'label out of range':
        labels = np.load(os.path.join(d, 'train_labels.npy'))
        labels[7] = 2  # two classes: 0 and 1
        np.save(os.path.join(d, 'train_labels.npy'), labels)
    elif how == 'meta without std':
        meta = json.load(open(os.path.join(d, 'meta.json')))
        del meta['std']
        json.dump(meta, open(os.path.join(d, 'meta.json'), 'w'))


@pytest.mark.parametrize('how,error,msg', [
    ('empty dir', FileNotFoundError, 'missing meta.json.*prepare.py'),
    ('count mismatch', ValueError, 'train_labels.npy has 10 rows, images 64'),
    ('float images', ValueError, r'train_images.npy is float32 \(64, 32, 32, 3\), not non-empty uint8'),
    ('no images', ValueError, r'train_images.npy is uint8 \(0, 32, 32, 3\), not non-empty'),
    ('label out of range', ValueError, r'train_labels.npy holds int64 0..2, not classes 0..1'),
    ('meta without std', ValueError, "meta.json lacks 'std'"),
])
def test_bad_data_give_a_clear_error_before_training(tmp_path, how, error, msg):
    d = make_data(tmp_path / 'd', task='multiclass')
    break_data(d, how)
    with pytest.raises(error, match=msg):
        mj.main(TINY + [f'--data_dir={d}', f'--out_dir={tmp_path}/o', '--max_iters=2'])
    assert not os.path.exists(tmp_path / 'o' / 'ckpt.pt')
