"""Licence, changelog and package metadata: what corporate intake and `pip install` read."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:6] == ["Apache", "License", "Version", "2.0,", "January", "2004"]
    assert "END OF TERMS AND CONDITIONS" in text
    assert "APPENDIX: How to apply the Apache License to your work." in text


def test_metadata_reads_without_a_setuptools_warning() -> None:
    """setuptools' own reading of pyproject.toml, every warning an error: the old
    `license = {text = ...}` table fails here (its deprecation warning)."""
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "from setuptools.dist import Distribution\n"
        "from setuptools.config.pyprojecttoml import apply_configuration\n"
        "dist = apply_configuration(Distribution(), 'pyproject.toml')\n"
        "print(dist.metadata.license_expression, dist.metadata.license_files)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "Apache-2.0"
    assert "LICENSE" in out.stdout


def test_changelog_keeps_a_changelog() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n")
    assert "https://keepachangelog.com/en/1.1.0/" in text
    versions = re.findall(r"^## \[([^\]]+)\]", text, re.MULTILINE)
    assert versions and versions[0] == "Unreleased"
    sections = set(re.findall(r"^### (\w+)$", text, re.MULTILINE))
    assert sections and sections <= {"Added", "Changed", "Deprecated", "Removed", "Fixed",
                                     "Security"}
