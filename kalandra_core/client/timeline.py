"""A room's history as a person reads it: what ``kalandra history`` and ``tail`` print.

Fed the room's entries in log order (messages, reactions, redactions), a :class:`Timeline`
applies them the way Matrix clients do: an edit (``edit_of``, by the same sender) replaces the
text of its message, which is marked "(edited)", and is not a line of its own; a reply is
preceded by a quoted line of its target; reactions are listed under their message (added and
taken back in log order); a redacted message is shown as removed; a room name, topic or avatar
change is a line saying so. Senders are shown by their profile (profile.py: display name, and the
MXID of bridged Matrix users), else by member id. Formatted bodies are rendered by terminal.py.

:meth:`Timeline.lines` is the settled view (history); :meth:`Timeline.add` returns what a
follower (tail) prints for one more entry: the entry's lines, or for an edit its message again
as edited, for a reaction or redaction one line naming the message it acts on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import events as ev
from .profile import Profile, profile_of
from .room_meta import meta_of
from .terminal import clean, html_to_terminal

Entry = ev.Message | ev.Reacted | ev.Moderated
QUOTE_WIDTH = 80  # characters of a replied-to message in its quote line


@dataclass(slots=True)
class _Shown:
    message: ev.Message
    edits: list[ev.Message] = field(default_factory=list)
    # key -> members who reacted with it, in the order they did
    reactions: dict[str, list[int]] = field(default_factory=dict)
    removed: bool = False


class Timeline:
    def __init__(self, *, ansi: bool = False) -> None:
        self.ansi = ansi
        self.profiles: dict[int, Profile] = {}
        self._shown: dict[int, _Shown] = {}  # log index -> a message shown as a line
        self._order: list[int] = []
        self._edits: dict[int, int] = {}  # an edit's log index -> the message it edits
        self._reactions: dict[int, tuple[int, str, int]] = {}  # index -> (target, key, sender)

    # --- feeding -------------------------------------------------------------------------------

    def add(self, entry: Entry) -> list[str]:
        if isinstance(entry, ev.Message):
            return self._message(entry)
        if isinstance(entry, ev.Reacted):
            return self._reaction(entry)
        if entry.action == "redact":
            return self._redaction(entry)
        return []

    def _message(self, message: ev.Message) -> list[str]:
        profile = profile_of(message.content)
        if profile is not None:
            self.profiles[message.sender_id] = profile
        target_index = message.content.edit_of
        if target_index is not None:
            target_index = self._edits.get(target_index, target_index)  # an edit of an edit
            target = self._shown.get(target_index)
            if target is not None and target.message.sender_id == message.sender_id:
                target.edits.append(message)
                self._edits[message.log_index] = target_index
                return self._render(target_index, quote=False)
        self._shown[message.log_index] = _Shown(message)
        self._order.append(message.log_index)
        return self._render(message.log_index)

    def _reaction(self, reaction: ev.Reacted) -> list[str]:
        index = self._edits.get(reaction.target, reaction.target)
        target = self._shown.get(index)
        if target is None:
            return []
        senders = target.reactions.setdefault(reaction.key, [])
        if reaction.add:
            self._reactions[reaction.log_index] = (index, reaction.key, reaction.sender_id)
            if reaction.sender_id not in senders:
                senders.append(reaction.sender_id)
            did = f"reacted {clean(reaction.key)} to"
        else:
            if reaction.sender_id in senders:
                senders.remove(reaction.sender_id)
            did = f"took back {clean(reaction.key)} from"
        if not senders:
            del target.reactions[reaction.key]
        return [f"#{reaction.log_index} <{self.name(reaction.sender_id)}> {did} #{index}"]

    def _redaction(self, redaction: ev.Moderated) -> list[str]:
        said = f"#{redaction.log_index} <{self.name(redaction.moderator_id)}> removed"
        if redaction.target in self._reactions:
            index, key, sender = self._reactions.pop(redaction.target)
            shown = self._shown.get(index)
            senders = shown.reactions.get(key, []) if shown is not None else []
            if sender in senders:
                senders.remove(sender)
                if not senders and shown is not None:
                    del shown.reactions[key]
            return [f"{said} a reaction to #{index}"]
        if redaction.target in self._edits:
            shown = self._shown[self._edits.pop(redaction.target)]
            shown.edits = [e for e in shown.edits if e.log_index != redaction.target]
            return self._render(shown.message.log_index, quote=False)
        shown = self._shown.get(redaction.target)
        if shown is None:
            return [f"{said} #{redaction.target}"]
        shown.removed = True
        shown.reactions.clear()
        return [f"{said} #{redaction.target}"]

    # --- reading -------------------------------------------------------------------------------

    def lines(self, limit: int | None = None) -> list[str]:
        """The settled history: the last ``limit`` messages, oldest first, each with its
        quote and reactions."""
        order = self._order if limit is None else self._order[-limit:] if limit > 0 else []
        out: list[str] = []
        for index in order:
            out += self._render(index)
        return out

    def name(self, member_id: int) -> str:
        """The member's label; with its member id when another member says the same (a
        profile is the member's own claim, like a Matrix display name: never let two look
        alike)."""
        profile = self.profiles.get(member_id)
        label = profile.label() if profile is not None else None
        if not label:
            return str(member_id)
        folded = label.casefold()
        for other, theirs in self.profiles.items():
            if other != member_id and (theirs.label() or "").casefold() == folded:
                return f"{label} [{member_id}]"
        return label

    def _render(self, index: int, *, quote: bool = True) -> list[str]:
        shown = self._shown[index]
        message = shown.message
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(message.timestamp_ms / 1000))
        head = f"#{index} {stamp} <{self.name(message.sender_id)}> "
        out: list[str] = []
        reply = message.content.reply_to
        if quote and reply is not None and not shown.removed:
            out.append(f"  > {self._quote(reply)}")
        text = self._text(shown)
        out.append(head + text.replace("\n", "\n    "))
        if shown.reactions and not shown.removed:
            out.append(
                "    "
                + "  ".join(
                    f"[{clean(key)} {', '.join(self.name(m) for m in members)}]"
                    for key, members in shown.reactions.items()
                )
            )
        return out

    def _quote(self, index: int) -> str:
        target = self._shown.get(self._edits.get(index, index))
        if target is None:
            return f"#{index} (not in this history)"
        if target.removed:
            return f"#{index} (message removed)"
        text = " ".join(self._text(target, ansi=False).split())  # (cut: no styles to break)
        if len(text) > QUOTE_WIDTH:
            text = text[: QUOTE_WIDTH - 1] + "…"
        return f"#{target.message.log_index} <{self.name(target.message.sender_id)}> {text}"

    def _text(self, shown: _Shown, *, ansi: bool | None = None) -> str:
        if shown.removed:
            return "(message removed)"
        content = shown.edits[-1].content if shown.edits else shown.message.content
        meta = meta_of(shown.message.content)
        if meta is not None:
            return _meta_text(meta.name, meta.topic, meta.avatar is not None, meta.remove_avatar)
        if content.formatted_body is not None:
            styled = self.ansi if ansi is None else ansi
            text = html_to_terminal(content.formatted_body, ansi=styled)
        else:
            text = clean(content.body)
        media = shown.message.content.media
        if content.kind == "emote":
            text = f"* {text}"
        elif content.kind != "text" or media is not None:
            text = f"[{shown.message.content.kind}] {text}"
        if shown.edits:
            text += " (edited)"
        return text


def _meta_text(name: str | None, topic: str | None, avatar: bool, removed: bool) -> str:
    said: list[str] = []
    if name is not None:
        said.append(f"renamed the room to {clean(name)!r}" if name else "removed the room name")
    if topic is not None:
        said.append(f"changed the topic to {clean(topic)!r}" if topic else "removed the topic")
    if avatar:
        said.append("changed the room avatar")
    elif removed:
        said.append("removed the room avatar")
    return "; ".join(said)
