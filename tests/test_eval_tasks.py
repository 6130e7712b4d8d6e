"""Tests for eval.py's tasks beyond kNN and the linear probe: metrics for every label type, few-shot
sampling, segmentation (Dice, the token-grid decoder), ImageNet weight mapping, fine-tuning groups,
and the leakage check. Hand-made inputs with known answers; a few seconds on 2 CPU cores.

Run: python -m pytest -q tests/test_eval_tasks.py
"""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as ev  # noqa: E402  (the repo's eval.py, not the builtin)
import medjepa  # noqa: E402


# -----------------------------------------------------------------------------
# metrics: multi-label AUROC, ordinal kappa


def multilabel_fixture(seed=0, N=400, L=5):
    """Labels with different prevalences; scores informative but imperfect."""
    rng = np.random.default_rng(seed)
    y = (rng.random((N, L)) < np.array([0.1, 0.3, 0.5, 0.2, 0.05])[:L]).astype(np.int64)
    s = rng.random((N, L)) + 0.6 * y
    return y, s


def test_multilabel_auroc_equals_sklearn_per_label_and_mean():
    y, s = multilabel_fixture()
    m = ev.classification_metrics(y, s, 'multilabel')
    for l in range(y.shape[1]):
        assert m['per_label_auroc'][l] == pytest.approx(roc_auc_score(y[:, l], s[:, l]))
    assert m['auroc'] == pytest.approx(roc_auc_score(y, s, average='macro'))
    assert m['macro_f1'] == pytest.approx(f1_score(y, s >= 0.5, average='macro'))
    assert 0.6 < m['auroc'] < 0.99  # the fixture is neither trivial nor useless


def test_multilabel_auroc_skips_a_label_without_positives():
    y, s = multilabel_fixture()
    y[:, 2] = 0  # no image has label 2 here: its AUROC is undefined, the others still count
    m = ev.classification_metrics(y, s, 'multilabel')
    assert np.isnan(m['per_label_auroc'][2])
    assert m['auroc'] == pytest.approx(np.mean([roc_auc_score(y[:, l], s[:, l]) for l in (0, 1, 3, 4)]))


def test_quadratic_weighted_kappa_for_ordinal_grades():
    y = np.array([0, 1, 2, 3, 4] * 20)
    onehot = lambda pred: np.eye(5)[pred]
    assert ev.classification_metrics(y, onehot(y), 'ordinal')['qwk'] == pytest.approx(1.0)
    near = np.clip(y + np.tile([1, 0, 0, 0, 0], 20), 0, 4)  # some grades off by one
    far = np.where(y == 0, 4, y)  # grade 0 called 4: same number of mistakes, much worse
    k_near = ev.classification_metrics(y, onehot(near), 'ordinal')['qwk']
    k_far = ev.classification_metrics(y, onehot(far), 'ordinal')['qwk']
    assert k_near == pytest.approx(cohen_kappa_score(y, near, weights='quadratic'))
    assert k_far < k_near < 1.0
    assert 'qwk' not in ev.classification_metrics(y, onehot(near), 'multiclass')


def test_linear_probe_multilabel_separable_is_perfect_and_permuted_is_chance():
    rng = np.random.default_rng(0)
    def split(n):  # label l is present exactly when feature l is positive
        x = rng.standard_normal((n, 8)).astype(np.float32)
        return x, (x[:, :4] > 0).astype(np.int64)
    (xtr, ytr), (xva, yva), (xte, yte) = split(400), split(200), split(400)
    r = ev.linear_probe(xtr, ytr, xva, yva, xte, yte, num_classes=4, task='multilabel')
    assert r['select'] == 'auroc' and r['auroc'] > 0.995 and min(r['per_label_auroc']) > 0.99
    shuffled = [rng.permutation(a) for a in (ytr, yva, yte)]  # rows permuted: labels independent of features
    r = ev.linear_probe(xtr, shuffled[0], xva, shuffled[1], xte, shuffled[2], num_classes=4, task='multilabel')
    assert abs(r['auroc'] - 0.5) < 0.06, r['auroc']  # mean of 4 AUROCs on 400 images: sd ~0.015


