"""Subject keys: what an edit is about, read from the frozen layers at the subject's last token.

The paper's code follows the question's template (the same question about another country lands on the same
allocation), so a neighbour is let in and a paraphrase is sent away. A fact is about its subject: the hidden state
at the subject's last token in a low layer (where ROME and MEMIT also find the subject's representation) names the
subject whatever words surround it. At inference the subject's position is unknown, so every prompt token is
compared with every stored key and the best match decides.

Two refinements, both measured with `benchmarks/keys.py`:
- every text is read as it would be mid-sentence, after the lead-in and one space, so a subject that opens a prompt
  ("Raymond Flynn was ...") has the same tokens as elsewhere (" Raymond" rather than "Ray", "mond");
- an edit keeps the states of its subject's last `key_span` tokens, and a prompt matches it only where the tokens
  before the matching one also match the subject's earlier tokens (`key_gate`): "Michelle Obama" no longer
  matches "Barack Obama" on "Obama" alone.
"""

from __future__ import annotations

import torch

# Text every key read starts with (after BOS, else EOS), so that a subject at the start of a prompt is read mid-text,
# as it is in most prompts, rather than at the first positions, where hidden states behave unlike anywhere else.
# With key_spaced the text read follows "Note." after one space (key_reading); without, "Note.\n" as it is.
KEY_LEAD_IN = "Note.\n"
SPACED_LEAD_IN = "Note."


def key_reading(text: str, spaced: bool) -> tuple[str, str]:
    """(lead-in, text) as a key read takes them; spaced, the text gets one leading space, so that its first word
    tokenises as it does mid-text."""
    return (SPACED_LEAD_IN, " " + text.lstrip()) if spaced else (KEY_LEAD_IN, text)


def normalise(states: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Centred, unit-length key vectors (..., d), in fp32."""
    states = states.float() - center.to(states.device)
    return states / states.norm(dim=-1, keepdim=True).clamp_min(1e-6)
