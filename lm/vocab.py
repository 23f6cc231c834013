"""The interleaved vocabulary: every piece of id arithmetic lives here.

Layout (DESIGN §5)::

    [0, num_text)                          text tokenizer ids
    [special_offset, image_offset)         specials: <pad> <bos> <eos> <boi> <eoi> <eot> <user> <assistant>
    [image_offset, image_offset + K*V)     image sub-codes: sub-codebook k, code c -> image_offset + k*V + c

A sequence position is a row of K ids, ``tokens (B, T, K)``. A text or special position repeats its
id in all K columns; an image position holds sub-code k of that position in column k. With K = 1 this
is an ordinary (B, T, 1) token sequence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tokenizer.errors import InputError

SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<eot>", "<user>", "<assistant>")


@dataclass(frozen=True)
class Vocab:
    """Id layout for ``num_text`` text ids and K sub-codebooks of V codes on an (h, w) grid."""

    num_text: int
    """Size of the text tokenizer's vocabulary."""
    num_codebooks: int
    """K: sub-codebooks per image position."""
    codebook_size: int
    """V: codes per sub-codebook."""
    grid: tuple[int, int]
    """(h, w): image positions per image."""
    specials: tuple[str, ...] = SPECIALS

    def __post_init__(self) -> None:
        if self.num_text < 1:
            raise ValueError(f"num_text must be >= 1, got {self.num_text}")
        if self.num_codebooks < 1 or self.codebook_size < 2:
            raise ValueError(f"need K >= 1 and V >= 2, got K={self.num_codebooks}, V={self.codebook_size}")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be (h, w) with h, w >= 1, got {self.grid}")
        if len(set(self.specials)) != len(self.specials) or self.specials[:6] != SPECIALS[:6]:
            raise ValueError(f"specials must start with {SPECIALS[:6]} and be unique, got {self.specials}")
        object.__setattr__(self, "grid", tuple(int(v) for v in self.grid))

    # ----------------------------------------------------------------------------- ranges
    @property
    def special_offset(self) -> int:
        return self.num_text

    @property
    def image_offset(self) -> int:
        return self.num_text + len(self.specials)

    @property
    def num_image_ids(self) -> int:
        return self.num_codebooks * self.codebook_size

    @property
    def size(self) -> int:
        """Total number of ids."""
        return self.image_offset + self.num_image_ids

    @property
    def num_non_image(self) -> int:
        """Ids a text position can take: text ids and specials."""
        return self.image_offset

    @property
    def image_length(self) -> int:
        """h * w: positions in one image span."""
        return self.grid[0] * self.grid[1]

    def ranges(self) -> dict[str, range]:
        """Named id ranges; disjoint and covering [0, size)."""
        return {
            "text": range(0, self.num_text),
            "special": range(self.special_offset, self.image_offset),
            "image": range(self.image_offset, self.size),
        }

    # ----------------------------------------------------------------------------- specials
    def special(self, name: str) -> int:
        """Id of a special token by name, e.g. ``vocab.special("<boi>")``."""
        try:
            return self.special_offset + self.specials.index(name)
        except ValueError:
            raise KeyError(f"unknown special token {name!r}; known: {list(self.specials)}") from None

    @property
    def pad(self) -> int:
        return self.special("<pad>")

    @property
    def bos(self) -> int:
        return self.special("<bos>")

    @property
    def eos(self) -> int:
        return self.special("<eos>")

    @property
    def boi(self) -> int:
        return self.special("<boi>")

    @property
    def eoi(self) -> int:
        return self.special("<eoi>")

    @property
    def eot(self) -> int:
        return self.special("<eot>")

    # ----------------------------------------------------------------------------- predicates
    def is_text(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= 0) & (ids < self.num_text)

    def is_special(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.special_offset) & (ids < self.image_offset)

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.image_offset) & (ids < self.size)

    # ----------------------------------------------------------------------------- image codes
    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Image codes (..., K) in [0, V) -> global ids (..., K)."""
        if codes.shape[-1] != self.num_codebooks:
            raise InputError(
                f"codes: last dimension must be K={self.num_codebooks}, got shape {tuple(codes.shape)}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise InputError(
                f"codes: values must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        k = torch.arange(self.num_codebooks, device=codes.device)
        return self.image_offset + k * self.codebook_size + codes.long()

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Global image ids (..., K) -> codes (..., K) in [0, V); every id must be image sub-code k."""
        if ids.shape[-1] != self.num_codebooks:
            raise InputError(
                f"ids: last dimension must be K={self.num_codebooks}, got shape {tuple(ids.shape)}"
            )
        codes = (
            ids.long()
            - self.image_offset
            - torch.arange(self.num_codebooks, device=ids.device) * self.codebook_size
        )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise InputError(
                "ids: not image ids of the matching sub-codebook (column k must hold sub-code k)"
            )
        return codes

    def image_rows(self, codes: torch.Tensor) -> torch.Tensor:
        """One image's codes (K, h, w) -> its span of positions (h*w, K) of global ids, row-major."""
        if tuple(codes.shape) != (self.num_codebooks, *self.grid):
            raise InputError(
                f"image codes: expected shape (K, h, w) = {(self.num_codebooks, *self.grid)}, got {tuple(codes.shape)}"
            )
        return self.codes_to_ids(codes.flatten(1).T)

    def rows_to_image(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`image_rows`: (h*w, K) ids -> (K, h, w) codes."""
        if tuple(rows.shape) != (self.image_length, self.num_codebooks):
            raise InputError(
                f"image span: expected shape (h*w, K) = {(self.image_length, self.num_codebooks)}, got {tuple(rows.shape)}"
            )
        return self.ids_to_codes(rows).T.reshape(self.num_codebooks, *self.grid)

    def text_rows(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Text or special ids (T,) -> positions (T, K) with the id repeated in every column."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.image_offset):
            raise InputError(
                f"text ids must lie in [0, {self.image_offset}), got [{int(ids.min())}, {int(ids.max())}]"
            )
        return ids.reshape(-1, 1).expand(-1, self.num_codebooks).clone()

    # ----------------------------------------------------------------------------- checks and I/O
    def check_tokenizer(self, num_codebooks: int, codebook_size: int, grid: tuple[int, int]) -> None:
        """Raise if an image tokenizer's (K, V, grid) differs from this layout."""
        theirs = {"K": num_codebooks, "V": codebook_size, "grid": tuple(grid)}
        ours = {"K": self.num_codebooks, "V": self.codebook_size, "grid": self.grid}
        diff = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
        if diff:
            detail = ", ".join(f"{k}: vocab {a} vs tokenizer {b}" for k, (a, b) in diff.items())
            raise InputError(f"vocabulary does not match the image tokenizer checkpoint ({detail})")

    def check_text(self, num_text: int) -> None:
        """Raise if a text tokenizer's vocabulary size differs from this layout."""
        if num_text != self.num_text:
            raise InputError(f"vocabulary expects {self.num_text} text ids, text tokenizer has {num_text}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["specials"] = list(self.specials)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        known = {"num_text", "num_codebooks", "codebook_size", "grid", "specials"}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"vocab config: unknown fields {sorted(unknown)}; expected {sorted(known)}")
        return cls(
            num_text=int(d["num_text"]),
            num_codebooks=int(d["num_codebooks"]),
            codebook_size=int(d["codebook_size"]),
            grid=tuple(d["grid"]),
            specials=tuple(d.get("specials", SPECIALS)),
        )
