"""Generating through the cluster: the distributed session (``session``), failover and replay
(``failover``), the one generation path every front end uses (``generation``), the tokenizer side
(``tokens``) and the live spans routing chooses from (``stages``)."""
