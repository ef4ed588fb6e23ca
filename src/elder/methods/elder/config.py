"""Settings of the ELDER mechanism and its edit loop, with the paper's values as defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

from elder.settings import ConfigError, MethodConfig


@dataclass
class ElderConfig(MethodConfig):
    """Every ELDER setting; the defaults are the paper's (Li et al., AAAI 2025)."""

    PRESETS: ClassVar[Mapping[str, Mapping]]  # set below the class: paper and fast
    DEFAULT_PRESET: ClassVar[str] = "fast"

    # --- the mixture-of-LoRA layers ---
    num_experts: int = field(default=4, metadata={"help": "N: LoRA experts per adapted layer"})
    rank: int = field(default=8, metadata={"help": "r: rank of each LoRA expert"})
    alpha: float = field(default=8.0, metadata={"help": "LoRA alpha; experts are scaled by alpha / rank"})
    top_k: int = field(default=2, metadata={"help": "k: experts each router keeps per sequence"})
    first_layer: int | None = field(
        default=None, metadata={"help": "first adapted decoder layer; None: the upper-middle band of the model"}
    )
    num_layers: int = field(default=6, metadata={"help": "L: number of consecutive adapted layers"})
    target_module: str | None = field(
        default=None,
        metadata={"help": "path of the adapted linear layer inside a decoder block; None: mlp.down_proj or mlp.c_fc"},
    )
    module_paths: tuple[str, ...] | None = field(
        default=None, metadata={"help": "full module paths to adapt; overrides first_layer/num_layers/target_module"}
    )
    query_module: str | None = field(
        default=None, metadata={"help": "module whose input gives the routing query; None: same kind, layer before"}
    )
    # --- guided loss and deferral ---
    guide_weight: float = field(default=0.01, metadata={"help": "lambda: weight of the guided routing loss"})
    epsilon: float = field(
        default=12.0, metadata={"help": "use the memory when the min Hamming distance to a stored code is below this"}
    )
    deferral: str = field(
        default="code",
        metadata={"help": "how an input is matched to the memory: 'code' (the paper: Hamming distance of the router's "
                          "allocation code) or 'subject_key' (similarity of the prompt's tokens to each edit's subject "
                          "key; the matched edit's preset allocation is then the route)"},
    )
    key_layer: int | None = field(
        default=None,
        metadata={"help": "decoder layer whose input gives the subject keys; None: 2/15 of the depth (SmolLM2: 4)"},
    )
    key_threshold: float = field(
        default=0.96, metadata={"help": "subject_key: the memory is used when the best key similarity reaches this"}
    )
    key_span: int = field(
        default=3, metadata={"help": "subject_key: how many of the subject's last tokens each edit keeps a key for "
                                     "(1: the last token alone)"}
    )
    key_gate: float = field(
        default=0.7, metadata={"help": "subject_key, key_span > 1: a prompt matches an edit only where the tokens "
                                       "before the matching one reach this similarity to the subject's earlier tokens"}
    )
    key_spaced: bool = field(
        default=True, metadata={"help": "subject_key: read every key text after one space, so that a subject opening "
                                        "a prompt tokenises as it does mid-text"}
    )
    answer_span: str | None = field(
        default=None,
        metadata={"help": "generation: 'all' (the paper: the experts act on every generated token) or 'target' (they "
                          "act until the matched edit's target has been produced, then the base model goes on; needs "
                          "deferral='subject_key', which names the matched edit); None: 'target' under subject_key, "
                          "else 'all'"},
    )
    answer_reread: bool = field(
        default=True,
        metadata={"help": "generation under answer_span='target': once the matched edit's target is out, the base "
                          "model reads the prompt and the target afresh and continues from its own states (False: it "
                          "continues over the prompt states the experts changed, which pull it back to the target)"},
    )
    expert_positions: str = field(
        default="all",
        metadata={"help": "where the experts act in a sequence: 'all' its positions (the paper) or 'answer': from the "
                          "last prompt token on (training, scoring and generation alike), so the prompt's other states "
                          "stay the base model's and, under answer_reread, the base model goes on after the target "
                          "from the cached prompt instead of reading it again"},
    )
    replay: int = field(
        default=0,
        metadata={"help": "earlier edits trained again beside each new batch, drawn at random (0: none, the paper); "
                          "needs deferral='subject_key', whose routes are each edit's preset"},
    )
    block_edits: int = field(
        default=0,
        metadata={"help": "edits allocated to one block of num_experts experts per layer; once it holds this many, "
                          "the block is frozen as it is and a fresh block takes the next edits, and replay draws from "
                          "the open block only (0: one pool that every edit shares, the paper); needs "
                          "deferral='subject_key'"},
    )
    negatives: int = field(
        default=0,
        metadata={"help": "other questions about each edit's subject (the project's generic templates, none asking "
                          "what the edit asks) trained beside it under its route to keep the base model's answers "
                          "(0: none, the paper); needs deferral='subject_key'"},
    )
    refresh_codes: bool = field(
        default=False,
        metadata={"help": "re-derive every stored code after each batch, so old edits' codes follow the routers"},
    )
    anchor_routes: bool = field(
        default=False,
        metadata={"help": "keep applying the guided loss to earlier edits' stored queries (router-only replay)"},
    )
    settle_routes: bool = field(
        default=False,
        metadata={"help": "before the experts train on a batch, train the routers alone (from the cached query, no "
                          "model forward) until the batch routes to its presets"},
    )
    # --- the edit loop ---
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate"})
    router_lr: float | None = field(default=None, metadata={"help": "learning rate of the routers; None: lr"})
    batch_size: int = field(default=4, metadata={"help": "edits trained together"})
    iterations: int = field(default=50, metadata={"help": "optimisation steps per batch (at most, with early_stop)"})
    early_stop: bool = field(
        default=False, metadata={"help": "stop a batch as soon as every target token is predicted"}
    )
    stop_probability: float = field(
        default=0.0,
        metadata={"help": "early_stop also waits until every target token has at least this probability (a margin "
                          "that later edits must erode before an answer flips)"},
    )
    paraphrase_split: float = field(
        default=0.0,
        metadata={"help": "fraction of each edit's rephrases also trained on (paper's variant); the rest are held out"},
    )
    max_target_tokens: int = field(default=32, metadata={"help": "longest target, in tokens"})
    seed: int = field(default=0, metadata={"help": "seed of the adapter init and the preset allocations"})

    def validate(self) -> None:
        """Ranges and consistency of the settings."""
        positive = ("num_experts", "rank", "top_k", "num_layers", "batch_size", "iterations", "max_target_tokens",
                    "key_span")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        if self.alpha <= 0 or self.lr <= 0:
            raise ConfigError("alpha and lr must be positive")
        if self.guide_weight < 0:
            raise ConfigError(f"guide_weight must be >= 0, got {self.guide_weight}")
        if self.epsilon < 0:
            raise ConfigError(f"epsilon must be >= 0, got {self.epsilon}")
        if not 0.0 <= self.stop_probability < 1.0:
            raise ConfigError(f"stop_probability must be in [0, 1), got {self.stop_probability}")
        if not 0.0 <= self.paraphrase_split <= 1.0:
            raise ConfigError(f"paraphrase_split must be in [0, 1], got {self.paraphrase_split}")
        if self.first_layer is not None and self.first_layer < 1:
            raise ConfigError("first_layer must be >= 1: the query is read from the layer before it")
        if self.deferral not in DEFERRALS:
            raise ConfigError(f"deferral must be one of {', '.join(DEFERRALS)}, got {self.deferral!r}")
        if isinstance(self.replay, bool) or not isinstance(self.replay, int) or self.replay < 0:
            raise ConfigError(f"replay must be an integer >= 0, got {self.replay!r}")
        if self.block_edits < 0:  # its type, as every setting's, is checked above
            raise ConfigError(f"block_edits must be an integer >= 0, got {self.block_edits!r}")
        if self.block_edits and self.deferral != "subject_key":
            raise ConfigError("block_edits needs deferral='subject_key' (an edit's route is then its preset, which "
                              "names its block); set block_edits=0")
        if self.negatives < 0:  # its type, as every setting's, is checked above
            raise ConfigError(f"negatives must be an integer >= 0, got {self.negatives!r}")
        if self.negatives and self.deferral != "subject_key":
            raise ConfigError("negatives needs deferral='subject_key' (a negative is routed as its edit, by the "
                              "edit's preset); set negatives=0")
        if self.replay and self.deferral != "subject_key":
            raise ConfigError("replay needs deferral='subject_key' (an earlier edit's route is then its preset); "
                              "set replay=0")
        if self.expert_positions not in EXPERT_POSITIONS:
            raise ConfigError(f"expert_positions must be one of {', '.join(EXPERT_POSITIONS)}, "
                              f"got {self.expert_positions!r}")
        if self.answer_span is not None and self.answer_span not in ANSWER_SPANS:
            raise ConfigError(f"answer_span must be one of {', '.join(ANSWER_SPANS)} or None, "
                              f"got {self.answer_span!r}")
        if self.answer_span == "target" and self.deferral != "subject_key":
            raise ConfigError("answer_span='target' needs deferral='subject_key' (only a subject key names the "
                              "matched edit); set answer_span=all")
        if not isinstance(self.key_threshold, (int, float)) or not -1.0 <= self.key_threshold <= 1.0:
            raise ConfigError(f"key_threshold must be a cosine similarity in [-1, 1], got {self.key_threshold!r}")
        if not -1.0 <= self.key_gate <= 1.0:  # its type, as every setting's, is checked above
            raise ConfigError(f"key_gate must be a cosine similarity in [-1, 1], got {self.key_gate!r}")
        if self.key_layer is not None and (not isinstance(self.key_layer, int) or self.key_layer < 1):
            raise ConfigError(f"key_layer must be a positive integer, got {self.key_layer!r}")
        if self.module_paths is not None and len(self.module_paths) == 0:
            raise ConfigError("module_paths is empty")

    @property
    def spans_target(self) -> bool:
        """Whether generation stops the experts once the matched edit's target is out (answer_span resolved)."""
        return self.answer_span == "target" or (self.answer_span is None and self.deferral == "subject_key")

    @property
    def rereads_answer(self) -> bool:
        """Whether generation continues after the matched edit's target from states the base model reads afresh."""
        return self.spans_target and self.answer_reread


DEFERRALS = ("code", "subject_key")
ANSWER_SPANS = ("all", "target")
EXPERT_POSITIONS = ("all", "answer")

# The paper's loop is the dataclass default. `fast` settles each batch's routes before its experts train, trains
# with a high rate and stops once the targets are learned, and keeps old edits routable (see the README for the
# measurements behind it).
PRESETS: Mapping[str, Mapping] = MappingProxyType({
    "paper": {},
    "fast": {
        "deferral": "subject_key",
        "replay": 8,
        "num_experts": 64,
        "block_edits": 1000,
        "lr": 5e-3,
        "router_lr": 1e-2,
        "iterations": 50,
        "settle_routes": True,
        "anchor_routes": True,
        "early_stop": True,
        "guide_weight": 1.0,
        "epsilon": 4.0,
        "refresh_codes": True,
    },
})

ElderConfig.PRESETS = PRESETS
