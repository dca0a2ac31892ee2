"""Who may call what: one table of route × role, deny by default.

A route is (method, path template) as the app declares it. A route missing from `PERMISSIONS` is refused
for everyone, admins included, so a new endpoint is closed until someone decides who may use it. Probes
(`/healthz`, `/readyz`) and `/metrics` may also be opened to callers without a key from trusted networks
(`GatewayConfig.open_routes`, `trusted_networks`): load balancers and Prometheus carry no key.
"""

from __future__ import annotations

ANONYMOUS = "anonymous"
EVERY_ROLE = frozenset({"admin", "operator", "user", "viewer"})
GENERATE = frozenset({"admin", "operator", "user"})
OPERATE = frozenset({"admin", "operator"})
ADMIN = frozenset({"admin"})

PERMISSIONS: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/healthz"): EVERY_ROLE,
    ("GET", "/readyz"): EVERY_ROLE,
    ("GET", "/metrics"): OPERATE | {"viewer"},
    ("GET", "/openapi.json"): EVERY_ROLE,
    ("GET", "/v1/models"): EVERY_ROLE,
    ("GET", "/v1/models/{model_id:path}"): EVERY_ROLE,
    ("POST", "/v1/chat/completions"): GENERATE,
    ("POST", "/v1/completions"): GENERATE,
    ("POST", "/v1/embeddings"): GENERATE,
    ("POST", "/v1/rag/search"): GENERATE,
    ("POST", "/v1/feedback"): GENERATE,
    ("GET", "/admin/loras"): OPERATE,
    ("POST", "/admin/loras"): OPERATE,
    ("DELETE", "/admin/loras/{name}"): OPERATE,
    ("GET", "/admin/keys"): ADMIN,
    ("POST", "/admin/keys"): ADMIN,
    ("DELETE", "/admin/keys/{key_id}"): ADMIN,
    ("POST", "/admin/keys/{key_id}/rotate"): ADMIN,
    ("GET", "/admin/registry"): OPERATE | {"viewer"},
    ("POST", "/admin/registry/{name}/promote"): ADMIN,
    ("POST", "/admin/registry/{name}/rollback"): ADMIN,
}
# Routes whose request body names a model: a key scoped to some models may use only those.
MODEL_SCOPED = frozenset({("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
                          ("POST", "/v1/rag/search")})


def allowed(method: str, template: str, role: str) -> bool:
    """Whether `role` may call the route; a route missing from the table is refused."""
    roles = PERMISSIONS.get((method.upper(), template))
    return roles is not None and role in roles


def known(method: str, template: str) -> bool:
    return (method.upper(), template) in PERMISSIONS
