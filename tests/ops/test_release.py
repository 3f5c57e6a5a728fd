"""`make release`'s last step (ops/release.py) on made-up artifacts, and the GitHub workflow's shape."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from ops import release

REPO = Path(__file__).resolve().parents[2]


def _dist(tmp_path: Path) -> Path:
    found = release.artifacts(tmp_path, "9.9.9")
    for kind, path in found.items():
        if kind != "checksums":
            path.write_bytes(kind.encode())
    found["checksums"].write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                                          for k, p in found.items() if k != "checksums"))
    return tmp_path


def test_dry_run_lists_every_artifact_and_the_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no gh
    assert release.main(["--dist", str(_dist(tmp_path)), "--version", "9.9.9", "--repo", "o/n", "--publish"]) == 0
    out = capsys.readouterr().out
    for name in ("tessera_serve-9.9.9-py3-none-any.whl", "tessera_serve-9.9.9.tar.gz", "tessera-serve-9.9.9.cdx.json",
                 "licences.md", "SHA256SUMS"):
        assert f"{tmp_path / name}" in out
    assert "dry run, would run: gh release create v9.9.9 " in out
    assert f"gh attestation verify {tmp_path / 'tessera_serve-9.9.9.tar.gz'} --repo o/n" in out
    assert "dry run (gh is not installed); nothing was published" in out


def test_a_missing_or_changed_artifact_stops_the_release(tmp_path, capsys):
    dist = _dist(tmp_path)
    (dist / "licences.md").write_text("edited after the checksums")
    assert release.main(["--dist", str(dist), "--version", "9.9.9"]) == 1
    assert "licences.md: SHA256SUMS says" in capsys.readouterr().err
    (dist / "tessera-serve-9.9.9.cdx.json").unlink()
    assert release.check(release.artifacts(dist, "9.9.9")) == [f"missing sbom: {dist / 'tessera-serve-9.9.9.cdx.json'}"]


def test_the_workflow_tests_on_every_push_and_releases_on_tags():
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "ci.yml").read_text())
    assert workflow[True]["push"]["tags"] == ["v*"] and "pull_request" in workflow[True]
    jobs = workflow["jobs"]
    runs = {name: [s.get("run", s.get("uses", "")) for s in job["steps"]] for name, job in jobs.items()}
    assert "make test" in runs["test"] and {"make audit", "make audit-extras"} <= set(runs["audit"])
    assert jobs["release"]["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert jobs["release"]["needs"] == ["test", "audit"]
    assert jobs["release"]["permissions"] == {"contents": "write", "id-token": "write", "attestations": "write"}
    steps = runs["release"]
    assert steps.index("make release") < steps.index("actions/attest-build-provenance@v2") < len(steps) - 1
    assert "--publish" in steps[-1]


@pytest.mark.parametrize("target", ["audit", "audit-extras", "sbom", "release"])
def test_the_makefile_has_the_release_targets(target):
    assert f"\n{target}:" in (REPO / "Makefile").read_text()
