"""Small pieces of trainer state: the KL coefficient controllers, the running score moments and the score
scaling they drive."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .. import sharding


class AdaptiveKLController:
    """Proportional controller of the KL coefficient (Ziegler et al. 2019).

    kl_coef ← kl_coef · (1 + clip(kl / target − 1, −0.2, 0.2) · n_samples / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_samples: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_samples / self.horizon


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_samples: int) -> None:
        pass


@dataclass
class RunningMoments:
    """Running mean and standard deviation of all scores seen (Chan et al.'s parallel update).

    `count` starts at a tiny epsilon so the first update takes the batch's moments.
    """

    mean: float = 0.0
    std: float = 1.0
    var: float = 1.0
    count: float = 1e-24

    @torch.no_grad()
    def update(self, scores: torch.Tensor, accelerator=None) -> tuple[float, float]:
        """Fold a batch of scores `[B]` in (across processes when `accelerator` is distributed).

        Returns the batch's mean and (unbiased) standard deviation.
        """
        scores = scores.float()
        if accelerator is not None and sharding.world_size(accelerator) > 1:
            sums = accelerator.reduce(torch.stack([scores.sum(), torch.tensor(float(scores.numel()), device=scores.device)]), "sum")
            batch_count = sums[1].item()
            batch_mean = sums[0] / sums[1]
            batch_var = accelerator.reduce(((scores - batch_mean) ** 2).sum(), "sum") / sums[1]
        else:
            batch_count = scores.numel()
            batch_var, batch_mean = torch.var_mean(scores, unbiased=False)
        delta = batch_mean - self.mean
        total = self.count + batch_count
        old_sum = self.var * self.count + delta**2 * self.count * batch_count / total
        new_var = (old_sum + batch_var * batch_count) / total
        batch_std = (batch_var * batch_count / max(batch_count - 1, 1)).sqrt()
        # one host read for the five numbers (TRL reads each with .item(): the same float32 values)
        mean_step, std, var, batch_mean, batch_std = torch.stack([
            delta * batch_count / total, (new_var * total / (total - 1)).sqrt(), new_var, batch_mean, batch_std,
        ]).tolist()
        self.mean += mean_step
        self.std, self.var, self.count = std, var, total
        return batch_mean, batch_std

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, float(value))


def prepare_scores(scores: torch.Tensor, config, running: RunningMoments, accelerator) -> torch.Tensor:
    """The step's scores after the config's running-moment scaling/normalisation (updating `running`), then
    clipping."""
    if config.use_score_scaling:
        running.update(scores, accelerator)
        scale = running.std + torch.finfo(scores.dtype).eps
        scores = (scores - running.mean) / scale if config.use_score_norm else scores / scale
    if config.score_clip is not None:
        scores = torch.clamp(scores, -config.score_clip, config.score_clip)
    return scores
