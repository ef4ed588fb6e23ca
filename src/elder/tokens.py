"""Turning prompts and targets into padded tensors, with the checks that keep bad input out of the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elder.errors import ElderError


class InputError(ElderError, ValueError):
    """A prompt or target the model cannot take (empty, or longer than its context)."""


@dataclass
class TeacherForced:
    """Right-padded prompt+target rows and where each target token is predicted from."""

    input_ids: torch.Tensor  # (batch, T)
    attention_mask: torch.Tensor  # (batch, T)
    query_positions: torch.Tensor  # (batch,) last prompt token of each row
    rows: torch.Tensor  # (n_target_tokens,) row of each target token
    cols: torch.Tensor  # (n_target_tokens,) position whose logits predict it
    target_ids: torch.Tensor  # (n_target_tokens,)


def context_limit(model) -> int | None:
    """The longest input the model's config allows, if it states one."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def pad_id(tokenizer) -> int:
    """Token used for padding (masked out, so any id works when the tokenizer has none)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    return 0


def encode_prompt(tokenizer, prompt: str, limit: int | None) -> list[int]:
    """Token ids of a prompt, rejecting empty or over-long ones with the prompt named."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"empty prompt: {prompt!r}")
    ids = tokenizer(prompt).input_ids
    if limit is not None and len(ids) >= limit:
        raise InputError(f"prompt of {len(ids)} tokens does not fit the model's context of {limit}: {prompt[:60]!r}")
    return ids


def encode_target(tokenizer, prompt_ids: list[int], prompt: str, target: str, max_tokens: int) -> list[int]:
    """Token ids of the target as it continues the prompt (a space between them unless one side has it)."""
    if not isinstance(target, str) or not target.strip():
        raise InputError(f"empty target for prompt {prompt[:60]!r}")
    joiner = "" if target[0].isspace() or prompt[-1].isspace() else " "
    full = tokenizer(prompt + joiner + target).input_ids
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        ids = full[len(prompt_ids):]
    else:  # the tokenizer merged across the boundary: tokenise the target on its own
        ids = tokenizer(joiner + target, add_special_tokens=False).input_ids
    if len(ids) > max_tokens:
        raise InputError(f"target of {len(ids)} tokens is longer than max_target_tokens={max_tokens}: {target[:60]!r}")
    return ids


def teacher_forced(tokenizer, prompts: list[str], targets: list[str], limit: int | None, max_target_tokens: int,
                   device: torch.device | str = "cpu") -> TeacherForced:
    """Right-padded batch of prompt+target rows for training and teacher-forced scoring."""
    rows_ids, positions, rows, cols, target_ids = [], [], [], [], []
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        p = encode_prompt(tokenizer, prompt, limit)
        t = encode_target(tokenizer, p, prompt, target, max_target_tokens)
        if limit is not None and len(p) + len(t) > limit:
            raise InputError(f"prompt and target ({len(p) + len(t)} tokens) exceed the model's context of {limit}")
        rows_ids.append(p + t)
        positions.append(len(p) - 1)
        rows += [row] * len(t)
        cols += range(len(p) - 1, len(p) + len(t) - 1)
        target_ids += t
    input_ids, attention_mask = pad_rows(rows_ids, pad_id(tokenizer), left=False)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return TeacherForced(input_ids.to(device), attention_mask.to(device), as_long(positions), as_long(rows),
                         as_long(cols), as_long(target_ids))


def prompt_batch(tokenizer, prompts: list[str], limit: int | None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts for generation: every row's last prompt token sits in the last column."""
    ids = [encode_prompt(tokenizer, prompt, limit) for prompt in prompts]
    input_ids, attention_mask = pad_rows(ids, pad_id(tokenizer), left=True)
    return input_ids.to(device), attention_mask.to(device)


def pad_rows(sequences: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows padded to one width, on the left or the right, and their attention mask."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        input_ids[i, span] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, span] = 1
    return input_ids, attention_mask


def target_argmax(batch: TeacherForced, logits: torch.Tensor) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(predicted, target) token ids of each row, from `logits` (n_target_tokens, vocab) at the batch's target
    positions: the teacher-forced prediction every method's scoring reads."""
    predicted, rows, targets = logits.argmax(-1).cpu(), batch.rows.cpu(), batch.target_ids.cpu()
    return [(tuple(predicted[rows == row].tolist()), tuple(targets[rows == row].tolist()))
            for row in range(len(batch.query_positions))]


def target_logprob(batch: TeacherForced, logits: torch.Tensor) -> list[float]:
    """Summed log-probability of each row's target tokens, from `logits` at the batch's target positions."""
    logp = torch.log_softmax(logits.float(), -1).gather(-1, batch.target_ids.to(logits.device)[:, None])[:, 0]
    sums = torch.zeros(len(batch.query_positions), device=logp.device).index_add_(0, batch.rows.to(logp.device), logp)
    return sums.tolist()
