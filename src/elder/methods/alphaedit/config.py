"""Settings of AlphaEdit, with the authors' LLaMA3-8B defaults as EasyEdit runs them (hparams/AlphaEdit: the FFN
output linears of layers 4-8 of 32, the subject's last token, the target vector optimised at the last of them for
at most 25 steps (lr 0.1, here 1.0: see v_lr) with weight decay 0.5, a norm clamp of 0.75 and a KL weight of
0.0625, L2 10, null space below eigenvalue 2e-2), scaled to the model's depth; the preserved-knowledge statistics
come from text the base model writes itself (the authors use 100,000 Wikipedia samples)."""

from __future__ import annotations

from dataclasses import dataclass, field

from elder.settings import ConfigError, MethodConfig


FACT_TOKENS = ("subject_last", "last")


@dataclass
class AlphaEditConfig(MethodConfig):
    """Null-space-constrained locate-then-edit over a band of FFN output layers (Fang et al., ICLR 2025)."""

    first_layer: int | None = field(default=None, metadata={
        "help": "first edited decoder layer; None: 4/32 of the depth (the authors' LLaMA3-8B layers 4-8)"})
    num_layers: int = field(default=5, metadata={"help": "consecutive edited layers"})
    module: str | None = field(default=None, metadata={
        "help": "path of the FFN output linear inside a block; None: mlp.down_proj, or mlp.c_proj in GPT-2 blocks"})
    fact_token: str = field(default="subject_last", metadata={
        "help": "where the key is read and the target vector added: 'subject_last' (the subject's last token, the "
                "authors') or 'last' (the prompt's last token, ROME's other choice)"})
    v_lr: float = field(default=1.0, metadata={
        "help": "Adam learning rate of the target vector (the authors' 0.1, scaled to SmolLM2-135M: its residual "
                "stream at the edited layer is large for its 576 dimensions, and at 0.1 the vector moves too little "
                "in 25 steps: Rel 29.2 against 89.2 on 30 validation edits; see the README)"})
    v_steps: int = field(default=25, metadata={
        "help": "optimisation steps of the target vector, at most (the authors' early stop ends them once the loss is "
                "below 0.05)"})
    v_weight_decay: float = field(default=0.5, metadata={"help": "weight of the target vector's relative norm"})
    clamp_norm_factor: float = field(default=0.75, metadata={
        "help": "the vector's norm is kept within this times the norm of the state it is added to"})
    kl_factor: float = field(default=0.0625, metadata={
        "help": "weight of the KL term keeping '{subject} is a' as the base model answers it"})
    l2: float = field(default=10.0, metadata={"help": "lambda: ridge weight of the closed-form update"})
    nullspace_threshold: float = field(default=2e-2, metadata={
        "help": "eigenvalues of the preserved keys' second moment below this span the null space"})
    stats_tokens: int = field(default=20_000, metadata={
        "help": "tokens of text the base model writes (seeded sampling from neutral openings) for the preserved "
                "keys' statistics; computed once per model and layer and cached"})
    batch_size: int = field(default=1, metadata={"help": "edits solved together"})
    max_target_tokens: int = field(default=32, metadata={"help": "longest target, in tokens"})

    def validate(self) -> None:
        """Ranges."""
        for name in ("num_layers", "v_steps", "batch_size", "max_target_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.stats_tokens < 100:
            raise ConfigError(f"stats_tokens must be at least 100, got {self.stats_tokens}")
        for name in ("v_lr", "clamp_norm_factor", "l2", "nullspace_threshold"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("v_weight_decay", "kl_factor"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be at least 0, got {getattr(self, name)}")
        if self.fact_token not in FACT_TOKENS:
            raise ConfigError(f"fact_token must be one of {', '.join(FACT_TOKENS)}, got {self.fact_token!r}")
        if self.first_layer is not None and self.first_layer < 0:
            raise ConfigError(f"first_layer must be >= 0, got {self.first_layer}")
