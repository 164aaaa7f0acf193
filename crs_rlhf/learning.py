"""Did PPO learn? The CRS reward of the policy after PPO minus before, on held-out prompts.

The measure the demo prints ("learning: ...") and writes to `stages.json`:

    prompts   the PPO prompt split's held-out conversations (trees no stage trained on)
    policies  before = the SFT model PPO started from, after = PPO's last adapter
    samples   k completions per prompt and policy, at PPO's own sampling (temperature,
              top-p, max new tokens), through the running policy_gen
    reward    both reward services, mixed exactly as PPO mixes them (trainer.crs)
    gain      mean over prompts of (mean after − mean before), with its standard error

Sample j of a prompt is drawn with the same seed under both policies (policy_gen derives each
sequence's generator from the request seed, the prompt and the sample index), so the two
samples are a pair: where the policies agree they draw the same tokens and the pair's
difference cancels (common random numbers). The standard error is therefore taken from the
pairs' differences d_pj = after_pj − before_pj, treating the prompts as fixed and the seeds as
the noise: SE² = Σ_p s²(d_p·) / k / P². It is valid whatever the pairs' correlation (it is
estimated, not assumed), and it says whether PPO moved the reward on *these* prompts beyond
sampling noise, not how far the gain generalises to other prompts. The unpaired SE (each
policy's variance, added) is reported beside it as `se_unpaired`. A gain is called "beyond
noise" when it is at least 2 paired SE from zero (|z| ≥ 2).

This is the reward PPO optimised, judged by the reward models PPO optimised: it shows that
the optimisation works at this size, not that the answers got better; the held-out judge
(crs_rlhf/demo_eval.py) is the independent check.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

Z_BEYOND_NOISE = 2.0


def sample_stats(xs: Sequence[float]) -> tuple[float, float]:
    """(mean, unbiased variance) of at least two values."""
    n = len(xs)
    if n < 2:
        raise ValueError(f"need at least two samples per prompt, got {n}")
    m = sum(xs) / n
    return m, sum((x - m) ** 2 for x in xs) / (n - 1)


def reward_gain(after: Mapping[str, Sequence[float]], before: Mapping[str, Sequence[float]]) -> dict:
    """Mean over prompts of (mean after − mean before), its paired SE, z = gain / SE and the verdict.

    `after` and `before` map each prompt id to its samples' rewards in sample order, so that
    after[p][j] and before[p][j] were drawn with the same seed (the same prompts and the same
    number of samples in both). Hand example: prompt a after [1, 3], before [0, 3] (differences
    [1, 0]: mean 0.5, var 0.5); prompt b after [2, 2], before [1, 2] (differences [1, 0]): gain
    (0.5 + 0.5) / 2 = 0.5, SE² = (0.5/2 + 0.5/2) / 2² = 0.125, SE 0.3536, z 1.414: within noise.
    Unpaired, the same numbers give SE² = (2/2 + 4.5/2 + 0/2 + 0.5/2) / 2² = 0.875.
    """
    if set(after) != set(before) or not after:
        raise ValueError("after and before need the same, non-empty set of prompts")
    diffs, var, var_unpaired = [], 0.0, 0.0
    for pid in sorted(after):
        a, b = after[pid], before[pid]
        if len(a) != len(b):
            raise ValueError(f"prompt {pid}: {len(a)} samples after, {len(b)} before; the pairs need the same number")
        md, vd = sample_stats([x - y for x, y in zip(a, b)])
        (_, va), (_, vb) = sample_stats(a), sample_stats(b)
        diffs.append(md)
        var += vd / len(a)
        var_unpaired += va / len(a) + vb / len(b)
    n = len(diffs)
    gain, se = sum(diffs) / n, math.sqrt(var) / n
    z = gain / se if se > 0 else (math.inf if gain > 0 else -math.inf if gain < 0 else 0.0)
    mean_after = sum(sum(v) / len(v) for v in after.values()) / n
    mean_before = sum(sum(v) / len(v) for v in before.values()) / n
    return {"crs_before": mean_before, "crs_after": mean_after, "crs_gain": gain, "se": se, "z": z,
            "se_unpaired": math.sqrt(var_unpaired) / n, "prompts": n, "prompts_improved": sum(d > 0 for d in diffs),
            "samples_per_prompt": min(len(v) for v in after.values()), "beyond_noise": abs(z) >= Z_BEYOND_NOISE}


def describe(m: Mapping) -> str:
    """The one line the demo prints."""
    head = (f"learning (held-out CRS reward, after PPO − before, {m['prompts']} prompts × "
            f"{m['samples_per_prompt']} samples): {m['crs_before']:+.3f} -> {m['crs_after']:+.3f}, "
            f"gain {m['crs_gain']:+.3f} ± {m['se']:.3f} paired SE (z = {m['z']:+.1f}; {m['prompts_improved']} of "
            f"{m['prompts']} prompts up)")
    if not m["beyond_noise"]:
        return head + f": within noise (|z| < {Z_BEYOND_NOISE:g}), no learning shown"
    return head + (": beyond noise, PPO raised the reward" if m["crs_gain"] > 0
                   else ": beyond noise, PPO LOWERED the reward")


def held_out_prompts(cfg) -> dict[str, list[dict]]:
    """{prompt id: conversation} of the PPO config's held-out split (the trees PPO never sees)."""
    from transformers import AutoTokenizer

    from trainer.data import build_rl_prompt_split, fixture_path, load_oasst

    source = fixture_path() if cfg.run.data_source == "fixture" else cfg.run.data_source
    tok = AutoTokenizer.from_pretrained(cfg.model.policy_path)
    split = build_rl_prompt_split(load_oasst(source), cfg.run.prompts, tok, cfg.generation.max_prompt_tokens,
                                  data=str(source))
    return {f"held-out-{i}": list(conv) for i, conv in enumerate(split.held_out)}


