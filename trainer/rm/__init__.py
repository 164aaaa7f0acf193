"""Reward-model training (docs/method.md, docs/training.md).

- ``train_preference_rm(PreferenceRMConfig) -> Path`` — ranked sets, all C(K,2) pairs,
  optional L2, per-prompt or per-pair averaging; metrics eval_pairwise_accuracy / eval_loss /
  eval_mean_margin (and the same on the training sets).
- ``train_absolute_rm(AbsoluteRMConfig) -> Path`` — losses logistic / sigmoid_mse / mse_penalty,
  remedies augment / over_s / under_s_N / wgt_s_X; per-range MSE/MAE, metrics.md, predictions.png.

Both write ``output_dir`` as a model folder the reward services load unchanged (merged
weights, or a peft adapter folder with ``model.merge: false``), plus metrics.json, config.yaml
and README.md. CLI: ``crs-rlhf train-rm preference|absolute --config FILE``.
"""

from trainer.rm.absolute import train_absolute_rm
from trainer.rm.config import AbsoluteRMConfig, PreferenceRMConfig
from trainer.rm.preference import train_preference_rm

__all__ = ["AbsoluteRMConfig", "PreferenceRMConfig", "train_absolute_rm", "train_preference_rm"]
