"""bench.py and the fast paths it measures: it runs, it reports what it promises, the fast paths are exact."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench
import medjepa as mj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--n_layer=2', '--n_embd=32', '--n_head=2', '--pred_n_layer=1', '--pred_n_embd=16', '--pred_n_head=2',
        '--image_size=32', '--patch_size=8', '--batch_size=8', '--num_slices=32', '--device=cpu', '--num_threads=1']


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp('tiny')
    np.save(d / 'train_images.npy', np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    (d / 'meta.json').write_text(json.dumps(dict(name='tiny', task='multiclass', num_classes=2, mean=[0.5] * 3,
                                                 std=[0.3] * 3)))
    return str(d)


def test_bench_times_both_data_paths_and_ends_with_one_json_line(tiny_data):
    args = TINY + ['--dtype=float32', f'--data_dir={tiny_data}', '--bench_warmup=1', '--bench_iters=2',
                   '--breakdown_iters=1', '--loader_iters=2']
    p = subprocess.run([sys.executable, 'bench.py'] + args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out['config']['n_embd'] == 32 and out['dtype'] == 'float32' and out['device'] == 'cpu'
    assert set(out['results']) == {'synthetic', 'real'}
    for r in out['results'].values():
        assert r['img_per_s'] > 0 and 0 < r['mfu'] < 1
        assert r['img_per_s'] == pytest.approx(8 * 1000 / r['step_ms'], rel=1e-6)
    assert set(out['breakdown_ms']) == {'data', 'forward', 'backward', 'optimizer'}
    assert all(v > 0 for v in out['breakdown_ms'].values())
    assert out['loader']['img_per_s'] > 0 and out['peak_mem_gb'] > 0
    # CPU: a GEMM reading before, after each of the 2 x 2 timed steps, and at the end; MFU per step
    assert 'GEMM measured after each timed step' in out['peak_source'] and len(out['gemm_tflops']) == 1 + 2 * 2 + 1
    assert out['peak_tflops'] == pytest.approx(float(np.median(out['gemm_tflops'])))


def test_bench_without_data_times_the_synthetic_batch_only(tmp_path):
    out = bench.main(TINY + ['--dtype=float32', f'--data_dir={tmp_path}/none', '--bench_warmup=0',
                             '--bench_iters=1', '--breakdown_iters=1'])
    assert set(out['results']) == {'synthetic'} and out['loader'] is None
    with pytest.raises(FileNotFoundError, match='prepare.py'):
        bench.main(TINY + [f'--data_dir={tmp_path}/none', '--bench_data=real'])


@pytest.mark.skipif(not any(map(__import__('shutil').which, ('g++', 'c++', 'clang++'))),
                    reason='torch.compile on a CPU needs a C++ compiler')
def test_bench_compile_times_the_eager_model_in_turn_and_reports_no_graph_break(tmp_path):
    out = bench.main(TINY + ['--dtype=float32', f'--data_dir={tmp_path}/none', '--bench_warmup=1',
                             '--bench_iters=2', '--breakdown_iters=1', '--compile=True'])
    assert set(out['results']) == {'synthetic', 'synthetic, eager'}
    assert out['compiled']['graphs'] >= 2 and out['compiled']['graph_breaks'] == 0
    assert len(out['gemm_tflops']) == 1 + 2 * 2 + 1  # a GEMM reading after each timed step of either model


def test_presets_set_the_model_and_overrides_still_win(tmp_path):
    c = bench.get_config(['--preset=vits16'])
    assert (c['n_embd'], c['n_layer'], c['n_head'], c['patch_size'], c['image_size']) == (384, 12, 6, 16, 224)
    c = bench.get_config(['--preset=ref', '--batch_size=8'])
    assert (c['n_embd'], c['pred_n_layer'], c['pred_n_embd'], c['batch_size']) == (192, 6, 384, 8)
    cfg_file = tmp_path / 'c.py'
    cfg_file.write_text('n_layer = 3\n')
    assert bench.get_config(['--preset=vitb16', str(cfg_file)])['n_layer'] == 3  # a config file beats the preset
    assert bench.get_config([])['n_embd'] == mj.DEFAULTS['n_embd']  # 'tiny' is medjepa.py's demo model


def test_bench_rejects_bad_keys_with_a_message_and_exit_code_2():
    for arg, msg in [('--preset=vit_huge', "preset 'vit_huge'"), ('--bench_iter=3', "did you mean 'bench_iters'"),
                     ('--bench_data=disk', 'bench_data must be')]:
        with pytest.raises(mj.ConfigError, match=msg):
            bench.get_config([arg])
    p = subprocess.run([sys.executable, 'bench.py', '--preset=vit_huge'], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("bench: preset 'vit_huge'"), p.stderr


def test_cpu_bf16_attention_path_equals_sdpa():
    """bf16 attention on a CPU takes plain matmuls instead of SDPA (faster there): same function,
    boolean mask included, values and gradients within bf16 rounding."""
    torch.manual_seed(0)
    attn = mj.Attention(64, 4)
    x = torch.randn(3, 20, 64)
    mask = torch.rand(20, 20) > 0.5
    mask |= torch.eye(20, dtype=torch.bool)  # every query may attend somewhere
    for m in (None, mask):
        x32 = x.clone().requires_grad_()
        ref = attn(x32, m)  # float32: SDPA
        ref.square().sum().backward()
        xbf = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            q = attn.qkv(xbf)
            assert q.dtype == torch.bfloat16  # so the matmul path below is the one taken
            got = attn(xbf, m)
        got.float().square().sum().backward()
        torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.02)
        torch.testing.assert_close(xbf.grad, x32.grad, rtol=0.05, atol=0.02)
        # float64 also takes the matmul path (only float32 goes to SDPA on a CPU): exact there
        a64, x64 = copy.deepcopy(attn).double(), x.double()
        q, k, v = a64.qkv(x64).view(3, 20, 3, 4, 16).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).reshape(3, 20, 64)
        torch.testing.assert_close(a64(x64, m), a64.proj(y), rtol=1e-10, atol=1e-12)
