#!/usr/bin/env python3
"""Checks real answers of the service against its OpenAPI 3.1 document.

Usage: validate.py OPENAPI_JSON ANSWERS_JSON

ANSWERS_JSON is a list of {"path", "query", "status", "content_type", "body"} as the test got
them from the running binary. Each answer must be documented (path, method GET, status, media
type) and its body must match the documented schema (JSON Schema 2020-12, with the document's
components). Every documented path must have been asked at least once, and every 4xx answer
must carry a message. Exits 1 with every failure listed.
"""

import json
import sys

import jsonschema
import referencing
import referencing.jsonschema


def absolute(schema):
    """The schema with the document's local references ("#/components/...") made absolute."""
    if isinstance(schema, dict):
        return {k: ("urn:openapi" + v if k == "$ref" and v.startswith("#") else absolute(v)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [absolute(v) for v in schema]
    return schema


def main(openapi_path: str, answers_path: str) -> int:
    with open(openapi_path) as f:
        doc = json.load(f)
    with open(answers_path) as f:
        answers = json.load(f)
    assert doc["openapi"].startswith("3.1"), "an OpenAPI 3.1 document"
    # The document itself is the resource that "#/components/..." refers to.
    resource = referencing.Resource.from_contents(doc, default_specification=referencing.jsonschema.DRAFT202012)
    registry = referencing.Registry().with_resource("urn:openapi", resource)
    failures = []
    asked = set()
    for a in answers:
        where = f"{a['path']}{'?' + a['query'] if a['query'] else ''} → {a['status']}"
        asked.add(a["path"])
        operation = doc["paths"].get(a["path"], {}).get("get")
        if operation is None:
            failures.append(f"{where}: path not documented")
            continue
        response = operation["responses"].get(str(a["status"]))
        if response is None:
            failures.append(f"{where}: status not documented")
            continue
        media = a["content_type"].split(";")[0].strip()
        content = response.get("content", {}).get(media)
        if content is None:
            failures.append(f"{where}: media type {media} not documented")
            continue
        if media == "application/json" or media == "text/event-stream":
            schema = content.get("x-event-data") if media == "text/event-stream" else content["schema"]
            body = json.loads(a["body"])
            validator = jsonschema.Draft202012Validator(absolute(schema), registry=registry)
            for error in validator.iter_errors(body):
                failures.append(f"{where}: {'/'.join(map(str, error.absolute_path))}: {error.message}")
        if 400 <= a["status"] < 500:
            message = json.loads(a["body"]).get("error", "") if media == "application/json" else ""
            if not message:
                failures.append(f"{where}: a 4xx without a message")
    for path in doc["paths"]:
        if path not in asked:
            failures.append(f"{path}: documented but never asked")
    for f in failures:
        print(f"FAIL {f}")
    print(f"{len(answers)} answers checked against {len(doc['paths'])} documented paths, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
