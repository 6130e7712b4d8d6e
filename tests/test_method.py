"""Specifications that pin the method itself: each test fails on a realistic one-line bug
(a missing stop-gradient, targets without their LayerNorm, the wrong views centre, the kNN
temperature used the wrong way round, positions added after the gather, weight decay on norms)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import medjepa as mj

TINY = dict(mj.DEFAULTS, n_layer=2, n_embd=32, n_head=2, pred_n_layer=1, pred_n_embd=16, pred_n_head=2,
            patch_size=4, num_slices=16, proj_dim=8)


def _model(**over):
    torch.manual_seed(0)
    return mj.build_model({**TINY, **over}, 3).double()


def _mask_batch(B=6, size=16, patch=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, size, size, generator=gen, dtype=torch.float64)
    x_tgt = x + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ctx_idx, tgt_idx = mj.sample_masks(B, (size // patch,) * 2, gen, min_keep=2)
    return x, x_tgt, ctx_idx, tgt_idx


def test_mask_loss_gradient_flows_only_through_the_context_branch():
    """Targets are a stop-gradient copy of the encoder's output: no gradient may reach the target
    image, and the encoder's gradient must equal the one computed against constant targets."""
    model = _model(sigreg_lambda=0.0)
    x, x_tgt, ctx_idx, tgt_idx = _mask_batch()
    x_tgt.requires_grad_(True)
    loss, _ = model.mask_loss(x, x_tgt, ctx_idx, tgt_idx, step=0)
    loss.backward()
    assert x_tgt.grad is None or x_tgt.grad.abs().max() == 0
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # the same loss with the targets computed by a frozen copy of the encoder, fed in as constants
    model.zero_grad()
    frozen = _model(sigreg_lambda=0.0)
    frozen.load_state_dict(model.state_dict())
    with torch.no_grad():
        h = frozen.encoder(x_tgt.detach())
        h = F.layer_norm(h, h.shape[-1:])
    B, M, K = tgt_idx.shape
    target = h.gather(1, tgt_idx.view(B, M * K, 1).expand(-1, -1, h.shape[-1]))
    pred = model.predictor(model.encoder(x, ctx_idx), ctx_idx, tgt_idx, (4, 4))
    F.mse_loss(pred, target).backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_mask_loss_equals_a_hand_written_version():
    """(1 - lambda) * MSE(predictor(context), layer_norm(encoder(full image))[targets]) + lambda * SIGReg."""
    model = _model(sigreg_lambda=0.3)
    x, x_tgt, ctx_idx, tgt_idx = _mask_batch()
    loss, stats = model.mask_loss(x, x_tgt, ctx_idx, tgt_idx, step=7)
    B, M, K = tgt_idx.shape
    with torch.no_grad():
        h = model.encoder(x_tgt)
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        h = (h - mu) / (var + 1e-5).sqrt()  # LayerNorm without affine, written out
    target = torch.stack([h[b, tgt_idx[b].flatten()] for b in range(B)])  # (B, M*K, D)
    z = model.encoder(x, ctx_idx)
    pred = model.predictor(z, ctx_idx, tgt_idx, (4, 4))
    pred_loss = ((pred - target) ** 2).mean()
    reg = model.sigreg_loss(model.sigreg_input(z), 7)
    torch.testing.assert_close(stats['pred'], pred_loss)
    torch.testing.assert_close(loss, 0.7 * pred_loss + 0.3 * reg)


