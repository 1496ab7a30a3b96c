"""The public API is a contract: every name in `fdpo.__all__` keeps its signature.

tests/public_api.json records, for each public name, the parameters (name, kind, default) of the
function, or of the class's public methods, and a dataclass's fields. A change may add keyword-only
parameters with defaults, methods and trailing dataclass fields; it may not rename, remove, reorder
or change the default of anything recorded. Regenerate the record only for a deliberate, documented
API change: `python tests/test_public_api.py > tests/public_api.json`.
"""

import inspect
import json
import sys
from pathlib import Path

import fdpo

RECORD = Path(__file__).with_name("public_api.json")


def parameters(fn) -> list[dict]:
    """name, kind, repr of the default and whether there is one, for each parameter of fn."""
    out = []
    for p in inspect.signature(fn).parameters.values():
        has_default = p.default is not inspect.Parameter.empty
        out.append({"name": p.name, "kind": p.kind.name, "default": repr(p.default) if has_default else None,
                    "has_default": has_default})
    return out


def describe_api() -> dict:
    """The recordable shape of `fdpo.__all__` (see the module docstring)."""
    api = {}
    for name in fdpo.__all__:
        obj = getattr(fdpo, name)
        if not inspect.isclass(obj):
            api[name] = {"kind": "function", "parameters": parameters(obj)}
            continue
        entry = {"kind": "class", "members": {}}
        for member in sorted(vars(obj)):
            if member.startswith("_") and member not in ("__init__", "__call__"):
                continue
            value = inspect.getattr_static(obj, member)
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if inspect.isfunction(value):
                entry["members"][member] = parameters(value)
            elif isinstance(value, property):
                entry["members"][member] = "property"
        if hasattr(obj, "__dataclass_fields__"):
            entry["fields"] = list(obj.__dataclass_fields__)
        api[name] = entry
    return {"names": sorted(fdpo.__all__), "api": api}


def compatible(recorded: list[dict], current: list[dict]) -> bool:
    """Whether `current` keeps every recorded parameter as it was, adding only keyword-only ones with defaults."""
    added = [p for p in current if p["name"] not in {r["name"] for r in recorded}]
    if any(p["kind"] not in ("KEYWORD_ONLY", "VAR_KEYWORD") or (p["kind"] == "KEYWORD_ONLY" and not p["has_default"])
           for p in added):
        return False
    return [p for p in current if p not in added] == recorded


def test_public_names_and_signatures_are_as_recorded():
    record, now = json.loads(RECORD.read_text(encoding="utf-8")), describe_api()
    assert now["names"] == record["names"]
    for name, was in record["api"].items():
        current = now["api"][name]
        assert current["kind"] == was["kind"], name
        if was["kind"] == "function":
            assert compatible(was["parameters"], current["parameters"]), name
            continue
        assert current.get("fields", [])[:len(was.get("fields", []))] == was.get("fields", []), f"{name} fields"
        for member, signature in was["members"].items():
            assert member in current["members"], f"{name}.{member} is gone"
            if signature == "property":
                assert current["members"][member] == "property", f"{name}.{member}"
            else:
                assert compatible(signature, current["members"][member]), f"{name}.{member}"


def test_the_compatibility_rule_refuses_breaking_changes():
    base = parameters(lambda hidden, weight, *, backend="auto": None)
    assert compatible(base, parameters(lambda hidden, weight, *, backend="auto", chunk=None: None))
    assert not compatible(base, parameters(lambda hidden, weight, *, backend="torch": None))
    assert not compatible(base, parameters(lambda weight, hidden, *, backend="auto": None))
    assert not compatible(base, parameters(lambda hidden, weight, extra, *, backend="auto": None))
    assert not compatible(base, parameters(lambda hidden, *, backend="auto": None))
    assert not compatible(base, parameters(lambda hidden, weight, *, backend="auto", required: None))


if __name__ == "__main__":
    json.dump(describe_api(), sys.stdout, indent=1, sort_keys=True)
    print()
