"""Prepare a dataset: `python data/prepare.py INPUT --out DIR [options]` (see --help).

Without INPUT it builds the bundled corpus of Python standard library docstrings into data/pydocs. This is a thin
wrapper over `python -m minigpt2.prepare` (also installed as `minigpt2-prepare`).
"""

import sys
from pathlib import Path

# Run from a checkout without `pip install -e .`: put the repository root ahead of this folder on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigpt2.prepare import cli  # noqa: E402

if __name__ == "__main__":
    cli()