def test_pooled_invariance_is_one_minus_the_correlation_of_the_pooled_views_and_trains_only_the_context():
    """inv_weight's term: 2 (1 - Pearson correlation) per dimension, averaged, between the context's pooled
    layer-normed tokens and the second view's pooled targets; the loss is (1 - lambda) (pred + w inv) +
    lambda SIGReg, and the second view, like the targets, gets no gradient."""
    model = _model(sigreg_lambda=0.3, inv_weight=0.5)
    x, x_tgt, ctx_idx, tgt_idx = _mask_batch()
    x_p = (x.flip(0) + 0.3 * torch.randn_like(x)).requires_grad_(True)  # another photo of each image
    loss, stats = model.mask_loss(x, x_tgt, ctx_idx, tgt_idx, step=7, x_p=x_p)
    _, plain = model.mask_loss(x, x_tgt, ctx_idx, tgt_idx, step=7)
    assert 'inv' not in plain  # without a second view there is no term
    z = model.encoder(x, ctx_idx)
    ln = lambda t: (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    a, b = ln(z).mean(1).detach().numpy(), ln(model.encoder(x_p)).mean(1).detach().numpy()  # (B, D) each
    corr = np.array([np.corrcoef(a[:, d], b[:, d])[0, 1] for d in range(a.shape[1])])
    assert float(stats['inv']) == pytest.approx(float(np.mean(2 - 2 * corr)), rel=1e-4)
    reg = model.sigreg_loss(model.sigreg_input(z), 7)
    torch.testing.assert_close(loss, 0.7 * (stats['pred'] + 0.5 * stats['inv']) + 0.3 * reg)
    loss.backward()
    assert x_p.grad is None or x_p.grad.abs().max() == 0
    assert 0 < float(stats['inv']) < 4  # 2 (1 - r) lies in [0, 4]


def test_views_loss_equals_a_hand_written_version():
    """Every view is pulled to the mean of the GLOBAL views' projections; SIGReg on each view, averaged."""
    model = _model(objective='views', sigreg_lambda=0.2)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(2, 8, 3, 16, 16, generator=gen, dtype=torch.float64)
    loc = torch.randn(3, 8, 3, 8, 8, generator=gen, dtype=torch.float64)
    loss, stats = model.views_loss(g, loc, step=3)
    emb = torch.cat([model.encoder(v).mean(1) for v in list(g) + list(loc)])  # (5 * B, D)
    z = model.projector(emb).split(8)  # one BatchNorm batch over all views, as LeJEPA; 5 x (B, K)
    centre = (z[0] + z[1]) / 2
    pred = sum(((zv - centre) ** 2).mean() for zv in z) / len(z)
    reg = sum(mj.sigreg(zv, 3, TINY['num_slices'], TINY['seed']) for zv in z) / len(z)
    torch.testing.assert_close(stats['pred'], pred)
    torch.testing.assert_close(loss, 0.8 * pred + 0.2 * reg)


def test_views_loss_with_view_keep_sees_only_the_kept_patches_of_the_global_views():
    """Token dropping: the pixels of a dropped patch cannot change the loss; those of a kept one do."""
    model = _model(objective='views', sigreg_lambda=0.2)
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(2, 8, 3, 16, 16, generator=gen, dtype=torch.float64)  # 4 x 4 patches of 4 px
    loc = g.new_zeros(0, 8, 3, 8, 8)
    keep = torch.stack([torch.randperm(16, generator=gen)[:6] for _ in range(16)])  # (2 * B, 6)
    loss, _ = model.views_loss(g, loc, 3, keep)
    dropped = next(p for p in range(16) if p not in keep[0])
    kept = int(keep[0, 0])
    torch.testing.assert_close(model.views_loss(_poke_patch(g, dropped), loc, 3, keep)[0], loss)
    assert not torch.allclose(model.views_loss(_poke_patch(g, kept), loc, 3, keep)[0], loss)
    assert not torch.allclose(model.views_loss(g, loc, 3)[0], loss)  # keep=None: every patch


def _poke_patch(g, p, size=4):
    """g with patch p (row-major on the 4 x 4 grid) of the first view of the first image set to 5."""
    out = g.clone()
    r, c = divmod(p, 16 // size)
    out[0, 0, :, r * size:(r + 1) * size, c * size:(c + 1) * size] = 5.0
    return out


def test_knn_scores_are_exp_cosine_over_T_sums_and_ignore_feature_scale():
    rng = np.random.default_rng(0)
    bank, labels, query = rng.normal(size=(30, 5)), rng.integers(0, 3, 30), rng.normal(size=(4, 5))
    k, T = 7, 0.07
    cos = (query / np.linalg.norm(query, axis=1, keepdims=True)) @ (bank / np.linalg.norm(bank, axis=1, keepdims=True)).T
    expect = np.zeros((4, 3))
    for i in range(4):
        for j in np.argsort(-cos[i])[:k]:
            expect[i, labels[j]] += np.exp(cos[i, j] / T)
    got = mj.knn_predict(bank.astype(np.float32), labels, query.astype(np.float32), 3, k=k, T=T)
    np.testing.assert_allclose(got, expect, rtol=1e-4)
    scaled = mj.knn_predict(100 * bank.astype(np.float32), labels, 0.01 * query.astype(np.float32), 3, k=k, T=T)
    np.testing.assert_allclose(scaled, got, rtol=1e-4)


def test_encoder_on_kept_patches_equals_the_full_encoder_gathered():
    """With no transformer blocks every token is processed on its own, so encoding a subset must equal
    encoding everything and gathering: true only if positions are added before the gather."""
    torch.manual_seed(0)
    enc = mj.ViT(3, 4, 32, 0, 2).double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    keep = torch.stack([torch.randperm(16)[:5].sort().values for _ in range(3)])
    full = enc(x)
    torch.testing.assert_close(enc(x, keep), torch.stack([full[b, keep[b]] for b in range(3)]))


@pytest.mark.parametrize('objective', ['mask', 'views'])
def test_weight_decay_applies_only_to_tensors_of_two_or_more_dimensions(objective):
    model = _model(objective=objective)
    opt = mj.make_optimizer(model, {**TINY, 'weight_decay': 0.05}, 'cpu')
    decayed = {id(p) for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sum(len(g['params']) for g in opt.param_groups) == len(names)  # every parameter is optimised once
    for n, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), n
    assert any('norm' in names[i] or 'bias' in names[i] for g in opt.param_groups if g['weight_decay'] == 0
               for i in map(id, g['params']))


# ----------------------------------------------------------------------------- monitors


def test_mean_cosine_equals_the_average_over_all_distinct_pairs():
    f = np.random.default_rng(0).normal(size=(40, 6)) + 0.5
    u = f / np.linalg.norm(f, axis=1, keepdims=True)
    pairs = [u[i] @ u[j] for i in range(40) for j in range(40) if i != j]
    assert mj.mean_cosine(f) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert mj.mean_cosine(np.ones((5, 3))) == pytest.approx(1.0)


def test_feature_health_tells_a_gaussian_batch_from_a_shifted_or_collapsed_one():
    """The val monitor tests the raw tensor: mean and scale count, so a shared offset fails it."""
    model = _model(sigreg_on='pooled', num_slices=256)
    g = torch.randn(999, 32, generator=torch.Generator().manual_seed(0))
    ok = mj.feature_health(model, g.numpy(), step=5)
    assert ok['sigreg_val'] < 1.5 * ok['sigreg_gauss'] and ok['erank_val'] > 25 and abs(ok['cos_val']) < 0.05
    shifted = mj.feature_health(model, (g + 3).numpy(), step=5)
    assert shifted['sigreg_val'] > 20 * ok['sigreg_gauss'] and shifted['cos_val'] > 0.8
    collapsed = mj.feature_health(model, (0 * g + 1).numpy(), step=5)
    assert collapsed['erank_val'] < 1.5 and collapsed['sigreg_val'] > 0.2 * 999
    vm = _model(objective='views', sigreg_on='pooled_std').float()
    views = mj.feature_health(vm, g.numpy(), step=5)
    assert set(views) == {'erank_val', 'cos_val', 'sigreg_val', 'sigreg_gauss'}
    with torch.no_grad():  # 'views' tests the RAW projector output, whatever sigreg_on says (it is a 'mask' option)
        raw = mj.sigreg(vm.projector.eval()(g), 5, vm.cfg['num_slices'], vm.cfg['seed'], local=True)
    assert views['sigreg_val'] == pytest.approx(float(raw), rel=1e-5)


def test_pooled_std_plus_tokens_adds_a_raw_token_sigreg_to_the_standardised_one():
    """sigreg_on='pooled_std+tokens': SIGReg of the batch-standardised pooled vectors (blind to the
    tokens' mean and scale) plus SIGReg of SIGREG_TOKENS raw context tokens per image, evenly spaced
    from the first context token to the last. Scaling every token changes only the second term."""
    model = _model(sigreg_on='pooled_std+tokens', num_slices=64)
    z = torch.randn(16, 30, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = model.sigreg_input(z)
    assert r.shape == (16, 1 + mj.SIGREG_TOKENS, 32)
    assert torch.equal(r[:, 0], z.mean(1)) and torch.equal(r[:, 1], z[:, 0]) and torch.equal(r[:, -1], z[:, -1])
    assert len({int(i) for i in (z[0, :, 0][:, None] == r[0, 1:, 0]).nonzero()[:, 0]}) == mj.SIGREG_TOKENS
    std_only = _model(sigreg_on='pooled_std', num_slices=64)
    for scale in (1.0, 10.0):
        zs = z * scale
        tok = zs[:, torch.linspace(0, 29, mj.SIGREG_TOKENS).round().long()].reshape(-1, 32)
        by_hand = (mj.sigreg(mj.standardise(zs.mean(1)), 3, 64, 0) + mj.sigreg(tok, 3, 64, 1))
        assert float(model.sigreg_loss(model.sigreg_input(zs), 3)) == pytest.approx(float(by_hand), rel=1e-9)
    base, big = (float(model.sigreg_loss(model.sigreg_input(z * s), 3)) for s in (1.0, 10.0))
    assert float(std_only.sigreg_loss(std_only.sigreg_input(z * 10), 3)) == pytest.approx(
        float(std_only.sigreg_loss(std_only.sigreg_input(z), 3)), rel=1e-4)  # standardised: scale-blind (up to eps)
    assert big > base + 100  # the raw token term sees the tokens' scale (N(0, I) tokens: ~1 per slice)
    # a few images short of context: fewer tokens than SIGREG_TOKENS are all used, none twice
    assert model.sigreg_input(z[:, :3]).shape == (16, 4, 32)
