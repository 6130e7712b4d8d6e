"""Faults and bad input (docs/reliability.md has the table): kill -9 during training and
during a checkpoint write, torn checkpoints, a full disk, NaN/inf steps, bad config values, bad data,
two runs on one out_dir, the torch that may load checkpoints."""
import copy
import errno
import io
import json
import os
import re
import signal
import shutil
import socket
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import medjepa as mj
import medjepa_utils
import medjepa3d as m3
import prepare
from subproc import Child  # tests/subproc.py: output read with a deadline

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
    return Child(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'))

# ----------------------------------------------------------------------------- kill -9, torn checkpoints


PAUSED_AFTER_STEP_13 = '''
import sys, time, medjepa
log_step = medjepa.log_step
def paused(log, step, *args):  # after the log line of step 13, hang mid-training: to be killed there
    log_step(log, step, *args)
    if step == 13:
        print('PAUSED', flush=True)
        time.sleep(600)
medjepa.log_step = paused
medjepa.main(sys.argv[1:])
'''


def test_kill_9_mid_training_then_resume_ends_with_the_same_weights(unlabeled, reference, tmp_path):
    """Unlabelled data (no kNN monitor) still get a checkpoint every eval_interval steps. The run is held
    after step 13, so the checkpoint on disk is step 10's whatever the speed of either process (the
    step-15 one is never written). While it lives, a second run on its out_dir is refused; once killed,
    its lock is recognised as a dead run's and cleared by the resume."""
    out = str(tmp_path / 'out')
    child = start(run_args(unlabeled, out), PAUSED_AFTER_STEP_13)
    child.wait_for('PAUSED', timeout=300)  # checkpoints were written at steps 5 and 10
    live = rf"in use by a live run \(pid {child.p.pid} on {re.escape(socket.gethostname())}"
    with pytest.raises(mj.ConfigError, match=live):
        mj.main(run_args(unlabeled, out, '--init_from=resume'))
    child.kill()
    assert child.p.returncode == -9
    assert mj.load_checkpoint(os.path.join(out, 'ckpt.pt'))['iter_num'] == 10
    with open(os.path.join(out, 'log.jsonl'), 'a') as f:
        f.write('{"iter": 14, "loss": 1.')  # a torn line, as a kill during a write leaves it
    mj.main(run_args(unlabeled, out, '--init_from=resume'))
    assert_same_weights(reference, mj.load_checkpoint(os.path.join(out, 'ckpt.pt')))
    assert not os.path.exists(os.path.join(out, 'run.lock'))  # released at the end of the run
    steps = [json.loads(line)['iter'] for line in open(os.path.join(out, 'log.jsonl')) if '"loss"' in line]
    assert steps == list(range(1, 25))  # steps 11-13 were logged before the kill and again after resume: once


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
    child = start(run_args(unlabeled, out), TORN_WRITER)
    child.wait_for('HALF-WRITTEN', timeout=300)
    stale = [f for f in os.listdir(out) if f.startswith('ckpt.pt.tmp-')]
    assert stale, os.listdir(out)
    child.kill()
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
    assert '1 update(s) skipped since the last log line (2 in a row, 2 in all)' in capsys.readouterr().out
    for k in seen[3]:  # steps 3 and 4 did not move the weights; the others did
        assert torch.equal(seen[3][k], seen[5][k]), k
    assert any(not torch.equal(seen[2][k], seen[3][k]) for k in seen[3])
    assert all(v.isfinite().all() for v in model.state_dict().values())
    logged = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['skipped'] for r in logged if 'loss' in r] == [0, 0, 0, 1, 2, 2, 2, 2]  # iter 4 logs step 3


