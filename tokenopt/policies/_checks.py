"""Validation helpers shared by policy configs: each error says what was wrong and how to fix it."""

from __future__ import annotations

from typing import Any, Optional


def check_blocks(policy: str, blocks: Any) -> Optional[tuple[int, ...]]:
    if blocks is None:
        return None
    if isinstance(blocks, int) or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
        raise ValueError(f"{policy}: blocks must be a sequence of block indices, e.g. blocks=(3, 6, 9); got {blocks!r}")
    return tuple(blocks)


def check_int(policy: str, name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{policy}: {name} must be an int >= {low}; got {value!r}")
    return value


def check_count_or_share(policy: str, name: str, value: Any) -> Any:
    """An int count >= 1, or a float share in (0, 1]."""
    if isinstance(value, bool):
        pass
    elif isinstance(value, int) and value >= 1:
        return value
    elif isinstance(value, float) and 0.0 < value <= 1.0:
        return value
    raise ValueError(
        f"{policy}: {name} must be a token count (int >= 1) or a share of the patch tokens (float in (0, 1]); "
        f"got {value!r}. Example: {name}=98 or {name}=0.5"
    )
