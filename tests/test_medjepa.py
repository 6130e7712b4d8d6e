"""Specifications of medjepa.py's pieces: configuration, SIGReg, masks, model. Fast (CPU, seconds)."""
import glob
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import medjepa as mj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- configuration


def test_overrides_parse_types_and_widen_int_to_float():
    cfg = mj.configure(['--learning_rate=1', '--compile=true', '--crop_scale=(0.5,1)', '--device=cpu',
                        '--out_dir=a=b'])
    assert cfg['learning_rate'] == 1.0 and isinstance(cfg['learning_rate'], float)
    assert cfg['compile'] is True
    assert cfg['crop_scale'] == (0.5, 1.0)
    assert cfg['device'] == 'cpu'
    assert cfg['out_dir'] == 'a=b'  # split on the first '=' only


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(mj.ConfigError, match="unknown config key 'learning_rat'.*'learning_rate'"):
        mj.configure(['--learning_rat=0.1'])


def test_wrong_type_is_rejected_with_the_key():
    with pytest.raises(mj.ConfigError, match="'batch_size' expects a int"):
        mj.configure(['--batch_size=1.5'])
    with pytest.raises(mj.ConfigError, match="'compile' expects a bool"):
        mj.configure(['--compile=yes'])


def test_config_file_overrides_and_rejects_unknown_keys(tmp_path):
    good = tmp_path / 'good.py'
    good.write_text("n_layer = 2\nimport math\nlearning_rate = 3e-4\n")
    cfg = mj.configure([str(good), '--n_layer=3'])
    assert cfg['n_layer'] == 3 and cfg['learning_rate'] == 3e-4  # the command line wins
    bad = tmp_path / 'bad.py'
    bad.write_text("n_layers = 2\n")
    with pytest.raises(mj.ConfigError, match="unknown config key 'n_layers' in config file.*'n_layer'"):
        mj.configure([str(bad)])


def test_validate_rejects_values_that_cannot_work():
    for argv, msg in [(['--patch_size=7'], 'not a multiple of patch_size'),
                      (['--target_scale=(0.2,1.5)'], 'target_scale'),
                      (['--objective=pixels'], "objective must be 'mask' or 'views'"),
                      (['--image_size=8', '--patch_size=8'], 'at least 2x2')]:
        with pytest.raises(mj.ConfigError, match=msg):
            mj.validate(mj.configure(argv))


