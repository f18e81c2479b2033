"""Deployment: export a trained model to ONNX and TorchScript (checked against PyTorch,
with latency), and classify image files with any model the pipeline or export produced.

    transferkit export MODEL.pt [--out DIR] [--test-set artifacts/prepare/target.pt]
    transferkit predict MODEL IMAGE [IMAGE ...] [--json]
"""
