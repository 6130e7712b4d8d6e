"""Data parallelism and gradient accumulation must give one process's result on the whole batch.

2 gloo processes on CPU (mp.spawn for SIGReg alone, torchrun for whole training steps and for
medjepa.py itself). What is exact and what is not is written in medjepa.train_step's docstring.
"""
import json
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import medjepa as mj

N, K = 64, 16


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 8, generator=g), torch.randn(8, K, generator=g)


def _reference():
    """One process: SIGReg of a linear embedding of the whole batch, its value and gradients."""
    x, w = _data()
    w = w.clone().requires_grad_()
    z = (x @ w).detach().requires_grad_()
    loss = mj.sigreg(x @ w, step=7, num_slices=32)
    loss.backward()
    zloss = mj.sigreg(z, step=7, num_slices=32)
    zloss.backward()
    return loss.item(), w.grad, z.grad


def _worker(rank, world, init_file, out_file, sizes):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    x, w = _data()
    w = w.clone().requires_grad_()
    shard = x.split(sizes)[rank]
    z = (shard @ w).detach().requires_grad_()
    zloss = mj.sigreg(z, step=7, num_slices=32)
    zloss.backward()
    loss = mj.sigreg(shard @ w, step=7, num_slices=32)
    loss.backward()
    dist.all_reduce(w.grad)  # what DDP does with parameter gradients: average over ranks
    w.grad /= world
    torch.save(dict(loss=loss.item(), wgrad=w.grad, zgrad=z.grad), f'{out_file}.{rank}')
    dist.destroy_process_group()


