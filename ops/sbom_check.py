"""Check a CycloneDX SBOM against the CycloneDX JSON schema of its spec version.

    python -m ops.sbom_check dist/tessera-serve-0.1.0.cdx.json [--require tessera-serve ...]

Runs in the release tools' environment (requirements-release.lock), which brings
cyclonedx-python-lib and its bundled schemas. Exit 1 on a schema error or a missing component.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def validate(text: str) -> str | None:
    """The first schema error, or None when the document is valid for its specVersion."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    version = json.loads(text).get("specVersion")
    try:
        schema = SchemaVersion.from_version(version)
    except (ValueError, KeyError):
        return f"unknown specVersion {version!r}"
    error = JsonStrictValidator(schema).validate_str(text)
    return None if error is None else str(error)[:2000]


def component_names(document: dict) -> set[str]:
    names = {c["name"].lower() for c in document.get("components", [])}
    root = document.get("metadata", {}).get("component")
    return names | ({root["name"].lower()} if root else set())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.sbom_check", description=__doc__.splitlines()[0])
    parser.add_argument("sbom")
    parser.add_argument("--require", nargs="*", default=[], help="component names that must be listed")
    args = parser.parse_args(argv)
    text = Path(args.sbom).read_text(encoding="utf-8")
    error = validate(text)
    if error:
        print(f"sbom check: {args.sbom} is not valid CycloneDX: {error}", file=sys.stderr)
        return 1
    document = json.loads(text)
    missing = [n for n in args.require if n.lower() not in component_names(document)]
    if missing:
        print(f"sbom check: {args.sbom} lacks {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"sbom check: {args.sbom}: valid CycloneDX {document['specVersion']}, "
          f"{len(document.get('components', []))} components")
    return 0


if __name__ == "__main__":
    sys.exit(main())
