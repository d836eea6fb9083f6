"""Sparse candidate trees ("medusa choices") and the buffers tree attention needs (paper 2.1.2).

A tree is plain data: a list of rank paths, (0,) = head 0's top-1, (1,) its top-2, (0, 2) = head 0's
top-1 then head 1's top-3. `build_tree` turns it once into numpy buffers (see docs/design.md):
node 0 is the root (the base's own next token), node j >= 1 is path j-1 after sorting by
(length, lexicographic).

    tree = build_tree([(0,), (1,), (0, 0), (0, 1), (1, 0)], topk=10, num_heads=2)

A `DraftRule` makes the tree a menu rather than a plan (a dynamic tree, as in EAGLE-2): each step
drafts only the nodes of `tree` the heads are surest of this time (`grow_draft`, `subtree`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from medusa_lib.files import read_json, write_json

PAD = -1  # retrieve_indices padding; never a node index, never read as a token


@dataclass(frozen=True)
class Level:
    """The nodes at one depth, for heads that propose depth by depth (sequential heads)."""
    parents: np.ndarray  # (B,) nodes one level up that have children here
    children: np.ndarray  # (n,) the nodes at this depth
    slot: np.ndarray  # (n,) each child's parent, as an index into `parents`
    rank: np.ndarray  # (n,) each child's rank among its head's top-k (its path's last entry)


@dataclass(frozen=True)
class TreeBuffers:
    paths: tuple[tuple[int, ...], ...]  # sorted rank paths, node j = paths[j-1]
    topk: int
    tree_indices: np.ndarray  # (N,) index of each node's token in the candidate vector
    positions: np.ndarray  # (N,) depth of each node (root 0)
    mask: np.ndarray  # (N, N) bool: node i sees node j when j is i or an ancestor of i
    retrieve_indices: np.ndarray  # (R, depth+1) node indices of each leaf path, PAD-padded
    ancestors: np.ndarray  # (N, depth+1) root .. node for every node, PAD-padded
    levels: tuple[Level, ...]  # heads' depth 1 .. depth
    lookup_nodes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (m,) a prompt-lookup chain

    @property
    def size(self) -> int:
        return len(self.positions)

    @property
    def depth(self) -> int:
        return int(self.positions.max())

    @property
    def heads_depth(self) -> int:
        """How many heads the tree reads (the prompt-lookup chain reads none)."""
        return max((len(p) for p in self.paths), default=0)


def _rank(r, where: str) -> int:
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
        raise ValueError(f"{where}: ranks must be whole numbers (0 = top-1), not {r!r}.")
    return int(r)


def validate_paths(paths, topk: int, num_heads: int) -> list[tuple[int, ...]]:
    if isinstance(paths, (str, bytes, dict)) or not hasattr(paths, "__iter__") \
            or not all(hasattr(p, "__iter__") and not isinstance(p, (str, bytes)) for p in paths):
        raise ValueError(f"A tree is a list of rank paths such as [(0,), (1,), (0, 0)], not {paths!r}.")
    topk = _rank(topk, "topk")
    if topk < 1:
        raise ValueError(f"topk must be at least 1, not {topk}.")
    paths = [tuple(_rank(r, f"tree path {list(p)}") for r in p) for p in paths]
    seen = set(paths)
    if len(seen) != len(paths):
        raise ValueError("The tree lists a path twice.")
    for p in paths:
        if not p:
            raise ValueError("Empty path in the tree: the root is implicit, list only (rank, ...) paths.")
        if len(p) > num_heads:
            raise ValueError(f"Path {p} is {len(p)} deep but there are only {num_heads} heads.")
        if any(r < 0 or r >= topk for r in p):
            raise ValueError(f"Path {p} uses a rank outside 0..{topk - 1} (topk = {topk}).")
        if len(p) > 1 and p[:-1] not in seen:
            raise ValueError(f"Path {p} needs its prefix {p[:-1]} in the tree too.")
    return sorted(paths, key=lambda p: (len(p), p))


def build_tree(paths, topk: int, num_heads: int) -> TreeBuffers:
    """Buffers for tree attention from a list of rank paths (validated)."""
    paths = validate_paths(paths, topk, num_heads)
    node_of = {(): 0, **{p: j + 1 for j, p in enumerate(paths)}}
    N = len(paths) + 1
    tree_indices = np.zeros(N, dtype=np.int64)
    positions = np.zeros(N, dtype=np.int64)
    mask = np.eye(N, dtype=bool)
    mask[:, 0] = True  # the root is everyone's ancestor
    for p, j in node_of.items():
        if not p:
            continue
        tree_indices[j] = 1 + topk * (len(p) - 1) + p[-1]  # only the last rank picks the token
        positions[j] = len(p)
        for d in range(1, len(p)):
            mask[j, node_of[p[:d]]] = True
    leaves = [p for p in paths if not any(q[: len(p)] == p and len(q) > len(p) for q in paths)]
    depth = max((len(p) for p in paths), default=0)
    retrieve = np.full((max(1, len(leaves)), depth + 1), PAD, dtype=np.int64)
    retrieve[:, 0] = 0
    for r, leaf in enumerate(leaves):
        for d in range(1, len(leaf) + 1):
            retrieve[r, d] = node_of[leaf[:d]]
    ancestors = np.full((N, depth + 1), PAD, dtype=np.int64)
    for p, j in node_of.items():
        ancestors[j, : len(p) + 1] = [node_of[p[:d]] for d in range(len(p) + 1)]
    levels = []
    for d in range(1, depth + 1):
        children = [node_of[p] for p in paths if len(p) == d]
        parents = sorted({node_of[p[:-1]] for p in paths if len(p) == d})
        slot = [parents.index(node_of[p[:-1]]) for p in paths if len(p) == d]
        rank = [p[-1] for p in paths if len(p) == d]
        levels.append(Level(*(np.array(x, dtype=np.int64) for x in (parents, children, slot, rank))))
    return TreeBuffers(tuple(paths), topk, tree_indices, positions, mask, retrieve, ancestors, tuple(levels))


def with_lookup(tree: TreeBuffers, length: int) -> TreeBuffers:
    """The tree plus a chain of `length` nodes under the root whose tokens are copied from the text
    so far (prompt lookup, as Hugging Face's prompt_lookup_num_tokens) instead of proposed by the
    heads. Verified in the same pass; the base decides, so output stays exact."""
    if length < 1:
        return tree
    N, m = tree.size, length
    nodes = np.arange(N, N + m)
    positions = np.concatenate([tree.positions, np.arange(1, m + 1)])
    mask = np.zeros((N + m, N + m), dtype=bool)
    mask[:N, :N] = tree.mask
    mask[N:, 0] = True
    mask[N:, N:] = np.tril(np.ones((m, m), dtype=bool))  # each lookup node sees the ones before it
    width = max(tree.retrieve_indices.shape[1], m + 1)
    retrieve = np.full((tree.retrieve_indices.shape[0] + 1, width), PAD, dtype=np.int64)
    retrieve[:-1, : tree.retrieve_indices.shape[1]] = tree.retrieve_indices
    retrieve[-1, : m + 1] = np.concatenate([[0], nodes])
    ancestors = np.full((N + m, width), PAD, dtype=np.int64)
    ancestors[:N, : tree.ancestors.shape[1]] = tree.ancestors
    for i in range(m):
        ancestors[N + i, : i + 2] = np.concatenate([[0], nodes[: i + 1]])
    return replace(tree, tree_indices=np.concatenate([tree.tree_indices, np.zeros(m, dtype=np.int64)]), positions=positions,
                   mask=mask, retrieve_indices=retrieve, ancestors=ancestors, lookup_nodes=nodes)


def plan_size(tree: TreeBuffers, lookup: int = 0, lookup_min_ngram: int = 1, lookup_tree: TreeBuffers | None = None,
              rule: DraftRule | None = None, lookup_rule: DraftRule | None = None) -> int:
    """Nodes in the widest pass of a plan (a tree, with decoding.generate's plan arguments): what
    a runtime's max_nodes must hold. A draft rule's passes are never wider than its menu's."""
    return max(tree.size, with_lookup(tree if lookup_tree is None else lookup_tree, lookup).size)


LOOKUP_MAX_NGRAM = 3  # prompt_lookup matches the text's last 3, 2 or 1 tokens, longest first
LOOKUP_MAX_TOKENS = 64  # a lookup chain rides in every pass that finds a match: longer is never worth it


def check_lookup(tokens: int, min_ngram: int, where: str = "") -> None:
    """A lookup chain's settings as prompt_lookup can honour them, or one error naming them."""
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or not 0 <= tokens <= LOOKUP_MAX_TOKENS:
        raise ValueError(f"{where}the lookup's tokens must be a whole number in 0..{LOOKUP_MAX_TOKENS} "
                         f"(a chain of that many tokens rides in every pass that finds a match), not {tokens!r}.")
    if isinstance(min_ngram, bool) or not isinstance(min_ngram, (int, np.integer)) or not 1 <= min_ngram <= LOOKUP_MAX_NGRAM:
        raise ValueError(f"{where}the lookup's min_ngram must be 1..{LOOKUP_MAX_NGRAM} (prompt lookup matches the "
                         f"text's last {LOOKUP_MAX_NGRAM} tokens at most), not {min_ngram!r}.")


def prompt_lookup(history: np.ndarray, length: int, min_ngram: int = 1, max_ngram: int = LOOKUP_MAX_NGRAM) -> np.ndarray | None:
    """The `length` tokens that followed the last earlier occurrence of the text's final n-gram
    (n = max_ngram .. min_ngram), padded with their last token; None when no such n-gram recurs.
    A longer chain is the shorter one continued (the padding included), which replay.py relies on."""
    for n in range(min(max_ngram, len(history) - 1), min_ngram - 1, -1):
        suffix = history[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(history[:-1], n)  # (len-n, n): every earlier n-gram
        hits = np.nonzero((windows == suffix).all(axis=1))[0]
        if len(hits):
            follow = history[hits[-1] + n: hits[-1] + n + length]
            return np.pad(follow, (0, length - len(follow)), mode="edge")
    return None


def chain_paths(depth: int) -> list[tuple[int, ...]]:
    """The top-1 chain: (0,), (0, 0), ... one candidate per head."""
    return [(0,) * d for d in range(1, depth + 1)]


# ----------------------------------------------------------------------------------------------
# Choosing a tree from measured accuracies

def rank_accuracy(topk_acc: np.ndarray) -> np.ndarray:
    """(K, 5) cumulative top-1..5 accuracies -> (K, 5) probability that rank r is the right one."""
    topk_acc = np.asarray(topk_acc, dtype=float)
    return np.diff(np.concatenate([np.zeros((topk_acc.shape[0], 1)), topk_acc], axis=1), axis=1).clip(min=0)


def greedy_tree(rank_acc: np.ndarray, budget: int) -> list[tuple[int, ...]]:
    """Add, one at a time, the node with the highest chance of being accepted (the product of
    the per-rank accuracies along its path, heads taken as independent) until `budget` nodes."""
    K, R = rank_acc.shape
    chosen: dict[tuple, float] = {}
    frontier = {(r,): rank_acc[0, r] for r in range(R)}
    while frontier and len(chosen) < budget:
        best = max(frontier, key=lambda p: (frontier[p], [-x for x in p]))
        chosen[best] = frontier.pop(best)
        if len(best) < K:
            for r in range(R):
                frontier[best + (r,)] = chosen[best] * rank_acc[len(best), r]
    return sorted(chosen, key=lambda p: (len(p), p))


def expected_tau(paths, rank_acc: np.ndarray) -> float:
    """Expected tokens per step: 1 (the root) + the sum of every node's acceptance chance."""
    total = 1.0
    for p in paths:
        total += float(np.prod([rank_acc[d, r] if r < rank_acc.shape[1] else 0.0 for d, r in enumerate(p)]))
    return total


# ----------------------------------------------------------------------------------------------
# Drafting only the confident nodes (dynamic trees)

@dataclass(frozen=True)
class DraftRule:
    """Each step, draft from the plan's tree only the `budget` nodes of highest path probability
    (the product of the heads' probabilities along the node's path: how sure the heads are of it),
    among those whose path probability is at least `min_prob`. A static tree spends the same pass on
    every step; this one spends its nodes where the heads are sure and keeps the pass small where
    they are not. The base still verifies every token, so output stays exact."""
    budget: int  # heads' nodes drafted at most (root excluded)
    min_prob: float = 0.0

    def __post_init__(self):
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, np.integer)) or self.budget < 0:
            raise ValueError(f"DraftRule.budget must be a whole number >= 0, not {self.budget!r}.")
        if isinstance(self.min_prob, bool) or not isinstance(self.min_prob, (int, float, np.floating)) \
                or not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"DraftRule.min_prob must be a number in [0, 1], not {self.min_prob!r}.")


