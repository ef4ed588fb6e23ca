"""Settings of MELO, with the authors' defaults as EasyEdit runs them (hparams/MELO/gpt2-xl.yaml: LoRA on the FFN
input linear of blocks 36 and 37 of 48, keys read at the input of block 35's, the last prompt token, Euclidean
distance, initial radius 0.5, 4 edits per block of rank 2, 50 steps), but lr 1e-2 (theirs, 1e-3, is too low for
a small model: see `lr`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from elder.settings import ConfigError, MethodConfig


@dataclass
class MeloConfig(MethodConfig):
    """Dynamic LoRA: each batch of edits trains a block of its own, found again through a database of keys."""

    first_layer: int | None = field(default=None, metadata={
        "help": "first decoder layer with LoRA (the key is read one layer below); None: 36/48 of the depth"})
    num_layers: int = field(default=2, metadata={"help": "consecutive decoder layers with LoRA"})
    module: str | None = field(default=None, metadata={
        "help": "path of the adapted linear inside a block; None: mlp.up_proj, or mlp.c_fc in GPT-2 blocks"})
    rank: int = field(default=2, metadata={"help": "rank of each block (num_rank_per_block)"})
    alpha: float = field(default=2.0, metadata={"help": "LoRA alpha; a block is scaled by alpha / rank"})
    batch_size: int = field(default=4, metadata={"help": "edits trained together into one block (num_edit_per_block)"})
    radius: float = field(default=0.5, metadata={
        "help": "initial radius of a key (Euclidean, in the key layer's input space; init_radius)"})
    radius_scale: float = field(default=1.0, metadata={
        "help": "a prompt uses the block of its nearest key when within radius_scale times that key's radius; the "
                "knob --tune sets"})
    lr: float = field(default=1e-2, metadata={
        "help": "Adam learning rate of a block (the authors' edit_lr 1e-3 learned none of 6 demo edits in 50 steps "
                "on SmolLM2-135M; 1e-2 learned all 6)"})
    steps: int = field(default=50, metadata={"help": "optimisation steps per batch, at most (num_iter)"})
    stop_loss: float = field(default=1e-2, metadata={"help": "a batch stops once its target NLL is below this"})
    max_target_tokens: int = field(default=32, metadata={"help": "longest target, in tokens"})
    seed: int = field(default=0, metadata={"help": "seed of each block's A initialisation"})

    def validate(self) -> None:
        """Ranges."""
        for name in ("num_layers", "rank", "batch_size", "steps", "max_target_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.radius <= 0 or self.radius_scale <= 0 or self.lr <= 0 or self.alpha <= 0 or self.stop_loss < 0:
            raise ConfigError("radius, radius_scale, lr and alpha must be positive, stop_loss at least 0")
        if self.first_layer is not None and self.first_layer < 1:
            raise ConfigError(f"first_layer must be >= 1 (the key is read one layer below), got {self.first_layer}")
