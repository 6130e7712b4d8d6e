"""
The plumbing of medjepa.py, which a reader of the method may skip (nanoGPT's configurator.py plays this
part there). medjepa.py imports and re-exports every name: medjepa.configure is medjepa_utils.configure.

    configuration   defaults < config files < --key=value, every key and value checked before any work
    data            prepare.py's memory-mapped arrays, opened and checked (docs/data_format.md); uint8
                    batches to normalised floats on the device
    checkpoints     atomic writes, the previous file kept, readable errors (docs/reliability.md); resume; one
                    run per out_dir (a lock, no silent overwrite)
    system          DDP start-up, pre-emption signals, precision, torch.compile and the DDP wrappers, the CLI
    measurements    FLOPs of a step and matmul throughput (MFU), frozen features, online kNN, mean cosine,
                    effective rank
    training loop   the periodic evaluation and checkpoint, the log line

Nothing here imports medjepa when loaded (medjepa imports this module): medjepa3d.py or medjepa.py pass
the module with their model and batches as `impl`, and configure() without defaults reads medjepa's.
"""

import ast
import builtins
import difflib
import errno
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Configuration: defaults < config files < --key=value, all checked before any work


class ConfigError(ValueError):
    """A bad config key or value; main() prints it and exits with code 2."""


class DataError(ConfigError):
    """A data folder that breaks docs/data_format.md: also one line and exit code 2."""


def _closest(key, valid):
    near = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean '{near[0]}'?)" if near else ''


def _short(value):
    r = repr(value)
    return r if len(r) <= 40 else f'{r[:20]}...({len(r)} characters)'


def _coerce(key, value, default):
    """Check that `value` has the type of the default; ints widen to floats, lists to tuples."""
    try:
        return _coerce_type(key, value, default)
    except OverflowError:  # float() of an int of hundreds of digits
        raise ConfigError(f"{key}={_short(value)} is too large for a float") from None


def _coerce_type(key, value, default):
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ('true', 'false'):
            return value.lower() == 'true'
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, tuple):
        if isinstance(value, (tuple, list)) and len(value) == len(default):
            return tuple(_coerce(key, v, d) for v, d in zip(value, default))
    raise ConfigError(f"config key '{key}' expects a {type(default).__name__} like {default!r}, "
                      f"got {_short(value)}")


def configure(argv, defaults=None):
    """Return the config dict: defaults (medjepa.py's globals unless given), then config files (positional
    args), then --key=value."""
    if defaults is None:
        import medjepa  # (here, not at the top: medjepa imports this module)
        defaults = medjepa.DEFAULTS
    cfg = dict(defaults)
    for arg in argv:
        if not arg.startswith('--'):  # a config file: python code that assigns globals
            if not os.path.isfile(arg):
                raise ConfigError(f"config file '{arg}' not found (expected e.g. config/demo.py)")
            scope = {}
            with open(arg) as f:
                exec(builtins.compile(f.read(), arg, 'exec'), scope)  # 'compile' is a config key
            items = [(k, v) for k, v in scope.items() if not k.startswith('_') and not callable(v)
                     and type(v).__name__ != 'module']
            where = f" in config file '{arg}'"
        else:
            if '=' not in arg:
                raise ConfigError(f"argument '{arg}' must look like --key=value")
            k, v = arg[2:].split('=', 1)
            try:
                v = ast.literal_eval(v)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                pass  # a bare string such as --device=cpu
            items, where = [(k, v)], ''
        for k, v in items:
            if k not in defaults:
                raise ConfigError(f"unknown config key '{k}'{where}{_closest(k, list(defaults))}")
            cfg[k] = _coerce(k, v, defaults[k])
    return cfg


def parse_config(argv, impl):
    """defaults < config files < --key=value (argv None: sys.argv), checked by impl.validate; a bad one is
    one line on stderr and exit code 2, before any work."""
    try:
        return impl.validate(configure(sys.argv[1:] if argv is None else argv, impl.DEFAULTS))
    except ConfigError as e:
        print(f'{os.path.basename(impl.__file__)}: {e}', file=sys.stderr)
        sys.exit(2)


def need(ok, msg):
    if not ok:
        raise ConfigError(msg)


def validate(c):
    """Reject values that cannot work, naming the key and the fix (the 2-D model's rules)."""
    validate_shared(c)
    ps = c['patch_size']
    need(c['image_size'] % ps == 0,
         f"image_size={c['image_size']} is not a multiple of patch_size={ps}: change one of them")
    need(c['local_size'] % ps == 0, f"local_size={c['local_size']} is not a multiple of patch_size={ps}")
    need(c['image_size'] // ps >= 2,
         f"image_size / patch_size = {c['image_size'] // ps}: a JEPA needs a grid of at least 2x2 patches")
    need(c['n_embd'] % 4 == 0 and c['pred_n_embd'] % 4 == 0, f"n_embd={c['n_embd']} and pred_n_embd="
         f"{c['pred_n_embd']} must be multiples of 4 (2-D sin-cos positions)")
    need(c['objective'] in ('mask', 'views'), f"objective must be 'mask' or 'views', got '{c['objective']}'")
    need(c['color_jitter'] >= 0 and 0 <= c['gray_prob'] <= 1 and c['brightness'] >= 0,
         f"color_jitter={c['color_jitter']} and brightness={c['brightness']} must be >= 0, gray_prob={c['gray_prob']} in [0, 1]")
    need(0 < c['context_keep'] <= 1,
         f"context_keep={c['context_keep']} must lie in (0, 1]: the fraction of the grid each context keeps")
    need(0 < c['view_keep'] <= 1,
         f"view_keep={c['view_keep']} must lie in (0, 1]: the fraction of its patches each global view keeps")
    need(c['views_from'] in ('image', 'group') and (c['views_from'] == 'image' or c['objective'] == 'views'
                                                     or c['inv_weight'] > 0),
         f"views_from='{c['views_from']}' must be 'image' or 'group', and 'group' needs a second view: "
         f"objective='views' (global views after the first) or 'mask' with inv_weight > 0")
    need(c['inv_weight'] >= 0, f"inv_weight={c['inv_weight']} must be >= 0 (0 turns the second view off)")
    need(c['objective'] != 'views' or c['n_global_views'] + c['n_local_views'] >= 2,
         f"n_global_views={c['n_global_views']} + n_local_views={c['n_local_views']} must be at least 2: the "
         f"'views' objective pulls every view to the mean of the global views")
    for k in ('crop_scale', 'local_scale', 'target_scale', 'context_scale'):
        lo, hi = c[k]
        need(0 < lo <= hi <= 1, f"{k}={c[k]} must satisfy 0 < low <= high <= 1")
    return c


