"""Seeded one-line bugs, each applied alone to a copy of the tree, with focused tests.

mutmut (docs/testing.md, "Seeded bugs") is the full tool; on the shared 2-core machine it
managed 0.1 mutants/s.  This script is the cheap complement: it makes the one-token or
one-statement changes a real bug would make, applies each ALONE to a private copy of the
tree (never the work tree: PCR 8 measures the code, so editing files under a running secure
test fails its attestation), runs only the test files you name, and reports survivors.

    .venv/bin/python tools/seedbugs.py migrate/wire.py tests/migrate/test_wire.py \\
        tests/migrate/test_stream_fuzz.py [--workers 2] [--lines 120-300] [--list]

Mutations (each one alone):
  * comparison/arithmetic/bitwise operator swapped (``<``/``<=``, ``==``/``!=``, ``+``/``-``,
    ``&``/``|``, ``<<``/``>>``, ``+=``/``-=`` ...); ``and``/``or`` swapped; a ``not`` dropped;
    ``is`` -> ``is not``; ``in`` -> ``not in``; ``True``/``False`` swapped;
  * an integer constant plus one; a bytes literal (a label, a magic) changed;
  * an ``if`` condition replaced by ``False`` (the check removed);
  * a one-line statement (call, assignment, raise, ``+=``) replaced by ``pass``;
    a ``return X`` by ``return None``.
Strings that are not bytes (error messages, f-strings) are left alone: those mutants are
message-only.  A mutant that does not compile is dropped.  A test run that exceeds
``--timeout`` seconds counts as killed ("timeout"), as mutmut counts it.

Output: one line per mutant (``KILLED``/``TIMEOUT``/``SURVIVED``, line number, the mutated
line) and a summary; ``--jsonl FILE`` also writes them as JSON lines.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import shutil
import subprocess
import sys
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OPS = {
    "<": ["<="], "<=": ["<"], ">": [">="], ">=": [">"], "==": ["!="], "!=": ["=="],
    "+": ["-"], "-": ["+"], "*": ["//"], "//": ["*"], "%": ["//"],
    "&": ["|"], "|": ["&"], "^": ["&"], "<<": [">>"], ">>": ["<<"],
    "+=": ["-="], "-=": ["+="], "|=": ["&="], "&=": ["|="], "~": [""],
}
NAMES = {"and": ["or"], "or": ["and"], "True": ["False"], "False": ["True"]}


def _replace(lines: list[str], row: int, col: int, end: int, new: str) -> str:
    out = list(lines)
    line = out[row - 1]
    out[row - 1] = line[:col] + new + line[end:]
    return "".join(out)


def mutants(source: str):
    """Yield (line number, mutated source) for every one-line mutation of ``source``."""
    lines = source.splitlines(keepends=True)
    seen = set()

    def emit(row, text):
        if text in seen or text == source:
            return None
        seen.add(text)
        try:
            compile(text, "<mutant>", "exec")
        except SyntaxError:
            return None
        return row, text

    tree = ast.parse(source)
    skip_rows = set()
    skip_spans = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skip_rows.update(range(node.lineno, node.end_lineno + 1))
        # Type annotations are not run (``from __future__ import annotations``).
        for ann in (getattr(node, "annotation", None), getattr(node, "returns", None)):
            if isinstance(ann, ast.expr):
                skip_spans.append(((ann.lineno, ann.col_offset), (ann.end_lineno, ann.end_col_offset)))
    toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, tok in enumerate(toks):
        (row, col), (erow, ecol) = tok.start, tok.end
        if row != erow or row in skip_rows or any(a <= tok.start and tok.end <= b for a, b in skip_spans):
            continue
        nxt = toks[i + 1].string if i + 1 < len(toks) else ""
        news = []
        if tok.type == tokenize.OP and tok.string in OPS:
            news = OPS[tok.string]
        elif tok.type == tokenize.NAME:
            if tok.string in NAMES:
                news = NAMES[tok.string]
            elif tok.string == "not":
                news = [""]
            elif tok.string == "is" and nxt != "not":
                news = ["is not"]
            elif tok.string == "in" and toks[i - 1].string != "not":
                news = ["not in"]
        elif tok.type == tokenize.NUMBER:
            try:
                value = int(tok.string, 0)
            except ValueError:
                value = None
            if value is not None:
                news = [str(value + 1)]
        elif tok.type == tokenize.STRING:
            prefix = tok.string[:tok.string.index(tok.string[-1])].lower()
            if "b" in prefix and "f" not in prefix:
                q = len(prefix) + (3 if tok.string[len(prefix):].startswith(tok.string[-1] * 3) else 1)
                news = [tok.string[:q] + "X" + tok.string[q:]]
        for new in news:
            m = emit(row, _replace(lines, row, col, ecol, new))
            if m:
                yield m
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.While)) and node.test.lineno == node.test.end_lineno:
            t = node.test
            if not (isinstance(t, ast.Constant) and t.value is False):
                m = emit(t.lineno, _replace(lines, t.lineno, t.col_offset, t.end_col_offset, "False"))
                if m:
                    yield m
        if isinstance(node, ast.AnnAssign) and node.value is None:
            continue                            # a declaration (a dataclass field)
        if isinstance(node, (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Raise,
                             ast.Delete)) and node.lineno == node.end_lineno:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue                        # a docstring
            m = emit(node.lineno, _replace(lines, node.lineno, node.col_offset, node.end_col_offset, "pass"))
            if m:
                yield m
        if isinstance(node, ast.Return) and node.value is not None and node.lineno == node.end_lineno \
                and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            v = node.value
            m = emit(v.lineno, _replace(lines, v.lineno, v.col_offset, v.end_col_offset, "None"))
            if m:
                yield m


def copy_tree(dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".venv", ".git", "mutants", "__pycache__", "*.mvimg", "*.mvstate", ".hypothesis"))


def run_tests(tree: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    # Serial, and without loading xdist at all (the project's addopts ask for
    # "-n auto"): its start-up is paid once per mutant.
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:xdist", "-o", "addopts=",
           "-p", "no:cacheprovider", "-m", "not slow", *tests]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(tree))
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "TIMEOUT", time.monotonic() - start, ""
    took = time.monotonic() - start
    if proc.returncode == 0:
        return "SURVIVED", took, ""
    failed = [ln.split()[1] for ln in proc.stdout.decode(errors="replace").splitlines()
              if ln.startswith(("FAILED ", "ERROR ")) and len(ln.split()) > 1]
    return "KILLED", took, (failed[0] if failed else f"exit {proc.returncode}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("module", help="path of the module, relative to the repository root")
    ap.add_argument("tests", nargs="+", help="test files (or node ids) to run against each mutant")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--lines", help="only mutants on lines A-B")
    ap.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    ap.add_argument("--skip-killed-in", metavar="JSONL", action="append", default=[],
                    help="skip the mutants an earlier run (its --jsonl output) killed: after adding "
                         "tests, the 'after' count without re-running what was already killed")
    ap.add_argument("--only-survivors-of", metavar="JSONL", action="append", default=[],
                    help="run only the mutants that survived in an earlier run (to confirm new tests)")
    ap.add_argument("--jsonl", help="also write results here")
    ap.add_argument("--scratch", default="/tmp/seedbugs", help="where the tree copies go")
    args = ap.parse_args(argv)

    source = (ROOT / args.module).read_text()
    lo, hi = (map(int, args.lines.split("-")) if args.lines else (0, 10 ** 9))
    todo = [(row, text) for row, text in mutants(source) if lo <= row <= hi]
    orig_lines = source.splitlines()
    killed_before = set()
    for name in args.skip_killed_in:
        with open(name) as f:
            killed_before |= {(r["line"], r["mutant"]) for r in map(json.loads, f) if r["status"] != "SURVIVED"}
    todo = [(row, text) for row, text in todo if (row, text.splitlines()[row - 1].strip()) not in killed_before]
    if args.only_survivors_of:
        survived = set()
        for name in args.only_survivors_of:
            with open(name) as f:
                survived |= {(r["line"], r["mutant"]) for r in map(json.loads, f) if r["status"] == "SURVIVED"}
        todo = [(row, text) for row, text in todo if (row, text.splitlines()[row - 1].strip()) in survived]

    def describe(row, text):
        return f"{row}: {orig_lines[row - 1].strip()}  ->  {text.splitlines()[row - 1].strip()}"

    if args.list:
        for row, text in todo:
            print(describe(row, text))
        print(f"{len(todo)} mutants")
        return 0

    scratch = Path(args.scratch)
    trees = [scratch / f"w{i}" for i in range(args.workers)]
    for t in trees:
        copy_tree(t)
    status, took, _ = run_tests(trees[0], args.tests, args.timeout * 3)
    if status != "SURVIVED":
        print(f"the tests fail on the unmutated copy ({status}); nothing to measure", file=sys.stderr)
        return 2
    print(f"baseline: tests pass on the copy in {took:.1f} s; {len(todo)} mutants", flush=True)
    free = list(trees)
    results = []
    out = open(args.jsonl, "w") if args.jsonl else None

    def one(item):
        row, text = item
        tree = free.pop()
        target = tree / args.module
        try:
            target.write_text(text)
            status, took, killer = run_tests(tree, args.tests, args.timeout)
        finally:
            target.write_text(source)
            free.append(tree)
        rec = {"line": row, "status": status, "seconds": round(took, 1), "killed_by": killer,
               "original": orig_lines[row - 1].strip(), "mutant": text.splitlines()[row - 1].strip()}
        print(f"{status:8} {describe(row, text)}" + (f"  [{killer}]" if killer else ""), flush=True)
        if out:
            out.write(json.dumps(rec) + "\n")
            out.flush()
        return rec

    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(one, todo))
    killed = sum(r["status"] != "SURVIVED" for r in results)
    print(f"\n{args.module}: {len(results)} mutants, {killed} killed "
          f"({sum(r['status'] == 'TIMEOUT' for r in results)} by timeout), "
          f"{len(results) - killed} survived")
    for r in results:
        if r["status"] == "SURVIVED":
            print(f"  survived {r['line']}: {r['original']}  ->  {r['mutant']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
