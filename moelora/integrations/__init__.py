"""moelora with other libraries: transformers' Trainer (``hf_trainer``; imported on demand,
transformers is optional).

May import: everything in moelora.
"""