_RULES = [  # (rule, test, keys) checked first: the rules of validate_shared below divide by these values
    ('at least 1', lambda v: v >= 1, 'batch_size gradient_accumulation_steps max_iters num_slices '
     'log_interval eval_interval knn_train_size n_layer n_head n_embd pred_n_layer pred_n_head pred_n_embd '
     'patch_size image_size local_size volume_size num_targets proj_dim min_keep max_bad_steps n_global_views'),
    ('in [0, 1)', lambda v: 0 <= v < 1, 'beta1 beta2'),
    ('>= 0', lambda v: v >= 0, 'seed warmup_iters weight_decay grad_clip num_threads min_lr n_local_views'),
    ('below 4294967296 (2**32)', lambda v: v < 2**32, 'seed'),  # (torch.manual_seed overflows near 2**64)
    ('at most 4096', lambda v: v <= 4096, 'num_threads'),
    ('non-empty', bool, 'out_dir data_dir')]


def validate_shared(c):
    """The rules of the keys that medjepa.py and medjepa3d.py share (model widths, SIGReg, schedule)."""
    vals = lambda v: v if isinstance(v, tuple) else (v,)
    for rule, ok, keys in _RULES:
        for k in (k for k in keys.split() if k in c):
            need(all(ok(v) for v in vals(c[k])), f"{k}={_short(c[k])} must be {rule}")
    for k, v in c.items():  # no int beyond what a float (the schedule) or a seed can hold; no inf or nan
        need(all(abs(x) <= 2**53 for x in vals(v) if isinstance(x, int)), f"{k}={_short(v)} must be at most 2**53")
        need(all(math.isfinite(x) for x in vals(v) if isinstance(x, float)),
             f"{k}={v!r} must be finite, not inf or nan")
    dev = c['device']
    need(dev in ('auto', 'cpu', 'mps', 'cuda') or dev[:5] == 'cuda:' and dev[5:].isdigit(),
         f"device '{c['device']}' is not one of auto, cpu, cuda, cuda:N, mps")
    need(c['n_embd'] % c['n_head'] == 0, f"n_embd={c['n_embd']} must be divisible by n_head={c['n_head']}")
    need(c['pred_n_embd'] % c['pred_n_head'] == 0,
         f"pred_n_embd={c['pred_n_embd']} must be divisible by pred_n_head={c['pred_n_head']}")
    need(c['sigreg_on'] in ('pooled_std', 'pooled', 'tokens', 'pooled_std+tokens'),
         f"sigreg_on must be 'pooled_std', 'pooled', 'tokens' or 'pooled_std+tokens', got '{c['sigreg_on']}'")
    need(not c['compile'] or hasattr(torch.compiler, 'set_stance'),
         f"compile=True needs torch >= 2.6 (this is {torch.__version__})")
    need(c['init_from'] in ('scratch', 'resume'),
         f"init_from must be 'scratch' or 'resume', got '{c['init_from']}'")
    need(c['dtype'] in ('auto', 'float32', 'bfloat16', 'float16'),
         f"dtype '{c['dtype']}' is not one of auto/float32/bfloat16/float16")
    need(0.0 <= c['sigreg_lambda'] <= 1.0, f"sigreg_lambda={c['sigreg_lambda']} must lie in [0, 1]")
    lo, hi = c['target_aspect']
    need(0 < lo <= hi, f"target_aspect={c['target_aspect']} must satisfy 0 < low <= high")
    need(0 < c['learning_rate'] and c['min_lr'] <= c['learning_rate'], f"learning_rate={c['learning_rate']} "
         f"must be > 0 and min_lr={c['min_lr']} at most learning_rate (the cosine decays from one to the "
         f"other)")
    return c

# -----------------------------------------------------------------------------
# Data: a folder of memory-mapped uint8 arrays written by prepare.py (docs/data_format.md):
# {split}_images.npy (N, H, W, C) or (N, D, H, W, C), {split}_labels.npy, ... and meta.json.


TASKS = ('multiclass', 'binary', 'ordinal', 'multilabel', 'segmentation', 'unlabeled')  # docs/data_format.md
CLASS_TASKS = ('multiclass', 'binary', 'ordinal')  # one class id in [0, num_classes) per image


def _prepare_name(data_dir, name=None):
    """The `python prepare.py NAME` that makes data_dir: its meta.json name, else the folder's, else '<dataset>'."""
    import prepare  # (here: prepare imports the readers of every format)
    base = os.path.basename(os.path.normpath(data_dir))
    return name if name in prepare.DATASETS else base if base in prepare.DATASETS else '<dataset>'


def _data_set(data_dir, meta=None):
    """"data set 'NAME' in 'DIR'" and the way to remake it, for error messages."""
    base = os.path.basename(os.path.normpath(data_dir))
    name = meta.get('name') if isinstance(meta, dict) and isinstance(meta.get('name'), str) else base
    return (f"data set '{name}' in '{data_dir}'",
            f"Delete '{data_dir}' and make it again with python prepare.py {_prepare_name(data_dir, name)}")


def meta_problems(meta):
    """What is wrong with the meta.json values that training and evaluation read (types and ranges)."""
    if not isinstance(meta, dict):
        return [f"meta.json holds a {type(meta).__name__}, not an object"]
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    numbers = lambda v: isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                         for x in v)
    bad = [f"meta.json lacks '{k}'" for k in ('mean', 'std', 'num_classes') if k not in meta]
    task, k = meta.get('task', 'multiclass'), meta.get('num_classes', 0)
    if not isinstance(task, str) or task not in TASKS:
        bad.append(f"meta.json's task {_short(task)} is not one of {', '.join(TASKS)}")
    if not is_int(k) or k < 0:
        bad.append(f"meta.json's num_classes {_short(k)} is not an integer >= 0")
    elif task == 'binary' and k != 2 or task in TASKS[:4] and k < 1:
        bad.append(f"meta.json's num_classes is {k}, which task '{task}' cannot have")
    elif 'classes' in meta and (not isinstance(meta['classes'], list) or len(meta['classes']) != k):
        bad.append(f"meta.json's len(classes) is {len(meta['classes']) if isinstance(meta['classes'], list) else '-'} "
                   f"but num_classes is {k}")
    for key in ('mean', 'std'):
        v = meta.get(key, [1])
        if not numbers(v):
            bad.append(f"meta.json's {key} {_short(v)} is not a list of numbers, one per channel")
        elif not all(math.isfinite(x) for x in v):
            bad.append(f"meta.json's {key} {v} is not finite")
        elif key == 'std' and min(v) <= 0:  # every normalised pixel would be inf or NaN, and so every step
            bad.append(f"meta.json's std {v} holds {min(v)}: a channel's std must be > 0 (prepare.py writes 1.0 for "
                       f"a channel without variation)")
    checks = [('channels', lambda v: is_int(v) and v >= 1, 'an integer >= 1'),
              ('spatial_dims', lambda v: is_int(v) and v in (2, 3), '2 or 3'),
              ('video', lambda v: isinstance(v, bool), 'true or false'),
              ('name', lambda v: isinstance(v, str), 'a string')]
    bad += [f"meta.json's {key} {_short(meta[key])} is not {rule}" for key, ok, rule in checks
            if key in meta and not ok(meta[key])]
    return bad


