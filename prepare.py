"""
Prepare data sets for MedJEPA as flat numpy arrays that training memory-maps.

    python prepare.py demo                  # synthetic dermoscopy, 64 px: 15-30 s on 2 CPU cores, 148 MB
    python prepare.py demo --size=224       # the same photos at 224 px: 3-5 minutes, 1.8 GB
    python prepare.py --help                # the data sets and their options

Every data set lands in data/<name>/ in one format (docs/data_format.md has the details):

    {train,val,test}_images.npy   uint8 (N, H, W, C)
    {train,val,test}_labels.npy   int64 (N,)
    {train,val,test}_masks.npy    uint8 (N, H, W), 0/1 lesion masks         (when the data set has them)
    {train,val,test}_groups.npy   int64 (N,), e.g. lesion or patient ids    (when it has them)
    {train,val,test}_sites.npy    int64 (N,), the acquiring hospital/device (when it has them)
    meta.json                     class names, counts, train mean/std, shapes, licence, args

With the defaults, `demo` gives 6,000 / 999 / 2,001 images (2,000 / 333 / 667 lesions x 3 images).
The folder appears only when it is complete (we write into a hidden sibling and rename at the end),
and running the same command again does nothing.

Adding a data set is one function prepare_<name>(out_dir, ...) that fills a staging folder with
write_split() + write_meta(), plus one line in DATASETS at the bottom of this file.
"""

import argparse
import difflib
import inspect
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
import typing
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SPLITS = ('train', 'val', 'test')

# -----------------------------------------------------------------------------
# The on-disk format, shared by every data set


def write_split(tmp_dir, split, images, labels, masks=None, groups=None, sites=None):
    """Check one split against the format and save it as {split}_{images,labels,...}.npy."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{split} images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    N = len(images)
    arrays = {'images': images, 'labels': labels, 'masks': masks, 'groups': groups, 'sites': sites}
    for key in ('labels', 'groups', 'sites'):
        a = arrays[key]
        if a is None:
            continue
        a = np.asarray(a)
        # int32 ids from a CSV are fine, floats are a bug upstream: never round them silently
        if not np.issubdtype(a.dtype, np.integer) or len(a) != N:
            raise ValueError(f"{split} {key} must be N={N} integers, got {a.dtype} {a.shape}")
        arrays[key] = a.astype(np.int64, copy=False)
    if masks is not None:
        if masks.dtype != np.uint8 or masks.shape != images.shape[:3] or masks.max(initial=0) > 1:
            raise ValueError(f"{split} masks must be uint8 0/1 of shape {images.shape[:3]}")
    for key, a in arrays.items():
        if a is not None:
            np.save(Path(tmp_dir) / f'{split}_{key}.npy', a)


def channel_stats(images):
    """Per-channel mean and std of uint8 (N, H, W, C) images scaled to [0, 1], in bounded memory."""
    C = images.shape[3]
    total, total_sq, count = np.zeros(C), np.zeros(C), 0
    step = max(1, 2**22 // math.prod(images.shape[1:]))  # ~32 MB of float64 per chunk, any image size
    for i in range(0, len(images), step):
        x = np.asarray(images[i:i + step], dtype=np.float64).reshape(-1, C) / 255.0
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def write_meta(tmp_dir, name, classes, split_rule, source, licence, citation, args,
               task='multiclass', **extra):
    """Write meta.json. Shapes, counts and mean/std are read back from the saved arrays, so the
    metadata cannot disagree with what is on disk."""
    tmp_dir = Path(tmp_dir)
    files = {}
    for path in sorted(tmp_dir.glob('*.npy')):
        a = np.load(path, mmap_mode='r')
        files[path.name] = {'shape': list(a.shape), 'dtype': str(a.dtype)}
    train = np.load(tmp_dir / 'train_images.npy', mmap_mode='r')
    mean, std = channel_stats(train)
    has = lambda key: all(f'{s}_{key}.npy' in files for s in SPLITS)
    meta = {
        'name': name, 'task': task, 'classes': list(classes), 'num_classes': len(classes),
        'channels': int(train.shape[3]), 'image_size': list(train.shape[1:3]),
        'counts': {s: files[f'{s}_labels.npy']['shape'][0] for s in SPLITS},
        'split_rule': split_rule, 'source': source, 'licence': licence, 'citation': citation,
        **extra,
        'mean': mean, 'std': std, 'files': files,
        'has_masks': has('masks'), 'has_groups': has('groups'), 'has_sites': has('sites'),
        'args': args,
    }
    with open(tmp_dir / 'meta.json', 'w') as f:
        json.dump(meta, f, indent=2)
    return meta


def is_up_to_date(out_dir, args):
    """True if out_dir already holds this data set made with these args; False if it is absent.
    Anything else there is refused: we never overwrite a folder someone may still need."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return False
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()  # an empty folder holds nothing to lose
        return False
    meta_path = out_dir / 'meta.json'
    if not meta_path.exists():
        raise FileExistsError(f"{out_dir} exists but has no meta.json: it is not a prepared data set. "
                              f"Delete it or pick another --out.")
    with open(meta_path) as f:
        old = json.load(f).get('args')
    if old != args:
        diff = ', '.join(f"{k}: {(old or {}).get(k)!r} there vs {args.get(k)!r} now"
                         for k in sorted(set(old or {}) | set(args)) if (old or {}).get(k) != args.get(k))
        raise FileExistsError(f"{out_dir} was prepared with different arguments ({diff}). "
                              f"Delete it (rm -r {out_dir}) or pick another --out.")
    return True