def test_knn_multilabel_votes_per_label():
    rng = np.random.default_rng(0)
    sets = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])  # label set of each of 3 clusters
    def split(n):
        c = np.arange(n) % 3
        return (10 * np.eye(8)[c] + 0.1 * rng.standard_normal((n, 8))).astype(np.float32), sets[c]
    (xtr, ytr), (xte, yte) = split(90), split(60)
    r = ev.knn_accuracy(xtr, ytr, xte, yte, 3, k=10, task='multilabel')
    assert r['auroc'] == 1.0 and r['per_label_auroc'] == [1.0, 1.0, 1.0]


# -----------------------------------------------------------------------------
# few-shot and data-efficiency sampling


def test_few_shot_sampling_gives_exactly_k_per_class_and_is_reproducible():
    labels = np.repeat([0, 1, 2, 3], [50, 30, 7, 25])
    np.random.default_rng(0).shuffle(labels)
    for k in (1, 5, 10, 20):
        idx = ev.few_shot_indices(labels, k, seed=3)
        assert np.bincount(labels[idx], minlength=4).tolist() == [k, k, min(k, 7), k]  # class 2 has only 7
        assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)
        np.testing.assert_array_equal(idx, ev.few_shot_indices(labels, k, seed=3))  # same seed, same images
        assert not np.array_equal(idx, ev.few_shot_indices(labels, k, seed=4))  # another seed, another draw
    assert set(ev.few_shot_indices(labels, 1, 3)) <= set(ev.few_shot_indices(labels, 5, 3))  # nested per seed


def test_fraction_sampling_is_stratified_and_keeps_every_class():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    idx = ev.fraction_indices(labels, 0.1, seed=0)
    assert np.bincount(labels[idx]).tolist() == [60, 30, 10]
    assert np.bincount(labels[ev.fraction_indices(labels, 0.001, seed=0)]).tolist() == [1, 1, 1]
    np.testing.assert_array_equal(idx, ev.fraction_indices(labels, 0.1, seed=0))
    multi = np.random.default_rng(0).integers(0, 2, (1000, 4))
    assert len(ev.fraction_indices(multi, 0.1, seed=0)) == 100


def test_few_shot_probes_use_no_val_label_and_a_C_fixed_in_advance():
    """A 1-shot probe that picks C on 999 labelled val images has used 1000 labels, not 1 per class.
    So the few-shot and fraction probes must give the same results whatever the val split holds
    (here: noise features, shuffled labels); only 100 % (the linear probe) chooses C on val."""
    rng = np.random.default_rng(0)
    def split(n):  # 4 overlapping classes: the choice of C would matter
        y = np.arange(n) % 4
        return (np.eye(16)[y] + 0.8 * rng.standard_normal((n, 16))).astype(np.float32), y
    (xtr, ytr), (xva, yva), (xte, yte) = split(400), split(200), split(200)
    cfg = dict(shots=[1, 5], fractions=[0.1, 1], fewshot_seeds=2, fewshot_C=1.0, seed=0, Cs=ev.CS)
    def run(xva, yva):
        row = dict(X={'train': xtr, 'val': xva, 'test': xte}, results={})
        data = dict(labels={'train': ytr, 'val': yva, 'test': yte}, task='multiclass', num_classes=4)
        return ev.task_fewshot(row, data, cfg)[0], ev.task_linear(row, data, cfg)[0]
    (clean, linear), (noisy, noisy_linear) = run(xva, yva), run(rng.standard_normal(xva.shape), rng.permutation(yva))
    for kind, value in (('shots', 1), ('shots', 5), ('fractions', 0.1)):
        runs = clean[kind][value]['runs']
        assert runs == noisy[kind][value]['runs'], (kind, value)  # val changed, few-shot results did not
        assert all(r['C'] == 1.0 for r in runs) and 0.3 < clean[kind][value]['mean'] < 1  # neither trivial nor useless
    assert [r['n_labelled'] for r in clean['shots'][1]['runs']] == [4, 4]
    assert clean['fractions'][1]['mean'] == linear['acc'] and noisy['fractions'][1]['mean'] == noisy_linear['acc']
    assert linear['val'] != noisy_linear['val']  # the full-label probe does choose on val