def read_meta(data_dir):
    """meta.json of a data folder, its values checked (meta_problems): DataError names each problem."""
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data set in '{data_dir}' (missing meta.json): run 'python prepare.py "
                                f"{_prepare_name(data_dir)}' first (python prepare.py --help lists them)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: a torn or foreign file
        where, fix = _data_set(data_dir)
        raise DataError(f"{where}: meta.json is not valid JSON ({e}). {fix}") from None
    bad = meta_problems(meta)
    if bad:
        where, fix = _data_set(data_dir, meta)
        raise DataError(f"{where}: {'; '.join(bad)}. {fix}")
    return meta


def load_split(data_dir, split):
    """Open one split without reading it: images stay on disk until indexed. Checks the format
    (docs/data_format.md): shapes, dtypes, equal counts, labels that fit meta.json's task (class ids in
    [0, num_classes), 0/1 columns for multilabel), one mean and std per channel."""
    out, meta = {}, read_meta(data_dir)
    for key in ('images', 'labels', 'masks', 'groups', 'sites'):
        path = os.path.join(data_dir, f'{split}_{key}.npy')
        out[key] = np.load(path, mmap_mode='r', allow_pickle=False) if os.path.isfile(path) else None
    if out['images'] is None:
        raise FileNotFoundError(f"'{data_dir}' has no {split}_images.npy: the data set is incomplete, "
                                f"delete the folder and run prepare.py again")
    x, y, n = out['images'], out['labels'], len(out['images'])
    task, k, bad = meta.get('task', 'multiclass'), meta['num_classes'], []
    if x.dtype != np.uint8 or x.ndim not in (4, 5) or n == 0:
        bad.append(f"{split}_images.npy is {x.dtype} {x.shape}, not non-empty uint8 (N, H, W, C) or "
                   f"(N, D, H, W, C)")
    elif x.ndim != meta.get('spatial_dims', 2) + 2:
        bad.append(f"{split}_images.npy has {x.ndim - 2} spatial axes, meta.json's spatial_dims says "
                   f"{meta.get('spatial_dims', 2)}")
    else:
        C, (m, s) = x.shape[-1], (meta['mean'], meta['std'])
        if len(m) != C or len(s) != C:
            bad.append(f"meta.json's mean and std have {len(m)} and {len(s)} values: the images have {C} channels")
        if meta.get('channels', C) != C:
            bad.append(f"meta.json's channels {meta['channels']} but the images have {C}")
    bad += [f"{split}_{key}.npy has {len(a)} rows, images {n}"
            for key, a in out.items() if a is not None and len(a) != n]
    if y is not None:
        shape = (k,) if task == 'multilabel' else ()
        if y.dtype.kind not in 'iu' or y.shape[1:] != shape:
            want = (f"(N, {k}) of 0/1, a column per class" if task == 'multilabel' else
                    "(N,) class ids" if task in CLASS_TASKS else "(N,) integers")
            bad.append(f"{split}_labels.npy is {y.dtype} {y.shape}, not {want} (task '{task}')")
        elif task in CLASS_TASKS + ('multilabel',) and y.size:
            hi, want = (1, '0/1') if task == 'multilabel' else (k - 1, f"classes 0..{k - 1}")
            if y.min() < 0 or y.max() > hi:
                bad.append(f"{split}_labels.npy holds {y.dtype} {y.min()}..{y.max()}, not {want} (task '{task}')")
    if bad:
        where, fix = _data_set(data_dir, meta)
        raise DataError(f"{where} breaks the format of docs/data_format.md: {'; '.join(bad)}. {fix}")
    return out


def to_device(t, device):
    """Host tensor -> device without stopping the CPU: pinned memory makes a CUDA copy asynchronous."""
    return (t.pin_memory() if str(device).startswith('cuda') else t).to(device, non_blocking=True)


def to_float(images_uint8, mean, std, device):
    """(B, H, W, C) uint8 numpy -> (B, C, H, W) float tensor normalised per channel on the device
    (volumes: (B, D, H, W, C) -> (B, C, D, H, W)). uint8 travels (4x fewer bytes than float32), from
    pinned memory and non_blocking: a blocking copy would leave the GPU idle (docs/scaling.md)."""
    a = images_uint8  # a batch gathered by indices is already a private array: no second copy
    own = isinstance(a, np.ndarray) and a.flags.writeable and a.flags.c_contiguous and a.dtype == np.uint8
    x = torch.from_numpy(a if own else np.array(a, dtype=np.uint8, copy=True))  # (a memmap slice: read-only)
    x = to_device(x, device).movedim(-1, 1).float().div_(255)
    shape = (1, -1) + (1,) * (x.ndim - 2)  # broadcast over the spatial axes
    m = torch.tensor(mean).view(shape).to(device, non_blocking=True)
    s = torch.tensor(std).view(shape).to(device, non_blocking=True)
    return (x - m) / s


def open_data(cfg, impl, master, ddp, dev):
    """meta.json and the train / val splits of cfg['data_dir'] as one dict (images: the train images,
    mean / std: their normalisation); data/demo and data/demo3d are generated if missing."""
    name = os.path.basename(os.path.normpath(cfg['data_dir']))
    missing = not os.path.isfile(os.path.join(cfg['data_dir'], 'meta.json'))
    if master and missing and name in ('demo', 'demo3d'):
        import prepare
        print(f"{cfg['data_dir']} is missing: generating the demo data set (python prepare.py {name})")
        prepare.DATASETS[name](cfg['data_dir'])
    if ddp:  # the other ranks wait for it
        barrier(dev)
    meta = read_meta(cfg['data_dir'])
    if name in ('demo', 'demo3d') and meta.get('name') == name:  # on every rank: none waits for a failed one
        import prepare  # made by an older prepare.py: other pictures, maybe other labels; refused, not trained on
        now = {'demo': prepare.DEMO_VERSION, 'demo3d': prepare.DEMO3D_VERSION}[name]
        need(meta.get('generator_version', now) == now,
             f"{cfg['data_dir']} was generated by an older prepare.py (generator version "
             f"{meta.get('generator_version')}, now {now}): delete it (rm -r {cfg['data_dir']}) and run again")
    dims = meta.get('spatial_dims', 2)
    need(dims == impl.SPATIAL_DIMS, f"{cfg['data_dir']} holds {'volumes' if dims == 3 else '2-D images'}: "
         f"train on it with {'medjepa3d.py' if dims == 3 else 'medjepa.py'}")
    train, val = load_split(cfg['data_dir'], 'train'), load_split(cfg['data_dir'], 'val')
    need(len(train['images']) >= cfg['batch_size'],
         f"batch_size={cfg['batch_size']} is larger than the train split ({len(train['images'])} images)")
    out = dict(meta=meta, train=train, val=val, images=train['images'], mean=meta['mean'], std=meta['std'])
    if cfg.get('views_from') == 'group':  # (medjepa.other_photos' lookup table, made once)
        need(train['groups'] is not None, f"views_from='group' needs the groups of the train images, and "
             f"{cfg['data_dir']} has no train_groups.npy: use views_from='image' (two crops of one photo)")
        out['groups'] = np.asarray(train['groups'])
        out['by_group'] = np.argsort(out['groups'], kind='stable')
    return out

