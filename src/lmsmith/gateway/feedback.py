"""The feedback loop: what was asked and answered, what users said about it, and new SFT data from it.

While feedback is on (the server has a data key, `LMSMITH_AUDIT_KEY`), each chat and completion request's
prompt and answer are kept in the gateway's database, AES-256-GCM encrypted (`cryptography`; each value
bound to its table, column and request id, so ciphertexts cannot be swapped between rows).
`POST /v1/feedback {request_id, rating, correction?, comment?}` adds a rating (1–5; 1–2 count as
failures) to a request the same key made. `lmsmith feedback analyze` groups the failures by model and
kind (moderation hits, refusals, numeric errors against the correction, other) into a report;
`lmsmith feedback export` writes the corrections as SFT conversations in the data stage's format
(`messages`), which a recipe takes as `data.instructions`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from lmsmith.errors import UserError

FAILED_AT_MOST = 2
REFUSAL = re.compile(r"无法|不能回答|不便回答|抱歉|对不起|I can(?:'|no)t|I am unable|as an AI", re.IGNORECASE)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class FeedbackStore:
    def __init__(self, folder: Path | None, url: str | None, key: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        from lmsmith.gateway.db import open_database

        self._engine = open_database(folder, url)
        self._aes = AESGCM(key)

    def close(self) -> None:
        self._engine.dispose()

    def _seal(self, value: str, where: str) -> str:
        nonce = os.urandom(12)
        return base64.b64encode(nonce + self._aes.encrypt(nonce, value.encode(), where.encode())).decode()

    def _open(self, sealed: Optional[str], where: str) -> Optional[str]:
        if sealed is None:
            return None
        raw = base64.b64decode(sealed)
        return self._aes.decrypt(raw[:12], raw[12:], where.encode()).decode()

    def remember(self, request_id: str, key_id: Optional[str], model: Optional[str], route: str,
                 prompt: Any, answer: str, finish_reason: Optional[str]) -> None:
        """Keep a request's prompt (messages or text) and answer for later feedback."""
        from sqlalchemy import text

        with self._engine.begin() as db:
            db.execute(text("DELETE FROM request_texts WHERE request_id = :r"), {"r": request_id})
            db.execute(text(
                "INSERT INTO request_texts (request_id, key_id, model, route, prompt, answer, finish_reason, "
                "created_at) VALUES (:r, :k, :m, :route, :p, :a, :f, :t)"),
                {"r": request_id, "k": key_id, "m": model, "route": route,
                 "p": self._seal(json.dumps(prompt, ensure_ascii=False), f"request_texts.prompt.{request_id}"),
                 "a": self._seal(answer, f"request_texts.answer.{request_id}"), "f": finish_reason, "t": time.time()})

    def add(self, request_id: str, key_id: Optional[str], rating: int, correction: Optional[str] = None,
            comment: Optional[str] = None) -> int:
        """Store a rating of a request `key_id` made; an unknown request (or another key's) is an error."""
        from sqlalchemy import text

        with self._engine.begin() as db:
            owner = db.execute(text("SELECT key_id FROM request_texts WHERE request_id = :r"), {"r": request_id}).first()
            if owner is None or owner[0] != key_id:
                raise UserError(f"no request {request_id!r} of yours to rate (only the requests of the last "
                                "feedback-enabled session are kept)")
            found = db.execute(text(
                "INSERT INTO feedback (request_id, key_id, rating, correction, comment, created_at) VALUES "
                "(:r, :k, :rating, :c, :comment, :t) RETURNING id"),
                {"r": request_id, "k": key_id, "rating": rating, "t": time.time(),
                 "c": None if correction is None else self._seal(correction, f"feedback.correction.{request_id}"),
                 "comment": None if comment is None else self._seal(comment, f"feedback.comment.{request_id}")})
            return int(found.scalar())

    def entries(self) -> list[dict[str, Any]]:
        """Every rating with its request's prompt and answer, decrypted."""
        from sqlalchemy import text

        with self._engine.connect() as db:
            rows = db.execute(text(
                "SELECT f.id, f.request_id, f.key_id, f.rating, f.correction, f.comment, f.created_at, t.model, "
                "t.route, t.prompt, t.answer, t.finish_reason FROM feedback f JOIN request_texts t "
                "ON t.request_id = f.request_id ORDER BY f.id")).all()
        out = []
        for row in rows:
            rid = row[1]
            out.append({"id": row[0], "request_id": rid, "key_id": row[2], "rating": row[3],
                        "correction": self._open(row[4], f"feedback.correction.{rid}"),
                        "comment": self._open(row[5], f"feedback.comment.{rid}"), "created_at": row[6],
                        "model": row[7], "route": row[8],
                        "prompt": json.loads(self._open(row[9], f"request_texts.prompt.{rid}")),
                        "answer": self._open(row[10], f"request_texts.answer.{rid}"), "finish_reason": row[11]})
        return out


def failure_kind(entry: dict[str, Any]) -> str:
    if entry["finish_reason"] == "content_filter":
        return "moderation"
    if REFUSAL.search(entry["answer"] or ""):
        return "refusal"
    if entry["correction"]:
        wanted, given = NUMBER.findall(entry["correction"]), NUMBER.findall(entry["answer"] or "")
        if wanted and set(wanted) != set(given):
            return "numeric"
    return "other"


def analyze(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Failures (rating <= 2) grouped by model and kind, with a few examples of each kind."""
    failures = [entry for entry in entries if entry["rating"] <= FAILED_AT_MOST]
    by_model: dict[str, dict[str, int]] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    for entry in failures:
        kind = failure_kind(entry)
        model = entry["model"] or "?"
        by_model.setdefault(model, {}).setdefault(kind, 0)
        by_model[model][kind] += 1
        if len(examples.setdefault(kind, [])) < 3:
            examples[kind].append({"request_id": entry["request_id"], "question": _question(entry["prompt"])[:200],
                                   "answer": (entry["answer"] or "")[:200], "correction": entry["correction"]})
    rated = len(entries)
    return {"rated": rated, "failed": len(failures),
            "solved_share": None if not rated else round(100.0 * (rated - len(failures)) / rated, 1),
            "by_model": by_model, "examples": examples}


def report_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Feedback analysis", "", f"{summary['rated']} rated answers, {summary['failed']} failures "
             f"(rating <= {FAILED_AT_MOST}); solved: {summary['solved_share']}%.", "",
             "| model | moderation | refusal | numeric | other |", "| --- | ---: | ---: | ---: | ---: |"]
    for model, kinds in sorted(summary["by_model"].items()):
        lines.append(f"| {model} | " + " | ".join(str(kinds.get(k, 0)) for k in
                                                  ("moderation", "refusal", "numeric", "other")) + " |")
    for kind, shown in summary["examples"].items():
        lines += ["", f"## {kind}", ""]
        for example in shown:
            lines.append(f"- `{example['request_id']}`: {example['question']} → {example['answer']}"
                         + (f" (correction: {example['correction']})" if example["correction"] else ""))
    return "\n".join(lines) + "\n"


def _question(prompt: Any) -> str:
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return str(prompt)


def export_corrections(entries: list[dict[str, Any]], out: Path) -> int:
    """Each corrected chat answer as an SFT conversation (`messages`, the data stage's format); returns how many."""
    rows = []
    for entry in entries:
        if not entry["correction"] or not isinstance(entry["prompt"], list):
            continue
        rows.append({"id": f"feedback-{entry['id']}", "task": "feedback",
                     "messages": [*entry["prompt"], {"role": "assistant", "content": entry["correction"]}]})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return len(rows)
