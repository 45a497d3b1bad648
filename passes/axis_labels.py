"""Axis labels: the index bookkeeping behind coupled groups.

Every tracked tensor axis carries a tuple of *labels* (row-major factors). A label is a named
index space of fixed size; a reshape can refine it into child labels (``qkv`` out → 3 × heads ×
head_dim), a permute moves it, a contraction or a broadcast ties two axes to the same label.
Leaves of the refinement tree become groups. A rule that cannot prove exactness *marks* the
labels it touches with a reason; a marked label (or any label under a marked one) is unprunable.
An *opaque* label stands for a factor no group runs along that a reshape merged into a group axis
(SAM's attention folds the heads into the batch: ``(B, heads, N, d) → (B·heads, N, d)``); it keeps
the factors in order, is never a group, and vanishes again when a reshape takes it out alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from p3b_fx.core.groups import Role

State = tuple[tuple[str, ...], ...]
"""Labels along each axis of one tensor; ``()`` for an axis no label runs along."""


class Unsupported(Exception):
    """Raised by a rule that has no exact answer; the driver marks the labels involved."""


@dataclass
class Labels:
    prefix: str
    sizes: dict[str, int] = field(default_factory=dict)
    children: dict[str, tuple[str, ...]] = field(default_factory=dict)
    marks: dict[str, str] = field(default_factory=dict)
    roles: dict[str, Role] = field(default_factory=dict)
    contracted: set[str] = field(default_factory=set)
    made: int = 0  # labels made so far: names stay unique after merges delete some
    opaque: set[str] = field(default_factory=set)  # factors no group runs along (the batch)

    def new(self, size: int) -> str:
        name = f"{self.prefix}#{self.made}"
        self.made += 1
        self.sizes[name] = size
        return name

    def new_opaque(self, size: int) -> str:
        """A label for a factor no group runs along that a reshape merged into a group axis."""
        name = self.new(size)
        self.opaque.add(name)
        return name

    def leaves(self, name: str) -> tuple[str, ...]:
        kids = self.children.get(name)
        if kids is None:
            return (name,)
        return tuple(leaf for k in kids for leaf in self.leaves(k))

    def roots(self) -> tuple[str, ...]:
        """Labels no split produced, in creation order: the first linear's output axis, then any axis
        a rule started afresh (the unequal parts of a split)."""
        kids = {k for pair in self.children.values() for k in pair}
        return tuple(name for name in self.sizes if name not in kids)

    def axis_leaves(self, axis: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(leaf for label in axis for leaf in self.leaves(label))

    def split(self, name: str, first: int) -> tuple[str, str]:
        """Refine ``name`` into (size ``first``, the rest), reusing an earlier identical split."""
        size = self.sizes[name]
        if first <= 0 or size % first:
            raise Unsupported(f"cannot split an axis of {size} elements into {first} × rest")
        kids = self.children.get(name)
        if kids is not None:
            if len(kids) == 2 and self.sizes[kids[0]] == first:
                return kids[0], kids[1]
            raise Unsupported(f"an axis of {size} elements is split two different ways")
        a, b = self.new(first), self.new(size // first)
        self.children[name] = (a, b)
        if name in self.opaque:
            self.opaque |= {a, b}
        return a, b

    def mark(self, state: State | None, reason: str) -> None:
        for axis in state or ():
            for label in axis:
                self.marks.setdefault(label, reason)

    def mark_all(self, reason: str) -> None:
        for label in self.sizes:
            self.marks.setdefault(label, reason)

    def reason(self, leaf: str) -> str:
        """Why ``leaf`` is unprunable ('' if it is prunable): its own mark or an ancestor's (a merged
        label has an ancestor on each side)."""
        if leaf in self.marks:
            return self.marks[leaf]
        for parent, kids in self.children.items():
            if leaf in kids and (why := self.reason(parent)):
                return why
        return ""

    def root(self, label: str) -> str:
        """The root ``label`` descends from (the first, where a merge gave it two)."""
        for parent, kids in self.children.items():
            if label in kids:
                return self.root(parent)
        return label

    def merge(self, keep: str, drop: str) -> list[tuple[str, str]]:
        """Make ``drop`` the index space ``keep`` is: two projections whose outputs meet element by
        element (PVT's q and its kv from a pooled copy of the input) index one set of heads. Split
        labels merge part by part; marks, roles and contraction carry over. Returns every (dropped,
        kept) pair, the parts' included, so that states naming a dropped label can be renamed."""
        if keep == drop:
            return []
        merged = [(drop, keep)]
        if self.sizes[keep] != self.sizes[drop]:
            raise Unsupported(f"axes of {self.sizes[keep]} and {self.sizes[drop]} elements meet")
        if (keep in self.opaque) != (drop in self.opaque):
            raise Unsupported("a group axis meets an axis no group runs along (the batch)")
        kept_kids, dropped_kids = self.children.get(keep), self.children.pop(drop, None)
        if dropped_kids is not None and kept_kids is None:
            self.children[keep] = dropped_kids
        elif dropped_kids is not None and kept_kids is not None:
            if [self.sizes[k] for k in kept_kids] != [self.sizes[k] for k in dropped_kids]:
                raise Unsupported("two axes split two different ways meet")
            for a, b in zip(kept_kids, dropped_kids, strict=True):
                merged += self.merge(a, b)
        for parent, kids in self.children.items():
            if drop in kids:
                self.children[parent] = tuple(keep if k == drop else k for k in kids)
        self._carry_over(keep, drop)
        return merged

    def _carry_over(self, keep: str, drop: str) -> None:
        """Give ``keep`` the mark, role and contraction ``drop`` had, and forget ``drop``."""
        if drop in self.marks:
            self.marks.setdefault(keep, self.marks.pop(drop))
        if drop in self.roles:
            self.roles.setdefault(keep, self.roles.pop(drop))
        if drop in self.contracted:
            self.contracted.discard(drop)
            self.contracted.add(keep)
        self.opaque.discard(drop)
        del self.sizes[drop]


def reshape_state(
    labels: Labels, state: State, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> State:
    """Map labels through a reshape by matching row-major factors of the two shapes."""
    segs: list[tuple[str | None, int]] = []
    for axis, size in zip(state, in_shape, strict=True):
        if axis:
            segs.extend((label, labels.sizes[label]) for label in axis)
        elif size != 1:
            segs.append((None, size))
    out: list[tuple[str, ...]] = []
    for size in out_shape:
        out.append(_take(labels, segs, size))
    if segs:
        raise Unsupported(f"reshape {in_shape} → {out_shape} leaves factors unmatched")
    return tuple(out)


def _take(labels: Labels, segs: list[tuple[str | None, int]], size: int) -> tuple[str, ...]:
    taken: list[tuple[str | None, int]] = []
    prod = 1
    while prod < size:
        if not segs:
            raise Unsupported("reshape factors do not line up")
        label, seg_size = segs.pop(0)
        need = size // prod
        if size % prod or (seg_size % need and need % seg_size):
            raise Unsupported("reshape factors do not line up")
        if seg_size > need:
            if label is None:
                segs.insert(0, (None, seg_size // need))
            else:
                head, rest = labels.split(label, need)
                segs.insert(0, (rest, labels.sizes[rest]))
                label = head
            seg_size = need
        taken.append((label, seg_size))
        prod *= seg_size
    if all(label is None or label in labels.opaque for label, _ in taken):
        return ()  # no group runs along the axis (an opaque factor taken out alone is plain again)
    return tuple(labels.new_opaque(size) if label is None else label for label, size in taken)
