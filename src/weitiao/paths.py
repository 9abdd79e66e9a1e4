"""Where weitiao keeps converted models and tokenized data: $WEITIAO_CACHE, else ~/.cache/weitiao."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("WEITIAO_CACHE") or Path.home() / ".cache" / "weitiao")
    folder = root.joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
