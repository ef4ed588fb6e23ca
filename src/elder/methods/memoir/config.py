"""Settings of MEMOIR, with the paper's choices scaled to the model: the residual memory sits at the FFN output
layer of block 27 of 32 (the authors' LLaMA-3-8B hparams), a mask keeps 4096 of LLaMA-3-8B's 14336 FFN features
(the same fraction of a smaller model's), chosen from the prompt's mean activation less a background mean (their
`mean_decentered`), threshold 0.4, 30 steps per edit, edits written one at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

from elder.settings import ConfigError, MethodConfig

ACTIVE_FRACTION = 4096 / 14336  # features a mask keeps, as a fraction of the FFN width (the paper's LLaMA-3-8B k)


@dataclass
class MemoirConfig(MethodConfig):
    """A residual memory at one layer, written and read through TopHash masks (Wang et al., NeurIPS 2025)."""

    layer: int | None = field(default=None, metadata={
        "help": "decoder layer whose FFN output gets the residual memory; None: 27/32 of the depth"})
    module: str | None = field(default=None, metadata={
        "help": "path of the FFN output linear inside the block; None: mlp.down_proj, or mlp.c_proj in GPT-2 blocks"})
    active: int | None = field(default=None, metadata={
        "help": "k: input features each mask keeps; None: 4096/14336 of the layer's input width (the paper's k)"})
    threshold: float = field(default=0.4, metadata={
        "help": "a prompt reads the memory when its mask shares at least this fraction of its k features with a "
                "stored edit's mask; the knob --tune sets (0.4: the authors' irr_threshold for ZsRE)"})
    lr: float = field(default=1e-2, metadata={
        "help": "Adam learning rate of the residual memory (the authors run SGD at 1.0; elder's methods share one "
                "Adam trainer)"})
    steps: int = field(default=30, metadata={"help": "optimisation steps per edit, at most (the authors' n_iter)"})
    stop_loss: float = field(default=1e-2, metadata={"help": "an edit stops training once its target NLL is below"})
    max_target_tokens: int = field(default=32, metadata={"help": "longest target, in tokens"})
    seed: int = field(default=0, metadata={"help": "seed of the fixed permutation that hashes the top-k features"})

    def validate(self) -> None:
        """Ranges."""
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be a fraction in [0, 1], got {self.threshold}")
        if self.lr <= 0 or self.stop_loss < 0:
            raise ConfigError("lr must be positive and stop_loss at least 0")
        for name in ("steps", "max_target_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.active is not None and self.active < 1:
            raise ConfigError(f"active must be at least 1, got {self.active}")
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"layer must be >= 0, got {self.layer}")
