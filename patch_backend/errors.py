"""Warnings (and, as they move here, errors) that patch_backend raises for its users."""

from __future__ import annotations


class PatchBackendWarning(UserWarning):
    """patch_backend took a documented fallback because this torch release does not offer what
    it reads (a Dynamo fact, a symbolic-shape API): results stay correct, but names, compile
    counts or speed may differ from the tested torch range. Filter it like any warning
    (``warnings.filterwarnings("error", category=pb.PatchBackendWarning)`` in a test suite)."""
