"""Issue a development token (`python -m nimbus.token --client-id a --ttl 3600`).

Prints a JWT whose subject is the client id, signed with NIMBUS_AUTH_SECRET (HS*) or with
`--private-key-file` (RS*/PS*/ES*); the algorithm defaults to the first of
NIMBUS_AUTH_ALGORITHMS, the issuer and audience to NIMBUS_AUTH_ISSUER / NIMBUS_AUTH_AUDIENCE.
Use it as the metadata `authorization: Bearer <token>` (`python -m nimbus.client --token ...`).
Production tokens come from your identity provider; this is for development and tests.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nimbus import auth


def main(argv: list[str] | None = None) -> int:
    from dotenv import dotenv_values

    env = {**{k: v for k, v in dotenv_values(".env").items() if v is not None}, **os.environ}
    default_alg = (env.get("NIMBUS_AUTH_ALGORITHMS") or "HS256").split(",")[0].strip().upper()
    p = argparse.ArgumentParser(
        prog="python -m nimbus.token",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--client-id", "--client_id", required=True, help="the token's subject")
    p.add_argument(
        "--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)"
    )
    p.add_argument(
        "--algorithm", default=default_alg, help=f"signing algorithm (default {default_alg})"
    )
    p.add_argument("--secret", default=None, help="HS* secret (default: NIMBUS_AUTH_SECRET)")
    p.add_argument("--private-key-file", default="", help="PEM private key for RS*/PS*/ES*")
    p.add_argument("--issuer", default=env.get("NIMBUS_AUTH_ISSUER", ""), help="iss claim")
    p.add_argument("--audience", default=env.get("NIMBUS_AUTH_AUDIENCE", ""), help="aud claim")
    args = p.parse_args(argv)
    alg = args.algorithm.strip().upper()
    if alg not in auth.ALGORITHMS:
        p.error(f"unsupported algorithm {alg} (supported: {', '.join(sorted(auth.ALGORITHMS))})")
    if not args.client_id.strip():
        p.error("--client-id must not be empty")
    if args.ttl <= 0:
        p.error("--ttl must be > 0")
    key: str | bytes
    if alg in auth.HMAC_ALGORITHMS:
        key = args.secret if args.secret is not None else env.get("NIMBUS_AUTH_SECRET", "")
        if not key:
            p.error(f"{alg} needs --secret or NIMBUS_AUTH_SECRET")
    else:
        if not args.private_key_file:
            p.error(f"{alg} needs --private-key-file")
        try:
            key = Path(args.private_key_file).read_bytes()
        except OSError as e:
            p.error(f"cannot read {args.private_key_file}: {e.strerror}")
    try:
        token = auth.issue(
            args.client_id.strip(),
            ttl_sec=args.ttl,
            algorithm=alg,
            key=key,
            issuer=args.issuer,
            audience=args.audience,
        )
    except Exception as e:  # a key that does not fit the algorithm
        print(f"python -m nimbus.token: cannot sign with {alg}: {e}", file=sys.stderr)
        return 2
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
