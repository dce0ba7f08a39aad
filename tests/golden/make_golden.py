"""Regenerate ``tests/golden/golden.npz`` from the current code (CPU, fixed seeds).

Run from the repository root: ``python tests/golden/make_golden.py``. Only do this for an
intended change of results; the test compares against this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from test_golden import GOLDEN, compute_outputs, fingerprint  # noqa: E402 (after the path insert)


def main() -> None:
    out = compute_outputs()
    assert "__fingerprint__" not in out
    out["__fingerprint__"] = np.asarray(fingerprint(), dtype=str)
    for k, v in out.items():
        assert v.dtype.kind != "O", f"{k} has dtype object (would need pickle)"
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(GOLDEN, **out)
    with np.load(GOLDEN, allow_pickle=False) as z:
        for k in out:
            np.testing.assert_array_equal(z[k], out[k])
    print(f"wrote {GOLDEN} ({len(out)} arrays; {out['__fingerprint__']})")


if __name__ == "__main__":
    main()