def confident_nodes(path_probs: np.ndarray, rule: DraftRule) -> np.ndarray:
    """(N,) path probabilities (-1 where not known yet) -> the drafted nodes, root first, in tree
    order. Ties go to the earlier node, so the set is closed under parents (a child's path
    probability never exceeds its parent's)."""
    known = np.flatnonzero(path_probs >= rule.min_prob)  # (n+1,) the root (1.0) first; unknown nodes hold -1
    if len(known) > rule.budget + 1:  # keep the root and the `budget` most probable, the earlier node first on a tie
        known = np.sort(known[np.argsort(-path_probs[known], kind="stable")[: rule.budget + 1]])
    return known


def grow_draft(tree: TreeBuffers, rule: DraftRule, expand) -> np.ndarray:
    """The drafted nodes of `tree` under `rule`, found depth by depth: a depth is looked at only under
    parents that are drafted so far, since a child is never surer than its parent.

    expand(d, on) returns the probabilities (n',) of the children tree.levels[d].children[on[slot]]
    of the parents tree.levels[d].parents[on] ((B,) bool), given their parent path: the decoder reads
    them from its heads' one call for the whole tree, the replay from what it recorded."""
    path_probs = np.full(tree.size, -1.0)  # (N,)
    path_probs[0] = 1.0
    drafted = np.zeros(tree.size, dtype=bool)  # (N,)
    for d, level in enumerate(tree.levels if rule.budget else ()):  # budget 0: the root alone, no heads run
        drafted[:] = False
        drafted[confident_nodes(path_probs, rule)] = True
        on = drafted[level.parents]  # (B,)
        if not on.any():
            break
        under = on[level.slot]  # (n,) children of an expanded parent
        path_probs[level.children[under]] = path_probs[level.parents[level.slot[under]]] * expand(d, on)
    return confident_nodes(path_probs, rule)


