"""Tree buffers: the hand-worked example of docs/design.md, a property test, validation, sizing."""

import random

import numpy as np
import pytest

from medusa_lib.tree import PAD, build_tree, chain_paths, expected_tau, greedy_tree, rank_accuracy, save_tree


def test_hand_worked_five_node_tree():
    tree = build_tree([(1, 0), (0,), (0, 1), (1,), (0, 0)], topk=10, num_heads=2)  # order does not matter
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0))
    assert tree.tree_indices.tolist() == [0, 1, 2, 11, 12, 11]
    assert tree.positions.tolist() == [0, 1, 1, 2, 2, 2]
    assert tree.retrieve_indices.tolist() == [[0, 1, 3], [0, 1, 4], [0, 2, 5]]
    assert tree.mask.astype(int).tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ]


def random_tree(rng, num_heads=4, topk=5, size=30):
    paths = set()
    while len(paths) < size:
        parent = rng.choice([()] + [p for p in paths if len(p) < num_heads])
        paths.add(parent + (rng.randrange(topk),))
    return sorted(paths)


@pytest.mark.parametrize("seed", range(20))
def test_random_trees_attend_exactly_to_ancestors(seed):
    rng = random.Random(seed)
    paths = random_tree(rng, size=rng.randint(1, 40))
    tree = build_tree(paths, topk=5, num_heads=4)
    nodes = [()] + list(tree.paths)
    for i, p in enumerate(nodes):
        for j, q in enumerate(nodes):
            assert tree.mask[i, j] == (p[: len(q)] == q), (p, q)  # j is i or an ancestor of i
        assert tree.positions[i] == len(p)
        if p:
            assert tree.tree_indices[i] == 1 + 5 * (len(p) - 1) + p[-1]
    leaves = {p for p in tree.paths if not any(q[: len(p)] == p and q != p for q in tree.paths)}
    rows = {tuple(nodes[n] for n in row if n != PAD)[-1] for row in tree.retrieve_indices}
    assert rows == leaves  # one row per leaf; padding only after the leaf
    for row in tree.retrieve_indices:
        real = row[row != PAD]
        assert (row[len(real):] == PAD).all() and [len(nodes[n]) for n in real] == list(range(len(real)))


@pytest.mark.parametrize("paths, message", [
    ([(0,), (0, 0), (0, 0, 0)], "only 2 heads"),
    ([(0,), (10,)], "rank outside"),
    ([(0,), (1, 0)], "prefix"),
    ([(0,), (0,)], "twice"),
])
def test_invalid_trees_are_refused(paths, message):
    with pytest.raises(ValueError, match=message):
        build_tree(paths, topk=10, num_heads=2)


def test_greedy_tree_and_expected_tau():
    rank_acc = rank_accuracy(np.array([[0.5, 0.7, 0.8, 0.85, 0.9], [0.3, 0.4, 0.5, 0.55, 0.6]]))
    assert np.allclose(rank_acc[0], [0.5, 0.2, 0.1, 0.05, 0.05])
    assert expected_tau(chain_paths(2), rank_acc) == pytest.approx(1 + 0.5 + 0.5 * 0.3)
    tree = greedy_tree(rank_acc, 6)
    assert len(tree) == 6 and tree[:3] == [(0,), (1,), (2,)]
    build_tree(tree, topk=10, num_heads=2)  # prefix-closed and within bounds
    taus = [expected_tau(greedy_tree(rank_acc, b), rank_acc) for b in range(1, 12)]
    assert all(b >= a for a, b in zip(taus, taus[1:]))


def test_hand_worked_tree_levels_for_sequential_heads():
    tree = build_tree([(0,), (1,), (0, 0), (0, 1), (1, 0)], topk=10, num_heads=2)
    assert tree.ancestors.tolist() == [[0, PAD, PAD], [0, 1, PAD], [0, 2, PAD], [0, 1, 3], [0, 1, 4], [0, 2, 5]]
    first, second = tree.levels
    assert first.parents.tolist() == [0] and first.children.tolist() == [1, 2] and first.rank.tolist() == [0, 1]
    assert second.parents.tolist() == [1, 2] and second.children.tolist() == [3, 4, 5]
    assert second.slot.tolist() == [0, 0, 1] and second.rank.tolist() == [0, 1, 0]