@contextmanager
def staging_dir(out_dir):
    """Yield a hidden sibling folder to write into; rename it to out_dir only if the block finishes.
    rename() within one file system is atomic, so a crash or Ctrl-C can leave a stray hidden
    .<name>.tmp-<pid> folder at worst, never a half-written out_dir that looks complete."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f'.{out_dir.name}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after a successful rename


def disk_size(path):
    return sum(p.stat().st_size for p in Path(path).rglob('*') if p.is_file())

# -----------------------------------------------------------------------------
# demo: synthetic dermoscopy where the class is in the texture and nothing else


DEMO_CLASSES = ['smooth', 'irregular_border', 'globules', 'radial_streaks',
                'reticular_network', 'target_rings', 'vascular_dots']
DEMO_VERSION = 3        # bump whenever the pictures change: old folders are then refused, not reused
IMAGES_PER_LESION = 3   # photos per lesion; the splits are made of whole lesions

# palettes in display (gamma-encoded) RGB; rendering mixes light linearly, so we decode with **2.2
SKIN_LIGHT, SKIN_DARK = np.array([0.96, 0.80, 0.72]), np.array([0.45, 0.30, 0.22])
PIGMENT_BROWN, PIGMENT_BLUEGREY = np.array([0.30, 0.16, 0.08]), np.array([0.32, 0.33, 0.42])
BLOOD = np.array([0.80, 0.12, 0.18])
HAIR = np.array([0.10, 0.07, 0.05])
# two hospitals' cameras: a 3x3 colour response and a gamma; applied last, like a sensor would
SITE_MATRIX = [np.eye(3), np.array([[0.92, 0.10, 0.00], [0.03, 0.95, 0.05], [0.00, 0.12, 0.98]])]
SITE_GAMMA = [2.2, 1.7]


def smoothstep(a, b, x):
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def border_radius(lesion, theta):
    """Lesion radius (64-px units) in direction theta: an ellipse times 1 + sum_k a_k cos(k theta + p_k).
    Every class gets gentle low harmonics; only 'irregular_border' gets strong high ones."""
    a = math.sqrt(lesion['aspect'])
    ellipse = 1.0 / np.sqrt((np.cos(theta) / a)**2 + (np.sin(theta) * a)**2)
    k, amp, phase = lesion['harm_k'], lesion['harm_amp'], lesion['harm_phase']
    wiggle = 1.0 + (amp * np.cos(k * theta[..., None] + phase)).sum(-1)
    return lesion['radius_scale'] * ellipse * np.maximum(wiggle, 0.3)


def sample_lesion(seed, lesion_id, label):
    """Everything that stays fixed across the photos of one lesion: class, shape, texture layout,
    colours, hospital. Lengths are in pixels of a 64-px image at zoom 1 ("64-px units").
    Size, darkness, colour and site are drawn the same way whatever the class."""
    rng = np.random.default_rng([seed, lesion_id])
    L = {'label': label, 'site': int(rng.integers(2)), 'r0': rng.uniform(16, 25),
         'aspect': rng.uniform(1.0, 1.35), 'radius_scale': 1.0}
    k = np.arange(2, 21)
    amp = np.where(k <= 4, rng.uniform(0, 0.05, k.size), 0.0)
    if label == 1:  # lobulated + jagged: strong harmonics 5-11, weaker 12-20
        amp = amp + np.where((k >= 5) & (k <= 11), rng.uniform(0.03, 0.09, k.size), 0.0)
        amp = amp + np.where(k >= 12, rng.uniform(0.0, 0.03, k.size), 0.0)
    L.update(harm_k=k, harm_amp=amp, harm_phase=rng.uniform(0, 2 * np.pi, k.size))
    # rescale so that the area is pi r0^2 for every class: a jagged border must not mean a bigger lesion
    theta = np.linspace(0, 2 * np.pi, 1024, endpoint=False)
    L['radius_scale'] = L['r0'] / np.sqrt(np.mean(border_radius(L, theta)**2))
    # tabulate once: per-pixel harmonics would cost (H, W, 19) cosines for every photo
    L['radius_table'] = border_radius(L, theta)

    tone = rng.random()**1.3
    skin = (1 - tone) * SKIN_LIGHT + tone * SKIN_DARK
    L['skin'] = np.clip(skin * rng.uniform(0.95, 1.05, 3), 0, 1)**2.2
    blue = rng.uniform(0, 0.6)  # deeper pigment looks blue-grey
    pigment = (1 - blue) * PIGMENT_BROWN + blue * PIGMENT_BLUEGREY
    L['pigment'] = np.clip(pigment * rng.uniform(0.7, 1.3), 0, 1)**2.2
    L['blood'] = BLOOD**2.2
    L['density'] = rng.uniform(0.4, 0.8)     # mean pigment density = how dark the lesion is
    L['fade'] = rng.uniform(0.0, 0.3)        # lighter towards the border
    L['edge'] = rng.uniform(0.4, 1.2)        # border softness
    L['contrast'] = rng.uniform(0.3, 0.42)  # std of the texture, in density units
    # a few soft blotches, in every class, so that "any variation at all" is not a texture cue
    L['blotch_xy'] = rng.uniform(-0.6, 0.6, (4, 2)) * L['r0']
    L['blotch_sigma'] = rng.uniform(0.35, 0.7, 4) * L['r0']
    L['blotch_w'] = rng.normal(0, 1, 4)

    if label in (2, 6):  # dots on a jittered grid: evenly spread, like real globules / vessels
        spacing = rng.uniform(4.0, 5.5) if label == 2 else rng.uniform(3.2, 4.2)
        n = int(np.ceil(2.6 * L['r0'] / spacing)) + 1
        gx, gy = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1))
        xy = np.stack([gx.ravel(), gy.ravel()], 1) * spacing
        xy = xy + rng.uniform(-0.3, 0.3, xy.shape) * spacing + rng.uniform(0, spacing, 2)
        angle = rng.uniform(0, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        xy = xy @ np.array([[c, s], [-s, c]])
        keep = rng.random(len(xy)) < 0.75  # drop some at random so that no regular lattice shows
        inside = np.hypot(*xy.T) < 0.8 * border_radius(L, np.arctan2(xy[:, 1], xy[:, 0]))
        L['dots'] = xy[keep & inside]
        dot_sigma = rng.uniform(0.7, 1.1) if label == 2 else rng.uniform(0.55, 0.75)
        L['dot_sigma'] = dot_sigma * rng.uniform(0.8, 1.25, len(L['dots']))
    elif label == 3:  # ~20 streaks around the rim, slightly wavy and twisted
        L['n_streaks'] = int(round(2 * np.pi * L['r0'] / rng.uniform(3.5, 5.0)))
        L['streak_phase'] = rng.uniform(0, 2 * np.pi)
        L['streak_wobble'] = rng.uniform(0, 0.4, 3) / np.arange(1, 4)
        L['streak_wobble_phase'] = rng.uniform(0, 2 * np.pi, 3)
        L['streak_twist'] = rng.uniform(-1.0, 1.0)
        L['streak_start'] = rng.uniform(0.45, 0.6)
    elif label == 4:  # a mesh of thin lines, gently warped so it reads as a network, not a grid
        L['net_angle'] = rng.uniform(0, np.pi)
        L['net_spacing'] = rng.uniform(4.0, 5.5)
        L['net_width'] = rng.uniform(0.45, 0.65)
        L['net_warp_k'] = rng.normal(0, 1, (3, 2)) * (2 * np.pi / rng.uniform(10, 25, (3, 1)))
        L['net_warp_amp'] = rng.uniform(0.4, 1.0, (3, 2))
        L['net_warp_phase'] = rng.uniform(0, 2 * np.pi, (3, 2))
    elif label == 5:  # concentric rings that follow the border
        L['ring_spacing'] = rng.uniform(4.5, 6.5)
        L['ring_phase'] = rng.uniform(0, 2 * np.pi)
    return L


def lesion_texture(L, lx, ly, rn, theta, mask):
    """The class signal. Returns (pigment, blood): raw fields over the pixels; render_image makes
    each zero-mean inside the lesion, so texture moves pixels around the lesion's base colour
    without changing its average: mean colour and darkness carry no class information."""
    d2 = lambda xy: (lx[..., None] - xy[:, 0])**2 + (ly[..., None] - xy[:, 1])**2  # (H, W, n)
    blotches = (L['blotch_w'] * np.exp(-d2(L['blotch_xy']) / (2 * L['blotch_sigma']**2))).sum(-1)
    label = L['label']
    if label in (2, 6):
        tex = np.exp(-d2(L['dots']) / (2 * L['dot_sigma']**2)).sum(-1) if len(L['dots']) else 0 * lx
        if label == 6:  # vessels are red, not brown: a separate colour direction
            return blotches, tex
    elif label == 3:
        k = np.arange(1, 4)
        wobble = (L['streak_wobble'] * np.sin(k * theta[..., None] + L['streak_wobble_phase'])).sum(-1)
        angle = L['n_streaks'] * (theta + wobble + L['streak_twist'] * rn) + L['streak_phase']
        tex = ((1 + np.cos(angle)) / 2)**4 * smoothstep(L['streak_start'], L['streak_start'] + 0.25, rn)
    elif label == 4:
        c, s = np.cos(L['net_angle']), np.sin(L['net_angle'])
        uv = np.stack([c * lx + s * ly, -s * lx + c * ly], -1)  # (H, W, 2)
        k, amp, ph = L['net_warp_k'], L['net_warp_amp'], L['net_warp_phase']
        uv = uv + (amp * np.sin((lx[..., None, None] * k[:, 0, None] + ly[..., None, None] * k[:, 1, None])
                                + ph)).sum(-2)
        dist = (uv / L['net_spacing'] - np.round(uv / L['net_spacing'])) * L['net_spacing']
        lines = np.exp(-dist**2 / (2 * L['net_width']**2)).max(-1)
        tex = lines * (1 - smoothstep(0.7, 1.0, rn))  # networks thin out towards the border
    elif label == 5:
        rings = (1 + np.cos(2 * np.pi * rn * L['r0'] / L['ring_spacing'] + L['ring_phase'])) / 2
        tex = rings**2
    else:  # 0 and 1: structureless, only the blotches
        return blotches, None
    return standardise(tex, mask) + 0.3 * standardise(blotches, mask), None


def standardise(x, mask=None):
    """Zero mean, unit std (inside mask if given)."""
    v = x[mask] if mask is not None else x
    return (x - v.mean()) / (v.std() + 1e-8)


def gaussian_blur(x, sigma):
    """Separable Gaussian blur over the first two axes of (H, W) or (H, W, C)."""
    if sigma < 0.1:
        return x
    r = int(math.ceil(3 * sigma))
    k = np.exp(-np.arange(-r, r + 1)**2 / (2 * sigma**2))
    k /= k.sum()
    H, W = x.shape[:2]
    pad = [(r, r), (0, 0)] + [(0, 0)] * (x.ndim - 2)
    xp = np.pad(x, pad, mode='reflect')
    x = sum(k[i] * xp[i:i + H] for i in range(2 * r + 1))
    xp = np.pad(x, [pad[1], pad[0]] + pad[2:], mode='reflect')
    return sum(k[i] * xp[:, i:i + W] for i in range(2 * r + 1))


def hair_alpha(rng, size):
    """0-5 dark curved hairs: opacity (H, W) in [0, 1]. Points along quadratic Bezier curves are
    splatted bilinearly and blurred, far cheaper than a distance to every segment."""
    n_hairs = 0 if rng.random() < 0.5 else int(rng.integers(1, 6))
    sigma = rng.uniform(0.35, 0.7) * size / 64  # half-thickness in pixels
    density = np.zeros(size * size)
    for _ in range(n_hairs):
        # draw in fractions of the image so the same hairs appear at every --size
        p0 = rng.uniform(-0.1, 1.1, 2)
        angle, length, bend = rng.uniform(0, 2 * np.pi), rng.uniform(0.4, 1.2), rng.normal(0, 0.2)
        darkness = rng.uniform(1.0, 2.5)  # peak optical density of this hair
        direction = np.array([np.cos(angle), np.sin(angle)])
        p2 = p0 + length * direction
        p1 = (p0 + p2) / 2 + bend * length * np.array([-direction[1], direction[0]])
        t = np.linspace(0, 1, int(3 * length * size) + 2)[:, None]  # 3 points per pixel
        xy = ((1 - t)**2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2) * size - 0.5
        # after the unit-sum blur a line of weight w per point peaks at 3 w / (sqrt(2 pi) sigma)
        w = darkness * math.sqrt(2 * np.pi) * sigma / 3
        x0, y0 = np.floor(xy[:, 0]).astype(int), np.floor(xy[:, 1]).astype(int)
        fx, fy = xy[:, 0] - x0, xy[:, 1] - y0
        for dx, dy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                           (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            x, y = x0 + dx, y0 + dy
            ok = (x >= 0) & (x < size) & (y >= 0) & (y < size)
            density += np.bincount(y[ok] * size + x[ok], wt[ok] * w, minlength=size * size)
    return 1 - np.exp(-gaussian_blur(density.reshape(size, size), sigma))


def render_image(L, rng, size):
    """One photo of lesion L: a fresh pose, light, camera blur, noise and hair. Returns (image uint8
    (H, W, 3), mask uint8 (H, W)). Random draws do not depend on size, so --size changes only the
    resolution of the very same pictures."""
    scale = size / 64
    zoom, rot, flip = rng.uniform(0.9, 1.1), rng.uniform(0, 2 * np.pi), rng.choice([-1.0, 1.0])
    cx, cy = rng.uniform(0.32, 0.68, 2) * size
    # pixel centres -> lesion frame (64-px units): undo the translation, rotation, mirror and zoom
    y, x = np.mgrid[0:size, 0:size] + 0.5
    c, s = np.cos(rot), np.sin(rot)
    lx = (c * (x - cx) + s * (y - cy)) / (zoom * scale)
    ly = flip * (-s * (x - cx) + c * (y - cy)) / (zoom * scale)
    r, theta = np.hypot(lx, ly), np.arctan2(ly, lx)
    R = np.interp(theta, np.linspace(0, 2 * np.pi, 1024, endpoint=False), L['radius_table'],
                  period=2 * np.pi)  # = border_radius(L, theta), tabulated
    rn = r / R                                         # 0 at the centre, 1 on the border
    mask = r < R
    alpha = 1 / (1 + np.exp(-np.clip((R - r) / L['edge'], -30, 30)))  # soft border

    # texture around the base colour: zero mean inside the lesion, std = L['contrast']
    pigment, blood = lesion_texture(L, lx, ly, rn, theta, mask)
    density = L['density'] * (1 - L['fade'] * rn**2) + L['contrast'] * standardise(pigment, mask)
    density = alpha * np.clip(density, 0, 1)
    img = L['skin'] + density[..., None] * (L['pigment'] - L['skin'])  # (H, W, 3), linear light
    if blood is not None:  # red dots: move along the red direction, again zero mean in the lesion
        lesion_colour = L['skin'] + L['density'] * (L['pigment'] - L['skin'])
        red = np.clip(L['contrast'] * standardise(blood, mask), -0.2, 1.0)
        img = img + (alpha * red)[..., None] * (L['blood'] - lesion_colour)

    # nuisances, in the order light meets them: hair on the skin, uneven light, the dermoscope's
    # dark corners, lens blur, then the hospital's camera response, sensor noise, 8-bit quantisation
    a = hair_alpha(rng, size)[..., None]
    img = img * (1 - a) + a * (HAIR**2.2 * rng.uniform(0.5, 2.0))
    gx, gy = rng.normal(0, 0.15, 2)
    light = rng.uniform(0.8, 1.15) * (1 + gx * (x / size - 0.5) * 2 + gy * (y / size - 0.5) * 2)
    rr = np.hypot(x - size / 2, y - size / 2) / (size / 2)
    strong = rng.random() < 0.5
    v, r_in = (rng.uniform(0.7, 1.0), rng.uniform(0.95, 1.25)) if strong else \
              (rng.uniform(0.0, 0.4), rng.uniform(0.6, 1.0))
    img = img * (np.clip(light, 0.3, None) * (1 - v * smoothstep(r_in, r_in + 0.35, rr)))[..., None]
    img = gaussian_blur(img, rng.uniform(0.0, 0.6) * scale)
    img = np.clip(img @ SITE_MATRIX[L['site']].T * rng.uniform(0.96, 1.04, 3), 0, 1)
    img = img**(1 / SITE_GAMMA[L['site']])
    img = img + rng.normal(0, rng.uniform(0.005, 0.02), img.shape)
    img = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return img, mask.astype(np.uint8)


def render_lesions(job):
    """Worker: render IMAGES_PER_LESION photos of each (lesion_id, label) in job. Each lesion and each
    photo has its own seed derived from (seed, lesion_id, k), so the result is the same whatever the
    number of workers or the chunking."""
    seed, size, lesions = job
    images = np.empty((len(lesions) * IMAGES_PER_LESION, size, size, 3), np.uint8)
    masks = np.empty((len(lesions) * IMAGES_PER_LESION, size, size), np.uint8)
    sites = np.empty(len(lesions) * IMAGES_PER_LESION, np.int64)
    i = 0
    for lesion_id, label in lesions:
        L = sample_lesion(seed, lesion_id, label)
        for k in range(IMAGES_PER_LESION):
            images[i], masks[i] = render_image(L, np.random.default_rng([seed, lesion_id, k]), size)
            sites[i] = L['site']
            i += 1
    return images, masks, sites


def prepare_demo(out_dir='data/demo', size: int = 64, seed: int = 0, n_train: int = 6000,
                 n_val: int = 1000, n_test: int = 2000, workers: int | None = None):
    """
    Synthetic dermoscopy: 7 lesion classes that differ ONLY in border shape or inner texture.

    Why it needs learning. Lesion size, position, darkness, colour, skin tone and hospital are drawn
    independently of the class, and each texture is made zero-mean inside the lesion, so the
    average colour of a lesion says nothing about its class (a logistic regression on global colour
    statistics, lesion area and centroid stays near chance). The class is in 1.5-5 px structures:
    dark globules, rim streaks, a line network, rings, red dots, or a jagged border. On top sit the
    nuisances a real encoder must see through: pose, zoom, mirror, blur, noise, uneven light,
    dermoscope vignetting, hair, and two hospitals whose cameras render colour differently.

    Why groups. Each lesion is photographed IMAGES_PER_LESION times (same lesion, fresh pose, light,
    hair and noise). Splitting photos at random would put near-copies of a test lesion in train; the
    HAM10000 lesson. So lesions are split, and the groups arrays hold the lesion ids.

    Counts are whole lesions: round(n / 3) lesions per split, so 6000/1000/2000 -> 6000/999/2001.
    Classes are balanced within each split. Returns out_dir.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    args = {'size': size, 'seed': seed, 'n_train': n_train, 'n_val': n_val, 'n_test': n_test,
            'generator_version': DEMO_VERSION}
    if size < 16:
        raise ValueError(f"--size must be at least 16 (got {size}): the textures need the pixels")
    n_lesions = {s: round(n / IMAGES_PER_LESION) for s, n in zip(SPLITS, (n_train, n_val, n_test))}
    if n_lesions['train'] < len(DEMO_CLASSES) or min(n_lesions.values()) < 1:
        raise ValueError(f"need n_train >= {IMAGES_PER_LESION * len(DEMO_CLASSES)} (every class in "
                         f"train) and n_val, n_test >= {IMAGES_PER_LESION} (one lesion); got "
                         f"{n_train}/{n_val}/{n_test}")
    if is_up_to_date(out_dir, args):
        print(f"{out_dir} is up to date (same arguments), nothing to do")
        return out_dir
    if not workers:  # the cores this process may use (can be fewer than the machine has)
        workers = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    print(f"generating demo data: {size} px, seed {seed}, {workers} worker(s) -> {out_dir}")

    # the master seed fixes which lesion gets which class and where each photo lands in its split;
    # the pictures themselves come from per-lesion seeds (see render_lesions)
    rng = np.random.default_rng(seed)
    plan, next_id = {}, 0
    for split in SPLITS:
        n = n_lesions[split]
        labels = rng.permutation(np.arange(n) % len(DEMO_CLASSES))  # balanced within each split
        ids = np.arange(next_id, next_id + n)
        next_id += n
        plan[split] = (ids, labels, rng.permutation(n * IMAGES_PER_LESION))
    # fork, where available, so that workers do not re-import the caller (medjepa.py is a plain script)
    ctx = mp.get_context('fork') if 'fork' in mp.get_all_start_methods() else mp.get_context()
    pool = ctx.Pool(workers) if workers > 1 else None
    try:
        with staging_dir(out_dir) as tmp:
            for split in SPLITS:
                ids, labels, dest = plan[split]
                N = len(ids) * IMAGES_PER_LESION
                images = np.empty((N, size, size, 3), np.uint8)
                masks = np.empty((N, size, size), np.uint8)
                sites = np.empty(N, np.int64)
                chunk = 16  # lesions per job: small enough to keep both cores busy to the end
                jobs = [(seed, size, list(zip(ids[i:i + chunk].tolist(), labels[i:i + chunk].tolist())))
                        for i in range(0, len(ids), chunk)]
                print(f"  {split:5s}: {N:6d} images of {len(ids)} lesions ...", end='', flush=True)
                t_split = time.time()
                results = pool.imap(render_lesions, jobs) if pool else map(render_lesions, jobs)
                start = 0
                for im, ma, si in results:  # photo k of the split (lesion-major order) goes to dest[k]
                    where = dest[start:start + len(im)]
                    images[where], masks[where], sites[where] = im, ma, si
                    start += len(im)
                write_split(tmp, split, images=images,
                            labels=np.repeat(labels, IMAGES_PER_LESION)[np.argsort(dest)],
                            masks=masks, groups=np.repeat(ids, IMAGES_PER_LESION)[np.argsort(dest)],
                            sites=sites)
                print(f" {time.time() - t_split:.1f} s")
            write_meta(tmp, 'demo', DEMO_CLASSES,
                       split_rule=f"grouped by lesion_id: the {IMAGES_PER_LESION} photos of a lesion "
                                  f"are in one split; classes balanced within each split",
                       source="synthetic, generated by prepare.py demo",
                       licence="CC0-1.0 (generated data, no rights reserved)", citation=None,
                       seed=seed, generator_version=DEMO_VERSION, images_per_lesion=IMAGES_PER_LESION,
                       args=args)
    finally:
        if pool:
            pool.terminate()
    print(f"done: train/val/test = {n_lesions['train'] * IMAGES_PER_LESION}/"
          f"{n_lesions['val'] * IMAGES_PER_LESION}/{n_lesions['test'] * IMAGES_PER_LESION} images, "
          f"{disk_size(out_dir) / 1e6:.0f} MB on disk in {out_dir}, {time.time() - t0:.1f} s")
    return out_dir

