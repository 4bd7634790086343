"""Registry credentials and the distribution token handshake.

Credentials come from docker's `config.json`, so `docker login` (or `skopeo login
--authfile`) is all a user needs. Secrets live only inside `Credentials` and the
`Authorization` header built from them: they are kept out of reprs, exceptions and logs,
because index runs are logged by CI systems that outlive the token.

The handshake is docker's: send the request anonymously, read the 401's
`WWW-Authenticate` challenge, and either answer a `Basic` challenge with the credentials or
fetch a bearer token from the challenge's realm (with the credentials, when there are any).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from indexer.reference import DEFAULT_DOMAIN, DOCKER_HUB_API, DOCKER_HUB_LEGACY_KEYS
from indexer.source import SourceError

log = logging.getLogger(__name__)

_CHALLENGE_SCHEME_RE = re.compile(r"\s*,?\s*([A-Za-z][\w-]*)")
_CHALLENGE_PARAM_RE = re.compile(
    r'\s*([A-Za-z][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?'
)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer" or "basic"
    params: dict[str, str]


def docker_config_file(docker_config: Path | None = None) -> Path:
    """Where docker itself would look: the flag, then $DOCKER_CONFIG, then ~/.docker."""
    base = docker_config or (Path(os.environ["DOCKER_CONFIG"]) if os.environ.get("DOCKER_CONFIG")
                             else Path.home() / ".docker")
    return base if base.suffix == ".json" or base.is_file() else base / "config.json"


def load_credentials(registry: str, docker_config: Path | None = None) -> Credentials | None:
    """The login stored for `registry` (a reference's domain), or None for anonymous."""
    path = docker_config_file(docker_config)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read docker config {path}: {exc.__class__.__name__}") from None
    if not isinstance(config, dict):
        raise SourceError(f"docker config {path} is not a JSON object")
    entry = _find_auth_entry(config.get("auths") or {}, registry)
    if entry is not None:
        creds = _decode_entry(entry, registry, path)
        if creds is not None:
            return creds
    _note_helpers(config, registry, path)
    return None


def _host_key(key: str) -> str:
    """`https://host:5000/v1/` and `host:5000` name the same registry in config.json."""
    if "://" in key:
        return urlsplit(key).netloc.lower()
    return key.split("/", 1)[0].lower()


def _aliases(registry: str) -> set[str]:
    if registry in (DEFAULT_DOMAIN, DOCKER_HUB_API, "index.docker.io"):
        return {_host_key(k) for k in (*DOCKER_HUB_LEGACY_KEYS, DOCKER_HUB_API)}
    return {registry.lower()}


def _find_auth_entry(auths: Any, registry: str) -> dict[str, Any] | None:
    if not isinstance(auths, dict):
        return None
    wanted = _aliases(registry)
    exact = auths.get(registry)
    if isinstance(exact, dict):
        return exact
    for key, entry in auths.items():
        if isinstance(entry, dict) and _host_key(str(key)) in wanted:
            return entry
    return None


def _decode_entry(entry: dict[str, Any], registry: str, path: Path) -> Credentials | None:
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(str(entry["auth"])).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise SourceError(f"malformed 'auth' for {registry} in {path}") from None
        if not sep or not user:
            raise SourceError(f"malformed 'auth' for {registry} in {path}: expected user:password")
        return Credentials(user, password)
    if entry.get("username") and entry.get("password") is not None:
        return Credentials(str(entry["username"]), str(entry["password"]))
    if entry.get("identitytoken"):
        log.warning("identity tokens in %s are not supported; trying %s anonymously",
                    path, registry)
    return None


def _note_helpers(config: dict[str, Any], registry: str, path: Path) -> None:
    helpers = config.get("credHelpers") or {}
    helper = next((helpers[k] for k in helpers if _host_key(k) in _aliases(registry)), None)
    helper = helper or config.get("credsStore")
    if helper:
        log.info("credential helper %r in %s is not supported; trying %s without it",
                 helper, path, registry)


def parse_challenges(header: str) -> list[Challenge]:
    """Split `Bearer realm="..",scope=".." , Basic realm=".."` into challenges."""
    challenges: list[Challenge] = []
    pos = 0
    while pos < len(header):
        match = _CHALLENGE_SCHEME_RE.match(header, pos)
        if not match:
            break
        scheme, pos = match.group(1).lower(), match.end()
        params: dict[str, str] = {}
        while True:
            param = _CHALLENGE_PARAM_RE.match(header, pos)
            if not param:
                break
            value = param.group(2)
            value = re.sub(r"\\(.)", r"\1", value) if value is not None else param.group(3)
            params[param.group(1).lower()] = value
            pos = param.end()
        challenges.append(Challenge(scheme, params))
    return challenges


class Authenticator:
    """Holds the `Authorization` header for one repository and renews it on a 401.

    Shared by the threads that fetch blobs in parallel, so a token expiring mid-index is
    renewed once rather than by every thread at the same time.
    """

    def __init__(
        self,
        session: requests.Session,
        target: str,
        repository: str,
        credentials: Callable[[], Credentials | None],
        timeout: float = 30.0,
    ) -> None:
        self._session = session
        self._target = target  # "host/repo", for messages
        self._repository = repository
        self._load_credentials = credentials
        self._credentials: Credentials | None = None
        self._loaded = False
        self._timeout = timeout
        self._header: str | None = None
        self._generation = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Authenticator({self._target!r}, authenticated={self._header is not None})"

    def current(self) -> tuple[str | None, int]:
        """The header to send and its generation (to tell a stale 401 from a fresh one)."""
        with self._lock:
            return self._header, self._generation

    def renew(self, www_authenticate: str | None, generation: int) -> None:
        """Answer a 401; skips the work when another thread renewed since `generation`."""
        with self._lock:
            if generation != self._generation:
                return
            self._header = self._answer(www_authenticate or "")
            self._generation += 1

    def failure_hint(self) -> str:
        """Why a rejected request may have failed, without saying anything secret."""
        if self._creds() is None:
            return " (no login for this registry in docker's config.json)"
        return " (the stored login was rejected)"

    def _creds(self) -> Credentials | None:
        if not self._loaded:
            self._credentials = self._load_credentials()
            self._loaded = True
        return self._credentials

    def _answer(self, header: str) -> str:
        challenges = {c.scheme: c for c in parse_challenges(header)}
        if "bearer" in challenges:
            return "Bearer " + self._fetch_token(challenges["bearer"])
        creds = self._creds()
        if "basic" in challenges:
            if creds is None:
                raise SourceError(f"authentication failed for {self._target}: the registry "
                                  "wants a login and none is stored in docker's config.json")
            return creds.basic_header()
        raise SourceError(f"authentication failed for {self._target}: unsupported challenge "
                          f"{header.split(' ', 1)[0]!r}")

    def _fetch_token(self, challenge: Challenge) -> str:
        realm = challenge.params.get("realm")
        if not realm or urlsplit(realm).scheme not in ("http", "https"):
            raise SourceError(f"authentication failed for {self._target}: bad token realm")
        params = {"scope": challenge.params.get("scope")
                  or f"repository:{self._repository}:pull"}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        headers = {}
        creds = self._creds()
        if creds is not None:
            params["account"] = creds.username
            headers["Authorization"] = creds.basic_header()
        try:
            resp = self._session.get(realm, params=params, headers=headers,
                                     timeout=self._timeout, allow_redirects=False)
        except requests.RequestException as exc:
            raise SourceError(f"authentication failed for {self._target}: token server "
                              f"unreachable ({exc.__class__.__name__})") from None
        with resp:
            return self._token_from(resp)

    def _token_from(self, resp: requests.Response) -> str:
        if resp.status_code in (401, 403):
            hint = "" if self._creds() else " (no login stored in docker's config.json)"
            raise SourceError(f"authentication failed for {self._target}: token server "
                              f"refused{hint}")
        if resp.status_code != 200:
            raise SourceError(f"authentication failed for {self._target}: token server "
                              f"answered HTTP {resp.status_code}")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise SourceError(f"authentication failed for {self._target}: token server sent "
                              "no token")
        return token
