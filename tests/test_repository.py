"""The repository's shape: files that prose and code refer to exist, imports point one way.

Rings, innermost first (README, "Architecture"): ``core`` (the paper's mathematics) <-
``model``, ``data`` <- ``objective``, ``pretrained`` <- ``trainer`` <- ``evaluation`` <-
``bench``, ``study``. ``errors`` and ``files`` serve every ring but ``core``. A module imports
only from rings inside its own, or from its own package.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RINGS = {"errors": 0, "files": 0, "core": 1, "model": 2, "data": 2, "objective": 3,
         "pretrained": 3, "trainer": 4, "evaluation": 5, "bench": 6, "study": 6}
# What the paper's mathematics may import: JAX, NumPy and the standard library's pure parts.
CORE_ALLOWED = {"__future__", "dataclasses", "functools", "math", "typing", "collections",
                "jax", "numpy"}
REFERRING_FILES = ["README.md", "docs/**/*.md", "stm_jax/**/*.py", "scripts/*.py",
                   "configs/*.py", "notebooks/*.py", "tests/*.py", "benchmarks/**/*.md",
                   "results/*/*.md", ".ci/run", "pyproject.toml"]
TOP_FOLDERS = ("docs", "notebooks", "scripts", "configs", "stm_jax", "tests", "benchmarks",
               "results", ".ci")
FOLDERS = "|".join(map(re.escape, TOP_FOLDERS))
PATH_PATTERN = re.compile(rf"(?<![\w./-])((?:{FOLDERS})/[\w.@/-]*[\w])(?:::(\w+))?")


def referring_files() -> list[Path]:
    found = []
    for pattern in REFERRING_FILES:
        found += [path for path in ROOT.glob(pattern) if path.is_file()]
    return sorted(set(found))


def references(path: Path) -> list[tuple[str, str | None]]:
    """(repository path, test name or None) for every path-like mention in ``path``."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in PATH_PATTERN.finditer(text):
        target, test = match.group(1).rstrip("."), match.group(2)
        if any(marker in target for marker in ("NAME", "<", "*", "{")):
            continue  # a placeholder (results/NAME/, runs/<run>/...), not a file
        found.append((target, test))
    # "math.md section N" in docstrings means the project's own derivation.
    if re.search(r"(?<![\w/])math\.md", text):
        found.append(("docs/math.md", None))
    return found


def test_every_referenced_file_exists():
    missing = []
    for path in referring_files():
        for target, test in references(path):
            if not (ROOT / target).exists():
                missing.append(f"{path.relative_to(ROOT)} -> {target}")
            elif test is not None and not re.search(rf"^def {test}\(", (ROOT / target)
                                                    .read_text(encoding="utf-8"), re.M):
                missing.append(f"{path.relative_to(ROOT)} -> {target}::{test}")
    assert not missing, "\n".join(missing)


def test_the_scan_sees_references():
    """The scanner finds what it should (a scan that matched nothing would pass vacuously)."""
    readme = dict(references(ROOT / "README.md"))
    assert "scripts/train.py" in readme and "docs/math.md" in readme
    math = references(ROOT / "docs" / "math.md")
    assert ("tests/test_attention.py", "test_closed_form_matches_autodiff_blocks") in math


def imports_of(path: Path) -> list[str]:
    """The absolute module names ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names += [f"{base}.{alias.name}" if base == "stm_jax" else base
                      for alias in node.names]
    return names


def ring_of(module: str) -> tuple[str, int]:
    part = module.split(".")[1]
    return part, RINGS[part]


LIBRARY = sorted(p for p in (ROOT / "stm_jax").rglob("*.py") if p.name != "__init__.py"
                 or p.parent != ROOT / "stm_jax")


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path):
    source = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package, ring = ring_of(source)
    wrong = []
    for name in imports_of(path):
        if not name.startswith("stm_jax.") or name.split(".")[1] == package:
            continue
        target, target_ring = ring_of(name)
        if not target_ring < ring or (package == "core" and target != "core"):
            wrong.append(f"{name} (ring {target_ring}) from {package} (ring {ring})")
    assert not wrong, wrong


@pytest.mark.parametrize("path", sorted((ROOT / "stm_jax" / "core").glob("*.py")),
                         ids=lambda p: p.name)
def test_core_is_pure_jax(path):
    """No Flax, Orbax, TFDS, ml_collections, files or configs in the paper's mathematics."""
    outside = {name for name in imports_of(path)
               if name.split(".")[0] not in CORE_ALLOWED and not name.startswith("stm_jax.core")}
    assert not outside, outside


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.name)
def test_configs_import_only_ml_collections_and_each_other(path):
    outside = {name for name in imports_of(path)
               if name.split(".")[0] not in ("ml_collections", "configs", "__future__")}
    assert not outside, outside


def test_the_ring_table_covers_every_package():
    packages = {p.name.removesuffix(".py") for p in (ROOT / "stm_jax").iterdir()
                if p.name != "__init__.py" and (p.suffix == ".py" or p.is_dir())
                and p.name != "__pycache__"}
    assert packages == set(RINGS)


# Measured timings go stale: they live in benchmarks/ and the README, not in code (a format
# example in ``double backticks`` is not a measurement).
TIMING = re.compile(r"\b\d+(\.\d+)?\s?(ms|s|seconds)\b(?! \w+ly)|\b\d+(\.\d+)?x (faster|slower)"
                    r"|\b\d[\d.,]*k? tok(ens)?/s|\b\d+ GFLOP/s|\b\d+% (faster|slower)")


def comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    import io
    import tokenize

    found = []
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    previous = None
    for token in tokens:
        if token.type == tokenize.COMMENT:
            found.append((token.start[0], token.string))
        elif token.type == tokenize.STRING and token.string.startswith(('"""', 'r"""')) and (
                previous is None or previous.type in (tokenize.INDENT, tokenize.NEWLINE,
                                                      tokenize.NL, tokenize.DEDENT)):
            found.append((token.start[0], token.string))
        if token.type not in (tokenize.NL, tokenize.COMMENT):
            previous = token
    return found


CODE = sorted([*ROOT.glob("stm_jax/**/*.py"), *ROOT.glob("configs/*.py"),
               *ROOT.glob("scripts/*.py")])


def test_no_measured_timings_in_comments_or_docstrings():
    found = [f"{path.relative_to(ROOT)}:{line}: {match.group(0)}" for path in CODE
             for line, text in comments_and_docstrings(path)
             for match in TIMING.finditer(re.sub(r"``.*?``", "", text, flags=re.S))]
    assert not found, "\n".join(found)
    assert TIMING.search("# a step took 42.1 ms") and TIMING.search("(about 19k tokens/s)")


def test_the_readme_architecture_names_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Architecture"):]
    modules = {p.name for p in (ROOT / "stm_jax").rglob("*.py") if p.name != "__init__.py"
               and "builders" not in p.parts}
    missing = sorted(name for name in modules if name not in section)
    assert not missing, missing
