"""Why a compile-cache lookup missed: the settings that differ from the closest entry already there.

Every entry's manifest keeps the key's details (``cache.cache_key_details``). On a miss the entries of
the cache root are compared with the details of this start, field by field (nested dicts flattened to
dotted names), and the entry with the fewest differences explains the miss in one line:
``miss: compile_sizes changed [1] -> []``.
"""

import json
import os

_PREFIXES = ("compilation_config.",)  # the user's own settings are named as they are passed
MAX_LISTED = 3


def flatten(details: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in details.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _label(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _show(value) -> str:
    return json.dumps(value, sort_keys=True, default=str) if value is not None else "unset"


def differences(old: dict, new: dict) -> list[str]:
    """``"<field> changed <old> -> <new>"`` for each field that differs, in name order."""
    a, b = (
        flatten(json.loads(json.dumps(old, default=str))),
        flatten(json.loads(json.dumps(new, default=str))),
    )
    return [
        f"{_label(k)} changed {_show(a.get(k))} -> {_show(b.get(k))}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def entry_details(root: str) -> list[tuple[float, dict]]:
    """(modification time, details) of every complete entry under ``root``."""
    found = []
    try:
        names = os.listdir(root)
    except OSError:
        return found
    for name in names:
        path = os.path.join(root, name, "manifest.json")
        try:
            with open(path) as f:
                data = json.load(f)
            found.append((os.path.getmtime(path), data["details"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def miss_reason(root: str, details: dict) -> str:
    """One line: why no entry under ``root`` has these details."""
    entries = entry_details(root)
    if not entries:
        return "miss: the cache is empty"
    # fewest differences first, the newest entry among equals
    best = min(entries, key=lambda e: (len(differences(e[1], details)), -e[0]))
    diffs = differences(best[1], details)
    if not diffs:  # same details under another key: the key function itself changed
        return "miss: the cache key format changed"
    more = f" (+{len(diffs) - MAX_LISTED} more)" if len(diffs) > MAX_LISTED else ""
    return "miss: " + "; ".join(diffs[:MAX_LISTED]) + more
