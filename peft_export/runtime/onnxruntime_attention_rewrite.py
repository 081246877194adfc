"""Fuse the attention blocks ONNX Runtime's transformer optimizer leaves alone: one ``com.microsoft`` operator per
block, with everything added to the scores before the softmax (relative position bias, padding mask, causal or
sliding-window mask) fed as its ``attention_bias`` input.

The optimizer's BERT patterns (runtime/onnxruntime_fusion.py) need the scores to be ``QK' * scale + mask`` with the
mask built
one of a few known ways. MPNet adds its relative position bias before the mask; rotary models (ModernBERT, Qwen3,
Gemma3, Llama/Mistral) rotate query and key between the projections and the product; grouped-query decoders repeat
key/value heads. None of these match, so the traced graph ran ~30 small operators per block. This module matches
the part every eager attention shares, from the score product to the merged heads::

    scores = MatMul(Q, K')          Q (batch, heads, seq, head), K' (batch, heads, head, seq)
    scores = scores * s  (or / s)   at most one scale per side, before any addition
    scores = scores + bias_1 + ...  additive terms, any order and shapes broadcasting to the scores
    probs  = Softmax(scores)        (then Casts to float, which are identities in an fp32 graph)
    out    = Reshape(Transpose(MatMul(probs, V), 0 2 1 3))   (batch, seq, heads * head)

and replaces it by

* ``Attention`` (query/key/value projections packed into one weight) where Q, K and V are each
  ``Transpose(Reshape(x @ W + b))`` of the same ``x`` (MPNet), or
* ``MultiHeadAttention`` on the Q, K, V the graph already computes (after rotary and head repetition) otherwise,
  and for blocks with a bias when ``pack_with_bias`` is False: ONNX Runtime's dynamic int8 quantizer turns
  ``Attention`` into ``QAttention``, which has no ``attention_bias`` input and would drop the bias, so graphs meant
  for it keep the projections as MatMuls (quantized one by one) and fuse the rest.

The additive terms are summed once per distinct set (MPNet's position bias and mask are shared by every layer; a
ModernBERT has one sum for its global layers and one for its local ones). Nodes that only fed the replaced blocks
are removed. The result is checked numerically by the caller (export/onnx.py) before it is kept.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

MS_DOMAIN = "com.microsoft"
_FLOAT = 1  # onnx.TensorProto.FLOAT


@dataclass
class _Graph:
    """Indexes over a GraphProto, rebuilt after each rewrite."""

    graph: object
    producer: dict = field(default_factory=dict)
    consumers: dict = field(default_factory=lambda: defaultdict(list))
    initializers: dict = field(default_factory=dict)
    weights_dir: str = ""  # where unloaded external data lives (a graph loaded with load_external_data=False)

    def __post_init__(self):
        for node in self.graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers[name].append(node)
        self.initializers = {t.name: t for t in self.graph.initializer}

    def op(self, name: str, op_type: str, perm: tuple[int, ...] | None = None):
        """The node producing ``name`` if it is an ``op_type`` (with that ``perm`` for a Transpose)."""
        node = self.producer.get(name)
        if node is None or node.op_type != op_type:
            return None
        if perm is not None and tuple(_attribute(node, "perm") or ()) != perm:
            return None
        return node

    def constant(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name], base_dir=self.weights_dir)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Identity":  # torch.onnx shares equal weights through Identity
            return self.constant(node.input[0])
        if node is not None and node.op_type == "Constant":
            value = _attribute(node, "value")
            return None if value is None else numpy_helper.to_array(value)
        return None

    def only_consumer(self, name: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 else None


def _attribute(node, name: str):
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None


@dataclass
class _Block:
    softmax: object
    output: object  # the Reshape whose output the fused node produces
    query: str  # (batch, heads, seq, head)
    key_t: str  # (batch, heads, head, seq)
    value: str  # (batch, heads, seq, head)
    scale: float
    terms: tuple[str, ...]


def _scores(g: _Graph, name: str) -> tuple[object, float, list[str]] | None:
    """(QK' MatMul, scale, additive terms) for the scores tensor ``name``, or None when it is not that shape."""
    node = g.producer.get(name)
    if node is None:
        return None
    if node.op_type == "MatMul":
        if any(i in g.initializers or g.constant(i) is not None for i in node.input):
            return None  # a projection, not the product of query and key
        return node, 1.0, []
    if node.op_type in ("Mul", "Div"):
        for side in (0, 1) if node.op_type == "Mul" else (1,):
            value = g.constant(node.input[side])
            if value is None or value.size != 1:
                continue
            below = _scores(g, node.input[1 - side])
            if below is None or below[2]:  # a scale after an addition would scale the bias too
                return None
            factor = float(value.reshape(()))
            return below[0], below[1] * (factor if node.op_type == "Mul" else 1.0 / factor), []
        return None
    if node.op_type == "Add":
        for side in (0, 1):
            below = _scores(g, node.input[side])
            if below is not None:
                return below[0], below[1], [*below[2], node.input[1 - side]]
    return None


def _match(g: _Graph, softmax) -> _Block | None:
    axis = _attribute(softmax, "axis")
    if axis not in (None, -1, 3):
        return None
    probs = softmax.output[0]
    user = g.only_consumer(probs)
    while user is not None and user.op_type == "Cast" and _attribute(user, "to") == _FLOAT:
        probs, user = user.output[0], g.only_consumer(user.output[0])
    if user is None or user.op_type != "MatMul" or user.input[0] != probs:
        return None
    transpose = g.only_consumer(user.output[0])
    if transpose is None or transpose.op_type != "Transpose" or tuple(_attribute(transpose, "perm")) != (0, 2, 1, 3):
        return None
    reshapes = [n for n in g.consumers[transpose.output[0]] if n.op_type == "Reshape"]
    others = [n for n in g.consumers[transpose.output[0]] if n.op_type not in ("Reshape", "Shape")]
    if len(reshapes) != 1 or others:
        return None
    scores = _scores(g, softmax.input[0])
    if scores is None:
        return None
    product, scale, terms = scores
    return _Block(softmax, reshapes[0], product.input[0], product.input[1], user.input[1], scale, tuple(terms))


def _projection(g: _Graph, name: str, key_perm: bool = False) -> tuple[str, np.ndarray, np.ndarray | None] | None:
    """(x, W, b) when ``name`` is ``Transpose(Reshape(x @ W + b))`` with W (and b) constant; a key may instead be
    ``Transpose(Transpose(Reshape(...)), 0 1 3 2)``, or one Transpose with perm 0 2 3 1."""
    if key_perm:
        heads_last = g.op(name, "Transpose", (0, 2, 3, 1))
        if heads_last is not None:
            name = heads_last.input[0]
        else:
            swap = g.op(name, "Transpose", (0, 1, 3, 2))
            inner = swap and g.op(swap.input[0], "Transpose", (0, 2, 1, 3))
            if inner is None:
                return None
            name = inner.input[0]
    else:
        transpose = g.op(name, "Transpose", (0, 2, 1, 3))
        if transpose is None:
            return None
        name = transpose.input[0]
    reshape = g.op(name, "Reshape")
    if reshape is None:
        return None
    bias, add = None, g.op(reshape.input[0], "Add")
    matmul_out = reshape.input[0]
    if add is not None:
        for side in (0, 1):
            bias = g.constant(add.input[side])
            if bias is not None and g.op(add.input[1 - side], "MatMul") is not None:
                matmul_out = add.input[1 - side]
                break
        else:
            return None
    matmul = g.op(matmul_out, "MatMul")
    weight = None if matmul is None else g.constant(matmul.input[1])
    if weight is None or weight.ndim != 2 or (bias is not None and bias.shape != weight.shape[1:]):
        return None
    return matmul.input[0], weight, bias


class _Rewriter:
    def __init__(self, model, num_heads: int, pack_with_bias: bool = True, weights_dir: str = ""):
        self.model, self.graph, self.num_heads = model, model.graph, num_heads
        self.weights_dir = weights_dir
        self.pack_with_bias = pack_with_bias
        self.new_nodes: list = []
        self.new_initializers: list = []
        self.bias_sums: dict[tuple[str, ...], str] = {}
        self.counter = 0

    def name(self, stem: str) -> str:
        self.counter += 1
        return f"/fused_attention/{stem}_{self.counter}"

    def node(self, op_type: str, inputs: list[str], stem: str, domain: str = "", **attrs) -> str:
        from onnx import helper

        out = self.name(stem)
        self.new_nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain or None, **attrs))
        return out

    def constant(self, array: np.ndarray, stem: str) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        self.new_initializers.append(numpy_helper.from_array(array, name))
        return name

    def bias_input(self, terms: tuple[str, ...]) -> str:
        if not terms:
            return ""
        if len(terms) == 1:
            return terms[0]
        if terms not in self.bias_sums:
            total = terms[0]
            for term in terms[1:]:
                total = self.node("Add", [total, term], "attention_bias")
            self.bias_sums[terms] = total
        return self.bias_sums[terms]

    def merged_heads(self, name: str) -> str:
        """(batch, seq, heads * head) from a (batch, heads, seq, head) tensor, reusing a (batch, seq, heads, head)
        tensor the graph already has when there is one."""
        transpose = _Graph.op(self.g, name, "Transpose", (0, 2, 1, 3))
        source = transpose.input[0] if transpose is not None else self.node("Transpose", [name], "bsnh",
                                                                             perm=[0, 2, 1, 3])
        return self.node("Reshape", [source, self.shape_3d], "bsd")

    def fuse(self, g: _Graph, block: _Block) -> str:
        from onnx import helper

        self.g = g
        bias = self.bias_input(block.terms)
        q, k, v = (_projection(g, block.query), _projection(g, block.key_t, key_perm=True),
                   _projection(g, block.value))
        packed = q and k and v and q[0] == k[0] == v[0] and (self.pack_with_bias or not bias)
        weights = [p[1] for p in (q, k, v)] if packed else []
        if packed and all(w.shape == weights[0].shape for w in weights):
            biases = [p[2] if p[2] is not None else np.zeros(p[1].shape[1], p[1].dtype) for p in (q, k, v)]
            stem = block.output.name.rsplit("/", 1)[0] or "attention"
            inputs = [q[0], self.constant(np.concatenate(weights, axis=1), f"{stem}_qkv_weight"),
                      self.constant(np.concatenate(biases), f"{stem}_qkv_bias"), "", "", bias]
            op_type = "Attention"
        else:
            swap = _Graph.op(g, block.key_t, "Transpose", (0, 1, 3, 2))
            key = swap.input[0] if swap is not None else self.node("Transpose", [block.key_t], "bnsh",
                                                                    perm=[0, 1, 3, 2])
            inputs = [self.merged_heads(block.query), key, block.value, "", "", bias]
            op_type = "MultiHeadAttention"
        while inputs[-1] == "":
            inputs.pop()
        self.new_nodes.append(helper.make_node(op_type, inputs, [block.output.output[0]], domain=MS_DOMAIN,
                                               name=self.name(op_type), num_heads=self.num_heads,
                                               scale=float(block.scale)))
        return op_type

    def run(self) -> dict[str, int]:
        counts = {"Attention": 0, "MultiHeadAttention": 0}
        g = _Graph(self.graph, weights_dir=self.weights_dir)
        self.shape_3d = self.constant(np.array([0, 0, -1], dtype=np.int64), "shape_bsd")
        replaced = []
        for softmax in [n for n in self.graph.node if n.op_type == "Softmax"]:
            block = _match(g, softmax)
            if block is not None:
                counts[self.fuse(g, block)] += 1
                replaced.append(block.output)
        if not replaced:
            return counts
        for node in replaced:
            self.graph.node.remove(node)
        self.graph.node.extend(self.new_nodes)
        self.graph.initializer.extend(self.new_initializers)
        _remove_dead_code(self.graph)
        _topological_sort(self.graph)
        if not any(opset.domain == MS_DOMAIN for opset in self.model.opset_import):
            self.model.opset_import.add(domain=MS_DOMAIN, version=1)
        return counts


