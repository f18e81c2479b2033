"""What an ONNX file's graph says of itself, read as data before it runs: predict's checks of files a stranger may
have sent. Apart from sessions.py, which every stage imports: a change here reruns only the stages that import
runtime.py (export, quantize, evaluate)."""

from __future__ import annotations

from pathlib import Path

# ops that hand on their first input's values unchanged: a Softmax behind them still gives probabilities
PASS_THROUGH = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"})
FLOAT_TYPES = frozenset({1, 10, 11, 16})  # onnx.TensorProto's FLOAT, FLOAT16, DOUBLE, BFLOAT16: what Cast may keep


def control_flow(path: Path) -> str | None:
    """The first Loop or Scan node in an ONNX file's graph, its functions' and subgraphs' included: iterations the
    file counts (a Loop of 2**62 runs for ever), where an exported classifier runs each of its layers once."""
    import onnx

    graphs = [*(model := onnx.load(str(path), load_external_data=False)).functions, model.graph]
    while graphs:
        for node in graphs.pop().node:
            if node.op_type in ("Loop", "Scan"):
                return node.op_type
            graphs += [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]
    return None


def final_op(path: Path) -> str:
    """The kind of standard ONNX node that makes a file's first output, looking through the ops that only reshape
    its values or cast them to another float type (a model whose forward ends in `softmax(x).reshape(...)`); '' for
    a graph input, a constant or a node of another domain (a model function of the file's own)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    made_by = {name: node for node in graph.node for name in node.output}
    name, seen = graph.output[0].name, set()
    while (node := made_by.get(name)) and _hands_on(node) and name not in seen:
        seen.add(name)
        name = node.input[0]
    return node.op_type if node and node.domain in ("", "ai.onnx") else ""


def _hands_on(node) -> bool:
    """Whether `node` passes its first input's values on unchanged."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in PASS_THROUGH or not node.input:
        return False
    return node.op_type != "Cast" or any(a.name == "to" and a.i in FLOAT_TYPES for a in node.attribute)
