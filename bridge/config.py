"""The config file, mautrix style: the example is the base, the user's values are copied into it.

One file configures the whole service. ``database`` and ``server`` are the sections that
``kalandra_core.settings`` reads (``kalandra serve`` uses the same file); ``homeserver``,
``appservice``, ``bridge`` and ``logging`` are the bridge's (mautrix's usual names).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import re
import secrets
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, Final

from mautrix.bridge import BaseBridgeConfig
from mautrix.util.config import (
    ConfigUpdateHelper,
    ConfigValueError,
    ForbiddenDefault,
    RecursiveDict,
    yaml,
)
from ruamel.yaml.comments import CommentedMap

from kalandra_core.private_files import write_private
from kalandra_core.settings import CoreSettings, load_settings

# Where the example lives: the top of the source tree, or (an installed copy, the container
# image) wherever KALANDRA_EXAMPLE_CONFIG points.
EXAMPLE_CONFIG: Final = Path(
    os.environ.get("KALANDRA_EXAMPLE_CONFIG")
    or Path(__file__).resolve().parents[1] / "example-config.yaml"
)

GENERATE: Final = "generate"
log = logging.getLogger("kalandra.bridge.config")

# Round trips keep the user's quoting, and write null as null (ruamel writes nothing), as the
# example does. (mautrix's yaml instance is shared by every config of the process: ours only.)
yaml.preserve_quotes = True
yaml.representer.add_representer(
    type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
)
PERMISSION_LEVELS: Final = ("none", "relay", "user", "admin")  # each includes the ones before

OLD_MAX_BODY_SIZE: Final = 1  # MiB: appservice.max_body_size's default before 32 (see do_update)

# Options whose value is a map the user owns (keys are not the example's): copied whole, by
# do_update's own rules. Every other leaf of the example is an option, copied from the user's
# file as it is: the example is the only list of options (see example_options).
_USER_MAPS: Final = ("bridge.permissions", "logging", "bridge.relay.message_formats")


class InvalidOption(ConfigValueError):
    """A value that is set but wrong (mautrix's message says "not configured")."""

    def __init__(self, key: str, message: str) -> None:
        ValueError.__init__(self, f"{key}: {message}")


def leaf_paths(node: Any, prefix: str = "") -> Iterator[str]:
    """Dotted paths of the leaves of a mapping; the user-owned maps count as one leaf."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in _USER_MAPS:
            yield from leaf_paths(value, f"{path}.")
        else:
            yield path


def example_options(example: Any) -> list[str]:
    """The options of the example (its leaves, in its order) but the user-owned maps."""
    return [path for path in leaf_paths(example) if path not in _USER_MAPS]


class Config(BaseBridgeConfig):
    # Environment overrides: KALANDRA_BRIDGE_SECTION_KEY (bridge sections only; database and
    # server are read from the file by kalandra_core, as `kalandra serve` does).
    env_prefix = "KALANDRA_BRIDGE"

    def __init__(
        self, path: str, registration_path: str, base_path: str, env_prefix: str | None = None
    ) -> None:
        super().__init__(path, registration_path, base_path, env_prefix)
        self.dropped: list[str] = []  # user options the example does not have (logged later)
        self._generated: list[str] = []  # secrets created by this update, to be saved

    # --- the shared database -------------------------------------------------------------

    def load(self) -> None:
        super().load()
        # An empty file loads as None (mautrix's annotation says CommentedMap).
        loaded: object = self._data
        if not isinstance(loaded, CommentedMap):
            self._data = CommentedMap()

    @cached_property
    def core(self) -> CoreSettings:
        """database.url and the server section, exactly as ``kalandra serve`` reads them (a
        wrong value: ConfigError). Unknown options are not logged here: the update's
        ``dropped`` has them (check_config logs it)."""
        return load_settings(Path(self.path), warn_unknown=False)

    @property
    def mautrix_database_url(self) -> str:
        """database.url in the form mautrix's async_db wants (same file or same server)."""
        url = self.core.database
        scheme, _, rest = url.partition("://")
        if scheme.startswith("sqlite"):
            return f"sqlite:{rest.removeprefix('/')}"  # load_settings made the path absolute
        return f"postgres://{rest}"

    def __getitem__(self, item: str) -> Any:
        # mautrix reads appservice.database for its stores; there is one database, database.url.
        if item == "appservice.database":
            return self.mautrix_database_url
        return super().__getitem__(item)

    # --- upgrade from the example ----------------------------------------------------------

    def do_update(self, helper: ConfigUpdateHelper) -> None:
        # Not super().do_update(): mautrix copies options we do not document (manhole, asmux,
        # appservice.database); ours are the example's (helper.base is the example, as loaded
        # from EXAMPLE_CONFIG), listed before anything is copied into it.
        max_body_size = helper.base["appservice.max_body_size"]  # the example's
        for option in example_options(helper.base._data):
            _copy(helper, option)
        if helper.source.get("appservice.max_body_size", None) == OLD_MAX_BODY_SIZE:
            # The old default refused what one Synapse transaction can carry (100 events of
            # 64 KiB, plus to-device and ephemeral data), and Synapse resends a refused one
            # forever: a config that kept it gets the example's new default.
            helper.base["appservice.max_body_size"] = max_body_size
        _copy_map(helper, "bridge.permissions")
        helper.copy_dict("bridge.relay.message_formats", override_existing_map=False)
        helper.copy("logging")
        for secret, make in (
            ("bridge.mls_state_key", _new_state_key),
            ("bridge.provisioning.shared_secret", _new_shared_secret),
        ):
            if helper.base[secret] == GENERATE:
                helper.base[secret] = make()
                self._generated.append(secret)
        known = set(leaf_paths(helper.base._data))
        self.dropped = [path for path in leaf_paths(self._data) if path not in known]

    @property
    def unsaved_secrets(self) -> list[str]:
        """Secrets generated by the update but not on disk (-n, or the save failed): running
        with them would lose them at the next start."""
        return list(self._generated)

    def save(self) -> None:
        # mautrix's way (the config through a tempfile and a rename, a failure only logged),
        # but both files are new 0600 files whatever the umask: they hold the appservice
        # tokens and the MLS state key (mautrix writes the registration with open("w")). A
        # symlinked file (a registration linked into the homeserver's directory) stays linked.
        try:
            write_private(os.path.realpath(self.path), _dump(self._data))
            if self._registration and self.registration_path:
                registration = os.path.realpath(self.registration_path)
                write_private(registration, _dump(self._registration))
        except OSError as exc:
            log.warning("Failed to write the config or registration: %s", exc.strerror)
        try:
            with open(self.path, encoding="utf-8") as fh:
                on_disk = RecursiveDict(yaml.load(fh), CommentedMap)
        except OSError:
            return
        self._generated = [key for key in self._generated if on_disk[key] != self[key]]

    # --- validation -----------------------------------------------------------------------

    @property
    def forbidden_defaults(self) -> list[ForbiddenDefault]:
        tokens = [
            ForbiddenDefault(
                f"appservice.{token}",
                GENERATE,
                "Generate the registration first: python -m bridge -g -c CONFIG -r REGISTRATION",
            )
            for token in ("as_token", "hs_token")
        ]
        return [
            ForbiddenDefault("homeserver.address", "https://example.com"),
            ForbiddenDefault("homeserver.address", "https://matrix.example.com"),
            ForbiddenDefault("homeserver.domain", "example.com"),
            *(tokens if self._check_tokens else []),
        ]

    def check_default_values(self) -> None:
        super().check_default_values()
        if self.mls_state_key is None:
            raise InvalidOption("bridge.mls_state_key", "must be 32 bytes in base64")
        for who, level in (self["bridge.permissions"] or {}).items():
            if level not in PERMISSION_LEVELS:
                raise InvalidOption(
                    f"bridge.permissions[{who}]",
                    f"{level!r} is not one of {', '.join(PERMISSION_LEVELS)}",
                )
        if self["bridge.encryption.require"] and not self["bridge.encryption.allow"]:
            # Without the bot's crypto device nothing could be checked: refuse, not ignore.
            raise InvalidOption("bridge.encryption.require", "needs bridge.encryption.allow")
        if self["bridge.provisioning.enabled"]:
            secret = self["bridge.provisioning.shared_secret"]
            if not isinstance(secret, str) or len(secret) < 16 or secret == GENERATE:
                raise InvalidOption(
                    "bridge.provisioning.shared_secret", "must be at least 16 characters"
                )
            prefix = self["bridge.provisioning.prefix"]
            if not isinstance(prefix, str) or not prefix.startswith("/") or prefix.endswith("/"):
                raise InvalidOption(
                    "bridge.provisioning.prefix", "must start with / and not end with /"
                )

    @property
    def mls_state_key(self) -> bytes | None:
        try:
            key = base64.b64decode(str(self["bridge.mls_state_key"]), validate=True)
        except (binascii.Error, ValueError):
            return None
        return key if len(key) == 32 else None

    def permission_level(self, mxid: str) -> str:
        """relay, user, admin or none: the user id, else its server name, else "*"."""
        permissions = self["bridge.permissions"] or {}
        domain = mxid.partition(":")[2]
        for key in (mxid, domain, "*"):
            if key in permissions:
                return str(permissions[key])
        return "none"

    # --- registration -----------------------------------------------------------------------

    def _namespace(self, sigil: str, template_key: str, field: str) -> dict[str, Any]:
        placeholder = f"placeholder{secrets.token_hex(8)}"
        local = self[template_key].format(**{field: placeholder})
        regex = sigil + re.escape(f"{local}:{self['homeserver.domain']}")  # no "\\#"
        return {"regex": regex.replace(placeholder, ".*"), "exclusive": True}

    @property
    def namespaces(self) -> dict[str, list[dict[str, Any]]]:
        # The bot is the registration's sender_localpart: it needs no namespace of its own.
        return {
            "users": [self._namespace("@", "bridge.username_template", "userid")],
            "aliases": [self._namespace("#", "bridge.alias_template", "roomid")],
            "rooms": [],
        }

    def generate_registration(self) -> None:
        # Unlike mautrix, existing tokens are kept: re-running -g must not break an installed
        # registration. "generate" makes new ones.
        for token in ("as_token", "hs_token"):
            if self[f"appservice.{token}"] in (None, "", GENERATE):
                self[f"appservice.{token}"] = self._new_token()
        registration: dict[str, Any] = {
            "id": self["appservice.id"],
            "url": self["appservice.address"],
            "as_token": self["appservice.as_token"],
            "hs_token": self["appservice.hs_token"],
            "sender_localpart": self["appservice.bot_username"],
            "rate_limited": False,
            "namespaces": self.namespaces,
        }
        if self["appservice.ephemeral_events"]:
            registration["de.sorunome.msc2409.push_ephemeral"] = True
            registration["receive_ephemeral"] = True
        if self["bridge.encryption.appservice"]:
            registration["org.matrix.msc3202"] = True
        if self["bridge.encryption.msc4190"]:
            registration["io.element.msc4190"] = True
        self._registration = registration


_ABSENT: Final = object()


def _dump(data: Any) -> str:
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def _copy(helper: ConfigUpdateHelper, path: str) -> None:
    """helper.copy, except that an explicit null is the user's value too: mautrix skips None,
    which would turn `tcp_port: null` (listener off) back into the example's port."""
    node: Any = helper.source._data
    for key in path.split("."):
        node = node.get(key, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is _ABSENT:
            return
    if node is None:
        helper.base[path] = None
    else:
        helper.copy(path)


def _copy_map(helper: ConfigUpdateHelper, path: str) -> None:
    """Replace the example's map with the user's, keeping the comment that ruamel attaches to
    the example's last entry (the comment above the next option)."""
    old = helper.base[path]
    trailing = old.ca.items.get(next(reversed(old)), None) if old else None
    helper.copy_dict(path)
    new = helper.base[path]
    if trailing is not None and new:
        new.ca.items[next(reversed(new))] = trailing


def _new_state_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _new_shared_secret() -> str:
    return secrets.token_urlsafe(32)
