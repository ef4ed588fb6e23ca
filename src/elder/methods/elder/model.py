"""ElderModel: a frozen causal LM with ELDER's mixture-of-LoRA layers, sequence-level router and code bank."""

from __future__ import annotations

import math
import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import Iterator

import torch
from torch import nn

from elder.forward import head_logits
from elder.methods.base import Answer, MethodError
from elder.methods.elder.codebank import CodeBank
from elder.methods.elder.config import ElderConfig
from elder.methods.elder.keys import key_reading, normalise
from elder.methods.elder.layer import MixtureOfLoRA
from elder.methods.elder.targets import resolve_targets
from elder.modules import (
    StopForward,
    device_of,
    get_module,
    layers_below,
    linear_shape,
    num_hidden_layers,
    replaying,
)
from elder.neutral import CENTERING_TEXT
from elder.settings import ConfigError
from elder.subjects import subject_tokens
from elder.tokens import TeacherForced, context_limit, encode_prompt, encode_target, pad_id, pad_rows, prompt_batch


@dataclass
class Route:
    """The routing decision for a batch, taken once per sequence from its query vector."""

    query: torch.Tensor | None  # (batch, d) the query vectors, fp32 (None when deferral="subject_key" reads none)
    scores: torch.Tensor  # (batch, L, N) softmax scores of every router
    weights: torch.Tensor  # (batch, L, N) raw scores of the top-k experts, zero elsewhere and on deferred rows
    codes: torch.Tensor  # (batch, L*N) bool allocation codes
    used: torch.Tensor  # (batch,) bool: the edit memory is used (False: deferred to the base model)
    distance: torch.Tensor  # (batch,) min Hamming distance to the code bank, or 1 - key similarity (0 while training)
    edits: torch.Tensor | None = None  # (batch,) subject_key: bank row of the matched edit, -1 for none


@dataclass
class Prefix:
    """The frozen decoder layers' output for one batch, kept so training steps skip those layers."""

    output: object  # what the last frozen decoder layer returned, replayed as is
    query: torch.Tensor | None  # (batch, d) the routing query when read inside the frozen layers


@dataclass
class _Session:
    positions: torch.Tensor | None  # query token per row; None: the last position
    defer: bool
    route: Route | None = None
    query: torch.Tensor | None = None  # a query computed earlier, used instead of reading one
    forced: torch.Tensor | None = None  # (batch, L, k) allocations to use as the route (training under subject_key)
    key_mask: torch.Tensor | None = None  # (batch, T) prompt tokens whose states are matched against subject keys
    key_states: torch.Tensor | None = None  # (batch, T, d) the key layer's input, read once per prompt
    answer: tuple[list[str], list[list[int]]] | None = None  # generation under answer_span='target': prompts, ids
    span: torch.Tensor | None = None  # (batch,) forwards of the generation that use the experts (None: all)
    drafts: list[list[int]] | None = None  # per row, the matched edit's target as it continues the prompt ([]: none)
    step: int = 0  # forwards since the route was taken: the generated token each forward produces
    started: bool = False  # whether a forward has run (a route planned before the first one leaves it False)


