"""The one generation engine every RL algorithm samples from.

`generate(prompts, num_samples, params)` samples K completions for each of B prompts in one
batched decode loop:

* the B prompts are prefilled once, left-padded, and their KV cache is then repeated K
  times, so a prompt's keys and values are computed once, not K times;
* each step runs one forward over the still-running rows only: a row that emitted EOS or a
  stop string is dropped from the batch and from the cache (a step's cost falls as rows
  finish, instead of decoding padding until the longest row is done);
* the output head runs on the last position only, and sampling (temperature, top-p) is a
  few tensor ops, with no logits-processor machinery per step.

Prompts are token ids, not text, so a multi-turn caller (generate, run a tool or a search,
append the observation's tokens, continue) keeps exact token boundaries between turns.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from brainforge.models.modes import eval_mode



@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    """Hard cap on generated tokens per completion; reaching it marks the row truncated."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    stop_strings: tuple[str, ...] = ()
    """Stop a row once its text ends with one of these (the string is kept)."""
    return_logprobs: bool = False
    """Also return log-probs of the sampled tokens under the sampling distribution
    (logits / temperature)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass
class Rollout:
    """N = B*K completions; row i belongs to prompt i // K."""

    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor          # [N, T] right-padded with pad_id
    completion_mask: torch.Tensor         # [N, T] 1 on generated tokens (EOS/stop included)
    truncated: torch.Tensor               # [N] bool: hit max_new_tokens without EOS/stop
    texts: list[str]
    logprobs: torch.Tensor | None = None  # [N, T] sampling log-probs, 0 on padding
    stats: dict[str, float] = field(default_factory=dict)
    prefix_mask: torch.Tensor | None = None      # [N, T] bool: tokens the policy did not sample (trace, replay)
    behaviour_logps: torch.Tensor | None = None  # [N, T] their behaviour log-probs; NaN = unknown (prob 1)
    sources: list[str] | None = None             # per row: "policy", "trace" or "replay"
    observation_mask: torch.Tensor | None = None  # [N, T] bool: tokens the environment inserted (search results)
    search_logs: list[Any] | None = None         # per row: reasoning.rollout.SearchLog of a multi-turn rollout

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)