# -----------------------------------------------------------------------------
# command line: python prepare.py <dataset> [--key=value ...]


DATASETS = {'demo': prepare_demo}


def cli_type(param):
    """The type a --key=value string becomes: the annotation (int | None -> int), else the default's."""
    kind = param.annotation
    if kind is inspect.Parameter.empty:
        kind = type(param.default) if param.default is not None else str
    kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    if kind is bool:
        return lambda v: {'true': True, '1': True, 'false': False, '0': False}[v.lower()]
    return kind


def options(fn):
    """A data set's options: its keyword parameters, minus out_dir (which is --out)."""
    return {name: p for name, p in inspect.signature(fn).parameters.items() if name != 'out_dir'}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    epilog = 'options per data set (--key=value):\n' + '\n'.join(
        f"  {name}: --out=data/{name} " + ' '.join(f"--{k}={p.default}" for k, p in options(fn).items())
        for name, fn in DATASETS.items())
    parser = argparse.ArgumentParser(
        prog='prepare.py', description="Prepare a data set in data/<name>/ (docs/data_format.md).",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument('dataset', choices=list(DATASETS), help='which data set to prepare')
    known, rest = parser.parse_known_args(argv)
    fn = DATASETS[known.dataset]
    sub = argparse.ArgumentParser(prog=f'prepare.py {known.dataset}', allow_abbrev=False)
    sub.add_argument('--out', default=f'data/{known.dataset}', help='output folder')
    for name, p in options(fn).items():
        sub.add_argument(f'--{name}', type=cli_type(p), default=p.default)
    valid = ['out'] + list(options(fn))
    for token in rest:  # name the closest valid option instead of argparse's bare "unrecognized"
        key = token[2:].split('=', 1)[0] if token.startswith('--') else None
        if key is not None and key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            sub.error(f"unknown option --{key}" + (f"; did you mean --{close[0]}?" if close else
                                                   f"; valid: {' '.join('--' + v for v in valid)}"))
    opts = vars(sub.parse_args(rest))
    try:
        fn(opts.pop('out'), **opts)
    except (FileExistsError, ValueError) as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
