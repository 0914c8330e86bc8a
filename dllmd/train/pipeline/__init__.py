"""Pipeline (model-parallel) training: each stage of a job holds a contiguous span of the layers.

``schedule`` says in which order a stage runs its micro-batches' forward and backward passes (pure);
``links`` carries activations and their gradients between neighbouring stages; ``stage`` is one
node's part of a job (its span, AdamW, the step); ``run`` is the coordinator's loop over the stages
and, for hybrid jobs, over the replicas of every stage.
"""
