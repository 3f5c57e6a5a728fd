"""Publish a release's artifacts with `gh`, or say what would be published (a dry run).

    python -m ops.release --dist dist --version 0.1.0 [--publish]

Every artifact must be present and match SHA256SUMS: the wheel, the sdist, the CycloneDX
SBOM, the licence report. With --publish, `gh` on PATH and credentials (GH_TOKEN, or a
`gh auth` login) it runs `gh release create` with them; otherwise it prints the commands and
exits 0. The build provenance attestation is made in GitHub Actions
(actions/attest-build-provenance, which needs the workflow's OIDC token); this verifies it
with `gh attestation verify` after publishing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

NAME = "tessera-serve"


def artifacts(dist: Path, version: str) -> dict[str, Path]:
    stem = NAME.replace("-", "_")
    return {"wheel": dist / f"{stem}-{version}-py3-none-any.whl", "sdist": dist / f"{stem}-{version}.tar.gz",
            "sbom": dist / f"{NAME}-{version}.cdx.json", "licence report": dist / "licences.md",
            "checksums": dist / "SHA256SUMS"}


def check(found: dict[str, Path]) -> list[str]:
    """What is wrong: a missing artifact or a checksum that does not match."""
    problems = [f"missing {kind}: {path}" for kind, path in found.items() if not path.is_file()]
    if problems:
        return problems
    sums = {}
    for line in found["checksums"].read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        sums[name.strip()] = digest
    for kind, path in found.items():
        if kind == "checksums":
            continue
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if sums.get(path.name) != actual:
            problems.append(f"{path.name}: SHA256SUMS says {sums.get(path.name)}, the file is {actual}")
    return problems


def can_publish() -> str | None:
    """None when `gh` can publish; else why not."""
    if not shutil.which("gh"):
        return "gh is not installed"
    if not os.environ.get("GH_TOKEN") and subprocess.run(["gh", "auth", "status"], capture_output=True).returncode:
        return "gh has no credentials (GH_TOKEN or gh auth login)"
    return None


def commands(found: dict[str, Path], version: str, repo: str | None) -> list[list[str]]:
    files = [str(p) for p in found.values()]
    where = ["--repo", repo] if repo else []  # gh infers it inside a clone
    return [["gh", "release", "create", f"v{version}", *files, *where, "--title", f"{NAME} {version}",
             "--notes", f"{NAME} {version}: wheel, sdist, CycloneDX SBOM, licence report, SHA256SUMS."],
            *(["gh", "attestation", "verify", str(found[k]), "--repo", repo or "OWNER/NAME"] for k in ("wheel", "sdist"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.release", description=__doc__.splitlines()[0])
    parser.add_argument("--dist", default="dist")
    parser.add_argument("--version", required=True)
    parser.add_argument("--repo", default=os.environ.get("GITHUB_REPOSITORY"), help="owner/name [GITHUB_REPOSITORY]")
    parser.add_argument("--publish", action="store_true", help="publish when gh and credentials are there")
    args = parser.parse_args(argv)
    found = artifacts(Path(args.dist), args.version)
    problems = check(found)
    if problems:
        for problem in problems:
            print(f"release: {problem}", file=sys.stderr)
        return 1
    for kind, path in found.items():
        print(f"release: {kind:15} {path} ({path.stat().st_size:,} bytes)")
    why_not = can_publish() if args.publish else "no --publish"
    for command in commands(found, args.version, args.repo):
        if why_not:
            print("release: dry run, would run: " + shlex.join(command))
        elif subprocess.run(command).returncode:
            print(f"release: failed: {shlex.join(command)}", file=sys.stderr)
            return 1
    if why_not:
        print(f"release: dry run ({why_not}); nothing was published")
    return 0


if __name__ == "__main__":
    sys.exit(main())
