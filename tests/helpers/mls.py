"""MLS groups for the tests of the library's speed fixes."""

from __future__ import annotations

import os

from kalandra_core.mls.group import MlsGroup
from kalandra_core.mls.keypackage import build_key_package


def group_of(n: int, *, removed: int = 0) -> MlsGroup:
    """A creator's group of ``n`` members (an Add without joiners), ``removed`` of them then
    removed, so the tree has blanks, unmerged leaves and a committer's path."""
    creator = MlsGroup.create(1, os.urandom(32))
    bundles = [build_key_package(100 + i, os.urandom(32)) for i in range(n - 1)]
    creator.process(creator.add([b.key_package for b in bundles]).commit)
    if removed:
        ids = [b.member_id for b in bundles[1 : 1 + removed]]
        creator.process(creator.remove(ids).commit)
    creator.process(creator.self_update().commit)
    return creator