async def _crs_samples(cfg, prompts: Mapping[str, list[dict]], model: str, k: int) -> dict[str, list[dict]]:
    """k samples per prompt from `model` at PPO's sampling, scored and mixed as PPO does:
    {prompt id: [{"text", "pref", "abs", "crs"}, ...]}."""
    import torch

    from trainer.clients.policy import PolicyClient, SamplingParams
    from trainer.clients.reward import RewardClient, messages_item
    from trainer.crs import CombinedReward

    g, s, c = cfg.generation, cfg.services, cfg.crs
    sampling = SamplingParams(max_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                              top_k=g.top_k if g.top_k > 0 else -1, seed=(cfg.run.seed * 7_919 + 104_729) % (2**31))  # not PPO's prompt seeds
    ids = sorted(prompts)
    async with PolicyClient(s.policy_urls[0], model=model) as policy:
        rollouts = await policy.generate([prompts[i] for i in ids], n=k, sampling=sampling)
    rollouts = sorted(rollouts, key=lambda r: (r.prompt_index, r.sample_index))  # sample order: the pairs line up
    items = [messages_item(prompts[ids[r.prompt_index]], r.text) for r in rollouts]
    scores = {}
    for name, urls in (("pref", s.reward_pref_urls), ("abs", s.reward_abs_urls)):
        if urls:
            async with RewardClient(urls, name=f"reward_{name}") as client:
                scores[name] = torch.tensor((await client.score(items)).scores)
    # normalise "none" is stateless; a running normaliser's state lives in the learner, so mix raw here
    mix = CombinedReward(weight=c.weight, abs_output=c.abs_output, normalise="none", clip=c.score_clip)
    reward = mix(scores.get("pref"), scores.get("abs")).reward.tolist()
    out: dict[str, list[dict]] = {i: [] for i in ids}
    for j, (r, x) in enumerate(zip(rollouts, reward)):
        out[ids[r.prompt_index]].append({"sample": r.sample_index, "text": r.text, "crs": float(x),
                                         **{name: float(v[j]) for name, v in scores.items()}})
    return out


async def _measure(cfg, adapter: Path, base_model: str, k: int, prompts: Mapping[str, list[dict]]) -> dict:
    from trainer.clients.policy import PolicyClient

    name = "learning-after"
    async with PolicyClient(cfg.services.policy_urls[0], model=base_model) as client:
        await client.load_adapter(str(Path(adapter).resolve()), name)  # policy_gen resolves paths itself
        try:
            after = await _crs_samples(cfg, prompts, name, k)
        finally:
            await client.unload_adapter(name)
    before = await _crs_samples(cfg, prompts, base_model, k)
    crs = lambda samples: {pid: [x["crs"] for x in xs] for pid, xs in samples.items()}
    return {**reward_gain(crs(after), crs(before)), "after": after, "before": before}


def measure_learning(cfg, adapter: Path, base_model: str, k: int = 8) -> dict:
    """The held-out gain of PPO's `adapter` over the served base (the SFT model), on the running services.

    Raises ValueError when the config holds out no prompts (run.prompts.held_out_fraction 0)."""
    if cfg.crs.normalise != "none":
        raise ValueError("the learning measure mixes raw scores: it needs crs.normalise none")
    prompts = held_out_prompts(cfg)
    if not prompts:
        raise ValueError("no held-out prompts (run.prompts.held_out_fraction is 0)")
    return asyncio.run(_measure(cfg, adapter, base_model, k, prompts))