def fuse_remaining_attention(model, num_heads: int, pack_with_bias: bool = True,
                             weights_dir: str = "") -> dict[str, int]:
    """Rewrite ``model`` (a ModelProto) in place: every attention block of the shape in the module docstring becomes
    one fused operator. Returns ``{"Attention": n, "MultiHeadAttention": m}`` (both 0: nothing matched, and the
    graph is unchanged).

    ``model`` may be a graph loaded without its external data (``weights_dir``: the folder of its data file): the
    rewrite reads a weight only to pack query/key/value projections, and then from that folder; the weights it
    leaves stay where they are, so the data file need not be rewritten."""
    return _Rewriter(model, num_heads, pack_with_bias, weights_dir).run()


def _remove_dead_code(graph) -> None:
    """Drop nodes whose outputs nothing reads, then initializers and value infos nothing refers to."""
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(_sorted_nodes(graph)):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
            needed.update(_subgraph_inputs(node))
    keep_ids = {id(node) for node in kept}
    for node in [n for n in graph.node if id(n) not in keep_ids]:
        graph.node.remove(node)
    for tensor in [t for t in graph.initializer if t.name not in needed]:
        graph.initializer.remove(tensor)
    produced = {name for node in graph.node for name in node.output}
    for info in [v for v in graph.value_info if v.name not in produced]:
        graph.value_info.remove(info)


def _subgraph_inputs(node) -> set[str]:
    """Names an If/Loop body reads from the outer graph (conservatively: every input of its nodes)."""
    names: set[str] = set()
    for attribute in node.attribute:
        for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
            names.update(name for n in sub.node for name in n.input)
    return names


def _sorted_nodes(graph) -> list:
    """Nodes in an order where each comes after the producers of its inputs (Kahn's algorithm, stable)."""
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output}
    nodes = list(graph.node)
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        for name in set(node.input) | _subgraph_inputs(node):
            if name in producer and producer[name] != i:
                waiting[i] += 1
                users[producer[name]].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    order = []
    while ready:
        i = ready.pop(0)
        order.append(nodes[i])
        for j in users[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle after the attention rewrite")
    return order


def _topological_sort(graph) -> None:
    order = _sorted_nodes(graph)
    copies = [type(node)() for node in order]
    for copy, node in zip(copies, order):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)
