"""The docs run as written and point at code that exists, so they cannot drift silently.

The conventions every page (README.md, docs/*.md) follows; docs/README.md repeats them for writers.

Fenced code blocks: the info string after the backticks says what this test does with the block.
    python         runs as a script in a scratch copy of the repository that holds a tiny data/demo
                   and data/demo3d (cwd = that copy); all blocks of a page share it, in page order
    text output    the stdout of the python block just before it: the same words and numbers, where spacing
                   may differ, a decimal may differ by round-off (one unit of its last printed digit),
                   and numpy's scalar repr (np.float64(0.5), numpy >= 2) counts as the number; integers
                   (counts, shapes, indices) must be equal (same_output)
    bash           every line that is not blank or a # comment is a command of the form
                   `python SCRIPT ...` with SCRIPT in RUNNABLE; it runs in the scratch copy with
                   RUNNABLE[SCRIPT]'s tiny overrides appended (a later --key=value wins), so training
                   takes 2 steps; `python prepare.py` only for the demo sets, which are pre-made tiny
    console, text, json, slurm
                   shown, never run: outputs, file listings, and commands that need a download, a
                   GPU, several processes, a cluster or hours (torchrun, make, git, prepare.py ham10000)
    (nothing)      refused: every block says what it is
Each distinct command runs once per session (a cache), so a page may repeat a README command for free.

References (checked in every page, fenced blocks included):
    - a path whose first part is a folder of the repository (docs/, tests/, config/, tables/) or that
      is a top-level .py file must exist; PLACEHOLDERS lists the made-up names the docs use on purpose
    - tests/test_x.py::test_name must name a test function in that file
    - a relative markdown link must point at an existing file
    - a line range is written as a link from the symbol to the lines, e.g.
      [`sample_masks`](../medjepa.py#L392-L431) or [`JEPA.mask_loss`](../medjepa.py#L650-L675);
      the named def or class (dotted for methods) must start inside the range. Any other way of
      writing a .py line number (`medjepa.py:L120`, a bare #L120) is refused.
      After editing the code, `python tests/test_docs.py --fix-line-refs` rewrites every range to the
      symbol's current first and last line (then re-read the prose around each one).
"""
import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ['README.md'] + sorted(f'docs/{f}' for f in os.listdir(os.path.join(ROOT, 'docs')) if f.endswith('.md'))
SHOWN = {'console', 'text', 'json', 'slurm'}
PLACEHOLDERS = {'config/x.py',  # "your config file" in command examples
                'tests/test_x.py',  # docs/README.md: the form of a test reference
                'snippet.py',  # docs/data_format.md: the reader's own file
                'batch_download_zips.py'}  # docs/datasets.md: NIH's download script, not ours

# tiny overrides appended to each runnable script's command line
_TRAIN = ['--max_iters=2', '--warmup_iters=1', '--log_interval=1', '--eval_interval=1000', '--num_threads=1',
          '--device=cpu', '--dtype=float32']
RUNNABLE = {
    'medjepa.py': _TRAIN + ['--batch_size=8', '--knn_train_size=42'],
    'medjepa3d.py': _TRAIN + ['--batch_size=4', '--knn_train_size=12'],
    'eval.py': ['--fewshot_seeds=1', '--shots=1', '--fractions=1', '--finetune_iters=1', '--finetune_eval_every=1',
                '--seg_train=8', '--seg_epochs=1', '--figures=False', '--dtype=float32',
                '--baselines=none'],  # the baseline rows' code is tested in tests/test_eval.py
    'bench.py': ['--bench_warmup=0', '--bench_iters=1', '--breakdown_iters=1', '--loader_iters=1', '--batch_size=2',
                 '--num_threads=1'],
}
TINY_DATA = {  # the only prepare.py commands a runnable block may hold, and what they become
    'demo': ['--n_train=42', '--n_val=21', '--n_test=21'],
    'demo3d': ['--n_train=12', '--n_val=6', '--n_test=6'],
}
FENCE = re.compile(r'^(```+)(.*)$')
LINE_REF = re.compile(r'\[`([\w.]+)`\]\(([^)#\s]+\.py)#L(\d+)(?:-L(\d+))?\)')
ANY_LINE_NUMBER = re.compile(r'\.py(?:#|:)L\d+')