@pytest.mark.parametrize("paths, topk, message", [
    ([[0.7]], 4, r"ranks must be whole numbers .*not 0.7"),
    ([["01"]], 4, r"ranks must be whole numbers .*not '01'"),
    ([[True]], 4, r"ranks must be whole numbers"),
    ([[0]], 4.0, r"topk: ranks must be whole numbers .*not 4.0"),
])
def test_tree_files_with_non_integer_ranks_are_refused(tmp_path, paths, topk, message):
    import json

    from medusa_lib.tree import load_tree
    path = tmp_path / "tree.json"
    path.write_text(json.dumps({"paths": paths, "topk": topk}))
    with pytest.raises(ValueError, match=message):
        load_tree(path, num_heads=2)


def test_a_plan_file_round_trips_with_its_lookup_section(tmp_path):
    from medusa_lib.tree import load_plan, prompt_lookup
    path = tmp_path / "plan.json"
    save_tree(path, [(0,), (1,), (0, 0)], 5, lookup={"tokens": 4, "min_ngram": 2, "paths": [[0]]})
    tree, kwargs = load_plan(path, num_heads=2)
    assert tree.paths == ((0,), (1,), (0, 0)) and kwargs["lookup"] == 4 and kwargs["lookup_min_ngram"] == 2
    assert kwargs["lookup_tree"].paths == ((0,),)
    save_tree(path, [(0,)], 5)
    assert load_plan(path, num_heads=2)[1] == {}  # no section: no lookup
    save_tree(path, [(0,)], 5, lookup={"min_ngram": 2})
    with pytest.raises(ValueError, match="plan.json: the 'lookup' section needs 'tokens'"):
        load_plan(path, num_heads=2)
    history = np.array([5, 6, 7, 8, 9, 7])  # only the 1-gram "7" recurs
    assert prompt_lookup(history, 2).tolist() == [8, 9] and prompt_lookup(history, 2, min_ngram=2) is None
    assert prompt_lookup(history, 4).tolist()[:2] == prompt_lookup(history, 2).tolist()  # a longer chain extends a shorter


# ----------------------------------------------------------------------------------------------
# Draft rules: each step drafts the nodes the heads are surest of