# -----------------------------------------------------------------------------
# segmentation: Dice, the token-grid decoder, the head


def test_dice_on_hand_computed_masks_excludes_background():
    target = np.zeros((2, 4, 4), np.int64)
    pred = np.zeros((2, 4, 4), np.int64)
    target[0, 0, :] = 1          # image 0: class 1 = the top row (4 px), class 2 = two px
    pred[0, 0, :2] = 1           # predicted: half of the row ...
    pred[0, 1, :2] = 1           # ... and 2 wrong px: Dice = 2 * 2 / (4 + 4) = 0.5
    target[0, 3, :2] = 2         # class 2 missed entirely: Dice 0
    target[1, 2:, 2:] = 1        # image 1: class 1 = a 2x2 block, found exactly: Dice 1; no class 2 anywhere
    pred[1, 2:, 2:] = 1
    dice = ev.dice_per_class(pred, target, num_classes=3)
    # class 1: mean of 0.5 and 1; class 2: only image 0 counts (image 1 has it in neither mask)
    assert dice == pytest.approx([0.75, 0.0])
    # background would score ~0.8 here and flatter the model; it is not in the list
    assert len(dice) == 2


def test_dice_works_on_volumes_and_ignores_empty_images():
    target = np.zeros((3, 4, 4, 4), np.int64)
    pred = np.zeros_like(target)
    target[0, :2] = 1              # 32 voxels
    pred[0, :1] = 1                # 16 of them: Dice = 2 * 16 / 48
    target[1, 1:3, 1:3, 1:3] = 1   # 8 voxels, predicted exactly
    pred[1] = target[1]            # image 2: empty in both, ignored
    assert ev.dice_per_class(pred, target, 2) == pytest.approx([(2 * 16 / 48 + 1) / 2])
    assert np.isnan(ev.dice_per_class(pred[2:], target[2:], 2)[0])  # nothing to score at all