@pytest.mark.parametrize('poisoned', [False, True])
def test_a_training_step_never_waits_on_the_device(monkeypatch, poisoned):
    """train_step reads no value back to the host (.item(), bool(), float() of a tensor): on a GPU each
    would stall the queue once per step. The skip decision for a non-finite step stays on the device
    (the fused AdamW kernel's found_inf), and a skipped step leaves weights and moments as they were."""
    cfg = dict(mj.DEFAULTS, n_layer=1, n_embd=32, n_head=2, pred_n_layer=1, pred_n_embd=16, pred_n_head=2,
               image_size=16, patch_size=4, num_slices=16)
    torch.manual_seed(0)
    model = mj.build_model(cfg)
    optimizer = mj.make_optimizer(model, cfg, 'cpu')
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    batches = [mj.make_batch(cfg, images, np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32), s, 0, 'cpu')
               for s in range(3)]
    batches[2]['x_tgt'][0] = float('nan') if poisoned else batches[2]['x_tgt'][0]
    scaler = torch.amp.GradScaler(enabled=False)
    step = lambda s: mj.train_step(model, optimizer, scaler, lambda micro: batches[s], 1, s, nullcontext(), 1.0)
    step(0), step(1)
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict()))

    def sync(self, *args):
        raise AssertionError('train_step read a tensor back to the host')
    for name in ('item', '__bool__', '__float__', '__int__', 'tolist'):
        monkeypatch.setattr(torch.Tensor, name, sync)
    loss, stats, _ = step(2)
    monkeypatch.undo()
    assert bool(stats['skipped']) == poisoned
    same = [torch.equal(a, b) for a, b in zip(before[0].values(), model.state_dict().values())]
    assert all(same) if poisoned else not any(same)
    moments = lambda sd: [t for st in sd['state'].values() for t in st.values()]
    assert all(torch.equal(a, b) for a, b in zip(moments(before[1]), moments(optimizer.state_dict()))) == poisoned


def test_repeated_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(unlabeled, tmp_path, monkeypatch):
    seen = {}
    poison(monkeypatch, set(range(8, 100)), seen)  # the 9th step and all after it
    out = tmp_path / 'out'
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(FloatingPointError, match='4 non-finite steps in a row by step 12.*learning_rate.*dtype=float32'):
        mj.main(run_args(unlabeled, out, '--max_bad_steps=4'))
    assert signal.getsignal(signal.SIGTERM) is before  # train()'s pre-emption handler is gone with it
    ckpt = mj.load_checkpoint(str(out / 'ckpt.pt'))  # written after 5 steps, then after 10 with the weights of 8
    assert ckpt['iter_num'] == 10
    for k, v in ckpt['model'].items():
        assert v.isfinite().all() and torch.equal(v, seen[8][k]), k


def test_a_diverged_stretch_between_two_log_lines_still_stops_the_run(unlabeled, tmp_path, monkeypatch, capsys):
    """Skipped steps are read on log steps only (no sync per step): 4 bad steps in a row (steps 5-8)
    that end before the log line at step 10 must still stop a run with max_bad_steps=4."""
    poison(monkeypatch, {5, 6, 7, 8})
    with pytest.raises(FloatingPointError, match='4 non-finite steps in a row by step 10'):
        mj.main(run_args(unlabeled, tmp_path / 'out', '--max_bad_steps=4', '--log_interval=5'))
    assert '4 update(s) skipped since the last log line (0 in a row, 4 in all)' in capsys.readouterr().out


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
    ('--view_keep=1.5', r'view_keep=1.5 must lie in \(0, 1\]'),
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


@pytest.mark.parametrize('arg,msg', [
    ('--learning_rate=' + '9' * 400, 'learning_rate=9{20}.* is too large'),  # float() of it: OverflowError
    ('--crop_scale=(0.3, 1' + '0' * 400 + ')', 'crop_scale=.* is too large'),
    (f'--seed={2 ** 64}', f'seed={2 ** 64} must be below {2 ** 32}'),  # torch.manual_seed: overflow
    (f'--num_threads={2 ** 40}', f'num_threads={2 ** 40} must be at most 4096'),  # torch.set_num_threads: overflow
    (f'--warmup_iters={10 ** 400}', 'warmup_iters=1000.* must be at most 2\\*\\*53'),  # lr_at: float overflow
    ('--max_iters=1e300', 'max_iters=1000.* must be at most 2\\*\\*53'),  # an integral float becomes an int
], ids=['learning_rate', 'crop_scale', 'seed', 'num_threads', 'warmup_iters', 'max_iters'])
def test_numbers_too_large_to_use_are_rejected_naming_the_key(arg, msg):
    """Each of these passed validate() and crashed inside train() (or raised OverflowError in configure)."""
    with pytest.raises(mj.ConfigError, match=msg):
        mj.validate(mj.configure([arg]))


