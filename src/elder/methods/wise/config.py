"""Settings of WISE, with the authors' defaults as EasyEdit runs them (hparams/WISE/llama-7b.yaml: a side copy of
the FFN output linear of block 27 of 32, gradient masks of density 0.2, SGD at lr 1.0 for at most 70 steps, each
side weight kept within 1.0 of the main weight, activation margins 5 / 20 / 10, act_ratio 0.88, a new shard every
500 edits and a TIES merge of the shards every 1000, WISE-Retrieve). The margins are the authors' as they are:
SmolLM2-135M's activation scores come out on their scale (the README's ZsRE T = 200 run: the lowest score of
its 200 edit prompts, the shard's floor, is 27.5)."""

from __future__ import annotations

from dataclasses import dataclass, field

from elder.settings import ConfigError, MethodConfig


@dataclass
class WiseConfig(MethodConfig):
    """A side memory beside one FFN output layer, routed by activation score (Wang et al., NeurIPS 2024)."""

    layer: int | None = field(default=None, metadata={
        "help": "decoder layer whose FFN output linear gets the side memory; None: 27/32 of the depth"})
    module: str | None = field(default=None, metadata={
        "help": "path of the FFN output linear inside the block; None: mlp.down_proj, or mlp.c_proj in GPT-2 blocks"})
    act_ratio: float = field(default=0.88, metadata={
        "help": "a prompt reads a side memory when its activation score reaches act_ratio times the lowest score "
                "an edit of that memory had when written; the knob --tune sets (0.88: the authors')"})
    alpha: float = field(default=5.0, metadata={
        "help": "margin loss: the activation score of irrelevant text is pushed below alpha (the authors' 5)"})
    beta: float = field(default=20.0, metadata={
        "help": "margin loss: the activation score of an edit's rows is pushed above beta (the authors' 20)"})
    gamma: float = field(default=10.0, metadata={
        "help": "margin loss: an edit's score exceeds irrelevant text's by at least gamma (the authors' 10)"})
    mask_ratio: float = field(default=0.2, metadata={
        "help": "density of each shard's random gradient mask: the share of the side weight a shard may change"})
    shard_edits: int = field(default=500, metadata={
        "help": "edits per knowledge shard (the authors' save_freq); a full shard is kept and a new one opened"})
    merge_edits: int = field(default=1000, metadata={
        "help": "every merge_edits edits the shards written since the last merge are TIES-merged into one side "
                "memory (the authors' merge_freq; a multiple of shard_edits)"})
    density: float = field(default=0.53, metadata={
        "help": "TIES merge: the share of each shard's largest changes kept before the sign election"})
    lr: float = field(default=1.0, metadata={"help": "SGD learning rate of the side weight (the authors' edit_lr)"})
    weight_decay: float = field(default=1e-5, metadata={
        "help": "SGD weight decay, applied to the side weight's change from the main weight"})
    norm_constraint: float = field(default=1.0, metadata={
        "help": "each side weight stays within this of the main weight's value (elementwise)"})
    steps: int = field(default=70, metadata={"help": "optimisation steps per edit, at most (the authors' n_iter)"})
    context_templates: int = field(default=10, metadata={
        "help": "prefixes the base model writes (5 of 5 tokens and 5 of 10, greedy, from the authors' starters) "
                "before which each edit is also trained, beside the bare prompt (0: the prompt alone)"})
    max_target_tokens: int = field(default=32, metadata={"help": "longest target, in tokens"})
    seed: int = field(default=0, metadata={"help": "seed of the shards' gradient masks"})

    def validate(self) -> None:
        """Ranges and the shard/merge cadence."""
        for name in ("act_ratio", "lr", "norm_constraint"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("alpha", "beta", "gamma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be at least 0, got {getattr(self, name)}")
        for name in ("mask_ratio", "density"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be a fraction in (0, 1], got {getattr(self, name)}")
        for name in ("shard_edits", "merge_edits", "steps", "max_target_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.merge_edits % self.shard_edits:
            raise ConfigError(f"merge_edits ({self.merge_edits}) must be a multiple of shard_edits "
                              f"({self.shard_edits})")
        if not 0 <= self.context_templates <= 10:
            raise ConfigError(f"context_templates must lie in 0..10, got {self.context_templates}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be at least 0, got {self.weight_decay}")
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"layer must be >= 0, got {self.layer}")
