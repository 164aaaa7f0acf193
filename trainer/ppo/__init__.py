"""PPO with the Combined Reward Signal: pure math (core), learner, rollout workers, Ray driver."""