@functools.lru_cache(maxsize=4096)
def _subtree(paths: tuple, topk: int, nodes: tuple, lookup: int) -> TreeBuffers:
    tree = build_tree([paths[j - 1] for j in nodes[1:]], topk, max((len(p) for p in paths), default=1))
    return with_lookup(tree, lookup)


def subtree(tree: TreeBuffers, nodes: np.ndarray, lookup: int = 0) -> TreeBuffers:
    """The buffers of the tree made of `nodes` (root first, closed under parents: grow_draft's
    answer), with a `lookup`-token chain when > 0 (with_lookup); built once per distinct set. Its
    node i < len(nodes) is `tree`'s node nodes[i]."""
    return _subtree(tree.paths, tree.topk, tuple(int(j) for j in nodes), lookup)


def to_depth(tree: TreeBuffers, depth: int) -> TreeBuffers:
    """The tree cut to its nodes of depth 1..`depth` (no lookup chain). Nodes are laid out depth by
    depth, so its node j is `tree`'s node j: what was recorded for `tree`'s nodes serves it as is
    (replay.choose_plan drafts from such shallower menus, which need fewer of the sequential heads)."""
    if not 1 <= depth <= tree.heads_depth:
        raise ValueError(f"to_depth: depth must be 1..{tree.heads_depth} (the tree's depth), not {depth!r}.")
    return subtree(tree, np.arange(1 + sum(len(p) <= depth for p in tree.paths)))


