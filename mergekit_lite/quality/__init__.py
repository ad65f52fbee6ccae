"""Measuring what a merge kept, and searching for the parameters that keep the most.

- :mod:`.tasks`: task files (JSONL prompt/answer for generation, text for perplexity);
- :mod:`.scoring`: exact match, per-character accuracy and perplexity, defined exactly;
- :mod:`.hf`: a transformers model in memory, filled from the tensors a merge streams;
- :mod:`.infer`: greedy continuations and negative log-likelihoods;
- :mod:`.evaluate`: ``mergekit-lite eval`` (:func:`evaluate`), a :class:`Report` of models × tasks;
- :mod:`.search`: ``mergekit-lite search`` (:func:`search`), candidates merged in memory and scored.

transformers is needed to score (an optional extra); nothing here is imported by the merge engine.
"""
