"""moelora benchmark suite.

``python -m benchmarks`` times moelora against PyTorch baselines (naive per-expert loop,
dense gated expand, torch grouped_mm, PEFT LoRA, frozen nn.Linear) on the shape suite of
DESIGN.md, writes a JSON results file and a PNG plot under ``benchmarks/results/`` and
prints a table. ``python -m benchmarks.targets FILE`` checks the issue's targets.
See benchmarks/README.md for the method.
"""
