"""Where the report reads results and writes docs and plots (the repository's own folders)."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
DOCS = ROOT / "docs"
IMG = DOCS / "img"


def doc_files(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    """The markdown files whose tables are rendered: the README and every docs page."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]
