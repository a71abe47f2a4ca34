"""Why an item ended where it did: one bit per rule, rendered as a readable list per row."""
from __future__ import annotations

from enum import IntFlag
from functools import lru_cache

import numpy as np
import pyarrow as pa


class Fate(IntFlag):
    BOOSTED_NEW = 1 << 0          # rule_weight x new-item multiplier
    BOOSTED_CAMPAIGN = 1 << 1     # rule_weight x campaign multiplier
    DEMOTED_LOW_QUALITY = 1 << 2  # rule_weight x low-quality multiplier (< 1)
    FILTERED_LOW_QUALITY = 1 << 3  # not eligible: low quality with action "filter"
    VALUE_DEFAULTED = 1 << 4      # a column factor's value (e.g. price) missing or <= 0, counted as 0
    FILTERED_VALUE = 1 << 5       # not eligible: a column factor's value missing or <= 0, on_bad_value "filter"
    CAPPED = 1 << 6               # not eligible in this request: the item's daily cap was used up
    WINDOW_DEFERRED = 1 << 7      # passed over by N-pick-1 at least once (shown later, or not at all)
    WINDOW_RELAXED = 1 << 8       # placed although it breaks N-pick-1 (fallback "relax")
    CUT = 1 << 9                  # eligible but below the list size


NAMES = tuple(f.name.lower() for f in Fate)


@lru_cache(maxsize=1)
def _labels() -> pa.Array:
    """Every combination of bits as a comma-separated string (2^10 short strings)."""
    n = 1 << len(NAMES)
    return pa.array([",".join(name for i, name in enumerate(NAMES) if code >> i & 1) for code in range(n)])


def describe(flags: np.ndarray) -> pa.DictionaryArray:
    """Rule labels per row, as a dictionary array indexed by the bit mask itself (no per-row work)."""
    return pa.DictionaryArray.from_arrays(pa.array(flags.astype(np.int16)), _labels())


def counts(flags: np.ndarray) -> dict[str, int]:
    """Rows carrying each rule's bit."""
    return {name: int(np.count_nonzero(flags & int(f))) for name, f in zip(NAMES, Fate)}
