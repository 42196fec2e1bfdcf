"""Issue a development token (`python -m nimbus.token --client-id a --ttl 3600`).

Prints a JWT whose subject is the client id, signed with NIMBUS_AUTH_SECRET (HS*) or with
`--private-key-file` (RS*/PS*/ES*); the algorithm defaults to the first of
NIMBUS_AUTH_ALGORITHMS, the issuer and audience to NIMBUS_AUTH_ISSUER / NIMBUS_AUTH_AUDIENCE.
Use it as the metadata `authorization: Bearer <token>` (`python -m nimbus.client --token ...`).
Production tokens come from your identity provider; this is for development and tests.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from nimbus.doorman import auth
from nimbus.entry import EXIT_USAGE, ArgumentParser


def main(argv: list[str] | None = None) -> int:
    from dotenv import dotenv_values

    env = {**{k: v for k, v in dotenv_values(".env").items() if v is not None}, **os.environ}
    default_alg = (env.get("NIMBUS_AUTH_ALGORITHMS") or "HS256").split(",")[0].strip().upper()
    p = ArgumentParser(
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
    client_id = args.client_id.strip()
    if not client_id:
        p.error("--client-id must not be empty")
    if not client_id.isascii() or not client_id.isprintable():
        # gRPC metadata values are printable ASCII: no client could send this id
        p.error(f"--client-id must be printable ASCII, got {client_id!r}")
    if not (args.ttl > 0 and math.isfinite(args.ttl)):
        p.error(f"--ttl must be a number of seconds > 0, got {args.ttl:g}")
    key: str | bytes
    if alg in auth.HMAC_ALGORITHMS:
        key = args.secret if args.secret is not None else env.get("NIMBUS_AUTH_SECRET", "")
        if not key:
            p.error(f"{alg} needs --secret or NIMBUS_AUTH_SECRET")
        try:
            auth.check_secret(key, [alg], name="the secret (--secret or NIMBUS_AUTH_SECRET)")
        except ValueError as e:
            p.error(str(e))
    else:
        if not args.private_key_file:
            p.error(f"{alg} needs --private-key-file")
        try:
            key = Path(args.private_key_file).read_bytes()
        except OSError as e:
            p.error(f"cannot read {args.private_key_file}: {e.strerror}")
    try:
        token = auth.issue(
            client_id,
            ttl_sec=args.ttl,
            algorithm=alg,
            key=key,
            issuer=args.issuer,
            audience=args.audience,
        )
    except Exception as e:  # a key that does not fit the algorithm
        print(
            f"python -m nimbus.token: cannot sign with {alg}: {e} "
            f"(--private-key-file must hold a PEM private key for {alg})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(token)
    return 0