def blocks(page, fence=FENCE):
    """[(first line number, info string, text)] of the fenced blocks of a page (fence: which fences)."""
    out, cur = [], None
    for i, line in enumerate(open(os.path.join(ROOT, page)).read().split('\n'), 1):
        m = fence.match(line.strip())
        if cur is None and m:
            cur = (i, m.group(2).strip(), [], m.group(1))
        elif cur is not None and line.strip() == cur[3]:
            out.append((cur[0], cur[1], '\n'.join(cur[2])))
            cur = None
        elif cur is not None:
            cur[2].append(line)
    assert cur is None, f'{page}:{cur[0]}: unclosed code block'
    return out


def commands(text):
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    out, cur = [], ''
    for line in text.split('\n'):
        line = line.rstrip()
        if line.endswith('\\'):
            cur += line[:-1] + ' '
            continue
        line = (cur + line).strip()
        cur = ''
        if line and not line.startswith('#'):
            out.append(re.sub(r'\s+#.*$', '', line))  # an end-of-line comment
    return out


def tiny(cmd):
    """The command with the tiny overrides, or a reason why it cannot run."""
    words = shlex.split(cmd)  # as a shell would: --target_scale="(0.3,0.4)" reaches the script without quotes
    if len(words) < 2 or words[0] != 'python':
        return None, f"'{cmd}' is not `python SCRIPT ...`"
    script = words[1]
    if script == 'prepare.py':
        if len(words) < 3 or words[2] not in TINY_DATA:
            return None, f"'{cmd}': only `python prepare.py demo` / `demo3d` run here (the rest download)"
        return words + TINY_DATA[words[2]], None
    if script not in RUNNABLE:
        return None, f"'{cmd}': {script} is not one of {sorted(RUNNABLE) + ['prepare.py']}"
    return words + RUNNABLE[script], None


NUMBER = re.compile(r'-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?')
NUMPY_SCALAR = re.compile(r'\bnp\.[a-z]+\d*_?\((.*?)\)')


def same_output(got, want):
    """Whether printed output matches a page's `text output` block across library versions (see above)."""
    def parts(text):
        text = '\n'.join(' '.join(line.split()) for line in NUMPY_SCALAR.sub(r'\1', text).strip().splitlines())
        return NUMBER.split(text), NUMBER.findall(text)
    (got_words, got_numbers), (want_words, want_numbers) = parts(got), parts(want)
    if got_words != want_words or len(got_numbers) != len(want_numbers):
        return False
    for g, w in zip(got_numbers, want_numbers):
        mantissa, _, exponent = w.lower().partition('e')
        if '.' not in mantissa and not exponent:  # an integer: a count, a shape, an index
            if g != w:
                return False
            continue
        unit = 10.0 ** (int(exponent or 0) - len(mantissa.partition('.')[2]))  # of the last printed digit
        if abs(float(g) - float(w)) > unit * (1 + 1e-9):
            return False
    return True


def test_outputs_are_compared_to_their_printed_precision_and_nothing_else_is_loosened():
    assert same_output('by hand 0.689533   medjepa.sigreg 0.689532\n', 'by hand 0.689532   medjepa.sigreg 0.689532')
    assert same_output('N(0, I)  SIGReg  1.26', 'N(0, I)      SIGReg     1.25')
    assert same_output('mean per-label accuracy: np.float64(0.98)', 'mean per-label accuracy: 0.98')
    assert not same_output('by hand 0.689552', 'by hand 0.689532')
    assert not same_output('ctx_idx (64, 22)', 'ctx_idx (64, 21)')
    assert not same_output('exact complement: False', 'exact complement: True')
    assert not same_output('[29, 31, 37]', '[29, 31, 37, 31]')
    assert not same_output('SIGReg 1.25', 'SIGReg: 1.25')