@pytest.mark.parametrize('arg,says', [
    ('--beta1=1.5', 'beta1=1.5 must be in [0, 1)'),
    ('--learning_rate=' + '9' * 400, 'is too large'),
    (f'--seed={2 ** 64}', 'must be below'),
], ids=['beta1', 'learning_rate', 'seed'])
def test_a_bad_value_on_the_command_line_exits_2_before_any_work(tmp_path, arg, says):
    r = subprocess.run([sys.executable, 'medjepa.py', arg, f'--out_dir={tmp_path}/o'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and says in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
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


def relabel(d, task, classes, labels):
    """The data set of make_data with another task, class list and {split: labels}."""
    for split, y in labels.items():
        np.save(os.path.join(d, f'{split}_labels.npy'), np.asarray(y, dtype=np.int64))
    meta = json.load(open(os.path.join(d, 'meta.json')))
    json.dump(dict(meta, task=task, classes=classes, num_classes=len(classes)), open(os.path.join(d, 'meta.json'), 'w'))


GOOD = np.arange(16) % 2
ORDINAL = np.arange(16) % 5
MULTI = np.stack([np.arange(16) % 2, np.arange(16) // 2 % 2, np.zeros(16, int)], 1)


@pytest.mark.parametrize('task,classes,val,msg', [
    ('binary', ['no', 'yes'], np.where(GOOD == 1, 2, 0), r'val_labels.npy holds int64 0..2, not classes 0..1'),
    ('ordinal', list('01234'), ORDINAL - 1, r'val_labels.npy holds int64 -1..3, not classes 0..4'),
    ('ordinal', list('01234'), ORDINAL + 1, r'val_labels.npy holds int64 1..5, not classes 0..4'),
    ('multiclass', ['a', 'b'], GOOD[:, None], r'val_labels.npy is int64 \(16, 1\), not \(N,\) class ids'),
    ('multilabel', ['a', 'b', 'c'], MULTI[:, :2], r'val_labels.npy is int64 \(16, 2\), not \(N, 3\)'),
    ('multilabel', ['a', 'b', 'c'], 2 * MULTI, r'val_labels.npy holds int64 0..2, not 0/1'),
    ('multilabel', ['a', 'b', 'c'], MULTI[:, 0], r'val_labels.npy is int64 \(16,\), not \(N, 3\)'),
    ('unlabeled', [], GOOD[:, None], r'val_labels.npy is int64 \(16, 1\), not \(N,\)'),
    ('binary', ['no', 'yes'], GOOD, None),  # the right labels for each task pass
    ('ordinal', list('01234'), ORDINAL, None),
    ('multilabel', ['a', 'b', 'c'], MULTI, None),
    ('segmentation', [], -np.ones(16, int), None),
])
def test_labels_that_do_not_fit_the_task_are_refused_before_step_1(tmp_path, task, classes, val, msg):
    """Every task type of docs/data_format.md: out-of-range binary or ordinal grades used to train without a
    word and then score a QWK of -1.6 in eval.py; now training and evaluation refuse the folder, naming the data
    set, the split's file and the fix."""
    d = make_data(tmp_path / 'd', task='multiclass')
    train = {'binary': GOOD, 'ordinal': ORDINAL, 'multilabel': MULTI}.get(task, GOOD if classes else np.full(64, -1))
    relabel(d, task, classes, {'train': np.resize(train, (64,) + np.shape(train)[1:]), 'val': val})
    if msg is None:
        assert mj.load_split(d, 'val')['labels'].shape == np.shape(val)
        return
    says = rf"data set 'tiny' in '.*d'.*{msg}.* \(task '{task}'\).*python prepare.py"
    with pytest.raises(mj.ConfigError, match=says):
        mj.main(TINY + [f'--data_dir={d}', f'--out_dir={tmp_path}/o', '--max_iters=2'])
    assert not os.path.exists(tmp_path / 'o')  # before step 1: no out_dir, no log.jsonl, no checkpoint
    import eval as ev
    with pytest.raises(mj.ConfigError, match=msg):
        ev.load_data(d)


def test_a_constant_channel_gets_std_1_and_std_0_never_reaches_training(tmp_path):
    """prepare.py writes std 1.0 for a channel without variation (an empty modality, a grey picture stored
    as RGB with one channel zero); a meta.json whose std is 0, negative or not finite (or whose mean is not
    finite) is refused before any work: every step would be NaN and the error would blame learning_rate."""
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    images[..., 1] = 77
    mean, std = prepare.channel_stats(images)
    assert std[1] == 1.0 and 0.2 < std[0] < 0.4 and mean[1] == round(77 / 255, 6)
    d = make_data(tmp_path / 'd')
    meta = json.load(open(os.path.join(d, 'meta.json')))
    for key, values in [('std', [0.3, 0.0, 0.3]), ('std', [0.3, -0.1, 0.3]), ('std', [0.3, float('nan'), 0.3]),
                        ('std', [0.3, float('inf'), 0.3]), ('mean', [0.5, float('nan'), 0.5])]:
        json.dump(dict(meta, **{key: values}), open(os.path.join(d, 'meta.json'), 'w'))  # (NaN is written as NaN)
        with pytest.raises(mj.ConfigError, match=rf"data set 'tiny' in '.*d': meta.json's {key} .*python prepare.py"):
            mj.main(TINY + [f'--data_dir={d}', f'--out_dir={tmp_path}/o', '--max_iters=2'])
        assert not os.path.exists(tmp_path / 'o')


@pytest.mark.parametrize('change,msg', [
    (dict(num_classes='2'), "num_classes '2' is not an integer"),
    (dict(num_classes=True), 'num_classes True is not an integer'),
    (dict(spatial_dims='2'), "spatial_dims '2' is not 2 or 3"),
    (dict(mean=[0.5, 0.5]), r'mean and std have 2 and 3 values: the images have 3 channels'),
    (dict(mean=[0.5, 0.5], std=[0.3, 0.3]), r'mean and std have 2 and 2 values: the images have 3 channels'),
    (dict(std='0.3'), "std '0.3' is not a list of numbers"),
    (dict(mean=[0.5, None, 0.5]), r'mean \[0.5, None, 0.5\] is not a list of numbers'),
    (dict(mean=[0.5, '0.5', 0.5]), r"mean \[0.5, '0.5', 0.5\] is not a list of numbers"),
    (dict(task=['multiclass']), r"task \['multiclass'\] is not one of multiclass, binary"),
    (dict(task='regression'), "task 'regression' is not one of"),
    (dict(classes=['a']), r'len\(classes\) is 1 but num_classes is 2'),
    (dict(channels=1), 'channels 1 but the images have 3'),
    (dict(name=['tiny']), r"name \['tiny'\] is not a string"),
    ('{"name": "tiny", "mean": [0.5', 'meta.json is not valid JSON'),
    ('[1, 2]', 'meta.json holds a list, not an object'),
])
def test_a_hostile_meta_json_is_refused_before_any_work(tmp_path, change, msg):
    """Strings for numbers, lists of the wrong length, a torn file: one ConfigError naming the key and the
    data set (they gave TypeErrors, or spatial_dims "2" the message to train with medjepa.py, which it was)."""
    d = make_data(tmp_path / 'd', task='multiclass')
    meta = json.load(open(os.path.join(d, 'meta.json')))
    with open(os.path.join(d, 'meta.json'), 'w') as f:
        f.write(change if isinstance(change, str) else json.dumps(dict(meta, **change)))
    with pytest.raises(mj.ConfigError, match=msg) as e:
        mj.main(TINY + [f'--data_dir={d}', f'--out_dir={tmp_path}/o', '--max_iters=2'])
    assert f"in '{d}'" in str(e.value) and 'prepare.py' in str(e.value)
    assert not os.path.exists(tmp_path / 'o')


def test_a_hostile_video_flag_is_refused_by_the_3d_checks(tmp_path):
    d = make_data(tmp_path / 'd')
    meta = json.load(open(os.path.join(d, 'meta.json')))
    json.dump(dict(meta, spatial_dims=3, video='false'), open(os.path.join(d, 'meta.json'), 'w'))
    with pytest.raises(mj.ConfigError, match="video 'false' is not true or false"):  # bool('false') is True
        m3.validate(mj.configure([f'--data_dir={d}'], m3.DEFAULTS))


def test_bad_data_are_one_line_and_exit_2_in_training_and_evaluation(tmp_path):
    d = make_data(tmp_path / 'd', task='multiclass')
    relabel(d, 'binary', ['no', 'yes'], {'val': np.where(GOOD == 1, 2, 0)})
    ckpt = tmp_path / 'e' / 'ckpt.pt'
    os.makedirs(ckpt.parent)
    torch.save(dict(model={}, config=dict(mj.DEFAULTS, data_dir=d), iter_num=1), ckpt)
    for cmd in (['medjepa.py', *TINY, f'--data_dir={d}', f'--out_dir={tmp_path}/o'], ['eval.py', f'--ckpt={ckpt}']):
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and 'val_labels.npy holds int64 0..2' in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / 'o')

# ----------------------------------------------------------------------------- one run per out_dir


def test_a_scratch_run_never_mixes_with_the_run_already_in_its_out_dir(unlabeled, tmp_path):
    """A second --init_from=scratch run into an out_dir that holds a run (here two checkpoints, a log and an
    evaluation) is refused before any work, the files untouched; also when the checkpoint is another kind's
    (3-D). With --overwrite=True the earlier run's files are deleted first: the log holds one run."""
    out = tmp_path / 'out'
    mj.main(run_args(unlabeled, out, '--max_iters=6'))  # checkpoints at 5 (ckpt.prev.pt) and 6
    (out / 'eval.json').write_text('{"from": "the first run"}\n')
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert set(before) == {'ckpt.pt', 'ckpt.prev.pt', 'log.jsonl', 'eval.json'}
    with pytest.raises(mj.ConfigError, match=r"already holds a run \(ckpt.pt, ckpt.prev.pt, log.jsonl, eval.json\)"
                                             r".*--init_from=resume.*another --out_dir.*--overwrite=True"):
        mj.main(run_args(unlabeled, out, '--max_iters=3'))
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    other = tmp_path / 'other'
    os.makedirs(other)
    mj.save_checkpoint(str(other / 'ckpt.pt'), dict(model={}, iter_num=1, spatial_dims=3))
    with pytest.raises(mj.ConfigError, match='already holds a run'):
        mj.main(run_args(unlabeled, other, '--max_iters=3'))
    mj.main(run_args(unlabeled, out, '--max_iters=3', '--overwrite=True'))
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']  # no ckpt.prev.pt, no eval.json of the first run
    assert [json.loads(line)['iter'] for line in open(out / 'log.jsonl')] == [1, 2, 3]
    assert mj.load_checkpoint(str(out / 'ckpt.pt'))['iter_num'] == 3


def write_lock(out, pid, host=None):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'run.lock'), 'w') as f:
        json.dump(dict(pid=pid, host=host or socket.gethostname(), started='2026-01-01 00:00:00'), f)


def test_the_lock_of_a_live_run_stops_a_second_one_and_a_dead_runs_lock_is_cleared(unlabeled, tmp_path, capsys):
    out = str(tmp_path / 'out')
    sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])
    try:
        write_lock(out, sleeper.pid)  # a live process on this host holds the out_dir
        with pytest.raises(mj.ConfigError, match=rf"'{re.escape(out)}' is in use by a live run \(pid {sleeper.pid} on "
                                                 rf"{re.escape(socket.gethostname())}, started 2026-01-01 00:00:00\)"):
            mj.main(run_args(unlabeled, out, '--max_iters=2'))
    finally:
        sleeper.kill()
        sleeper.wait(timeout=60)
    write_lock(out, sleeper.pid, host='another-host')  # cannot be checked from here: refused, saying how to clear it
    with pytest.raises(mj.ConfigError, match=r"pid \d+ on another-host.*if that run is dead, delete .*run.lock"):
        mj.main(run_args(unlabeled, out, '--max_iters=2'))
    (tmp_path / 'out' / 'run.lock').write_text('{"pid": 12')  # torn: cannot tell who holds it
    with pytest.raises(mj.ConfigError, match=r"run.lock cannot be read.*delete it"):
        mj.main(run_args(unlabeled, out, '--max_iters=2'))
    write_lock(out, sleeper.pid)  # the sleeper is dead now: its lock is recognised and cleared
    mj.main(run_args(unlabeled, out, '--max_iters=2'))
    assert f'cleared the lock of a run that is gone (pid {sleeper.pid}' in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']  # and the run released its own lock


