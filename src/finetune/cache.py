"""Where finetune keeps files it derives once and reuses (converted weights).

`FINETUNE_CACHE_DIR` overrides the location; otherwise `$XDG_CACHE_HOME/finetune` or
`~/.cache/finetune`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Returns (and creates) a folder inside the user cache directory."""
    root = os.environ.get("FINETUNE_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) / "finetune" if xdg else Path.home() / ".cache" / "finetune"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
