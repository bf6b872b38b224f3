"""The reference's tutorial dataset: fill50k from ``./training/fill50k`` (see ``tools/make_fill50k.py``).

    python -m tools.make_fill50k --out training/fill50k --n 50000
    python tutorial_dataset.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from cldm.data import Fill50kDataset


class MyDataset(Fill50kDataset):
    """Samples of ``./training/fill50k/prompt.json``: jpg (H, W, 3) in [-1, 1], txt str, hint (H, W, 3) in [0, 1]."""

    def __init__(self, root: str | Path = "./training/fill50k", resolution: int | None = None,
                 resize: str = "center-crop") -> None:
        super().__init__(root, resolution, resize)


def main() -> int:
    try:
        dataset = MyDataset()
        item = dataset[0]
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err} (create it with: python -m tools.make_fill50k --out training/fill50k)", file=sys.stderr)
        return 1
    print(len(dataset))
    print(item["txt"])
    print(item["jpg"].shape)
    print(item["hint"].shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
