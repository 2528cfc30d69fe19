"""Flow-matching Euler sampling with Flux's resolution-dependent time shift.

Sigmas run linearly from 1 to 1/n; with ``use_dynamic_shifting`` they are bent towards 1 by
``mu``, a linear function of the packed image's token count between
(``base_image_seq_len``, ``base_shift``) and (``max_image_seq_len``, ``max_shift``), so larger
images spend more steps at high noise. A step moves the sample along the predicted velocity:
``x + (sigma_next - sigma) * v`` (in float32). Settings come from ``scheduler/scheduler_config.json``.
"""
from __future__ import annotations

import math

import attrs
import numpy as np
import torch


@attrs.frozen
class FlowMatchConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    @classmethod
    def from_hf(cls, hf: dict) -> "FlowMatchConfig":
        for unsupported in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                            "stochastic_sampling"):
            if hf.get(unsupported):
                raise ValueError(f"scheduler_config.json: {unsupported}=true is not supported")
        if hf.get("shift_terminal"):
            raise ValueError("scheduler_config.json: shift_terminal is not supported")
        d = cls()
        kw = {f.name: hf[f.name] if hf.get(f.name) is not None else getattr(d, f.name) for f in attrs.fields(cls)}
        if kw["time_shift_type"] not in ("exponential", "linear"):
            raise ValueError(f"scheduler_config.json: time_shift_type must be 'exponential' or 'linear', "
                             f"got {kw['time_shift_type']!r}")
        return cls(**kw)

    def mu(self, image_seq_len: int) -> float:
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * m + (self.base_shift - m * self.base_image_seq_len)


@attrs.frozen
class Schedule:
    sigmas: torch.Tensor      # [n + 1] float32, ending at 0
    timesteps: torch.Tensor   # [n] float32, sigma * num_train_timesteps


def flow_match_schedule(cfg: FlowMatchConfig, num_steps: int, image_seq_len: int) -> Schedule:
    if num_steps < 1:
        raise ValueError(f"num_inference_steps: must be at least 1, got {num_steps}")
    # float32 like the reference, which shifts a float32 array with Python scalars.
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if cfg.use_dynamic_shifting:
        mu = cfg.mu(image_seq_len)
        if cfg.time_shift_type == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        else:
            sigmas = mu / (mu + (1 / sigmas - 1))
    else:
        sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
    sig = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    timesteps = sig * cfg.num_train_timesteps
    return Schedule(torch.cat([sig, torch.zeros(1)]), timesteps)


def euler_step(sample: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    return (sample.float() + (sigma_next - sigma) * velocity).to(velocity.dtype)
