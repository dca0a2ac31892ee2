"""The gateway: keys stored as hashes, the whole route × role matrix, model scopes, limits (memory and the
real redis-server), adapter loading under a root, and the CLI."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from conftest import fresh_minute
from lmsmith.errors import UserError
from lmsmith.gateway import rbac
from lmsmith.gateway.config import GatewayConfig
from lmsmith.gateway.keys import ROLES, KeyStore
from lmsmith.gateway.limits import MemoryLimiter, RedisLimiter
from lmsmith.gateway.middleware import Gateway
from lmsmith.serve.api import create_app
from lmsmith.serve.client import LocalClient
from lmsmith.serve.engine import Engine

QUESTION = [{"role": "user", "content": "毛利率为多少?"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = Engine.load(tiny_model_dir)
    yield engine
    engine.close()


def make_app(engine, model_name: str, tmp_path: Path, limiter=None, **settings):
    store = KeyStore(tmp_path / "state")
    config = GatewayConfig(adapter_root=str(tmp_path / "adapters"), **settings)
    (tmp_path / "adapters").mkdir(exist_ok=True)
    gateway = Gateway(store, config, limiter)
    client = LocalClient(model_name, engine, adapter_root=Path(config.adapter_root))
    return create_app(client, default_max_tokens=2, gateway=gateway, embedder=None), store


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


# ----- the key store -----

def test_keys_are_stored_as_hashes_and_stop_when_revoked_rotated_or_expired(tmp_path):
    store = KeyStore(tmp_path)
    secret, key = store.create("ci", "user", ["finance"], rpm=60, tpm=20000)
    assert re.fullmatch(r"lms_[0-9a-f]{12}_[A-Za-z0-9_-]{40,}", secret)
    assert store.authenticate(secret).id == key.id and store.authenticate(secret + "x") is None
    assert secret.split("_", 2)[2].encode() not in (tmp_path / "lmsmith.db").read_bytes()
    rotated, _ = store.rotate(key.id)
    assert store.authenticate(secret) is None and store.authenticate(rotated).id == key.id
    store.revoke(key.id)
    assert store.authenticate(rotated) is None and not store.has_keys()
    short, _ = store.create("short", "viewer", expires_in_s=0.05)
    time.sleep(0.1)
    assert store.authenticate(short) is None
    with pytest.raises(UserError, match="--role 'root': one of admin, operator, user, viewer"):
        store.create("x", "root")
    store.close()
    reopened = KeyStore(tmp_path)  # migrations run once; rows survive
    assert [k.name for k in reopened.list()] == ["ci", "short"]


# ----- route × role -----

def concrete(template: str, model: str) -> str:
    return (template.replace("{model_id:path}", model).replace("{name}", "ghost")
            .replace("{key_id}", "000000000000"))


BODIES = {
    "/v1/chat/completions": lambda model: {"model": model, "messages": QUESTION, "max_tokens": 1},
    "/v1/completions": lambda model: {"model": model, "prompt": "营业收入", "max_tokens": 1},
    "/v1/embeddings": lambda model: {"model": "minilm", "input": "x"},
    "/admin/loras": lambda model: {"name": "fin", "path": "ghost"},
    "/admin/keys": lambda model: {"name": "made-in-test", "role": "viewer"},
}


def app_routes(app) -> list[tuple[str, str]]:
    routes = []
    for route in app.router.routes:
        for method in sorted(getattr(route, "methods", None) or ()):
            if method != "HEAD":
                routes.append((method, route.path))
    return routes


def test_every_route_and_role_including_anonymous(engine, tiny_model_dir, tmp_path):
    app, store = make_app(engine, tiny_model_dir.name, tmp_path)
    keys = {role: store.create(f"{role}-key", role)[0] for role in ROLES}
    routes = app_routes(app)
    assert set(routes) == set(rbac.PERMISSIONS), "every route has an entry, every entry a route"
    with TestClient(app) as http:
        for method, template in routes:
            path = concrete(template, tiny_model_dir.name)
            body = BODIES.get(template, lambda model: None)(tiny_model_dir.name)
            for role in (*ROLES, None):
                reply = http.request(method, path, json=body, headers=bearer(keys.get(role)))
                if role is None:
                    assert reply.status_code == 401, (method, template, reply.text)
                elif rbac.allowed(method, template, role):
                    assert reply.status_code not in (401, 403), (method, template, role, reply.text)
                else:
                    assert reply.status_code == 403, (method, template, role, reply.text)
                    assert f"role {role} may not call" in reply.json()["error"]["message"]
        # A route nobody put in the table is closed to everyone, admins included.
        @app.get("/v1/unlisted")
        async def unlisted() -> dict:
            return {}

        denied = http.get("/v1/unlisted", headers=bearer(keys["admin"]))
        assert denied.status_code == 403 and "not in the permission table" in denied.json()["error"]["message"]
        assert http.get("/v1/models", headers=bearer("lms_000000000000_" + "a" * 43)).status_code == 401


def test_probes_are_open_to_trusted_networks_only(engine, tiny_model_dir, tmp_path):
    from lmsmith.serve.api import running_server

    app, store = make_app(engine, tiny_model_dir.name, tmp_path)
    store.create("admin", "admin")
    with running_server(app) as url:  # a real socket: the caller is 127.0.0.1
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 401  # not opened by default
        assert httpx.get(f"{url}/v1/models").status_code == 401
    with TestClient(app) as http:  # TestClient's caller is "testclient", not a trusted address
        assert http.get("/healthz").status_code == 401


def test_without_keys_every_route_is_open_and_the_first_key_closes_them(engine, tiny_model_dir, tmp_path):
    app, store = make_app(engine, tiny_model_dir.name, tmp_path)
    with TestClient(app) as http:
        assert http.get("/v1/models").status_code == 200
        store.create("first", "admin")
        assert http.get("/v1/models").status_code == 401


def test_a_key_uses_only_its_models(engine, tiny_model_dir, tmp_path):
    app, store = make_app(engine, tiny_model_dir.name, tmp_path)
    mine, _ = store.create("scoped", "user", [tiny_model_dir.name])
    other, _ = store.create("other", "user", ["finance-rag"])
    with TestClient(app) as http:
        ok = http.post("/v1/chat/completions", headers=bearer(mine),
                       json={"model": tiny_model_dir.name, "messages": QUESTION, "max_tokens": 1})
        assert ok.status_code == 200
        refused = http.post("/v1/chat/completions", headers=bearer(other),
                            json={"model": tiny_model_dir.name, "messages": QUESTION, "max_tokens": 1})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
        assert [card["id"] for card in http.get("/v1/models", headers=bearer(other)).json()["data"]] == []
        assert [card["id"] for card in http.get("/v1/models", headers=bearer(mine)).json()["data"]] == [tiny_model_dir.name]


def test_adapters_load_only_by_name_under_the_root_and_errors_hide_the_layout(engine, tiny_model_dir, tmp_path):
    app, store = make_app(engine, tiny_model_dir.name, tmp_path)
    operator, _ = store.create("ops", "operator")
    with TestClient(app) as http:
        for path in ("/etc", "../state", "ghost", str(tmp_path)):
            reply = http.post("/admin/loras", headers=bearer(operator), json={"name": "x", "path": path})
            assert reply.status_code == 400, path
            assert str(tmp_path) not in reply.json()["error"]["message"].replace(path, "")
        (tmp_path / "adapters" / "not-an-adapter").mkdir()
        broken = http.post("/admin/loras", headers=bearer(operator), json={"name": "x", "path": "not-an-adapter"})
        assert broken.status_code == 400 and str(tmp_path) not in broken.text
    plain = LocalClient("m", engine)  # no adapter root: loading over the API is refused outright
    with pytest.raises(Exception, match="--adapter-root"):
        plain.adapter_folder("fin")


# ----- limits -----

def test_rpm_burst_gets_429_with_retry_after_and_tokens_are_counted(engine, tiny_model_dir, tmp_path):
    app, store = make_app(engine, tiny_model_dir.name, tmp_path)
    key, row = store.create("burst", "user", rpm=3)
    body = {"model": tiny_model_dir.name, "messages": QUESTION, "max_tokens": 2}
    fresh_minute()
    with TestClient(app) as http:
        statuses = [http.post("/v1/chat/completions", headers=bearer(key), json=body) for _ in range(5)]
    assert [reply.status_code for reply in statuses] == [200, 200, 200, 429, 429]
    refused = statuses[3]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.json()["error"] == {"message": f"key {row.id}: 3 requests per minute", "type": "requests",
                                       "param": None, "code": "rate_limit_exceeded"}
    used = sum(reply.json()["usage"]["total_tokens"] for reply in statuses[:3])
    assert store.get(row.id).used_tokens == used > 0


def test_quota_and_streamed_usage_are_enforced(engine, tiny_model_dir, tmp_path):
    app, store = make_app(engine, tiny_model_dir.name, tmp_path)
    key, row = store.create("quota", "user", quota_tokens=1)
    body = {"model": tiny_model_dir.name, "messages": QUESTION, "max_tokens": 2, "stream": True}
    with TestClient(app) as http:
        first = http.post("/v1/chat/completions", headers=bearer(key), json=body)
        assert first.status_code == 200 and "[DONE]" in first.text
        assert store.get(row.id).used_tokens > 1  # a stream's tokens count too, without include_usage
        second = http.post("/v1/chat/completions", headers=bearer(key), json=body)
    assert second.status_code == 429 and second.json()["error"]["code"] == "insufficient_quota"


def test_memory_limiter_windows_tokens_and_concurrency():
    from lmsmith.gateway.keys import ApiKey

    async def scenario():
        limiter = MemoryLimiter()
        key = ApiKey("k1", "k", "user", tpm=10, concurrency=1)
        assert await limiter.admit(key, now=0.0) is None
        busy = await limiter.admit(key, now=1.0)
        assert busy is not None and "1 requests at once" in busy.message
        await limiter.finish(key, 12, now=1.0)
        over = await limiter.admit(key, now=2.0)
        assert over is not None and "tokens per minute" in over.message and over.retry_after_s == 58
        assert await limiter.admit(key, now=61.0) is None  # the next minute
    asyncio.run(scenario())


def test_redis_counters_are_shared_by_two_servers(engine, tiny_model_dir, tmp_path, redis_url):
    first, store = make_app(engine, tiny_model_dir.name, tmp_path / "a", RedisLimiter(redis_url))
    key, row = store.create("shared", "user", rpm=2)
    second, other_store = make_app(engine, tiny_model_dir.name, tmp_path / "b", RedisLimiter(redis_url))
    other_store.close()
    (tmp_path / "b" / "state" / "lmsmith.db").unlink()  # both servers read the same key store
    (tmp_path / "b" / "state" / "lmsmith.db").symlink_to(tmp_path / "a" / "state" / "lmsmith.db")
    body = {"model": tiny_model_dir.name, "messages": QUESTION, "max_tokens": 1}
    fresh_minute()
    with TestClient(first) as one, TestClient(second) as two:
        replies = [one.post("/v1/chat/completions", headers=bearer(key), json=body),
                   two.post("/v1/chat/completions", headers=bearer(key), json=body),
                   one.post("/v1/chat/completions", headers=bearer(key), json=body),
                   two.post("/v1/chat/completions", headers=bearer(key), json=body)]
    assert [reply.status_code for reply in replies] == [200, 200, 429, 429]


# ----- start-up and the CLI -----

def test_serve_refuses_a_public_address_without_keys(tmp_path):
    from lmsmith.serve.api import open_gateway
    from lmsmith.serve.config import ServeConfig

    with pytest.raises(UserError, match="--host 0.0.0.0: no API key exists yet"):
        open_gateway(ServeConfig(host="0.0.0.0"), GatewayConfig(state_dir=str(tmp_path)))
    open_gateway(ServeConfig(host="0.0.0.0"), GatewayConfig(state_dir=str(tmp_path), insecure_no_auth=True)).store.close()
    KeyStore(tmp_path).create("admin", "admin")
    gateway = open_gateway(ServeConfig(host="0.0.0.0"), GatewayConfig(state_dir=str(tmp_path)))
    assert gateway.required
    gateway.store.close()


def test_keys_cli_prints_only_the_key_and_mirrors_the_store(tmp_path, capsys):
    from lmsmith.cli import main

    state = ["--state-dir", str(tmp_path)]
    assert main(["keys", "create", "--role", "user", "--models", "finance,finance-rag", "--rpm", "60", "--tpm",
                 "20000", "--expires", "30d", *state]) == 0
    out = capsys.readouterr()
    secret = out.out.strip()
    assert re.fullmatch(r"lms_[0-9a-f]{12}_\S+", secret) and secret not in out.err
    key = KeyStore(tmp_path).authenticate(secret)
    assert key.models == ["finance", "finance-rag"] and (key.rpm, key.tpm) == (60, 20000) and key.expires_at
    assert main(["keys", "list", *state]) == 0
    listed = capsys.readouterr().out
    assert key.id in listed and secret.split("_", 2)[2] not in listed
    assert main(["keys", "rotate", key.id, *state]) == 0
    rotated = capsys.readouterr().out.strip()
    assert main(["keys", "revoke", key.id, *state]) == 0
    assert KeyStore(tmp_path).authenticate(rotated) is None
    assert main(["keys", "create", "--expires", "soon", *state]) == 2
    assert "--expires 'soon'" in capsys.readouterr().err


# ----- the audit log -----

def audit_key() -> bytes:
    import os

    return os.urandom(32)


def test_audit_verify_detects_an_edited_a_removed_and_a_cut_record(tmp_path):
    import json as jsonlib

    from lmsmith.gateway.audit import AuditLog

    key = audit_key()
    log = AuditLog(tmp_path, key)
    for index in range(5):
        log.append({"request_id": f"r{index}", "status": 200})
    assert log.verify() == [] and [r["request_id"] for r in log.read()] == [f"r{i}" for i in range(5)]
    lines = log.path.read_text().splitlines()

    edited = jsonlib.loads(lines[2])
    raw = bytearray(__import__("base64").b64decode(edited["data"]))
    raw[0] ^= 1
    edited["data"] = __import__("base64").b64encode(bytes(raw)).decode()
    log.path.write_text("\n".join(lines[:2] + [jsonlib.dumps(edited)] + lines[3:]) + "\n")
    assert any(p.seq == 3 for p in log.verify())

    log.path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # record 2 removed
    problems = [p.what for p in log.verify()]
    assert any("records removed" in what for what in problems) and any("does not chain" in what for what in problems)

    log.path.write_text("\n".join(lines[:4]) + "\n")  # the last record cut
    assert any("cut from the end" in p.what for p in log.verify())

    log.path.write_text("\n".join(lines) + "\n")
    assert log.verify() == []


def test_audit_log_is_unreadable_without_its_key_and_rotates(tmp_path):
    from lmsmith.gateway.audit import AuditLog

    old, new = audit_key(), audit_key()
    # "-" is outside base64's alphabet, so the id cannot turn up inside a ciphertext by chance.
    AuditLog(tmp_path, old).append({"request_id": "req-visible-1", "prompt": "华信银行的资产负债率是多少?"})
    text = (tmp_path / "audit.log").read_text()
    assert "req-visible-1" not in text and "华信银行" not in text
    with pytest.raises(UserError, match="does not open with this key"):
        list(AuditLog(tmp_path, new).read())
    assert AuditLog(tmp_path, old).rotate(new) == 1
    assert [r["request_id"] for r in AuditLog(tmp_path, new).read()] == ["req-visible-1"]
    assert AuditLog(tmp_path, new).verify() == []
    with pytest.raises(UserError):
        list(AuditLog(tmp_path, old).read())


def test_every_request_is_audited_with_hashes_and_no_secret_anywhere(engine, tiny_model_dir, tmp_path, monkeypatch):
    import base64
    import hashlib
    import json as jsonlib

    from lmsmith.cli import main
    from lmsmith.gateway.audit import AuditLog

    key = audit_key()
    store = KeyStore(tmp_path / "state")
    secret, row = store.create("audited", "user")
    config = GatewayConfig(state_dir=str(tmp_path / "state"), audit_full_text=[row.id])
    gateway = Gateway(store, config, audit=AuditLog(tmp_path / "state", key))
    app = create_app(LocalClient(tiny_model_dir.name, engine), default_max_tokens=2, gateway=gateway)
    body = {"model": tiny_model_dir.name, "messages": QUESTION, "max_tokens": 2}
    with TestClient(app) as http:
        answer = http.post("/v1/chat/completions", headers=bearer(secret), json=body)
        refused = http.get("/v1/models")  # no key: refused, and the refusal is a record too
        assert refused.status_code == 401
    records = list(AuditLog(tmp_path / "state", key).read())
    assert len(records) == 2
    record, refusal = records
    assert refusal["status"] == 401 and refusal["key_id"] is None and "requires an API key" in refusal["refused"]
    assert record["key_id"] == row.id and record["role"] == "user" and record["status"] == 200
    assert record["route"] == "POST /v1/chat/completions" and record["model"] == tiny_model_dir.name
    assert record["tokens"] == answer.json()["usage"]["total_tokens"]
    assert record["response_sha256"] == hashlib.sha256(answer.content).hexdigest()
    assert "毛利率" in record["prompt"]  # full text for this key, as configured
    encoded = base64.b64encode(key).decode()
    monkeypatch.setenv("LMSMITH_AUDIT_KEY", encoded)
    assert main(["audit", "verify", "--state-dir", str(tmp_path / "state")]) == 0
    # Neither the audit key nor the API key's secret is written anywhere in the state folder.
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert encoded.encode() not in data and key not in data and secret.encode() not in data, path
    assert jsonlib.dumps(config.model_dump(mode="json")).find(encoded) == -1
