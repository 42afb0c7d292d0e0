"""Post-training data and online RL: preference pairs from sampled answers (`pairs`), the execution sandbox
(`sandbox`), and GRPO (`grpo` objective, `rollout` batched sampling, `rl_verify` rewards, `rl_loop`)."""
