"""Licence audit: every distribution in an environment must be MIT, BSD or Apache-2.0, or be
named in the reviewed exceptions file with its licence and the reason it is accepted.

    python -m ops.licence_audit [--exceptions ops/licence_exceptions.toml] [--pip-report FILE ...]
                                [--report licences.md]

Without --pip-report it audits the distributions installed beside the running interpreter
(the locked .venv when run as `make audit`); a pip installation report (`pip install
--dry-run --report FILE '.[extra]'`) audits an extra's resolution without installing it.

A distribution's licence is read, most trusted first, from its `License-Expression` (an SPDX
expression, PEP 639), a short `License` field that parses as one, then its `License ::`
classifiers (several are alternatives: packages list each licence they may be taken under).
An SPDX `OR` needs one allowed side, `AND` needs both; `WITH` an exception keeps the base
licence's verdict (exceptions only grant). Exit 1 when anything is neither allowed nor
excepted, or an exception no longer matches the licence it was reviewed for.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from dataclasses import dataclass
from importlib.metadata import distributions
from pathlib import Path

ALLOWED = {"MIT", "MIT-0", "BSD-2-Clause", "BSD-3-Clause", "0BSD", "Apache-2.0"}
# Classifier and free-text names of the allowed licences.
ALIASES = {
    "mit": "MIT", "mit license": "MIT", "mit no attribution license (mit-0)": "MIT-0",
    "bsd": "BSD-3-Clause", "bsd license": "BSD-3-Clause", "bsd 3-clause license": "BSD-3-Clause",
    "3-clause bsd license": "BSD-3-Clause", "new bsd license": "BSD-3-Clause", "bsd-3": "BSD-3-Clause",
    "apache": "Apache-2.0", "apache 2.0": "Apache-2.0", "apache-2": "Apache-2.0", "apache license": "Apache-2.0",
    "apache license 2.0": "Apache-2.0", "apache license, version 2.0": "Apache-2.0", "apache 2.0 license": "Apache-2.0",
    "apache software license": "Apache-2.0", "apache software license 2.0": "Apache-2.0",
}
# Some packages put the whole licence text in `License`: these sentences identify the allowed ones.
TEXTS = {
    "MIT": "permission is hereby granted, free of charge, to any person obtaining a copy",
    "BSD-3-Clause": "neither the name of",
    "BSD-2-Clause": "redistribution and use in source and binary forms, with or without modification, are permitted",
    "Apache-2.0": "apache license version 2.0",
}
COPYLEFT = re.compile(r"general public license|\bgpl|mozilla public|eclipse public|affero", re.I)
DEFAULT_EXCEPTIONS = Path(__file__).with_name("licence_exceptions.toml")


@dataclass(frozen=True, slots=True)
class Finding:
    name: str
    version: str
    licence: str  # what the metadata says, as audited
    source: str  # License-Expression, License, Classifier or none
    allowed: bool
    verdict: str  # "allowed", "excepted: reason", or what is wrong


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# -- SPDX expressions ------------------------------------------------------------------------


def spdx_allowed(expression: str) -> bool:
    """Whether an SPDX expression may be taken under an allowed licence. ValueError if it does
    not parse."""
    tokens = re.findall(r"\(|\)|[A-Za-z0-9.+:-]+", expression)
    if not tokens or "".join(tokens) != re.sub(r"\s+", "", expression):
        raise ValueError(f"not an SPDX expression: {expression!r}")
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take() -> str:
        nonlocal position
        position += 1
        return tokens[position - 1]

    def either() -> bool:  # OR binds loosest
        value = both()
        while peek() is not None and peek().upper() == "OR":
            take()
            value = both() or value
        return value

    def both() -> bool:
        value = single()
        while peek() is not None and peek().upper() == "AND":
            take()
            value = single() and value
        return value

    def single() -> bool:
        token = take() if peek() is not None else ""
        if token == "(":
            value = either()
            if peek() != ")":
                raise ValueError(f"unbalanced parentheses in {expression!r}")
            take()
        elif re.fullmatch(r"[A-Za-z0-9.+-]+", token) and token.upper() not in ("AND", "OR", "WITH"):
            value = token.removesuffix("+") in ALLOWED
        else:
            raise ValueError(f"not an SPDX expression: {expression!r}")
        if peek() is not None and peek().upper() == "WITH":
            take(), take()  # the exception's id: it only grants, so the base decides
        return value

    value = either()
    if peek() is not None:
        raise ValueError(f"not an SPDX expression: {expression!r}")
    return value


# -- one distribution's licence --------------------------------------------------------------


def classify(expression: str | None, licence: str | None, classifiers: list[str]) -> tuple[str, str, bool | None]:
    """(licence as audited, where it came from, allowed?); None when the metadata names none."""
    if expression:
        try:
            return expression, "License-Expression", spdx_allowed(expression)
        except ValueError:
            pass
    text = (licence or "").strip()
    if text.upper() in ("UNKNOWN", "NONE"):  # what old setuptools wrote for "not given"
        text = ""
    if text and "\n" not in text and len(text) <= 80:
        alias = ALIASES.get(text.lower())
        if alias:
            return text, "License", True
        try:
            return text, "License", spdx_allowed(text)
        except ValueError:
            pass
    if "\n" in text and not COPYLEFT.search(text):
        flat = " ".join(text.lower().split())
        for spdx, sentence in TEXTS.items():  # BSD-3 before BSD-2: the three-clause text holds both
            if sentence in flat:
                return f"{spdx} (full text)", "License", True
    names = [c.split("::")[-1].strip() for c in classifiers if c.startswith("License ::")]
    names = [n for n in names if n != "OSI Approved"]
    if names:
        return " OR ".join(names), "Classifier", any(ALIASES.get(n.lower()) in ALLOWED for n in names)
    if text:
        return text.splitlines()[0][:80], "License", None
    return "none declared", "none", None


def audit(records: list[dict], exceptions: dict[str, dict]) -> list[Finding]:
    """records: [{name, version, license_expression, license, classifiers}]."""
    findings = []
    for r in sorted(records, key=lambda r: normalise(r["name"])):
        licence, source, allowed = classify(r.get("license_expression"), r.get("license"), r.get("classifiers", []))
        excepted = exceptions.get(normalise(r["name"]))
        if allowed:
            verdict, ok = "allowed", True
        elif excepted and excepted["licence"] == licence:
            verdict, ok = f"excepted: {excepted['reason']}", True
        elif excepted:
            verdict, ok = f"licence changed since review (reviewed: {excepted['licence']!r}): review again", False
        else:
            verdict, ok = "NOT ALLOWED: not MIT, BSD or Apache-2.0 and not in the exceptions file", False
        findings.append(Finding(r["name"], r["version"], licence, source, ok, verdict))
    return findings


# -- where the records come from -------------------------------------------------------------


def installed(paths: list[str] | None = None) -> list[dict]:
    records = {}
    for dist in distributions(path=paths) if paths is not None else distributions():
        meta = dist.metadata
        if meta is None or not meta.get("Name"):
            continue
        records.setdefault(normalise(meta["Name"]), dict(
            name=meta["Name"], version=meta.get("Version", "?"), license_expression=meta.get("License-Expression"),
            license=meta.get("License"), classifiers=meta.get_all("Classifier") or []))
    return list(records.values())


def from_pip_report(path: Path) -> list[dict]:
    report = json.loads(path.read_text(encoding="utf-8"))
    return [dict(name=m["name"], version=m.get("version", "?"), license_expression=m.get("license_expression"),
                 license=m.get("license"), classifiers=m.get("classifier", []))
            for m in (item["metadata"] for item in report.get("install", []))]


def load_exceptions(path: Path) -> dict[str, dict]:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    exceptions = {}
    for entry in data.get("exception", []):
        missing = {"package", "licence", "reason"} - entry.keys()
        if missing or not str(entry.get("reason", "")).strip():
            raise ValueError(f"{path}: exception {entry.get('package', '?')!r} lacks {', '.join(sorted(missing)) or 'a reason'}")
        exceptions[normalise(entry["package"])] = entry
    return exceptions


def markdown(findings: list[Finding], title: str) -> str:
    lines = [f"## Licence audit: {title}", "",
             f"{len(findings)} distributions; {sum(f.verdict == 'allowed' for f in findings)} allowed, "
             f"{sum(f.verdict.startswith('excepted') for f in findings)} excepted, "
             f"{sum(not f.allowed for f in findings)} failing.", "",
             "| distribution | version | licence | from | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {f.name} | {f.version} | {f.licence} | {f.source} | {f.verdict} |" for f in findings]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.licence_audit", description=__doc__.splitlines()[0])
    parser.add_argument("--exceptions", default=str(DEFAULT_EXCEPTIONS), help="reviewed exceptions (TOML)")
    parser.add_argument("--pip-report", nargs="+", help="audit these pip installation reports instead of this environment")
    parser.add_argument("--path", nargs="+", help="audit the distributions on these paths instead of sys.path")
    parser.add_argument("--report", help="write the Markdown table here")
    parser.add_argument("--title", default=sys.prefix, help="what the report names as audited")
    args = parser.parse_args(argv)
    try:
        exceptions = load_exceptions(Path(args.exceptions))
        if args.pip_report:
            records = [r for p in args.pip_report for r in from_pip_report(Path(p))]
        else:
            records = installed(args.path)
    except (OSError, ValueError, KeyError, tomllib.TOMLDecodeError) as e:
        print(f"licence audit: error: {e}", file=sys.stderr)
        return 2
    findings = audit(records, exceptions)
    text = markdown(findings, args.title)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text, encoding="utf-8")
    failing = [f for f in findings if not f.allowed]
    for f in failing:
        print(f"licence audit: {f.name} {f.version}: {f.licence} ({f.source}): {f.verdict}", file=sys.stderr)
    print(f"licence audit ({args.title}): {len(findings)} distributions, {len(failing)} failing")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