# -----------------------------------------------------------------------------
# Checkpoints: one dict, written atomically, read without executing code; one run per out_dir


def _running(pid, start=None):
    """Whether process `pid` of this host is alive (not a zombie) and, where /proc tells (Linux), is the one
    that started at clock tick `start` (so a dead run's pid reused by another process does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    try:
        with open(f'/proc/{pid}/stat') as f:
            state, *rest = f.read().rsplit(')', 1)[1].split()
    except OSError:  # no /proc (macOS): kill() has answered
        return True
    return state != 'Z' and (start is None or int(rest[18]) == start)


def _start_tick(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return int(f.read().rsplit(')', 1)[1].split()[19])
    except OSError:
        return None


def _writer_gone(tmp):
    """Whether the writer of a checkpoint's temporary file (<ckpt>.tmp-<host>-<pid>; <ckpt>.tmp-<pid> from older
    versions) is a dead process of this host; another host's writer cannot be checked from here."""
    host, _, pid = tmp.rpartition('.tmp-')[2].rpartition('-')
    return (pid.isdigit() and host in ('', socket.gethostname())
            and (int(pid) == os.getpid() or not _running(int(pid))))


def save_checkpoint(path, obj):
    """tmp file, fsync, rename; the replaced one stays as ckpt.prev.pt (docs/reliability.md)."""
    for stale in glob.glob(glob.escape(path) + '.tmp-*'):  # left by a writer that was killed (not a live one's)
        if _writer_gone(stale):
            os.remove(stale)
    tmp = f'{path}.tmp-{socket.gethostname()}-{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:  # torch.save reports a failed write as a RuntimeError whose context: OSError
        if os.path.exists(tmp):
            os.remove(tmp)
        if errno.ENOSPC in (getattr(e, 'errno', 0), getattr(e.__context__, 'errno', 0)):
            raise OSError(errno.ENOSPC, f"disk full while writing the checkpoint {path}: free space on that "
                                        f"disk (or set out_dir elsewhere) and resume; the last checkpoint is "
                                        f"intact") from e
        raise
    if os.path.exists(path):
        os.replace(path, os.path.splitext(path)[0] + '.prev.pt')
    os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one


SAFE_TORCH = (2, 10)  # torch.load(weights_only=True) ran code from crafted files before: CVE-2025-32434 (fixed in
# 2.6.0), CVE-2026-24747 (GHSA-63cw-57p8-fm3p, fixed in 2.10.0); requirements.txt and the Makefile ask for it too


def safe_load(path, map_location='cpu'):
    """torch.load(weights_only=True), refused on a torch with a known way around weights_only."""
    version = tuple(int(v) for v in re.match(r'(\d+)\.(\d+)', str(torch.__version__)).groups())
    need(version >= SAFE_TORCH, f"torch {torch.__version__} can run code hidden in a crafted checkpoint even with "
         f"weights_only=True (CVE-2025-32434, CVE-2026-24747): pip install 'torch>={SAFE_TORCH[0]}.{SAFE_TORCH[1]}' to "
         f"load {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint(path, map_location='cpu', spatial_dims=None):
    """The checkpoint dict; with spatial_dims, refuse one written for the other kind of model
    (a 3-D checkpoint's Conv3d weights do not fit a 2-D model, and vice versa)."""
    prev = os.path.splitext(path)[0] + '.prev.pt'
    prev = f"; the previous one is {prev}: mv it to {path} to resume from it" if os.path.isfile(prev) else ''
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' not found: train one with 'python medjepa.py'{prev}")
    try:
        ckpt = safe_load(path, map_location)
    except ConfigError:
        raise
    except Exception as e:
        raise RuntimeError(f"checkpoint '{path}' cannot be read ({type(e).__name__}: {e}); it may be "
                           f"truncated or not a MedJEPA checkpoint{prev}") from e
    if spatial_dims is not None and checkpoint_dims(ckpt) != spatial_dims:
        raise ConfigError(f"checkpoint '{path}' is a {checkpoint_dims(ckpt)}-D model "
                          f"({'medjepa3d.py' if checkpoint_dims(ckpt) == 3 else 'medjepa.py'}); this is the "
                          f"{spatial_dims}-D one: use {'medjepa3d.py' if spatial_dims == 2 else 'medjepa.py'}"
                          f" for it, or another out_dir")
    return ckpt


RUN_FILES = ('ckpt.pt', 'ckpt.prev.pt', 'log.jsonl', 'eval.json', 'eval.md', 'eval.prev.json', 'eval.prev.md',
             'figures')  # what a run (training, then eval.py) writes into its out_dir


def _take_lock(out):
    """Create out/run.lock ({pid, host, start, started}) or say who holds it; a dead run's lock is cleared."""
    path = os.path.join(out, 'run.lock')
    me = dict(pid=os.getpid(), host=socket.gethostname(), start=_start_tick(os.getpid()),
              started=time.strftime('%Y-%m-%d %H:%M:%S'))
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # atomic: one run gets it
        except FileExistsError:
            try:
                with open(path) as f:
                    held = json.load(f)
                pid, host, started = int(held['pid']), str(held['host']), held.get('started', '?')
                if pid <= 0:  # (kill() would ask about a process group)
                    raise ValueError(pid)
            except (OSError, ValueError, KeyError, TypeError):
                raise ConfigError(f"out_dir '{out}': its lock {path} cannot be read: if no run is using this "
                                  f"out_dir, delete it") from None
            who = f"(pid {pid} on {host}, started {started})"
            need(host == socket.gethostname(), f"out_dir '{out}' is in use by a run on another machine {who}: wait "
                 f"for it or use another --out_dir; if that run is dead, delete {path}")
            need(not _running(pid, held.get('start')), f"out_dir '{out}' is in use by a live run {who}: wait for "
                 f"it, stop it, or use another --out_dir")
            print(f"cleared the lock of a run that is gone {who}")
            if os.path.exists(path):
                os.remove(path)
            continue
        with os.fdopen(fd, 'w') as f:
            json.dump(me, f)
        return me
    raise ConfigError(f"out_dir '{out}': could not take its lock {path}")


def _release(out, lock, made):
    """Remove our lock (only ours), and out_dir if this run made it and left it empty (it stopped early)."""
    path = os.path.join(out, 'run.lock')
    try:
        if lock is not None:
            with open(path) as f:
                if json.load(f) == lock:
                    os.remove(path)
    except (OSError, ValueError):
        pass
    if made and os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)


