"""Measured numbers have one home, docs/results.md; every page that quotes one must agree with it.

docs/results.md ends with a table of named values ("Numbers quoted on other pages"):

    | name | value | measured in |
    |---|---|---|
    | `views_knn` | 41.2 / 44.6 / 40.6 / 42.1 | [the views recipe](#the-views-demo-recipe-...) |

A page that quotes a value puts a marker on its own line at the end of the paragraph or table that
holds the quote (an HTML comment: invisible on the rendered page):

    the pretrained encoder reaches 41.2 / 44.6 / 40.6 % kNN (mean 42.1) ...
    <!-- results: views3_knn views3_linear -->

The checks:
    - the table's value appears in the section its link names, as written (the same digits), its
      numbers in that order within one table row or one sentence: the table cannot drift from the
      measurement it names;
    - every number of every named value appears in the marked paragraph or table, as written or
      rounded to fewer digits (41.2 may be quoted as 41, not as 41.3; 7m30.7s as 7 min 31 s): a
      quote cannot drift from the table;
    - names are unique, every marker names known values, and every value is quoted somewhere.
So a number changed in one place and not the other fails, and the message names both places.
"""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = 'docs/results.md'
PAGES = ['README.md'] + sorted(f'docs/{f}' for f in os.listdir(os.path.join(ROOT, 'docs')) if f.endswith('.md'))
TABLE_TITLE = '## Numbers quoted on other pages'
MARKER = re.compile(r'<!--\s*results:\s*([\w\s]*?)\s*-->')
NUMBER = re.compile(r'\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?')  # 2,001 and 41.2; no sign: "1-2" is a range
ROW = re.compile(r'^\|\s*`(\w+)`\s*\|([^|]*)\|\s*\[[^\]]*\]\(([^)\s]*)\)\s*\|\s*$')


def numbers(text):
    """The numbers of a text as written, thousands separators dropped: '2,001 and 7m30.7s' -> ['2001', '7', '30.7']."""
    return [n.replace(',', '') for n in NUMBER.findall(text)]


