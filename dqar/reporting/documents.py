"""Documents on disk: the ablation results file's format, and replacing one `## section` of a Markdown file."""
from __future__ import annotations

import json
from pathlib import Path

from dqar.errors import DqarError
from dqar.io import atomic_write_text

RESULTS_FILE = "ablation_results.json"
RESULTS_FORMAT = "dqar-ablation/1"


def load_results(out: Path) -> dict | None:
    """The results file in `out`, or None when there is none (or it holds no configurations)."""
    path = Path(out) / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DqarError(f"{path} is not readable JSON ({exc})", "move it away or choose another --out") from None
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise DqarError(f"{path} is not a dqar ablation results file", "choose another --out")
    return data if data.get("records") else None


def replace_section(text: str, section: str, body: str) -> str:
    """`text` with the `## section` block replaced by `body` (appended if absent); other sections untouched."""
    lines = text.splitlines()
    header = f"## {section}"
    starts = [i for i, line in enumerate(lines) if line.strip() == header]
    if not starts:
        head = lines if any(line.strip() for line in lines) else ["# Fidelity"]
        return "\n".join([*head, "", *body.strip("\n").splitlines()]).strip("\n") + "\n"
    start = starts[0]
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    new = [*lines[:start], *body.strip("\n").splitlines(), *([""] + lines[end:] if end < len(lines) else [])]
    return "\n".join(new).strip("\n") + "\n"


def write_section(doc: Path, section: str, body: str) -> Path:
    """Replace (or append) `## section` of the Markdown file `doc`, atomically."""
    doc = Path(doc)
    text = doc.read_text() if doc.is_file() else ""
    atomic_write_text(doc, replace_section(text, section, body))
    return doc