def test_a_checkpoint_write_removes_only_the_temporary_files_of_dead_writers(tmp_path):
    """The cleanup of stale ckpt.pt.tmp-* files must not delete the file another live process is writing."""
    sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])
    gone = subprocess.Popen([sys.executable, '-c', 'pass'])
    gone.wait(timeout=60)
    host, path = socket.gethostname(), tmp_path / 'ckpt.pt'
    try:
        names = {'live': f'ckpt.pt.tmp-{host}-{sleeper.pid}', 'dead': f'ckpt.pt.tmp-{host}-{gone.pid}',
                 'old-style dead': f'ckpt.pt.tmp-{gone.pid}', 'other host': f'ckpt.pt.tmp-elsewhere-{gone.pid}'}
        for name in names.values():
            (tmp_path / name).write_bytes(b'half a checkpoint')
        mj.save_checkpoint(str(path), {'iter_num': 1})
        assert sorted(os.listdir(tmp_path)) == sorted(['ckpt.pt', names['live'], names['other host']])
    finally:
        sleeper.kill()
        sleeper.wait(timeout=60)

# ----------------------------------------------------------------------------- the torch that may load checkpoints


def test_torch_with_a_known_weights_only_bypass_is_refused_and_never_installed(tmp_path, monkeypatch):
    """requirements.txt, the Makefile and load_checkpoint agree on the floor (docs/reliability.md, Security)."""
    floor = medjepa_utils.SAFE_TORCH
    req = re.search(r'^torch>=(\d+)\.(\d+)\s*$', open(os.path.join(ROOT, 'requirements.txt')).read(), re.M)
    assert req and tuple(map(int, req.groups())) == floor >= (2, 10)
    install = [line.strip() for line in open(os.path.join(ROOT, 'Makefile')) if 'import' in line and 'torch' in line]
    assert len(install) == 1 and install[0].endswith('|| $(PYTHON) -m pip install "torch==2.13.0"'), install
    check = install[0].lstrip('@').split('||')[0].replace('$(PYTHON)', sys.executable)
    for version, kept in [('2.5.1', False), ('2.9.1+cu121', False), ('2.10.0', True), ('2.13.0+cpu', True),
                          ('2.10.0a0+git1234', True), ('3.0.0', True), ('1.13.1', False)]:
        fake = tmp_path / version / 'torch'
        fake.mkdir(parents=True)
        (fake / '__init__.py').write_text(f'__version__ = {version!r}\n')
        r = subprocess.run(['sh', '-c', check], env=dict(os.environ, PYTHONPATH=str(fake.parent)), timeout=60)
        assert (r.returncode == 0) == kept, version
    makefile = open(os.path.join(ROOT, 'Makefile')).read()
    assert not re.search(r'pip install[^\n]*["\s]torch["\s]', makefile)  # never an unpinned torch
    path = tmp_path / 'ckpt.pt'
    mj.save_checkpoint(str(path), {'iter_num': 1})
    monkeypatch.setattr(torch, '__version__', '2.9.1')
    with pytest.raises(mj.ConfigError, match=r"torch 2.9.1 .*CVE-2026-24747.*pip install 'torch>=2.10'"):
        mj.load_checkpoint(str(path))
