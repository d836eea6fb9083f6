"""One heads call a step: a tree's sequential heads wired into one ONNX graph.

Sequential heads (docs/design.md, "Heads that see tokens") are exported one graph per depth,
heads_{d}.onnx: hidden state (B, C) and the embeddings of the root .. parent path (B, d+1, C) in,
the head's top-k ids and probabilities (B, topk) out. Drafting a tree with them takes one call per
depth, the tokens of each depth looked up in the embedding table on the host and fed to the next.

`tree_heads_graph` wires those per-depth graphs into one graph for a given tree:

    root (1,), hidden (1, C), embed (V, C)
      -> depth 0: head 0 on the root's path                      ids (1, topk)
      -> depth d: head d on every parent at depth d, their paths  ids (B_d, topk)
         gathered from the tokens found so far, embedded by Gather
      -> tokens (N,), probs (N,) of every node (the root's prob 1)

ONNX Runtime is entered once a step instead of once a depth, and weights the heads share (the output
layer) are stored and read once. Every parent of the tree is expanded, where the per-depth calls of a
draft rule skip the unlikely ones; rows are cheap next to the weights a call reads (docs/engine.md has
the measurements). The output stays exact either way: the base verifies every drafted token.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import compose, helper, numpy_helper

from medusa_lib.tree import TreeBuffers


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _shared_initializers(graph: onnx.GraphProto) -> None:
    """Keep one copy of initializers with the same type, shape and bytes (the heads' shared output
    layer appears once per head file), and point every node at it."""
    first, keep, rename = {}, [], {}
    for init in graph.initializer:
        key = (init.data_type, tuple(init.dims), hashlib.sha1(numpy_helper.to_array(init).tobytes()).hexdigest())
        if key in first:
            rename[init.name] = first[key]
        else:
            first[key] = init.name
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for node in graph.node:
        node.input[:] = [rename.get(x, x) for x in node.input]


def tree_heads_graph(head_files: list[Path], tree: TreeBuffers) -> onnx.ModelProto:
    """One graph drafting every node of `tree` with the sequential heads in `head_files` (heads_0 ..).

    Inputs: root (1,) int64, hidden_states (1, C), embed (V, C) (the base's input embeddings).
    Outputs: tokens (N,) int64 and probs (N,) (the heads' float type), in the tree's node order."""
    heads = [onnx.load(str(path)) for path in head_files[: tree.heads_depth]]
    hidden = next(i for i in heads[0].graph.input if i.name == "hidden_states")
    dtype = hidden.type.tensor_type.elem_type  # float or float16, as the heads were exported
    p_type = next(o for o in heads[0].graph.output if o.name == "head_topk_probs").type.tensor_type.elem_type
    C = hidden.type.tensor_type.shape.dim[1].dim_value
    nodes, inits = [], []
    tokens, probs = "tokens_0", "probs_0"  # the nodes found so far: the root
    nodes.append(helper.make_node("Identity", ["root"], [tokens]))
    inits += [_const(probs, np.ones(1, dtype=onnx.helper.tensor_dtype_to_np_dtype(p_type))),
              _const("flat", np.array([-1], dtype=np.int64))]  # a Reshape to one axis
    found = 1
    for d, level in enumerate(tree.levels):
        if not np.array_equal(level.children, np.arange(found, found + len(level.children))):
            raise ValueError("tree_heads_graph needs each depth's nodes after the previous depth's (build_tree's order).")
        B = len(level.parents)
        part = compose.add_prefix(heads[d], f"d{d}_")
        inits += [_const(f"path_{d}", tree.ancestors[level.parents, : d + 1]),  # (B, d+1) node indices
                  _const(f"rows_{d}", np.array([B, C], dtype=np.int64)),
                  _const(f"pick_{d}", level.slot * tree.topk + level.rank)]  # (n,) into the flat (B*topk,) top-k
        nodes += [helper.make_node("Gather", [tokens, f"path_{d}"], [f"path_ids_{d}"]),  # (B, d+1)
                  helper.make_node("Gather", ["embed", f"path_ids_{d}"], [f"path_emb_{d}"]),  # (B, d+1, C)
                  helper.make_node("Expand", ["hidden_states", f"rows_{d}"], [f"hidden_{d}"])]  # (B, C)
        wire = {f"d{d}_hidden_states": f"hidden_{d}", f"d{d}_token_embeddings": f"path_emb_{d}"}
        for node in part.graph.node:
            node.input[:] = [wire.get(x, x) for x in node.input]
            nodes.append(node)
        inits += part.graph.initializer
        nodes += [helper.make_node("Reshape", [f"d{d}_head_topk_ids", "flat"], [f"ids_flat_{d}"]),  # (B*topk,)
                  helper.make_node("Reshape", [f"d{d}_head_topk_probs", "flat"], [f"probs_flat_{d}"]),
                  helper.make_node("Gather", [f"ids_flat_{d}", f"pick_{d}"], [f"child_ids_{d}"]),  # (n,)
                  helper.make_node("Gather", [f"probs_flat_{d}", f"pick_{d}"], [f"child_probs_{d}"]),
                  helper.make_node("Concat", [tokens, f"child_ids_{d}"], [f"tokens_{d + 1}"], axis=0),
                  helper.make_node("Concat", [probs, f"child_probs_{d}"], [f"probs_{d + 1}"], axis=0)]
        tokens, probs = f"tokens_{d + 1}", f"probs_{d + 1}"
        found += len(level.children)
    nodes += [helper.make_node("Identity", [tokens], ["tokens"]), helper.make_node("Identity", [probs], ["probs"])]
    graph = helper.make_graph(
        nodes, "tree_heads",
        [helper.make_tensor_value_info("root", onnx.TensorProto.INT64, [1]),
         helper.make_tensor_value_info("hidden_states", dtype, [1, C]),
         helper.make_tensor_value_info("embed", dtype, ["V", C])],
        [helper.make_tensor_value_info("tokens", onnx.TensorProto.INT64, [tree.size]),
         helper.make_tensor_value_info("probs", p_type, [tree.size])], inits)
    _shared_initializers(graph)
    model = helper.make_model(graph, opset_imports=heads[0].opset_import)
    model.ir_version = heads[0].ir_version
    return model


class TreeHeads:
    """A session of tree_heads_graph for one tree, with the embedding table placed once where the
    session runs: on the CPU ONNX Runtime reads the memory-mapped table where it lies; with the CUDA
    provider the table is copied to the card once, not at every call."""

    def __init__(self, head_files: list[Path], tree: TreeBuffers, embed: np.ndarray, options, providers,
                 device_id: int = 0):
        self.session = ort.InferenceSession(tree_heads_graph(head_files, tree).SerializeToString(), options,
                                            providers=providers)
        on_card = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.embed = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(embed), *(("cuda", device_id) if on_card else ()))

    def __call__(self, root: int, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """root id and hidden (1, C) -> every node's token (N,) and its head's probability (N,)."""
        tokens, probs = self.session.run(None, {"root": np.array([root], dtype=np.int64), "hidden_states": hidden,
                                                "embed": self.embed})
        return tokens, probs