def test_a_draft_rule_takes_the_most_probable_nodes_closed_under_parents():
    from medusa_lib.tree import DraftRule, confident_nodes, grow_draft, subtree
    tree = build_tree([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)], topk=4, num_heads=3)
    # own probabilities of nodes 1..7: (0,) .5  (1,) .3  (2,) .1  (0,0) .9  (0,1) .05  (1,0) .9  (0,0,0) .6
    own = np.array([1.0, 0.5, 0.3, 0.1, 0.9, 0.05, 0.9, 0.6])
    asked = []

    def expand(d, on):
        level = tree.levels[d]
        asked.append(level.parents[on].tolist())
        return own[level.children[on[level.slot]]]

    # path probabilities: (0,) .5, (0,0) .45, (1,) .3, (1,0) .27, (0,0,0) .27, (2,) .1, (0,1) .025
    nodes = grow_draft(tree, DraftRule(3), expand)
    assert [tree.paths[j - 1] for j in nodes[1:]] == [(0,), (1,), (0, 0)]
    assert asked == [[0], [1, 2], [4]]  # depth 2 runs only under (0, 0), the one drafted parent there
    asked.clear()
    nodes = grow_draft(tree, DraftRule(8, min_prob=0.2), expand)  # the floor, not the budget, decides
    assert [tree.paths[j - 1] for j in nodes[1:]] == [(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]
    asked.clear()
    assert grow_draft(tree, DraftRule(5, min_prob=0.6), expand).tolist() == [0] and asked == [[0]]  # nothing sure enough
    asked.clear()
    assert grow_draft(tree, DraftRule(0), expand).tolist() == [0] and asked == []  # nothing to draft: no heads run
    tie = np.array([1.0, 0.5, 0.5, -1, -1, -1, -1, -1])  # equal path probabilities: the earlier node first
    assert confident_nodes(tie, DraftRule(1)).tolist() == [0, 1]
    sub = subtree(tree, np.array([0, 1, 2, 4]), lookup=2)  # the buffers of the drafted tree, with a lookup chain
    ref = build_tree([(0,), (1,), (0, 0)], topk=4, num_heads=3)
    assert sub.paths == ref.paths and np.array_equal(sub.mask[:4, :4], ref.mask) and sub.size == 6
    assert subtree(tree, np.array([0, 1, 2, 4]), lookup=2) is sub  # built once
    for bad in (dict(budget=-1), dict(budget=2, min_prob=1.5), dict(budget=True)):
        with pytest.raises(ValueError, match="DraftRule"):
            DraftRule(**bad)


def test_a_plan_file_round_trips_with_its_draft_rules(tmp_path):
    from medusa_lib.tree import DraftRule, load_plan
    path = tmp_path / "plan.json"
    save_tree(path, [(0,), (1,), (0, 0)], 5, rule={"budget": 2, "min_prob": 0.1},
              lookup={"tokens": 4, "min_ngram": 1, "paths": None, "rule": {"budget": 1}})
    tree, kwargs = load_plan(path, num_heads=2)
    assert kwargs == {"rule": DraftRule(2, 0.1), "lookup": 4, "lookup_min_ngram": 1, "lookup_rule": DraftRule(1)}
    from medusa_lib.bench import _tree_plan  # a tree method (medusa_tree, hydra_tree) takes the rule, not the lookup
    tree_only, kwargs = _tree_plan(path, num_heads=2)
    assert kwargs == {"rule": DraftRule(2, 0.1)} and tree_only.paths == tree.paths
    save_tree(path, [(0,)], 5, rule={"min_prob": 0.1})
    with pytest.raises(ValueError, match="plan.json: 'rule' needs 'budget'"):
        load_plan(path, num_heads=2)


def test_plan_files_are_used_exactly_as_written_or_refused(tmp_path):
    import json
    from medusa_lib.tree import DraftRule, load_plan
    good = {"paths": [[0], [1], [0, 0]], "topk": 2, "rule": {"budget": 2, "min_prob": 0.1},
            "lookup": {"tokens": 4, "min_ngram": 2, "paths": [[0]], "rule": {"budget": 1}}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(good))
    tree, kw = load_plan(path, 2)
    assert kw["rule"] == DraftRule(2, 0.1) and kw["lookup"] == 4 and kw["lookup_min_ngram"] == 2
    assert kw["lookup_tree"].size == 2 and kw["lookup_rule"] == DraftRule(1)
    bad = [({"lookup": {"tokens": 2.5}}, r"the lookup's tokens must be a whole number >= 1, not 2.5"),  # was rounded to 2
           ({"lookup": {"tokens": -3}}, r"the lookup's tokens must be a whole number >= 1, not -3"),
           ({"lookup": {"tokens": 4, "min_ngram": 0}}, r"the lookup's min_ngram must be a whole number >= 1, not 0"),  # could never fire
           ({"lookup": {}}, r"the 'lookup' section needs 'tokens'"),  # was: silently no lookup
           ({"lookup": {"tokens": "4"}}, r"the lookup's tokens must be a whole number >= 1, not '4'"),
           ({"rule": {"budget": 2.7}}, r"'rule''s budget must be a whole number >= 0, not 2.7"),
           ({"rule": {}}, r"'rule' needs 'budget'"),
           ({"rule": {"budget": 2, "min_prob": 1.5}}, r"'rule''s min_prob must be a number in \[0, 1\], not 1.5"),
           ({"lookup": {"tokens": 4, "paths": "0"}}, r"the lookup's paths must be a list of rank lists")]
    for change, message in bad:
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match="plan.json: " + message):
            load_plan(path, 2)
