"""Fixtures the adversarial tests share."""

from __future__ import annotations

import pytest

from corpus import build_paddle, build_published


@pytest.fixture(scope="session")
def templates(tmp_path_factory):
    """(published-layout checkpoint, the Paddle checkpoint converted from it): never attacked themselves, only
    copied (corpus.copy_tree) into each test's sandbox."""
    root = tmp_path_factory.mktemp("templates")
    published = build_published(root / "published")
    return published, build_paddle(published, root / "paddle")