def chat_stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: EOS, and ChatML's <|im_end|> when the
    vocabulary has it (for SmolLM2 they are the same token; for other models not)."""
    ids = {tokenizer.eos_token_id, tokenizer.get_vocab().get("<|im_end|>")}
    return sorted(i for i in ids if i is not None)


class GenerationEngine:
    @classmethod
    def for_chat(cls, model: Any, tokenizer: Any) -> "GenerationEngine":
        """An engine that stops completions at the end of the assistant turn."""
        return cls(model, tokenizer, stop_token_ids=chat_stop_ids(tokenizer))

    def __init__(self, model: Any, tokenizer: Any, stop_token_ids: list[int] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        ids = set(stop_token_ids or [])
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        self.stop_token_ids = torch.tensor(sorted(ids), dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], num_samples: int | list[int], params: SamplingParams,
                 generator: torch.Generator | None = None) -> Rollout:
        """`num_samples` completions of each prompt, or `num_samples[i]` of prompt i (0 is
        allowed: LUFFY fills some groups entirely with traces). Rows are grouped by prompt."""
        from transformers import DynamicCache

        counts = [num_samples] * len(prompts) if isinstance(num_samples, int) else list(num_samples)
        if len(counts) != len(prompts) or min(counts, default=0) < 0:
            raise ValueError(f"num_samples: need one count >= 0 per prompt, got {counts} for {len(prompts)} prompts")
        if sum(counts) == 0:
            return self._empty_rollout()
        most = max(counts)
        # Row r of the repeated batch is sample j of prompt i at r = i * most + j; keep the asked-for ones.
        keep_rows = torch.tensor([i * most + j for i, count in enumerate(counts) for j in range(count)])
        device = _device(self.model)
        with eval_mode(self.model), lora_merged_for_decoding(self.model):
            batch = len(prompts)
            rows = int(keep_rows.numel())
            width = max(len(p) for p in prompts)
            input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((batch, width), dtype=torch.long)
            for i, prompt in enumerate(prompts):  # left padding: every prompt ends at the same column
                input_ids[i, width - len(prompt):] = torch.tensor(prompt)
                attention[i, width - len(prompt):] = 1
            input_ids, attention = input_ids.to(device), attention.to(device)
            positions = (attention.cumsum(-1) - 1).clamp(min=0)                       # [B, L]

            cache = DynamicCache(config=self.model.config)
            out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                             cache=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(most)                                       # [B*most, ...]
            if rows < batch * most:
                cache.batch_select_indices(keep_rows.to(device))                      # [N, ...]
            logits = out.logits[:, -1].float().repeat_interleave(most, dim=0)[keep_rows.to(device)]  # [N, V]
            attention = attention.repeat_interleave(most, dim=0)[keep_rows.to(device)]               # [N, L]
            next_position = positions[:, -1:].repeat_interleave(most, dim=0)[keep_rows.to(device)] + 1  # [N, 1]

            tokens = torch.full((rows, params.max_new_tokens), self.pad_id, dtype=torch.long)
            logps = torch.zeros((rows, params.max_new_tokens)) if params.return_logprobs else None
            lengths = torch.zeros(rows, dtype=torch.long)
            finished = torch.zeros(rows, dtype=torch.bool)
            active = torch.arange(rows)                                              # original row of each batch row
            stop_ids = self.stop_token_ids.to(device)
            forward_rows = 0
            for step in range(params.max_new_tokens):
                sampled, sampled_logp = sample(logits, params.temperature, params.top_p, generator)  # [n], [n]
                tokens[active, step] = sampled.cpu()
                if logps is not None:
                    logps[active, step] = sampled_logp.cpu()
                lengths[active] += 1
                done = torch.isin(sampled, stop_ids).cpu()
                if params.stop_strings:
                    done |= self._ends_with_stop_string(tokens, active, step, params.stop_strings)
                finished[active[done]] = True
                if step == params.max_new_tokens - 1 or bool(done.all()):
                    break
                keep = (~done).nonzero().squeeze(1)
                if len(keep) < len(active):  # drop finished rows from the batch and the cache
                    cache.batch_select_indices(keep.to(device))
                    active, sampled = active[keep], sampled[keep.to(device)]
                    attention, next_position = attention[keep.to(device)], next_position[keep.to(device)]
                attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=1)
                out = self.model(input_ids=sampled[:, None], attention_mask=attention, position_ids=next_position,
                                 cache=cache, use_cache=True)
                forward_rows += len(active)
                next_position = next_position + 1
                logits = out.logits[:, -1].float()

        width_out = int(lengths.max())
        completion_ids = tokens[:, :width_out]
        mask = (torch.arange(width_out)[None, :] < lengths[:, None]).long()
        completion_ids = completion_ids.masked_fill(mask == 0, self.pad_id)
        texts = self.tokenizer.batch_decode(completion_ids.masked_fill(mask == 0, self.pad_id), skip_special_tokens=True)
        return Rollout(
            prompt_ids=[list(p) for p, count in zip(prompts, counts) for _ in range(count)],
            completion_ids=completion_ids,
            completion_mask=mask,
            truncated=~finished,
            texts=texts,
            logprobs=logps[:, :width_out] * mask if logps is not None else None,
            stats={"decode_row_steps": float(forward_rows), "completion_tokens": float(lengths.sum())},
        )

    def _empty_rollout(self) -> Rollout:
        return Rollout(prompt_ids=[], completion_ids=torch.zeros((0, 0), dtype=torch.long), completion_mask=torch.zeros((0, 0), dtype=torch.long),
                       truncated=torch.zeros(0, dtype=torch.bool), texts=[], logprobs=None,
                       stats={"decode_row_steps": 0.0, "completion_tokens": 0.0})

    def _ends_with_stop_string(self, tokens: torch.Tensor, active: torch.Tensor, step: int, stops: tuple[str, ...]) -> torch.Tensor:
        window = max(len(s) for s in stops) + 8  # tokens are at least a byte: enough context
        start = max(0, step + 1 - window)
        tails = self.tokenizer.batch_decode(tokens[active, start : step + 1])
        return torch.tensor([any(stop in tail for stop in stops) for tail in tails], dtype=torch.bool)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-prob under the sampling distribution."""
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)                                     # [n, V]
        token = logits.argmax(dim=-1)
        return token, logp.gather(1, token[:, None]).squeeze(1)
    logp = torch.log_softmax(logits / temperature, dim=-1)                           # [n, V]
    probs = logp.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p                 # mass before this token already >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        token = order.gather(1, _inverse_cdf(sorted_probs, generator)[:, None]).squeeze(1)
    else:
        token = _inverse_cdf(probs, generator)
    return token, logp.gather(1, token[:, None]).squeeze(1)


