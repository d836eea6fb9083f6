"""The front page and docs/: every relative link and image resolves inside the repository, every
backticked repository path exists, and the text reads for a user of the clone (no log of who ran
what, no paths of someone's scratch machine)."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](path) and ![alt](path)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"(?:static|notebooks|docs|medusa_lib|tools|tests)/\S*")
SESSION = re.compile(r"\bsessions?\b", re.I)
SCRATCH = re.compile(r"/(?:tmp|root|home|work)/")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _inline_code(text: str) -> list[str]:
    return CODE.findall(FENCE.sub("", text))


def _inside_repo(path: Path) -> bool:
    try:
        path.resolve().relative_to(ROOT)
    except ValueError:
        return False
    return True


def test_the_pages_exist():
    assert (ROOT / "README.md").is_file()
    assert (ROOT / "docs" / "design.md").is_file() and (ROOT / "docs" / "findings.md").is_file()


@pytest.mark.parametrize("page", DOCS, ids=_name)
def test_relative_links_and_images_resolve_inside_the_repository(page):
    bad = []
    for target in LINK.findall(CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):  # http(s), mailto, an anchor here
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not _inside_repo(path):
            bad.append(f"{target} (outside the repository)")
        elif not path.exists():
            bad.append(target)
    assert not bad, f"{_name(page)}: links to missing files: {bad}"


@pytest.mark.parametrize("page", DOCS, ids=_name)
def test_backticked_repository_paths_exist(page):
    missing = []
    for code in _inline_code(page.read_text(encoding="utf-8")):
        code = code.strip()
        if not REPO_PATH.fullmatch(code) or "*" in code or "<" in code:  # not a path, or a pattern / placeholder
            continue
        path = ROOT / code
        if not path.exists():
            missing.append(code)
    assert not missing, f"{_name(page)}: names paths that do not exist: {missing}"


def _markdown_texts():
    """(where, text) of README.md, docs/*.md and every markdown cell of the notebooks."""
    texts = [pytest.param(page.read_text(encoding="utf-8"), id=_name(page)) for page in DOCS]
    for nb in NOTEBOOKS:
        for i, cell in enumerate(json.loads(nb.read_text(encoding="utf-8"))["cells"]):
            if cell["cell_type"] == "markdown":
                texts.append(pytest.param("".join(cell["source"]), id=f"{nb.stem}-cell{i}"))
    return texts


@pytest.mark.parametrize("text", _markdown_texts())
def test_text_has_no_run_log_words_and_no_scratch_paths(request, text):
    where = request.node.callspec.id
    said, scratch = SESSION.findall(text), SCRATCH.findall(text)
    assert not said, f"{where}: says {said}; give the setting, machine and date instead"
    assert not scratch, f"{where}: names absolute scratch paths {scratch}; use paths inside the clone"


MAX_CELL_LINES = 15


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_parameters_then_one_setup_cell_and_keeps_cells_short(path):
    """Title and parameters first; then one setup cell (config.setup: versions, machine, the settings the
    notebook uses); no code cell longer than about a screen's worth of thought."""
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert "parameters" in code[0].get("metadata", {}).get("tags", []), f"{path.name}: first code cell is not tagged parameters"
    setup = re.compile(r"\bsetup\(\s*PRESET\b")
    assert setup.search("".join(code[1]["source"])), f"{path.name}: the cell after parameters is not config.setup"
    assert sum(bool(setup.search("".join(c["source"]))) for c in code) == 1, f"{path.name}: more than one setup cell"
    long = [(i, len("".join(c["source"]).splitlines())) for i, c in enumerate(cells)
            if c["cell_type"] == "code" and len("".join(c["source"]).splitlines()) > MAX_CELL_LINES]
    assert not long, f"{path.name}: code cells over {MAX_CELL_LINES} lines (cell index, lines): {long}"
