"""Choosing a drafting plan on held-out prompts, by replaying greedy decoding offline.

Under greedy decoding the text is fixed in advance: it is the base's plain greedy reply, whatever
the tree. So whether a tree node would be accepted can be read off once that reply is known, and
any plan (a sub-tree, a prompt-lookup chain, a smaller tree on the steps where the lookup fires)
can be replayed step by step without running the base again:

  1 record    decode each dev prompt plainly on ORT; run the base once over prompt + reply for
              its hidden states; at every reply position ask the heads what a large tree would
              propose and keep the nodes whose tokens the reply confirms
  2 simulate  walk each reply as Medusa would: a step accepts the longest confirmed path of the
              plan's tree (or of its lookup chain), costs one verification pass of its size (the
              measured cost curve, made non-decreasing by `monotone_cost`) plus the heads' calls,
              and moves on by L + 1 tokens
  3 choose    the plan with the most tokens per second; its tau is the pooled tokens per step.
              With the heads' probabilities recorded too, a plan can also draft by a
              tree.DraftRule (each step, only the nodes the heads are surest of): `_Drafts` replays
              grow_draft on them, the recorded tree being the menu (or, for sequential heads,
              that menu cut at a smaller depth: fewer heads to run a step)
  4 check     after the benchmark: the promise against what was measured (`replay_vs_measured`)

The dev prompts are not the benchmark's (config.sizing_questions), so the benchmark's prompts
judge a plan chosen without them.

    replays = record(rt, prompts, build_tree(greedy_tree(rank_acc, 15), topk, K), 128, eos)
    best, curve = choose_plan(replays, rank_acc, cost, heads_s, per_depth=True, lookup_tokens=(0, 3, 4))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from medusa_lib.tree import DraftRule, TreeBuffers, chain_paths, greedy_tree, grow_draft, prompt_lookup, to_depth

LOOKUP_TOKENS = (0, 2, 3, 4, 5, 6, 8)  # prompt-lookup chain lengths tried (0: none)
LOOKUP_MIN_NGRAMS = (1, 2, 3)  # shortest repeated n-gram that triggers the lookup
MAX_BUDGET = 15  # heads' nodes (root excluded) of the largest tree recorded
DRAFT_BUDGETS = (1, 2, 3, 4, 5, 6, 8)  # DraftRule budgets tried (heads' nodes drafted at most)
DRAFT_MIN_PROBS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)  # and path-probability floors
# Plans whose replayed speed is within this fraction of the fastest count as equally fast (the
# replay's promise and the benchmark have differed by 0.01-0.08x, as the machine's load moved): of
# those, the one of highest tau is chosen, since it needs fewer passes for the same text.
TAU_SLACK = 0.01
LOOKUP_RULES = (DraftRule(0), DraftRule(1), DraftRule(2), DraftRule(3), DraftRule(1, 0.3), DraftRule(2, 0.3), DraftRule(3, 0.3))


@dataclass
class Replay:
    prompt: np.ndarray  # (P,)
    reply: np.ndarray  # (R,) the plain greedy reply
    right: list[frozenset]  # R sets: with root reply[i], the tree paths whose tokens the reply confirms
    probs: np.ndarray | None = None  # (R, N) each recorded node's own probability (its head's, given its parent path)


def record(rt, prompts, tree: TreeBuffers, max_new_tokens: int, eos_token_ids, progress: bool = True) -> list[Replay]:
    """1. The plain greedy reply to each prompt and, at every reply position, the confirmed nodes of
    `tree` (a node is confirmed when its token and all its ancestors' match the reply)."""
    from tqdm.auto import tqdm

    from medusa_lib.decoding import draft, generate, run_base
    from medusa_lib.export import causal_bias

    everything = DraftRule(tree.size)  # draft every node: the whole tree's tokens and probabilities
    replays = []
    for prompt in tqdm(prompts, desc="replaying dev prompts", disable=not progress):
        prompt = np.asarray(prompt, dtype=np.int64)
        reply = np.asarray(generate(rt, prompt, None, max_new_tokens, eos_token_ids=eos_token_ids)[0], dtype=np.int64)
        full = np.concatenate([prompt, reply])  # (P+R,)
        P = len(prompt)
        _, hidden = run_base(rt, full, np.arange(len(full)), causal_bias(0, len(full), rt.np_dtype), 0,
                             into_buffers=False)  # (P+R, C)
        right, probs = [], np.zeros((len(reply), tree.size))
        for i in range(len(reply)):  # root reply[i] at position P+i, drafted from the hidden state before it
            _, tokens, probs[i] = draft(rt, int(reply[i]), hidden[P + i - 1], tree, everything)  # (N,), (N,)
            depth = tree.positions
            ok = np.zeros(tree.size, dtype=bool)
            ok[0] = True
            for j in range(1, tree.size):  # parents come before children (build_tree's order)
                parent = tree.ancestors[j, depth[j] - 1]
                ok[j] = ok[parent] and i + depth[j] < len(reply) and tokens[j] == reply[i + depth[j]]
            right.append(frozenset(tree.paths[j - 1] for j in np.nonzero(ok[1:])[0] + 1))
        replays.append(Replay(prompt, reply, right, probs))
    return replays


class _Lookups:
    """Prompt-lookup chains at every reply position, found once per min_ngram at the longest length
    tried (a shorter chain is its prefix), with how many of their tokens the reply confirms."""

    def __init__(self, replays: list[Replay], longest: int):
        self.replays, self.longest, self.memo = replays, longest, {}

    def confirmed(self, r: int, i: int, min_ngram: int) -> int | None:
        """Tokens of the longest chain the reply confirms at root reply[i]; None when no lookup fires."""
        key = (r, i, min_ngram)
        if key not in self.memo:
            rep = self.replays[r]
            history = np.concatenate([rep.prompt, rep.reply[: i + 1]])
            chain = prompt_lookup(history, self.longest, min_ngram)
            if chain is None:
                self.memo[key] = None
            else:
                future = rep.reply[i + 1: i + 1 + self.longest]
                same = chain[: len(future)] == future
                self.memo[key] = int(np.cumprod(same).sum())
        return self.memo[key]


class _Drafts:
    """What a DraftRule drafts at every reply position, replayed on the recorded tree (the menu) and
    its probabilities with tree.grow_draft, the decoder's own procedure: (longest confirmed path,
    nodes drafted with the root, depths the heads ran), memoised. The decoder's heads draft the whole
    menu in their one call (tree_heads.py), so a step that asks them runs every depth of the menu."""

    def __init__(self, replays: list[Replay], tree: TreeBuffers):
        if any(rep.probs is None for rep in replays):
            raise ValueError("Draft rules need the heads' probabilities: record the replays with replay.record.")
        self.replays, self.tree, self.memo = replays, tree, {}

    def of(self, rule: DraftRule):
        """step(r, i) -> (L, nodes, depths) for `rule` at root reply[i] of replay r, memoised per rule."""
        memo, tree = self.memo.setdefault(rule, {}), self.tree

        def step(r: int, i: int) -> tuple[int, int, int]:
            if (r, i) not in memo:
                rep, calls = self.replays[r], []
                own = rep.probs[i]  # (N,)

                def expand(d, on):
                    calls.append(d)
                    level = tree.levels[d]
                    return own[level.children[on[level.slot]]]

                nodes = grow_draft(tree, rule, expand)
                L = max((len(tree.paths[j - 1]) for j in nodes[1:] if tree.paths[j - 1] in rep.right[i]), default=0)
                memo[(r, i)] = (L, len(nodes), tree.heads_depth if calls else 0)
            return memo[(r, i)]
        return step


def monotone_cost(cost: dict[int, float]) -> dict[int, float]:
    """The cost curve as the closest non-decreasing curve (least squares, pool-adjacent-violators).

    A pass of more tokens never costs less than a pass of fewer, but a measured curve can say so by a
    few percent of noise (one run read 41.6 ms at T=5 and 42.1 at T=4), and the replay would then
    buy the larger tree for free. Each run of readings that goes down is replaced by its mean."""
    blocks: list[list[float]] = []  # [mean, count] of pooled neighbours, in order of T
    for T in sorted(cost):
        blocks.append([cost[T], 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    values = [m for m, n in blocks for _ in range(n)]
    return dict(zip(sorted(cost), values))


def priced_curve(cost: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, seconds) of the cost curve as the replay prices it (`monotone_cost`), for np.interp."""
    fit = monotone_cost(cost)
    sizes = np.array(sorted(fit))
    return sizes, np.array([fit[T] for T in sizes])


def simulate(replays: list[Replay], paths, cost: dict[int, float], heads_s: float, per_depth: bool,
             lookup: int = 0, min_ngram: int = 1, lookup_paths=None, lookups: _Lookups | None = None,
             rule: DraftRule | None = None, lookup_rule: DraftRule | None = None, drafts: _Drafts | None = None) -> dict:
    """2. Replay a plan: tree `paths`, plus a `lookup`-token chain (and the tree `lookup_paths`) on the
    steps where the text's last n-gram (n >= min_ngram) occurred before; with a `rule` (and
    `lookup_rule`, default `rule`, on the lookup steps) each step drafts from the recorded tree
    instead (`drafts`, decoding.generate's rule arguments with that tree). Returns the steps, the
    pooled tau (tokens per step), the modelled tokens/s and the speedup over plain decoding (one
    pass a token), from `cost` (seconds per pass of T tokens) and `heads_s` (seconds a heads call)."""
    sizes, secs = priced_curve(cost)
    widest = 2 + lookup + max(len(paths), len(lookup_paths or ()), drafts.tree.size if drafts is not None else 0)
    price = np.interp(np.arange(widest + 1), sizes, secs).tolist()  # seconds a pass of T tokens, by T
    if lookups is None or lookups.longest < lookup:  # chains found once, at least `lookup` long
        lookups = _Lookups(replays, max(lookup, 1))
    if (rule or lookup_rule) and drafts is None:
        raise ValueError("simulate needs drafts=_Drafts(replays, the recorded tree) to replay a draft rule.")
    plans = {False: set(map(tuple, paths)), True: set(map(tuple, paths if lookup_paths is None else lookup_paths))}
    rules = {False: rule, True: lookup_rule or rule}
    drafted = {fired: drafts.of(r) for fired, r in rules.items() if r is not None}  # step(r, i) of each rule
    step_s = {}
    for fired, nodes in plans.items():
        calls = (max((len(p) for p in nodes), default=0) if per_depth else int(bool(nodes)))
        T = 1 + len(nodes) + (lookup if fired else 0)
        step_s[fired] = price[T] + heads_s * calls
    tokens = steps = 0
    seconds = 0.0
    for r, rep in enumerate(replays):
        i = 0
        while i < len(rep.reply):
            chain = lookups.confirmed(r, i, min_ngram) if lookup else None
            fired = chain is not None
            if rules[fired] is None:  # the same tree every step
                L = max((len(p) for p in rep.right[i] if p in plans[fired]), default=0)
                seconds += step_s[fired]
            else:  # what the rule drafts here
                L, n, calls = drafted[fired](r, i)
                T = n + (lookup if fired else 0)
                seconds += price[T] + heads_s * (calls if per_depth else min(calls, 1))
            if fired:
                L = max(L, min(chain, lookup))
            steps += 1
            i += L + 1
        tokens += len(rep.reply)
    plain_s = tokens * price[1]
    return {"steps": steps, "tau": tokens / max(steps, 1), "tok_per_s": tokens / seconds if seconds else 0.0,
            "speedup": plain_s / seconds if seconds else 0.0}


def _rule_field(rule: DraftRule | None) -> dict | None:
    return None if rule is None else dataclasses.asdict(rule)  # a plan file's "rule" section


def _budgets(nodes: int, max_budget: int) -> list[int]:
    """The DraftRule budgets worth replaying on a menu of `nodes` heads' nodes: those of DRAFT_BUDGETS
    up to max_budget that stop short of the menu, and the smallest that covers it (any larger one
    drafts the same nodes)."""
    tried = [b for b in DRAFT_BUDGETS if b <= max_budget]
    return [b for b in tried if b < nodes] + [b for b in tried if b >= nodes][:1]


def choose_plan(replays: list[Replay], rank_acc: np.ndarray, cost: dict[int, float], heads_s: float, per_depth: bool,
                lookup_tokens=(0,), min_ngrams=LOOKUP_MIN_NGRAMS, max_budget: int = MAX_BUDGET,
                menu: TreeBuffers | None = None, tau_slack: float = TAU_SLACK, chains: bool = False,
                progress: bool = True) -> tuple[dict, list[dict]]:
    """3. Every plan: the greedy tree of each node budget (0..max_budget), each lookup length, each
    trigger, and on lookup steps each smaller budget; with `menu` (the recorded tree) also every
    DraftRule of DRAFT_BUDGETS x DRAFT_MIN_PROBS on it, with LOOKUP_RULES (or the same rule) on the
    lookup steps; for sequential heads (`per_depth`) also on the menu cut at each smaller depth
    (tree.to_depth), whose steps pay for fewer heads. The chosen plan is the one of highest tau among
    those within `tau_slack` of the fastest (a fraction of its tokens/s). Returns (chosen plan, the fastest per budget) as dicts
    with nodes (root included), paths, lookup, min_ngram, lookup_paths, rule, lookup_rule (None,
    or a DraftRule's fields), tau, tok_per_s, speedup. With `chains` (a quantised base: decoding.generate
    decodes chains there) the plans are the top-ranked chain of each depth, the root alone on lookup steps,
    and no draft rules. A rule whose budget reaches past a menu's nodes drafts what the smallest such
    budget drafts, so it is replayed once, under that budget."""
    from tqdm.auto import tqdm

    if chains:
        max_budget, menu = min(max_budget, rank_acc.shape[0]), None
    trees = [(chain_paths(b) if chains else greedy_tree(rank_acc, b)) if b else [] for b in range(max_budget + 1)]
    lookups = _Lookups(replays, max(max(lookup_tokens), 1))
    fixed = [(b, m, g, bl) for b in range(max_budget + 1) for m in lookup_tokens for g in (min_ngrams if m else (1,))
             for bl in (((0,) if chains else range(b + 1)) if m else (b,))]
    # sequential heads run one depth after another: a shallower menu drafts fewer nodes but asks fewer heads
    shallower = [to_depth(menu, d) for d in range(1, menu.heads_depth)] if menu is not None and per_depth else []
    menus = (*shallower, *([menu] if menu is not None else []))
    ruled = [(sub, DraftRule(b, p), m, g, lr) for sub in menus
             for b in _budgets(sub.size - 1, max_budget) for p in DRAFT_MIN_PROBS
             for m in lookup_tokens for g in (min_ngrams if m else (1,))
             for lr in ((None, *(r for r in LOOKUP_RULES if r.budget <= b)) if m else (None,))]
    options: list[list[dict]] = [[] for _ in range(max_budget + 1)]  # per budget
    bar = tqdm(total=len(fixed) + len(ruled), desc="replaying plans", disable=not progress)
    for b, m, g, bl in fixed:
        res = simulate(replays, trees[b], cost, heads_s, per_depth, m, g, trees[bl], lookups)
        options[b].append({"nodes": b + 1, "paths": [list(p) for p in trees[b]], "lookup": m, "min_ngram": g,
                           "lookup_paths": [list(p) for p in trees[bl]] if m else None, "rule": None,
                           "lookup_rule": None, **res})
        bar.update()
    drafts = {id(sub): _Drafts(replays, sub) for sub in menus}  # a sub-menu is the menu's first nodes: one recording
    for sub, rule, m, g, lr in ruled:
        res = simulate(replays, sub.paths, cost, heads_s, per_depth, m, g, None, lookups, rule, lr, drafts[id(sub)])
        options[rule.budget].append({"nodes": rule.budget + 1, "paths": [list(q) for q in sub.paths], "lookup": m,
                                     "min_ngram": g, "lookup_paths": None, "rule": _rule_field(rule),
                                     "lookup_rule": _rule_field(lr), **res})
        bar.update()
    bar.close()
    per_budget = [max(o, key=lambda o: o["tok_per_s"]) for o in options]
    fastest = max(o["tok_per_s"] for o in per_budget)
    close = [o for opts in options for o in opts if o["tok_per_s"] >= (1 - tau_slack) * fastest]
    return max(close, key=lambda o: (o["tau"], o["tok_per_s"])), per_budget


def confirmed_rate(replays: list[Replay], path: tuple[int, ...]) -> float:
    """How often the node `path` is confirmed, over the reply positions it could be: the heads'
    accuracy on these prompts (path (0,): head 0's top-1; (0, 0) over (0,): head 1's given a right head 0)."""
    hits = total = 0
    for rep in replays:
        for i, right in enumerate(rep.right):
            if i + len(path) < len(rep.reply):
                total += 1
                hits += tuple(path) in right
    return hits / total if total else float("nan")


def replay_vs_measured(plans: dict[str, dict], result: dict, cost: dict[int, float]):
    """4. What the replay promised (on the sizing prompts) against what the benchmark measured (on
    its own prompts), per method: tau, ms per step and the speedup over plain decoding.

    ms per step (tau over tokens/s) tells the cost model from the prompts: tau may differ because
    the sizing prompts are not the benchmark's, but a step of the same plan should cost what was
    priced. Row "ort" sets the curve's one-token pass beside ort's measured ms per token: far apart,
    the machine was busier during one of them and every price is off by as much."""
    import pandas as pd

    measured = result["methods"]
    plain_s = float(np.interp(1, *priced_curve(cost)))  # a plain token, as `simulate` prices it
    rows = {}
    if "ort" in measured:
        rows["ort"] = {"replayed tau": 1.0, "measured tau": 1.0, "replayed ms/step": plain_s * 1e3,
                       "measured ms/step": 1e3 / measured["ort"]["decode_tok_per_s"],
                       "replayed speedup": 1.0, "measured speedup": 1.0}
    for method, plan in plans.items():
        if method not in measured:
            continue
        got = measured[method]
        rows[method] = {"replayed tau": plan["tau"], "measured tau": got["tau"],
                        "replayed ms/step": 1e3 * plan["tau"] / plan["tok_per_s"],
                        "measured ms/step": 1e3 * got["tau"] / got["decode_tok_per_s"],
                        "replayed speedup": plan["speedup"],  # over plain decoding on the method's own graph
                        "measured speedup": got.get("speedup_vs_plain", got.get("speedup_vs_ort", float("nan")))}
    return pd.DataFrame(rows).T


def plan_file_fields(plan: dict) -> dict:
    """The tree file's fields for a chosen plan (tree.save_tree(path, plan["paths"], topk, **these);
    tree.load_plan reads them back as decoding.generate's arguments)."""
    fields = {"replayed_tau": plan["tau"], "replayed_speedup": plan["speedup"]}
    if plan.get("rule"):
        fields["rule"] = plan["rule"]
    if plan["lookup"]:
        fields["lookup"] = {"tokens": plan["lookup"], "min_ngram": plan["min_ngram"], "paths": plan["lookup_paths"]}
        if plan.get("lookup_rule"):
            fields["lookup"]["rule"] = plan["lookup_rule"]
    return fields


def describe_plan(plan: dict) -> str:
    """A chosen plan in words: its nodes, draft rule and lookup chain, and what the replay priced it at."""
    if plan["rule"]:
        rule = plan["rule"]
        depth = max(len(p) for p in plan["paths"])
        text = (f"drafted by rule (at most {rule['budget']} of the menu's nodes, path probability >= {rule['min_prob']}; "
                f"a menu of {len(plan['paths'])} nodes, {depth} {'depth' if depth == 1 else 'depths'})")
    elif plan["nodes"] > 1:
        text = f"{plan['nodes']} nodes"
    else:
        text = "no heads' nodes (the root alone)"
    if plan["lookup"]:
        text += f", lookup {plan['lookup']} tokens on a repeated {plan['min_ngram']}-gram"
        if plan.get("lookup_rule"):
            budget = plan["lookup_rule"]["budget"]
            text += f", then at most {budget} heads' nodes" if budget else ", then no heads' nodes"
    return f"{text}; replayed tau {plan['tau']:.2f}, {plan['speedup']:.2f}x plain"