def _inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from unnormalised probabilities. (torch.multinomial draws an
    exponential per vocabulary entry; a cumulative sum and a binary search are ~20x
    cheaper over a 49k vocabulary.)"""
    cdf = probs.cumsum(dim=-1)                                                        # [n, V]
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp(max=probs.shape[1] - 1)


@contextmanager
def lora_merged_for_decoding(model: Any) -> Iterator[int]:
    """Decode with the LoRA update folded into *copies* of the targeted weights: one matmul
    per layer instead of three (the two adapter matmuls are tiny but each costs a kernel
    launch, and a decode step is all launches).

    Why copies: merging in place and unmerging afterwards is not an exact round trip in
    floating point (W + dW - dW != W). In bf16 it changed ~22% of the frozen base weights
    after 200 GRPO steps and moved reference log-probs by up to 0.2 nats; even fp32 drifts
    by ~1e-7 per cycle. Here each targeted layer's `weight` Parameter is swapped for a merged
    copy and the original Parameter object is put back afterwards, so the base stays
    bit-identical in every dtype. Cost: the targeted weights are held twice while decoding
    (the merge itself costs what PEFT's in-place merge costs; the restore is free).

    Only plain LoRA on `nn.Linear` is merged (not DoRA or other variants, LoRA bias, 4-bit
    or 8-bit bases); other layers keep running the adapter unmerged, which is exact.
    Yields the number of layers merged."""
    swapped: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []
    try:
        with torch.no_grad():
            for layer, adapters in _mergeable_lora_layers(model):
                base = layer.get_base_layer()
                original = base.weight
                merged = original.detach().float() if original.dtype != torch.float32 else original.detach().clone()
                for name in adapters:
                    merged += layer.get_delta_weight(name).float()
                base.weight = torch.nn.Parameter(merged.to(original.dtype), requires_grad=False)
                swapped.append((layer, original))
                layer.merged_adapters.extend(adapters)  # PEFT's forward then skips the adapter matmuls
        yield len(swapped)
    finally:
        for layer, original in swapped:
            layer.get_base_layer().weight = original
            layer.merged_adapters.clear()


def _mergeable_lora_layers(model: Any) -> Iterator[tuple[Any, list[str]]]:
    """(layer, active adapter names) for every LoRA layer that can be merged by copy."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    for module in model.modules():
        if type(module) is not LoraLinear or module.disable_adapters or module.merged:
            continue
        if type(module.get_base_layer()) is not torch.nn.Linear:  # quantized bases are subclasses
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if not adapters or any(a in module.lora_variant or module.lora_bias.get(a, False) for a in adapters):
            continue
        yield module, adapters


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device
