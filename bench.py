"""
bench.py: how fast is a MedJEPA training step, and how close is it to what the hardware can do?

    python bench.py                                  # the demo model (preset 'tiny', 64 px) on this machine
    python bench.py --preset=ref                     # ViT-Tiny/16 + 6x384 predictor, 224 px, batch 16
    python bench.py --preset=vits16 --dtype=float32  # ViT-S/16 at 224 px; any medjepa.py key can be overridden
    python bench.py --preset=vitb16 --batch_size=256 --compile=True   # ViT-B/16 on one GPU
    python bench.py config/vit_tiny_224.py --bench_data=real          # a training config, real data only

It times medjepa.train_step (the code medjepa.py trains with) on synthetic batches held on the device
(random pixels, with the same crops and masks as the real step, so the same work) and on the real data
path (memory-mapped data_dir + make_batch, as in training), then breaks one
step into data / forward / backward / optimiser (with a device sync between phases), times the input
pipeline alone, and prints images/s, MFU and peak memory. MFU = model FLOPs per second / peak:
on a GPU the peak is the device's dense bf16 datasheet number; on a CPU it is the matmul
throughput this run measures itself (2048^2 GEMMs in the training dtype, right after each timed step:
MFU is the median of the per-step ratios, so a shared machine's drifting speed cancels out),
because CPUs have no honest datasheet number. With --compile=True the same model also runs
uncompiled, each step in turn with the compiled one, and the speed-up is printed. The last line
printed is one JSON object: the config, images/s, breakdown, MFU, peak memory.

Numbers depend on everything else the machine is doing: run it on a quiet machine. Measured
numbers, their conditions and the open questions: docs/scaling.md.
"""

import copy
import json
import os
import resource
import sys
import time

import numpy as np
import torch

import medjepa as mj

# -----------------------------------------------------------------------------
# bench.py's own keys; every medjepa.py key (model, batch_size, dtype, compile, device, ...) works too
preset = 'tiny'        # starting model size: 'tiny' (medjepa.py's demo defaults), 'ref', 'vits16', 'vitb16'
bench_warmup = 3       # untimed steps first (allocator, caches, torch.compile)
bench_iters = 10       # timed optimiser steps per data source
breakdown_iters = 3    # steps timed phase by phase (device sync between phases)
bench_data = 'both'    # 'synthetic', 'real' (data_dir, as in training) or 'both' (real only if data_dir exists)
loader_iters = 10      # batches for the input-pipeline benchmark (0 skips it)
# -----------------------------------------------------------------------------
BENCH_DEFAULTS = dict(preset=preset, bench_warmup=bench_warmup, bench_iters=bench_iters,
                      breakdown_iters=breakdown_iters, bench_data=bench_data, loader_iters=loader_iters)

# Model sizes at 224 px with 16 px patches (14 x 14 = 196 patches); the predictor stays 6 x 384 as
# in I-JEPA's ViT-B/L recipes. 'ref' is the size an earlier MedJEPA implementation was timed at
# (about 6.2 img/s on 2 CPU cores; docs/scaling.md compares).
PRESETS = {
    'tiny': {},
    'ref': dict(image_size=224, patch_size=16, n_embd=192, n_layer=12, n_head=3,
                pred_n_embd=384, pred_n_layer=6, pred_n_head=6, batch_size=16, local_size=96),
    'vits16': dict(image_size=224, patch_size=16, n_embd=384, n_layer=12, n_head=6,
                   pred_n_embd=384, pred_n_layer=6, pred_n_head=6, batch_size=32, local_size=96),
    'vitb16': dict(image_size=224, patch_size=16, n_embd=768, n_layer=12, n_head=12,
                   pred_n_embd=384, pred_n_layer=6, pred_n_head=6, batch_size=64, local_size=96),
}

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s, without sparsity): nanoGPT's habit.
GPU_BF16_PEAK = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12, 'L4': 121e12, 'A10': 125e12,
                 'RTX 4090': 165e12, 'RTX 3090': 71e12}


