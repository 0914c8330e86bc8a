"""The cluster as the user sees it: the registered nodes (``registry``), what they are doing now
(``live``), and a local N-node cluster on this machine (``local``)."""
