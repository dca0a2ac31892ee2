"""`lmsmith keys create|list|revoke|rotate`: the key store from the command line.

`create` and `rotate` print only the key on stdout (scripts capture it); everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import closing

from lmsmith.gateway.keys import ROLES, KeyStore, parse_duration, state_dir

STATE_DIR_HELP = "The server's state folder (default LMSMITH_STATE_DIR, else ~/.lmsmith)."


def _store(args: argparse.Namespace) -> KeyStore:
    import os

    url = os.environ.get("LMSMITH_DATABASE_URL")
    return KeyStore(state_dir(args.state_dir), url)


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _create(args: argparse.Namespace) -> int:
    models = [m.strip() for group in args.models for m in group.split(",") if m.strip()]
    with closing(_store(args)) as store:
        secret, key = store.create(args.name or f"{args.role}-key", args.role, models, args.rpm, args.tpm,
                                   args.concurrency, args.quota, parse_duration(args.expires) if args.expires else None)
    print(secret)
    _say(f"created key {key.id} ({key.role}); it is shown once: store it now")
    return 0


def _list(args: argparse.Namespace) -> int:
    with closing(_store(args)) as store:
        keys = [key.public() for key in store.list()]
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
    with closing(_store(args)) as store:
        key = store.revoke(args.key_id)
    _say(f"revoked key {key.id}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    with closing(_store(args)) as store:
        secret, key = store.rotate(args.key_id)
    print(secret)
    _say(f"rotated key {key.id}: the old secret no longer works")
    return 0


def add_keys_parser(sub) -> None:
    keys = sub.add_parser("keys", help="Create, list, revoke and rotate the server's API keys.")
    actions = keys.add_subparsers(dest="keys_command", required=True)

    def with_state(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--state-dir", help=STATE_DIR_HELP + " LMSMITH_DATABASE_URL selects another database.")
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
        action.add_argument("--state-dir", help=STATE_DIR_HELP)
        action.add_argument("--key-file", help="The audit key (base64); default the environment variable "
                            "LMSMITH_AUDIT_KEY.")
        if name == "rotate-key":
            action.add_argument("--new-key-file", required=True, help="The new key (base64 of 32 bytes).")
        action.set_defaults(func=func)


def _registry(args: argparse.Namespace):
    import os

    from lmsmith.gateway.registry import Registry

    audit = None
    if os.environ.get("LMSMITH_AUDIT_KEY"):  # registry changes are audited whenever the server's log is
        from lmsmith.gateway.audit import AuditLog, load_key

        audit = AuditLog(state_dir(args.state_dir), load_key())
    return Registry(state_dir(args.state_dir), os.environ.get("LMSMITH_DATABASE_URL"), audit)


def _actor() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


def _registry_add(args: argparse.Namespace) -> int:
    with closing(_registry(args)) as registry:
        version = registry.register(args.name, args.run, args.variant, args.note or "", _actor())
        current = registry.current(args.name).version
    print(json.dumps(version.public(), ensure_ascii=False))
    _say(f"{args.name} v{version.version} registered; current is v{current}")
    return 0


def _registry_list(args: argparse.Namespace) -> int:
    with closing(_registry(args)) as registry:
        versions = registry.versions(args.name)
        current = {name: registry.current(name).version for name in {v.name for v in versions}}
    for version in versions:
        mark = "*" if current.get(version.name) == version.version else " "
        scores = ", ".join(f"{k}={v:g}" for k, v in list(version.eval_scores.items())[:4])
        print(f"{mark} {version.name} v{version.version}  {version.run_dir}"
              f"{'#' + version.variant if version.variant else ''}  {scores}")
    return 0


def _registry_move(args: argparse.Namespace) -> int:
    with closing(_registry(args)) as registry:
        moved = (registry.promote(args.name, args.version, _actor()) if args.registry_command == "promote"
                 else registry.rollback(args.name, _actor()))
    _say(f"{args.name}: current is now v{moved.version} (servers following the registry switch without a restart)")
    return 0


def _registry_log(args: argparse.Namespace) -> int:
    with closing(_registry(args)) as registry:
        for change in registry.changes(args.name):
            print(json.dumps(change))
    return 0


def add_registry_parser(sub) -> None:
    registry = sub.add_parser("registry", help="Versions of served models: add, list, promote, rollback, log.")
    actions = registry.add_subparsers(dest="registry_command", required=True)
    add = actions.add_parser("add", help="Register a run (or one of its compressed variants) as a new version.")
    add.add_argument("name")
    add.add_argument("run", help="A run folder.")
    add.add_argument("--variant", help="A compressed variant of the run (RUN/compress/<name>).")
    add.add_argument("--note", help="Why this version exists.")
    add.set_defaults(func=_registry_add)
    listing = actions.add_parser("list", help="Every version (* marks the current one).")
    listing.add_argument("name", nargs="?")
    listing.set_defaults(func=_registry_list)
    promote = actions.add_parser("promote", help="Make a version current.")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.set_defaults(func=_registry_move)
    rollback = actions.add_parser("rollback", help="Back to the version current before this one.")
    rollback.add_argument("name")
    rollback.set_defaults(func=_registry_move)
    log_parser = actions.add_parser("log", help="The change log.")
    log_parser.add_argument("name", nargs="?")
    log_parser.set_defaults(func=_registry_log)
    for action in (add, listing, promote, rollback, log_parser):
        action.add_argument("--state-dir", help=STATE_DIR_HELP)


def _feedback_store(args: argparse.Namespace):
    import os

    from lmsmith.gateway.audit import load_key
    from lmsmith.gateway.feedback import FeedbackStore

    return FeedbackStore(state_dir(args.state_dir), os.environ.get("LMSMITH_DATABASE_URL"), load_key(args.key_file))


def _feedback_analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmsmith.gateway.feedback import analyze, report_markdown

    with closing(_feedback_store(args)) as store:
        summary = analyze(store.entries())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "feedback.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "feedback.md").write_text(report_markdown(summary), encoding="utf-8")
    _say(f"{summary['failed']} failures of {summary['rated']} rated answers; report in {out / 'feedback.md'}")
    return 0


def _feedback_export(args: argparse.Namespace) -> int:
    from lmsmith.gateway.feedback import export_corrections

    with closing(_feedback_store(args)) as store:
        count = export_corrections(store.entries(), args.out)
    _say(f"wrote {count} corrected conversations to {args.out} (use it as data.instructions)")
    return 0


def add_feedback_parser(sub) -> None:
    feedback = sub.add_parser("feedback", help="Analyse users' ratings; export their corrections as SFT data.")
    actions = feedback.add_subparsers(dest="feedback_command", required=True)
    analyze_parser = actions.add_parser("analyze", help="Failures grouped by model and kind, as md and json.")
    analyze_parser.add_argument("--out", default="feedback-report", help="Folder for feedback.md and feedback.json.")
    analyze_parser.set_defaults(func=_feedback_analyze)
    export = actions.add_parser("export", help="Corrections as conversations in the data stage's format (jsonl).")
    export.add_argument("--out", required=True, help="The jsonl file to write.")
    export.set_defaults(func=_feedback_export)
    for action in (analyze_parser, export):
        action.add_argument("--state-dir", help=STATE_DIR_HELP)
        action.add_argument("--key-file", help="The data key (base64); default LMSMITH_AUDIT_KEY.")
