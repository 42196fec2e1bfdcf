"""The doorman's start-up checks: its TLS certificate and key and its token keys load when the
process starts (a ConfigError naming the variable: exit 2), not at the first stream. Only the
processes that run a doorman (nimbus.server, the all-in-one) read these settings, so only they
check them (`entry.run_process(..., checks=[startup.check])`).
"""

from __future__ import annotations

from nimbus.config import ConfigError, Settings
from nimbus.doorman import auth, tls


def check(s: Settings) -> None:
    try:
        auth.parse_algorithms(s.auth_algorithms)
    except ValueError as e:
        raise ConfigError(f"invalid NIMBUS_AUTH_ALGORITHMS: {e}") from None
    if bool(s.tls_cert_file) != bool(s.tls_key_file):
        raise ConfigError("invalid NIMBUS_TLS_CERT_FILE/NIMBUS_TLS_KEY_FILE: set both or neither")
    if s.tls_client_ca_file and not s.tls_cert_file:
        raise ConfigError(
            "invalid NIMBUS_TLS_CLIENT_CA_FILE: needs NIMBUS_TLS_CERT_FILE and NIMBUS_TLS_KEY_FILE"
        )
    try:
        tls.from_settings(s)
    except ValueError as e:
        raise ConfigError(f"invalid TLS settings: {e}") from None
    try:
        auth.Verifier.from_settings(s)
    except ValueError as e:
        raise ConfigError(f"invalid NIMBUS_AUTH settings: {e}") from None
