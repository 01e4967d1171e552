"""The Prism build's source patches: applied exactly where they match, refused where they do not."""
from __future__ import annotations

import pytest

from infra.errors import UserFacingError
from infra.install import PRISM_PATCHES, PrismPatch, apply_prism_patches

_PATCH = PrismPatch(path="pkg/stage.go", find="\tcase <-ready:\n", replace="\tcase <-ready:\n\tready = nil\n",
                    why="test")


def _tree(tmp_path, text):
    target = tmp_path / "pkg" / "stage.go"
    target.parent.mkdir()
    target.write_text(text)
    return target


def test_a_patch_replaces_its_text(tmp_path):
    target = _tree(tmp_path, "select {\n\tcase <-ready:\n\t\tdone = true\n}\n")
    apply_prism_patches(tmp_path, (_PATCH,))
    assert target.read_text() == "select {\n\tcase <-ready:\n\tready = nil\n\t\tdone = true\n}\n"


@pytest.mark.parametrize("text", ["select {}\n", "\tcase <-ready:\n\tcase <-ready:\n"])
def test_a_patch_that_does_not_match_once_fails_the_build(tmp_path, text):
    target = _tree(tmp_path, text)
    with pytest.raises(UserFacingError, match="matches [02] times"):
        apply_prism_patches(tmp_path, (_PATCH,))
    assert target.read_text() == text  # nothing half-applied


def test_the_busy_loop_patch_stops_selecting_the_closed_channel():
    patch = PRISM_PATCHES[0]
    assert patch.path.endswith("prism/internal/stage.go")
    assert patch.replace.startswith(patch.find)
    assert "dataReady = nil" in patch.replace[len(patch.find):]


def test_the_split_patch_keeps_stateful_stages_whole():
    patch = PRISM_PATCHES[1]
    assert patch.path.endswith("prism/internal/execute.go")
    assert "stage.sdfSplittable = config.EnableSDFSplit && !stage.stateful" in patch.replace
    assert "sdfSplittable = config.EnableSDFSplit\n" in patch.find
