"""AlphaEdit: for each edit, a target vector is optimised for the residual stream at the last edited layer, at the
subject's last token (so that the prompt, also after a few neutral openings, gives the target; a KL term keeps
"{subject} is a" as it was); then each edited FFN output linear in turn gets MEMIT's closed-form share of the
change, projected onto the null space of preserved knowledge's keys:

    dW_l = (P_l (K K^T + C_l) + lambda I)^-1 P_l K R_l^T

K holds the edits' keys (the linear's input at the subject's last token, averaged over the openings), R_l the
rest of the way to the target divided over the layers left, C_l the keys of earlier edits, and P_l projects onto
the eigenvectors of the preserved keys' second moment whose eigenvalues fall below `nullspace_threshold`, so that
an update leaves those keys' outputs unchanged. The preserved keys come from text the base model writes from
neutral openings (`stats_tokens` tokens, seeded), computed once per model and cached under the elder cache
folder. The updates are kept as additive deltas on the frozen linears (the base weights are never written); there
is no deferral: every input goes through them."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from elder.data import EditRecord
from elder.deltas import DenseDelta, OutputDeltas
from elder.files import atomic_write
from elder.forward import input_device, target_logits
from elder.methods.alphaedit.config import AlphaEditConfig
from elder.methods.base import EditResult
from elder.methods.hooked import DeltaMethod
from elder.models import cache_dir
from elder.modules import (FFN_OUTPUTS, block_module, decoder_layers_path, get_module, layer_of, layers_below,
                           linear_shape, num_hidden_layers, replaying)
from elder.neutral import CENTERING_TEXT
from elder.settings import ConfigError
from elder.subjects import guess_subject, subject_tokens
from elder.tokens import context_limit, pad_id, pad_rows, prompt_batch, teacher_forced

BAND = 4 / 32  # the authors' LLaMA3-8B layers 4-8 of 32
STOP_LOSS = 5e-2  # the authors' compute_z stops once its loss is below this
OPENINGS = 5  # neutral sentences put before the prompt when optimising the target vector and reading keys
STATS_SEQUENCE = 128  # tokens each sampled text adds to the statistics
STATS_BATCH_REPEAT = 4  # each neutral opening is sampled this many times per generate call


class AlphaEditMethod(DeltaMethod):
    """AlphaEdit: null-space-projected closed-form updates of a band of FFN output linears."""

    name = "alphaedit"
    config_class = AlphaEditConfig

    def __init__(self, base: nn.Module, tokenizer, base_name: str, config: AlphaEditConfig) -> None:
        depth, layers = num_hidden_layers(base), decoder_layers_path(base)
        first = config.first_layer if config.first_layer is not None else round(BAND * depth)
        if first + config.num_layers > depth:
            raise ConfigError(f"layers {first}..{first + config.num_layers - 1} lie outside a model of {depth} layers")
        paths = [block_module(base, layers, i, config.module, FFN_OUTPUTS)
                 for i in range(first, first + config.num_layers)]
        super().__init__(base, tokenizer, base_name, config)
        try:
            self.paths = paths
            self.layers_path, self.z_layer = layers, first + config.num_layers - 1
            self.shapes = [linear_shape(get_module(base, p), p) for p in paths]
            self.deltas = OutputDeltas(base, paths, lambda i, o: DenseDelta(i, o))
            self.cache = [torch.zeros(d_in, d_in) for d_in, _ in self.shapes]  # C_l: earlier edits' keys, fp32
            self.projections = [self._null_space(m) for m in self._preserved_moments()]
            self.projected = [torch.zeros(d_in, d_in) for d_in, _ in self.shapes]  # P_l C_l, kept with C_l
        except BaseException:
            if hasattr(self, "deltas"):
                self.deltas.remove()
            self._release()
            raise

    # --- preserved knowledge ------------------------------------------------------------------------

    def _preserved_moments(self) -> list[torch.Tensor]:
        """E[k k^T] of each edited linear's input over the made text, from the cache or computed and cached."""
        digest = hashlib.sha256()
        digest.update(f"{self.base_name}|{'|'.join(self.paths)}|{self.cfg.stats_tokens}".encode())
        for path in self.paths:
            digest.update(get_module(self.base, path).weight.detach().float().cpu().numpy().tobytes()[:1 << 20])
        path = cache_dir() / "stats" / f"alphaedit-{digest.hexdigest()[:24]}.safetensors"
        if path.is_file():
            try:
                saved = load_file(str(path))
                moments = [saved[f"mom2.{i}"] for i in range(len(self.paths))]
                if all(m.shape == (d, d) for m, (d, _) in zip(moments, self.shapes)):
                    return moments
            except Exception:  # a damaged cache file is recomputed and replaced
                pass
        moments = self._compute_moments()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({f"mom2.{i}": m.contiguous() for i, m in enumerate(moments)}, tmp))
        return moments

    @torch.no_grad()
    def _compute_moments(self) -> list[torch.Tensor]:
        """Sample text from the base model (seeded, from neutral openings) and average k k^T over its tokens."""
        texts, tokens = [], 0
        limit = context_limit(self.base)
        openings = list(CENTERING_TEXT) * STATS_BATCH_REPEAT  # many rows per generate call: fewer sequential steps
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            while tokens < self.cfg.stats_tokens:
                ids, mask = prompt_batch(self.tokenizer, openings, limit, input_device(self.base))
                new = STATS_SEQUENCE if limit is None else max(1, min(STATS_SEQUENCE, limit - ids.shape[1]))
                out = self.base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=True,
                                         top_k=0, top_p=0.95, pad_token_id=pad_id(self.tokenizer))
                written = out[:, ids.shape[1]:].cpu()
                for opening, row_mask, more in zip(ids.cpu(), mask.cpu().bool(), written):
                    kept = more[: int((more != pad_id(self.tokenizer)).cumprod(0).sum())]  # up to the first pad
                    texts.append(opening[row_mask].tolist() + kept.tolist())
                    tokens += len(texts[-1])
        sums = [torch.zeros(d, d, dtype=torch.float64) for d, _ in self.shapes]
        count = 0
        handles = []
        captured: dict[int, torch.Tensor] = {}
        for index, path in enumerate(self.paths):
            handles.append(get_module(self.base, path).register_forward_hook(
                lambda m, args, out, index=index: captured.__setitem__(index, args[0].detach())))
        try:
            for lo in range(0, len(texts), 16):
                ids, mask = pad_rows(texts[lo:lo + 16], pad_id(self.tokenizer), left=False)
                self.base(input_ids=ids.to(input_device(self.base)),
                          attention_mask=mask.to(input_device(self.base)), use_cache=False)
                keep = mask.bool()
                for index in range(len(self.paths)):
                    keys = captured[index].cpu()[keep].double()
                    sums[index] += keys.T @ keys
                count += int(keep.sum())
        finally:
            for handle in handles:
                handle.remove()
        return [(s / count).float() for s in sums]

    def _null_space(self, moment: torch.Tensor) -> torch.Tensor:
        """The projector onto the eigenvectors of `moment` with eigenvalues below the threshold."""
        values, vectors = torch.linalg.eigh(moment.double())
        small = vectors[:, values < self.cfg.nullspace_threshold]
        return (small @ small.T).float()

    # --- editing ------------------------------------------------------------------------------------

    def edit(self, records: Sequence[EditRecord]) -> list[EditResult]:
        """Each batch of `batch_size` edits: target vectors, then the layers' projected closed-form updates."""
        return self._in_batches(records, self.cfg.batch_size, self._edit_batch)

    def _edit_batch(self, records: list[EditRecord]) -> list[EditResult]:
        start = time.perf_counter()
        subjects = [r.subject if r.subject and r.subject in r.prompt else guess_subject(r.prompt) for r in records]
        with self.deltas.active(True), torch.no_grad():
            vectors, steps = zip(*(self._target_vector(r, s) for r, s in zip(records, subjects)))
            targets = torch.stack(vectors, 1)  # (d, n)
            count = len(self.paths)
            for i, (path, projection) in enumerate(zip(self.paths, self.projections)):
                (keys,) = self._keys(records, subjects, [path])  # (d_in, n)
                current = self._states(records, subjects)  # (d, n)
                resid = (targets - current) / (count - i)
                eye = torch.eye(keys.shape[0])
                projected_keys = projection @ keys
                update = torch.linalg.solve(projected_keys @ keys.T + self.projected[i] + self.cfg.l2 * eye,
                                            projected_keys @ resid.T)  # (d_in, d_out)
                weight = self.deltas.deltas[i].weight
                weight += update.T.to(weight.device, weight.dtype)
            for i, keys in enumerate(self._keys(records, subjects, self.paths)):  # the final keys, one forward
                self.cache[i] += keys @ keys.T
                self.projected[i] += (self.projections[i] @ keys) @ keys.T
        for record in records:
            self.records[record.id] = record.to_dict()
        checks = self.predict([r.prompt for r in records], [r.target for r in records])
        seconds = (time.perf_counter() - start) / len(records)
        return [EditResult(r.id, seconds, max(steps), c.accuracy == 1.0) for r, c in zip(records, checks)]

    def _texts(self, prompt: str) -> list[str]:
        """The prompt alone and after each neutral opening (the authors' context templates)."""
        return [prompt] + [f"{opening} {prompt}" for opening in CENTERING_TEXT[:OPENINGS]]

    def _position(self, text: str, subject: str) -> int:
        """Index in `tokenizer(text)` (special tokens included) of the subject's last token, or of the text's last
        token under fact_token='last'."""
        full = len(self.tokenizer(text).input_ids)
        if self.cfg.fact_token == "last":
            return full - 1
        plain = len(self.tokenizer(text, add_special_tokens=False).input_ids)
        return full - plain + subject_tokens(self.tokenizer, text, subject, 1)[0]

    def _read(self, texts: list[str], positions: list[int], paths: list[str]) -> list[torch.Tensor]:
        """For each path, the (rows, d) inputs of its module at each row's position (as the model is now), from one
        forward."""
        captured: dict[int, torch.Tensor] = {}
        handles = [get_module(self.base, path).register_forward_hook(
            lambda m, args, out, i=i: captured.__setitem__(i, args[0])) for i, path in enumerate(paths)]
        try:
            ids = [self.tokenizer(t).input_ids for t in texts]
            input_ids, mask = pad_rows(ids, pad_id(self.tokenizer), left=False)
            deepest = max(layer_of(self.base, path) for path in paths)  # the forward stops after its layer
            layers_below(self.base, self.layers_path, deepest + 1, lambda: self.base(
                input_ids=input_ids.to(input_device(self.base)), attention_mask=mask.to(input_device(self.base)),
                use_cache=False))
        finally:
            for handle in handles:
                handle.remove()
        out = []
        for i in range(len(paths)):
            x = captured[i]
            rows = torch.arange(len(texts), device=x.device)
            out.append(x[rows, torch.tensor(positions, device=x.device)].float().cpu())
        return out

    def _keys(self, records: list[EditRecord], subjects: list[str], paths: list[str]) -> list[torch.Tensor]:
        """For each path, (d_in, n): each edit's key there, averaged over its texts."""
        columns: list[list[torch.Tensor]] = [[] for _ in paths]
        for record, subject in zip(records, subjects):
            texts = self._texts(record.prompt)
            read = self._read(texts, [self._position(t, subject) for t in texts], paths)
            for i, states in enumerate(read):
                columns[i].append(states.mean(0))
        return [torch.stack(c, 1) for c in columns]

    def _states(self, records: list[EditRecord], subjects: list[str]) -> torch.Tensor:
        """(d, n): the residual stream after the last edited layer, at each edit prompt's subject token."""
        columns = []
        for record, subject in zip(records, subjects):
            columns.append(self._layer_output(record.prompt, self._position(record.prompt, subject)))
        return torch.stack(columns, 1)

    def _layer_output(self, text: str, position: int) -> torch.Tensor:
        """The last edited layer's output for `text` at `position` (the layers above it do not run)."""
        ids = torch.tensor([self.tokenizer(text).input_ids], device=input_device(self.base))
        output = layers_below(self.base, self.layers_path, self.z_layer + 1,
                              lambda: self.base(input_ids=ids, use_cache=False))
        return (output[0] if isinstance(output, tuple) else output)[0, position].float().cpu()

    def _target_vector(self, record: EditRecord, subject: str) -> tuple[torch.Tensor, int]:
        """The state the last edited layer should give at the subject's last token: the present one plus a
        vector optimised so the prompt (alone and after each opening) gives the target. As the authors' compute_z:
        NLL of the target + kl_factor x KL(now || before) on "{subject} is a" + v_weight_decay x |delta| / |h|^2,
        stopped once that loss is below STOP_LOSS, the last step scored but not taken. The layers up to the edited
        one do not change while the vector is optimised: they run once and are replayed."""
        texts = self._texts(record.prompt)
        rows = texts + [f"{subject} is a"]
        batch = teacher_forced(self.tokenizer, rows, [record.target] * len(texts) + [" ."], context_limit(self.base),
                               self.cfg.max_target_tokens, input_device(self.base))
        positions = torch.tensor([self._position(t, subject) for t in rows])
        current = self._layer_output(record.prompt, int(positions[0]))
        below = layers_below(self.base, self.layers_path, self.z_layer + 1, lambda: target_logits(self.base, batch))
        essence_token = int((batch.rows == len(texts)).nonzero()[0])  # its first target position: next token
        edit_tokens = batch.rows < len(texts)
        delta = torch.zeros_like(current, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=self.cfg.v_lr)
        bound = self.cfg.clamp_norm_factor * current.norm()
        reference = None
        with torch.enable_grad():
            for step in range(self.cfg.v_steps):
                logits = self._logits_moved(batch, below, positions, delta)
                nll = F.cross_entropy(logits[edit_tokens.to(logits.device)],
                                      batch.target_ids[edit_tokens].to(logits.device))
                essence = F.log_softmax(logits[essence_token], -1)
                if reference is None:  # delta is zero on the first step
                    reference = essence.detach()
                kl = F.kl_div(reference, essence, log_target=True, reduction="sum")
                loss = nll + self.cfg.kl_factor * kl + self.cfg.v_weight_decay * delta.norm() / current.norm() ** 2
                if loss.item() < STOP_LOSS or step == self.cfg.v_steps - 1:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    if delta.norm() > bound:
                        delta.mul_(bound / delta.norm())
        return current + delta.detach(), step + 1

    def _logits_moved(self, batch, below: object, positions: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Target logits of `batch` with `delta` added to the last edited layer's output at each row's position,
        the layers up to it replayed from `below` (their output for the batch, from `layers_below`)."""
        hidden = below[0] if isinstance(below, tuple) else below
        at = (torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device))
        moved = hidden.index_put(at, hidden[at] + delta.to(hidden.device, hidden.dtype))
        with replaying(self.base, self.layers_path, self.z_layer + 1,
                       (moved, *below[1:]) if isinstance(below, tuple) else moved):
            return target_logits(self.base, batch).float()

    # --- state --------------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"delta.{i}": d.weight for i, d in enumerate(self.deltas.deltas)}
        tensors.update({f"cache.{i}": c for i, c in enumerate(self.cache)})
        return tensors

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, delta in enumerate(self.deltas.deltas):
                delta.weight.copy_(tensors[f"delta.{i}"])
        self.cache = [tensors[f"cache.{i}"].float().cpu() for i in range(len(self.paths))]
        self.projected = [p @ c for p, c in zip(self.projections, self.cache)]