def test_seg_logits_put_every_pixel_back_in_place_2d_and_3d():
    # 2-D: tokens = each patch's pixels; an identity 'head' must rebuild the image exactly
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    tokens = ev.PatchPixels(4)(x).view(2, 2, 2, 16)  # (B, gh, gw, p*p)
    torch.testing.assert_close(ev.seg_logits(nn.Identity(), tokens, 4, (8, 8)), x)
    # 3-D: a (B, D, H, W) volume cut into 2x2x2 patches by hand, token grid (B, 2, 2, 2, 8)
    v = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).view(2, 4, 4, 4)
    tok = v.view(2, 2, 2, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(2, 2, 2, 2, 8)
    torch.testing.assert_close(ev.seg_logits(nn.Identity(), tok, 2, (4, 4, 4)), v[:, None])
    # a grid that does not cover the mask (resized input) is interpolated to the mask size
    assert ev.seg_logits(nn.Identity(), tokens, 4, (16, 16)).shape == (2, 1, 16, 16)


def bright_square_split(n, seed):
    """1-channel 16 px images, a bright 6x6 square on noise; tokens = 4x4 patch pixels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, (n, 1, 16, 16)).astype(np.float32)
    masks = np.zeros((n, 16, 16), np.uint8)
    for i, (r, c) in enumerate(rng.integers(0, 10, (n, 2))):
        masks[i, r:r + 6, c:c + 6] = 1
    x[:, 0] += 2 * masks
    return ev.PatchPixels(4)(torch.from_numpy(x)).view(n, 4, 4, 16).numpy(), masks


def test_segmentation_head_learns_a_lesion_and_chooses_the_epoch_on_val():
    tokens, masks = zip(*(bright_square_split(n, s) for n, s in ((64, 0), (32, 1), (32, 2))))
    tokens, masks = dict(zip(ev.SPLITS, tokens)), dict(zip(ev.SPLITS, masks))
    cfg = dict(seed=0, seg_lr=0.03, seg_epochs=15)
    r, pred, _ = ev.train_segmentation(tokens, masks, 4, 2, cfg)
    assert r['mean_dice'] > 0.9 and pred.shape == (32, 16, 16)
    assert r['best_epoch'] == max(r['val_mean_dice'], key=r['val_mean_dice'].get)  # the best val epoch
    # the test split cannot move the choice: another test set, the same val curve and epoch
    tokens['test'], masks['test'] = bright_square_split(32, 9)
    r2, _, _ = ev.train_segmentation(tokens, masks, 4, 2, cfg)
    assert r2['val_mean_dice'] == r['val_mean_dice'] and r2['best_epoch'] == r['best_epoch']


def nested_boxes(n, shape, seed, frac):
    """(n, 1, *shape) float images of noise with a box (frac of each side) at a random place: label 2
    outside, label 1 inside, label 3 at its centre (BraTS' edema / core / enhancing), each at its own
    brightness. -> images, masks (n, *shape) uint8."""
    rng = np.random.default_rng(seed)
    x, masks = rng.normal(0, 0.3, (n, 1, *shape)).astype(np.float32), np.zeros((n, *shape), np.uint8)
    side = [int(frac * s) for s in shape]
    for i in range(n):
        lo = [rng.integers(0, s - b + 1) for s, b in zip(shape, side)]
        for label, margin in ((2, 0), (1, 0.2), (3, 0.35)):  # fractions of the box side trimmed per edge
            masks[(i, *(slice(a + int(margin * b), a + b - int(margin * b)) for a, b in zip(lo, side)))] = label
    x[:, 0] += np.array([0, 1.5, 1, 2.5], np.float32)[masks]
    return x, masks


@pytest.mark.parametrize('dims', [2, 3])
def test_segmentation_finetuning_trains_the_encoder_from_the_frozen_head_and_chooses_on_val(dims):
    """An encoder with a zeroed patch embedding: its tokens carry only their position, the same for every
    image, so the frozen head can only draw one fixed mask. Fine-tuning end to end must learn the patch
    embedding (Dice far above frozen), start from the frozen solution (step 0 = its val Dice), keep the
    caller's encoder untouched, and never look at test. 2-D: binary; 3-D: BraTS labels and regions."""
    import medjepa3d
    shape, patch, frac, names = ((16, 16), 4, 0.5, ['background', 'lesion']) if dims == 2 else \
        ((8, 16, 16), (2, 4, 4), 0.75, ev.BRATS_LABELS)
    torch.manual_seed(0)
    enc = medjepa.ViT(1, patch, 24, 2, 2) if dims == 2 else medjepa3d.ViT3D(1, patch, 24, 2, 2)
    nn.init.zeros_(enc.patch_embed.proj.weight), nn.init.zeros_(enc.patch_embed.proj.bias)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    images, masks = {}, {}
    for split, n, seed in (('train', 64, 0), ('val', 24, 1), ('test', 24, 2)):
        images[split], masks[split] = nested_boxes(n, shape, seed, frac)
        masks[split] = masks[split] if dims == 3 else (masks[split] > 0).astype(np.uint8)
    prep, idx = torch.from_numpy, {s: np.arange(len(masks[s])) for s in ev.SPLITS}
    with torch.no_grad():  # float32 tokens (eval.encode stores float16): step 0 must then match exactly
        tokens = {s: enc(prep(x)).view(len(x), *enc.grid(prep(x)), -1).numpy() for s, x in images.items()}
    row = dict(name='enc', encoder=enc, prep=prep, token_idx=idx, tokens=tokens)
    cfg = dict(seed=0, seg_lr=0.03, seg_epochs=5, seg_classes=len(names), seg_names=names, device='cpu',
               dtype='float32', seg_finetune_iters=60, seg_finetune_lr=1e-2, layer_decay=0.75,
               finetune_batch=16, finetune_eval_every=10)
    r, table = ev.task_seg(row, dict(images=images, masks=masks), cfg)
    ft = r['finetuned']
    assert r['mean_dice'] < 0.6 and ft['mean_dice'] > r['mean_dice'] + 0.3  # only a trained encoder segments
    assert ft['val_mean_dice'][0] == r['val_mean_dice'][r['best_epoch']]  # step 0 = the frozen head
    assert ft['best_step'] == max(ft['val_mean_dice'], key=ft['val_mean_dice'].get) > 0
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # the caller's encoder: untouched
    assert [t['encoder'] for t in table[1:]] == ['enc, fine-tuned'] and table[1]['step (val)'] == ft['best_step']
    if dims == 3:
        assert set(ft['brats_regions']) == {'ET', 'TC', 'WT'} and 'Dice WT' in table[1]
    masks['test'] = masks['test'][::-1].copy()  # another test set: the same val curve and choice
    r2, _ = ev.task_seg(row, dict(images=images, masks=masks), cfg)
    assert r2['finetuned']['val_mean_dice'] == ft['val_mean_dice'] and r2['finetuned']['best_step'] == ft['best_step']


# -----------------------------------------------------------------------------
# ImageNet ViT weights (timm layout) onto our encoder


def timm_vit_state_dict(D=768, depth=12, p=16, grid=14, classes=1000, seed=0):
    """A state dict with the key names and shapes of timm's vit_base_patch16_224 (random values)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.02
    sd = {'cls_token': r(1, 1, D), 'pos_embed': r(1, 1 + grid * grid, D),
          'patch_embed.proj.weight': r(D, 3, p, p), 'patch_embed.proj.bias': r(D)}
    for i in range(depth):
        b = f'blocks.{i}.'
        sd.update({b + 'norm1.weight': 1 + r(D), b + 'norm1.bias': r(D),
                   b + 'attn.qkv.weight': r(3 * D, D), b + 'attn.qkv.bias': r(3 * D),
                   b + 'attn.proj.weight': r(D, D), b + 'attn.proj.bias': r(D),
                   b + 'norm2.weight': 1 + r(D), b + 'norm2.bias': r(D),
                   b + 'mlp.fc1.weight': r(4 * D, D), b + 'mlp.fc1.bias': r(4 * D),
                   b + 'mlp.fc2.weight': r(D, 4 * D), b + 'mlp.fc2.bias': r(D)})
    sd.update({'norm.weight': 1 + r(D), 'norm.bias': r(D), 'head.weight': r(classes, D), 'head.bias': r(classes)})
    return sd


def test_imagenet_vit_b16_state_dict_loads_onto_our_encoder():
    sd = timm_vit_state_dict()
    mapped, arch = ev.imagenet_to_medjepa({'model': sd})  # wrapped, as MAE / DeiT checkpoints are
    assert arch == dict(patch_size=16, n_embd=768, n_head=12, pos_grid=(14, 14), n_layer=12)
    assert not any(k.startswith(('cls_token', 'head')) for k in mapped)  # no class token, no classifier
    enc = ev.LearnedPosViT(3, **arch)
    enc.load_state_dict(mapped)  # strict: every tensor of our encoder has a source, nothing is left over
    torch.testing.assert_close(enc.blocks[7].attn.qkv.weight, sd['blocks.7.attn.qkv.weight'])
    torch.testing.assert_close(enc.blocks[11].mlp.fc2.bias, sd['blocks.11.mlp.fc2.bias'])
    torch.testing.assert_close(enc.norm.weight, sd['norm.weight'])
    torch.testing.assert_close(enc.pos_embed((14, 14), 'cpu'), sd['pos_embed'][0, 1:])  # cls position dropped
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 64, 64)).shape == (1, 16, 768)  # other sizes: positions resized to 4x4


def test_imagenet_file_loads_with_grey_input_and_foreign_layouts_are_refused(tmp_path):
    sd = timm_vit_state_dict(D=64, depth=2, p=8, grid=4, classes=10)
    path = tmp_path / 'vit.pth'
    torch.save({'state_dict': {'module.' + k: v for k, v in sd.items()}}, path)  # DDP-style prefix
    enc, arch = ev.load_imagenet_encoder(str(path), in_chans=1)
    assert arch['n_layer'] == 2 and arch['n_head'] == 1 and enc.patch_embed.proj.weight.shape == (64, 1, 8, 8)
    # grey input: a grey image g is the RGB image (g, g, g), so the RGB filters are summed
    torch.testing.assert_close(enc.patch_embed.proj.weight, sd['patch_embed.proj.weight'].sum(1, keepdim=True))
    bad = dict(sd, **{'encoder.layers.encoder_layer_0.ln_1.weight': torch.zeros(64)})  # torchvision naming
    with pytest.raises(ValueError, match='encoder.layers.encoder_layer_0'):
        ev.imagenet_to_medjepa(bad)


def test_patch_filters_adapt_to_another_channel_count_keeping_what_a_grey_image_gives():
    """One rule for ImageNet weights and our own checkpoints: a grey image g is (g, ..., g) in any
    number of channels, so the adapted encoder must give on g the tokens the original gave on
    (g, ..., g): RGB -> grey sums the filters, RGB -> 4 channels spreads their sum over 4; tubelets alike."""
    torch.manual_seed(0)
    rgb = medjepa.ViT(3, 4, 24, 1, 2)
    g = torch.randn(2, 1, 16, 16, dtype=torch.float32)
    for chans in (1, 4):
        sd = dict(rgb.state_dict(), **{'patch_embed.proj.weight': ev.adapt_patch_embed(rgb.patch_embed.proj.weight, chans)})
        enc = medjepa.ViT(chans, 4, 24, 1, 2)
        enc.load_state_dict(sd)
        with torch.no_grad():
            torch.testing.assert_close(enc(g.expand(-1, chans, -1, -1)), rgb(g.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)
    w = torch.randn(8, 1, 2, 4, 4, dtype=torch.float32)  # a grey 3-D checkpoint's tubelet filters
    torch.testing.assert_close(ev.adapt_patch_embed(w, 2), torch.cat([w / 2, w / 2], 1))
    assert ev.adapt_patch_embed(w, 1) is w  # the same channels: untouched


# -----------------------------------------------------------------------------
# fine-tuning and leakage


def test_layerwise_lr_decay_gives_earlier_layers_smaller_lr():
    enc = medjepa.ViT(3, 4, 16, 3, 2)
    head = nn.Linear(16, 5)
    groups = ev.layerwise_param_groups(enc, head, lr=1.0, decay=0.5)
    lr_of = {id(p): g['base_lr'] for g in groups for p in g['params']}
    assert lr_of[id(head.weight)] == lr_of[id(enc.norm.weight)] == 1.0
    assert [lr_of[id(enc.blocks[i].attn.qkv.weight)] for i in range(3)] == [0.125, 0.25, 0.5]
    assert lr_of[id(enc.patch_embed.proj.weight)] == 0.0625
    wd = {id(p): g['weight_decay'] for g in groups for p in g['params']}
    assert wd[id(enc.blocks[0].norm1.weight)] == 0 and wd[id(enc.blocks[0].attn.qkv.bias)] == 0
    assert wd[id(enc.blocks[0].attn.qkv.weight)] > 0
    assert sum(len(g['params']) for g in groups) == len(list(enc.parameters())) + 2


def test_fit_head_folds_the_standardisation_into_a_linear_head():
    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    x = (rng.standard_normal((300, 6)) + 3 * np.eye(6)[y]) * [1, 10, 100, 1, 1, 1] + 50  # badly scaled
    head = ev.fit_head(x, y, 'multiclass', 3)
    with torch.no_grad():
        pred = head(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy()
    assert (pred == y).mean() > 0.95


def leak_fixture():
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for s, n in zip(ev.SPLITS, (20, 10, 10))}
    groups = {s: np.arange(n) + 100 * i for i, (s, n) in enumerate(zip(ev.SPLITS, (20, 10, 10)))}
    return {'images': images, 'groups': groups}


def test_leakage_report_catches_a_test_image_copied_into_val_and_a_shared_patient():
    data = leak_fixture()
    assert all(v == {'groups': 0, 'images': 0} for v in ev.leakage_report(data).values())
    data['images']['val'][4] = data['images']['test'][7]  # a test image also used for selection
    data['groups']['train'][0] = data['groups']['test'][3]  # a test patient also in train
    report = ev.leakage_report(data)
    assert report['val/test'] == {'groups': 0, 'images': 1}
    assert report['train/test'] == {'groups': 1, 'images': 0}
    assert report['train/val'] == {'groups': 0, 'images': 0}
    data['groups'] = None  # data sets without groups: only the pixel check
    assert ev.leakage_report(data)['val/test'] == {'groups': 0, 'images': 1}


@pytest.mark.parametrize('dims', [2, 3])
def test_supervised_row_trains_the_encoder_with_the_labels_like_the_pretraining_and_chooses_on_val(dims, monkeypatch):
    """The ceiling row. An encoder with a zeroed patch embedding sees every image alike (its tokens carry
    only their position): its frozen features are at chance. Trained with the labels (fresh head, the
    pretraining's crops with its crop_scale, its batch size) it must learn to read the class (the
    brightness), score val at step 0 and every supervised_eval_every steps, and keep the best step."""
    import medjepa3d
    rng = np.random.default_rng(0)
    shape, patch = ((16, 16), 4) if dims == 2 else ((8, 16, 16), (2, 4, 4))
    def split(n):
        y = np.arange(n) % 2
        return (rng.integers(0, 100, (n, *shape, 1)) + 120 * y.reshape(-1, *[1] * (dims + 1))).astype(np.uint8), y
    (xtr, ytr), (xva, yva), (xte, yte) = split(64), split(32), split(32)
    data = dict(images={'train': xtr, 'val': xva, 'test': xte}, labels={'train': ytr, 'val': yva, 'test': yte},
                task='multiclass', num_classes=2)
    torch.manual_seed(0)
    enc = medjepa.ViT(1, patch, 24, 1, 2) if dims == 2 else medjepa3d.ViT3D(1, patch, 24, 1, 2)
    nn.init.zeros_(enc.patch_embed.proj.weight), nn.init.zeros_(enc.patch_embed.proj.bias)
    module, fn = (medjepa, 'random_resized_crop') if dims == 2 else (medjepa3d, 'random_crop_3d')
    crop, crops = getattr(module, fn), []  # (batch, scale) of every crop drawn
    monkeypatch.setattr(module, fn, lambda x, size, scale, *a, **k: crops.append((len(x), scale)) or crop(x, size, scale, *a, **k))
    config = dict(batch_size=16, gradient_accumulation_steps=1, crop_scale=(0.3, 1.0), flip=True)
    cfg = dict(seed=0, device='cpu', dtype='float32', supervised_iters=40, supervised_lr=1e-2, supervised_eval_every=10)
    prep = ev.make_prep([0.5], [0.3], 'cpu')
    r = ev.train_supervised(enc, prep, data, config, cfg)
    assert r['val'][0] == 0.5 and r['acc'] > 0.9  # untrained: one answer for all; trained: reads the class
    assert set(r['val']) == {0, 10, 20, 30, 40} and r['best_step'] == max(r['val'], key=r['val'].get)
    assert len(crops) == 40 and set(crops) == {(16, (0.3, 1.0))}  # one crop per step, the pretraining's batch and scale
    (ftr, _), (fte, _) = ev.encode(enc, prep, xtr), ev.encode(enc, prep, xte)  # the frozen features the row's tasks see
    assert ev.knn_accuracy(ftr, ytr, fte, yte, 2)['acc'] > 0.9
