"""Settings of FT-L, with EasyEdit's defaults (hparams/FT: one down_proj, Adam 5e-4, 25 steps)."""

from __future__ import annotations

from dataclasses import dataclass, field

from elder.settings import ConfigError, MethodConfig


@dataclass
class FTConfig(MethodConfig):
    """Fine-tune one FFN output layer on each edit (FT-L, as ROME and EasyEdit run it)."""

    layer: int | None = field(default=None, metadata={
        "help": "decoder layer whose FFN output is tuned; None: 21/32 of the depth (EasyEdit's layer 21 of LLaMA-7B)"})
    module: str | None = field(default=None, metadata={
        "help": "path of the tuned linear inside the block; None: mlp.down_proj, or mlp.c_proj in GPT-2 blocks"})
    lr: float = field(default=5e-4, metadata={"help": "Adam learning rate"})
    steps: int = field(default=25, metadata={"help": "optimisation steps per batch, at most"})
    stop_loss: float = field(default=1e-2, metadata={"help": "a batch stops once its target NLL is below this"})
    norm_constraint: float | None = field(default=None, metadata={
        "help": "keep every weight within this of its original value (ROME's constrained FT: 5e-5; None: free)"})
    batch_size: int = field(default=1, metadata={"help": "edits trained together"})
    max_target_tokens: int = field(default=32, metadata={"help": "longest target, in tokens"})

    def validate(self) -> None:
        """Ranges."""
        for name in ("steps", "batch_size", "max_target_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.stop_loss < 0:
            raise ConfigError("lr must be positive and stop_loss at least 0")
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"layer must be >= 0, got {self.layer}")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise ConfigError(f"norm_constraint must be positive or none, got {self.norm_constraint}")