def top_chain(tree: TreeBuffers) -> TreeBuffers:
    """The tree cut to its top-ranked chain: the root and the nodes whose path is all rank 0, (0,),
    (0, 0), ... (no lookup chain). Its passes lay every node's ancestors out in consecutive rows, as
    plain decoding does; on quantised graphs that is what keeps Medusa exact (decoding.generate)."""
    return subtree(tree, np.array([0] + [j for j, p in enumerate(tree.paths, 1) if not any(p)]))


# What a tree or plan file may hold: the tree, the heads it was sized for, its provenance and its promise,
# and the plan's sections. load_plan refuses any other key: a misspelt section would otherwise be ignored.
PLAN_KEYS = ("paths", "topk", "heads_fingerprint", "source", "expected_tau", "replayed_tau", "replayed_speedup",
             "rule", "lookup")


def save_tree(path: str | Path, paths, topk: int, heads: str | Path | None = None, **info) -> None:
    """A tree file; with `heads` (the checkpoint folder it was sized for) it records that checkpoint's
    fingerprint, so that a tree or plan sized for heads trained again since is refused (check_sized_for).
    `info`: more of PLAN_KEYS (a plan's sections, its source and promise)."""
    unknown = sorted(set(info) - set(PLAN_KEYS))
    if unknown:
        raise ValueError(f"save_tree: {unknown} are not fields of a tree file (allowed: {', '.join(PLAN_KEYS)}).")
    paths = [tuple(p) for p in paths]
    validate_paths(paths, topk, max((len(p) for p in paths), default=0))  # a bad tree is refused here, not at its next load
    if heads is not None:
        from medusa_lib.heads import checkpoint_fingerprint
        info["heads_fingerprint"] = checkpoint_fingerprint(heads)
    write_json(path, {"paths": [list(p) for p in paths], "topk": topk, **info})