@contextmanager
def claim_out_dir(cfg, rank, ddp, dev):
    """One run per out_dir (docs/reliability.md). Rank 0 takes out_dir/run.lock (a live run's lock stops this
    run; a dead run's is cleared) and refuses init_from='scratch' into an out_dir holding a checkpoint unless
    overwrite=True; if it cannot, every rank stops here, before any work. The lock is released on the way out."""
    out, error, lock, made = cfg['out_dir'], None, None, False
    if rank == 0:
        try:
            made = not os.path.isdir(out)
            os.makedirs(out, exist_ok=True)
            lock = _take_lock(out)
            held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
            need(cfg['init_from'] == 'resume' or cfg.get('overwrite') or not {'ckpt.pt', 'ckpt.prev.pt'} & set(held),
                 f"out_dir '{out}' already holds a run ({', '.join(held)}): continue it with --init_from=resume, train "
                 f"into another --out_dir, or pass --overwrite=True to delete it and start again")
        except (ConfigError, OSError) as e:
            error = e if isinstance(e, ConfigError) else ConfigError(f"out_dir '{out}' cannot be used: {e}")
    if any_rank(error is not None, ddp, dev):  # (every rank takes part: they all stop, or none)
        _release(out, lock, made)
        error = error or ConfigError(f"rank {rank}: stopped: rank 0 could not claim out_dir '{out}' (its message "
                                     f"says why)")
        if ddp:  # each rank says it before any exits: torchrun kills the other ranks once one has exited
            say_error(f'{os.path.basename(sys.argv[0])}: error: {error}')
            error.printed = True
            barrier(dev)
            dist.destroy_process_group()
        raise error
    try:
        yield
    finally:
        _release(out, lock, made)


def _logged_by(line, step):
    """A whole log.jsonl record of a step <= step."""
    try:
        return line.endswith('\n') and json.loads(line).get('iter', 0) <= step
    except (ValueError, AttributeError):
        return False


def open_log(cfg, step=0):
    """Rank 0's log.jsonl, for appending. A scratch run first deletes what an earlier run left in out_dir
    (claim_out_dir let it through: no checkpoint there, or overwrite=True), so that log.jsonl and eval.json
    describe this run alone. A run resumed at `step` first drops the records of later steps (a killed run
    logged them after its last checkpoint; they are about to be run again) and a torn last line, so that
    every step is in the log once."""
    out, old, path = cfg['out_dir'], [], os.path.join(cfg['out_dir'], 'log.jsonl')
    if cfg['init_from'] == 'scratch':
        old = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
        for f in old:
            (shutil.rmtree if os.path.isdir(os.path.join(out, f)) else os.remove)(os.path.join(out, f))
    if old:
        print(f"init_from=scratch: deleted the earlier run's {', '.join(old)} in {out}")
    elif cfg['init_from'] == 'resume' and os.path.isfile(path):
        lines = open(path).read().splitlines(True)
        keep = [line for line in lines if _logged_by(line, step)]
        dropped = len(lines) - len(keep)
        if dropped:
            with open(path + '.tmp', 'w') as f:
                f.writelines(keep)
            os.replace(path + '.tmp', path)  # atomic: a crash here leaves the old log or the new one
            print(f'resume at step {step}: dropped {dropped} log.jsonl record(s) written after that checkpoint')
    return open(path, 'a')


def checkpoint_dims(ckpt):
    return ckpt.get('spatial_dims', 2)  # checkpoints from before medjepa3d.py are all 2-D


def resume(path, cfg, impl, model, optimizer, dev, master):
    """Load model and optimiser from the checkpoint at `path`, refusing one whose model settings
    (impl.MODEL_KEYS) differ from cfg's; returns (iter_num, best_metric)."""
    ckpt = load_checkpoint(path, map_location=dev, spatial_dims=impl.SPATIAL_DIMS)
    changed = [k for k in impl.MODEL_KEYS if ckpt['config'].get(k) != cfg[k]]
    need(not changed, f"cannot resume {path}: model settings differ from the checkpoint's: "
         + ', '.join(f"{k}={cfg[k]!r} (checkpoint: {ckpt['config'].get(k)!r})" for k in changed))
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    if master:
        print(f"resumed from {path} at step {ckpt['iter_num']}")
    return ckpt['iter_num'], ckpt['best_metric']

# -----------------------------------------------------------------------------
# System: DDP, pre-emption signals, precision, torch.compile, the command line


def setup_distributed(cfg):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is a single process.
    Returns (ddp, rank, world, device)."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    dev = cfg['device']
    if dev == 'auto':
        dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
        if dev.startswith('cuda'):
            dev = f'cuda:{local_rank}'
            torch.cuda.set_device(dev)
        dist.init_process_group(backend='nccl' if dev.startswith('cuda') else 'gloo')
        return True, rank, world, dev
    return False, 0, 1, dev


def barrier(dev):
    """Every rank waits here (naming the GPU: NCCL would otherwise guess it from the global rank)."""
    dist.barrier(**({'device_ids': [torch.cuda.current_device()]} if dev.startswith('cuda') else {}))


