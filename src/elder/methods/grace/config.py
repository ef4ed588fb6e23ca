"""Settings of GRACE, with the defaults of the authors' code as EasyEdit runs it (hparams/GRACE: the FFN output
layer 27 of LLaMA-7B's 32, initial radius 1.0, Euclidean distance, cold values trained with lr 1.0 for 50 steps,
the last prompt token replaced, radii expanded to cover)."""

from __future__ import annotations

from dataclasses import dataclass, field

from elder.settings import ConfigError, MethodConfig

EXPANSIONS = ("coverage", "moving_average")
REPLACEMENTS = ("last", "all")


@dataclass
class GraceConfig(MethodConfig):
    """A codebook of (key, value, radius) at one layer (Hartvigsen et al., NeurIPS 2023)."""

    layer: int | None = field(default=None, metadata={
        "help": "decoder layer whose FFN output is replaced; None: 27/32 of the depth (EasyEdit's LLaMA-7B layer)"})
    module: str | None = field(default=None, metadata={
        "help": "path of the linear inside the block; None: mlp.down_proj, or mlp.c_proj in GPT-2 blocks"})
    radius: float = field(default=1.0, metadata={
        "help": "epsilon: the radius a new key starts with (Euclidean, in the layer's input space)"})
    radius_scale: float = field(default=1.0, metadata={
        "help": "an input uses the nearest key's value when its distance is within radius_scale times that key's "
                "radius; the knob --tune sets (1: the paper's rule)"})
    expansion: str = field(default="coverage", metadata={
        "help": "a new edit with the same target near a key: 'coverage' grows the radius to reach it, "
                "'moving_average' also moves the key halfway"})
    replacement: str = field(default="last", metadata={
        "help": "where a matched key's value replaces the layer's output: 'last' (the prompt's last token, the "
                "authors' default) or 'all' (every position of a matched input, generated tokens included)"})
    lr: float = field(default=1.0, metadata={"help": "Adam learning rate of the value"})
    steps: int = field(default=50, metadata={"help": "optimisation steps of each edit's value, at most"})
    stop_loss: float = field(default=1e-2, metadata={"help": "a value stops training once the target NLL is below"})
    max_target_tokens: int = field(default=32, metadata={"help": "longest target, in tokens"})
    seed: int = field(default=0, metadata={"help": "seed of the cold value initialisation"})

    def validate(self) -> None:
        """Ranges."""
        if self.radius <= 0 or self.radius_scale <= 0 or self.lr <= 0 or self.stop_loss < 0:
            raise ConfigError("radius, radius_scale and lr must be positive, stop_loss at least 0")
        for name in ("steps", "max_target_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.expansion not in EXPANSIONS:
            raise ConfigError(f"expansion must be one of {', '.join(EXPANSIONS)}, got {self.expansion!r}")
        if self.replacement not in REPLACEMENTS:
            raise ConfigError(f"replacement must be one of {', '.join(REPLACEMENTS)}, got {self.replacement!r}")
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"layer must be >= 0, got {self.layer}")
