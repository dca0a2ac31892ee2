"""Schemathesis over the server's own OpenAPI document: generated requests to every operation, through the
gateway (an admin key) and moderation, must never get a 5xx nor a status the document does not list."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import status_code_conformance  # noqa: E402

from conftest import build_tiny_model, build_tiny_tokenizer  # noqa: E402


def build_app():
    import tempfile
    from pathlib import Path

    from lmsmith.gateway.config import GatewayConfig
    from lmsmith.gateway.keys import KeyStore
    from lmsmith.gateway.middleware import Gateway
    from lmsmith.gateway.moderation import TermModerator
    from lmsmith.serve.api import create_app
    from lmsmith.serve.client import LocalClient
    from lmsmith.serve.engine import Engine

    tokenizer = build_tiny_tokenizer()
    engine = Engine(build_tiny_model(tokenizer).eval(), tokenizer)
    state = Path(tempfile.mkdtemp(prefix="lmsmith-fuzz-"))
    (state / "adapters").mkdir()
    store = KeyStore(state)
    admin, _ = store.create("fuzz", "admin", rpm=None)
    import os

    from lmsmith.gateway.audit import AuditLog
    from lmsmith.gateway.feedback import FeedbackStore

    data_key = os.urandom(32)
    gateway = Gateway(store, GatewayConfig(adapter_root=str(state / "adapters")), audit=AuditLog(state, data_key),
                      feedback=FeedbackStore(state, None, data_key))
    client = LocalClient("tiny", engine, adapter_root=state / "adapters")
    app = create_app(client, default_max_tokens=2, gateway=gateway, moderator=TermModerator(["内幕消息"]))
    return app, admin


APP, ADMIN_KEY = build_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, headers={"Authorization": f"Bearer {ADMIN_KEY}"})


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors_and_no_undocumented_statuses(case):
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                           checks=[not_a_server_error, status_code_conformance])