def any_rank(flag, ddp, dev):
    """True on every rank when `flag` is True on at least one (under DDP), else `flag`."""
    if not ddp:
        return flag
    t = torch.tensor(float(flag), device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is also a sum over ranks (the gradient of y = sum_r x_r
    w.r.t. rank r's x_r, collected from every rank's loss). A plain dist.all_reduce is invisible
    to autograd and loses the other ranks' gradient contributions (a factor of world size)."""
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


def distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_mean(x):
    """Mean over ranks that autograd can see through (identity when not distributed)."""
    return AllReduceSum.apply(x) / dist.get_world_size() if distributed() else x


def fp32(x):
    """x in at least float32: bf16/fp16 (autocast outputs) are upcast, float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@contextmanager
def stop_signals():
    """Pre-emption (SIGTERM from a scheduler, SIGUSR1 as a warning): the handlers only append the signal
    to the list this yields, so the loop can finish its step, save and exit. The old handlers are
    restored on the way out: train() may run inside a bigger program."""
    stop = []
    old = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
           for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield stop
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def resolve_dtype(dtype, dev):
    """'auto' -> bf16 on GPUs that have it; on a CPU only if its bf16 matmuls are clearly faster
    (AMX / AVX512-BF16 CPUs: 1.35x for ViT-Tiny at 224 px; elsewhere bf16 is slower). A CPU without bf16
    units emulates it ~15-150x slower than float32 (2048^2 GEMMs: minutes), so a 256^2 probe rules it out first.
    On a CPU both dtypes are timed on one thread, in 3 rounds taken in turn, each keeping its best: with
    another process on the cores (a second run, a test) a multi-threaded product stalls at random and
    could flip the choice; one thread's best round measures the core, not the load."""
    def rates(n, s):  # (bf16, float32) FLOP/s of one thread
        bf = fp = 0.0
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(3):
                bf = max(bf, measure_matmul_flops(dev, torch.bfloat16, n=n, seconds=s))
                fp = max(fp, measure_matmul_flops(dev, torch.float32, n=n, seconds=s))
        finally:
            torch.set_num_threads(threads)
        return bf, fp
    if dtype == 'bfloat16' and dev == 'cpu':  # asked for: kept, but said when this CPU emulates it
        bf, fp = rates(256, 0.05)
        if bf < 0.5 * fp:
            print(f"warning: this CPU has no bf16 units: bfloat16 matmuls run {fp / bf:.0f}x slower than float32 "
                  f"({bf / 1e9:.1f} vs {fp / 1e9:.1f} GFLOP/s); --dtype=float32 (or auto) trains faster")
    if dtype != 'auto':
        return dtype
    if dev == 'cpu':
        bf, fp = rates(256, 0.05)
        if bf < 0.5 * fp:
            return 'float32'  # emulated bf16: never time it at 2048^2
        bf, fp = rates(2048, 0.1)
        return 'bfloat16' if bf > 1.5 * fp else 'float32'
    return 'bfloat16' if dev.startswith('cuda') and torch.cuda.is_bf16_supported() else 'float32'


def precision(dtype, dev):
    """(dtype name with 'auto' resolved, torch dtype, autocast context); TF32 matmuls on GPUs."""
    dtype = resolve_dtype(dtype, dev)
    if dev.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    pt = getattr(torch, dtype)
    return dtype, pt, nullcontext() if dtype == 'float32' else torch.autocast(dev.split(':')[0], dtype=pt)


def compile_model(model, dynamic=False):
    """torch.compile the encoder and predictor / projector in place (state_dict keys unchanged); SIGReg
    stays eager (its seeded torch.Generator would split the graph). dynamic=False: one graph per target
    block size, a few per grid; medjepa3d.py passes None, its context length varies (docs/scaling.md)."""
    # dynamo traces through sincos_2d's lru_cache (and warns): safe, the codes depend on the grid alone
    warnings.filterwarnings('ignore', message='Dynamo detected a call to a `functools.lru_cache`')
    for part in (model.encoder, getattr(model, 'predictor', None) or model.projector):
        part.compile(dynamic=dynamic)
    return model


def wrap_model(model, cfg, impl, dev, ddp, master):
    """SyncBatchNorm, torch.compile and DDP as configured: returns (model to train, raw_model), raw_model
    being the unwrapped one that is saved and monitored."""
    raw_model = model
    if ddp and cfg.get('objective') == 'views':  # the projector's BatchNorm over all ranks (torch: GPUs only)
        if dev.startswith('cuda'):
            model = raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif master:
            print("note: on CPU the projector BatchNorm normalises each rank's shard on its own "
                  "(no SyncBatchNorm)")
    if cfg['compile']:
        compile_model(raw_model, impl.COMPILE_DYNAMIC)
    if ddp:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev] if dev.startswith('cuda') else None)
    return model, raw_model


def say_error(line):
    """One line on stderr in ONE write: ranks of a torchrun job share the pipe, and print() may split a
    line into several writes that interleave with another rank's (pipe writes up to 4 KB are atomic)."""
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), (line + '\n').encode())
    except (AttributeError, OSError, ValueError):  # stderr is not a file (captured, redirected in-process)
        print(line, file=sys.stderr, flush=True)


def cli(main, impl):
    """The command line: wrong settings, missing data or a missing checkpoint found once training has
    started are one line on stderr and exit code 2, not a traceback (main() itself raises them)."""
    try:
        main(impl=impl)
    except (ConfigError, FileNotFoundError) as e:
        if not getattr(e, 'printed', False):  # (claim_out_dir prints its own under torchrun)
            say_error(f'{os.path.basename(impl.__file__)}: error: {e}')
        sys.exit(2)

# -----------------------------------------------------------------------------
# Gradient accumulation that equals one big batch, SIGReg included (docs/scaling.md)


def exact_sigreg_grads(raw, batches, step, autocast, accum):
    """Accumulation that equals one big batch, SIGReg included (GradCache's idea; docs/scaling.md).
    SIGReg is a statistic of the whole batch, not a sum over images. So: encode every micro-batch's
    context without a graph, score SIGReg on all of them at once, and return its gradient G_i w.r.t.
    each image's SIGReg input r_i (times lambda * accum), per micro-batch and mask set, with SIGReg's
    value; each micro-step then adds <r_i, G_i> to its loss, whose gradient is the big batch's. The
    pooled invariance (inv_weight > 0) standardises over the batch too: its gradient w.r.t. each
    image's pooled context (times (1 - lambda) * inv_weight * accum) comes last in each micro-batch's
    list, and its value third in the returned tuple (None without it)."""
    c = raw.cfg
    with torch.no_grad(), autocast:
        r = [raw.sigreg_inputs(b) for b in batches]  # [micro][mask set (+ pooled context, pooled targets)]
    S = len(raw.mask_sets(batches[0]))
    R = [fp32(torch.cat(rs)).requires_grad_(i <= S) for i, rs in enumerate(zip(*r))]  # whole batch each
    with torch.enable_grad():
        regs = [raw.sigreg_loss(Rs, step) for Rs in R[:S]]
        total = sum(regs) * c['sigreg_lambda'] * accum
        inv = raw.pooled_invariance(R[S], R[S + 1]) if len(R) > S else None
        if inv is not None:
            total = total + inv * (1 - c['sigreg_lambda']) * c['inv_weight'] * accum
        G = torch.autograd.grad(total, R[:S + 1])  # (not the pooled targets: no gradient)
    G = [g.split([len(x) for x in rs]) for g, rs in zip(G, zip(*r))]  # [term][micro]
    inv = None if inv is None else inv.detach()
    return [list(gm) for gm in zip(*G)], (sum(regs) / len(regs)).detach(), inv


# -----------------------------------------------------------------------------
# Measurements: FLOPs and MFU, frozen features, kNN accuracy (DINO protocol), collapse statistics


def transformer_flops(T, D, n_layer, mlp_ratio=4.0):
    """Matmul FLOPs of a forward pass of n_layer blocks over T tokens of width D."""
    return n_layer * (2 * T * D * D * (4 + 2 * mlp_ratio) + 4 * T * T * D)


