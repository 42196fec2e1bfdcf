"""Token-bound identity: who may open a stream as which client. Pure (no I/O after start-up).

With `NIMBUS_AUTH=jwt` a stream must carry the metadata `authorization: Bearer <jwt>`. The token
is verified with PyJWT against the configured key for its algorithm: the shared secret
(`NIMBUS_AUTH_SECRET`) for HS256/HS384/HS512, the public key in `NIMBUS_AUTH_PUBLIC_KEY_FILE`
for RS*/PS*/ES* (the allowed list is `NIMBUS_AUTH_ALGORITHMS`; a token naming any other
algorithm is refused, so a public key is never used as an HMAC secret). An HS* secret must be at
least as long as the hash (32 bytes for HS256, RFC 7518 3.2), or the process refuses to start.
`exp` and `sub` are required, and `exp`, `nbf`, `iat` must be numbers (PyJWT alone would take a
numeric string); `iss`/`aud` are checked when configured. The subject is the client id: a `client_id`
metadata value that differs is refused, a missing one defaults to the subject.

Refusals carry the gRPC status the doorman answers with: UNAUTHENTICATED for a missing, expired,
malformed or badly signed token, PERMISSION_DENIED for a valid token used for another client.
The token is checked once, when the stream opens (a stream outlives its token's expiry).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt

if TYPE_CHECKING:
    from nimbus.config import Settings

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
ALGORITHMS = HMAC_ALGORITHMS | KEY_ALGORITHMS
# RFC 7518 3.2: an HMAC key at least as long as the hash's output.
MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")
AUTHORIZATION = "authorization"
CLIENT_ID = "client_id"


class AuthError(Exception):
    """A stream refused for its identity. `status` is a grpclib Status name."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def unauthenticated(message: str) -> AuthError:
    return AuthError("UNAUTHENTICATED", message)


def permission_denied(message: str) -> AuthError:
    return AuthError("PERMISSION_DENIED", message)


def parse_algorithms(raw: str) -> tuple[str, ...]:
    """'HS256, RS256' -> ('HS256', 'RS256'); ValueError on an unknown or empty list."""
    algs = tuple(dict.fromkeys(a.strip().upper() for a in raw.split(",") if a.strip()))
    if not algs:
        raise ValueError("must name at least one algorithm")
    bad = [a for a in algs if a not in ALGORITHMS]
    if bad:
        raise ValueError(
            f"unsupported {', '.join(bad)} (supported: {', '.join(sorted(ALGORITHMS))})"
        )
    return algs


def check_secret(
    secret: str | bytes, algorithms: Iterable[str], name: str = "NIMBUS_AUTH_SECRET"
) -> None:
    """ValueError unless `secret` is long enough for every HS* algorithm in `algorithms`."""
    need = max((MIN_SECRET_BYTES[a] for a in algorithms if a in MIN_SECRET_BYTES), default=0)
    size = len(secret.encode() if isinstance(secret, str) else secret)
    if size < need:
        alg = next(a for a, n in sorted(MIN_SECRET_BYTES.items()) if n == need)
        raise ValueError(
            f"{name} is {size} bytes; {alg} needs at least {need} (RFC 7518 3.2): "
            "make one with `openssl rand -hex 32`"
        )


def load_public_key(path: str) -> Any:
    """The PEM public key (or certificate's key) in `path`; ValueError if unreadable."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        if b"BEGIN CERTIFICATE" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        return load_pem_public_key(data)
    except ValueError as e:
        raise ValueError(f"{path} is not a PEM public key or certificate: {e}") from None


@dataclass(frozen=True)
class Verifier:
    algorithms: tuple[str, ...]
    secret: str = ""
    public_key: Any = None
    issuer: str = ""
    audience: str = ""
    leeway_sec: float = 0.0

    def __post_init__(self) -> None:
        if HMAC_ALGORITHMS & set(self.algorithms) and not self.secret:
            raise ValueError(
                f"{'/'.join(sorted(HMAC_ALGORITHMS & set(self.algorithms)))} needs a secret"
            )
        check_secret(self.secret, self.algorithms)
        if KEY_ALGORITHMS & set(self.algorithms) and self.public_key is None:
            raise ValueError(
                f"{'/'.join(sorted(KEY_ALGORITHMS & set(self.algorithms)))} needs a public key file"
            )

    @classmethod
    def from_settings(cls, s: Settings) -> Verifier | None:
        """None when auth is off. Raises ValueError on a bad key (config.load reports it)."""
        if s.auth != "jwt":
            return None
        algs = parse_algorithms(s.auth_algorithms)
        key = load_public_key(s.auth_public_key_file) if s.auth_public_key_file else None
        return cls(
            algs, s.auth_secret, key, s.auth_issuer, s.auth_audience, float(s.auth_leeway_sec)
        )

    def verify(self, token: str) -> str:
        """The subject of a valid token; AuthError(UNAUTHENTICATED) otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.InvalidTokenError, ValueError, TypeError):
            raise unauthenticated("malformed token") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise unauthenticated(f"token algorithm {alg!r} is not accepted")
        key = self.secret if alg in HMAC_ALGORITHMS else self.public_key
        options: dict[str, Any] = {"require": ["exp", "sub"]}
        kwargs: dict[str, Any] = {}
        if self.issuer:
            options["require"].append("iss")
            kwargs["issuer"] = self.issuer
        if self.audience:
            kwargs["audience"] = self.audience
        else:
            options["verify_aud"] = False
        kwargs["leeway"] = self.leeway_sec
        try:
            claims = jwt.decode(token, key, algorithms=[alg], options=options, **kwargs)  # type: ignore[arg-type]
        except jwt.ExpiredSignatureError:
            raise unauthenticated("token expired") from None
        except jwt.InvalidSignatureError:
            raise unauthenticated("bad token signature") from None
        except jwt.MissingRequiredClaimError as e:
            raise unauthenticated(f"token has no {e.claim!r} claim") from None
        except (jwt.InvalidIssuerError, jwt.InvalidAudienceError, jwt.ImmatureSignatureError) as e:
            raise unauthenticated(f"token not accepted: {e}") from None
        except (jwt.InvalidTokenError, jwt.exceptions.InvalidKeyError, ValueError, TypeError):
            raise unauthenticated("invalid token") from None
        for claim in NUMERIC_DATE_CLAIMS:
            value = claims.get(claim)
            if claim in claims and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise unauthenticated(f"token claim {claim!r} is not a number")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.strip():
            raise unauthenticated("token subject is empty")
        return sub

    def identify(self, metadata: Mapping[str, Any]) -> str:
        """The client id a stream may use, from its `authorization` and `client_id` metadata."""
        raw = str(metadata.get(AUTHORIZATION, "") or "").strip()
        scheme, _, token = raw.partition(" ")
        if not raw:
            raise unauthenticated("missing authorization metadata (expected 'Bearer <token>')")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthenticated("authorization metadata must be 'Bearer <token>'")
        subject = self.verify(token.strip())
        claimed = str(metadata.get(CLIENT_ID, "") or "").strip()
        if claimed and claimed != subject:
            raise permission_denied("client_id does not match the token's subject")
        return subject


def issue(
    client_id: str,
    *,
    ttl_sec: float,
    algorithm: str = "HS256",
    key: Any,
    issuer: str = "",
    audience: str = "",
    now: float | None = None,
) -> str:
    """A token for `client_id` (development and tests: production tokens come from your IdP)."""
    t = time.time() if now is None else now
    claims: dict[str, Any] = {"sub": client_id, "iat": int(t), "exp": int(t + ttl_sec)}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, key, algorithm=algorithm)
