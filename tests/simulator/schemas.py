"""OpenAI's response schemas (from openai-openapi.yaml) as jsonschema validators for the tests.

The spec is 3 MB of YAML and takes over a second to parse, so the components the simulator must
match are kept extracted in ``openai_schemas.json`` beside this file (with everything they
``$ref``). When the full spec is at hand (``IMAGEBATCH_OPENAI_SPEC``, or the team's reference copy
beside the repository) a test checks that the extract still equals it; regenerate with
``python -m tests.simulator.schemas path/to/openai-openapi.yaml``.

One relaxation, the spec's own: it writes optional fields as non-nullable, yet its examples (and
the API) send ``null`` for them (``"errors": null``, ``"failed_at": null``). So a property that is
not ``required`` also accepts ``null``. Required fields stay strict.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

EXTRACT = Path(__file__).with_name("openai_schemas.json")
ROOTS = (
    "Batch",
    "OpenAIFile",
    "ImagesResponse",
    "Error",
    "ErrorResponse",
    "ListBatchesResponse",
    "ListFilesResponse",
    "ListModelsResponse",
    "Model",
    "DeleteFileResponse",
)
_PREFIX = "#/components/schemas/"


def spec_path() -> Path | None:
    """The full spec, if this machine has it."""
    env = os.environ.get("IMAGEBATCH_OPENAI_SPEC")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[2]
    candidates.append(repo.parent / "shared" / "reference" / "openai-openapi.yaml")
    return next((p for p in candidates if p.is_file()), None)


def extract(spec: dict[str, Any]) -> dict[str, Any]:
    """The ROOTS components and everything they reference."""
    components = spec["components"]["schemas"]
    out: dict[str, Any] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out[name] = components[name]
        todo.extend(_refs(components[name]))
    return dict(sorted(out.items()))


def _refs(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_PREFIX):
            found.append(ref[len(_PREFIX) :])
        for value in node.values():
            found.extend(_refs(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_refs(value))
    return found


def load_spec(path: Path) -> dict[str, Any]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open() as f:
        data: dict[str, Any] = yaml.load(f, Loader=loader)
    return data


def _nullable_optionals(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable_optionals(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_optionals(v) for k, v in node.items()}
    props = node.get("properties")
    if isinstance(props, dict):
        required = set(node.get("required", []))
        node["properties"] = {
            k: v if k in required else {"anyOf": [v, {"type": "null"}]} for k, v in props.items()
        }
    return node


@lru_cache(maxsize=1)
def _components() -> dict[str, Any]:
    data = json.loads(EXTRACT.read_text())
    schemas: dict[str, Any] = _nullable_optionals(copy.deepcopy(data["schemas"]))
    return schemas


def validator(name: str) -> Draft202012Validator:
    """A validator for ``#/components/schemas/{name}`` with its refs resolvable."""
    schema = {"$ref": _PREFIX + name, "components": {"schemas": _components()}}
    return Draft202012Validator(schema)


def check(name: str, instance: Any) -> None:
    """Raise ``AssertionError`` listing every way ``instance`` breaks schema ``name``."""
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [
            f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors
        ]
        raise AssertionError(f"response does not match {name}:\n" + "\n".join(lines))


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv else spec_path()
    if path is None:
        raise SystemExit("usage: python -m tests.simulator.schemas path/to/openai-openapi.yaml")
    data = {"source": "openai/openai-openapi openapi.yaml", "schemas": extract(load_spec(path))}
    EXTRACT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {EXTRACT} ({len(data['schemas'])} schemas)")


if __name__ == "__main__":
    main(sys.argv[1:])