# ----------------------------------------------------------------------------- running the snippets


@pytest.fixture(scope='session')
def scratch(tmp_path_factory):
    """A copy of the repository's code and small files, with tiny demo data sets made in it."""
    d = tmp_path_factory.mktemp('docs_scratch')
    for name in os.listdir(ROOT):
        src = os.path.join(ROOT, name)
        if name.endswith('.py') or name in ('Makefile', 'requirements.txt'):
            shutil.copy(src, d / name)
        elif name in ('config', 'tables', 'docs'):
            shutil.copytree(src, d / name)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(d))
    state = dict(dir=d, env=env, cache={})
    for name in TINY_DATA:
        run_command(state, f'python prepare.py {name}')
    return state


def run_command(state, cmd):
    """Run one bash-block command (with its tiny overrides) once per session; return its output."""
    if cmd in state['cache']:
        return state['cache'][cmd]
    argv, why = tiny(cmd)
    assert argv is not None, why
    t0 = time.time()
    p = subprocess.run([sys.executable] + argv[1:], cwd=state['dir'], env=state['env'], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, f"`{' '.join(argv)}` failed ({time.time() - t0:.0f} s):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    state['cache'][cmd] = p.stdout
    return p.stdout


@pytest.mark.parametrize('page', PAGES)
def test_every_code_block_says_whether_it_runs(page):
    """Each block is python, bash (runnable commands only), text output after python, or shown-only."""
    bad, prev = [], None
    for line, info, text in blocks(page):
        if info == 'text output':
            if prev != 'python':
                bad.append(f'{page}:{line}: a `text output` block must follow a python block')
        elif info == 'bash':
            bad += [f'{page}:{line}: {tiny(c)[1]} - mark the block `console` if it is not meant to run'
                    for c in commands(text) if tiny(c)[0] is None]
        elif info not in SHOWN | {'python'}:
            bad.append(f"{page}:{line}: code block marked '{info}': use python, bash, text output or one of {sorted(SHOWN)}")
        prev = info
    assert not bad, '\n'.join(bad)


@pytest.mark.parametrize('page', PAGES)
def test_snippets_run_as_written(page, scratch):
    """Runs the page's python and bash blocks in order in the scratch copy; compares `text output`."""
    found = blocks(page)
    if not any(info in ('python', 'bash') for _, info, _ in found):
        pytest.skip('nothing runnable on this page')
    last_out = None
    for line, info, text in found:
        if info == 'python':
            p = subprocess.run([sys.executable, '-c', text], cwd=scratch['dir'], env=scratch['env'],
                               capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, f'{page}:{line}: python block failed:\n{p.stderr[-3000:]}'
            last_out = p.stdout
        elif info == 'text output':
            assert last_out is not None and same_output(last_out, text), (
                f'{page}:{line}: the python block above now prints\n{last_out}\ninstead of\n{text}')
        elif info == 'bash':
            for cmd in commands(text):
                run_command(scratch, cmd)

# ----------------------------------------------------------------------------- references


def symbol_lines(path, name):
    """(first, last) line of the def/class `name` ('JEPA.mask_loss' for a method) in a .py file."""
    scope = ast.parse(open(path).read()).body
    node = None
    for part in name.split('.'):
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            return None
        scope = node.body
    return node.lineno, node.end_lineno


def line_refs(page):
    text = open(os.path.join(ROOT, page)).read()
    for m in LINE_REF.finditer(text):
        yield m, os.path.normpath(os.path.join(ROOT, os.path.dirname(page), m.group(2)))


@pytest.mark.parametrize('page', PAGES)
def test_line_ranges_point_at_the_named_symbol(page):
    text = open(os.path.join(ROOT, page)).read()
    bad = []
    for m, path in line_refs(page):
        name, a = m.group(1), int(m.group(3))
        b = int(m.group(4) or a)
        where = f'{page}: [{name}]({m.group(2)}#L{a}-L{b})'
        if not os.path.isfile(path):
            bad.append(f'{where}: no such file')
            continue
        lines = symbol_lines(path, name)
        if lines is None:
            bad.append(f'{where}: no def or class {name} in {m.group(2)}')
        elif not a <= lines[0] <= b:
            bad.append(f'{where}: {name} now starts at line {lines[0]} (lines {lines[0]}-{lines[1]}); '
                       f'python tests/test_docs.py --fix-line-refs')
    stray = len(ANY_LINE_NUMBER.findall(text)) - len(list(LINE_REF.finditer(text)))
    if stray:
        bad.append(f'{page}: {stray} line number(s) not written as [`symbol`](file.py#La-Lb)')
    assert not bad, '\n'.join(bad)


PATH = re.compile(r'(?<![\w/.~$-])((?:[\w.-]+/)*[\w.-]+\.(?:py|md|png|json|jsonl|txt|tsv|ini|sh|yaml))(?:::(\w+))?')
LINK = re.compile(r'\]\(([^)\s]+)\)')


def path_refs(page):
    """(path, test name or None) for every path-like token whose existence can be checked."""
    checked_dirs = ('docs/', 'tests/', 'config/', 'tables/', '.ci/')
    for m in PATH.finditer(open(os.path.join(ROOT, page)).read()):
        p = m.group(1)
        if p in PLACEHOLDERS:
            continue
        if p.startswith(checked_dirs):
            yield p, m.group(2)
        elif '/' not in p and p.endswith('.py'):  # a bare script name: top level, or config/ tests/ docs/
            yield next((f'{d}{p}' for d in ('', 'config/', 'tests/', 'docs/') if os.path.isfile(os.path.join(ROOT, d, p))), p), m.group(2)


@pytest.mark.parametrize('page', PAGES)
def test_referenced_files_and_tests_exist(page):
    bad = []
    for p, test in path_refs(page):
        full = os.path.join(ROOT, p)
        if not os.path.exists(full):
            bad.append(f'{page}: {p} does not exist')
        elif test and p.endswith('.py') and symbol_lines(full, test) is None:
            bad.append(f'{page}: {p} has no test {test}')
    for target in LINK.findall(open(os.path.join(ROOT, page)).read()):
        if re.match(r'^(https?:|mailto:|#)', target):
            continue
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target.split('#')[0]))
        if not os.path.exists(path):
            bad.append(f'{page}: link ({target}) points at nothing')
    assert not bad, '\n'.join(bad)

# ----------------------------------------------------------------------------- the fixer


def fix_line_refs():
    """Rewrite every [`symbol`](file.py#La-Lb) to the symbol's current lines; report what moved."""
    for page in PAGES:
        full = os.path.join(ROOT, page)
        text = open(full).read()

        def repl(m):
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), m.group(2)))
            lines = symbol_lines(path, m.group(1)) if os.path.isfile(path) else None
            if lines is None:
                print(f'{page}: {m.group(1)} not found in {m.group(2)}: fix by hand')
                return m.group(0)
            new = f'[`{m.group(1)}`]({m.group(2)}#L{lines[0]}-L{lines[1]})'
            if new != m.group(0):
                print(f'{page}: {m.group(0)} -> {new}')
            return new
        new_text = LINE_REF.sub(repl, text)
        if new_text != text:
            open(full, 'w').write(new_text)


if __name__ == '__main__':
    if sys.argv[1:] == ['--fix-line-refs']:
        fix_line_refs()
    else:
        sys.exit('usage: python tests/test_docs.py --fix-line-refs   (the checks: python -m pytest tests/test_docs.py)')
