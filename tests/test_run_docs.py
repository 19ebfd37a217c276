"""The code's pointers into the architecture document lead somewhere."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
CITATION = re.compile(r"docs/ARCHITECTURE\.md,\s+([A-Z][\w ,]*?[a-z])(?=[).;:]|\s*$)", re.M)


def _sources():
    for folder in ("src", "tests", "bench", "examples"):
        yield from (ROOT / folder).rglob("*.py")


def test_every_citation_names_a_heading_and_no_file_cites_a_missing_document():
    headings = set(re.findall(r"^## (.+)$", DOC.read_text(encoding="utf-8"), re.M))
    cited = {}
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        assert "DESIGN" + ".md" not in text, f"{path} cites a design file the repo lacks"
        for section in CITATION.findall(" ".join(text.split())):
            cited.setdefault(section, []).append(path.name)
    assert cited, "no citation found: the pattern is stale"
    missing = {s: files for s, files in cited.items() if s not in headings}
    assert not missing, f"citations of sections that do not exist: {missing}"
