"""Mixtures of experts upcycled from dense models (mergekit-moe's configs), streamed.

Sparse upcycling (Komatsuzaki et al. 2022): the attention, embeddings and norms of an MoE come from a
base model, each expert's MLP from one dense fine-tune, and a router (gate) per layer picks the
experts of each token. Nothing here is a special case of the engine:

- :mod:`mergekit_lite.plan.moe` parses the config into an ordinary step (``MergePlan.moe``);
- :mod:`.arch` knows the output architectures (tensor names, config.json);
- :mod:`.layout` expands the step into output tensors against the inputs' headers: copies and renames
  of base and expert tensors, and generated router tensors;
- :mod:`.nodes` holds the node kinds for what is not a plain read (embedding rows, routers, perturbed
  experts, zero biases), through the node contract of :mod:`mergekit_lite.nodes`;
- :mod:`.gates` is the router math (pure functions), :mod:`.hidden` the one forward pass of
  ``gate_mode: hidden`` (optional ``transformers``);
- :mod:`.cli` is the ``mergekit-moe`` entry point, :mod:`.api` the Python form.

This package imports nothing heavy at import time (the command line's ``--help`` stays torch-free).
"""
