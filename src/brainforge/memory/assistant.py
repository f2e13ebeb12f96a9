"""Answering from memory: route the question, retrieve, pick an SOP, build the prompt, generate.

`MemoryAssistant.context()` is the one place a prompt is augmented with memory; `ask` uses it
at answer time and training (`memory.enabled`) uses it for SFT examples and RL prompts, so
the model trains on exactly the prompts it will see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from brainforge.config import MemoryConfig
from brainforge.memory.retrieval import Hit, HybridRetriever, SearchResult
from brainforge.memory.router import QueryRouter, RouteDecision
from brainforge.memory.sop import SOPManager, SOPMatch
from brainforge.memory.store import MemoryStore

logger = logging.getLogger(__name__)


@dataclass
class MemoryContext:
    question: str
    decision: RouteDecision
    search: SearchResult | None
    sop: SOPMatch | None
    system_prompt: str

    @property
    def hits(self) -> list[Hit]:
        return self.search.hits if self.search else []


@dataclass
class Answer:
    text: str
    context: MemoryContext


def compose_system_prompt(base: str, hits: list[Hit], sop: SOPMatch | None) -> str:
    """System prompt, then numbered context with its source lines, then the procedure."""
    parts = [base.strip()]
    if hits:
        blocks = []
        for number, hit in enumerate(hits, start=1):
            body = hit.chunk.text.partition("\n")[2]
            blocks.append(f"[{number}] {hit.chunk.location}\n{body.strip()}")
        parts.append("Context:\n" + "\n\n".join(blocks))
    if sop is not None:
        parts.append(sop.sop.format_steps())
    return "\n\n".join(p for p in parts if p)


class MemoryAssistant:
    def __init__(self, config: MemoryConfig, store: MemoryStore | None = None) -> None:
        self.config = config
        self.store = store or MemoryStore(config)
        self.sops = SOPManager.from_paths(config.sops, builtin=config.builtin_sops,
                                          embed=lambda texts: self.store.embedder.embed_queries(texts))
        self.router = QueryRouter(config.router, self.store, self.sops)
        self._retriever: HybridRetriever | None = None

    @property
    def retriever(self) -> HybridRetriever:
        if self._retriever is None:
            self._retriever = HybridRetriever(self.store, self.config.retrieval)
        return self._retriever

    def context(self, question: str, base_system_prompt: str | None = None) -> MemoryContext:
        decision = self.router.route(question)
        search = self.retriever.search(question) if decision.needs_knowledge else None
        system = compose_system_prompt(base_system_prompt or self.config.system_prompt,
                                       search.hits if search else [], decision.sop)
        return MemoryContext(question, decision, search, decision.sop, system)

    def messages(self, question: str) -> tuple[list[dict[str, str]], MemoryContext]:
        context = self.context(question)
        return [{"role": "system", "content": context.system_prompt}, {"role": "user", "content": question}], context

    def ask(self, question: str, chat_model: Any, max_new_tokens: int = 256) -> Answer:
        messages, context = self.messages(question)
        text = chat_model.generate([messages], max_new_tokens=max_new_tokens)[0]
        return Answer(text, context)

    def augment(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """A training conversation with memory put into its system prompt, as `ask` would."""
        question = next((m["content"] for m in messages if m["role"] == "user"), None)
        if question is None:
            return messages
        existing = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        context = self.context(question, base_system_prompt=existing)
        rest = messages[1:] if existing is not None else messages
        return [{"role": "system", "content": context.system_prompt}, *rest]


def augment_with_memory(conversations: list[list[dict[str, str]]], config: MemoryConfig) -> list[list[dict[str, str]]]:
    """Training with `memory.enabled`: every conversation's system prompt gets context and SOP."""
    assistant = MemoryAssistant(config)
    augmented = [assistant.augment(messages) for messages in conversations]
    with_context = sum("\nContext:\n" in m[0]["content"] for m in augmented if m and m[0]["role"] == "system")
    with_sop = sum("\nProcedure: " in m[0]["content"] for m in augmented if m and m[0]["role"] == "system")
    logger.info("memory: %d of %d prompts got retrieved context, %d got an SOP", with_context, len(augmented), with_sop)
    return augmented
