"""Agent training, the Agent Lightning idea carried locally (ALGORITHMS.md section 8).

An agent written against any OpenAI client makes its LLM calls through brainforge's policy
server (`server.py`); every call is recorded with its prompt and completion token ids and
sampling log-probs under a rollout id in a SQLite trace store (`store.py`); the runner
(`runner.py`) runs K rollouts per task concurrently; `agent_grpo.py` trains the adapter on
the recorded calls with the GRPO core, `apo.py` optimises the agent's prompt instead, and
`sft.py` turns successful trajectories into SFT data.
"""
