"""Eval against any OpenAI-compatible server (lmsmith serve, vLLM, llama.cpp, a hosted API), over httpx.

- Generation: `/v1/chat/completions`, greedy, several requests in flight.
- Log-likelihood: `/v1/completions` with `echo`, `logprobs` and `max_tokens: 0`, as lm-evaluation-harness
  asks: the server returns the log-probability of every prompt token and their character offsets, and an
  option's score is the sum over the tokens that start inside it.
- **Probe first.** Before any log-likelihood scoring the server is asked once; if it returns no prompt
  logprobs, or the same value for every token (llama.cpp's server drops them and lm-eval then reports
  chance without a word), log-likelihood scoring is refused with a message instead of a fake score.
- **Chat fallback** (multiple choice only): a server without prompt logprobs whose chat API gives
  `top_logprobs` (hosted APIs) is asked each question through chat for one token, and each option
  letter scores the best logprob among the top tokens that spell it (" B", "(B"); a letter outside the
  top 20 scores -inf. The scores say which route they took (`acc_route`).

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
    _choice_route: str | None = field(default=None, repr=False)

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

    def chat_with_usage(self, messages: Sequence[dict], max_new_tokens: int) -> tuple[str, int]:
        """One greedy answer and the completion tokens the server says it generated."""
        body = {"model": self.model, "messages": list(messages), "max_tokens": max_new_tokens, "temperature": 0}
        answer = self._post("/chat/completions", body)
        try:
            text = (answer["choices"][0]["message"].get("content") or "").strip()
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{self.base_url}/chat/completions: no choices[0].message in the answer") from None
        usage = answer.get("usage") or {}
        return text, int(usage.get("completion_tokens") or 0)

    def chat(self, conversations: Sequence[Sequence[dict]], max_new_tokens: int) -> list[str]:
        """Greedy answers, in order, with `concurrency` requests in flight."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return [text for text, _ in pool.map(lambda c: self.chat_with_usage(c, max_new_tokens), conversations)]

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

    def chat_top_logprobs(self, prompt: str, top: int = 20) -> dict[str, float]:
        """{token: logprob} of the first answer token to `prompt` asked through chat ({} if none are returned)."""
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1,
                "temperature": 0, "logprobs": True, "top_logprobs": top}
        answer = self._post("/chat/completions", body)
        try:
            content = (answer["choices"][0].get("logprobs") or {}).get("content") or []
        except (KeyError, IndexError, TypeError, AttributeError):
            content = []
        entries = content[0].get("top_logprobs") or [] if content else []
        found: dict[str, float] = {}
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("logprob"), (int, float)):
                token = str(entry.get("token", ""))
                found[token] = max(float(entry["logprob"]), found.get(token, -math.inf))
        return found

    def choice_route(self) -> str:
        """How multiple choice is scored here: "completions" (echoed prompt logprobs) or "chat_top_logprobs"."""
        if self._choice_route is None:
            try:
                self.check_prompt_logprobs()
                self._choice_route = "completions"
            except UserError as refused:
                try:
                    probe = self.chat_top_logprobs(PROBE_PROMPT + "\n这句话里的增长率是多少？")
                except UserError:
                    probe = {}
                if len(set(probe.values())) < 2:
                    raise UserError(f"{refused} (its chat API gives no top_logprobs either)") from None
                self._choice_route = "chat_top_logprobs"
        return self._choice_route

    def letter_logprobs(self, prompts: Sequence[str], letter_sets: Sequence[str]) -> list[list[float]]:
        """Per question, each option letter's best logprob among the first chat token's top logprobs."""
        def score(job: tuple[str, str]) -> list[float]:
            prompt, letters = job
            top = self.chat_top_logprobs(prompt)
            best = {letter: -math.inf for letter in letters}
            for token, value in top.items():
                letter = token.strip().lstrip("(（[【").upper()
                if letter in best:
                    best[letter] = max(best[letter], value)
            return [best[letter] for letter in letters]

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(score, zip(prompts, letter_sets)))

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
