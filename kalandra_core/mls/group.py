"""One member's view of one MLS group: the operations Kalandra needs, over corrected rfc9420.

Discipline (docs/architecture.md, Epoch rules):

* Our own commits are *pending* until the sequencer accepts them. ``add``/``remove``/
  ``self_update`` return the commit to send and leave the group at its epoch; when the commit
  comes back from the log, ``process`` recognises it and merges the pending state (it never
  reprocesses its own message), and ``discard_pending`` drops it if another commit won.
  Welcomes go out only after the commit is sequenced.
* rfc9420 mutates state before it has verified a commit, so every ``process`` runs on the live
  object and, if anything fails, the state is restored from the last good snapshot. The snapshot
  is what :meth:`to_bytes` returns, so saving after each epoch costs nothing extra.
* A member removed by a commit gets ``ProcessResult(removed_self=True)``; the group is then
  inactive and every further operation raises GroupInactive.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import cbor2

from ..crypto import sealed
from ..proto import Handshake
from . import corrections, fastpaths, framing
from ._lib import (
    AddProposal,
    Commit,
    ContentType,
    Extension,
    ExtensionType,
    GroupInfo,
    KeyPackage,
    MLSMessage,
    MLSPlaintext,
    RemoveProposal,
    Sender,
    SenderType,
    UpdateProposal,
    Welcome,
    WireFormat,
    crypto_for_suite,
    group_context,
    group_crypto,
    group_tree,
    join_from_welcome,
    make_key_package_ref,
    pending_proposals,
    serialize_extensions,
)
from ._lib import (
    MLSGroup as LibGroup,
)
from .errors import (
    GroupInactive,
    InvalidMlsMessage,
    MlsError,
    NoSuchMember,
    PendingCommitExists,
    WrongEpoch,
)
from .framing import external_remove_proposal
from .keypackage import (
    SUITE_X25519_AES128GCM,
    KeyPackageBundle,
    build_key_package,
    key_package_member_id,
    member_id_of,
    parse_key_package,
    signature_public_key,
)

SENDER_KEY_LABEL: Final = b"kalandra sender keys v1"
SENDER_KEY_LENGTH: Final = 32
_STATE_VERSION: Final = 1
_SEAL_PURPOSE: Final = "kalandra mls group state"


@dataclass(frozen=True, slots=True)
class Member:
    leaf_index: int
    member_id: int
    signature_key: bytes


@dataclass(frozen=True, slots=True)
class CommitOutput:
    """A commit to hand to the sequencer (frame epoch = ``epoch``) and, once it is sequenced,
    the Welcome for each added member id."""

    commit: bytes
    epoch: int
    welcomes: dict[int, bytes] = field(default_factory=dict)
    group_info: bytes | None = None  # GroupInfo for external joins, valid from epoch + 1


@dataclass(frozen=True, slots=True)
class ProcessResult:
    kind: str  # "commit", "own_commit" or "proposal"
    epoch: int  # our epoch after processing
    committer: int | None = None  # member id (None for a proposal or an external committer)
    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    removed_self: bool = False


@dataclass(slots=True)
class _Pending:
    commit: bytes
    state: bytes  # library state of the epoch the commit creates
    output: CommitOutput


class MlsGroup:
    """A member of one group. Not thread-safe; one per (room, leaf)."""

    def __init__(
        self,
        lib: LibGroup,
        *,
        member_id: int,
        signing_key: bytes,
        suite: int,
        handshake: Handshake = Handshake.PUBLIC,
        snapshot: bytes | None = None,
    ) -> None:
        self._lib = lib
        self.member_id = member_id
        self._signing_key = bytes(signing_key)
        self.suite = suite
        self.handshake = handshake
        self._pending: _Pending | None = None
        self._active = True
        # The rollback point and saved state; callers that just loaded ``lib`` pass its bytes.
        self._snapshot = snapshot if snapshot is not None else lib.to_bytes()
        self._handshakes_epoch = -1
        self._handshakes_sent = 0
        self._roster: tuple[LibGroup, int, list[Member]] | None = None
        self._members_by_leaf: dict[int, tuple[Any, Member | None]] = {}

    # --- creation and joining -----------------------------------------------------------------

    @classmethod
    def create(
        cls,
        member_id: int,
        signing_key: bytes,
        *,
        suite: int = SUITE_X25519_AES128GCM,
        group_id: bytes | None = None,
        external_senders: Sequence[tuple[bytes, int]] = (),
        handshake: Handshake = Handshake.PUBLIC,
    ) -> MlsGroup:
        """A new group at epoch 0 with us as its only member.

        ``external_senders`` are (Ed25519 public key, member id) pairs allowed to send external
        proposals; the Kalandra server is one, for moderation Removes.
        """
        bundle = build_key_package(member_id, signing_key, suite=suite)
        crypto = crypto_for_suite(suite)
        extensions = b""
        if external_senders:
            extensions = serialize_extensions(
                [
                    Extension(
                        ExtensionType.EXTERNAL_SENDERS,
                        framing.external_senders_extension(external_senders),
                    )
                ]
            )
        lib = LibGroup.create(
            group_id or os.urandom(16),
            KeyPackage.deserialize(bundle.key_package),
            crypto,
            initial_extensions=extensions,
        )
        # create() does not keep the creator's leaf private key; path secrets need it.
        group_tree(lib).get_node(0).private_key = bundle.encryption_private_key
        return cls(
            lib, member_id=member_id, signing_key=signing_key, suite=suite, handshake=handshake
        )

    @classmethod
    def join(
        cls,
        welcome: bytes,
        bundle: KeyPackageBundle,
        *,
        ratchet_tree: bytes | None = None,
        handshake: Handshake = Handshake.PUBLIC,
    ) -> MlsGroup:
        """Join from a Welcome (MLSMessage bytes) addressed to ``bundle``'s KeyPackage."""
        crypto = crypto_for_suite(bundle.suite)
        try:
            msg = MLSMessage.deserialize(welcome)
            if msg.wire_format != WireFormat.WELCOME:
                raise InvalidMlsMessage("expected a Welcome")
            parsed = msg.get_parsed_content()
            assert isinstance(parsed, Welcome)
            with fastpaths.joining(), fastpaths.gc_paused():
                lib = join_from_welcome(
                    crypto,
                    parsed,
                    KeyPackage.deserialize(bundle.key_package),
                    bundle.init_private_key,
                    bundle.encryption_private_key,
                    ratchet_tree=ratchet_tree,
                )
        except (InvalidMlsMessage, MlsError):
            raise
        except Exception as exc:
            raise InvalidMlsMessage(f"cannot join from this Welcome: {exc}") from None
        return cls(
            lib,
            member_id=bundle.member_id,
            signing_key=bundle.signing_key,
            suite=bundle.suite,
            handshake=handshake,
        )

    @classmethod
    def external_join(
        cls,
        group_info: bytes,
        member_id: int,
        signing_key: bytes,
        *,
        suite: int = SUITE_X25519_AES128GCM,
        handshake: Handshake = Handshake.PUBLIC,
    ) -> tuple[MlsGroup, CommitOutput]:
        """Join by external commit from a published GroupInfo. The returned group already has
        the commit applied; if the sequencer refuses it, throw the group away."""
        crypto = crypto_for_suite(suite)
        try:
            msg = MLSMessage.deserialize(group_info)
            info = msg.get_parsed_content() if msg.wire_format == WireFormat.GROUP_INFO else None
            if not isinstance(info, GroupInfo):
                raise InvalidMlsMessage("expected a GroupInfo")
            lib = LibGroup.from_group_info(info, crypto)
            bundle = build_key_package(member_id, signing_key, suite=suite)
            corrections.prepare_external_commit(
                lib, KeyPackage.deserialize(bundle.key_package), bundle.encryption_private_key
            )
            epoch = lib.get_epoch()
            with corrections.committing(signing_key, lib.get_group_id()):
                pending = lib.create_commit(signing_key)
            commit = MLSMessage.from_public_message(pending.commit_message.auth_content)
            corrections.apply_own_commit(lib, pending)
        except MlsError:
            raise
        except Exception as exc:
            raise InvalidMlsMessage(f"cannot join from this GroupInfo: {exc}") from None
        group = cls(
            lib, member_id=member_id, signing_key=signing_key, suite=suite, handshake=handshake
        )
        return group, CommitOutput(commit=commit.serialize(), epoch=epoch)

    # --- state ------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self._active

    @property
    def epoch(self) -> int:
        return self._lib.get_epoch()

    @property
    def group_id(self) -> bytes:
        return self._lib.get_group_id()

    @property
    def own_leaf_index(self) -> int:
        return self._lib.get_own_leaf_index()

    @property
    def signature_key(self) -> bytes:
        return signature_public_key(self._signing_key)

    @property
    def tree_hash(self) -> bytes:
        return bytes(group_context(self._lib).tree_hash)

    @property
    def epoch_authenticator(self) -> bytes:
        return self._lib.get_epoch_authenticator()

    @property
    def pending_proposals(self) -> int:
        """Proposals received this epoch and not yet committed."""
        return len(pending_proposals(self._lib))

    @property
    def has_pending_commit(self) -> bool:
        return self._pending is not None

    def members(self) -> list[Member]:
        """The roster: every non-blank leaf whose credential names a member id."""
        # Kept per (library object, epoch): every processed commit reads it before and after,
        # and a 10,000-leaf walk costs tens of ms. Only a commit (new epoch) or a reload (new
        # library object) changes the tree's leaves.
        lib, epoch = self._lib, self._lib.get_epoch()
        cached = self._roster
        if cached is None or cached[0] is not lib or cached[1] != epoch:
            cached = self._roster = (lib, epoch, self._read_roster())
        return list(cached[2])

    def _read_roster(self) -> list[Member]:
        tree = group_tree(self._lib)
        out: list[Member] = []
        # A commit changes few leaves: a Member is made again only for a leaf whose LeafNode
        # (immutable) is not the one it was made from.
        previous, made = self._members_by_leaf, {}
        for leaf in range(tree.n_leaves):
            node = tree.get_node(leaf * 2).leaf_node
            if node is None or node.credential is None:
                continue
            known = previous.get(leaf)
            if known is not None and known[0] is node:
                member: Member | None = known[1]
            else:
                member_id = member_id_of(node.credential.identity)
                member = (
                    None
                    if member_id is None
                    else Member(leaf, member_id, bytes(node.signature_key))
                )
            made[leaf] = (node, member)
            if member is not None:
                out.append(member)
        self._members_by_leaf = made
        return out

    def leaf_of(self, member_id: int) -> int:
        for m in self.members():
            if m.member_id == member_id:
                return m.leaf_index
        raise NoSuchMember(f"member {member_id} is not in the group")

    def export_secret(self, label: bytes, context: bytes, length: int) -> bytes:
        """MLS-Exporter (RFC 9420 §8.5, context hashed)."""
        self._check_active()
        return self._lib.export_secret(label, context, length)

    def sender_key_secret(self) -> bytes:
        """The epoch secret the data plane's sender keys are derived from."""
        return self.export_secret(SENDER_KEY_LABEL, b"", SENDER_KEY_LENGTH)

    def group_info(self) -> bytes:
        """A signed GroupInfo (with ratchet tree and external_pub) for external joiners."""
        self._check_active()
        info = GroupInfo.deserialize(self._lib.export_group_info(self._signing_key))
        return MLSMessage.from_group_info(info).serialize()

    # --- our commits --------------------------------------------------------------------------

    def add(self, key_packages: Iterable[bytes]) -> CommitOutput:
        """Commit adding these members (KeyPackages, bare or MLSMessage-wrapped)."""
        crypto = group_crypto(self._lib)
        proposals = []
        recipients: dict[bytes, int] = {}
        for data in key_packages:
            kp = parse_key_package(data, crypto)
            recipients[make_key_package_ref(crypto, kp.serialize())] = key_package_member_id(kp)
            proposals.append(AddProposal(kp.serialize()))
        if not proposals:
            raise ValueError("nothing to add")
        return self._commit(proposals, recipients)

    def remove(self, member_ids: Iterable[int]) -> CommitOutput:
        proposals = [RemoveProposal(self.leaf_of(m)) for m in sorted(set(member_ids))]
        if not proposals:
            raise ValueError("nothing to remove")
        if any(p.removed == self.own_leaf_index for p in proposals):
            raise ValueError("a member cannot remove itself; send a leave proposal")
        return self._commit(proposals, {})

    def self_update(self) -> CommitOutput:
        """An empty commit with a fresh UpdatePath: post-compromise security for our leaf."""
        return self._commit([], {})

    def propose_leave(self) -> bytes:
        """A proposal to remove ourselves (a member cannot commit its own removal); another
        member commits it with :meth:`commit_pending_proposals`."""
        self._check_active()
        lib = self._lib
        try:
            with corrections.private_handshake(self.handshake is Handshake.PRIVATE):
                proposal = lib.create_remove_proposal(self.own_leaf_index, self._signing_key)
            if self.handshake is Handshake.PRIVATE:
                data = self._protect(proposal)
            else:
                data = MLSMessage.from_public_message(proposal.auth_content).serialize()
        finally:
            self._restore()
        return data

    def commit_pending_proposals(self) -> CommitOutput:
        """Commit the proposals received this epoch (e.g. the server's external Removes)."""
        if not pending_proposals(self._lib):
            raise ValueError("no pending proposals")
        return self._commit([], {})

    def _commit(self, proposals: list[Any], recipients: dict[bytes, int]) -> CommitOutput:
        self._check_active()
        if self._pending is not None:
            raise PendingCommitExists("a commit is already waiting for the sequencer")
        lib = self._lib
        epoch = lib.get_epoch()
        pending_proposals(lib).extend(proposals)  # not cached, so they go inline in the commit
        private = self.handshake is Handshake.PRIVATE
        try:
            with (
                corrections.committing(self._signing_key, lib.get_group_id()),
                corrections.private_handshake(private),
            ):
                pending = lib.create_commit(self._signing_key)
            if private:
                commit = self._protect(pending.commit_message)
            else:
                commit = MLSMessage.from_public_message(
                    pending.commit_message.auth_content
                ).serialize()
            welcomes: dict[int, bytes] = {}
            for welcome in pending.welcomes:
                data = MLSMessage.from_welcome(welcome).serialize()
                for secrets in welcome.secrets:
                    member_id = recipients.get(secrets.new_member)
                    if member_id is not None:
                        welcomes[member_id] = data
            new_state = corrections.state_after_own_commit(lib, pending)
        except MlsError:
            self._restore()
            raise
        except Exception as exc:
            self._restore()
            raise InvalidMlsMessage(f"cannot build this commit: {exc}") from None
        # create_commit left the live group in "pending" state; keep it at the old epoch.
        self._restore()
        output = CommitOutput(commit=commit, epoch=epoch, welcomes=welcomes)
        self._pending = _Pending(commit, new_state, output)
        return output

    def merge_pending(self) -> ProcessResult:
        """Our commit was sequenced: move to its epoch."""
        if self._pending is None:
            raise MlsError("no pending commit")
        before = {m.member_id for m in self.members()}
        self._load(self._pending.state)
        self._pending = None
        after = {m.member_id for m in self.members()}
        return ProcessResult(
            kind="own_commit",
            epoch=self.epoch,
            committer=self.member_id,
            added=tuple(sorted(after - before)),
            removed=tuple(sorted(before - after)),
        )

    def discard_pending(self) -> None:
        """Our commit lost the race (StaleEpoch): forget it and its Welcomes."""
        self._pending = None

    def pending_commit(self) -> list[Any] | None:
        """Our pending commit as plain data (secrets included: seal it), for
        :meth:`resume_pending` on a copy of this group saved before the commit was made."""
        p = self._pending
        return None if p is None else [p.commit, p.state, p.output.epoch, p.output.welcomes]

    def resume_pending(self, saved: list[Any]) -> bool:
        """Take back a pending commit of ours (from :meth:`pending_commit`) if this group is
        at the epoch it was built on and holds no other; returns whether it did. A state saved
        before the commit then merges it when the log shows it, like the live one would."""
        commit, new_state, epoch, welcomes = saved
        if self._pending is not None or not self._active or epoch != self.epoch:
            return False
        output = CommitOutput(commit=commit, epoch=epoch, welcomes=dict(welcomes))
        self._pending = _Pending(commit, new_state, output)
        return True

    # --- receiving ----------------------------------------------------------------------------

    def process(self, message: bytes) -> ProcessResult:
        """Apply a Commit or Proposal from the log (MLSMessage bytes).

        Our own pending commit is merged, not reprocessed. On any error the state is unchanged.
        """
        self._check_active()
        if self._pending is not None and message == self._pending.commit:
            return self.merge_pending()
        try:
            msg = MLSMessage.deserialize(message)
        except Exception:
            raise InvalidMlsMessage("not an MLSMessage") from None
        try:
            if msg.wire_format == WireFormat.PUBLIC_MESSAGE:
                plaintext = MLSPlaintext(msg.get_parsed_content())  # type: ignore[arg-type]
            elif msg.wire_format == WireFormat.PRIVATE_MESSAGE:
                plaintext = self._unprotect(msg)
            else:
                raise InvalidMlsMessage(f"wire format {int(msg.wire_format)} is not a handshake")
        except MlsError:
            raise
        except Exception as exc:
            raise InvalidMlsMessage(f"undecodable handshake message: {exc}") from None
        framed = plaintext.auth_content.tbs.framed_content
        if framed.group_id != self.group_id:
            raise InvalidMlsMessage("message is for another group")
        if framed.epoch != self.epoch:
            raise WrongEpoch(self.epoch, framed.epoch)
        if framed.content_type == ContentType.PROPOSAL:
            return self._process_proposal(plaintext, framed.sender, msg.wire_format)
        if framed.content_type != ContentType.COMMIT:
            raise InvalidMlsMessage("application messages do not travel as MLS messages here")
        with fastpaths.gc_paused():
            return self._process_commit(plaintext, framed.sender)

    def _process_proposal(
        self, plaintext: MLSPlaintext, sender: Sender, wire: int
    ) -> ProcessResult:
        try:
            self._lib.process_proposal(plaintext, sender, wire)
        except Exception as exc:
            self._restore()
            raise InvalidMlsMessage(f"proposal rejected: {exc}") from None
        self._snapshot = self._lib.to_bytes()
        return ProcessResult(kind="proposal", epoch=self.epoch)

    def _process_commit(self, plaintext: MLSPlaintext, sender: Sender) -> ProcessResult:
        lib = self._lib
        before = {m.leaf_index: m.member_id for m in self.members()}
        commit = Commit.deserialize(plaintext.auth_content.tbs.framed_content.content)
        removed_leaves = self._removed_leaves(commit)
        committer = before.get(sender.sender) if sender.sender_type == SenderType.MEMBER else None
        if self.own_leaf_index in removed_leaves:
            # We cannot (and need not) follow the new epoch: report the removal plainly.
            self._active = False
            self._pending = None
            return ProcessResult(
                kind="commit",
                epoch=self.epoch,
                committer=committer,
                removed=tuple(sorted(before[i] for i in removed_leaves if i in before)),
                removed_self=True,
            )
        try:
            if sender.sender_type == SenderType.NEW_MEMBER_COMMIT:
                lib.process_external_commit(self._external_committer(plaintext, commit))
            elif sender.sender_type == SenderType.MEMBER:
                lib.process_commit(plaintext, sender.sender)
            else:
                raise InvalidMlsMessage("commit from a sender that is not a member")
            corrections.finish_processed_commit(lib)
        except MlsError:
            self._restore()
            raise
        except Exception as exc:
            self._restore()
            raise InvalidMlsMessage(f"commit rejected: {exc}") from None
        self._pending = None  # any commit of ours for the old epoch lost the race
        self._snapshot = lib.to_bytes()
        after = {m.member_id for m in self.members()}
        return ProcessResult(
            kind="commit",
            epoch=self.epoch,
            committer=committer,
            added=tuple(sorted(after - set(before.values()))),
            removed=tuple(sorted(set(before.values()) - after)),
        )

    def _removed_leaves(self, commit: Commit) -> set[int]:
        return framing.removed_leaves(self._lib, commit)

    def _external_committer(self, plaintext: MLSPlaintext, commit: Commit) -> MLSPlaintext:
        return framing.place_external_committer(self._lib, plaintext, commit)

    def _protect(self, plaintext: MLSPlaintext) -> bytes:
        # The handshake ratchet position is not in the library's saved state, so we count the
        # handshake messages sent this epoch ourselves: no generation is ever reused.
        epoch = self.epoch
        sent = self._handshakes_sent if self._handshakes_epoch == epoch else 0
        data = framing.protect(self._lib, plaintext, self.own_leaf_index, already_sent=sent)
        self._handshakes_epoch, self._handshakes_sent = epoch, sent + 1
        return data

    def _unprotect(self, msg: MLSMessage) -> MLSPlaintext:
        ct = msg.get_parsed_content()
        if getattr(ct, "epoch", None) != self.epoch:
            raise WrongEpoch(self.epoch, int(getattr(ct, "epoch", -1)))
        return framing.unprotect(self._lib, msg)

    # --- persistence --------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Our whole state, secrets included: seal it (crypto.sealed) before storing it."""
        pending = None
        if self._pending is not None:
            p = self._pending
            pending = [p.commit, p.state, p.output.epoch, p.output.welcomes]
        return cbor2.dumps(
            {
                "v": _STATE_VERSION,
                "member_id": self.member_id,
                "suite": self.suite,
                "signing_key": self._signing_key,
                "handshake": self.handshake.value,
                "active": self._active,
                "group": self._snapshot,
                "pending": pending,
                "handshakes": [self._handshakes_epoch, self._handshakes_sent],
            }
        )

    def seal(self, key: bytes) -> bytes:
        """:meth:`to_bytes`, encrypted at rest under ``key`` (XChaCha20-Poly1305)."""
        return sealed.seal(key, _SEAL_PURPOSE, self.to_bytes())

    @classmethod
    def unseal(cls, key: bytes, blob: bytes) -> MlsGroup:
        return cls.from_bytes(sealed.unseal(key, _SEAL_PURPOSE, blob))

    @classmethod
    def from_bytes(cls, data: bytes) -> MlsGroup:
        state = cbor2.loads(data)
        if not isinstance(state, dict) or state.get("v") != _STATE_VERSION:
            raise ValueError("not an MLS group state (or an unknown version)")
        with fastpaths.gc_paused():
            lib = LibGroup.from_bytes(state["group"], crypto_for_suite(state["suite"]))
        group = cls(
            lib,
            member_id=state["member_id"],
            signing_key=state["signing_key"],
            suite=state["suite"],
            handshake=Handshake(state["handshake"]),
            snapshot=state["group"],
        )
        group._active = state["active"]
        group._handshakes_epoch, group._handshakes_sent = state["handshakes"]
        if state["pending"] is not None:
            commit, new_state, epoch, welcomes = state["pending"]
            output = CommitOutput(commit=commit, epoch=epoch, welcomes=dict(welcomes))
            group._pending = _Pending(commit, new_state, output)
        return group

    # --- helpers ------------------------------------------------------------------------------

    def _check_active(self) -> None:
        if not self._active:
            raise GroupInactive("removed from this group")

    def _restore(self) -> None:
        self._load(self._snapshot)

    def _load(self, state: bytes) -> None:
        with fastpaths.gc_paused():
            self._lib = LibGroup.from_bytes(state, crypto_for_suite(self.suite))
        self._snapshot = state


__all__ = [
    "CommitOutput",
    "Handshake",
    "Member",
    "MlsGroup",
    "ProcessResult",
    "UpdateProposal",
    "external_remove_proposal",
]
