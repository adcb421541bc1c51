"""Re-vendor the Kubernetes JSON schemas that test_k8s.py validates deploy/k8s against.

    pip download --no-deps kubernetes-validate==1.37.0 -d DIR
    python tests/deploy/schemas/refresh.py DIR/kubernetes_validate-1.37.0-py3-none-any.whl

Reads kubernetes-validate's strict schemas (Kubernetes' OpenAPI spec turned into JSON Schema
2020-12, additionalProperties false, Apache-2.0) for the kinds in :data:`KINDS` out of the wheel,
keeps only the definitions those kinds reach, drops the prose (descriptions), and writes them
under ``kubernetes-<version>-strict/``. The KEDA schema beside them is written by hand (see
README.md). Fails, writing nothing, if a kind or a referenced definition is missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VERSION = "v1.32.0"
# Every built-in kind in deploy/k8s, as kubernetes-validate names its schema files.
KINDS = (
    "namespace-v1",
    "configmap-v1",
    "service-v1",
    "deployment-apps-v1",
    "horizontalpodautoscaler-autoscaling-v2",
    "poddisruptionbudget-policy-v1",
)
DEFS_URI = "https://kubernetes.io/api/_definitions.json"
# Keywords whose value is a schema, or a map or list of schemas: prose is dropped only there, so
# a property that happens to be named "description" survives.
_SCHEMA_MAP = ("properties", "$defs", "patternProperties", "dependentSchemas")
_SCHEMA_LIST = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def strip(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "description" and isinstance(value, str):
            continue
        if key in _SCHEMA_MAP and isinstance(value, dict):
            out[key] = {name: strip(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LIST and isinstance(value, list):
            out[key] = [strip(sub) for sub in value]
        elif key in _SCHEMA_ONE:
            out[key] = strip(value)
        else:
            out[key] = value
    return out


def refs(schema: Any) -> set[str]:
    """Names of the $defs entries ``schema`` refers to."""
    found: set[str] = set()
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and "#/$defs/" in ref:
            found.add(ref.split("#/$defs/", 1)[1])
        for value in schema.values():
            found |= refs(value)
    elif isinstance(schema, list):
        for value in schema:
            found |= refs(value)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("wheel", type=Path, help="a kubernetes-validate wheel")
    args = parser.parse_args(argv)
    prefix = f"kubernetes_validate/kubernetes-json-schema/{VERSION}-local-strict/"
    with zipfile.ZipFile(args.wheel) as wheel:
        kinds = {kind: json.loads(wheel.read(f"{prefix}{kind}.json")) for kind in KINDS}
        defs = json.loads(wheel.read(f"{prefix}_definitions.json"))
    assert defs.get("$id") == DEFS_URI, defs.get("$id")
    wanted: set[str] = set()
    todo = set().union(*(refs(schema) for schema in kinds.values()))
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        if name not in defs["$defs"]:
            raise SystemExit(f"{name} is referenced but not defined")
        wanted.add(name)
        todo |= refs(defs["$defs"][name]) - wanted
    pruned = {k: v for k, v in defs.items() if k != "$defs"}
    pruned["$defs"] = {name: strip(defs["$defs"][name]) for name in sorted(wanted)}
    out = HERE / f"kubernetes-{VERSION.rsplit('.', 1)[0]}-strict"
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "_definitions.json").write_text(json.dumps(pruned, indent=1, sort_keys=True) + "\n")
    for kind, schema in kinds.items():
        (tmp / f"{kind}.json").write_text(
            json.dumps(strip(schema), indent=1, sort_keys=True) + "\n"
        )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(
        f"{len(kinds)} kinds, {len(wanted)} definitions -> {out.relative_to(HERE)}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
