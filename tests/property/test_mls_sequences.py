"""Random membership histories: whatever sequence of adds, removes, self-updates and reloads,
every member agrees on the epoch, its authenticator and the sender-key secret."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kalandra_core.mls.group import MlsGroup
from kalandra_core.mls.keypackage import KeyPackageBundle, build_key_package

# (operation, committer pick, target pick, reload pick)
steps = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "remove", "update"]),
        st.integers(0, 10),
        st.integers(0, 10),
        st.integers(0, 10),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_members_always_agree(history: list[tuple[str, int, int, int]]) -> None:
    keys: dict[int, bytes] = {}
    next_id = 1

    def key(member: int) -> bytes:
        return keys.setdefault(member, os.urandom(32))

    groups = {1: MlsGroup.create(1, key(1))}
    next_id = 2
    for op, who, target, reload_pick in history:
        members = sorted(groups)
        committer = members[who % len(members)]
        if op == "add" or len(members) == 1:
            bundle = build_key_package(next_id, key(next_id))
            out = groups[committer].add([bundle.key_package])
            joiner: tuple[int, KeyPackageBundle] | None = (next_id, bundle)
            next_id += 1
        elif op == "remove":
            others = [m for m in members if m != committer]
            out = groups[committer].remove([others[target % len(others)]])
            joiner = None
        else:
            out = groups[committer].self_update()
            joiner = None
        for member in list(groups):
            result = groups[member].process(out.commit)
            if result.removed_self:
                del groups[member]
        if joiner is not None:
            member_id, bundle = joiner
            groups[member_id] = MlsGroup.join(out.welcomes[member_id], bundle)
        # Some member restarts from its saved state.
        restarted = sorted(groups)[reload_pick % len(groups)]
        groups[restarted] = MlsGroup.from_bytes(groups[restarted].to_bytes())
        epochs = {g.epoch for g in groups.values()}
        authenticators = {g.epoch_authenticator for g in groups.values()}
        secrets = {g.sender_key_secret() for g in groups.values()}
        assert len(epochs) == len(authenticators) == len(secrets) == 1, history
        rosters = {tuple(m.member_id for m in g.members()) for g in groups.values()}
        assert rosters == {tuple(sorted(groups, key=lambda m: groups[m].own_leaf_index))}
