"""medjepa3d.py: tubelets, 3-D positions and masks, the shared 2-D machinery, training on volumes and
video, demo3d and the 3-D rows of eval.py. Tiny models throughout. The NIfTI pipeline (orientation,
spacing, intensities, crop/pad) is tested in test_prepare_volumes.py."""
import inspect
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval as ev
import medjepa as mj
import medjepa3d as m3
import prepare

TINY = ['--volume_size=(16,16,16)', '--patch_size=(4,4,4)', '--n_layer=2', '--n_embd=24', '--n_head=2',
        '--pred_n_layer=1', '--pred_n_embd=12', '--pred_n_head=2', '--batch_size=16', '--num_slices=32',
        '--knn_train_size=64', '--device=cpu', '--dtype=float32', '--num_threads=1', '--warmup_iters=5']


def _cfg(**kw):
    return m3.validate(dict(m3.DEFAULTS, volume_size=(16, 16, 16), patch_size=(4, 4, 4), n_layer=2, n_embd=24,
                            n_head=2, pred_n_layer=1, pred_n_embd=12, pred_n_head=2, num_slices=16, **kw))


@pytest.fixture(scope='module')
def demo3d(tmp_path_factory):
    """A small demo3d: 16^3 voxels, 48 / 8 / 12 volumes."""
    return prepare.prepare_demo3d(tmp_path_factory.mktemp('d') / 'demo3d', size=16, n_train=48, n_val=8, n_test=12)

# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize('patch,shape', [((4, 4, 4), (16, 16, 16)), ((2, 8, 8), (8, 16, 32)), ((2, 16, 16), (4, 32, 32))])
def test_tubelet_embedding_gives_one_token_per_box_in_depth_major_order(patch, shape):
    enc = m3.ViT3D(2, patch, 24, 1, 2)
    x = torch.randn(3, 2, *shape)
    grid = tuple(s // p for s, p in zip(shape, patch))
    assert enc.grid(x) == grid and enc(x).shape == (3, int(np.prod(grid)), 24)
    assert isinstance(enc.patch_embed.proj, torch.nn.Conv3d) and enc.patch_embed.proj.kernel_size == patch
    # token t reads only its own box: changing one voxel changes one token's patch embedding
    x2 = x.clone()
    x2[0, 0, -1, -1, -1] += 10
    diff = (enc.patch_embed.proj(x2) - enc.patch_embed.proj(x)).abs().flatten(2).sum(1)[0]  # (N,)
    assert diff.nonzero().flatten().tolist() == [int(np.prod(grid)) - 1]


def test_3d_positions_split_the_width_over_depth_rows_and_columns_on_non_cubic_grids():
    p = m3.sincos_3d(2, 3, 5, 12)
    assert p.shape == (30, 12)
    d = torch.cdist(p, p) + torch.eye(30) * 10
    assert d.min() > 0.1  # every token has its own code
    g = p.view(2, 3, 5, 12)
    assert torch.equal(g[0, :, :, :4], g[0, :1, :1, :4].expand(3, 5, 4))  # first third: depth only
    assert torch.equal(g[:, 0, :, 4:8], g[:1, 0, :1, 4:8].expand(2, 5, 4))  # second third: row only
    assert torch.equal(g[:, :, 0, 8:], g[:1, :1, 0, 8:].expand(2, 3, 4))  # last third: column only


def test_3d_model_is_the_2d_code_with_3d_parts():
    """SIGReg, the objective, blocks and predictor are medjepa's objects, not copies."""
    assert m3.mj.sigreg is mj.sigreg and m3.mj.standardise is mj.standardise
    assert m3.JEPA3D.mask_loss is mj.JEPA.mask_loss and m3.JEPA3D.targets is mj.JEPA.targets
    assert m3.ViT3D.forward is mj.ViT.forward and m3.Predictor3D.forward is mj.Predictor.forward
    src = inspect.getsource(m3)
    for name in ('def sigreg(', 'def standardise', 'class Block', 'class Attention', 'def train(', 'def configure',
                 'def train_step', 'def make_optimizer', 'def save_checkpoint'):
        assert name not in src


@pytest.mark.parametrize('on', ['tokens', 'pooled_std', 'pooled_std+tokens'])
def test_3d_sigreg_runs_through_medjepa_sigreg(monkeypatch, on):
    calls = []
    real = mj.sigreg
    monkeypatch.setattr(mj, 'sigreg', lambda z, *a: calls.append(z.shape) or real(z, *a))
    cfg = _cfg(sigreg_on=on)
    torch.manual_seed(0)
    model = m3.build_model(cfg, 1)
    vols = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 16, 1), dtype=np.uint8)
    batch = m3.make_batch(cfg, vols, [0.5], [0.2], 0, 0, 'cpu')
    loss, stats = model(batch, 0)
    # once per mask set (short- and long-range): every context token, or one vector per volume; or twice:
    # the volume vectors, then SIGREG_TOKENS context tokens of each volume
    rows = {'tokens': [6 * ctx.shape[1] for ctx, _ in batch['masks']], 'pooled_std': [6, 6],
            'pooled_std+tokens': [n for ctx, _ in batch['masks'] for n in (6, 6 * min(8, ctx.shape[1]))]}[on]
    assert mj.SIGREG_TOKENS == 8
    assert calls == [(n, 24) for n in rows]
    assert torch.isfinite(loss) and mj.estimate_flops(model, batch) > 0 and 'flops' not in stats

