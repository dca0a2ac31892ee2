"""`lmsmith keys create|list|revoke|rotate`: the key store from the command line.

`create` and `rotate` print only the key on stdout (scripts capture it); everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from lmsmith.gateway.keys import ROLES, KeyStore, parse_duration, state_dir


def _store(args: argparse.Namespace) -> KeyStore:
    import os

    url = os.environ.get("LMSMITH_DATABASE_URL")
    return KeyStore(state_dir(args.state_dir), url)


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _create(args: argparse.Namespace) -> int:
    models = [m.strip() for group in args.models for m in group.split(",") if m.strip()]
    store = _store(args)
    try:
        secret, key = store.create(args.name or f"{args.role}-key", args.role, models, args.rpm, args.tpm,
                                   args.concurrency, args.quota, parse_duration(args.expires) if args.expires else None)
    finally:
        store.close()
    print(secret)
    _say(f"created key {key.id} ({key.role}); it is shown once: store it now")
    return 0


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        keys = [key.public() for key in store.list()]
    finally:
        store.close()
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    for key in keys:
        state = "active" if key["active"] else ("revoked" if key["revoked"] else "expired")
        print(f"{key['id']}  {key['role']:<8} {state:<8} {key['name']}  models={','.join(key['models']) or '*'}  "
              f"rpm={key['rpm'] or '-'} tpm={key['tpm'] or '-'} used={key['used_tokens']}/{key['quota_tokens'] or '-'}"
              f"  expires={key['expires'] or 'never'}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        key = store.revoke(args.key_id)
    finally:
        store.close()
    _say(f"revoked key {key.id}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        secret, key = store.rotate(args.key_id)
    finally:
        store.close()
    print(secret)
    _say(f"rotated key {key.id}: the old secret no longer works")
    return 0


def add_keys_parser(sub) -> None:
    keys = sub.add_parser("keys", help="Create, list, revoke and rotate the server's API keys.")
    actions = keys.add_subparsers(dest="keys_command", required=True)

    def with_state(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--state-dir", help="The server's state folder (default LMSMITH_STATE_DIR, else "
                            "~/.lmsmith); LMSMITH_DATABASE_URL selects another database.")
        return parser

    create = with_state(actions.add_parser("create", help="A new key, printed once on stdout."))
    create.add_argument("--role", choices=ROLES, default="user")
    create.add_argument("--name", help="A label for people (default: ROLE-key).")
    create.add_argument("--models", action="append", default=[], metavar="M1,M2",
                        help="Models the key may use (default: all).")
    create.add_argument("--rpm", type=int, help="Requests per minute.")
    create.add_argument("--tpm", type=int, help="Tokens (prompt + completion) per minute.")
    create.add_argument("--concurrency", type=int, help="Requests in flight at once.")
    create.add_argument("--quota", type=int, help="Total tokens the key may use.")
    create.add_argument("--expires", help="Lifetime, e.g. 30d, 12h (default: never).")
    create.set_defaults(func=_create)
    listing = with_state(actions.add_parser("list", help="Every key, without secrets."))
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_list)
    for name, func, text in (("revoke", _revoke, "Stop a key at once."),
                             ("rotate", _rotate, "A new secret for a key (same id, role and limits).")):
        action = with_state(actions.add_parser(name, help=text))
        action.add_argument("key_id")
        action.set_defaults(func=func)


def _audit_log(args: argparse.Namespace, key_file: str | None = None):
    from lmsmith.gateway.audit import AuditLog, load_key

    return AuditLog(state_dir(args.state_dir), load_key(key_file if key_file is not None else args.key_file))


def _audit_read(args: argparse.Namespace) -> int:
    for record in _audit_log(args).read():
        print(json.dumps(record, ensure_ascii=False))
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    log = _audit_log(args)
    problems = log.verify()
    for problem in problems:
        print(problem.what)
    _say(f"{log.path}: {'intact' if not problems else f'{len(problems)} problems'}")
    return 0 if not problems else 1


def _audit_rotate(args: argparse.Namespace) -> int:
    from lmsmith.gateway.audit import key_id, load_key

    new_key = load_key(args.new_key_file)
    count = _audit_log(args).rotate(new_key)
    _say(f"re-encrypted {count} records under key {key_id(new_key)}; point LMSMITH_AUDIT_KEY at the new key")
    return 0


def add_audit_parser(sub) -> None:
    audit = sub.add_parser("audit", help="Read, verify or re-key the server's encrypted audit log.")
    actions = audit.add_subparsers(dest="audit_command", required=True)
    for name, func, text in (("read", _audit_read, "Every record, decrypted, as JSON lines."),
                             ("verify", _audit_verify, "Check the hash chain and every record's tag; exit 1 "
                                                       "on any problem."),
                             ("rotate-key", _audit_rotate, "Re-encrypt every record under a new key.")):
        action = actions.add_parser(name, help=text)
        action.add_argument("--state-dir", help="The server's state folder (default LMSMITH_STATE_DIR, else ~/.lmsmith).")
        action.add_argument("--key-file", help="The audit key (base64); default the environment variable "
                            "LMSMITH_AUDIT_KEY.")
        if name == "rotate-key":
            action.add_argument("--new-key-file", required=True, help="The new key (base64 of 32 bytes).")
        action.set_defaults(func=func)
