"""The SBOM step: cyclonedx-py's output passes ops/sbom_check.py (the CycloneDX 1.6 JSON schema),
and a broken document does not. Runs where the release tools are installed (`make audit`,
`make sbom` or `make release` build .venv-release from requirements-release.lock)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".venv-release" / "bin"
pytestmark = pytest.mark.skipif(not (TOOLS / "cyclonedx-py").is_file(),
                                reason="release tools not installed (make sbom builds .venv-release)")


def _check(path: Path, *required: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TOOLS / "python"), "-m", "ops.sbom_check", str(path), "--require", *required],
                          cwd=REPO, capture_output=True, text=True)


def test_the_generated_sbom_validates_and_a_broken_one_does_not(tmp_path):
    # The release tools' own environment: the same generator as `make sbom`, on a smaller set.
    sbom = tmp_path / "tools.cdx.json"
    subprocess.run([str(TOOLS / "cyclonedx-py"), "environment", "--pyproject", "pyproject.toml", "--spec-version", "1.6",
                    "--output-format", "JSON", "--output-reproducible", "--output-file", str(sbom),
                    str(TOOLS / "python")], cwd=REPO, check=True, capture_output=True)
    document = json.loads(sbom.read_text())
    assert document["bomFormat"] == "CycloneDX" and document["specVersion"] == "1.6"
    assert document["metadata"]["component"]["name"] == "tessera-serve"
    ok = _check(sbom, "tessera-serve", "cyclonedx-bom")
    assert ok.returncode == 0 and "valid CycloneDX 1.6" in ok.stdout

    assert _check(sbom, "jax").returncode == 1  # not in the tools' environment
    document["components"][0]["type"] = "not-a-component-type"
    broken = tmp_path / "broken.cdx.json"
    broken.write_text(json.dumps(document))
    result = _check(broken)
    assert result.returncode == 1 and "is not valid CycloneDX" in result.stderr
