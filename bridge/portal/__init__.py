"""Portals: a Kalandra room and its Matrix room, with one ordered queue each way.

``portal.py`` is the portal (``Portal``) and the process's directory of them (``Portals``);
``to_matrix.py`` and ``to_kalandra.py`` are its two queues, ``members.py`` mirrors commits and
moderation, ``base.py`` what all of them share. The features take the portal's public face
(``PortalFace``, bridge/context.py): relations (replies, edits, reactions, redactions), media,
room metadata, ephemeral events (receipts, typing), backfill, admission (who may enter),
statuses (com.beeper.message_send_status), redaction power, set-aside (what the homeserver
refuses for good), and the queue's error decisions (errors.py).
"""

from .portal import Portal, Portals
from .to_kalandra import kalandra_content
from .to_matrix import matrix_content

__all__ = ["Portal", "Portals", "kalandra_content", "matrix_content"]
