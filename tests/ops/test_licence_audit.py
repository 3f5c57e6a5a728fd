"""The licence audit: SPDX expressions, where a licence is read from, the exceptions file, and
a GPL package injected beside the locked environment."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ops import licence_audit as la


@pytest.mark.parametrize("expression, allowed", [
    ("MIT", True), ("Apache-2.0 OR BSD-3-Clause", True), ("MIT OR GPL-3.0-only", True),
    ("MIT AND GPL-3.0-only", False), ("GPL-2.0-or-later", False), ("(MIT OR LGPL-2.1) AND Apache-2.0", True),
    ("(MIT AND LGPL-2.1) OR MPL-2.0", False), ("Apache-2.0 WITH LLVM-exception", True), ("Apache-2.0+", True),
    ("MPL-2.0 AND MIT", False),
])
def test_spdx_expressions(expression, allowed):
    assert la.spdx_allowed(expression) is allowed


@pytest.mark.parametrize("bad", ["MIT OR", "(MIT", "MIT)", "", "GNU General Public License v3"])
def test_what_is_not_an_expression_raises(bad):
    with pytest.raises(ValueError):
        la.spdx_allowed(bad)


def test_where_the_licence_is_read_from():
    mit_text = "MIT License\n\nPermission is hereby granted, free of charge, to any person obtaining a copy\nof this"
    assert la.classify("BSD-3-Clause", "GPL", []) == ("BSD-3-Clause", "License-Expression", True)
    assert la.classify(None, "Apache License, Version 2.0", []) == ("Apache License, Version 2.0", "License", True)
    assert la.classify(None, mit_text, []) == ("MIT (full text)", "License", True)
    assert la.classify(None, "UNKNOWN", ["License :: OSI Approved :: ISC License (ISCL)"]) == (
        "ISC License (ISCL)", "Classifier", False)
    assert la.classify(None, "Dual License", ["License :: OSI Approved :: BSD License",
                                              "License :: OSI Approved :: Apache Software License"])[2] is True
    gpl_text = "GNU GENERAL PUBLIC LICENSE\nPermission is hereby granted, free of charge, to any person obtaining a copy"
    assert la.classify(None, gpl_text, [])[2] is None
    assert la.classify(None, None, []) == ("none declared", "none", None)


def _record(name, expression=None, licence=None, classifiers=()):
    return dict(name=name, version="1.0", license_expression=expression, license=licence, classifiers=list(classifiers))


def test_exceptions_must_match_the_reviewed_licence():
    exceptions = {"certifi": dict(package="certifi", licence="MPL-2.0", reason="CA data")}
    found = la.audit([_record("certifi", licence="MPL-2.0"), _record("Certifi_Two", "MPL-2.0")], exceptions)
    assert [(f.name, f.allowed) for f in found] == [("certifi", True), ("Certifi_Two", False)]
    changed = la.audit([_record("certifi", "GPL-3.0-only")], exceptions)[0]
    assert not changed.allowed and "licence changed since review" in changed.verdict


def test_the_exceptions_file_names_a_reason_for_each(tmp_path):
    shipped = la.load_exceptions(la.DEFAULT_EXCEPTIONS)
    assert {"certifi", "dnspython", "typing-extensions"} <= shipped.keys()
    bad = tmp_path / "e.toml"
    bad.write_text('[[exception]]\npackage = "x"\nlicence = "ISC"\nreason = " "\n')
    with pytest.raises(ValueError, match="lacks a reason"):
        la.load_exceptions(bad)


def test_the_locked_environment_passes(capsys):
    assert la.main([]) == 0
    assert ", 0 failing" in capsys.readouterr().out


def _inject_gpl(site: Path) -> None:
    info = site / "copyleft_thing-2.0.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text("Metadata-Version: 2.4\nName: copyleft-thing\nVersion: 2.0\n"
                                         "License-Expression: GPL-3.0-or-later\n")


def test_an_injected_gpl_package_fails_the_audit(tmp_path, capsys):
    _inject_gpl(tmp_path / "site")
    report = tmp_path / "licences.md"
    assert la.main(["--path", *sys.path, str(tmp_path / "site"), "--report", str(report)]) == 1
    err = capsys.readouterr().err
    assert "copyleft-thing 2.0: GPL-3.0-or-later (License-Expression): NOT ALLOWED" in err
    assert err.count("NOT ALLOWED") == 1  # the rest of the environment still passes
    assert "| copyleft-thing | 2.0 | GPL-3.0-or-later | License-Expression | NOT ALLOWED" in report.read_text()


def test_the_audit_command_fails_on_an_injected_gpl_package(tmp_path):
    """The command `make audit` runs, in a fresh interpreter with the GPL package on its path."""
    import subprocess

    _inject_gpl(tmp_path / "site")
    env = {"PYTHONPATH": f"{Path.cwd()}:{tmp_path / 'site'}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "ops.licence_audit"], capture_output=True, text=True, env=env)
    assert result.returncode == 1 and "copyleft-thing" in result.stderr


def test_a_pip_report_is_audited(tmp_path):
    report = tmp_path / "r.json"
    report.write_text('{"install": [{"metadata": {"name": "a", "version": "1", "license_expression": "MIT"}},'
                      '{"metadata": {"name": "b", "version": "2", "classifier": '
                      '["License :: OSI Approved :: GNU General Public License v3 (GPLv3)"]}}]}')
    records = la.from_pip_report(report)
    assert [(f.name, f.allowed) for f in la.audit(records, {})] == [("a", True), ("b", False)]
