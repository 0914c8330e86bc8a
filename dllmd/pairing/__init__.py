"""Pairing a new machine: a one-time invite code (``code``), the PAKE-keyed channel both ends speak
over a plain TCP socket (``channel``), its typed messages (``messages``) and the joiner's side
(``join``). The inviter's side is dllmctl's (``dllmctl/cluster/invite.py``): it holds the admin
identity and the registry. How it works and what is trusted when: docs/security.md, "Pairing"."""