@pytest.mark.parametrize('sizes', [(32, 32), (24, 40)])
def test_sigreg_on_two_gloo_processes_equals_one_process(tmp_path, sizes):
    """Also with shards of unequal size (3-D contexts vary in length, so sigreg_on='tokens' gives ranks
    different row counts): the statistic pools sums and counts, not per-rank means."""
    world = 2
    ctx = mp.spawn(_worker, args=(world, str(tmp_path / 'rdv'), str(tmp_path / 'out'), sizes), nprocs=world, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):  # (raises if a worker failed)
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError('the gloo workers did not finish within 180 s')
    ref_loss, ref_wgrad, ref_zgrad = _reference()
    outs = [torch.load(f'{tmp_path}/out.{r}', weights_only=True) for r in range(world)]
    for r, o in enumerate(outs):
        assert o['loss'] == pytest.approx(ref_loss, rel=1e-5)  # every rank sees the global statistic
        torch.testing.assert_close(o['wgrad'], ref_wgrad, rtol=1e-4, atol=1e-6)  # parameter gradient after DDP
        # each rank's embedding gradient is world x its slice of the global one; DDP's averaging
        # over ranks then divides by world (a plain all_reduce would leave it world times too small)
        torch.testing.assert_close(o['zgrad'] / world, ref_zgrad.split(sizes)[r], rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- a full training step under torchrun

import subprocess  # noqa: E402
import sys  # noqa: E402

import ddp_step  # noqa: E402  (tests/ddp_step.py: the worker torchrun launches)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_same_step(got, ref, what):
    assert got['losses'] == pytest.approx(ref['losses'], rel=1e-5, nan_ok=True), what
    for step, (g, r) in enumerate(zip(got['grads'], ref['grads'])):
        for n in r:
            torch.testing.assert_close(g[n], r[n], rtol=1e-4, atol=1e-7, msg=f'{what}: gradient of {n}, step {step}')
    # AdamW divides each gradient by its own running size, so an element's update inherits the
    # *relative* error of its gradient: where the true gradient is ~0 (the key bias, which softmax
    # ignores; the final norm's scale, which the standardised SIGReg ignores) rounding noise of ~1e-7
    # still moves the weight by up to lr per step in a random direction. So each element may differ
    # by 1e-6 plus lr * steps * (1e-6 / its smallest |gradient|), capped at 2 lr per step; elements
    # with real gradients (>= 1e-3) must agree to ~1e-6, and every gradient was compared above.
    lr, steps = 1e-3, len(ref['grads'])
    for n in ref['weights']:
        gmin = torch.stack([r[n].abs() for r in ref['grads']]).min(0).values
        tol = 1e-6 + lr * steps * (1e-6 / gmin.clamp_min(1e-12)).clamp(max=2.0)
        err = (got['weights'][n] - ref['weights'][n]).abs()
        assert (err <= tol).all(), f'{what}: {n} differs by {err.max():.3g} (tolerance {tol.flatten()[err.argmax()]:.3g})'


def test_torchrun_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    """2 gloo ranks launched by torchrun, 2 AdamW steps of medjepa.train_step: the loss, the gradients
    the optimiser sees and the updated weights equal one process on the concatenated batch, with
    SIGReg weighted 0.5 ('sigreg') and with 2 accumulation micro-steps per rank, SIGReg included ('accum'). NaN targets on
    rank 1 ('nan') make every rank skip that update, as one process does: the decision is taken on the
    all-reduced gradient norm, not on the rank's own loss (finite on rank 0)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'tests', 'ddp_step.py'), str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for name, (overrides, _) in ddp_step.SCENARIOS.items():
        ref = ddp_step.run(overrides, world=1, accum=1, poison=name == 'nan')
        ranks = [torch.load(tmp_path / f'{name}.rank{r}.pt', weights_only=True) for r in range(2)]
        assert [r['skipped'] for r in ranks + [ref]] == [[name == 'nan', False]] * 3, name
        for r, got in enumerate(ranks):
            _assert_same_step(got, ref, f'{name}, rank {r}')
        for n in ref['weights']:  # DDP keeps the replicas bit-identical
            assert torch.equal(ranks[0]['weights'][n], ranks[1]['weights'][n]), n


@pytest.mark.parametrize('sigreg_on', ['pooled_std', 'pooled', 'tokens', 'pooled_std+tokens', 'inv'])
def test_accumulation_equals_one_big_batch_sigreg_included(sigreg_on):
    """4 micro-steps of 2 images == 1 step of 8 images (loss, gradients, weights) with SIGReg weighted
    0.5: train_step scores SIGReg on the whole accumulated batch (exact_sigreg_grads). 'inv': the
    default SIGReg plus the pooled invariance (inv_weight 1), also scored on the whole batch."""
    overrides = ['--sigreg_lambda=0.5', '--inv_weight=1.0' if sigreg_on == 'inv' else f'--sigreg_on={sigreg_on}']
    _assert_same_step(ddp_step.run(overrides, accum=4), ddp_step.run(overrides, accum=1), f'accum=4, {sigreg_on}')
    if sigreg_on == 'inv':  # (the naive check below is about SIGReg)
        return
    # the test can fail: SIGReg scored per micro-batch (the naive accumulation) is far from the big batch's
    cfg = mj.configure(ddp_step.TINY + overrides + ['--batch_size=2'])
    torch.manual_seed(cfg['seed'])
    model, full = mj.build_model(cfg), ddp_step.global_batch(cfg, 0)
    naive = sum(model({k: v[i:i + 2] for k, v in full.items()}, 0)[1]['sigreg'].item() for i in range(0, 8, 2)) / 4
    big = model(full, 0)[1]['sigreg'].item()
    assert abs(naive - big) > 0.05 * abs(big)


def test_ranks_get_disjoint_images_and_their_own_augmentations_and_masks():
    """The data stream does not depend on how it is split: 2 ranks x 1 micro-step read the images of
    1 rank x 2 micro-steps; each (rank, micro-step) draws its own crops and masks."""
    n, B = 40, 4
    two_ranks = [mj.batch_indices(3, 0, n, B, 2, r, 1, seed=0) for r in range(2)]
    two_micro = [mj.batch_indices(3, m, n, B, 1, 0, 2, seed=0) for m in range(2)]
    assert np.array_equal(np.concatenate(two_ranks), np.concatenate(two_micro))
    assert not set(two_ranks[0]) & set(two_ranks[1])
    imgs = np.random.default_rng(0).integers(0, 256, (B, 32, 32, 3), dtype=np.uint8)
    cfg = mj.configure(['--image_size=32', '--patch_size=8'])
    b0, b1 = (mj.make_batch(cfg, imgs, [0.5] * 3, [0.3] * 3, step=3, micro=0, device='cpu', rank=r) for r in range(2))
    assert not torch.allclose(b0['x'], b1['x']) and not torch.equal(b0['tgt_idx'], b1['tgt_idx'])


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp('tiny')
    rng = np.random.default_rng(0)
    for split, n in [('train', 64), ('val', 16)]:
        np.save(d / f'{split}_images.npy', rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
        np.save(d / f'{split}_labels.npy', rng.integers(0, 2, n).astype(np.int64))
    (d / 'meta.json').write_text(json.dumps(dict(name='tiny', task='multiclass', num_classes=2, classes=['a', 'b'],
                                                 mean=[0.5] * 3, std=[0.3] * 3)))
    return str(d)


@pytest.mark.parametrize('accum', [[], ['--gradient_accumulation_steps=2']])
def test_medjepa_py_trains_under_torchrun_and_rank_0_saves_one_checkpoint(tiny_data, tmp_path, accum):
    """The real entry point, 2 CPU ranks, the 'views' objective (BatchNorm, the riskier path), with no
    accumulation flag at all (the design card's `torchrun --nproc_per_node=N medjepa.py` must work for
    any N) and with 2 micro-steps per rank: it runs, logs every step and saves the checkpoint once."""
    out = tmp_path / 'out'
    args = ['--n_layer=1', '--n_embd=32', '--n_head=2', '--image_size=32', '--patch_size=8', '--local_size=16',
            '--n_local_views=1', '--batch_size=4', *accum, '--num_slices=16',
            '--objective=views', '--max_iters=3', '--warmup_iters=1', '--log_interval=1', '--eval_interval=100',
            '--knn_train_size=32', '--device=cpu', '--dtype=float32', f'--data_dir={tiny_data}', f'--out_dir={out}']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'medjepa.py'] + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f'world=2 batch=4x{2 if accum else 1}x2' in p.stdout and p.stdout.count('saved ') == 1
    recs = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['iter'] for r in recs if 'loss' in r] == [1, 2, 3]
    assert mj.load_checkpoint(str(out / 'ckpt.pt'))['iter_num'] == 3
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']  # rank 0 took the lock and released it


def test_under_torchrun_a_busy_out_dir_stops_every_rank_with_one_message(tiny_data, tmp_path):
    """Only rank 0 takes the out_dir's lock; when it cannot (a live run holds it: here this test's own
    process), every rank stops before any work with one line each, and nothing in the out_dir changes."""
    out = tmp_path / 'out'
    out.mkdir()
    lock = json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), started='2026-01-01 00:00:00'))
    (out / 'run.lock').write_text(lock)
    args = ['--n_layer=1', '--n_embd=32', '--n_head=2', '--image_size=32', '--patch_size=8', '--batch_size=4',
            '--num_slices=16', '--max_iters=3', '--device=cpu', '--dtype=float32', f'--data_dir={tiny_data}',
            f'--out_dir={out}']
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'medjepa.py'] + args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True,
                       text=True, timeout=180)
    ours = [line for line in p.stderr.splitlines() if line.startswith('medjepa.py: error:')]
    assert p.returncode != 0 and len(ours) == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert f'is in use by a live run (pid {os.getpid()} on {socket.gethostname()}' in ours[0] + ours[1]
    assert 'rank 1: stopped: rank 0 could not claim' in ours[0] + ours[1]
    assert 'medjepa_utils.py", line' not in p.stderr  # no traceback of ours, on any rank
    assert os.listdir(out) == ['run.lock'] and (out / 'run.lock').read_text() == lock
