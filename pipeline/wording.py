"""How messages name a list that may be long: the first few, then how many more."""
from collections.abc import Sequence


def first_few(names: Sequence[str], limit: int = 10, sep: str = ", ") -> str:
    """``a, b, c and 7 more``: a message naming hundreds of class folders or changed settings would
    bury the fix it ends with; the count still says how large the problem is."""
    shown = sep.join(names[:limit])
    return shown + (f"{sep.rstrip(' ,')} and {len(names) - limit} more" if len(names) > limit else "")
