"""Validates the OpenAPI document in the file named by argv[1] with
`openapi-spec-validator` (PyPI) and prints, as JSON for tests/operations.rs, its version,
its operations ({path: [method...]}) and its schemas' property names and required lists.
"""
import json
import sys

from openapi_spec_validator import validate

with open(sys.argv[1], encoding="utf-8") as f:
    document = json.load(f)
validate(document)  # raises on an invalid document
methods = {"get", "post", "put", "delete", "patch", "head", "options"}
print(json.dumps({
    "openapi": document["openapi"],
    "operations": {path: sorted(m for m in item if m in methods)
                   for path, item in document["paths"].items()},
    "schemas": {name: {"properties": sorted(schema.get("properties", {})),
                       "required": sorted(schema.get("required", []))}
                for name, schema in document["components"]["schemas"].items()},
}))
