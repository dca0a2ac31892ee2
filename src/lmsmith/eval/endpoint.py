"""Eval against any OpenAI-compatible server (lmsmith serve, vLLM, llama.cpp, a hosted API), over httpx.

- Generation: `/v1/chat/completions`, greedy, several requests in flight.
- Log-likelihood: `/v1/completions` with `echo`, `logprobs` and `max_tokens: 0`, as lm-evaluation-harness
  asks: the server returns the log-probability of every prompt token and their character offsets, and an
  option's score is the sum over the tokens that start inside it.
- **Probe first.** Before any log-likelihood scoring the server is asked once; if it returns no prompt
  logprobs, or the same value for every token (llama.cpp's server drops them and lm-eval then reports
  chance without a word), log-likelihood scoring is refused with a message instead of a fake score.

The server's tokenizer is its own business: offsets are characters of the text sent, so nothing here
needs to tokenize like the server does.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

from lmsmith.errors import UserError

PROBE_PROMPT = "星辰科技2023年营业收入为12.5亿元，同比增长15.2%。"


@dataclass
class EndpointModel:
    """An OpenAI-compatible server and the model name requests carry."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0
    concurrency: int = 8
    _checked_logprobs: bool = field(default=False, repr=False)

    @classmethod
    def from_spec(cls, spec: str) -> "EndpointModel":
        """`http://host:port/v1` or `...#MODEL`; without a model name the server's first listed one.
        The key comes from OPENAI_API_KEY (never from the command line, where it would be logged)."""
        url, _, name = spec.partition("#")
        url = url.rstrip("/")
        if not url.endswith("/v1"):
            url += "/v1"
        endpoint = cls(base_url=url, model=name, api_key=os.environ.get("OPENAI_API_KEY"))
        if not endpoint.model:
            listed = endpoint._get("/models").get("data") or []
            if not listed:
                raise UserError(f"{url}: /models lists no model; name one as {spec}#MODEL")
            endpoint.model = listed[0]["id"]
        return endpoint

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _get(self, path: str) -> dict[str, Any]:
        import httpx

        try:
            response = httpx.get(self.base_url + path, headers=self._headers(), timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise UserError(f"{self.base_url}: cannot reach the server: {exc}") from None
        return self._json(response, path)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        try:
            response = httpx.post(self.base_url + path, json=body, headers=self._headers(), timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise UserError(f"{self.base_url}: cannot reach the server: {exc}") from None
        return self._json(response, path)

    def _json(self, response, path: str) -> dict[str, Any]:
        if response.status_code >= 400:
            detail = response.text.strip().splitlines()[0][:300] if response.text.strip() else ""
            raise UserError(f"{self.base_url}{path}: HTTP {response.status_code} {detail}")
        try:
            return response.json()
        except ValueError:
            raise UserError(f"{self.base_url}{path}: the answer is not JSON") from None

    # ----- generation

    def chat(self, conversations: Sequence[Sequence[dict]], max_new_tokens: int) -> list[str]:
        """Greedy answers, in order, with `concurrency` requests in flight."""
        def ask(messages):
            body = {"model": self.model, "messages": list(messages), "max_tokens": max_new_tokens, "temperature": 0}
            answer = self._post("/chat/completions", body)
            try:
                return (answer["choices"][0]["message"].get("content") or "").strip()
            except (KeyError, IndexError, TypeError):
                raise UserError(f"{self.base_url}/chat/completions: no choices[0].message in the answer") from None

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(ask, conversations))

    # ----- log-likelihood

    def _prompt_logprobs(self, text: str) -> tuple[list[float | None], list[int]]:
        body = {"model": self.model, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
        answer = self._post("/completions", body)
        try:
            logprobs = answer["choices"][0]["logprobs"] or {}
        except (KeyError, IndexError, TypeError):
            logprobs = {}
        return list(logprobs.get("token_logprobs") or []), list(logprobs.get("text_offset") or [])

    def check_prompt_logprobs(self) -> None:
        """Refuse, with the reason, a server whose prompt logprobs are missing or carry no information."""
        if self._checked_logprobs:
            return
        where = f"{self.base_url}/completions"
        try:
            values, offsets = self._prompt_logprobs(PROBE_PROMPT)
        except UserError as exc:
            raise UserError(f"log-likelihood scoring needs prompt logprobs (echo + logprobs), and {exc}; score by "
                            "generation instead (scoring: [generate])") from None
        known = [value for value in values[1:] if value is not None]
        if not values or not offsets or len(offsets) != len(values) or not known:
            raise UserError(f"{where} returns no prompt logprobs for echo + logprobs requests, so log-likelihood "
                            "scores would be chance; score by generation instead (scoring: [generate])")
        if len(known) > 2 and max(known) - min(known) < 1e-6:
            raise UserError(f"{where} returns the same logprob ({known[0]}) for every prompt token, so "
                            "log-likelihood scores would be chance; score by generation instead")
        self._checked_logprobs = True

    def continuation_logprobs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Summed logprob of each continuation's tokens (those starting inside it) after its context."""
        self.check_prompt_logprobs()

        def score(pair):
            context, continuation = pair
            values, offsets = self._prompt_logprobs(context + continuation)
            inside = [value for value, offset in zip(values, offsets) if offset >= len(context)]
            if not inside or any(value is None or not math.isfinite(value) for value in inside):
                raise UserError(f"{self.base_url}/completions: no logprobs for the option {continuation!r}")
            return float(sum(inside))

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(score, pairs))
