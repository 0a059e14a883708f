"""A request's prompt as vLLM will tokenize it, and its vLLM block hashes, for precise prefix
matching (vllm_fleet.router.precise).

vLLM 0.32 renders a chat with the model's chat template through transformers'
``apply_chat_template(..., tokenize=True)`` (so no extra special tokens: chat requests'
``add_special_tokens`` defaults to false), and encodes a completion prompt with
``add_special_tokens`` true by default. The router does the same with the same tokenizer, loaded
once per model from the replica's model root (its GET /v1/models ``root``: the ``--model`` path or
Hugging Face id), then hashes the ids as vLLM does (vllm_fleet.router.block_hashes) for each block
size the candidate replicas use. Only requests whose rendering is reproduced exactly are matched
precisely: plain-text chats (role and string content per message; no tools, documents, custom
templates or template arguments, multimodal parts) and completions of one string or one token-id
list. Everything else keeps the approximate index.

Cost: a 1,520-token chat of the tiny test model took ~1.1 ms to render and tokenize on this
project's 2-core box (the hashes ~50 us more at 128-token blocks). That is too much for the
event loop, so it runs in a one-thread executor (the Rust tokenizer releases the GIL: the loop
kept 97 % of its speed meanwhile); the request waits for it, the other requests do not. When
MAX_PENDING requests already wait for the tokenizer (a burst), a request keeps the approximate
index rather than queueing.

transformers is an optional dependency (``pip install 'vllm-fleet[precise]'``; vLLM installs it
anyway): without it, or when a tokenizer cannot be loaded, the router says so once and matches
that model approximately.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from vllm_fleet.router.balancer import RequestInfo
from vllm_fleet.router.block_hashes import PromptBlocks, prompt_blocks
from vllm_fleet.router.precise import ModelCard, base_card, live_events
from vllm_fleet.router.state import Fleet

log = logging.getLogger("vllm_fleet.router")

#: Requests waiting for the tokenizer thread at most; more keep the approximate index.
MAX_PENDING = 8
#: A tokenizer that did not load is tried again after this long (a Hub hiccup, a model
#: directory that appeared later), on the next request that asks for it.
RETRY_LOAD_S = 60.0
#: Request fields that change a chat's rendering in ways not reproduced here.
CHAT_FIELDS_NOT_REPRODUCED = frozenset(
    {
        "tools",
        "functions",
        "documents",
        "chat_template",
        "chat_template_kwargs",
        "reasoning_effort",
        "mm_processor_kwargs",
        "truncate_prompt_tokens",
        "prompt_embeds",
    }
)

#: A loaded tokenizer (transformers' PreTrainedTokenizerBase; typed loosely: optional import).
Tokenizer = Any
TokenizerLoader = Callable[[str], Tokenizer | None]


def load_tokenizer(root: str) -> Tokenizer | None:
    """The model's tokenizer from its root (a local path or a Hugging Face id); None, with one
    log line naming the cause, when transformers is missing or the tokenizer does not load.

    A root that is neither a directory here nor an ``org/name`` id (the simulator's model
    name, say) names no tokenizer: refused before importing transformers (~5 s of CPU)."""
    if not os.path.isdir(root) and ("/" not in root or os.path.isabs(root)):
        log.info("precise prefix matching off for model root=%s: no tokenizer there", root)
        return None
    started = time.monotonic()
    try:
        from transformers import AutoTokenizer
    except ImportError:
        log.warning(
            "precise prefix matching off: transformers is not installed "
            "(pip install 'vllm-fleet[precise]'); using the approximate prefix index"
        )
        return None
    # Local first (a --model directory, or the Hugging Face cache the replicas on this host
    # filled); the Hub only for an ``org/name`` id: a bare name is no Hub model we could use.
    hub = "/" in root and not os.path.isabs(root) and not os.path.exists(root)
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
        except OSError:
            if not hub:
                raise
            tokenizer = AutoTokenizer.from_pretrained(root)
    except Exception as exc:  # any loader failure means: match this model approximately
        log.warning(
            "precise prefix matching off for model root=%s: its tokenizer did not load (%s); "
            "using the approximate prefix index",
            root,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return None
    log.info("tokenizer loaded root=%s seconds=%.1f", root, time.monotonic() - started)
    return tokenizer


def chat_messages(payload: Mapping[str, Any]) -> list[dict[str, str]] | None:
    """The chat's messages as vLLM passes them to the template, or None when the request's
    rendering is not reproduced here."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    if any(payload.get(name) for name in CHAT_FIELDS_NOT_REPRODUCED):
        return None
    out: list[dict[str, str]] = []
    for m in messages:
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            return None
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            return None
        out.append({"role": role, "content": content})
    return out


def token_ids(tokenizer: Tokenizer, payload: Mapping[str, Any]) -> list[int] | None:
    """The prompt's token ids as vLLM 0.32 computes them, or None when not reproduced."""
    if "messages" in payload:
        messages = chat_messages(payload)
        generation = payload.get("add_generation_prompt", True)
        final = payload.get("continue_final_message", False)
        special = payload.get("add_special_tokens", False)
        flags_ok = isinstance(generation, bool) and isinstance(final, bool) and special is False
        if messages is None or not flags_ok:
            return None
        ids = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=generation,
            continue_final_message=final,
            tokenize=True,
            return_dict=False,
        )
        return list(ids) if isinstance(ids, list) else None
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt
    if not isinstance(prompt, str) or payload.get("truncate_prompt_tokens") is not None:
        return None
    special = payload.get("add_special_tokens", True)
    if not isinstance(special, bool):
        return None
    return list(tokenizer.encode(prompt, add_special_tokens=special))


