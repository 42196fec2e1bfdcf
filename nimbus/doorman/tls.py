"""TLS for the gRPC port: an `ssl.SSLContext` from the configured certificate chain and key.

`NIMBUS_TLS_CERT_FILE` + `NIMBUS_TLS_KEY_FILE` switch TLS on (both or neither). With
`NIMBUS_TLS_CLIENT_CA_FILE` set, every connection must present a client certificate signed by
that CA (mutual TLS); without it, client certificates are not asked for. gRPC over TLS needs
ALPN `h2` (grpcio refuses a server that does not offer it), and TLS 1.2 is the minimum.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nimbus.config import Settings


def server_context(cert_file: str, key_file: str, client_ca_file: str = "") -> ssl.SSLContext:
    """Raises ValueError naming the file that could not be loaded."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load certificate {cert_file} with key {key_file}: {e}") from None
    if client_ca_file:
        try:
            ctx.load_verify_locations(cafile=client_ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"cannot load client CA {client_ca_file}: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def from_settings(s: Settings) -> ssl.SSLContext | None:
    """None when TLS is off."""
    if not s.tls_cert_file:
        return None
    return server_context(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)
