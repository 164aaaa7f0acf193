"""policy_gen: the OpenAI-compatible rollout service (vLLM or transformers behind one front door)."""