def test_command_line_error_exits_2_with_a_message():
    r = subprocess.run([sys.executable, 'medjepa.py', '--bach_size=3'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "unknown config key 'bach_size'" in r.stderr and "batch_size" in r.stderr
    assert 'Traceback' not in r.stderr

# ----------------------------------------------------------------------------- SIGReg


def test_sigreg_matches_a_hand_computed_value():
    # one sample, one dimension: the only unit direction is +-1, so x = +-z and by hand
    # EP = sum_j w_j [(cos(t_j z) - exp(-t_j^2/2))^2 + sin(t_j z)^2]
    z = 0.7
    t = np.linspace(0, 3, 17)
    w = np.full(17, 2 * 3 / 16)
    w[0] = w[-1] = 3 / 16
    w *= np.exp(-t ** 2 / 2)
    expected = np.sum(w * ((np.cos(t * z) - np.exp(-t ** 2 / 2)) ** 2 + np.sin(t * z) ** 2))
    got = mj.sigreg(torch.tensor([[z]], dtype=torch.float64), step=0, num_slices=8)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_sigreg_small_on_gaussian_large_on_collapsed():
    g = torch.Generator().manual_seed(0)
    N, K = 2048, 64
    gauss = mj.sigreg(torch.randn(N, K, generator=g), step=1)
    # integral of (1 - e^{-t^2}) e^{-t^2/2} over [-3, 3] ~ sqrt(2 pi) - sqrt(2 pi / 3) = 1.06
    assert 0.8 < gauss.item() < 1.4
    collapsed = mj.sigreg(torch.zeros(N, K), step=1)
    t = torch.linspace(0, 3, 17)
    assert collapsed.item() == pytest.approx(N * float(mj._EP_W.float() @ (1 - torch.exp(-t ** 2 / 2)) ** 2), rel=1e-5)
    assert collapsed.item() > 300 * gauss.item()
    wide = mj.sigreg(3 * torch.randn(N, K, generator=g), step=1)  # right shape, wrong scale
    shifted = mj.sigreg(torch.randn(N, K, generator=g) + 1, step=1)  # wrong mean
    assert wide.item() > 50 * gauss.item() and shifted.item() > 50 * gauss.item()


def test_sigreg_gradient_is_exact_and_pushes_away_from_collapse():
    z = (0.1 * torch.randn(16, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mj.sigreg(x, step=3, num_slices=16), (z,))
    # gradient descent on the embeddings themselves should spread a nearly collapsed batch out
    z = (0.01 * torch.randn(256, 8)).requires_grad_()
    start = mj.sigreg(z, step=0).item()
    opt = torch.optim.Adam([z], lr=0.02)
    for step in range(300):
        opt.zero_grad()
        mj.sigreg(z, step=step).backward()
        opt.step()
    assert mj.sigreg(z.detach(), step=999).item() < start / 20
    assert 0.5 < z.detach().std().item() < 2.0


def test_standardised_sigreg_ignores_scale_and_shift_but_sees_correlation():
    """'pooled_std': SIGReg after batch standardisation judges only the shape of the distribution.
    A rescaled, shifted Gaussian passes; a batch spread along one direction (rank 1) fails."""
    g = torch.Generator().manual_seed(0)
    N, K = 512, 32
    z = torch.randn(N, K, generator=g)
    s = mj.standardise(z)
    torch.testing.assert_close(s.mean(0), torch.zeros(K), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.var(0, unbiased=False), torch.ones(K), atol=1e-4, rtol=0)
    scale, shift = torch.rand(K, generator=g) * 0.1 + 0.01, torch.randn(K, generator=g) * 5
    base = mj.sigreg(mj.standardise(z), step=2).item()
    assert mj.sigreg(mj.standardise(z * scale + shift), step=2).item() == pytest.approx(base, rel=1e-3)
    assert mj.sigreg(z * scale + shift, step=2).item() > 20 * base  # raw SIGReg punishes scale and shift
    rank1 = torch.randn(N, 1, generator=g) * torch.randn(1, K, generator=g) + 0.01 * torch.randn(N, K, generator=g)
    assert mj.sigreg(mj.standardise(rank1), step=2).item() > 10 * base  # correlated dimensions are not isotropic


def test_sigreg_is_computed_in_float32_under_bf16_autocast():
    z = torch.randn(512, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = mj.sigreg(z.bfloat16(), step=2)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(mj.sigreg(z.bfloat16().float(), step=2).item(), rel=1e-5)


@pytest.mark.parametrize('bf16_rate, want, times_2048', [
    ({256: 1.0, 2048: 0.1}, 'float32', False),    # no bf16 units: emulated, 20-200x slower than float32
    ({256: 30.0, 2048: 40.0}, 'bfloat16', True),  # AVX512-BF16 / AMX: clearly faster at the size that counts
    ({256: 15.0, 2048: 25.0}, 'float32', True),   # native, but not 1.5x faster at 2048^2
])
def test_auto_dtype_on_cpu_times_large_bf16_matmuls_only_where_bf16_is_not_emulated(monkeypatch, bf16_rate, want,
                                                                                      times_2048):
    """An emulated bf16 2048^2 GEMM takes minutes on a CPU without bf16 units (every run paid them at
    start-up); resolve_dtype must rule such a CPU out with a small probe before the large one."""
    import medjepa_utils
    calls = []

    def fake(device, dtype, n=2048, seconds=0.5):  # GFLOP/s: float32 20 at every size
        calls.append((dtype, n))
        return 20.0 if dtype == torch.float32 else bf16_rate[n]
    monkeypatch.setattr(medjepa_utils, 'measure_matmul_flops', fake)
    assert mj.resolve_dtype('auto', 'cpu') == want
    assert ((torch.bfloat16, 2048) in calls) == times_2048
    calls.clear()
    assert mj.resolve_dtype('float32', 'cpu') == 'float32' and not calls  # an explicit dtype is not timed


def test_auto_dtype_on_cpu_keeps_each_dtypes_best_round_on_one_thread(monkeypatch):
    """A second process on the cores stalls some products (a run beside another one chose float32 on a
    bf16 CPU by chance): each dtype keeps its best of 3 rounds, timed on one thread; the caller's thread
    count is restored."""
    import medjepa_utils
    calls = []

    def fake(device, dtype, n=2048, seconds=0.5):  # bf16 4x float32 per core, its first two rounds stalled
        calls.append((dtype, n, torch.get_num_threads()))
        seen = sum(1 for d, m, _ in calls if d == dtype and m == n)
        return (1.0 if seen <= 2 else 80.0) if dtype == torch.bfloat16 else 20.0
    monkeypatch.setattr(medjepa_utils, 'measure_matmul_flops', fake)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert mj.resolve_dtype('auto', 'cpu') == 'bfloat16'
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert {t for _, _, t in calls} == {1}
    assert [n for d, n, _ in calls if d == torch.bfloat16] == [256] * 3 + [2048] * 3


@pytest.mark.parametrize('bf16_rate, warned', [(1.1e9, True), (30e9, False)])
def test_explicit_bf16_on_a_cpu_that_emulates_it_is_kept_with_a_warning(monkeypatch, capsys, bf16_rate, warned):
    import medjepa_utils
    monkeypatch.setattr(medjepa_utils, 'measure_matmul_flops',
                        lambda device, dtype, n=2048, seconds=0.5: 20e9 if dtype == torch.float32 else bf16_rate)
    assert mj.resolve_dtype('bfloat16', 'cpu') == 'bfloat16'
    out = capsys.readouterr().out
    assert ('no bf16 units' in out and '--dtype=float32' in out and '18x slower' in out) == warned


@pytest.mark.parametrize('rate, n', [(1.1e9, 1024), (0.05e9, 256), (0.14e9, 512), (20e9, 2048), (400e12, 2048)])
def test_matmul_throughput_shrinks_the_product_where_one_would_take_seconds(monkeypatch, rate, n):
    """measure_matmul_flops (the MFU denominator) times 2048^2 products, which an emulated bf16 takes
    minutes for: a 256^2 probe picks a smaller size there, never on a fast device."""
    import medjepa_utils
    sizes = []

    def fake(device, dtype, size, seconds):
        sizes.append(size)
        return rate
    monkeypatch.setattr(medjepa_utils, 'gemm_rate', fake)
    assert mj.measure_matmul_flops('cpu', torch.bfloat16) == rate
    assert sizes == [256, n]  # the probe, then the product that is timed


def test_timing_matmuls_leaves_the_global_random_stream_alone():
    """The training loop times matmuls again after each evaluation: that must not move torch's global
    random stream, or a run's draws would depend on when it was timed."""
    import medjepa_utils
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    medjepa_utils.gemm_rate('cpu', torch.float32, 64, 0.01)
    assert torch.equal(torch.rand(4), want)


def test_sigreg_directions_depend_on_step_not_on_call():
    z = torch.randn(64, 16)
    assert mj.sigreg(z, step=5).item() == mj.sigreg(z, step=5).item()
    assert mj.sigreg(z, step=5).item() != mj.sigreg(z, step=6).item()

# ----------------------------------------------------------------------------- masks


def _draw(B=64, grid=(8, 8), seed=0, **kw):
    return mj.sample_masks(B, grid, torch.Generator().manual_seed(seed), **kw)


def test_masks_are_disjoint_rectangles_with_enough_context():
    for seed in range(20):
        ctx, tgt = _draw(seed=seed)
        B, M, K = tgt.shape
        assert M == 4 and ctx.shape[0] == B and ctx.shape[1] >= 10
        for b in range(B):
            c = set(ctx[b].tolist())
            assert len(c) == ctx.shape[1]  # no duplicates
            for m in range(M):
                t = tgt[b, m].tolist()
                assert not c & set(t)  # no target patch is visible in the context
                rows, cols = {i // 8 for i in t}, {i % 8 for i in t}
                assert len(rows) * len(cols) == K == len(set(t))  # a full rectangle


@pytest.mark.parametrize('grid', [(8, 8), (14, 14)])
def test_context_length_is_fixed_by_the_grid_not_the_batch(grid):
    """Every image keeps L = round(context_keep * N) visible patches, whatever the batch size: the task
    does not change with batch_size or the number of ranks, and shapes are static for torch.compile.
    (Cutting to the batch's shortest context, as upstream does, gives ~20 of 64 at B=64, ~28 at B=1.)"""
    N = grid[0] * grid[1]
    for B in (1, 16, 256):
        for seed in range(3):
            ctx, tgt = _draw(B=B, grid=grid, seed=seed)
            assert ctx.shape == (B, round(0.33 * N))
            hidden = torch.zeros(B, N, dtype=torch.bool).scatter_(1, tgt.flatten(1), True)
            assert not hidden.gather(1, ctx).any()  # all of them visible
    ctx, _ = _draw(B=64, grid=grid, context_keep=0.2, min_keep=30)
    assert ctx.shape[1] == max(round(0.2 * N), 30)  # min_keep is the floor


def test_every_patch_can_be_a_target_and_coverage_is_unbiased():
    counts = torch.zeros(8 * 8)
    ctx_rows = []
    for seed in range(100):
        ctx, tgt = _draw(seed=seed)
        counts += torch.bincount(tgt.flatten(), minlength=64).float()
        ctx_rows.append((ctx // 8).float().mean().item())
    grid = counts.view(8, 8)
    assert (grid > 0).all()  # the last row and column are reachable (upstream's randint bug)
    # block placement is symmetric: the last row/column are as likely as the first
    assert grid[-1].sum() == pytest.approx(grid[0].sum(), rel=0.15)
    assert grid[:, -1].sum() == pytest.approx(grid[:, 0].sum(), rel=0.15)
    # cutting contexts to equal length keeps a random subset, not the top of the image
    assert np.mean(ctx_rows) == pytest.approx(3.5, abs=0.15)


@pytest.mark.parametrize('grid', [(2, 2), (1, 5), (3, 1), (2, 3), (4, 4), (14, 14), (5, 9)])
def test_tiny_and_odd_grids_terminate_with_valid_masks(grid):
    ctx, tgt = _draw(B=32, grid=grid, min_keep=10)
    n = grid[0] * grid[1]
    assert ctx.shape[1] >= 1 and tgt.max() < n and ctx.max() < n
    for b in range(32):
        assert not set(ctx[b].tolist()) & set(tgt[b].flatten().tolist())

# ----------------------------------------------------------------------------- model


def _tiny_cfg(**kw):
    cfg = dict(mj.DEFAULTS, n_layer=2, n_embd=32, n_head=2, pred_n_layer=1, pred_n_embd=16, pred_n_head=2,
               image_size=32, patch_size=8, num_slices=16)
    cfg.update(kw)
    return mj.validate(cfg)


def test_sincos_positions_are_distinct_and_fixed():
    p = mj.sincos_2d(4, 6, 32)
    assert p.shape == (24, 32)
    d = torch.cdist(p, p) + torch.eye(24) * 10
    assert d.min() > 0.1  # every position has its own code


def test_context_encoder_never_sees_target_patches():
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    model = mj.build_model(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    ctx, tgt = _draw(B=2, grid=(4, 4), min_keep=4)
    with torch.no_grad():
        out = model.encoder(x, ctx)
        y = x.clone()
        for b in range(2):  # scramble every pixel of every target patch
            for i in tgt[b].flatten().unique().tolist():
                r, c = divmod(i, 4)
                y[b, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = torch.randn(3, 8, 8) * 5
        assert torch.equal(model.encoder(y, ctx), out)
        z = x.clone()  # ... while changing one context patch does change it
        r, c = divmod(ctx[0, 0].item(), 4)
        z[0, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 3
        assert not torch.allclose(model.encoder(z, ctx)[0], out[0])


def test_predictor_blocks_do_not_see_each_other():
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    pred = mj.build_model(cfg).predictor.eval()
    ctx, tgt = _draw(B=1, grid=(4, 4), min_keep=4)
    z = torch.randn(1, ctx.shape[1], 32)
    with torch.no_grad():
        both = pred(z, ctx, tgt, (4, 4))
        K = tgt.shape[2]
        alone = [pred(z, ctx, tgt[:, m:m + 1], (4, 4)) for m in range(tgt.shape[1])]
    torch.testing.assert_close(both, torch.cat(alone, 1), rtol=1e-5, atol=1e-5)
    assert both.shape == (1, tgt.shape[1] * K, 32)


@pytest.mark.skipif(not any(map(__import__('shutil').which, ('g++', 'c++', 'clang++'))),
                    reason='torch.compile on a CPU needs a C++ compiler')
def test_torch_compile_really_compiles_and_trains_like_eager():
    """compile=True: the encoder and predictor become graphs without a graph break (one per shape: the
    context length is fixed, the target block size takes few values), the state_dict keys stay those of
    the eager model, and three AdamW steps give eager's losses and weights (float32)."""
    from contextlib import nullcontext
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    cfg = _tiny_cfg(dtype='float32', grad_clip=0.0)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = mj.build_model(cfg)
        if compiled:
            mj.compile_model(model)
        opt = mj.make_optimizer(model, cfg, 'cpu')
        losses, ks = [], set()
        for step in range(3):
            batch = mj.make_batch(cfg, images, [0.5] * 3, [0.25] * 3, step, 0, 'cpu')
            ks.add(batch['tgt_idx'].shape[2])
            loss, _, _ = mj.train_step(model, opt, torch.amp.GradScaler(enabled=False), lambda m: batch, 1, step,
                                       nullcontext(), 0.0)
            losses.append(loss.item())
        runs.append((losses, model.state_dict()))
    (eager_losses, eager_w), (comp_losses, comp_w) = runs
    assert sum(counters['graph_break'].values()) == 0, dict(counters['graph_break'])
    assert counters['stats']['unique_graphs'] >= 3  # encoder on the context, on the full image; predictor
    assert list(comp_w) == list(eager_w)  # checkpoints of a compiled run load into an eager model
    assert comp_losses == pytest.approx(eager_losses, rel=1e-4)
    for n in eager_w:
        torch.testing.assert_close(comp_w[n], eager_w[n], rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_vit_parameter_names_follow_the_imagenet_layout():
    names = set(mj.build_model(_tiny_cfg()).encoder.state_dict())
    for n in ['patch_embed.proj.weight', 'blocks.0.norm1.weight', 'blocks.0.attn.qkv.weight',
              'blocks.0.attn.proj.bias', 'blocks.1.mlp.fc1.weight', 'blocks.1.mlp.fc2.bias', 'norm.weight']:
        assert n in names


def test_random_resized_crop_full_scale_is_identity_or_mirror():
    x = torch.randn(4, 3, 16, 16)
    y = mj.random_resized_crop(x, 16, (1.0, 1.0), torch.Generator().manual_seed(0), ratio=(1, 1))
    for b in range(4):
        assert torch.allclose(y[b], x[b], atol=1e-5) or torch.allclose(y[b], x[b].flip(-1), atol=1e-5)


def test_random_resized_crop_rot90_gives_every_exact_quarter_turn():
    """rot90=True: each full-scale crop is exactly one of the 8 symmetries of the square (4 rotations,
    optionally mirrored), and all 4 rotations occur; without it, only identity or mirror."""
    x = torch.randn(64, 1, 8, 8)
    y = mj.random_resized_crop(x, 8, (1.0, 1.0), torch.Generator().manual_seed(0), ratio=(1, 1), rot90=True)
    seen = set()
    for b in range(64):
        hits = [k for k in range(4) for m in (x[b, 0], x[b, 0].flip(-1))
                if torch.allclose(y[b, 0], torch.rot90(m, k), atol=1e-5)]
        assert len(hits) == 1, f"image {b} is not a quarter turn of the input"
        seen.add(hits[0])
    assert seen == {0, 1, 2, 3}


def test_color_jitter_off_is_identity_and_gray_prob_one_is_gray():
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(mj.color_jitter(x, torch.Generator().manual_seed(0), 0.0), x)
    g = mj.color_jitter(x, torch.Generator().manual_seed(0), 0.5, gray_prob=1.0)
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])


def test_color_jitter_brightness_shift_spans_the_range_it_is_given():
    # a view at the data mean (0 everywhere) is left alone by contrast and saturation factors, so what
    # comes out is the brightness shift alone: one value per image, uniform on [-b, b]
    x = torch.zeros(4000, 3, 2, 2)
    for b, expect in ((None, 0.4), (1.2, 1.2)):  # None: strength / 2
        y = mj.color_jitter(x, torch.Generator().manual_seed(0), 0.8, brightness=b)
        shift = y[:, 0, 0, 0]
        assert torch.equal(y, shift[:, None, None, None].expand_as(y))
        assert shift.abs().max() <= expect + 1e-6 and shift.abs().max() > 0.98 * expect
        assert abs(shift.abs().mean().item() - expect / 2) < 0.03 * expect  # uniform: E|shift| = b / 2
    cfg = _tiny_cfg(objective='views', n_local_views=0, color_jitter=0.8, brightness=1.2)
    imgs = np.full((64, 16, 16, 3), 128, np.uint8)  # every pixel at the mean below
    g = mj.make_batch(cfg, imgs, [128 / 255] * 3, [0.3] * 3, step=0, micro=0, device='cpu')['globals']
    assert g.abs().max() > 0.8  # the config's brightness reaches the views (+-0.4 without it)


def test_mask_batch_targets_see_the_same_crop_and_differ_only_by_jitter():
    imgs = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    plain = mj.make_batch(_tiny_cfg(), imgs, [0.5] * 3, [0.3] * 3, step=3, micro=0, device='cpu')
    assert torch.equal(plain['x'], plain['x_tgt'])  # I-JEPA: no photometric change by default
    jit = mj.make_batch(_tiny_cfg(color_jitter=0.5), imgs, [0.5] * 3, [0.3] * 3, step=3, micro=0, device='cpu')
    assert not torch.allclose(jit['x'], jit['x_tgt'])
    assert torch.equal(plain['ctx_idx'], jit['ctx_idx'])  # same geometry and masks either way


def test_views_batch_drops_tokens_per_global_view_without_changing_the_crops():
    imgs = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    kw = dict(objective='views', n_local_views=0)
    full = mj.make_batch(_tiny_cfg(**kw), imgs, [0.5] * 3, [0.3] * 3, step=3, micro=0, device='cpu')
    assert 'keep' not in full  # view_keep = 1: every patch, no index tensor
    half = mj.make_batch(_tiny_cfg(view_keep=0.5, **kw), imgs, [0.5] * 3, [0.3] * 3, step=3, micro=0, device='cpu')
    assert torch.equal(full['globals'], half['globals'])  # the subset is drawn after the crops
    keep = half['keep']
    assert keep.shape == (2 * 4, 8)  # 2 global views x 4 images, round(0.5 * 16) patches each
    assert all(len(set(row.tolist())) == 8 and 0 <= row.min() and row.max() < 16 for row in keep)
    assert len({tuple(sorted(row.tolist())) for row in keep}) > 1  # each view draws its own subset


def test_other_photos_draws_other_members_of_the_group_uniformly():
    groups = np.array([5, 3, 5, 7, 3, 5, 9, 5])  # group 5: images 0, 2, 5, 7; 3: 1, 4; 7 and 9 alone
    by_group, rng = np.argsort(groups, kind='stable'), np.random.default_rng(0)
    idx = np.arange(len(groups))
    draws = np.stack([mj.other_photos(groups, by_group, idx, rng)[0] for _ in range(3000)])  # (3000, 8)
    assert (groups[draws] == groups[idx]).all()  # always the same group
    assert (draws[:, [3, 6]] == [3, 6]).all()  # alone in its group: itself (crops of one photo)
    assert (draws[:, [0, 1, 2, 4, 5, 7]] != [0, 1, 2, 4, 5, 7]).all()  # else never itself
    assert (draws[:, 1] == 4).all() and (draws[:, 4] == 1).all()
    for i in (0, 2, 5, 7):  # each of the other three members of group 5 about a third of the time
        others = [j for j in (0, 2, 5, 7) if j != i]
        freq = [(draws[:, i] == j).mean() for j in others]
        assert max(abs(f - 1 / 3) for f in freq) < 0.04, (i, freq)
    three = np.stack([mj.other_photos(groups, by_group, idx, rng, k=3) for _ in range(600)])  # (600, 3, 8)
    for i in (0, 2, 5, 7):  # group 5 has three others: all of them, each order about as often
        assert all(sorted(t) == [j for j in (0, 2, 5, 7) if j != i] for t in three[:, :, i])
        orders = np.unique(three[:, :, i], axis=0, return_counts=True)[1]
        assert len(orders) == 6 and orders.min() > 600 / 6 * 0.6, orders
    assert (three[:, :, 1] == 4).all() and (three[:, :, 3] == 3).all()  # too few others: they repeat


def test_views_from_group_cuts_each_global_view_from_another_photo():
    imgs = np.repeat(np.arange(9, dtype=np.uint8) * 28, 32 * 32 * 3).reshape(9, 32, 32, 3)  # one grey per image
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3])  # two lesions of three photos, a pair, a single photo
    data = dict(images=imgs, mean=[0.5] * 3, std=[0.3] * 3, groups=groups, by_group=np.argsort(groups, kind='stable'))
    grey = mj.to_float(imgs[:, :1, :1], data['mean'], data['std'], 'cpu').flatten()[::3]  # (9,) normalised
    src = lambda views: [int((grey - v.mean()).abs().argmin()) for v in views]  # which image each crop shows
    cfg = _tiny_cfg(objective='views', n_local_views=0, batch_size=9, views_from='group')
    g = mj.get_batch(cfg, mj, data, 0, 0, 'cpu', 0, 1)['globals']  # (2, 9, 3, 32, 32)
    assert src(g[0]) == list(range(9))  # first views: the images themselves
    assert all(groups[j] == groups[i] and j != i for i, j in enumerate(src(g[1])[:8]))  # second: another photo
    assert src(g[1])[6:] == [7, 6, 8]  # the pair swaps; the single photo pairs with itself
    g = mj.get_batch({**cfg, 'n_global_views': 3}, mj, data, 1, 0, 'cpu', 0, 1)['globals']  # (3, 9, ...)
    views = np.array([src(v) for v in g]).T  # (9, 3): the photo behind each image's three global views
    assert all(sorted(v) == list(np.flatnonzero(groups == groups[i])) for i, v in enumerate(views[:6]))
    assert views[6].tolist() == [6, 7, 7] and views[8].tolist() == [8, 8, 8]  # too few photos: they repeat
    same = mj.get_batch(_tiny_cfg(objective='views', n_local_views=0, batch_size=9, n_global_views=3),
                        mj, data, 0, 0, 'cpu', 0, 1)['globals']
    assert all(src(v) == list(range(9)) for v in same)  # views_from='image': every view from the one photo
    with pytest.raises(mj.ConfigError, match='views_from'):
        _tiny_cfg(views_from='group', inv_weight=0.0)  # objective 'mask' without inv_weight has no second view
    mask = _tiny_cfg(batch_size=9, views_from='group', inv_weight=0.1)  # 'mask': inv_weight's second view
    assert all(groups[j] == groups[i] and j != i for i, j in enumerate(src(mj.get_batch(mask, mj, data, 0, 0, 'cpu',
                                                                                       0, 1)['x_p'])[:8]))
    own = mj.get_batch({**mask, 'views_from': 'image'}, mj, data, 0, 0, 'cpu', 0, 1)
    assert src(own['x_p']) == list(range(9)) and not torch.equal(own['x_p'], own['x'])  # its own crop of the image
    assert 'x_p' not in mj.get_batch({**mask, 'inv_weight': 0.0, 'views_from': 'image'}, mj, data, 0, 0, 'cpu', 0, 1)
    with pytest.raises(mj.ConfigError, match=r'inv_weight=-0.1 must be >= 0 \(0 turns the second view off\)'):
        _tiny_cfg(inv_weight=-0.1)
    views = _tiny_cfg(objective='views', n_local_views=0, batch_size=9, inv_weight=0.1)  # ignored by 'views'
    assert 'x_p' not in mj.get_batch(views, mj, data, 0, 0, 'cpu', 0, 1)
    with pytest.raises(mj.ConfigError, match='n_global_views=1 \\+ n_local_views=0 must be at least 2'):
        _tiny_cfg(objective='views', n_global_views=1, n_local_views=0)  # one view: nothing to agree with


def test_batch_indices_shard_without_overlap_or_loss():
    n, B, world, accum = 50, 4, 2, 3
    seen = []
    for step in range(5):
        for micro in range(accum):
            for rank in range(world):
                seen.append(mj.batch_indices(step, micro, n, B, world, rank, accum, seed=1))
    seen = np.concatenate(seen)  # 120 positions = 2 full epochs + 20
    assert sorted(seen[:50]) == list(range(50)) and sorted(seen[50:100]) == list(range(50))
    assert not np.array_equal(seen[:50], seen[50:100])  # each epoch reshuffled


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    c = dict(mj.DEFAULTS, learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    lrs = [mj.lr_at(i, c) for i in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone after warmup
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)


def test_knn_predict_votes_by_similarity():
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    labels = np.array([0, 0, 1, 1])
    s = mj.knn_predict(train, labels, np.array([[1, 0.05], [0.05, 1]], np.float32), 2, k=3)
    assert list(s.argmax(1)) == [0, 1]
    s = mj.knn_predict(train, labels, train, 2, k=100)  # k larger than the bank is safe
    assert s.shape == (4, 2)


def test_effective_rank_detects_collapse():
    g = torch.Generator().manual_seed(0)
    assert mj.effective_rank(torch.randn(256, 32, generator=g)) > 25
    assert mj.effective_rank(torch.randn(256, 1, generator=g) * torch.ones(1, 32)) < 1.5


def test_prefetcher_returns_what_make_returns_in_any_order_and_reraises():
    """The background batch maker must hand back exactly make(step, micro) for the key asked, also
    when the caller jumps (a resume, a benchmark's breakdown) or asks the same key twice, and must
    re-raise make's errors in the caller."""
    import threading
    calls, main = [], threading.get_ident()
    def make(step, micro):
        calls.append(threading.get_ident() != main)
        if step == 7:
            raise ValueError('bad batch 7')
        return (step, micro, step * 10 + micro)
    get = mj.Prefetcher(make, accum=2)
    for key in [(0, 0), (0, 1), (1, 0), (1, 1), (5, 1), (6, 0), (6, 0), (2, 0)]:
        assert get(*key) == (*key, key[0] * 10 + key[1])
    with pytest.raises(ValueError, match='bad batch 7'):
        get(7, 0)
    get.close()
    assert all(calls)  # every batch was made in the background thread


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(os.path.dirname(__file__), '..', 'config', '*.py'))))
def test_every_config_file_loads_and_validates(path):
    """`python medjepa.py config/x.py` as typed: no unknown key, no impossible value, the data it names."""
    cfg = mj.validate(mj.configure([path], mj.DEFAULTS))
    name = os.path.splitext(os.path.basename(path))[0]
    assert name.startswith(('demo', 'vit')) or cfg['data_dir'] == f'data/{name}', cfg['data_dir']
