"""Single-process engines (no Ray): the vLLM rollout engine, the DeepSpeed training strategy and
HF scoring forward passes. Import the submodule you need; importing this package loads none."""