def check_sized_for(path: str | Path, heads_fingerprint: str | None) -> None:
    """Refuse a tree or plan file sized for other heads than those about to run (when both sides
    say which heads they are: files written before fingerprints existed are read as before)."""
    recorded = read_json(path).get("heads_fingerprint")
    if recorded and heads_fingerprint and recorded != heads_fingerprint:
        raise ValueError(f"{path} was sized for other heads than the export holds now (the heads were trained again "
                         f"since): size it anew (notebook 03 for trees, 06 for device plans) or pass another file.")


def load_tree(path: str | Path, num_heads: int) -> TreeBuffers:
    raw = read_json(path)
    if not isinstance(raw, dict) or "paths" not in raw or "topk" not in raw or not isinstance(raw["paths"], list) \
            or not all(isinstance(p, list) for p in raw["paths"]):
        raise ValueError(f"{path} is not a tree file (needs 'topk' and 'paths', a list of rank lists); write it with save_tree.")
    try:
        return build_tree([tuple(p) for p in raw["paths"]], raw["topk"], num_heads)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _whole(value, path, name: str, low: int) -> int:
    """A count read from a plan file, used exactly as written: a whole number >= low, or an error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{path}: {name} must be a whole number >= {low}, not {value!r}.")
    return value


def _known_keys(raw: dict, allowed: tuple[str, ...], path, where: str) -> None:
    """A misspelt key would otherwise be ignored and its default used: the plan would run otherwise than it reads."""
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ValueError(f"{path}: {where} has unknown key(s) {unknown} (allowed: {', '.join(allowed)}).")


def _rule(raw, path, where: str) -> DraftRule:
    if not isinstance(raw, dict) or "budget" not in raw:
        raise ValueError(f"{path}: {where} needs 'budget' (and may have 'min_prob'): an object, not {raw!r}.")
    _known_keys(raw, ("budget", "min_prob"), path, where)
    min_prob = raw.get("min_prob", 0.0)
    if isinstance(min_prob, bool) or not isinstance(min_prob, (int, float)) or not 0.0 <= min_prob <= 1.0:
        raise ValueError(f"{path}: {where}'s min_prob must be a number in [0, 1], not {min_prob!r}.")
    return DraftRule(_whole(raw["budget"], path, f"{where}'s budget", 0), float(min_prob))


def load_plan(path: str | Path, num_heads: int) -> tuple[TreeBuffers, dict]:
    """A tree file with its optional sections, as (tree, the matching arguments of decoding.generate):
    "rule": {"budget": n, "min_prob": p} (draft by `DraftRule`, the tree then being the menu), and
    "lookup": {"tokens": m, "min_ngram": g, "paths": [...], "rule": {...}} (prompt lookup, and the tree
    or rule on its steps). replay.choose_plan writes them; ({}: the tree alone)."""
    tree = load_tree(path, num_heads)
    raw = read_json(path)
    _known_keys(raw, PLAN_KEYS, path, "the file")
    kwargs = {"rule": _rule(raw["rule"], path, "'rule'")} if "rule" in raw and raw["rule"] is not None else {}
    section = raw.get("lookup")
    if section is None:
        return tree, kwargs
    if not isinstance(section, dict) or "tokens" not in section:  # an empty or falsy section is an error, not "no lookup"
        raise ValueError(f"{path}: the 'lookup' section needs 'tokens' (and may have 'min_ngram', 'paths' and 'rule'): "
                         f"an object, not {section!r}; leave the section out for no prompt lookup.")
    _known_keys(section, ("tokens", "min_ngram", "paths", "rule"), path, "the 'lookup' section")
    kwargs.update({"lookup": _whole(section["tokens"], path, "the lookup's tokens", 1),
                   "lookup_min_ngram": _whole(section.get("min_ngram", 1), path, "the lookup's min_ngram", 1)})
    check_lookup(kwargs["lookup"], kwargs["lookup_min_ngram"], f"{path}: ")
    if section.get("paths") is not None:
        if not isinstance(section["paths"], list) or not all(isinstance(p, list) for p in section["paths"]):
            raise ValueError(f"{path}: the lookup's paths must be a list of rank lists, not {section['paths']!r}.")
        try:
            kwargs["lookup_tree"] = build_tree([tuple(p) for p in section["paths"]], tree.topk, num_heads)
        except ValueError as err:
            raise ValueError(f"{path}: the lookup's paths: {err}") from None
    if "rule" in section and section["rule"] is not None:
        kwargs["lookup_rule"] = _rule(section["rule"], path, "the 'lookup' section's 'rule'")
    return tree, kwargs
