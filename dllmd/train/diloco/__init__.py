"""DiLoCo (Douillard et al. 2023): every worker takes ``sync_every`` AdamW steps on its own rows of the
global batches, then the workers average how far they moved (the pseudo-gradient) and an outer
Nesterov step moves the shared weights, from which every worker goes on."""
