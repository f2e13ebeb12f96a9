"""The query router: does this query need knowledge (retrieval), a procedure (an SOP), both,
or neither? The two decisions are independent, each with a score and the reasons for it.

Knowledge score = 0.5 x cue + 0.5 x evidence, where

- cue is 1 when the query points at the user's own material (an identifier such as
  `load_base_model` or `GRPOModule`, a file name, "the docs", "this repo", "our ..."), 0.5 for
  any other question, 0 for small talk;
- evidence is the cosine similarity of the best chunk in the store (0 for an empty store):
  a query nothing in memory resembles gains little from retrieval.

Procedure score = the best SOP's match score (see `sop.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from brainforge.config import RouterConfig
from brainforge.memory.sop import SOPManager, SOPMatch
from brainforge.memory.store import MemoryStore

_OWN_MATERIAL = re.compile(
    r"(?i)\b(the|our|my|this|these) (docs?|documentation|repo(sitory)?|code ?base|project|notes|files?|wiki|readme)\b"
    r"|\baccording to\b|\bin (the|our|my) \w+ (docs?|files?|code)\b")
_IDENTIFIER = re.compile(r"`[^`]+`|\b[a-z]+_[a-z0-9_]+\b|\b[A-Z][a-z0-9]+[A-Z]\w*\b|\b\w+\.(py|md|js|ts|go|rs|java|c|cpp|yaml|json)\b|\b\w+\(\)")
_QUESTION = re.compile(r"(?i)^\s*(what|how|why|where|when|which|who|whose|explain|describe|show|list|does|do|is|are|can|could|should|tell me)\b|\?\s*$")
_SMALL_TALK = re.compile(r"(?i)^\s*(hi|hello|hey|thanks|thank you|good (morning|evening|night)|bye|ok|okay)\b[\s!.]*$")


@dataclass
class RouteDecision:
    query: str
    needs_knowledge: bool
    knowledge_score: float
    needs_procedure: bool
    procedure_score: float
    sop: SOPMatch | None
    reasons: dict[str, list[str]] = field(default_factory=dict)

    def explain(self) -> str:
        knowledge = "yes" if self.needs_knowledge else "no"
        procedure = "yes" if self.needs_procedure else "no"
        lines = [f"needs knowledge: {knowledge} (score {self.knowledge_score:.2f}; {'; '.join(self.reasons.get('knowledge', []))})",
                 f"needs procedure: {procedure} (score {self.procedure_score:.2f}; {'; '.join(self.reasons.get('procedure', []))})"]
        return "\n".join(lines)


class QueryRouter:
    def __init__(self, config: RouterConfig, store: MemoryStore | None, sops: SOPManager | None) -> None:
        self.config = config
        self.store = store
        self.sops = sops

    def route(self, query: str) -> RouteDecision:
        cue, cue_reason = knowledge_cue(query)
        knowledge_reasons = [cue_reason]
        evidence = 0.0
        query_vector = None
        if self.store is not None:
            self.store.refresh()
            if len(self.store) > 0:
                query_vector = self.store.embedder.embed_query(query)
                best = self.store.vector_search(query_vector, 1)
                if best:
                    evidence = max(0.0, best[0][1])
                    knowledge_reasons.append(f"closest chunk similarity {evidence:.2f} ({self.store.chunk(best[0][0]).location})")
            else:
                knowledge_reasons.append("memory store is empty")
        knowledge_score = 0.5 * cue + 0.5 * evidence
        procedure_score, sop, procedure_reasons = 0.0, None, ["no SOPs loaded"]
        if self.sops is not None and self.sops.sops:
            matches = self.sops.match(query, query_vector)
            best_match = matches[0]
            procedure_score = best_match.score
            procedure_reasons = [best_match.explain()]
            sop = best_match if procedure_score >= self.config.procedure_threshold else None
        return RouteDecision(query, knowledge_score >= self.config.knowledge_threshold, knowledge_score,
                             sop is not None, procedure_score, sop,
                             {"knowledge": knowledge_reasons, "procedure": procedure_reasons})


def knowledge_cue(query: str) -> tuple[float, str]:
    if _SMALL_TALK.search(query):
        return 0.0, "small talk"
    if _OWN_MATERIAL.search(query):
        return 1.0, "refers to the user's own material"
    if match := _IDENTIFIER.search(query):
        return 1.0, f"names {match.group(0)!r}"
    if _QUESTION.search(query):
        return 0.5, "a question"
    return 0.0, "no question or reference"