class ElderModel:
    """A frozen base model plus ELDER's edit memory; the base model's own weights are never changed."""

    def __init__(self, base: nn.Module, tokenizer, config: ElderConfig, base_name: str | None = None) -> None:
        if getattr(base, "_elder_attached", False):
            raise MethodError("this base model already carries an ELDER memory; call detach() on it first")
        self.base, self.tokenizer, self.config = base, tokenizer, config
        self.base_name = base_name or getattr(base.config, "_name_or_path", "") or type(base).__name__
        self.targets = resolve_targets(base, config)
        query_features = linear_shape(get_module(base, self.targets.query_path), self.targets.query_path)[0]
        self.query_device = device_of(get_module(base, self.targets.query_path))
        generator = torch.Generator().manual_seed(config.seed)
        adapters = []
        for path in self.targets.module_paths:
            module = get_module(base, path)
            in_features, out_features = linear_shape(module, path)
            layer = MixtureOfLoRA(in_features, out_features, query_features, config.num_experts, config.rank,
                                  config.alpha, generator)
            adapters.append(layer.to(device_of(module)))
        self.adapters = nn.ModuleList(adapters)
        self.bank = CodeBank(len(adapters) * config.num_experts)
        self.presets: dict[str, torch.Tensor] = {}  # fact id -> (L, k) preset experts of the guided loss
        self._taken_presets: set[tuple[int, ...]] = set()
        self.edit_log: dict[str, dict] = {}  # edit id -> its record and training cost, in edit order
        self._session: _Session | None = None
        base.requires_grad_(False)
        self._handles = [get_module(base, self.targets.query_path).register_forward_pre_hook(self._read_query)]
        self.key_path: str | None = None
        self.key_center: torch.Tensor | None = None  # (d,) mean key-layer state of neutral text
        if config.deferral == "subject_key":
            depth = num_hidden_layers(base)
            layer = config.key_layer if config.key_layer is not None else max(1, round(2 * depth / 15))
            if layer >= self.targets.prefix_length:
                raise ConfigError(f"key_layer {layer} must lie below the first adapted layer "
                                  f"({self.targets.prefix_length}), so that the keys do not depend on the experts")
            self.key_path = f"{self.targets.layers_path}.{layer}"
            states, mask, _ = self._read_keys(list(CENTERING_TEXT))
            self.key_center = states[mask].float().mean(0)
        for index, path in enumerate(self.targets.module_paths):
            self._handles.append(get_module(base, path).register_forward_hook(self._adapter_hook(index)))
        base._elder_attached = True

    # --- routing ---------------------------------------------------------------------------------

    @contextmanager
    def routing(self, positions: torch.Tensor | None = None, defer: bool = True, query: torch.Tensor | None = None,
                forced: torch.Tensor | None = None, key_rows: list[list[int]] | None = None,
                answer: list[str] | None = None) -> Iterator[_Session]:
        """Within this block, base-model forwards route each sequence once, from its query token (or, under
        subject_key deferral, from the match of `key_rows`, each row's prompt token ids, to the subject keys;
        `forced` sets the route). With `answer`, the prompts of a generation, and answer_span='target', each row's
        experts stop once its matched edit's target has been generated."""
        if self._session is not None:
            raise RuntimeError("a routing session is already open on this model")
        session = _Session(positions, defer, query=query, forced=forced)
        if answer is not None and key_rows is not None and self.config.spans_target:
            session.answer = (answer, key_rows)
        if key_rows is not None and forced is None and self.key_path is not None:
            session.key_states, session.key_mask = self._key_states(key_rows)  # a forward of its own, done first
        self._session = session
        try:
            yield self._session
        finally:
            self._session = None

    def route(self, query: torch.Tensor | None, defer: bool, forced: torch.Tensor | None = None,
              key_states: torch.Tensor | None = None, key_mask: torch.Tensor | None = None) -> Route:
        """Route query vectors (batch, d): every router's scores, its top-k, the codes and the deferral. Under
        subject_key deferral the route is instead the allocation of the edit whose subject key the prompt matches
        best (or `forced`), used when the match reaches key_threshold."""
        if self.config.deferral == "subject_key":
            return self._key_route(query, defer, forced, key_states, key_mask)
        query = query.to(self.query_device, torch.float32)
        scores = self.router_scores(query)
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        chosen.scatter_(-1, scores.topk(self.config.top_k, dim=-1).indices, True)
        codes = chosen.flatten(1)
        if defer:
            distance = self.bank.min_distance(codes)
            used = distance < self.config.epsilon
        else:
            distance = torch.zeros(len(query), device=query.device)
            used = torch.ones(len(query), dtype=torch.bool, device=query.device)
        weights = scores * (chosen & used[:, None, None])
        return Route(query, scores, weights, codes, used, distance)

    def _key_route(self, query: torch.Tensor | None, defer: bool, forced: torch.Tensor | None,
                   states: torch.Tensor | None, mask: torch.Tensor | None) -> Route:
        if forced is not None:
            allocation = forced.to(self.query_device)
            used = torch.ones(len(allocation), dtype=torch.bool, device=self.query_device)
            distance = torch.zeros(len(allocation), device=self.query_device)
        else:
            if states is None or mask is None:
                raise RuntimeError("subject_key deferral needs the key layer's states and the prompt mask")
            best, rows = self.bank.best_key(normalise(states, self.key_center), mask.to(states.device),
                                             self.config.key_gate)
            best, rows = best.to(self.query_device), rows.to(self.query_device)
            empty = torch.zeros(len(self.adapters), self.config.top_k, dtype=torch.long)
            allocation = torch.stack([self.presets[self.bank.ids[r]] if r >= 0 else empty
                                      for r in rows.tolist()]).to(self.query_device)
            used = rows >= 0
            if defer:
                used &= best >= self.config.key_threshold
            distance = torch.where(rows >= 0, 1.0 - best, torch.full_like(best, float("inf")))
        chosen = torch.zeros(len(allocation), len(self.adapters), self.total_experts, dtype=torch.bool,
                             device=self.query_device)
        chosen.scatter_(-1, allocation, True)
        weights = (chosen & used[:, None, None]).float()  # each chosen expert at weight 1 (no router to weigh it)
        edits = None if forced is not None else rows
        # the stored code names the experts within their block (the bank's width is one block's)
        local = torch.zeros(len(allocation), len(self.adapters), self.config.num_experts, dtype=torch.bool,
                            device=self.query_device)
        local.scatter_(-1, allocation % self.config.num_experts, True)
        return Route(query, chosen.float(), weights, local.flatten(1), used, distance, edits)

    def router_scores(self, query: torch.Tensor) -> torch.Tensor:
        """Every router's softmax scores (batch, L, N) for query vectors (batch, d), on the query's device."""
        query = query.to(self.query_device, torch.float32)
        return torch.stack([a.scores(query.to(a.router.weight.device)).to(self.query_device) for a in self.adapters],
                           dim=1)

    def _read_query(self, module: nn.Module, args: tuple) -> None:
        session = self._session
        if session is None:
            return
        if session.route is None:
            self._plan(session, args[0])
        elif session.started:
            session.step += 1  # a later decoding step: it keeps the prompt's route
        session.started = True

    def _plan(self, session: _Session, hidden: torch.Tensor | None = None) -> None:
        """Take the session's route (and, for a generation under answer_span='target', each row's answer span)."""
        session.route = self._session_route(session, hidden)
        if session.answer is not None:
            session.drafts = self._answer_targets(session.route, *session.answer)
            session.span = torch.tensor([len(d) for d in session.drafts], device=session.route.used.device)

    def _answer_targets(self, route: Route, prompts: list[str], rows: list[list[int]]) -> list[list[int]]:
        """Per row, the token ids of the matched edit's target as it continues this prompt ([] for no match): the
        generation forwards that use the experts are one per token of it (the forward that follows its last token
        is the base model's)."""
        targets = []
        for prompt, ids, edit in zip(prompts, rows, route.edits.tolist(), strict=True):
            target = self.edit_log[self.bank.ids[edit]]["record"]["target"] if edit >= 0 else None
            targets.append(encode_target(self.tokenizer, ids, prompt, target, 1 << 30) if target else [])
        return targets

    def _session_route(self, session: _Session, hidden: torch.Tensor | None = None) -> Route:
        if session.query is not None:
            query = session.query
        elif hidden is None:
            query = None
        elif session.positions is None:
            query = hidden[:, -1]
        else:
            query = hidden[torch.arange(len(hidden), device=hidden.device), session.positions.to(hidden.device)]
        return self.route(query, session.defer, session.forced, session.key_states, session.key_mask)

    @torch.no_grad()
    def _key_states(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The key layer's input (batch, T, d) for prompts given as token ids, and the mask of the prompts' own
        tokens (batch, T); the ids are decoded and read as `_read_keys` reads text."""
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        states, own, _ = self._read_keys(texts)
        return states, own

    @torch.no_grad()
    def _read_keys(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The key layer's input (batch, T, d) for texts each read after a lead-in, the mask of the texts' own
        tokens (batch, T), and the column of each text's first token.

        The keys are read in a forward of their own, through the layers below the key layer only, so that no real
        token is ever the first: the first position of a sequence carries massive activations (an attention sink)
        that would make it look unlike itself elsewhere. The lead-in (BOS, else EOS, then the lead-in text) takes
        that role; with key_spaced the text follows it after one space (keys.key_reading).
        """
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else pad_id(self.tokenizer)
        encode = lambda text: self.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        readings = [key_reading(text, self.config.key_spaced) for text in texts]
        leads = [[start, *encode(lead)] for lead, _ in readings]
        rows = [[*lead, *encode(text)] for lead, (_, text) in zip(leads, readings, strict=True)]
        input_ids, attention_mask = pad_rows(rows, pad_id(self.tokenizer), left=True)
        own = attention_mask.bool()
        width = own.shape[1]
        firsts = []
        for i, (row, lead) in enumerate(zip(rows, leads, strict=True)):
            own[i, width - len(row): width - len(row) + len(lead)] = False  # the lead-in
            firsts.append(width - len(row) + len(lead))
        input_ids, attention_mask = input_ids.to(self.input_device), attention_mask.to(self.input_device)
        captured = {}

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["states"] = (args[0] if args else kwargs["hidden_states"]).detach()
            raise StopForward

        handle = get_module(self.base, self.key_path).register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.base.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
        finally:
            handle.remove()
        return captured["states"], own.to(captured["states"].device), firsts

    def subject_keys(self, prompts: list[str], subjects: list[str | None]) -> torch.Tensor:
        """Unit subject keys (batch, key_span, d): each prompt's key-layer states at its subject's last key_span
        tokens, the last first, zero where the subject has fewer tokens."""
        for prompt in prompts:
            encode_prompt(self.tokenizer, prompt, self.context_limit)  # an empty or over-long prompt is refused
        states, _, firsts = self._read_keys(prompts)
        states = normalise(states, self.key_center)
        keys = states.new_zeros(len(prompts), self.config.key_span, states.shape[-1])
        for i, (prompt, subject) in enumerate(zip(prompts, subjects, strict=True)):
            text = key_reading(prompt, self.config.key_spaced)[1]
            for j, column in enumerate(subject_tokens(self.tokenizer, text, subject, self.config.key_span)):
                keys[i, j] = states[i, firsts[i] + column]
        return keys

    def _adapter_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            session = self._session
            if session is None:
                return None
            if session.route is None and (session.query is not None or session.forced is not None):
                session.route = self._session_route(session)  # the query module was replayed
            route = session.route
            if route is None:
                raise RuntimeError(f"adapted layer {self.targets.module_paths[index]} ran before the query module")
            x = args[0]
            if len(x) != len(route.used):
                raise RuntimeError("the batch changed size after routing (beam search is not supported)")
            used = route.used if session.span is None else route.used & (session.step < session.span)
            rows = used.nonzero().squeeze(-1).to(x.device)
            if len(rows) == 0:
                return None  # every row deferred (or past its answer span): the base output, untouched
            delta = self.adapters[index].delta(x[rows], route.weights[:, index].to(x.device)[rows])
            if self.config.expert_positions == "answer":
                delta = delta * self._answer_positions(session, x.shape[1], rows)[..., None]
            # rows that defer are not touched at all, so they equal the base model bit for bit
            return output.index_copy(0, rows, (output[rows].float() + delta).to(output.dtype))
        return hook

    @staticmethod
    def _answer_positions(session: _Session, width: int, rows: torch.Tensor) -> torch.Tensor:
        """(rows, width) under expert_positions='answer': the positions from each row's last prompt token on (a
        teacher-forced call names them; a generation's prompt is left-padded, and each later step is answer)."""
        positions = torch.arange(width, device=rows.device)[None, :]
        if session.positions is not None:
            return positions >= session.positions.to(rows.device)[rows][:, None]
        return (positions >= width - 1).expand(len(rows), width)

    # --- forward passes ----------------------------------------------------------------------------

    @property
    def input_device(self) -> torch.device:
        """Where input ids go (the embedding's device, also under a device_map)."""
        return self.base.get_input_embeddings().weight.device

    @property
    def context_limit(self) -> int | None:
        """The longest input the base model takes."""
        return context_limit(self.base)

    @torch.no_grad()
    def run_prefix(self, batch: TeacherForced) -> Prefix | None:
        """Run the frozen layers below the adapted band once; None when no layer lies below it."""
        count = self.targets.prefix_length
        if count == 0:
            return None
        # under subject_key deferral, training routes are forced to the presets: there is no query to read
        reading = nullcontext() if self.key_path is not None else self.routing(batch.query_positions, defer=False)
        with reading as session:
            output = layers_below(self.base, self.targets.layers_path, count, lambda: self.base.base_model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False))
        if session is None or session.route is None:  # no query, or one above the frozen layers (read live)
            return Prefix(output, None)
        return Prefix(output, session.route.query)

    def _replaying(self, prefix: Prefix | None):
        if prefix is None:
            return nullcontext()
        return replaying(self.base, self.targets.layers_path, self.targets.prefix_length, prefix.output)

    def target_logits(self, batch: TeacherForced, defer: bool, prefix: Prefix | None = None,
                      use_memory: bool = True, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, Route | None]:
        """Logits at the target positions only (the vocabulary projection of every position is wasted work).

        With a `prefix` from run_prefix, the frozen layers below the band are replayed instead of run; with
        `use_memory=False` it is the base model's forward (no route).
        """
        kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        if use_memory:
            query = prefix.query if prefix is not None else None
            key_rows = _prompt_rows(batch) if forced is None and self.key_path is not None else None
            with self._replaying(prefix), self.routing(batch.query_positions, defer, query, forced,
                                                       key_rows) as session:
                hidden = self.base.base_model(**kwargs).last_hidden_state
            route = session.route
        else:
            hidden, route = self.base.base_model(**kwargs).last_hidden_state, None
        return head_logits(self.base, hidden, batch.rows, batch.cols), route

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 16, use_memory: bool = True) -> list[Answer]:
        """Greedy answers with the KV cache; each prompt is routed once and keeps that route for every token."""
        input_ids, attention_mask = prompt_batch(self.tokenizer, prompts, self.context_limit, self.input_device)
        limit = self.context_limit
        if limit is not None:
            max_new_tokens = max(1, min(max_new_tokens, limit - input_ids.shape[1]))
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                      do_sample=False, num_beams=1, pad_token_id=pad_id(self.tokenizer))
        width = input_ids.shape[1]
        if not use_memory:
            texts = self.tokenizer.batch_decode(self.base.generate(**kwargs)[:, width:], skip_special_tokens=True)
            return [Answer(p, t, False, float("inf")) for p, t in zip(prompts, texts)]
        rows = None if self.key_path is None else [
            ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())]
        answers = None
        with self.routing(None, defer=True, key_rows=rows, answer=prompts) as session:
            if self.key_path is None or not self.config.rereads_answer:
                answers = self.base.generate(**kwargs)[:, width:].tolist()
            else:
                self._plan(session)  # the key route needs no forward: each row's answer span is known first
                spans = [min(s, max_new_tokens) if u else 0
                         for s, u in zip(session.span.tolist(), session.route.used.tolist())]
        if answers is None and max(spans) > 0:  # the targets, checked; the base model goes on after them
            answers = self._generate_checked(rows, session.route, session.drafts, spans, max_new_tokens)
        elif answers is None:  # every row defers: the base model's own generation, with no hook at work
            answers = self.base.generate(**kwargs)[:, width:].tolist()
        used, distance = session.route.used.tolist(), session.route.distance.tolist()
        rows = session.route.edits.tolist() if session.route.edits is not None else [-1] * len(prompts)
        edit_ids = [self.bank.ids[r] if u and r >= 0 else None for u, r in zip(used, rows)]
        texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        return [Answer(p, t, u, d, e) for p, t, u, d, e in zip(prompts, texts, used, distance, edit_ids)]

    @torch.no_grad()
    def _generate_checked(self, prompts: list[list[int]], route: Route, drafts: list[list[int]], spans: list[int],
                          max_new_tokens: int) -> list[list[int]]:
        """Answers under answer_reread, in one generation: the base model reads each prompt followed by its matched
        edit's target (`spans[i]` tokens of `drafts[i]`; none for a row that defers) and goes on from there, while
        the prefill's output below the adapted band is kept; the experts then run over the band and above on that
        output, once, to check that the edited model's greedy answer is the target (the targets are known before
        any forward: teacher forcing gives the greedy token at every target position, each right as long as the
        target tokens before it are). A row whose answer leaves its target is redone token by token of the check
        (`_speculate`) and continued by the base model from what it gave (`_continue`). The answers equal
        generating the span with the experts and then reading prompt and span afresh with the base model."""
        kept = [draft[:span] for draft, span in zip(drafts, spans, strict=True)]
        input_ids, attention_mask = pad_rows([p + k for p, k in zip(prompts, kept)], pad_id(self.tokenizer), left=True)
        input_ids, attention_mask = input_ids.to(self.input_device), attention_mask.to(self.input_device)
        width, count = input_ids.shape[1], self.targets.prefix_length
        prefill = {}  # the generation's first forward: its position ids and the output below the band

        def read_positions(module: nn.Module, args: tuple, kwargs: dict) -> None:
            prefill.setdefault("position_ids", kwargs.get("position_ids"))

        def read_below(module: nn.Module, args: tuple, output: object) -> None:
            prefill.setdefault("below", output)

        handles = [self.base.base_model.register_forward_pre_hook(read_positions, with_kwargs=True)]
        if count:
            handles.append(get_module(self.base, f"{self.targets.layers_path}.{count - 1}").register_forward_hook(
                read_below))
        try:
            out = self.base.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
                                     max_new_tokens=max(1, max_new_tokens - min(len(k) for k in kept)),
                                     pad_token_id=pad_id(self.tokenizer))
        finally:
            for handle in handles:
                handle.remove()
        going_on = out[:, width:].tolist()
        checked = [i for i, span in enumerate(spans) if span > 0]  # a deferred row needs no check: it is left out
        cols = [[width - 1 - spans[i] + j for j in range(spans[i])] for i in checked]  # the left-padded target
        pick = torch.tensor(checked, device=input_ids.device)
        below, positions = _batch_rows(prefill.get("below"), pick), _batch_rows(prefill["position_ids"], pick)
        with self.routing(None, defer=True) as session, (
                replaying(self.base, self.targets.layers_path, count, below) if count else nullcontext()):
            session.route = _route_rows(route, pick.to(route.used.device))
            session.positions = torch.tensor([width - 1 - spans[i] for i in checked])  # the last prompt tokens
            hidden = self.base.base_model(input_ids=input_ids[pick], attention_mask=attention_mask[pick],
                                          position_ids=positions, use_cache=False).last_hidden_state
        flat_rows = torch.tensor([r for r, c in enumerate(cols) for _ in c])
        predicted = head_logits(self.base, hidden, flat_rows, torch.tensor([x for c in cols for x in c]))
        predicted = predicted.argmax(-1).tolist()
        left, offset = [], 0
        for i, c in zip(checked, cols):
            if predicted[offset:offset + len(c)] != kept[i]:
                left.append(i)
            offset += len(c)
        stops = self._stop_ids()
        answers = []
        for k, more in zip(kept, going_on):
            end = next((j for j, t in enumerate(k) if t in stops), None)
            answers.append(k[:end + 1] if end is not None else (k + more)[:max_new_tokens])
        if left:
            rows = torch.tensor(left, device=route.used.device)
            with self.routing(None, defer=True) as session:
                session.route, session.drafts = _route_rows(route, rows), [drafts[i] for i in left]
                done = self._speculate(session, [prompts[i] for i in left], [spans[i] for i in left])
            redone = self._continue([prompts[i] for i in left], done, [spans[i] for i in left], max_new_tokens)
            for i, answer in zip(left, redone, strict=True):
                answers[i] = answer
        return answers

    def _speculate(self, session: _Session, prompts: list[list[int]], spans: list[int]) -> list[list[int]]:
        """Each row's greedy answer over its answer span (the first `spans[i]` tokens, the experts at work), found
        by checking the matched edit's target instead of generating it token by token: one teacher-forced forward
        over prompt + target gives the edited model's greedy token at every target position, and each is the
        token generation would give as long as the target tokens before it were given too. A row whose answer
        leaves its target is checked again from there (the target's rest as the guess), so every round fixes at
        least one more token; a learned edit takes one round. Rows with no span get [] (nothing generated)."""
        saved = session.route, session.span, session.positions, session.step, session.started
        route = session.route
        stops = self._stop_ids()
        done: list[list[int]] = [[] for _ in prompts]
        pending = [i for i, s in enumerate(spans) if s > 0]
        try:
            while pending:
                rows = torch.tensor(pending, device=route.used.device)
                session.route = _route_rows(route, rows)
                session.span, session.step, session.started = None, 0, False  # one forward: every position edited
                guesses = [done[i] + session.drafts[i][len(done[i]):spans[i] - 1] for i in pending]
                input_ids, attention_mask = pad_rows([prompts[i] + g for i, g in zip(pending, guesses)],
                                                     pad_id(self.tokenizer), left=False)
                starts = [len(prompts[i]) - 1 + len(done[i]) for i in pending]  # predicts the first token not fixed
                session.positions = torch.tensor([len(prompts[i]) - 1 for i in pending])
                cols = [list(range(c, len(prompts[i]) - 1 + spans[i])) for c, i in zip(starts, pending)]
                hidden = self.base.base_model(input_ids=input_ids.to(self.input_device),
                                              attention_mask=attention_mask.to(self.input_device),
                                              use_cache=False).last_hidden_state
                flat_rows = torch.tensor([r for r, c in enumerate(cols) for _ in c])
                predicted = head_logits(self.base, hidden, flat_rows, torch.tensor([x for c in cols for x in c]))
                predicted = predicted.argmax(-1).tolist()
                still, offset = [], 0
                for r, i in enumerate(pending):
                    fixed = len(done[i])
                    for j, token in enumerate(predicted[offset:offset + len(cols[r])], start=fixed):
                        done[i].append(token)  # token j of the answer: right, as every input before it was
                        if token in stops or j + 1 >= spans[i] or guesses[r][j] != token:
                            break  # an end token or the span's end, or the next prediction read a wrong guess
                    offset += len(cols[r])
                    if done[i][-1] not in stops and len(done[i]) < spans[i]:
                        still.append(i)
                pending = still
        finally:
            session.route, session.span, session.positions, session.step, session.started = saved
        return done

    def _stop_ids(self) -> set[int]:
        """The base model's end-of-generation token ids."""
        stop = self.base.generation_config.eos_token_id
        return set(stop if isinstance(stop, list) else [stop]) - {None}

    def _kept(self, answers: list[list[int]], spans: list[int],
              max_new_tokens: int) -> tuple[list[list[int]], list[int]]:
        """What each row keeps of its checked answer span (a row that deferred has none), up to an end token, and
        the rows still open."""
        stops = self._stop_ids()
        kept, open_rows = [], []
        for i, (tokens, span) in enumerate(zip(answers, spans, strict=True)):
            tokens = tokens[:span]
            end = next((j for j, t in enumerate(tokens) if t in stops), None)
            kept.append(tokens if end is None else tokens[:end + 1])
            if end is None and len(kept[i]) < max_new_tokens:
                open_rows.append(i)
        return kept, open_rows

    def _continue(self, prompts: list[list[int]], answers: list[list[int]], spans: list[int],
                  max_new_tokens: int) -> list[list[int]]:
        """Continue each answer with the base model from the prompt and the answer so far, read afresh."""
        kept, open_rows = self._kept(answers, spans, max_new_tokens)
        if not open_rows:
            return kept
        longest = max_new_tokens - min(len(kept[i]) for i in open_rows)
        input_ids, attention_mask = pad_rows([prompts[i] + kept[i] for i in open_rows], pad_id(self.tokenizer),
                                             left=True)
        out = self.base.generate(input_ids=input_ids.to(self.input_device),
                                 attention_mask=attention_mask.to(self.input_device), max_new_tokens=longest,
                                 do_sample=False, num_beams=1, pad_token_id=pad_id(self.tokenizer))
        for i, row in zip(open_rows, out[:, input_ids.shape[1]:].tolist(), strict=True):
            kept[i] = kept[i] + row[:max_new_tokens - len(kept[i])]
        return kept

    @torch.no_grad()
    def refresh_codes(self, chunk: int = 4096) -> None:
        """Re-derive every stored code from its stored query with the current routers (undoes routing drift)."""
        if self.bank.quantized_queries is None or len(self.bank) == 0:
            return  # no queries kept (subject_key deferral keeps none: its keys come from frozen layers)
        rows = torch.arange(len(self.bank))
        codes = [self.route(self.bank.query_rows(rows[i:i + chunk]), defer=False).codes.cpu()
                 for i in range(0, len(rows), chunk)]
        self.bank.replace_codes(torch.cat(codes))

    # --- presets of the guided loss ----------------------------------------------------------------

    @property
    def total_experts(self) -> int:
        """Experts per adapted layer, frozen blocks and the open one."""
        return self.adapters[0].total_experts

    @property
    def open_block(self) -> int:
        """Index of the block of experts that new edits are allocated to (0 until a block is frozen)."""
        return self.adapters[0].frozen_experts // self.config.num_experts

    def block_of(self, fact_id: str) -> int:
        """The block of experts holding a fact's preset allocation."""
        return int(self.presets[fact_id].min()) // self.config.num_experts

    def open_block_edits(self) -> list[str]:
        """Ids of the stored edits allocated to the open block, in edit order."""
        block = self.open_block
        return [i for i in self.edit_log if i in self.presets and self.block_of(i) == block]

    def make_room(self, count: int) -> bool:
        """Under block_edits, freeze the open block when `count` more edits would overfill it (a block holds at
        least one batch); returns whether a block was frozen."""
        limit = self.config.block_edits
        held = len(self.open_block_edits()) if limit else 0
        if not limit or held == 0 or held + count <= limit:
            return False
        block = self.open_block + 1
        for index, adapter in enumerate(self.adapters):
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + block * 1009 + index)
            adapter.freeze_block(generator)
        return True

    def preset_for(self, fact_id: str) -> torch.Tensor:
        """The fact's preset allocation (L, k) in the open block, drawn once, unique across facts and reproducible
        from the seed."""
        if fact_id not in self.presets:
            taken = self._taken_presets
            space = math.comb(self.config.num_experts, self.config.top_k) ** len(self.adapters)
            if len(taken) >= space * (self.open_block + 1):
                raise ConfigError(f"all {space} distinct allocations are taken; raise num_experts or num_layers")
            first = self.open_block * self.config.num_experts
            for attempt in range(10_000):
                rng = random.Random(f"{self.config.seed}:{fact_id}:{attempt}")
                preset = [sorted(first + e for e in rng.sample(range(self.config.num_experts), self.config.top_k))
                          for _ in self.adapters]
                if tuple(x for row in preset for x in row) not in taken:
                    break
            else:
                raise ConfigError("could not draw a unique preset allocation; raise num_experts or num_layers")
            self.set_preset(fact_id, torch.tensor(preset, dtype=torch.long))
        return self.presets[fact_id]

    def set_preset(self, fact_id: str, preset: torch.Tensor) -> None:
        """Record a fact's preset allocation (L, k)."""
        if preset.shape != (len(self.adapters), self.config.top_k):
            raise ValueError(f"preset of {fact_id!r} has shape {tuple(preset.shape)}")
        if len(preset) and (int(preset.min()) < 0 or int(preset.max()) >= self.total_experts):
            raise ValueError(f"preset of {fact_id!r} names experts outside the {self.total_experts} held")
        self.presets[fact_id] = preset
        self._taken_presets.add(tuple(preset.flatten().tolist()))

    # --- lifetime ----------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The experts and routers: all ELDER trains."""
        return list(self.adapters.parameters())

    def detach(self) -> nn.Module:
        """Remove ELDER's hooks and give back the untouched base model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.base._elder_attached = False
        return self.base


def _prompt_rows(batch: TeacherForced) -> list[list[int]]:
    """The prompt token ids of teacher-forced rows: a key is matched on the prompt, never on the target."""
    ids, ends = batch.input_ids.cpu(), batch.query_positions.cpu().tolist()
    return [ids[i, : end + 1].tolist() for i, end in enumerate(ends)]


def _batch_rows(value: object, rows: torch.Tensor) -> object:
    """Rows `rows` of a batch-first tensor, or of the first tensor of a decoder layer's output tuple (None, and a
    tensor of one row shared by the batch, as they are)."""
    if isinstance(value, tuple):
        return (_batch_rows(value[0], rows), *value[1:])
    if value is None or value.shape[0] == 1:
        return value
    return value[rows.to(value.device)]


def _route_rows(route: Route, rows: torch.Tensor) -> Route:
    """The route of some rows of a batch (the batch's rows `rows`, in that order)."""
    return Route(**{f.name: None if getattr(route, f.name) is None else getattr(route, f.name)[rows]
                    for f in fields(route)})
