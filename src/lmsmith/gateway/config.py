"""The gateway's settings: where its state lives, how limits are shared, what is open to probes."""

from __future__ import annotations

import ipaddress
import os
from typing import Literal, Optional

from pydantic import Field, SecretStr, field_validator

from lmsmith.schema import StrictModel

# Loopback and the private ranges a cluster's probes and scrapers come from.
DEFAULT_TRUSTED = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]


class GatewayConfig(StrictModel):
    """Keys, roles and limits in front of the API (`lmsmith.gateway`)."""

    state_dir: Optional[str] = Field(
        None, description="Key store (SQLite) and other server state; default LMSMITH_STATE_DIR, else ~/.lmsmith.")
    database_url: Optional[SecretStr] = Field(
        default_factory=lambda: SecretStr(os.environ["LMSMITH_DATABASE_URL"]) if os.environ.get(
            "LMSMITH_DATABASE_URL") else None,
        description="A SQLAlchemy URL for the key store instead of SQLite (e.g. Postgres); default from the "
        "environment variable LMSMITH_DATABASE_URL, since it may hold a password.")
    limits_redis_url: Optional[SecretStr] = Field(
        default_factory=lambda: SecretStr(os.environ["LMSMITH_LIMITS_REDIS_URL"]) if os.environ.get(
            "LMSMITH_LIMITS_REDIS_URL") else None,
        description="Keep rate-limit counters in this Redis, shared by every replica (default: in memory).")
    open_routes: list[str] = Field(
        ["/healthz", "/readyz"], description="Routes callers on trusted networks may use without a key "
        "(add /metrics for a Prometheus that carries none).")
    trusted_networks: list[str] = Field(list(DEFAULT_TRUSTED), description="CIDRs whose callers get open_routes.")
    adapter_root: Optional[str] = Field(
        None, description="POST /admin/loras loads only folders under this one, by relative name; without it "
        "adapters load only at start (--lora).")
    audit: bool = Field(
        True, description="Keep the encrypted audit log (STATE_DIR/audit.log) when LMSMITH_AUDIT_KEY or "
        "audit_key_file gives a key; without a key it is off, and serve says so.")
    audit_key_file: Optional[str] = Field(None, description="A file holding the audit key (base64 of 32 bytes); "
                                          "default: the environment variable LMSMITH_AUDIT_KEY.")
    audit_full_text: list[str] = Field(
        [], description="Key ids or model names whose requests are logged with their full text (default: hashes).")
    moderation_terms: Optional[str] = Field(
        None, description="A term list (one per line) moderated on requests and answers, or `default` for the "
        "embedded finance-compliance list; None: no moderation.")
    moderation_input: Literal["block", "mask", "flag", "off"] = Field(
        "block", description="On a listed term in a request: 400 content_filter, mask it, or only flag it.")
    moderation_output: Literal["block", "mask", "flag", "off"] = Field(
        "block", description="On a listed term in an answer: stop it (finish_reason content_filter), mask it, or flag it.")
    moderation_classifier: Optional[str] = Field(
        None, description="A moderation classifier (a run folder or model folder trained by "
        "recipes/moderation-classifier.yaml) that also checks request text.")
    moderation_threshold: float = Field(0.5, gt=0, lt=1, description="P(violating) at which the classifier acts.")
    moderation_classifier_action: Literal["block", "flag"] = Field("block", description="What a classifier hit does.")
    insecure_no_auth: bool = Field(
        False, description="Serve without keys on a non-loopback address (otherwise refused).")

    @field_validator("trusted_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"trusted_networks: {network!r} is not a CIDR (e.g. 10.0.0.0/8)") from None
        return value

    def trusts(self, host: str | None) -> bool:
        if not host:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in ipaddress.ip_network(network, strict=False) for network in self.trusted_networks)