def test_3d_accumulation_equals_one_big_batch_sigreg_included():
    """medjepa.train_step with 2 micro-steps of 4 volumes == 1 step of 8, with both mask sets' SIGReg
    weighted 0.5 (exact_sigreg_grads scores each set on the whole accumulated batch)."""
    from contextlib import nullcontext
    cfg = _cfg(sigreg_lambda=0.5, grad_clip=0.0)
    vols = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 16, 1), dtype=np.uint8)
    full = m3.make_batch(cfg, vols, [0.5], [0.2], 0, 0, 'cpu')
    rows = lambda b, i, n: dict(x=b['x'][i:i + n], x_tgt=b['x_tgt'][i:i + n],
                                masks=[(c[i:i + n], t[i:i + n]) for c, t in b['masks']])
    out = []
    for accum in (1, 2):
        torch.manual_seed(0)
        model = m3.build_model(cfg, 1)
        opt = mj.make_optimizer(model, cfg, 'cpu')
        grads = []
        opt.register_step_pre_hook(lambda o, a, k: grads.append([p.grad.clone() for p in model.parameters()]))
        n = 8 // accum
        loss, stats, _ = mj.train_step(model, opt, torch.amp.GradScaler(enabled=False), lambda m: rows(full, m * n, n),
                                       accum, 0, nullcontext(), 0.0)
        out.append((loss.item(), stats['sigreg'].item(), grads[0]))
    (l1, r1, g1), (l2, r2, g2) = out
    assert l2 == pytest.approx(l1, rel=1e-5) and r2 == pytest.approx(r1, rel=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- masks


def _sets(seed, B=8, grid=(4, 4, 4), video=False, **kw):
    gen = torch.Generator().manual_seed(seed)
    return [m3.sample_masks_3d(B, grid, gen, n, s, video=video, **kw) for n, s in ((8, (0.15, 0.15)), (2, (0.7, 0.7)))]


def test_3d_masks_hide_cuboids_and_the_context_is_the_exact_complement():
    for seed in range(10):
        for ctx, tgt in _sets(seed, grid=(6, 4, 5)):
            B, Nc = ctx.shape
            assert tgt.shape[:2] == (B, 1) and Nc >= 4
            for b in range(B):
                c, t = set(ctx[b].tolist()), set(tgt[b, 0].tolist())
                assert len(c) == Nc and not c & t and c | t == set(range(120))  # disjoint, together everything


def test_video_masks_span_every_frame():
    for ctx, tgt in _sets(0, grid=(4, 4, 4), video=True):
        hidden = torch.zeros(8, 64, dtype=torch.bool).scatter_(1, tgt[:, 0], True).view(8, 4, 16)
        assert (hidden == hidden[:, :1]).all()  # a hidden (row, column) is hidden in all 4 frames


def test_every_token_can_be_hidden_and_coverage_is_symmetric():
    counts = torch.zeros(4 * 4 * 4)
    for seed in range(150):
        for _, tgt in _sets(seed):
            counts += torch.bincount(tgt.flatten(), minlength=64).float()
    g = counts.view(4, 4, 4)
    assert (g > 0).all()  # the last slice, row and column are reachable
    for axis in range(3):  # first and last slice / row / column hidden equally often
        first, last = g.select(axis, 0).sum(), g.select(axis, -1).sum()
        assert first == pytest.approx(last, rel=0.1)


def test_volume_blocks_are_cuboids_thinner_than_the_volume():
    gen = torch.Generator().manual_seed(0)
    depths = []
    for _ in range(40):
        _, tgt = m3.sample_masks_3d(1, (8, 8, 8), gen, 1, (0.15, 0.15), depth_scale=(0.5, 0.75))
        z = tgt[0, 0] // 64
        depths.append(int(z.max() - z.min() + 1))
    assert 4 <= min(depths) and max(depths) <= 6  # depth scale < 1: never the whole depth


@pytest.mark.parametrize('grid', [(1, 2, 2), (2, 2, 3), (3, 2, 2)])
def test_tiny_grids_terminate_with_a_nonempty_context(grid):
    for ctx, tgt in _sets(0, B=4, grid=grid, min_keep=100):
        assert ctx.shape[1] >= 1 and tgt.shape[2] >= 1

# ----------------------------------------------------------------------------- data


def test_random_crop_full_scale_is_identity_or_mirror():
    x = torch.randn(4, 1, 8, 8, 8)
    y = m3.random_crop_3d(x, (8, 8, 8), (1.0, 1.0), torch.Generator().manual_seed(0))
    for b in range(4):
        assert torch.allclose(y[b], x[b], atol=1e-5) or torch.allclose(y[b], x[b].flip(-1), atol=1e-5)


def test_demo3d_is_deterministic_split_by_subject_and_labelled(demo3d, tmp_path):
    m = json.loads((demo3d / 'meta.json').read_text())
    assert m['spatial_dims'] == 3 and m['image_size'] == [16, 16, 16] and m['mask_labels'][0] == 'background'
    groups = {s: set(np.load(demo3d / f'{s}_groups.npy').tolist()) for s in prepare.SPLITS}
    assert not groups['train'] & groups['val'] and not groups['train'] & groups['test'] and not groups['val'] & groups['test']
    masks = np.load(demo3d / 'train_masks.npy')
    assert set(np.unique(masks)) == set(range(len(prepare.DEMO3D_LABELS)))  # every organ is there
    again = prepare.prepare_demo3d(tmp_path / 'again', size=16, n_train=48, n_val=8, n_test=12)
    for key in ('images', 'masks', 'labels', 'groups'):
        assert np.array_equal(np.load(demo3d / f'test_{key}.npy'), np.load(again / f'test_{key}.npy'))


def test_demo3d_label_is_the_spines_course(demo3d):
    """Straight spines keep their centre's x within a voxel from top to bottom; bent ones (C, S) move it
    by 1.5 voxels or more at 16^3: the class is where the column runs, not a lesion or an intensity."""
    masks, labels = np.load(demo3d / 'train_masks.npy'), np.load(demo3d / 'train_labels.npy')
    spine = prepare.DEMO3D_LABELS.index('spine')
    shift = np.array([np.ptp([np.nonzero(m[z] == spine)[1].mean() for z in range(m.shape[0])]) for m in masks])
    assert set(labels.tolist()) == {0, 1, 2} and prepare.DEMO3D_CLASSES[0] == 'straight spine'
    assert shift[labels == 0].max() < 1 and shift[labels > 0].min() >= 1.5


def test_a_demo_folder_from_an_older_generator_is_refused_not_trained_on(demo3d, tmp_path):
    old = tmp_path / 'demo3d'
    shutil.copytree(demo3d, old)
    meta = json.loads((old / 'meta.json').read_text())
    (old / 'meta.json').write_text(json.dumps({**meta, 'generator_version': prepare.DEMO3D_VERSION - 1}))
    with pytest.raises(mj.ConfigError, match=r'older prepare.py .*rm -r'):
        m3.main([*TINY, f'--data_dir={old}', f'--out_dir={tmp_path / "out"}', '--max_iters=1'])
    assert not (tmp_path / 'out' / 'ckpt.pt').exists()


# ----------------------------------------------------------------------------- training and checkpoints


def test_short_training_run_lowers_the_loss_and_checkpoints_say_3d(demo3d, tmp_path):
    out = str(tmp_path / 'out')
    m3.main(TINY + [f'--data_dir={demo3d}', f'--out_dir={out}', '--max_iters=30', '--log_interval=1',
                    '--eval_interval=1000', '--learning_rate=2e-3'])
    recs = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    losses = [r['loss'] for r in recs if 'loss' in r]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.95 * np.mean(losses[:5])
    assert any('knn_val' in r for r in recs)  # demo3d is labelled: the online kNN monitor ran
    ckpt = mj.load_checkpoint(os.path.join(out, 'ckpt.pt'), spatial_dims=3)
    assert ckpt['spatial_dims'] == 3 and ckpt['iter_num'] == 30
    fresh = m3.build_model(ckpt['config'], 1)
    fresh.load_state_dict(ckpt['model'])  # strict


def test_2d_and_3d_checkpoints_and_data_are_not_mixed_up(demo3d, tmp_path):
    out3 = str(tmp_path / 'o3')
    m3.main(TINY + [f'--data_dir={demo3d}', f'--out_dir={out3}', '--max_iters=1'])
    with pytest.raises(mj.ConfigError, match='3-D model.*medjepa3d.py'):  # 2-D trainer resuming a 3-D run
        mj.main([f'--out_dir={out3}', '--init_from=resume', '--device=cpu', f'--data_dir={_tiny_2d(tmp_path)}',
                 '--image_size=16', '--patch_size=8', '--n_layer=1', '--n_embd=16', '--n_head=2', '--pred_n_embd=8',
                 '--pred_n_head=2', '--batch_size=4', '--local_size=8'])
    with pytest.raises(mj.ConfigError, match='is a 3-D model'):
        mj.load_checkpoint(os.path.join(out3, 'ckpt.pt'), spatial_dims=2)
    old = str(tmp_path / 'old2d.pt')  # a 2-D checkpoint (older ones carry no spatial_dims) given to the 3-D code
    torch.save(dict(model={}, config={}, iter_num=0), old)
    with pytest.raises(mj.ConfigError, match='is a 2-D model.*use medjepa.py'):
        mj.load_checkpoint(old, spatial_dims=3)
    with pytest.raises(mj.ConfigError, match='volumes.*medjepa3d.py'):  # 2-D trainer on volumes
        mj.main([f'--data_dir={demo3d}', f'--out_dir={tmp_path}/x', '--device=cpu', '--max_iters=1'])
    with pytest.raises(mj.ConfigError, match='2-D images.*medjepa.py'):  # 3-D trainer on 2-D images
        m3.main(TINY + [f'--data_dir={_tiny_2d(tmp_path)}', f'--out_dir={tmp_path}/y', '--max_iters=1'])
    two_d = tmp_path / 'o2'  # an out_dir holding a 2-D run: a 3-D run from scratch never writes over it
    os.makedirs(two_d)
    mj.save_checkpoint(str(two_d / 'ckpt.pt'), dict(model={}, iter_num=1))
    for out in (two_d, out3):
        with pytest.raises(mj.ConfigError, match=r'already holds a run.*--init_from=resume.*--overwrite=True'):
            m3.main(TINY + [f'--data_dir={demo3d}', f'--out_dir={out}', '--max_iters=1'])
    with pytest.raises(SystemExit, match='3-D model'):  # eval: a 3-D checkpoint on 2-D data
        ev.main([f'--ckpt={out3}/ckpt.pt', f'--data_dir={_tiny_2d(tmp_path)}', '--figures=false'])


def _tiny_2d(tmp_path):
    d = tmp_path / 'tiny2d'
    if not d.exists():
        d.mkdir()
        rng = np.random.default_rng(0)
        for split in prepare.SPLITS:
            np.save(d / f'{split}_images.npy', rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
            np.save(d / f'{split}_labels.npy', np.arange(8) % 2)
        (d / 'meta.json').write_text(json.dumps(dict(name='t', task='multiclass', num_classes=2, classes=['a', 'b'],
                                                     mean=[0.5] * 3, std=[0.3] * 3)))
    return str(d)


def test_eval_on_volumes_segments_every_organ_against_random_init(demo3d, tmp_path):
    out = str(tmp_path / 'o')
    m3.main(TINY + [f'--data_dir={demo3d}', f'--out_dir={out}', '--max_iters=2'])
    report = ev.main([f'--ckpt={out}/ckpt.pt', '--tasks=knn,linear,seg', '--knn_ks=5',
                      '--figures=true', '--seg_finetune_iters=2', '--finetune_eval_every=1'])
    res = report['results']
    assert set(res) == {'pretrained', 'random-init', 'supervised', 'raw pixels'}
    for row in res.values():
        assert len(row['seg']['dice']) == len(prepare.DEMO3D_LABELS) - 1 and 0 <= row['seg']['mean_dice'] <= 1
        assert 0 <= row['knn']['k=5']['acc'] <= 1 and 0 <= row['linear']['acc'] <= 1
    assert 'figures/segmentation.png' in report['figures']
    md = open(os.path.join(out, 'eval.md')).read()
    assert 'Dice liver' in md and 'mean Dice' in md and '| random-init, fine-tuned |' in md
    assert report['settings']['seg_lr'] == 0.1 and '(AdamW, lr 0.1)' in md  # volumes' default head: rate,
    assert report['settings']['seg_epochs'] == 48 and 'epoch (of 48)' in md  # and epochs to near its plateau
    assert all(len(row['seg']['val_mean_dice']) == 48 for row in res.values())
    ft = res['pretrained']['seg']['finetuned']  # volumes fine-tune end to end too
    assert len(ft['dice']) == len(prepare.DEMO3D_LABELS) - 1 and set(ft['val_mean_dice']) == {0, 1, 2}



def test_video_data_trains_as_video_from_meta_json_and_evaluates(tmp_path, monkeypatch):
    """prepare.py demovideo says "video": true; medjepa3d.py then masks and crops as video by itself."""
    data = prepare.prepare_demovideo(tmp_path / 'demovideo', frames=16, size=16, n_train=32, n_val=8, n_test=8)
    assert m3.validate(dict(_cfg(), data_dir=str(data)))['video'] is True
    assert m3.validate(_cfg(data_dir=str(tmp_path / 'none')))['video'] is False  # no meta.json: the default
    seen = []
    for name in ('sample_masks_3d', 'random_crop_3d'):  # record the video argument of every call
        real = getattr(m3, name)
        def spy(*a, real=real, **kw):
            seen.append(inspect.signature(real).bind(*a, **kw).arguments.get('video'))
            return real(*a, **kw)
        monkeypatch.setattr(m3, name, spy)
    out = str(tmp_path / 'out')
    m3.main(TINY + [f'--data_dir={data}', f'--out_dir={out}', '--max_iters=4', '--log_interval=1',
                    '--eval_interval=1000'])
    assert len(seen) >= 12 and all(seen)  # 4 steps x (1 crop + 2 mask sets), all as video: full time extent
    losses = [json.loads(line)['loss'] for line in open(os.path.join(out, 'log.jsonl')) if '"loss"' in line]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert mj.load_checkpoint(os.path.join(out, 'ckpt.pt'), spatial_dims=3)['config']['video'] is True
    report = ev.main([f'--ckpt={out}/ckpt.pt', '--tasks=knn,linear,seg', '--seg_epochs=2', '--knn_ks=5',
                      '--figures=false'])
    for row in report['results'].values():
        assert 0 <= row['knn']['k=5']['acc'] <= 1 and 0 <= row['linear']['acc'] <= 1
        assert len(row['seg']['dice']) == len(prepare.DEMOVIDEO_LABELS) - 1


def test_brats_regions_are_unions_of_labels():
    target = np.zeros((1, 4, 4, 4), np.uint8)
    target[0, 0], target[0, 1], target[0, 2] = 1, 2, 3  # necrotic, edema, enhancing slices
    pred = target.copy()
    pred[0, 1] = 3  # edema called enhancing: WT still right, ET and TC wrong
    d = ev.region_dice(pred, target, ev.BRATS_REGIONS)
    assert d['WT'] == 1.0 and d['ET'] == pytest.approx(2 * 16 / (32 + 16)) and d['TC'] == pytest.approx(2 * 32 / (48 + 32))


def test_intensity_jitter_changes_context_and_targets_independently_and_nothing_else():
    vols = np.random.default_rng(0).integers(0, 256, (4, 16, 32, 32, 1), dtype=np.uint8)
    plain = m3.make_batch(_cfg(), vols, [0.5], [0.2], 3, 0, 'cpu')
    assert torch.equal(plain['x'], plain['x_tgt'])  # off by default: the same crop for both
    jit = m3.make_batch(_cfg(intensity_jitter=0.5), vols, [0.5], [0.2], 3, 0, 'cpu')
    assert not torch.allclose(jit['x'], jit['x_tgt'])
    for (c0, t0), (c1, t1) in zip(plain['masks'], jit['masks']):  # same geometry and masks either way
        assert torch.equal(c0, c1) and torch.equal(t0, t1)
    # per volume an affine map of the intensities: brightness and contrast only, the crop is unchanged
    a, b = plain['x'][0].flatten(), jit['x'][0].flatten()
    slope = ((a - a.mean()) * (b - b.mean())).sum() / ((a - a.mean()) ** 2).sum()
    assert torch.allclose(b, slope * (a - a.mean()) + b.mean(), atol=1e-4)


def test_medjepa3d_trains_under_torchrun_and_resumes(demo3d, tmp_path):
    """The same DDP and resume behaviour as medjepa.py: 2 CPU ranks with 2 accumulation micro-steps
    each, one checkpoint saved by rank 0, then a one-process resume continues from its step."""
    out = tmp_path / 'out'
    args = TINY + [f'--data_dir={demo3d}', f'--out_dir={out}', '--batch_size=4', '--gradient_accumulation_steps=2',
                   '--max_iters=3', '--log_interval=1', '--eval_interval=100']
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'medjepa3d.py'] + args, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert 'world=2 batch=4x2x2' in p.stdout and p.stdout.count('saved ') == 1
    assert mj.load_checkpoint(str(out / 'ckpt.pt'), spatial_dims=3)['iter_num'] == 3
    m3.main(args[:-3] + ['--max_iters=5', '--log_interval=1', '--eval_interval=100', '--init_from=resume'])
    recs = [json.loads(line) for line in open(out / 'log.jsonl') if 'loss' in line]
    assert [r['iter'] for r in recs] == [1, 2, 3, 4, 5]
    assert mj.load_checkpoint(str(out / 'ckpt.pt'), spatial_dims=3)['iter_num'] == 5
