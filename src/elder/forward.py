"""Running a causal LM on prompts: teacher-forced target logits, greedy answers, and a target-loss training loop.
Shared by every editing method whose edited model is the base model with something hooked in."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from elder.errors import NonFiniteLossError
from elder.modules import decoder_layers_path, layers_below, replaying
from elder.tokens import InputError, TeacherForced, context_limit, pad_id, prompt_batch, teacher_forced

SCORE_BATCH = 16  # rows per teacher-forced scoring forward
SCORE_MAX_TOKENS = 256  # longest continuation scored (locality answers and task options can be long)


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids go (the embedding's device, also under an accelerate device_map)."""
    return model.get_input_embeddings().weight.device


def target_logits(model: nn.Module, batch: TeacherForced) -> torch.Tensor:
    """(n_target_tokens, vocab) logits at the batch's target positions; the vocabulary projection runs at those
    positions only (on SmolLM2 it costs a fifth of a forward at every position)."""
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              use_cache=False).last_hidden_state
    return head_logits(model, hidden, batch.rows, batch.cols)


def head_logits(model: nn.Module, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The model's logits from its last hidden states (batch, T, d) at positions (rows, cols): the output embedding,
    and the final soft cap of models that have one (Gemma 2 and 3)."""
    head = model.get_output_embeddings()
    logits = head(hidden[rows.to(hidden.device), cols.to(hidden.device)].to(head.weight.device))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


def scored_batches(model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                   max_target_tokens: int = SCORE_MAX_TOKENS) -> Iterator[tuple[TeacherForced, torch.Tensor]]:
    """(batch, target logits) for the prompts and targets, SCORE_BATCH rows at a time."""
    if len(prompts) != len(targets):
        raise InputError(f"{len(prompts)} prompts but {len(targets)} targets")
    limit, device = context_limit(model), input_device(model)
    for start in range(0, len(prompts), SCORE_BATCH):
        batch = teacher_forced(tokenizer, list(prompts[start:start + SCORE_BATCH]),
                               list(targets[start:start + SCORE_BATCH]), limit, max_target_tokens, device)
        with torch.no_grad():
            yield batch, target_logits(model, batch)


def greedy(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy answers (the text after each prompt), all prompts in one left-padded batch."""
    limit = context_limit(model)
    input_ids, attention_mask = prompt_batch(tokenizer, list(prompts), limit, input_device(model))
    if limit is not None:
        max_new_tokens = max(1, min(max_new_tokens, limit - input_ids.shape[1]))
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad_id(tokenizer))
    return tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)


def train_targets(model: nn.Module, batch: TeacherForced, parameters: Sequence[nn.Parameter], lr: float,
                  steps: int, stop_loss: float, after_step=None, first_layer: int = 0) -> tuple[int, bool]:
    """Adam on `parameters` to lower the mean target-token NLL of the batch (EasyEdit's FT objective), for at most
    `steps` steps or until the loss is below `stop_loss`; `after_step()` runs after each update (a norm
    constraint). Returns the steps taken and whether every target token is then the argmax. `first_layer`: the
    lowest decoder layer the training changes; the layers below it run once and are replayed at every step (the
    same logits, without their cost)."""
    logits_now = _replayed_logits(model, batch, first_layer)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    taken = 0
    for taken in range(1, steps + 1):
        logits = logits_now().float()
        loss = F.cross_entropy(logits, batch.target_ids.to(logits.device))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"the training loss is {loss.item()} at step {taken}; lower lr")
        if loss.item() < stop_loss:
            taken -= 1
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
    with torch.no_grad():
        logits = logits_now()
    learned = bool((logits.argmax(-1) == batch.target_ids.to(logits.device)).all())
    return taken, learned


def _replayed_logits(model: nn.Module, batch: TeacherForced, first_layer: int) -> Callable[[], torch.Tensor]:
    """A function giving `target_logits(model, batch)`, decoder layers below `first_layer` run once and replayed."""
    if first_layer <= 0:
        return lambda: target_logits(model, batch)
    layers = decoder_layers_path(model)
    below = layers_below(model, layers, first_layer, lambda: target_logits(model, batch))

    def logits() -> torch.Tensor:
        with replaying(model, layers, first_layer, below):
            return target_logits(model, batch)
    return logits
