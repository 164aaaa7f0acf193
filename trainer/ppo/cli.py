"""`crs-rlhf train --config run.yaml [--set key=value ...] [--output-dir DIR] [--resume] [--debug]`

The services should run (see configs/tiny/ppo.yaml for the fields that point at them); the
trainer waits up to `run.step_timeout_s` for their `/ready`. policy_gen needs
`--adapter-root` at (or above) RUN/adapters so it may load each step's adapter.

Exit codes: 0 finished; 2 bad config (e.g. generation.max_prompt_tokens + max_new_tokens over
policy_gen's max_model_len) or a request a service refused (e.g. an adapter outside
policy_gen's --adapter-root, or a full adapter table after run.adapter_slot_wait_s); 3 a service unreachable, not ready in time, or failing after
retries; 4 the learner failed (a learner worker died, a collective timed out, or the update
raised: the message names the worker's rank and node; `--resume` continues from the last
checkpoint); 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint; 1 anything else.
Expected failures print one line; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from trainer.config_io import ConfigError, add_config_args, load_config

EXIT_CONFIG, EXIT_SERVICE, EXIT_LEARNER = 2, 3, 4


def classify_failure(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for a failure of a training run."""
    import httpx
    import openai

    from trainer.clients.policy import AdapterTableFull
    from trainer.clients.wait import ServicesNotReady
    from trainer.ppo.driver import StepFailed
    from trainer.ppo.learner_group import LearnerFailed

    if isinstance(exc, ConfigError):  # found once the services answered, e.g. a context too short
        return EXIT_CONFIG, str(exc)
    if isinstance(exc, ServicesNotReady):
        return EXIT_SERVICE, str(exc)
    if isinstance(exc, LearnerFailed):
        return EXIT_LEARNER, f"the learner failed: {exc}"
    if isinstance(exc, AdapterTableFull):  # waited run.adapter_slot_wait_s; the message names --max-loras
        return EXIT_CONFIG, f"policy_gen refused the adapter: {exc}"
    if isinstance(exc, openai.APIStatusError) and 400 <= exc.status_code < 500:
        detail = exc.message
        hint = " (policy_gen's --adapter-root must contain run.output_dir)" if "adapter" in detail.lower() else ""
        return EXIT_CONFIG, f"policy_gen refused a request ({exc.status_code}): {detail}{hint}"
    if isinstance(exc, (openai.APIConnectionError, openai.APIStatusError, httpx.HTTPError, StepFailed)):
        return EXIT_SERVICE, f"a service failed: {exc}"
    return 1, f"unexpected error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crs-rlhf train", description="PPO with the Combined Reward Signal (Ray).")
    add_config_args(parser)
    parser.add_argument("--resume", nargs="?", const="auto", choices=["auto", "never"], default=None,
                        help="auto (the default when the flag is given): continue from RUN/checkpoints/latest if there "
                             "is one, else start fresh; never: start fresh. Same as run.resume in the config.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from trainer.ppo.config import PPOConfig

    overrides = list(args.overrides) + ([f"run.output_dir={args.output_dir}"] if args.output_dir else [])
    overrides += [f"run.resume={args.resume}"] if args.resume else []
    try:
        cfg = load_config(PPOConfig, args.config, overrides)
    except ConfigError as e:
        print(f"crs-rlhf train: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if not cfg.services.policy_urls:
        print("crs-rlhf train: services.policy_urls is not set (start policy_gen and pass "
              "--set services.policy_url=URL, or services.policy_urls='[URL1, URL2]' for several replicas)", file=sys.stderr)
        return EXIT_CONFIG
    from trainer.ppo.driver import train
    from trainer.ppo.signals import Interrupted

    try:
        summary = train(cfg)
    except Interrupted as e:  # before the first step began: nothing to save
        print(f"crs-rlhf train: stopped by {e} before training started", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        if args.debug:
            raise
        code, message = classify_failure(e)
        print(f"crs-rlhf train: {message}", file=sys.stderr)
        return code
    last = summary.metrics[-1] if summary.metrics else {}
    print(f"steps {summary.first_step}..{summary.last_step}{' (interrupted, checkpoint saved)' if summary.interrupted else ''}"
          f"  reward/crs {last.get('reward/crs')}  kl/objective {last.get('kl/objective')}  run {summary.run_dir}")
    return summary.exit_code if summary.interrupted else 0
