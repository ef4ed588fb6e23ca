"""The code bank: allocation codes of edited samples, searched by Hamming distance for deferral."""

from __future__ import annotations

import torch


class CodeBank:
    """Stored binary allocation codes, one per edited sample, keyed by the id of the edit they belong to.

    Codes are kept bit-packed (L*N/8 bytes each). Query vectors, kept only when codes are refreshed after training
    (refresh_codes) or routes are anchored (anchor_routes), are kept as int8 with one fp32 scale per row: about one
    byte per query dimension instead of four.
    """

    def __init__(self, code_bits: int) -> None:
        self.code_bits = code_bits
        self.ids: list[str] = []
        self._packed = torch.zeros(0, (code_bits + 7) // 8, dtype=torch.uint8)
        self._query_values: torch.Tensor | None = None  # (n, d) int8
        self._query_scales: torch.Tensor | None = None  # (n,) fp32: a row is values * scale
        self._index: _BitIndex | None = None  # inverted index of the stored codes, rebuilt after each change
        # (n, span, d) fp16 unit subject keys (deferral="subject_key"): the states at the subject's last `span` tokens,
        # the last first; a subject shorter than span has zero rows for the tokens it lacks
        self._keys: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def codes(self) -> torch.Tensor:
        """Every stored code, (n, code_bits) bool."""
        return _unpack(self._packed, self.code_bits)

    @property
    def queries(self) -> torch.Tensor | None:
        """Every stored query vector (n, d) as fp32, or None when queries are not kept."""
        return None if self._query_values is None else self.query_rows(torch.arange(len(self.ids)))

    def query_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The stored query vectors at these row indices, as fp32 (queries must be kept)."""
        if self._query_values is None:
            raise ValueError("this code bank keeps no queries")
        return self._query_values[rows].float() * self._query_scales[rows, None]

    @property
    def quantized_queries(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored queries as kept: (int8 values, fp32 scales), or None."""
        return None if self._query_values is None else (self._query_values, self._query_scales)

    @property
    def keys(self) -> torch.Tensor | None:
        """Every stored subject key (n, span, d) fp16, or None when keys are not kept."""
        return self._keys

    def nbytes(self) -> int:
        """Bytes the bank's codes, queries and keys take in memory (ids not counted)."""
        kept = [self._packed] + ([self._query_values, self._query_scales] if self._query_values is not None else [])
        kept += [self._keys] if self._keys is not None else []
        return sum(t.numel() * t.element_size() for t in kept)

    def add(self, ids: list[str], codes: torch.Tensor, queries: torch.Tensor | None = None,
            scales: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> None:
        """Store one code per id (several codes may share an id: an edit and its trained paraphrases).

        `queries` are float vectors, quantized here to int8; or already int8 values when their `scales` are given.
        """
        if codes.shape != (len(ids), self.code_bits):
            raise ValueError(f"expected codes of shape ({len(ids)}, {self.code_bits}), got {tuple(codes.shape)}")
        if (queries is None) != (self._query_values is None) and len(self.ids) > 0:
            raise ValueError("either every stored code keeps its query or none does")
        if (keys is None) != (self._keys is None) and len(self.ids) > 0:
            raise ValueError("either every stored code keeps its subject key or none does")
        if keys is not None:
            keys = keys[:, None] if keys.dim() == 2 else keys  # one key per edit: (n, d) is (n, 1, d)
            if keys.dim() != 3 or len(keys) != len(ids) or (
                    self._keys is not None and keys.shape[1:] != self._keys.shape[1:]):
                raise ValueError(f"{len(ids)} codes but subject keys of shape {tuple(keys.shape)}"
                                 + ("" if self._keys is None else f"; the bank holds {tuple(self._keys.shape[1:])}"))
            keys = keys.detach().to("cpu", torch.float16)
            self._keys = keys if self._keys is None else torch.cat([self._keys, keys])
        if queries is not None:
            if len(queries) != len(ids) or (scales is not None and scales.shape != (len(ids),)):
                raise ValueError(f"{len(ids)} codes but {len(queries)} queries"
                                 + ("" if scales is None else f" and {tuple(scales.shape)} scales"))
            values, scales = _quantize(queries) if scales is None else (queries.to(torch.int8), scales.float())
            if self._query_values is not None and values.shape[1] != self._query_values.shape[1]:
                raise ValueError(f"queries of width {values.shape[1]}, the bank holds {self._query_values.shape[1]}")
            self._query_values = values if self._query_values is None else torch.cat([self._query_values, values])
            self._query_scales = scales if self._query_scales is None else torch.cat([self._query_scales, scales])
        self.ids.extend(ids)
        self._packed = torch.cat([self._packed, _pack(codes.detach().to("cpu", torch.bool))])
        self._index = None

    def replace_codes(self, codes: torch.Tensor) -> None:
        """Overwrite every stored code (same order), e.g. after the routers moved."""
        if codes.shape != (len(self.ids), self.code_bits):
            raise ValueError(f"expected codes of shape {(len(self.ids), self.code_bits)}, got {tuple(codes.shape)}")
        self._packed = _pack(codes.detach().to("cpu", torch.bool))
        self._index = None

    def remove(self, edit_id: str) -> int:
        """Drop every code of one edit; returns how many were dropped."""
        keep = [i for i, stored in enumerate(self.ids) if stored != edit_id]
        dropped = len(self.ids) - len(keep)
        self.ids = [self.ids[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long)
        self._packed = self._packed[index]
        if self._query_values is not None:
            self._query_values, self._query_scales = self._query_values[index], self._query_scales[index]
        if self._keys is not None:
            self._keys = self._keys[index]
        self._index = None
        return dropped

    def min_distance(self, codes: torch.Tensor) -> torch.Tensor:
        """Minimum Hamming distance (batch,) from each query code to the bank; +inf when the bank is empty."""
        if not self.ids:
            return torch.full((codes.shape[0],), float("inf"), device=codes.device)
        if self._index is None:
            self._index = _BitIndex(self.codes)
        return torch.stack([self._index.min_distance(row) for row in codes.detach().cpu()]).to(codes.device)

    def best_key(self, states: torch.Tensor, mask: torch.Tensor, gate: float = -1.0,
                 chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        """For unit token states (batch, T, d) and the tokens that count (batch, T): the best cosine similarity of
        any counted token to any stored key's last token, and that key's row (batch,); -inf and -1 when the bank is
        empty or nothing passes. A key of several tokens matches at a token only where each token before it, aligned
        with the key's earlier tokens, reaches `gate` too."""
        best = torch.full((len(states),), float("-inf"), device=states.device)
        rows = torch.full((len(states),), -1, dtype=torch.long, device=states.device)
        if self._keys is None or not self.ids:
            return best, rows
        states, width = states.float(), states.shape[1]
        for start in range(0, len(self._keys), chunk):
            keys = self._keys[start:start + chunk].to(states.device, torch.float32)  # (n, span, d)
            sims = torch.einsum("btd,nsd->btns", states, keys).masked_fill(~mask[:, :, None, None], float("-inf"))
            score = sims[..., 0]  # (batch, T, n): the prompt token t against each key's last token
            present = keys.abs().amax(-1) > 0  # (n, span): tokens the subject has
            for j in range(1, keys.shape[1]):  # token t - j against the key's token j, where the subject has one
                earlier = torch.full_like(score, float("-inf"))
                earlier[:, j:] = sims[:, :width - j, :, j]
                fails = (earlier < gate) & present[None, None, :, j]
                score = score.masked_fill(fails, float("-inf"))
            value, row = score.amax(dim=1).max(dim=-1)  # best token per key, then best key
            better = value > best
            best, rows = torch.where(better, value, best), torch.where(better, row + start, rows)
        return best, torch.where(best > float("-inf"), rows, -1)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """(n, bits) bool -> (n, ceil(bits / 8)) uint8, most significant bit first."""
    pad = (-codes.shape[1]) % 8
    bits = torch.nn.functional.pad(codes.to(torch.uint8), (0, pad)).view(len(codes), -1, 8)
    return (bits << _shifts()).sum(-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, code_bits: int) -> torch.Tensor:
    """Inverse of _pack."""
    return ((packed[..., None] >> _shifts()) & 1).bool().flatten(1)[:, :code_bits]


def _shifts() -> torch.Tensor:
    return torch.arange(7, -1, -1, dtype=torch.uint8)


def _quantize(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: values in [-127, 127] and the fp32 scale that maps them back."""
    queries = queries.detach().to("cpu", torch.float32)
    scales = (queries.abs().amax(dim=1) / 127).clamp_min(1e-12)
    values = (queries / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return values, scales


class _BitIndex:
    """For every code bit, the stored codes that set it: a query's overlap with the whole bank then costs only its
    own bits' lists (codes are sparse: k of N experts per layer), not a pass over every stored code."""

    def __init__(self, codes: torch.Tensor) -> None:
        rows, bits = codes.nonzero(as_tuple=True)  # row-major: sorted by row
        order = torch.argsort(bits, stable=True)
        self.owners = rows[order]
        counts = torch.bincount(bits, minlength=codes.shape[1])
        self.spans = list(zip((torch.cumsum(counts, 0) - counts).tolist(), counts.tolist()))
        self.norms = codes.sum(1, dtype=torch.float32)
        # ELDER's codes all have k ones per layer: then the nearest code is simply the one with the most overlap
        self.uniform_norm = float(self.norms[0]) if bool((self.norms == self.norms[0]).all()) else None
        self.size = codes.shape[0]

    def min_distance(self, code: torch.Tensor) -> torch.Tensor:
        """|a xor b| = |a| + |b| - 2 a.b, minimised over the bank; a.b counts the lists that hold b."""
        lists = [self.owners[start:start + count] for bit in code.nonzero().flatten().tolist()
                 for start, count in [self.spans[bit]]]
        hits = torch.cat(lists) if lists else self.owners[:0]
        overlap = torch.bincount(hits, minlength=self.size)
        if self.uniform_norm is not None:
            return code.sum(dtype=torch.float32) + self.uniform_norm - 2 * overlap.max().to(torch.float32)
        return (code.sum(dtype=torch.float32) + self.norms - 2 * overlap.to(torch.float32)).min()