def estimate_flops(model, batch):
    """Matmul FLOPs of one training micro-step of a JEPA on `batch`, the numerator of MFU (a backward pass
    costs 2 forward passes). 'mask': a forward pass over all N patches for the targets, then per mask set
    (model.mask_sets) forward + backward of the encoder on the context and of the predictor on context +
    mask tokens, and the patch embedding. 'views': forward + backward of the encoder on every view."""
    c, D, L = model.cfg, model.cfg['n_embd'], model.cfg['n_layer']
    if c['objective'] == 'views':
        g, loc, p = batch['globals'], batch['locals'], c['patch_size']
        Tg = batch['keep'].shape[1] if 'keep' in batch else (g.shape[-1] // p) ** 2  # tokens per global view
        return 3 * g.shape[1] * (g.shape[0] * transformer_flops(Tg, D, L)
                                 + loc.shape[0] * transformer_flops((loc.shape[-1] // p) ** 2, D, L))
    x = batch['x']
    N, patch = math.prod(model.encoder.grid(x)), math.prod(model.encoder.patch_embed.proj.kernel_size)
    per_set = lambda Nc, MK: (3 * transformer_flops(Nc, D, L) + 4 * N * D * x.shape[1] * patch
                              + 3 * transformer_flops(Nc + MK, c['pred_n_embd'], c['pred_n_layer']))
    return x.shape[0] * (transformer_flops(N, D, L) * (2 if 'x_p' in batch else 1)  # (+ the second view's targets)
                         + sum(per_set(ctx.shape[1], tgt[0].numel()) for ctx, tgt in model.mask_sets(batch)))


def gemm_rate(device, dtype, n, seconds):
    """FLOP/s of n x n products in this dtype, from the fastest product timed within `seconds` (at least
    one) after one warm-up: the device's speed, not the load on it, which only slows a product down."""
    sync = torch.cuda.synchronize if str(device).startswith('cuda') else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)  # (not the global stream: the run re-times mid-training)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    a @ b
    sync()
    t0, best = time.perf_counter(), float('inf')
    while True:
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - t0 >= seconds:
            return 2 * n ** 3 / best


def measure_matmul_flops(device, dtype, n=2048, seconds=0.5):
    """Dense GEMM throughput of this device in this dtype, measured now: the denominator of MFU. n is
    halved (down to 256) while a 256^2 probe predicts over 2 s for one product: a CPU that emulates bf16
    would otherwise spend minutes on the two 2048^2 products."""
    if n > 256:
        probe = gemm_rate(device, dtype, 256, 0.02)
        while n > 256 and 2 * n ** 3 / probe > 2.0:
            n //= 2
    return gemm_rate(device, dtype, n, seconds)


@torch.no_grad()
def extract_features(encoder, images, mean, std, device='cpu', batch_size=256):
    """Frozen features: mean of the encoder's output tokens, (N, D) float32 numpy."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size], mean, std, device)
        out.append(encoder(x).mean(1).float().cpu())
    encoder.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, encoder.norm.normalized_shape[0]), np.float32)


@torch.no_grad()
def knn_predict(train_feats, train_labels, query_feats, num_classes, k=20, T=0.07, chunk=1024):
    """DINO kNN: cosine similarity on L2-normalised features; the k nearest training images vote
    for their class with weight exp(sim / T). Returns class scores (Nq, num_classes); argmax = label."""
    tr = F.normalize(torch.as_tensor(np.asarray(train_feats), dtype=torch.float32), dim=1)
    lab = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    q_all = F.normalize(torch.as_tensor(np.asarray(query_feats), dtype=torch.float32), dim=1)
    k = min(k, len(tr))
    scores = torch.zeros(len(q_all), num_classes)
    for i in range(0, len(q_all), chunk):
        sim, idx = (q_all[i:i + chunk] @ tr.T).topk(k, dim=1)  # (q, k)
        scores[i:i + chunk].scatter_add_(1, lab[idx], (sim / T).exp())
    return scores.numpy()


def mean_cosine(f):
    """Mean cosine similarity over all pairs of distinct rows of f (N, D): 1 when every image maps to
    the same direction, ~0 when the features spread around the origin. sum_ij <u_i, u_j> = |sum_i u_i|^2."""
    u = F.normalize(torch.as_tensor(f, dtype=torch.float64), dim=1)
    n, s = len(u), u.sum(0)
    return float((s @ s - n) / max(n * (n - 1), 1))


def effective_rank(z):
    """RankMe: exp(entropy of the normalised singular values); ~1 when collapsed, up to min(N, D)."""
    s = torch.linalg.svdvals(z.float() - z.float().mean(0))
    p = s / s.sum().clamp_min(1e-12) + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))

# -----------------------------------------------------------------------------
# Training loop: the periodic evaluation and checkpoint, the log line


def advice(cfg):
    return (f"Lower learning_rate (now {cfg['learning_rate']}) or use dtype=float32, then resume from "
            f"the last checkpoint")


@torch.no_grad()
def feature_health(model, feats, step):
    """Monitors of the val features (N, D) -- a collapsed encoder predicts perfectly, so the loss cannot
    show collapse; these can: effective rank, mean pairwise cosine, and SIGReg of the tensor the loss
    tests beside the same test on a Gaussian batch of that shape (~1.06; collapsed: ~0.40 N)."""
    f = torch.as_tensor(feats, dtype=torch.float32)
    out = dict(erank_val=effective_rank(f), cos_val=mean_cosine(f))
    reg_in = model.sigreg_probe(f)
    if reg_in is not None:
        gen = torch.Generator().manual_seed(step)
        out['sigreg_val'] = float(model.sigreg_loss(reg_in, step, local=True))
        gauss = torch.randn(reg_in.shape, generator=gen)
        out['sigreg_gauss'] = float(model.sigreg_loss(gauss, step, local=True))  # the same test
    return out


def evaluate_and_save(cfg, impl, raw_model, optimizer, data, step, best_knn, log, dev, autocast, knn=True):
    """Rank 0: the online kNN on val (labelled data sets) and impl.feature_health's monitors, then a
    checkpoint (never NaN/inf weights over the last good one). Returns the best online kNN so far."""
    if knn and data['meta'].get('task') == 'multiclass':
        try:  # a monitor that cannot run (labels it cannot use, say) never costs the run: say why, then save
            (x_tr, y_tr), (x_va, y_va) = [(data[s]['images'], data[s]['labels']) for s in ('train', 'val')]
            if y_tr is None or y_va is None or y_tr.ndim != 1 or y_va.ndim != 1:
                raise ValueError('it needs one class label per train and val image')
            idx = np.sort(np.random.default_rng(cfg['seed']).permutation(len(x_tr))[:cfg['knn_train_size']])
            features = lambda x: impl.extract_features(raw_model.encoder, x, data['mean'], data['std'], dev)
            # features under the training step's autocast, as eval.py extracts them (~2x faster on CPU than fp32)
            with torch.compiler.set_stance('force_eager') if cfg['compile'] else nullcontext(), autocast:  # no graphs
                f_tr, f_va = features(x_tr[idx]), features(x_va)
            scores = knn_predict(f_tr, y_tr[idx], f_va, data['meta']['num_classes'])
            acc = float((scores.argmax(1) == y_va).mean())
            health = impl.feature_health(raw_model, f_va, step)
        except Exception as e:
            print(f'step {step}: online kNN skipped, the checkpoint is saved all the same '
                  f'({type(e).__name__}: {e})')
        else:
            best_knn = max(best_knn, acc)
            reg = (f', SIGReg {health["sigreg_val"]:.2f} (Gaussian batch {health["sigreg_gauss"]:.2f})'
                   if 'sigreg_val' in health else '')
            print(f'step {step}: online kNN val accuracy {acc:.4f} | val features: erank '
                  f'{health["erank_val"]:.1f}, mean cos {health["cos_val"]:.3f}{reg}')
            print(json.dumps(dict(iter=step, knn_val=acc, **health)), file=log, flush=True)
    path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    if not all(v.isfinite().all() for v in raw_model.state_dict().values() if v.is_floating_point()):
        raise FloatingPointError(f"the weights hold NaN/inf at step {step}: not saving them over {path}. "
                                 + advice(cfg))
    model_args = {k: cfg[k] for k in impl.MODEL_KEYS}
    save_checkpoint(path, dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), iter_num=step,
                               best_metric=best_knn, config=cfg, model_args=model_args,
                               spatial_dims=impl.SPATIAL_DIMS))
    return best_knn


class Prefetcher:
    """make(step, micro) -> batch, one call ahead in a background thread: while a micro-step computes, the
    next batch is read from the memory map, copied and augmented, so the step does not wait for data
    (on a GPU the host work overlaps the kernels). Batches depend on (step, micro) alone, so order and
    results are those of calling make() directly: resume stays bit-identical."""
    def __init__(self, make, accum):
        self.make, self.accum, self.ahead = make, accum, None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix='batches')

    def __call__(self, step, micro):
        key = (step, micro)
        now = self.ahead[1] if self.ahead and self.ahead[0] == key else self.pool.submit(self.make, *key)
        nxt = (step, micro + 1) if micro + 1 < self.accum else (step + 1, 0)
        self.ahead = (nxt, self.pool.submit(self.make, *nxt))  # queued behind `now` (one worker)
        return now.result()  # (re-raises the worker's exception)

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def partners_per_image(cfg):
    """views_from='group': the other photos each image needs, the global views after the first ('views')
    or inv_weight's one second view ('mask')."""
    return cfg['n_global_views'] - 1 if cfg.get('objective', 'mask') == 'views' else 1


def describe_run(cfg, data, raw_model, dev, dtype, world):
    """The first lines of a run (data, model size, objective, device, batch); returns the measured matmul
    throughput that MFU is computed against."""
    accum, images = cfg['gradient_accumulation_steps'], data['images']
    print(f"{data['meta'].get('name', cfg['data_dir'])}: {len(images)} train images "
          f"{tuple(images.shape[1:])}; model {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M "
          f"params; objective={cfg.get('objective', 'mask')}; device={dev} dtype={dtype} world={world} "
          f"batch={cfg['batch_size']}x{accum}x{world}")
    if 'groups' in data:  # views_from='group': say how many images have other photos to pair with
        count, k = np.unique(data['groups'], return_counts=True)[1], partners_per_image(cfg)
        print(f"views_from='group': {int(count[count > 1].sum())} of {len(images)} train images have another "
              f"image of their group ({int((count > 1).sum())} of {len(count)} groups); the others pair with themselves")
        if k > 1:
            print(f"  {int(count[count > k].sum())} of them have the {k} others that {k + 1} global views from "
                  f"distinct photos need; the rest repeat a photo")
    peak = measure_matmul_flops(dev, getattr(torch, dtype))
    print(f'measured {dtype} matmul throughput (MFU denominator): {peak / 1e9:.0f} GFLOP/s')
    return peak


def retime_matmul_flops(peak, dev, dtype):
    """The MFU denominator timed again while the run pauses for its monitors; the faster timing is kept.
    A start-up timing that shared the cores with another job reads low and lifts every MFU after it
    (a run started beside a test logged 112 %)."""
    now = measure_matmul_flops(dev, getattr(torch, dtype))
    if now > 1.1 * peak:
        print(f'measured {dtype} matmul throughput again: {now / 1e9:.0f} GFLOP/s (at start-up '
              f'{peak / 1e9:.0f}: the device was busy); the MFU uses it from here')
    return max(peak, now)


class BadSteps:
    """Steps whose update was skipped (non-finite gradients), counted without a host sync per step:
    add() sums device tensors, check() reads them on log steps, prints what was skipped since the last
    one and raises FloatingPointError once max_bad_steps came in a row (training diverged)."""
    def __init__(self, cfg, master):
        self.cfg, self.master, self.run, self.worst, self.sum, self.n = cfg, master, 0, 0, 0, 0

    def add(self, skipped):  # skipped: a bool tensor of this step
        self.run = (self.run + 1) * skipped  # in a row (0 after a good step)
        self.worst, self.sum = self.run.clamp(min=self.worst), self.sum + skipped

    def check(self, step):
        run, worst, total = int(self.run), int(self.worst), int(self.sum)
        if self.master and total > self.n:
            print(f'step {step}: non-finite loss or gradients, {total - self.n} update(s) skipped since the '
                  f'last log line ({run} in a row, {total} in all)')
        self.worst, self.n = run, total
        if worst >= self.cfg['max_bad_steps']:
            raise FloatingPointError(f"{worst} non-finite steps in a row by step {step}: training diverged. "
                                     f"{advice(self.cfg)}")


def log_step(log, step, loss, stats, lr, img_per_s, data_frac, mfu, n_bad):
    """Print one log line and append its record to log.jsonl: the loss terms, the throughput and the
    collapse monitors of this step's pooled embeddings (emb_std near 0 or a low erank: collapse)."""
    emb = stats['emb']
    inv = stats['inv'].item() if 'inv' in stats else None  # ('mask' with inv_weight > 0)
    rec = dict(iter=step, loss=loss.item(), pred=stats['pred'].item(), sigreg=stats['sigreg'].item(), lr=lr,
               img_per_s=img_per_s, data_frac=data_frac, mfu=mfu,
               emb_std=float(F.normalize(emb.float(), dim=1).std(0).mean()),
               erank=effective_rank(emb) if torch.isfinite(emb).all() else math.nan, skipped=n_bad,
               time=time.time(), **({} if inv is None else {'inv': inv}))
    print(f"step {step}: loss {rec['loss']:.4f} (pred {rec['pred']:.4f}{'' if inv is None else f', inv {inv:.4f}'}, "
          f"sigreg {rec['sigreg']:.3f}) "
          f"lr {lr:.2e} | {img_per_s:.0f} img/s, mfu {100 * mfu:.1f}% | "
          f"emb std {rec['emb_std']:.3f} erank {rec['erank']:.1f}")
    print(json.dumps(rec), file=log, flush=True)