def get_config(argv):
    """Preset values replace medjepa.py's defaults; then config files and --key=value, as in medjepa.py."""
    defaults = dict(mj.DEFAULTS, **BENCH_DEFAULTS)
    name = mj.configure([a for a in argv if a.startswith('--preset=')], defaults)['preset']
    if name not in PRESETS:
        raise mj.ConfigError(f"preset '{name}' is not one of {', '.join(PRESETS)}")
    defaults.update(PRESETS[name])
    cfg = mj.validate(mj.configure(argv, defaults))
    if cfg['bench_data'] not in ('synthetic', 'real', 'both'):
        raise mj.ConfigError(f"bench_data must be 'synthetic', 'real' or 'both', got '{cfg['bench_data']}'")
    for k in ('bench_iters', 'breakdown_iters'):
        if cfg[k] < 1:
            raise mj.ConfigError(f'{k}={cfg[k]} must be at least 1')
    return cfg


def datasheet_peak(dev):
    """Dense bf16 peak FLOP/s of a known GPU, else None."""
    if dev.startswith('cuda'):
        name = torch.cuda.get_device_name(dev)
        for key, flops in GPU_BF16_PEAK.items():
            if key in name:
                return flops, f'{name} datasheet dense bf16'
    return None


def main(argv):
    cfg = get_config(argv)
    dev = cfg['device'] if cfg['device'] != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')
    if cfg['num_threads'] > 0:
        torch.set_num_threads(cfg['num_threads'])
    have_data = os.path.isfile(os.path.join(cfg['data_dir'], 'meta.json'))
    if cfg['bench_data'] == 'real' and not have_data:
        raise FileNotFoundError(f"bench_data='real' but '{cfg['data_dir']}' has no data set: make one with e.g. 'python "
                                f"prepare.py demo --size={cfg['image_size']} --out={cfg['data_dir']}'")
    dtype, ptdtype, autocast = mj.precision(cfg['dtype'], dev)
    cuda = dev.startswith('cuda')
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    cuda_mallocs = (lambda: torch.cuda.memory_stats(dev).get('num_device_alloc', 0)) if cuda else (lambda: 0)
    accum = cfg['gradient_accumulation_steps']  # one process: all micro-steps are ours

    # data: the real training path if data_dir exists, and a synthetic batch made the same way
    if have_data:
        meta = mj.read_meta(cfg['data_dir'])
        images, (mean, std) = mj.load_split(cfg['data_dir'], 'train')['images'], (meta['mean'], meta['std'])
    else:
        images, (mean, std) = None, ([0.5] * 3, [0.25] * 3)
    in_chans = images.shape[-1] if images is not None else 3
    B = cfg['batch_size']

    def real_batch(step, micro):
        idx = np.sort(mj.batch_indices(step, micro, len(images), B, 1, 0, accum, cfg['seed']))
        return mj.make_batch(cfg, images[idx], mean, std, step, micro, dev)
    # synthetic: fixed random pixels with the real step's crops and masks, made before timing and held on the
    # device. The masks set the work (the target block size, drawn per step, sets the predictor's length),
    # so synthetic and real steps do the same FLOPs and differ only by the data path.
    fake = np.random.default_rng(0).integers(0, 256, (B, cfg['image_size'], cfg['image_size'], in_chans), dtype=np.uint8)
    n_steps = cfg['bench_warmup'] + cfg['bench_iters'] + cfg['breakdown_iters']
    premade = {(i, m): mj.make_batch(cfg, fake, mean, std, i, m, dev) for i in range(n_steps) for m in range(accum)}
    sources = {'synthetic': lambda step, micro: premade[(step, micro)]}
    if have_data and cfg['bench_data'] != 'synthetic':
        sources['real'] = mj.Prefetcher(real_batch, accum)  # as in training: the next batch made in the background
    if cfg['bench_data'] == 'real':
        del sources['synthetic']

    torch.manual_seed(cfg['seed'])
    model = mj.build_model(cfg, in_chans).to(dev)
    optimizer = mj.make_optimizer(model, cfg, dev)
    scaler = torch.amp.GradScaler(enabled=(dtype == 'float16'))
    runs = {name: (model, optimizer, scaler, get) for name, get in sources.items()}
    if cfg['compile']:  # the same model uncompiled, timed step by step in turn with it: a ratio both saw alike
        eager = copy.deepcopy(model)
        first = next(iter(sources))
        runs[f'{first}, eager'] = (eager, mj.make_optimizer(eager, cfg, dev), torch.amp.GradScaler(enabled=(dtype == 'float16')),
                                   sources[first])
        from torch._dynamo.utils import counters
        counters.clear()  # count this run's graphs and graph breaks only
        mj.compile_model(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"bench: preset={cfg['preset']} {n_params / 1e6:.1f}M params, {cfg['image_size']} px, patch {cfg['patch_size']}, "
          f"encoder {cfg['n_layer']}x{cfg['n_embd']}, predictor {cfg['pred_n_layer']}x{cfg['pred_n_embd']}, "
          f"objective={cfg['objective']}, batch {B}x{accum}, device={dev} dtype={dtype} compile={cfg['compile']} "
          f"threads={torch.get_num_threads()}")
    if images is not None and images.shape[1] != cfg['image_size']:
        print(f"note: {cfg['data_dir']} holds {images.shape[1]} px images; crops are resized to {cfg['image_size']} px")
    gemm = [mj.measure_matmul_flops(dev, ptdtype)]  # this device's GEMM rate in the training dtype, now
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    # 1) throughput of the training step itself (medjepa.train_step), per data source. Without a datasheet
    # peak (CPUs), each timed step is followed by a GEMM measurement: a shared machine's speed drifts by 2x
    # within minutes, so MFU is each step's FLOP/s over the GEMM rate of that moment (median over steps).
    sheet = datasheet_peak(dev)
    timed = {name: dict(times=[], flops=0, mfu=[]) for name in runs}
    for i in range(cfg['bench_warmup'] + cfg['bench_iters']):
        if i == cfg['bench_warmup']:
            mallocs = cuda_mallocs()
        for name, (m, opt, sc, get) in runs.items():  # every run takes step i in turn (the same batches)
            sync()
            t = time.perf_counter()
            loss, _, f = mj.train_step(m, opt, sc, lambda micro: get(i, micro), accum, i, autocast, cfg['grad_clip'])
            sync()
            dt = time.perf_counter() - t
            if not torch.isfinite(loss):
                raise FloatingPointError(f'loss is {loss.item()} in the benchmark: the configuration does not train')
            if i >= cfg['bench_warmup']:
                r = timed[name]
                r['times'].append(dt)
                r['flops'] += f
                if sheet is None:
                    gemm.append(mj.measure_matmul_flops(dev, ptdtype, seconds=0.2))
                    r['mfu'].append(f / dt / gemm[-1])
    step = cfg['bench_warmup'] + cfg['bench_iters']
    results = {}
    for name, r in timed.items():
        dt = sum(r['times'])
        results[name] = dict(img_per_s=cfg['bench_iters'] * B * accum / dt, step_ms=1e3 * dt / cfg['bench_iters'],
                             tflops=r['flops'] / dt / 1e12,
                             mfu=float(np.median(r['mfu'])) if sheet is None else r['flops'] / dt / sheet[0])
    mallocs = cuda_mallocs() - mallocs if cuda else None  # new device memory while timed (0 once warm; else shapes change)
    gemm.append(mj.measure_matmul_flops(dev, ptdtype))
    peak, peak_src = sheet or (float(np.median(gemm)), f'{dtype} GEMM measured after each timed step, per-step ratio')

    # 2) one step phase by phase: data, forward, backward, optimiser
    get = sources.get('real', sources.get('synthetic'))
    phases = dict(data=0.0, forward=0.0, backward=0.0, optimizer=0.0)
    for _ in range(cfg['breakdown_iters']):
        sync()
        for micro in range(accum):
            t = time.perf_counter()
            batch = get(step, micro)
            sync()
            t1 = time.perf_counter()
            with autocast:
                loss, _ = model(batch, step)
            sync()
            t2 = time.perf_counter()
            scaler.scale(loss / accum).backward()
            sync()
            t3 = time.perf_counter()
            phases['data'] += t1 - t
            phases['forward'] += t2 - t1
            phases['backward'] += t3 - t2
        t = time.perf_counter()
        if cfg['grad_clip'] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync()
        phases['optimizer'] += time.perf_counter() - t
        step += 1
    breakdown_ms = {k: 1e3 * v / cfg['breakdown_iters'] for k, v in phases.items()}
    total = sum(breakdown_ms.values())

    # 3) the input pipeline alone: read from the memmap, copy, augment and mask on the device
    loader = None
    if 'real' in sources and cfg['loader_iters'] > 0:
        t_read = t_all = 0.0
        for i in range(cfg['loader_iters']):
            t = time.perf_counter()
            idx = np.sort(mj.batch_indices(10_000 + i, 0, len(images), B, 1, 0, 1, cfg['seed']))
            raw = images[idx]
            t_read += time.perf_counter() - t
            mj.make_batch(cfg, raw, mean, std, i, 0, dev)
            sync()
            t_all += time.perf_counter() - t
        loader = dict(img_per_s=cfg['loader_iters'] * B / t_all, read_frac=t_read / t_all)

    compiled = None
    if cfg['compile']:  # did torch.compile really compile? graphs made, and where Python fell back to eager
        compiled = dict(graphs=counters['stats']['unique_graphs'], graph_breaks=sum(counters['graph_break'].values()),
                        break_reasons=[r.splitlines()[0] for r in sorted(counters['graph_break'], key=counters['graph_break'].get)[-3:]])
    if cuda:
        mem = dict(peak_mem_gb=torch.cuda.max_memory_allocated(dev) / 1e9, mem_kind='cuda max_memory_allocated')
    else:  # the whole process's high-water mark (Linux reports KiB), mapped data pages included
        mem = dict(peak_mem_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, mem_kind='process peak RSS')

    # report
    print(f"peak for MFU: {peak / 1e12:.3f} TFLOP/s ({peak_src}; {dtype} GEMM here: "
          + f'{min(gemm) / 1e12:.3f} to {max(gemm) / 1e12:.3f} TFLOP/s over {len(gemm)} readings)')
    for name, r in results.items():
        print(f"{name:>16}: {r['img_per_s']:8.1f} img/s  {r['step_ms']:8.1f} ms/step  "
              f"{r['tflops']:.3f} TFLOP/s  MFU {100 * r['mfu']:.1f}%")
    if cuda:
        print(f"{mallocs} cudaMalloc calls while timed")
    if cfg['compile']:
        first = next(iter(sources))
        print(f"torch.compile: {results[first]['img_per_s'] / results[first + ', eager']['img_per_s']:.2f}x the eager "
              f"speed on the {first} batch (timed in turn, step by step)")
    print(f"breakdown ({'real' if 'real' in sources else 'synthetic'} data, synced, {total:.1f} ms/step): "
          + '  '.join(f'{k} {v:.1f} ms ({100 * v / total:.0f}%)' for k, v in breakdown_ms.items()))
    if loader:
        need = max(r['img_per_s'] for r in results.values())
        print(f"input pipeline alone: {loader['img_per_s']:.0f} img/s ({loader['img_per_s'] / need:.1f}x what the "
              f"step consumes; {100 * loader['read_frac']:.0f}% of it reading the memmap)")
    print(f"peak memory: {mem['peak_mem_gb']:.2f} GB ({mem['mem_kind']})")
    if compiled:
        print(f"torch.compile: {compiled['graphs']} graphs, {compiled['graph_breaks']} graph breaks "
              + ' | '.join(compiled['break_reasons']))
    out = dict(config=cfg, device=dev, dtype=dtype, torch=torch.__version__, threads=torch.get_num_threads(),
               params_m=n_params / 1e6, peak_tflops=peak / 1e12, peak_source=peak_src,
               gemm_tflops=[g / 1e12 for g in gemm], results=results, breakdown_ms=breakdown_ms,
               loader=loader, compiled=compiled, cuda_mallocs=mallocs, **mem)
    print(json.dumps(out))
    return out


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except mj.ConfigError as e:
        print(f'bench: {e}', file=sys.stderr)
        sys.exit(2)
