"""Pruning: structured channel pruning (Torch-Pruning dependency graphs) and unstructured
magnitude pruning (torch.nn.utils.prune), each followed by a short distillation recovery."""