def blocks_of(
    tokenizer: Tokenizer,
    body: bytes,
    block_sizes: Iterable[int],
    lora: tuple[str, str] | None,
) -> PromptBlocks | None:
    """The request body's PromptBlocks (runs in the tokenizer thread); None when its prompt is
    not reproduced or the template rejects it (vLLM then answers the error itself)."""
    try:
        payload = json.loads(body)
        if not isinstance(payload, dict):
            return None
        ids = token_ids(tokenizer, payload)
        if not ids:
            return None
        salt = payload.get("cache_salt")
        salt = salt if isinstance(salt, str) and salt else None
        return prompt_blocks(ids, block_sizes, lora=lora, cache_salt=salt)
    except Exception as exc:  # a template error is the request's; it keeps the approximate index
        log.debug("precise prefix matching skipped a request: %r", exc)
        return None


class PromptTokenizers:
    """One tokenizer per model root, loaded once in the background, and the thread that runs
    them; one per router app (built and shut down by its cleanup context)."""

    def __init__(
        self,
        loader: TokenizerLoader = load_tokenizer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loader = loader
        self._clock = clock
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tokenize"
        )
        self._tokenizers: dict[str, Tokenizer | None] = {}
        self._loading: dict[str, asyncio.Future[Tokenizer | None]] = {}
        #: When each root's last load failed (monotonic seconds).
        self._failed_at: dict[str, float] = {}
        self.pending = 0
        #: Requests matched precisely, and those that kept the approximate index because the
        #: tokenizer thread was busy.
        self.matched = 0
        self.skipped_busy = 0

    def tokenizer(self, root: str) -> Tokenizer | None:
        """The loaded tokenizer of ``root``; None while it loads (the load starts on first
        ask) or when it cannot be loaded."""
        if root in self._tokenizers:
            loaded = self._tokenizers[root]
            if loaded is not None or self._clock() - self._failed_at[root] < RETRY_LOAD_S:
                return loaded
            del self._tokenizers[root]
        if root not in self._loading:
            future = asyncio.get_running_loop().run_in_executor(self._executor, self._loader, root)
            self._loading[root] = future
            future.add_done_callback(lambda f: self._loaded(root, f))
        return None

    def state(self, root: str) -> str:
        """``loaded``, ``loading``, ``failed`` (matched approximately; tried again after
        RETRY_LOAD_S) or ``not asked``: for /fleet/replicas."""
        if root in self._loading:
            return "loading"
        if root not in self._tokenizers:
            return "not asked"
        return "failed" if self._tokenizers[root] is None else "loaded"

    def states(self, cards: Mapping[str, ModelCard]) -> dict[str, str]:
        """Each model's tokenizer state (an adapter's is its base model's)."""
        out = {}
        for model, card in cards.items():
            base = base_card(cards, card)
            out[model] = "no base model" if base is None else self.state(base.root)
        return out

    def preload(self, cards: Mapping[str, ModelCard]) -> None:
        """Start loading the tokenizers of a replica's models (a LoRA adapter's is its base
        model's): importing transformers alone takes ~5 s of CPU, and a router that loaded
        only at the first request matched a whole 32-request run approximately."""
        for card in cards.values():
            if (base := base_card(cards, card)) is not None:
                self.tokenizer(base.root)

    def _loaded(self, root: str, future: asyncio.Future[Tokenizer | None]) -> None:
        self._loading.pop(root, None)
        exc = None if future.cancelled() else future.exception()
        self._tokenizers[root] = None if future.cancelled() or exc else future.result()
        if self._tokenizers[root] is None:
            self._failed_at[root] = self._clock()

    async def wait_loaded(self, root: str) -> bool:
        """Start loading ``root`` if needed and wait for it; whether it loaded (tests)."""
        if self.tokenizer(root) is None and root in self._loading:
            await asyncio.shield(self._loading[root])
        return self._tokenizers.get(root) is not None

    async def blocks(
        self,
        root: str,
        body: bytes,
        block_sizes: Iterable[int],
        lora: tuple[str, str] | None = None,
    ) -> PromptBlocks | None:
        """The request's PromptBlocks, computed in the tokenizer thread; None when the
        tokenizer is not loaded (yet), the thread is busy, or the prompt is not reproduced."""
        tokenizer = self.tokenizer(root)
        if tokenizer is None:
            return None
        if self.pending >= MAX_PENDING:
            self.skipped_busy += 1
            return None
        sizes = tuple(block_sizes)
        self.pending += 1
        try:
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(
                self._executor, blocks_of, tokenizer, body, sizes, lora
            )
        finally:
            self.pending -= 1
        if found is not None:
            self.matched += 1
        return found

    async def attach(self, fleet: Fleet, info: RequestInfo, body: bytes) -> RequestInfo:
        """``info`` with the request's PromptBlocks when a candidate replica of its model has
        live KV events and says where the model's tokenizer is; ``info`` itself otherwise."""
        model = info.model
        if model is None or not info.prefix:
            return info
        sizes: set[int] = set()
        root: str | None = None
        lora: tuple[str, str] | None = None
        for replica in fleet.replicas.values():
            events = live_events(replica)
            if events is None or not replica.healthy or model not in replica.models:
                continue
            card = events.models.get(model)
            size = events.block_size or replica.prefixes.block_tokens
            if card is None or size <= 0:
                continue
            base = base_card(events.models, card)  # an adapter: its base model's tokenizer
            if base is None:
                continue
            root = base.root
            if card.parent is not None:
                lora = (model, card.root)
            sizes.add(size)
        if root is None:
            return info
        blocks = await self.blocks(root, body, sizes, lora)
        return info if blocks is None else dataclasses.replace(info, blocks=blocks)

    def close(self) -> None:
        """Stop the thread (a load or tokenization in progress finishes on its own)."""
        for future in self._loading.values():
            future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