def read(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def outside_code(text):
    """(line number, line) of the lines of a text that are not in a fenced code block."""
    fence = None
    for i, line in enumerate(text.split('\n'), 1):
        stripped = line.strip()
        if fence is None and stripped.startswith('```'):
            fence = re.match('`+', stripped).group(0)
        elif fence is not None:
            fence = None if stripped == fence else fence
        else:
            yield i, line


def paragraphs(text):
    """[(first line number, [lines])] of the runs of non-blank lines outside fenced code blocks."""
    out, cur, last = [], None, 0
    for i, line in outside_code(text):
        stripped = line.strip()
        if i != last + 1:  # a code block (or the start) lies between
            cur = None
        last = i
        if not stripped:
            cur = None
        elif cur is None:
            cur = (i, [line])
            out.append(cur)
        else:
            cur[1].append(line)
    return out


def units(text):
    """Table rows and sentences (cut at '. ', '; ' and ': ') of a text: where a value's numbers must
    appear together and in order."""
    out = []
    for _, lines in paragraphs(text):
        prose = []
        for line in lines + ['|']:  # a sentinel row flushes the last run of prose
            if line.lstrip().startswith('|'):
                out += re.split(r'(?<=[.;:])\s+', ' '.join(prose)) if prose else []
                prose = []
                out.append(line)
            else:
                prose.append(line)
        out.pop()
    return out


def slug(heading):
    """GitHub's anchor of a heading: '## The `views` demo (a: b)' -> 'the-views-demo-a-b'."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lstrip('#').strip().lower()).replace(' ', '-')


def section(page, anchor):
    """The text of the heading of `page` whose anchor is `anchor`, up to the next heading of its level
    or above; None if there is no such heading."""
    lines, start = read(page).split('\n'), None
    for i, line in outside_code('\n'.join(lines)):
        level = len(line) - len(line.lstrip('#'))
        if not level or line[level:level + 1] != ' ':
            continue
        if start is None and slug(line) == anchor:
            start, top = i, level
        elif start is not None and level <= top:
            return '\n'.join(lines[start - 1:i - 1])
    return None if start is None else '\n'.join(lines[start - 1:])


def in_order(value, text):
    """Whether a unit of `text` holds the numbers of `value`, exactly as written and in that order."""
    want = numbers(value)
    for unit in units(text):
        it = iter(numbers(unit))
        if all(any(n == w for n in it) for w in want):
            return True
    return False


def rounds_to(quoted, measured):
    """Whether `quoted` is `measured` as written or rounded to fewer decimals (41 or 41.2 for 41.2)."""
    decimals = len(quoted.partition('.')[2])
    return abs(float(quoted) - float(measured)) <= 0.5 * 10.0 ** -decimals + 1e-9


def holds(value, text):
    """Whether `text` contains every number of `value` (each its own occurrence), possibly rounded."""
    left = numbers(text)
    for want in numbers(value):
        hit = next((i for i, n in enumerate(left) if rounds_to(n, want)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


def named_values(text=None):
    """{name: (value, link)} from the table at the end of docs/results.md."""
    text = read(RESULTS) if text is None else text
    assert TABLE_TITLE in text, f'{RESULTS} has no "{TABLE_TITLE}" section'
    out = {}
    for line in text.split(TABLE_TITLE, 1)[1].split('\n'):
        m = ROW.match(line.strip())
        if m:
            name, value, link = m.group(1), m.group(2).strip(), m.group(3)
            assert name not in out, f'{RESULTS}: `{name}` is named twice'
            out[name] = (value, link)
    assert out, f'{RESULTS}: no rows like | `name` | value | [section](#anchor) | under "{TABLE_TITLE}"'
    return out


def quotes(page, text=None):
    """[(line, names, the marked paragraph or table without its marker)] of a page."""
    text = read(page) if text is None else text
    out = []
    for first, lines in paragraphs(text):
        for k, line in enumerate(lines):
            m = MARKER.search(line)
            if m:
                body = '\n'.join(MARKER.sub('', l) for l in lines)
                out.append((first + k, m.group(1).split(), body))
    return out


def stale_quotes(page, text, values):
    """The messages for the quotes of one page that do not hold the named values."""
    bad = []
    for line, names, body in quotes(page, text):
        if not names:
            bad.append(f'{page}:{line}: a results marker without names')
        for name in names:
            if name not in values:
                bad.append(f'{page}:{line}: `{name}` is not in the table of {RESULTS}')
            elif not holds(values[name][0], body):
                bad.append(f'{page}:{line}: the paragraph or table above this marker no longer quotes '
                           f'`{name}` = {values[name][0]} ({RESULTS}, measured in {values[name][1]})')
    return bad


def test_each_named_value_is_what_its_section_measured():
    bad = []
    for name, (value, link) in named_values().items():
        target, _, anchor = link.partition('#')
        page = os.path.normpath(os.path.join('docs', target)) if target else RESULTS
        text = section(page, anchor) if os.path.isfile(os.path.join(ROOT, page)) and anchor else None
        if text is None:
            bad.append(f'`{name}`: its link ({link}) names no section')
        elif not numbers(value):
            bad.append(f'`{name}`: the value "{value}" holds no number')
        elif not in_order(value, text):
            bad.append(f'`{name}` = {value}: these numbers are not in one row or sentence of {page}#{anchor}, '
                       f'in this order: the measurement or the table changed')
    assert not bad, '\n'.join(bad)


@pytest.mark.parametrize('page', [p for p in PAGES if p != RESULTS])
def test_quoted_numbers_agree_with_results(page):
    bad = stale_quotes(page, read(page), named_values())
    assert not bad, '\n'.join(bad)


def test_every_named_value_is_quoted_somewhere():
    quoted = {name for page in PAGES if page != RESULTS for _, names, _ in quotes(page) for name in names}
    unused = sorted(set(named_values()) - quoted)
    assert not unused, f'named in {RESULTS} but quoted nowhere (drop them, or mark their quotes): {unused}'


def test_the_check_fails_when_a_number_changes_on_one_side_only():
    """The checks above on altered copies of the real pages: a quote changed in README.md, and a
    measurement changed in docs/results.md."""
    readme, results = read('README.md'), read(RESULTS)
    values = named_values(results)
    assert not stale_quotes('README.md', readme, values)
    quote = '57.6 / 59.2 / 56.5'
    assert quote in readme and values['views3_knn'][0].startswith(quote)
    changed = stale_quotes('README.md', readme.replace(quote, '57.6 / 59.3 / 56.5'), values)
    assert any('`views3_knn`' in m for m in changed), changed
    # the measurement moves in results.md (its section and its table) but README.md still says 59.2
    moved = named_values(results.replace('59.2', '59.3'))
    assert any('`views3_knn`' in m for m in stale_quotes('README.md', readme, moved))
    # rounding to fewer digits is a quote; another digit is not
    assert rounds_to('41', '41.2') and rounds_to('31', '30.7') and rounds_to('2907', '2907')
    assert not rounds_to('41.3', '41.2') and not rounds_to('42', '41.2') and not rounds_to('41.25', '41.2')
    # the table must name the section's digits in the section's order, within one row or sentence
    assert in_order('32.1 / 47.6', '| seed 0 | 32.1 | 47.6 | 83.8 |')
    assert not in_order('47.6 / 32.1', '| seed 0 | 32.1 | 47.6 | 83.8 |')
    assert not in_order('32.1 / 47.6', 'kNN 32.1. Linear 47.6.')
