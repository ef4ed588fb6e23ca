"""retrieve: nothing is trained. Each edit is kept as text with an embedding of its prompt (the base model's own
hidden states at one layer, averaged over the prompt's tokens and centred on neutral text); a prompt whose
embedding reaches `threshold` cosine similarity with a stored edit's gets that edit, written by `context`, before
it, and the base model answers the whole; any other prompt runs unchanged."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from elder.data import EditRecord
from elder.forward import SCORE_BATCH, greedy, input_device, scored_batches
from elder.methods.base import Answer, EditResult, EditsInContext, Forgets, MethodError, TokenPrediction, \
    TunesThreshold
from elder.methods.hooked import HookedMethod, StateFormatError, Use
from elder.methods.retrieve.config import RetrieveConfig
from elder.modules import decoder_layers_path, layers_below, num_hidden_layers
from elder.neutral import CENTERING_TEXT
from elder.settings import ConfigError
from elder.tokens import InputError, context_limit, encode_prompt, pad_id, pad_rows, target_argmax, target_logprob

THRESHOLDS = tuple(round(1.0 - 0.025 * i, 3) for i in range(29))  # --tune tries these, strictest first (1.0 to 0.3)


class RetrieveMethod(HookedMethod, TunesThreshold, Forgets, EditsInContext):
    """In-context editing with retrieval: the nearest stored edit is put before a prompt close enough to it."""

    name = "retrieve"
    config_class = RetrieveConfig

    def __init__(self, base: nn.Module, tokenizer, base_name: str, config: RetrieveConfig) -> None:
        depth = num_hidden_layers(base)
        layer = config.layer if config.layer is not None else depth // 2
        if layer >= depth:
            raise ConfigError(f"layer {layer} lies outside a model of {depth} layers")
        self.layers_path, self.layer = decoder_layers_path(base), layer
        super().__init__(base, tokenizer, base_name, config)
        try:
            self.width = self._base_identity()["hidden"]
            self.center = self._embed(list(CENTERING_TEXT), centred=False).mean(0)
        except BaseException:
            self._release()
            raise
        self.embeddings = torch.zeros(0, self.width)  # (n, d) unit vectors, fp32, on the CPU
        self.embedding_edits: list[str] = []  # the edit of each embedding

    # --- embeddings and contexts ---------------------------------------------------------------------

    @torch.no_grad()
    def _embed(self, texts: Sequence[str], centred: bool = True) -> torch.Tensor:
        """(n, d) embeddings: the layer's output averaged over each text's tokens (centred, unit length)."""
        limit, out = context_limit(self.base), []
        for lo in range(0, len(texts), SCORE_BATCH):
            ids = [encode_prompt(self.tokenizer, t, limit) for t in texts[lo:lo + SCORE_BATCH]]
            input_ids, mask = pad_rows(ids, pad_id(self.tokenizer), left=False)
            output = layers_below(self.base, self.layers_path, self.layer + 1, lambda: self.base(
                input_ids=input_ids.to(input_device(self.base)), attention_mask=mask.to(input_device(self.base)),
                use_cache=False))
            states, mask = (output[0] if isinstance(output, tuple) else output).float().cpu(), mask.float()
            out.append((states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        vectors = torch.cat(out) if out else torch.zeros(0, self.width)
        return F.normalize(vectors - self.center, dim=-1) if centred else vectors

    def _nearest(self, prompts: Sequence[str]) -> tuple[list[float], list[int]]:
        """Each prompt's best cosine similarity with a stored edit, and that edit's row (-1: none stored)."""
        if len(self.embeddings) == 0:
            self._embed(prompts)  # still refuses an empty or over-long prompt
            return [float("-inf")] * len(prompts), [-1] * len(prompts)
        similarity, rows = (self._embed(prompts) @ self.embeddings.T).max(-1)
        return similarity.tolist(), rows.tolist()

    def _contexts(self, prompts: Sequence[str], use_edits: bool, forced: bool = False) -> tuple[list[str], Use]:
        """The prompts as the base model reads them (with a matched edit before each that has one) and which did."""
        prompts = list(prompts)
        use = Use(len(prompts), False)
        similarity, rows = self._nearest(prompts) if use_edits or forced else ([float("-inf")] * len(prompts),
                                                                            [-1] * len(prompts))
        limit, texts = context_limit(self.base), []
        for i, (prompt, s, row) in enumerate(zip(prompts, similarity, rows)):
            text = prompt
            if row >= 0 and (forced or s >= self.cfg.threshold):
                edit = self.records[self.embedding_edits[row]]
                candidate = self.cfg.context.format(prompt=edit["prompt"], target=edit["target"].strip()) + prompt
                if limit is None or len(self.tokenizer(candidate).input_ids) < limit:  # else it runs unchanged
                    text = candidate
                    use.used[i], use.edit_ids[i] = True, self.embedding_edits[row]
            use.distance[i] = 1.0 - s if row >= 0 else float("inf")
            texts.append(text)
        return texts, use

    @contextmanager
    def _edits(self, prompts: Sequence[str], use_edits: bool, training: bool = False,
               generating: bool = False) -> Iterator[Use]:
        yield Use(len(prompts), False)  # no hooks: the edits reach the model through its prompt (_contexts)

    # --- scoring and answering -----------------------------------------------------------------------

    def predict(self, prompts: Sequence[str], targets: Sequence[str], use_edits: bool = True,
                forced: bool = False) -> list[TokenPrediction]:
        """Teacher-forced argmax tokens of each target after its prompt (with its matched edit before it)."""
        if len(prompts) != len(targets):
            raise InputError(f"{len(prompts)} prompts but {len(targets)} targets")
        texts, use = self._contexts(prompts, use_edits, forced)
        rows = [pair for batch, logits in scored_batches(self.base, self.tokenizer, texts, targets)
                for pair in target_argmax(batch, logits)]
        return [TokenPrediction(a, b, u) for (a, b), u in zip(rows, use.used)]

    def loglikelihood(self, prompts: Sequence[str], continuations: Sequence[str], use_edits: bool = True) -> list[float]:
        """Summed log-probability of each continuation."""
        if len(prompts) != len(continuations):
            raise InputError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        texts, _ = self._contexts(prompts, use_edits)
        return [v for batch, logits in scored_batches(self.base, self.tokenizer, texts, continuations)
                for v in target_logprob(batch, logits)]

    def answer(self, prompts: Sequence[str], max_new_tokens: int, use_edits: bool = True) -> list[Answer]:
        """Greedy answers, SCORE_BATCH prompts per generation."""
        out = []
        for lo in range(0, len(prompts), SCORE_BATCH):
            chunk = list(prompts[lo:lo + SCORE_BATCH])
            texts, use = self._contexts(chunk, use_edits)
            answers = greedy(self.base, self.tokenizer, texts, max_new_tokens)
            out += [Answer(p, t, u, d, e) for p, t, u, d, e in zip(chunk, answers, use.used, use.distance, use.edit_ids)]
        return out

    # --- editing ------------------------------------------------------------------------------------

    def edit(self, records: Sequence[EditRecord]) -> list[EditResult]:
        """Store each edit and the embeddings of its prompt and any rephrases it carries; `learned` says whether the
        base model then gives the target for the edit prompt with the edit in its context."""
        self._check_new(records)
        results = []
        for record in records:
            start = time.perf_counter()
            prompts = [record.prompt, *record.rephrases]
            vectors = self._embed(prompts)
            self.records[record.id] = record.to_dict()
            self.embeddings = torch.cat([self.embeddings, vectors])
            self.embedding_edits += [record.id] * len(prompts)
            (check,) = self.predict([record.prompt], [record.target], forced=True)
            results.append(EditResult(record.id, time.perf_counter() - start, 0, check.accuracy == 1.0))
        return results

    def forget(self, edit_id: str) -> None:
        """Remove an edit: its text and embeddings."""
        if edit_id not in self.records:
            raise MethodError(f"no edit with id {edit_id!r} is held")
        keep = [i for i, e in enumerate(self.embedding_edits) if e != edit_id]
        self.embeddings = self.embeddings[keep]
        self.embedding_edits = [self.embedding_edits[i] for i in keep]
        del self.records[edit_id]

    # --- tuning -------------------------------------------------------------------------------------

    @property
    def threshold_name(self) -> str:
        """The setting --tune sets."""
        return "threshold"

    def threshold_sweep(self):
        """(threshold, predict) for each of THRESHOLDS, strictest first, from one pass with every prompt given its
        nearest edit and one with none."""
        cache: dict = {}

        def rows(prompts: Sequence[str], targets: Sequence[str]):
            key = (tuple(prompts), tuple(targets))
            if key not in cache:
                similarity, _ = self._nearest(prompts)
                cache[key] = (self.predict(prompts, targets, forced=True), similarity,
                              self.predict(prompts, targets, use_edits=False))
            return cache[key]

        for threshold in THRESHOLDS:
            def predict(prompts: Sequence[str], targets: Sequence[str], threshold: float = threshold):
                forced, similarity, base = rows(prompts, targets)
                return [f if s >= threshold and f.used_memory else TokenPrediction(b.predicted, b.target, False)
                        for f, s, b in zip(forced, similarity, base)]
            yield threshold, predict

    # --- state --------------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"embeddings": self.embeddings}

    def _fits(self, tensors: dict[str, torch.Tensor]) -> bool:
        return set(tensors) == {"embeddings"} and tensors["embeddings"].ndim == 2 and \
            tensors["embeddings"].shape[1] == self.width

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.embeddings = tensors["embeddings"].float()

    def _extra_state(self) -> dict:
        return {"embedding_edits": self.embedding_edits}

    def _load_extra(self, extra: dict) -> None:
        edits = extra.get("embedding_edits")
        if not isinstance(edits, list) or len(edits) != len(self.embeddings):
            raise StateFormatError("the retrieve embeddings do not match their edit ids")
        self.embedding_edits = [str(e) for e in edits]

    def _check_loaded(self) -> None:
        if set(self.embedding_edits) != set(self.records):
            raise StateFormatError("the retrieve embeddings and the edit log name different edits")

    def close(self) -> nn.Module:
        """Give back the base model (no hook to take out)."""
        return self._release()
