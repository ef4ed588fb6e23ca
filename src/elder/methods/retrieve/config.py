"""Settings of the retrieve baseline: in-context editing (as IKE and the retrieval baselines of the lifelong
editing literature) with an embedding from the base model itself, so nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass, field

from elder.settings import ConfigError, MethodConfig


@dataclass
class RetrieveConfig(MethodConfig):
    """Keep each edit as text; put the nearest one in the context of a prompt close enough to it."""

    layer: int | None = field(default=None, metadata={
        "help": "decoder layer whose output, averaged over the prompt's tokens and centred on neutral text, embeds "
                "a prompt; None: the middle of the depth"})
    threshold: float = field(default=0.8, metadata={
        "help": "a prompt gets the nearest stored edit in its context when their embeddings' cosine similarity "
                "reaches this; the knob --tune sets"})
    context: str = field(default="New Fact: {prompt} {target}.\nPrompt: ", metadata={
        "help": "the text put before a matched prompt, with the stored edit's {prompt} and {target} (default: "
                "IKE's 'New Fact: ... Prompt: ' layout)"})
    max_target_tokens: int = field(default=32, metadata={"help": "longest target, in tokens"})

    def validate(self) -> None:
        """Ranges and the context's placeholders."""
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be a cosine similarity in [-1, 1], got {self.threshold}")
        if "{target}" not in self.context:
            raise ConfigError(f"context must name the stored edit's {{target}}, got {self.context!r}")
        try:
            self.context.format(prompt="", target="")
        except (KeyError, IndexError, ValueError) as error:
            raise ConfigError(f"context may hold only {{prompt}} and {{target}}: {error}") from None
        if self.max_target_tokens < 1:
            raise ConfigError(f"max_target_tokens must be at least 1, got {self.max_target_tokens}")
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"layer must be >= 0, got {self.layer}")
