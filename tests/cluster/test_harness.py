"""The test cluster's installer says why it cannot install SLURM (the cluster tests are then
skipped with that reason, never silently)."""
from __future__ import annotations

import os

import pytest

from tests.cluster import slurm as harness


@pytest.fixture
def bare_path(tmp_path, monkeypatch):
    """A PATH with none of the SLURM/munge binaries (and only what the test puts there)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    return bindir


def test_reason_when_not_root(bare_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(harness.SlurmUnavailable, match="not root: install slurm-wlm munge"):
        harness.ensure_installed()


def test_reason_without_apt(bare_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(harness.SlurmUnavailable, match="no apt-get on this machine"):
        harness.ensure_installed()


def test_reason_when_apt_fails_offline(bare_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    apt = bare_path / "apt-get"
    apt.write_text("#!/bin/sh\necho \"E: Could not resolve 'deb.debian.org'\" >&2\nexit 100\n")
    apt.chmod(0o755)
    with pytest.raises(harness.SlurmUnavailable,
                       match=r"`apt-get update -q` failed \(exit 100\).*Could not resolve"):
        harness.ensure_installed()
