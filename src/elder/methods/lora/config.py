"""Settings of the plain LoRA baseline, with EasyEdit's defaults (hparams/LoRA: q_proj and v_proj of every layer,
rank 8, alpha 32, Adam 5e-3, 70 steps)."""

from __future__ import annotations

from dataclasses import dataclass, field

from elder.settings import ConfigError, MethodConfig


@dataclass
class LoRAConfig(MethodConfig):
    """One LoRA adapter trained on the whole stream of edits, batch after batch."""

    modules: tuple[str, ...] | None = field(default=None, metadata={
        "help": "paths inside each decoder block to adapt; None: self_attn.q_proj and self_attn.v_proj, or "
                "attn.c_attn in GPT-2 blocks"})
    rank: int = field(default=8, metadata={"help": "r: rank of the adapter"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank"})
    lr: float = field(default=5e-3, metadata={"help": "Adam learning rate"})
    steps: int = field(default=70, metadata={"help": "optimisation steps per batch, at most"})
    stop_loss: float = field(default=1e-2, metadata={"help": "a batch stops once its target NLL is below this"})
    batch_size: int = field(default=1, metadata={"help": "edits trained together"})
    max_target_tokens: int = field(default=32, metadata={"help": "longest target, in tokens"})
    seed: int = field(default=0, metadata={"help": "seed of the adapter's initialisation"})

    def validate(self) -> None:
        """Ranges."""
        for name in ("rank", "steps", "batch_size", "max_target_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.alpha <= 0 or self.stop_loss < 0:
            raise ConfigError("lr and alpha must be positive and stop_loss at least 0")
        if self.modules is not None and not self.modules:
            raise ConfigError("modules is empty")
